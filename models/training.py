"""The one training loop every stage uses: AdamW, warmup + cosine, clipping, bf16 autocast, checkpoints.

A stage supplies a `step_fn(model, batch) -> (loss, metrics, n_tokens)`; the loop knows nothing about
what is being learned. Accelerate runs it on one CPU, one GPU, or under `accelerate launch` (tasks/launch.py)
as several processes (DDP; FSDP rendered, not exercised) unchanged: the batch size is the global batch, and
each process trains its shard of every batch.

Device placement lives here too: `pick_device` is the one choice of where models run (train() hands it to
Accelerate; the stages that run a model outside train(), evaluate and align's frozen reference, move the
model there with `for_inference`), and `to_device` moves a batch to its model.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DataLoaderConfiguration, DistributedType, broadcast_object_list, set_seed
from transformers import get_cosine_schedule_with_warmup

from instructflow import signals
from instructflow.errors import NonFiniteError

log = logging.getLogger("instructflow")

StepFn = Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict[str, float], int]]


@dataclass(frozen=True)
class LoopSettings:
    batch_size: int
    max_steps: int
    lr: float
    grad_accum: int = 1
    warmup_ratio: float = 0.05
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    bf16: bool | str = "auto"
    logging_steps: int = 5
    eval_steps: int = 50
    save_steps: int | None = None
    seed: int = 0
    knobs: str = ""  # what feeds the loss, for the user (e.g. "align.lr=5e-05, align.beta=0.1"); empty: lr, max_grad_norm

    @classmethod
    def from_config(cls, cfg, seed: int, **extra) -> "LoopSettings":
        """From a stage's TrainConfig section (instructflow.config)."""
        fields = {f: getattr(cfg, f) for f in cls.__dataclass_fields__ if hasattr(cfg, f)}
        return cls(**{**fields, "seed": seed, **extra})


def pick_device() -> torch.device:
    """Where this process runs its models: the GPU when there is one, else the CPU.

    train() gives Accelerate the same answer, so a model evaluated or used as a frozen reference runs where it
    would have trained (under `accelerate launch`, "cuda" is the process's own GPU).
    """
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def model_device(model: torch.nn.Module) -> torch.device:
    """The device a model's parameters live on: where its inputs must be."""
    return next(model.parameters()).device


def for_inference(model: torch.nn.Module) -> torch.nn.Module:
    """A model that is run, not trained (evaluate's models, align's frozen reference): on pick_device(), eval mode."""
    return model.to(pick_device()).eval()


def to_device(batch: dict, where: torch.nn.Module | torch.device) -> dict:
    """A batch with its tensors on `where`: a device, or a model's device (other values pass through).

    Batches are collated on the CPU; every model call moves them here first, so no input stays behind on the CPU
    when the model is on a GPU. A tensor already there is not copied.
    """
    device = where if isinstance(where, torch.device) else model_device(where)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def use_bf16(setting: bool | str) -> bool:
    """auto: bf16 where the hardware does it natively (CUDA with bf16, or a CPU with AVX512-BF16/AMX)."""
    if setting != "auto":
        return bool(setting)
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return torch.backends.cpu.get_cpu_capability() in {"AVX512", "AMX"}


def inference_autocast(setting: bool | str):
    """The autocast train() evaluates under (bf16 where use_bf16 says so), for a model scored outside train():
    a base model's held-out loss is then measured as a model trained here is."""
    return torch.autocast(pick_device().type, dtype=torch.bfloat16, enabled=use_bf16(setting))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only; norms, biases and embeddings' 1-D params are left alone (GPT-2/nanoGPT practice)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def planned_batches(n: int, batch_size: int, seed: int, epoch: int,
                    lengths: Sequence[int] | None = None) -> list[list[int]]:
    """The global batches of one epoch, each of batch_size rows: the same however many processes train.

    A shuffle seeded by (seed, epoch), so any epoch can be rebuilt. With `lengths`, rows of similar length
    share a batch (sorted within windows of 50 batches, then the batches shuffled, as Hugging Face's
    LengthGroupedSampler does): far less padding for chat data. The last short batch is dropped when there
    is a full one. Under `accelerate launch` each process trains its `shard` of every batch.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=generator).tolist()
    if lengths is not None:
        window = batch_size * 50
        order = [i for k in range(0, n, window) for i in sorted(order[k:k + window], key=lambda i: -lengths[i])]
    batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    if len(batches) > 1 and len(batches[-1]) < batch_size:
        batches.pop()
    if lengths is not None:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    return batches


def shard(batch: list[int], rank: int, world: int) -> list[int]:
    """Process `rank`'s share of one global batch: a contiguous slice; the shares of the `world` processes
    cover the batch once, no row lost or repeated. When the batch does not divide evenly, the first
    len(batch) % world processes take one row more (train() weights each share by its size)."""
    if len(batch) < world:
        raise ValueError(f"a batch of {len(batch)} rows cannot be shared by {world} processes (each needs a row)")
    size, extra = divmod(len(batch), world)
    start = rank * size + min(rank, extra)
    return batch[start:start + size + (rank < extra)]


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, accel: Accelerator,
                  lengths: Sequence[int] | None = None) -> list[list[int]]:
    """This process's share of each global batch of one epoch (see planned_batches and shard)."""
    return [shard(batch, accel.process_index, accel.num_processes)
            for batch in planned_batches(n, batch_size, seed, epoch, lengths)]


def rows_trained(n: int, settings: "LoopSettings", lengths: Sequence[int] | None = None) -> list[int]:
    """The rows `train` will draw in settings.max_steps steps, over all processes, sorted.

    For work done once per row before training (align's reference log-probs): only these rows need it.
    """
    remaining, epoch, seen = settings.max_steps * settings.grad_accum, 0, set()
    while remaining > 0:
        batches = planned_batches(n, settings.batch_size, settings.seed, epoch, lengths)
        take = min(remaining, len(batches))  # micro-batches this epoch
        seen.update(i for batch in batches[:take] for i in batch)
        remaining, epoch = remaining - take, epoch + 1
    return sorted(seen)


def _latest_checkpoint(folder: Path, key: str) -> Path | None:
    found = []
    for ckpt in folder.glob("step-*"):
        meta = ckpt / "loop.json"
        if meta.is_file() and json.loads(meta.read_text()).get("key") == key:
            found.append((json.loads(meta.read_text())["step"], ckpt))
    return max(found)[1] if found else None


@signals.deferred()  # a stop signal is taken in the loop, after an optimiser step
def train(model: torch.nn.Module, dataset: Sequence, collate: Callable, step_fn: StepFn, settings: LoopSettings,
          *, eval_fn: Callable[[torch.nn.Module], dict[str, float]] | None = None,
          on_log: Callable[[int, dict[str, float]], None] | None = None,
          checkpoint_dir: Path | None = None, resume_key: str | None = None,
          lengths: Sequence[int] | None = None) -> list[dict]:
    """Train for settings.max_steps optimiser steps; returns the logged history (one dict per log line).

    `lengths` (one per row) groups rows of similar length into batches (see planned_batches).

    Under `accelerate launch` (N processes, DDP) settings.batch_size is the global batch: each process trains
    its shard of it, its loss weighted by its share (see _share_weight), so the gradient DDP averages is the
    one-process gradient of the whole batch; the logged loss and metrics are the global batch's. Evaluation
    runs on the main process and its row is sent to the others, so every process returns the same history;
    on_log and checkpoints' publication happen on the main process only.

    Checkpoints go to checkpoint_dir/step-N every save_steps (the last two are kept); with resume_key set,
    training resumes from the latest checkpoint written under the same key (e.g. a hash of the params).
    A checkpoint holds the history logged so far: a resumed run hands those rows to on_log first and returns
    them with its own, so its curve starts at step 1.

    A stop signal (instructflow.signals) is taken after an optimiser step: with checkpoint_dir and
    resume_key, a checkpoint of that step is saved first; then `signals.Interrupted` is raised.
    """
    if len(dataset) == 0:
        raise ValueError("training set is empty: nothing to train on")
    set_seed(settings.seed)
    # Accelerate keeps one precision per process; a process may train several models (tests, notebooks) with
    # different settings, so each run starts from a clean state (the process group, if any, is kept)
    AcceleratorState._reset_state()
    GradientState._reset_state()
    # split_batches: settings.batch_size is the global batch (each process trains its shard), so the prepared
    # scheduler steps once an optimiser step, not once per process (Accelerate's default)
    accel = Accelerator(mixed_precision="bf16" if use_bf16(settings.bf16) else "no",
                        cpu=pick_device().type == "cpu", gradient_accumulation_steps=settings.grad_accum,
                        dataloader_config=DataLoaderConfiguration(split_batches=True))
    optimizer = torch.optim.AdamW(param_groups(model, settings.weight_decay), lr=settings.lr, betas=(0.9, 0.95))
    warmup = int(settings.warmup_ratio * settings.max_steps)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, settings.max_steps)
    model, optimizer, scheduler = accel.prepare(model, optimizer, scheduler)
    world, main = accel.num_processes, accel.is_main_process
    if min(settings.batch_size, len(dataset)) < world:
        raise ValueError(f"batch_size {settings.batch_size} (the global batch) over {len(dataset)} rows cannot be "
                         f"shared by {world} processes: each needs at least one row a step")

    step = 0
    history: list[dict] = []
    if checkpoint_dir is not None and resume_key is not None:
        ckpt = _latest_checkpoint(checkpoint_dir, resume_key)
        if ckpt is not None:
            accel.load_state(str(ckpt))
            meta = json.loads((ckpt / "loop.json").read_text())
            step, history = meta["step"], meta.get("history", [])
            log.info("resumed from %s at step %d; %d logged rows before it carried over", ckpt, step, len(history))
            for row in history:  # the run's record starts at step 1, as if it had never stopped
                if on_log is not None and main:
                    on_log(row["step"], row)

    window: dict[str, float] = {}
    n_micro, tokens, t0 = 0, 0, time.perf_counter()
    grad_norm = float("nan")
    model.train()
    # where the data stream stands: a resumed run carries on with the batch after the last one trained
    per_epoch = len(planned_batches(len(dataset), settings.batch_size, settings.seed, 0, lengths))
    epoch, skip = divmod(step * settings.grad_accum, per_epoch)
    while step < settings.max_steps:
        for rows in planned_batches(len(dataset), settings.batch_size, settings.seed, epoch, lengths)[skip:]:
            index = shard(rows, accel.process_index, world)  # all of them with one process
            # accel.device, not the model's: under FSDP with CPU offload the parameters are not where the batch goes
            batch = to_device(collate([dataset[i] for i in index]), accel.device)
            with accel.accumulate(model):
                loss, metrics, n_tokens = step_fn(model, batch)
                if world > 1:
                    weight = _share_weight(len(index), len(rows), world)
                    loss = loss * weight
                    loss_value, metrics, n_tokens = _global_figures(accel, weight, loss, metrics, n_tokens)
                else:
                    loss_value = float(loss.detach())
                _check_finite(settings, step + 1, {"loss": loss_value, **metrics})  # global: every process agrees
                accel.backward(loss)
                if accel.sync_gradients:
                    grad_norm = float(accel.clip_grad_norm_(model.parameters(), settings.max_grad_norm))
                    _check_finite(settings, step + 1, {"grad norm": grad_norm})
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            for key, value in {"loss": loss_value, **metrics}.items():
                window[key] = window.get(key, 0.0) + value
            n_micro += 1
            tokens += n_tokens
            if not accel.sync_gradients:
                continue
            step += 1
            last = step == settings.max_steps
            if step % settings.logging_steps == 0 or last or step == 1:
                elapsed = time.perf_counter() - t0
                row = {k: v / n_micro for k, v in window.items()}
                row.update(learning_rate=scheduler.get_last_lr()[0], grad_norm=grad_norm,
                           tokens_per_sec=tokens / max(elapsed, 1e-9), epoch=epoch)
                window, n_micro, tokens = {}, 0, 0
                if eval_fn is not None and (step % settings.eval_steps == 0 or last):
                    row.update(_evaluate(accel, model, eval_fn))
                row["step"] = step
                if world > 1:  # the main process's row (its evaluation) is every process's
                    row = broadcast_object_list([row])[0]
                history.append(row)
                if main:
                    log.info("step %d/%d %s", step, settings.max_steps,
                             " ".join(f"{k}={v:.4g}" for k, v in row.items() if k not in {"step", "epoch"}))
                if on_log is not None and main:
                    on_log(step, row)
                t0 = time.perf_counter()  # evaluation and logging do not count against training throughput
            if checkpoint_dir is not None and settings.save_steps and step % settings.save_steps == 0 and not last:
                _save_checkpoint(accel, checkpoint_dir, step, resume_key or "", history)
            if last:
                break
            if _stop_requested(accel):  # the safe point: a whole optimiser step done, on every process
                saved = ""
                if checkpoint_dir is not None and resume_key is not None:
                    if not (settings.save_steps and step % settings.save_steps == 0):  # else saved just above
                        _save_checkpoint(accel, checkpoint_dir, step, resume_key, history)
                    saved = f"; checkpoint {checkpoint_dir / f'step-{step}'} saved, a rerun resumes from it"
                how = signals.name() if signals.received() is not None else "a signal to another process"
                log.warning("stopped by %s after step %d/%d%s", how, step, settings.max_steps, saved)
                signals.check()
                raise signals.Interrupted(signal.SIGTERM)  # only another process was signalled: stop with it
        epoch, skip = epoch + 1, 0
    model.eval()
    return history


def _share_weight(share: int, batch: int, world: int) -> float:
    """What a process's loss is multiplied by under DDP, which averages the processes' gradients.

    With loss_k the mean over process k's n_k rows of an n-row batch, mean_k(grad(w_k * loss_k)) with
    w_k = world * n_k / n is sum_k (n_k / n) grad(loss_k): the gradient of the whole batch's mean, the
    one-process gradient, even when n does not divide evenly. Exact for losses that are means over rows
    (and over tokens when every row has as many, as packed pretraining blocks do); where rows interact or
    weigh by their tokens (token means over rows of unequal length, in-batch negatives, KTO's batch KL
    estimate), each share is a batch of its own, as gradient accumulation's micro-batches already are.
    """
    return world * share / batch


def _global_figures(accel: Accelerator, weight: float, loss: torch.Tensor, metrics: dict[str, float],
                    n_tokens: int) -> tuple[float, dict[str, float], int]:
    """The whole batch's loss and metrics, weighted by each process's share as its gradient is (`loss` comes
    weighted already), and its token count: what one process would have logged. One all-reduce a micro-batch."""
    keys = sorted(metrics)  # every process's step function returns the same keys
    figures = torch.tensor([float(loss.detach()), *(metrics[k] * weight for k in keys), float(n_tokens)],
                           dtype=torch.float64, device=accel.device)
    figures = accel.reduce(figures, reduction="sum")
    world = accel.num_processes
    return float(figures[0]) / world, {k: float(v) / world for k, v in zip(keys, figures[1:-1])}, int(figures[-1])


def _evaluate(accel: Accelerator, model: torch.nn.Module, eval_fn: Callable) -> dict[str, float]:
    """eval_fn's figures, prefixed eval_: on the main process only (the others wait for its row). Under FSDP
    every process runs it on the sharded model, whose forward needs them all (not exercised here)."""
    fsdp = accel.distributed_type == DistributedType.FSDP
    if not (accel.is_main_process or fsdp):
        return {}
    model.eval()
    with torch.no_grad(), accel.autocast():
        figures = eval_fn(model if fsdp else accel.unwrap_model(model))
    model.train()
    return {f"eval_{k}": v for k, v in figures.items()}


def _stop_requested(accel: Accelerator) -> bool:
    """Whether a stop signal came (to any process: all of them stop after the same step, or DDP would hang)."""
    stop = signals.received() is not None
    if accel.num_processes == 1:
        return stop
    return bool(accel.reduce(torch.tensor([int(stop)], device=accel.device), reduction="sum").item())


def _check_finite(settings: LoopSettings, step: int, values: dict[str, float]) -> None:
    """Stop with a NonFiniteError naming the step (1-based, as logged), the value and the knobs that feed it."""
    for name, value in values.items():
        if not math.isfinite(value):
            knobs = settings.knobs or f"lr={settings.lr:g}, max_grad_norm={settings.max_grad_norm:g}"
            raise NonFiniteError(step, settings.max_steps, name, value, knobs, getattr(settings, "unit", "step"))


def _save_checkpoint(accel: Accelerator, folder: Path, step: int, key: str, history: list[dict]) -> None:
    """Every process writes its part of the state (the main one the model and optimiser, each its random
    state) into one staging folder; the main process then publishes it. All of them leave together."""
    if accel.num_processes == 1:
        publish_checkpoint(folder, step, key, history, lambda tmp: accel.save_state(str(tmp)))
        return
    if accel.is_main_process:
        _staging(folder, step, fresh=True)
    accel.wait_for_everyone()
    accel.save_state(str(_staging(folder, step)))
    accel.wait_for_everyone()
    if accel.is_main_process:
        _publish(folder, step, key, history)
    accel.wait_for_everyone()


def _staging(folder: Path, step: int, fresh: bool = False) -> Path:
    tmp = folder / f".tmp-step-{step}"
    if fresh:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    return tmp


def publish_checkpoint(folder: Path, step: int, key: str, history: list[dict], write: Callable[[Path], None]) -> None:
    """folder/step-N: `write(tmp)` fills a temporary folder with the state, loop.json (step, resume key, history)
    is added, then it is renamed into place; only the last two checkpoints are kept. A crash mid-save never
    leaves a checkpoint that looks complete (train() here, and models/online.py's loop)."""
    write(_staging(folder, step, fresh=True))
    _publish(folder, step, key, history)


def _publish(folder: Path, step: int, key: str, history: list[dict]) -> None:
    tmp, target = _staging(folder, step), folder / f"step-{step}"
    (tmp / "loop.json").write_text(json.dumps({"step": step, "key": key, "history": history}))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    for old in sorted(folder.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))[:-2]:
        shutil.rmtree(old, ignore_errors=True)


def perplexity(mean_loss: float) -> float:
    return math.exp(min(mean_loss, 50.0))

"""The one training loop every stage uses: AdamW, warmup + cosine, clipping, bf16 autocast, checkpoints.

A stage supplies a `step_fn(model, batch) -> (loss, metrics, n_tokens)`; the loop knows nothing about
what is being learned. Accelerate runs it on one CPU, one GPU, or under `accelerate launch` on several
GPUs (DDP/FSDP) unchanged.

Device placement lives here too: `pick_device` is the one choice of where models run (train() hands it to
Accelerate; the stages that run a model outside train(), evaluate and align's frozen reference, move the
model there with `for_inference`), and `to_device` moves a batch to its model.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import set_seed
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


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only; norms, biases and embeddings' 1-D params are left alone (GPT-2/nanoGPT practice)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def planned_batches(n: int, batch_size: int, seed: int, epoch: int, world: int = 1,
                    lengths: Sequence[int] | None = None) -> list[list[int]]:
    """Every process's batches of one epoch, interleaved (process k takes every world-th from the k-th on).

    A shuffle seeded by (seed, epoch), so any epoch can be rebuilt. With `lengths`, rows of similar length
    share a batch (sorted within windows of 50 batches, then the batches shuffled, as Hugging Face's
    LengthGroupedSampler does): far less padding for chat data. The last short batch is dropped when there
    is a full one; the count is cut to a multiple of the world size, so every process gets as many.
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
    usable = max(len(batches) // world, 1) * world
    return batches[:usable]


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, accel: Accelerator,
                  lengths: Sequence[int] | None = None) -> list[list[int]]:
    """This process's batches of one epoch (see planned_batches)."""
    world = accel.num_processes
    return planned_batches(n, batch_size, seed, epoch, world, lengths)[accel.process_index::world]


def rows_trained(n: int, settings: "LoopSettings", lengths: Sequence[int] | None = None, world: int = 1) -> list[int]:
    """The rows `train` will draw in settings.max_steps steps, over all processes, sorted.

    For work done once per row before training (align's reference log-probs): only these rows need it.
    """
    remaining, epoch, seen = settings.max_steps * settings.grad_accum, 0, set()
    while remaining > 0:
        batches = planned_batches(n, settings.batch_size, settings.seed, epoch, world, lengths)
        take = min(remaining, len(batches) // world)  # micro-batches per process this epoch
        seen.update(i for batch in batches[: take * world] for i in batch)
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

    `lengths` (one per row) groups rows of similar length into batches (see epoch_batches).

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
    accel = Accelerator(mixed_precision="bf16" if use_bf16(settings.bf16) else "no",
                        cpu=pick_device().type == "cpu", gradient_accumulation_steps=settings.grad_accum)
    optimizer = torch.optim.AdamW(param_groups(model, settings.weight_decay), lr=settings.lr, betas=(0.9, 0.95))
    warmup = int(settings.warmup_ratio * settings.max_steps)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, settings.max_steps)
    model, optimizer, scheduler = accel.prepare(model, optimizer, scheduler)

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
                if on_log is not None:
                    on_log(row["step"], row)

    window: dict[str, float] = {}
    n_micro, tokens, t0 = 0, 0, time.perf_counter()
    grad_norm = float("nan")
    model.train()
    # where the data stream stands: a resumed run carries on with the batch after the last one trained
    per_epoch = len(epoch_batches(len(dataset), settings.batch_size, settings.seed, 0, accel, lengths))
    epoch, skip = divmod(step * settings.grad_accum, per_epoch)
    while step < settings.max_steps:
        for index in epoch_batches(len(dataset), settings.batch_size, settings.seed, epoch, accel, lengths)[skip:]:
            # accel.device, not the model's: under FSDP with CPU offload the parameters are not where the batch goes
            batch = to_device(collate([dataset[i] for i in index]), accel.device)
            with accel.accumulate(model):
                loss, metrics, n_tokens = step_fn(model, batch)
                _check_finite(settings, step + 1, {"loss": float(loss.detach()), **metrics})
                accel.backward(loss)
                if accel.sync_gradients:
                    grad_norm = float(accel.clip_grad_norm_(model.parameters(), settings.max_grad_norm))
                    _check_finite(settings, step + 1, {"grad norm": grad_norm})
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            for key, value in {"loss": float(loss.detach()), **metrics}.items():
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
                    model.eval()
                    with torch.no_grad(), accel.autocast():
                        row.update({f"eval_{k}": v for k, v in eval_fn(accel.unwrap_model(model)).items()})
                    model.train()
                row["step"] = step
                history.append(row)
                log.info("step %d/%d %s", step, settings.max_steps,
                         " ".join(f"{k}={v:.4g}" for k, v in row.items() if k not in {"step", "epoch"}))
                if on_log is not None:
                    on_log(step, row)
                t0 = time.perf_counter()  # evaluation and logging do not count against training throughput
            if checkpoint_dir is not None and settings.save_steps and step % settings.save_steps == 0 and not last:
                _save_checkpoint(accel, checkpoint_dir, step, resume_key or "", history)
            if last:
                break
            if signals.received() is not None:  # the safe point: a whole optimiser step done
                saved = ""
                if checkpoint_dir is not None and resume_key is not None:
                    if not (settings.save_steps and step % settings.save_steps == 0):  # else saved just above
                        _save_checkpoint(accel, checkpoint_dir, step, resume_key, history)
                    saved = f"; checkpoint {checkpoint_dir / f'step-{step}'} saved, a rerun resumes from it"
                log.warning("stopped by %s after step %d/%d%s", signals.name(), step, settings.max_steps, saved)
                signals.check()
        epoch, skip = epoch + 1, 0
    model.eval()
    return history


def _check_finite(settings: LoopSettings, step: int, values: dict[str, float]) -> None:
    """Stop with a NonFiniteError naming the step (1-based, as logged), the value and the knobs that feed it."""
    for name, value in values.items():
        if not math.isfinite(value):
            knobs = settings.knobs or f"lr={settings.lr:g}, max_grad_norm={settings.max_grad_norm:g}"
            raise NonFiniteError(step, settings.max_steps, name, value, knobs, getattr(settings, "unit", "step"))


def _save_checkpoint(accel: Accelerator, folder: Path, step: int, key: str, history: list[dict]) -> None:
    publish_checkpoint(folder, step, key, history, lambda tmp: accel.save_state(str(tmp)))


def publish_checkpoint(folder: Path, step: int, key: str, history: list[dict], write: Callable[[Path], None]) -> None:
    """folder/step-N: `write(tmp)` fills a temporary folder with the state, loop.json (step, resume key, history)
    is added, then it is renamed into place; only the last two checkpoints are kept. A crash mid-save never
    leaves a checkpoint that looks complete (train() here, and models/online.py's loop)."""
    target = folder / f"step-{step}"
    tmp = folder / f".tmp-step-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    (tmp / "loop.json").write_text(json.dumps({"step": step, "key": key, "history": history}))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    for old in sorted(folder.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))[:-2]:
        shutil.rmtree(old, ignore_errors=True)


def perplexity(mean_loss: float) -> float:
    return math.exp(min(mean_loss, 50.0))

"""The stage launcher: a training stage on several GPUs re-executes itself under `accelerate launch`.

`python -m tasks.<stage>` (DVC's command) asks `processes()` how many processes the stage runs as: one,
unless the stage trains with models/training.py's loop (`multi_process` in the stage table) and more than
one GPU is visible, or INSTRUCTFLOW_NPROC forces a count (on a CPU too: the processes then join a gloo
group; this is how tests/test_distributed.py runs two). With N > 1 the process becomes the launcher: it
runs Accelerate's own `accelerate launch` with the flags `launch_args` renders (DDP by default; FSDP when
`distributed.strategy` says so), which starts N copies of the same stage command; they find themselves
launched (RANK / WORLD_SIZE) and run the stage. The launcher then exits with the first failed process's
code (2 for a user error), or 128 + the signal that stopped them.

Only the main process (rank 0) opens the MLflow run and writes the outputs, metrics, lineage and
checkpoints (tasks/runtime.py); the others train their share of each batch and stop.
"""

from __future__ import annotations

import logging
import os
import sys

from instructflow.config import Params
from instructflow.errors import ConfigError
from instructflow.stages import stage as stage_named

log = logging.getLogger("instructflow")

NPROC_ENV = "INSTRUCTFLOW_NPROC"
"""a process count that wins over the visible GPUs (1: one process even on a multi-GPU worker)"""
ONLINE = ("ppo", "grpo", "rloo")  # align's online loop (models/online.py) runs on one device


def rank() -> int:
    """This process's rank under a launcher (RANK, set by torchrun / accelerate launch); 0 when alone."""
    return int(os.environ.get("RANK", "0"))


def world() -> int:
    """How many processes run this stage (WORLD_SIZE under a launcher; 1 when alone)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    """The process that owns the stage's MLflow run and writes its outputs."""
    return world() == 1 or rank() == 0


def forced() -> int | None:
    """INSTRUCTFLOW_NPROC as a count, None when unset."""
    value = os.environ.get(NPROC_ENV, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"{NPROC_ENV}={value!r}: expected a whole number of processes >= 1 (unset: one per "
                          "visible GPU)")
    return int(value)


def processes(stage: str, params: Params) -> int:
    """How many processes this stage command should run as (1: here, as it is).

    Already launched (WORLD_SIZE > 1): 1, this process is one of them. A stage that does not train with the
    shared loop, or align's online algorithms: 1. Otherwise INSTRUCTFLOW_NPROC, or the visible GPUs.
    """
    if world() > 1:
        return 1
    wanted = forced()
    s = stage_named(stage)
    alone = ("it does not train with the shared loop" if not s.multi_process else
             "align's online loop runs on one device" if stage == "align" and params.align.algorithm in ONLINE else
             "pretrain.base_model: nothing is trained" if stage == "pretrain" and params.pretrain.base_model else "")
    if alone:
        if wanted is not None and wanted > 1:
            log.info("stage %s runs as one process (%s=%d ignored): %s", stage, NPROC_ENV, wanted, alone)
        return 1
    if wanted is None:
        wanted = _gpus()
    if wanted <= 1:
        return 1
    check(stage, params, wanted, _gpus())
    return wanted


def _gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check(stage: str, params: Params, n: int, gpus: int) -> None:
    """Refuse what cannot run on n processes, naming the key: a global batch smaller than n, more processes
    than the visible GPUs (one GPU each), FSDP without GPUs."""
    batch = getattr(params, stage).batch_size
    if batch < n:
        raise ConfigError(f"{stage}.batch_size = {batch} is the global batch, shared by the {n} processes: it must "
                          f"be at least {n} (raise it, or set {NPROC_ENV} lower)")
    if 0 < gpus < n:
        raise ConfigError(f"{NPROC_ENV}={n} processes, but {gpus} GPU(s) are visible and each process takes one: set "
                          f"{NPROC_ENV} to at most {gpus} (or unset it: one process per GPU)")
    if params.distributed.strategy == "fsdp" and gpus == 0:
        raise ConfigError(f"distributed.strategy = fsdp shards the model over GPUs, but {n} processes were asked "
                          "for with no GPU visible: use distributed.strategy: ddp for CPU processes")


def launch_args(stage: str, n: int, params: Params) -> list[str]:
    """The `accelerate launch` command line (after `accelerate launch`) that runs the stage on n processes.

    Every setting is a flag, so a default accelerate config file cannot change the run. Precision is not:
    train() chooses it (bf16 where the hardware has it), as it does in one process. `--multi_gpu` is
    Accelerate's torchrun launcher: without GPUs the processes' Accelerator(cpu=True) joins a gloo group.
    """
    args = ["--num_processes", str(n), "--num_machines", "1", "--main_process_port", "0",
            "--mixed_precision", "no", "--dynamo_backend", "no"]
    cfg = params.distributed
    if cfg.strategy == "fsdp":
        # FULL_STATE_DICT: a checkpoint or saved model holds whole weights; TRANSFORMER_BASED_WRAP without a class
        # wraps each block the model names in `_no_split_modules` (LlamaDecoderLayer, BertLayer, a base's own)
        args += ["--use_fsdp", "--fsdp_version", "1", "--fsdp_sharding_strategy", cfg.fsdp_sharding,
                 "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP", "--fsdp_state_dict_type", "FULL_STATE_DICT",
                 "--fsdp_use_orig_params", "true",  # train()'s two parameter groups (decay / no decay)
                 "--fsdp_offload_params", str(cfg.fsdp_offload_params).lower()]
    else:
        args.append("--multi_gpu")
    return [*args, "-m", f"tasks.{stage}"]


def launch(stage: str, n: int, params: Params) -> int:
    """Run the stage as n processes under `accelerate launch` (in this process); the exit code to leave with."""
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    gpu = _gpus() >= n
    args = launch_args(stage, n, params)
    if params.distributed.strategy == "fsdp":
        log.warning("distributed.strategy = fsdp has not been exercised by instructflow's tests (DDP has): check that "
                    "the saved model of stage %s loads and scores as expected", stage)
    log.info("stage %s: %d processes (%s, %s): accelerate launch %s", stage, n, params.distributed.strategy,
             "one GPU each" if gpu else "CPU, gloo", " ".join(args))
    try:
        launch_command(launch_command_parser().parse_args(args))
    except ChildFailedError as exc:
        failed_rank, failure = exc.get_first_failure()
        code = failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode  # -N: killed by signal N
        log.error("stage %s: process %d of %d failed (exit %d); its log is above", stage, failed_rank, n, code)
        return code
    except SignalException as exc:
        log.warning("stage %s stopped by %s: its %d processes were asked to stop", stage, exc.sigval.name, n)
        return 128 + int(exc.sigval)
    return 0


def relaunch_if_wanted(stage: str, params: Params) -> None:
    """Exit through the launcher when the stage should run as several processes; return to run it here."""
    n = processes(stage, params)
    if n > 1:
        sys.exit(launch(stage, n, params))

"""What every stage's `main()` shares: logging, params, a seed, its MLflow run, atomic outputs, lineage.

A stage is `python -m tasks.<name>` (its DVC command). It reads params.yaml, seeds every generator before it
builds anything, does its work inside its MLflow run, and writes its output folder through a temporary
folder renamed into place at the end, so a crash never leaves an output a later stage would take as done.

On several GPUs a training stage runs as one process per GPU (tasks/launch.py): every process runs the body
and trains its share of each batch, and only the main one has the MLflow run and writes outputs, metrics,
lineage and checkpoints; the others' run logs nothing and their output folder is thrown away.

What a stage writes into its cached output depends on its inputs alone, so a rerun on the same inputs
writes the same bytes and DVC spares the stages after it. What differs from run to run (the MLflow run
id, timings, throughput) goes to MLflow and to `lineage/<stage>.json`, which DVC does not track.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from instructflow import env, signals
from instructflow.config import Params, load_params
from instructflow.errors import InstructflowError
from instructflow.io import atomic_dir, inputs_key, read_jsonl, write_json_atomic
from instructflow.stages import stage as stage_named
from tasks import launch
from tasks.keep import restore_outputs
from tasks.tracking import StageRun, WorkerRun, stage_run

log = logging.getLogger("instructflow")

# figures that differ between two runs on the same inputs: MLflow and the lineage file, never a cached output
VOLATILE = ("tokens_per_sec", "wall_time_s", "rollout_tokens_per_sec", "rollout_seconds", "update_seconds",
            "multitask_seconds")
INVOCATION_ENV = "INSTRUCTFLOW_INVOCATION"  # set by the flow: tells it which stages its DVC call really ran


def setup_logging() -> None:
    """INFO to stdout; under `accelerate launch` the processes but the main one log errors only (the same
    warnings would come from each)."""
    logging.basicConfig(level=logging.INFO if launch.is_main() else logging.ERROR,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", stream=sys.stdout,
                        force=True)
    for noisy in ("alembic", "mlflow", "urllib3", "httpx", "filelock", "datasets", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def seed_everything(seed: int) -> None:
    """Python, NumPy and torch generators, before any model is built: the same seed gives the same model."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lineage_path(root: Path, stage: str) -> Path:
    return root / "lineage" / f"{stage}.json"


def read_lineage(root: Path, stage: str) -> dict:
    """What made a stage's current output: its MLflow run id, params hash, timings (empty if unknown)."""
    path = lineage_path(root, stage)
    return json.loads(path.read_text()) if path.is_file() else {}


def save_history(history: list[dict], stage: str, out: Path, run: StageRun) -> None:
    """history.csv (DVC plots) and loss.png (MLflow artifact) of a training run, inside its output folder.

    Throughput columns stay out of the file (they differ between identical runs); MLflow has them per step.
    """
    if not history:
        return
    keys = sorted({k for row in history for k in row} - {"step", *VOLATILE})
    path = out / "history.csv"
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["step", *keys], lineterminator="\n")
        writer.writeheader()
        for row in history:
            writer.writerow({k: row.get(k, "") for k in ["step", *keys]})

    from matplotlib.figure import Figure  # no pyplot: no global backend state

    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    for key in ("loss", "eval_loss"):
        pts = [(r["step"], r[key]) for r in history if key in r]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if key == "eval_loss" else None, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"{stage} loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=100, metadata={"Software": None})
    run.log_artifact(path, "plots")
    run.log_artifact(out / "loss.png", "plots")


def final_metrics(history: list[dict], keys: tuple[str, ...]) -> dict[str, float]:
    """The last logged value of each key (e.g. the final eval loss)."""
    out = {}
    for key in keys:
        vals = [r[key] for r in history if key in r]
        if vals:
            out[key] = float(vals[-1])
    return out


def output_dir(root: Path, stage: str) -> Path:
    """The stage's output folder (its `outs` in dvc.yaml, from the stage table)."""
    return root / stage_named(stage).output


@contextmanager
def stage_output(root: Path, stage: str, run: StageRun, *, model=None, tokenizer=None,
                 history: list[dict] | None = None) -> Iterator[Path]:
    """The one save tail of every stage: a temporary folder that replaces the stage's output at the end.

    The model and tokenizer (Hugging Face folders) and the training history (history.csv, loss.png) are
    written for the stage; the block may add its own files to the yielded folder. Once the output is in place
    the stage's checkpoints (checkpoints/<stage>, see `resumable`) are removed: only a stopped run resumes.

    Under `accelerate launch` the other processes get a temporary folder that is thrown away (the main process
    writes the output), so a stage's body runs unchanged on every process.
    """
    if not launch.is_main():
        with tempfile.TemporaryDirectory(prefix=f"instructflow-{stage}-rank{launch.rank()}-") as scratch:
            yield Path(scratch)
        return
    with atomic_dir(output_dir(root, stage)) as out:
        if model is not None:
            model.save_pretrained(out)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
        if history:
            save_history(history, stage, out, run)
        yield out
    shutil.rmtree(checkpoint_dir(root, stage), ignore_errors=True)


def checkpoint_dir(root: Path, stage: str) -> Path:
    return root / "checkpoints" / stage


def resumable(root: Path, stage: str, params: Params, *inputs: Path) -> dict[str, Any]:
    """train()'s checkpoint arguments: checkpoints/<stage>, keyed on the params and the bytes of the inputs.

    A run stopped by a signal saves a checkpoint of the step it finished (and one every save_steps); a rerun on
    the same params and the same input model and data resumes from it, its history carried over.
    """
    return {"checkpoint_dir": checkpoint_dir(root, stage), "resume_key": inputs_key(params.digest(), *inputs)}


def _track_off(root: Path, stage: str, params: Params) -> None:
    """A stage whose track (or an optional stage's switch) is off: an output saying so (and an empty history for the
    plots), nothing trained."""
    s = stage_named(stage)
    track_on = s.track is None or getattr(params.tracks, s.track)
    reason = (f"stage '{stage}' is off in params.yaml ({s.switch} is false)" if track_on else
              f"track of stage '{stage}' is off in params.yaml")
    with atomic_dir(output_dir(root, stage)) as out:
        write_json_atomic(out / "track_off.json", {"stage": stage, "chosen": False, "reason": reason})
        if s.plots:
            (out / "history.csv").write_text(",".join(("step", *s.plots)) + "\n")
    write_json_atomic(root / "metrics" / f"{stage}.json", {"track_chosen": 0})
    log.info("stage %s: %s (tracks: %s); nothing to do", stage, reason, params.tracks.model_dump())


def run_stage(stage: str, body: Callable[[Params, Path, StageRun], dict[str, Any]]) -> None:
    """Run a stage body under its MLflow run; write metrics/<stage>.json and lineage/<stage>.json.

    User errors (bad params, bad data) exit 2 with the message. A stage whose track params.yaml does not
    choose records just that, so DVC's lock stays complete and flipping the track on reruns it for real.
    SIGTERM or SIGINT stops the stage at a safe point (training: after a step, with a checkpoint), ends its
    MLflow run KILLED and exits 128 + the signal.

    A training stage with several GPUs visible (or INSTRUCTFLOW_NPROC > 1) first becomes the launcher of its
    processes (tasks/launch.py), which come back here launched and run the stage.
    """
    setup_logging()
    root = env.setup()
    try:
        with signals.handling():  # (while the launcher runs, torch's own handlers stop its processes)
            _relaunch_if_wanted(stage, root)
    except InstructflowError as exc:
        log.error("stage %s failed: %s", stage, exc)
        restore_outputs(root, stage)
        sys.exit(2)
    except signals.Interrupted as exc:
        restore_outputs(root, stage)
        sys.exit(exc.exit_code)
    _run_here(stage, body, root)
    exit_without_teardown()


def exit_without_teardown(code: int = 0) -> None:
    """End a stage command that finished: the atexit handlers run (MLflow ends its run, logging flushes its handlers,
    multiprocessing stops its children) and the standard streams are flushed, then the process exits without the
    interpreter's teardown of its modules, which writes nothing and took 1.3 to 1.9 s after a stage's work
    (torch, transformers and MLflow loaded; measured from the stage's "done" line to the process's exit, micro)."""
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can be said on it
            pass
    os._exit(code)


def _relaunch_if_wanted(stage: str, root: Path) -> None:
    """Exit through the launcher (tasks/launch.py) when the stage runs as several processes; else return."""
    try:
        params = load_params(root / "params.yaml")
    except InstructflowError:
        return  # reported by _run_here, as any stage reports it
    if params.chosen(stage):
        launch.relaunch_if_wanted(stage, params)


@signals.handling()
def _run_here(stage: str, body: Callable[[Params, Path, StageRun], dict[str, Any]], root: Path) -> None:
    main = launch.is_main()
    started, started_at = time.perf_counter(), time.strftime("%Y-%m-%dT%H:%M:%S%z")
    try:
        params = load_params(root / "params.yaml")
        if not params.chosen(stage):
            if main:
                _track_off(root, stage, params)
            return
        seed_everything(params.seed)
        _use_own_gpu()
        with (stage_run(stage, params, root) if main else nullcontext(WorkerRun())) as run:
            log.info("stage %s: preset %s, MLflow run %s", stage, params.preset, run.run_id)
            metrics = body(params, root, run)
            if not main:
                return  # the main process records the stage
            volatile = {k: metrics.pop(k) for k in VOLATILE if k in metrics}
            volatile["wall_time_s"] = round(time.perf_counter() - started, 2)
            run.log_metrics({**metrics, **volatile})
            write_json_atomic(root / "metrics" / f"{stage}.json", metrics)
            write_json_atomic(lineage_path(root, stage), {
                "stage": stage, "mlflow_run_id": run.run_id, "params_hash": params.digest(),
                "preset": params.preset, "started_at": started_at, "invocation": os.environ.get(INVOCATION_ENV),
                **volatile})
    except InstructflowError as exc:
        log.error("stage %s failed: %s", stage, exc)
        if main:
            restore_outputs(root, stage)  # DVC removed them before this command: the last good ones come back
        sys.exit(2)
    except signals.Interrupted as exc:
        if main:
            log.warning("stage %s stopped by %s: its MLflow run is KILLED, its last good outputs are put back",
                        stage, signals.name(exc.signum))
            restore_outputs(root, stage)
        sys.exit(exc.exit_code)
    except BaseException:
        if main:
            restore_outputs(root, stage)
        raise
    log.info("stage %s done in %.1fs", stage, time.perf_counter() - started)


def _use_own_gpu() -> None:
    """Under `accelerate launch` on GPUs, "cuda" is this process's own GPU (LOCAL_RANK) from the start, also for
    models used before training (align's frozen reference)."""
    if launch.world() > 1 and "LOCAL_RANK" in os.environ:
        import torch

        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))


def read_prepared(root: Path, name: str) -> list[dict]:
    """Rows of data/prepared/<name>.jsonl, the canonical output of the prepare stage."""
    return read_jsonl(root / "data" / "prepared" / f"{name}.jsonl")

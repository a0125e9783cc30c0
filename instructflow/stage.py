"""What every stage's `main()` shares: logging, params, its MLflow run, atomic outputs, loss plots.

A stage is `python -m tasks.<name>` (its DVC command). It reads params.yaml, does its work inside its
MLflow run, and writes each output folder through a temp folder renamed into place at the end, so a
crash never leaves an output a later stage would take as done.
"""

from __future__ import annotations

import csv
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from instructflow import env
from instructflow.config import Params, load_params
from instructflow.data import atomic_dir, read_jsonl  # noqa: F401  (atomic_dir: re-exported for stages)
from instructflow.errors import InstructflowError
from instructflow.tracking import StageRun, stage_run, write_json_atomic

log = logging.getLogger("instructflow")


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stdout, force=True)
    for noisy in ("alembic", "mlflow", "urllib3", "httpx", "filelock", "datasets", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def write_run_info(folder: Path, stage: str, run: StageRun, params: Params, **extra: Any) -> None:
    """run.json beside a stage's output: which MLflow run made it, from which params (the lineage)."""
    write_json_atomic(folder / "run.json", {"stage": stage, "mlflow_run_id": run.run_id,
                                            "params_hash": params.digest(), "preset": params.preset, **extra})


def read_run_info(folder: Path) -> dict:
    path = folder / "run.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def save_history(history: list[dict], stage: str, out: Path, run: StageRun) -> None:
    """history.csv (DVC plots) and loss.png (MLflow artifact) of a training run, inside its output folder."""
    if not history:
        return
    keys = sorted({k for row in history for k in row} - {"step"})
    path = out / "history.csv"
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["step", *keys])
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
    fig.savefig(out / "loss.png", dpi=100)
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


# each stage's output folder (its `outs` in dvc.yaml)
OUTPUT = {"prepare": "data/prepared", "evaluate": "reports", "register": "registry"}


def output_dir(root: Path, stage: str) -> Path:
    return root / OUTPUT.get(stage, f"artifacts/{stage}")


def run_stage(stage: str, body: Callable[[Params, Path, StageRun], dict[str, Any]]) -> None:
    """Run a stage body under its MLflow run; write metrics/<stage>.json; user errors exit 2 with the message.

    A stage whose track params.yaml does not choose records just that (its output folder holds a run.json
    saying so), so DVC's lock stays complete and flipping the track on reruns it for real.
    """
    setup_logging()
    root = env.ROOT
    started = time.perf_counter()
    try:
        params = load_params(root / "params.yaml")
        if not params.chosen(stage):
            with atomic_dir(output_dir(root, stage)) as out:
                write_json_atomic(out / "run.json", {"stage": stage, "chosen": False,
                                                     "reason": f"track of stage '{stage}' is off in params.yaml"})
            write_json_atomic(root / "metrics" / f"{stage}.json", {"track_chosen": 0})
            log.info("stage %s: its track is off in params.yaml (tracks: %s); nothing to do", stage,
                     params.tracks.model_dump())
            return
        with stage_run(stage, params, root) as run:
            log.info("stage %s: preset %s, MLflow run %s", stage, params.preset, run.run_id)
            metrics = body(params, root, run)
            metrics = {**metrics, "wall_time_s": round(time.perf_counter() - started, 2)}
            run.log_metrics(metrics)
            write_json_atomic(root / "metrics" / f"{stage}.json", metrics)
    except InstructflowError as exc:
        log.error("stage %s failed: %s", stage, exc)
        sys.exit(2)
    log.info("stage %s done in %.1fs", stage, time.perf_counter() - started)


def read_prepared(root: Path, name: str) -> list[dict]:
    """Rows of data/prepared/<name>.jsonl, the canonical output of the prepare stage."""
    return read_jsonl(root / "data" / "prepared" / f"{name}.jsonl")

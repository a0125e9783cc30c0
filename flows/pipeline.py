"""The instructflow pipeline as a Prefect flow: each stage is a task that runs its DVC stage.

    prepare -> tokenizer -> pretrain -> sft -> reward -> align -> evaluate   (decoder track)
                         -> mlm -> classify                                  (encoder track)
                         -> register

DVC decides whether a stage must run (its deps, params and outputs in dvc.yaml / dvc.lock); Prefect adds
the schedule, the UI, retries of transient failures and the report artifact; MLflow gets one parent run
per pipeline run, under which every stage that runs opens its nested run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import mlflow
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from instructflow import env
from instructflow.config import STAGES, load_params, write_overrides
from instructflow.errors import InstructflowError
from instructflow.tracking import PARENT_ENV, experiment_id

# DVC's own words for what it did with a stage
RAN = re.compile(r"Running stage '([\w-]+)'")
SKIPPED = re.compile(r"Stage '([\w-]+)' didn't change, skipping")
RESTORED = re.compile(r"Stage '([\w-]+)' is cached - skipping run")
# failures worth a retry: lock contention on DVC's repo lock or on the MLflow sqlite file, never a training error
TRANSIENT = re.compile(r"Unable to acquire lock|database is locked|Connection (refused|reset)|timed out", re.I)


class StageFailed(InstructflowError):
    """A stage's DVC run failed; the message ends with the stage's last log lines."""


class TransientStageFailure(StageFailed):
    """A failure that another attempt may not meet (a lock, a connection)."""


def retry_transient_only(task_obj, task_run, state) -> bool:
    try:
        state.result()
    except TransientStageFailure:
        return True
    except Exception:
        return False
    return False


def dvc_repro(stage: str, root: Path, parent_run_id: str | None, emit) -> tuple[str, str]:
    """Run `dvc repro --single-item <stage>`, stream its output through emit; return (status, log tail)."""
    env_vars = dict(os.environ)
    env_vars["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env_vars.get('PATH', '')}"  # stages use this venv
    if parent_run_id:
        env_vars[PARENT_ENV] = parent_run_id
    cmd = [sys.executable, "-m", "dvc", "repro", "--single-item", stage]
    proc = subprocess.Popen(cmd, cwd=root, env=env_vars, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1)
    status, tail = "failed", []
    for line in proc.stdout:
        line = line.rstrip()
        if not line:
            continue
        emit(line)
        tail = (tail + [line])[-25:]
        if RAN.search(line):
            status = "ran"
        elif RESTORED.search(line):
            status = "restored"
        elif SKIPPED.search(line):
            status = "skipped"
    if proc.wait() != 0:
        text = "\n".join(tail)
        error = TransientStageFailure if TRANSIENT.search(text) else StageFailed
        raise error(f"stage '{stage}' failed (dvc repro exit {proc.returncode}):\n{text}")
    return status, "\n".join(tail)


@task(retries=2, retry_delay_seconds=5, retry_condition_fn=retry_transient_only)
def run_stage(stage: str, root: str, parent_run_id: str | None) -> dict:
    """One pipeline stage: its DVC stage, its log streamed into Prefect, its metrics read back."""
    logger = get_run_logger()
    started = time.perf_counter()
    status, _ = dvc_repro(stage, Path(root), parent_run_id, logger.info)
    wall = time.perf_counter() - started
    metrics_path = Path(root) / "metrics" / f"{stage}.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    if metrics.get("track_chosen") == 0:
        status = "off"  # its track is not chosen in params.yaml: DVC records it, nothing was trained
    logger.info("stage %s %s in %.1fs", stage, status, wall)
    return {"stage": stage, "status": status, "wall_s": round(wall, 1), "metrics": metrics}


@flow(name="instructflow-pipeline", log_prints=True)
def pipeline(preset: str | None = None, overrides: list[str] | None = None, root: str | None = None) -> list[dict]:
    """Validate params (with overrides), write them to params.yaml, then run the chosen tracks' stages in order."""
    logger = get_run_logger()
    project = Path(root).resolve() if root else env.ROOT
    services = env.service_env(project)
    os.environ.update({k: v for k, v in services.items() if k != "PREFECT_HOME"})  # for the stage processes
    mlflow.set_tracking_uri(services["MLFLOW_TRACKING_URI"])
    overrides = list(overrides or [])
    params = load_params(project / "params.yaml", overrides, preset)  # fails here, before any stage, on bad input
    if write_overrides(project / "params.yaml", overrides, preset):
        logger.info("params.yaml updated: preset=%s %s", params.preset, " ".join(overrides))
    stages = list(STAGES)  # every DVC stage runs; one whose track is off only records that (see dvc.yaml)
    logger.info("pipeline: %s (preset %s, tracks: %s)", " -> ".join(params.stages()), params.preset,
                ", ".join(t for t, on in params.tracks if on))

    results: list[dict] = []
    with mlflow.start_run(experiment_id=experiment_id(params.experiment, project), run_name="pipeline",
                          tags={"instructflow.stage": "pipeline", "instructflow.preset": params.preset,
                                "instructflow.params_hash": params.digest()}) as parent:
        mlflow.log_params({"preset": params.preset, "overrides": " ".join(overrides) or "-",
                           "stages": ",".join(stages)})
        for i, stage in enumerate(stages, 1):
            logger.info("[%d/%d] %s", i, len(stages), stage)
            result = run_stage.with_options(name=stage, task_run_name=stage)(stage, str(project), parent.info.run_id)
            results.append(result)
            mlflow.log_metric(f"{stage}.wall_s", result["wall_s"])
            mlflow.set_tag(f"stage.{stage}", result["status"])
            report = project / "reports" / "evaluation.md"
            if stage == "evaluate" and report.is_file():
                create_markdown_artifact(report.read_text(encoding="utf-8"), key="evaluation-report",
                                         description=f"instructflow evaluation ({params.preset} preset)")
        mlflow.set_tag("ran", ",".join(r["stage"] for r in results if r["status"] == "ran") or "none")
    return results

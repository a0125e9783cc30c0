"""MLflow at the edge: one run per stage, nested under the pipeline's parent run when there is one.

The Prefect flow opens the parent run and passes its id to the stage processes through the
environment (INSTRUCTFLOW_PARENT_RUN_ID), which DVC hands on to the stage command unchanged.
Under a bare `dvc repro` each stage gets a top-level run of its own.

Every run records the process that owns it (tags `instructflow.pid`, `instructflow.host`,
`instructflow.pid_started`). A run stopped by a signal ends KILLED (`instructflow.stopped_by` says which);
a run whose process died without a word (SIGKILL, power cut) is marked KILLED by the next run that starts
on the same host (`mark_stale_runs`).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import mlflow

from instructflow import signals
from instructflow.errors import InstructflowError
from tasks import launch

PARENT_ENV = "INSTRUCTFLOW_PARENT_RUN_ID"
PID_TAG, HOST_TAG, PID_STARTED_TAG = "instructflow.pid", "instructflow.host", "instructflow.pid_started"
STOPPED_TAG = "instructflow.stopped_by"

log = logging.getLogger("instructflow")


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}{key}."))
    else:
        out[prefix.rstrip(".")] = data
    return out


def experiment_id(name: str, root: Path) -> str:
    """The experiment, created with its artifacts in the project's mlartifacts/ folder (on a tracking server: in
    the server's artifact store).

    An experiment found in the store must keep its artifacts where this checkout may write them: on a server
    (`mlflow-artifacts:`, s3, gs, ...) or in this project's folder. A store shared by two clones (one sqlite
    file) would otherwise put this clone's models into the other clone's mlartifacts/: that is refused.
    """
    found = mlflow.get_experiment_by_name(name)
    if found is not None:
        check_artifact_home(found.name, found.artifact_location, root)
        return found.experiment_id
    if urlparse(mlflow.get_tracking_uri()).scheme in ("http", "https"):  # a tracking server: its artifact store
        return mlflow.create_experiment(name)  # (mlflow-artifacts:/, proxied), which every client can read
    return mlflow.create_experiment(name, artifact_location=(root / "mlartifacts").resolve().as_uri())


def check_artifact_home(experiment: str, location: str, root: Path) -> None:
    """Refuse a local artifact location outside this project (another clone's folder), naming both."""
    parsed = urlparse(location)
    if parsed.scheme not in ("", "file"):
        return  # a tracking server's artifact store or an object store: meant to be shared
    where = Path(unquote(parsed.path)).resolve()
    here = root.resolve()
    if where == here or here in where.parents:
        return
    raise InstructflowError(
        f"MLflow experiment {experiment!r} in the tracking store {mlflow.get_tracking_uri()} keeps its artifacts "
        f"in {where}, outside this project ({here}): another checkout shares this store (or this one was "
        f"moved), and this run would write its models into that folder. Share runs through a tracking server instead "
        f"(`mlflow server --backend-store-uri postgresql://... --artifacts-destination ...`, then "
        f"MLFLOW_TRACKING_URI=http://host:5000), or give this checkout its own store (unset MLFLOW_TRACKING_URI: "
        f"the default is ./mlflow.db) or its own experiment (`experiment:` in params.yaml)")


def _started(pid: int) -> str | None:
    """When process `pid` started (seconds since the epoch, as text), None if there is no such process."""
    import psutil

    try:
        return f"{psutil.Process(pid).create_time():.2f}"
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def owner_tags() -> dict[str, str]:
    """Tags naming this process, so a later run can tell whether the run is still alive."""
    return {PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname(), PID_STARTED_TAG: _started(os.getpid()) or ""}


def process_gone(tags: dict[str, str]) -> bool:
    """Whether the process a run's tags name has ended (on this host; a run of another host is never judged)."""
    if tags.get(HOST_TAG) != socket.gethostname() or not tags.get(PID_TAG, "").isdigit():
        return False
    started = _started(int(tags[PID_TAG]))
    return started is None or (bool(tags.get(PID_STARTED_TAG)) and started != tags[PID_STARTED_TAG])  # pid reused


def mark_stale_runs(experiment_name: str) -> list[str]:
    """Mark KILLED every RUNNING run of the experiment whose process is gone; their ids.

    Called as a pipeline run or a stage starts: a run killed outright (SIGKILL) otherwise stays RUNNING forever.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    found = client.get_experiment_by_name(experiment_name)
    if found is None:
        return []
    stale = []
    for run in client.search_runs([found.experiment_id], "attributes.status = 'RUNNING'", max_results=1000):
        if process_gone(run.data.tags):
            client.set_tag(run.info.run_id, STOPPED_TAG, "process gone (found by a later run)")
            client.set_terminated(run.info.run_id, "KILLED")
            stale.append(run.info.run_id)
            log.warning("MLflow run %s (%s, pid %s) was RUNNING but its process is gone: marked KILLED",
                        run.info.run_id, run.info.run_name, run.data.tags.get(PID_TAG))
    return stale


@contextmanager
def ended_as_killed_on_signal() -> Iterator[None]:
    """Inside an active MLflow run: a stop signal (or Ctrl-C) ends the run KILLED instead of FAILED."""
    try:
        yield
    except KeyboardInterrupt as exc:
        with signals.deferred():
            how = signals.name(exc.signum) if isinstance(exc, signals.Interrupted) else "KeyboardInterrupt"
            mlflow.set_tag(STOPPED_TAG, how)
            mlflow.end_run("KILLED")
        raise


class StageRun:
    """The active MLflow run of one stage, with the few calls stages need."""

    def __init__(self, run: mlflow.ActiveRun):
        self.run = run
        self.run_id = run.info.run_id

    def log_step(self, step: int, row: dict[str, float]) -> None:
        metrics = {k: float(v) for k, v in row.items() if k != "step" and v == v}  # drop NaN
        mlflow.log_metrics(metrics, step=step)

    def log_metrics(self, metrics: dict[str, float]) -> None:
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        mlflow.log_artifact(str(path), artifact_path=folder)

    def log_json(self, data: Any, name: str) -> None:
        mlflow.log_dict(data, name)

    def log_text(self, text: str, name: str) -> None:
        mlflow.log_text(text, name)


@contextmanager
def stage_run(stage: str, params, root: Path) -> Iterator[StageRun]:
    """Open the stage's MLflow run: params of its section, the resolved config as an artifact, tags."""
    exp = experiment_id(params.experiment, root)
    parent = os.environ.get(PARENT_ENV) or None
    mark_stale_runs(params.experiment)
    tags = {"instructflow.stage": stage, "instructflow.preset": params.preset,
            "instructflow.params_hash": params.digest(), **owner_tags()}
    processes = launch.world()
    if processes > 1:  # under `accelerate launch` (tasks/launch.py): the main process's run is the stage's record
        tags.update({"instructflow.processes": str(processes), "instructflow.strategy": params.distributed.strategy})
    if params.loop.enabled:  # the feedback loop's round (instructflow rounds): which round made this run
        tags["instructflow.round"] = str(max(params.loop.round, 1))
    with mlflow.start_run(experiment_id=exp, run_name=stage, parent_run_id=parent, nested=parent is not None,
                          tags=tags) as run, ended_as_killed_on_signal():
        section = getattr(params, stage, None)
        logged = {"preset": params.preset, "seed": params.seed}
        if section is not None:
            logged.update({f"{stage}.{k}": v for k, v in flatten(section.model_dump(mode="json")).items()})
        mlflow.log_params({k: str(v)[:500] for k, v in logged.items()})
        mlflow.log_dict(params.model_dump(mode="json"), "config/params.json")
        yield StageRun(run)


class WorkerRun(StageRun):
    """What a stage body logs to on a process other than the main one under `accelerate launch`: nothing (the
    main process's run is the stage's one record)."""

    def __init__(self):
        self.run = None
        self.run_id = ""

    def log_step(self, step: int, row: dict[str, float]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float]) -> None:
        pass

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        pass

    def log_json(self, data: Any, name: str) -> None:
        pass

    def log_text(self, text: str, name: str) -> None:
        pass

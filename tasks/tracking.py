"""MLflow at the edge: one run per stage, nested under the pipeline's parent run when there is one.

The Prefect flow opens the parent run and passes its id to the stage processes through the
environment (INSTRUCTFLOW_PARENT_RUN_ID), which DVC hands on to the stage command unchanged.
Under a bare `dvc repro` each stage gets a top-level run of its own.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow

PARENT_ENV = "INSTRUCTFLOW_PARENT_RUN_ID"


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}{key}."))
    else:
        out[prefix.rstrip(".")] = data
    return out


def experiment_id(name: str, root: Path) -> str:
    """The experiment, created with its artifacts in the project's mlartifacts/ folder."""
    found = mlflow.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    return mlflow.create_experiment(name, artifact_location=(root / "mlartifacts").resolve().as_uri())


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
    tags = {"instructflow.stage": stage, "instructflow.preset": params.preset,
            "instructflow.params_hash": params.digest()}
    with mlflow.start_run(experiment_id=exp, run_name=stage, parent_run_id=parent, nested=parent is not None,
                          tags=tags) as run:
        section = getattr(params, stage, None)
        logged = {"preset": params.preset, "seed": params.seed}
        if section is not None:
            logged.update({f"{stage}.{k}": v for k, v in flatten(section.model_dump(mode="json")).items()})
        mlflow.log_params({k: str(v)[:500] for k, v in logged.items()})
        mlflow.log_dict(params.model_dump(mode="json"), "config/params.json")
        yield StageRun(run)

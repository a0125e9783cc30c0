"""Process environment for instructflow: offline, no telemetry, embedded services inside the project.

Imported first by every entry point (CLI, flows, stage modules), so no code path reaches the network
and every tool keeps its state inside the project folder. Values already set by the user win, so a
worker can point MLflow or Prefect at shared servers (see README, "Beyond one machine").
"""

from __future__ import annotations

import os
from pathlib import Path

OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "TF_CPP_MIN_LOG_LEVEL": "3",
}


def project_root() -> Path:
    """The project folder: INSTRUCTFLOW_ROOT if set, else the nearest folder above the cwd holding dvc.yaml."""
    if "INSTRUCTFLOW_ROOT" in os.environ:
        return Path(os.environ["INSTRUCTFLOW_ROOT"]).resolve()
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").is_file() and (folder / "params.yaml").is_file():
            return folder
    return here


SERVICES = ("PREFECT_HOME", "MLFLOW_TRACKING_URI", "HF_HOME")
USER_SET = frozenset(k for k in SERVICES if k in os.environ)  # pointed elsewhere by the user: left alone


def service_env(root: Path) -> dict[str, str]:
    """Where a project's services live: the embedded default inside the project, unless the user set them."""
    defaults = {"PREFECT_HOME": str(root / ".prefect"),
                "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
                "HF_HOME": str(root / ".prefect" / "hf-home")}  # never the user's hub cache
    return {k: (os.environ[k] if k in USER_SET else v) for k, v in defaults.items()}


def setup(root: Path | None = None) -> Path:
    """Set the offline / no-telemetry variables and the embedded-default service locations."""
    root = (root or project_root()).resolve()
    for key, value in OFFLINE.items():
        os.environ.setdefault(key, value)
    os.environ.update(service_env(root))
    return root


ROOT = setup()

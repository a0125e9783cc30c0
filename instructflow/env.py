"""Process environment for instructflow: offline, no telemetry, embedded services inside the project.

Nothing here runs on import. Each entry point calls `setup()` before it imports the libraries that read
these variables (huggingface_hub reads HF_HUB_OFFLINE when it is imported): the stage package
(`tasks/__init__.py`, so `python -m tasks.<stage>` under DVC), the Prefect flows (`flows/__init__.py`),
the CLI and the other applications (`apps/__init__.py`), and the Makefile, which exports the same
variables for the tools it starts. Values the user already set win, so a worker can point MLflow or
Prefect at shared servers (README, "Beyond one machine").
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
    # Prefect's temporary server gets 20 s to start by default; a busy 2-core laptop has needed more (seen: 42 s)
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "DVC_NO_ANALYTICS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",  # its load reports and save notes are about our own tied/new heads
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "TF_CPP_MIN_LOG_LEVEL": "3",
}

SERVICES = ("PREFECT_HOME", "MLFLOW_TRACKING_URI", "HF_HOME")
_USER_SET: frozenset[str] | None = None  # service variables the user set before instructflow touched them


def project_root() -> Path:
    """The project folder: INSTRUCTFLOW_ROOT if set, else the nearest folder above the cwd holding dvc.yaml."""
    if "INSTRUCTFLOW_ROOT" in os.environ:
        return Path(os.environ["INSTRUCTFLOW_ROOT"]).resolve()
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").is_file() and (folder / "params.yaml").is_file():
            return folder
    return here


def _user_set() -> frozenset[str]:
    global _USER_SET
    if _USER_SET is None:
        _USER_SET = frozenset(k for k in SERVICES if k in os.environ)
    return _USER_SET


def service_env(root: Path) -> dict[str, str]:
    """Where a project's services live: the embedded default inside the project, unless the user set them."""
    defaults = {"PREFECT_HOME": str(root / ".prefect"),
                "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
                "HF_HOME": str(root / ".prefect" / "hf-home")}  # never the user's hub cache
    user = _user_set()
    return {k: (os.environ[k] if k in user else v) for k, v in defaults.items()}


def setup(root: Path | None = None) -> Path:
    """Set the offline / no-telemetry variables and the embedded-default service locations; return the root."""
    if root is not None:  # chosen explicitly (--root): later setup() calls in this process keep it
        os.environ["INSTRUCTFLOW_ROOT"] = str(Path(root).resolve())
    root = (root or project_root()).resolve()
    for key, value in OFFLINE.items():
        os.environ.setdefault(key, value)
    os.environ.update(service_env(root))
    return root


def main() -> None:
    """`python -m instructflow.env` (`make env`): print these variables as this process received them."""
    import json

    print(json.dumps({k: os.environ.get(k) for k in (*OFFLINE, *SERVICES, "MLFLOW_TRACKING_URI")}, indent=2,
                     sort_keys=True))


if __name__ == "__main__":
    main()

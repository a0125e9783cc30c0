"""instructflow: InstructGPT-style training as a Prefect + DVC + MLflow pipeline."""

from instructflow import env as _env  # noqa: F401  (sets the offline / no-telemetry environment first)

__version__ = "0.1.0"

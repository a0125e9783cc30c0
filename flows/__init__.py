"""Prefect flows: the pipeline, its deployment and schedule."""

import instructflow  # noqa: F401

"""Prefect flows: the pipeline, its deployment and schedule."""

from instructflow import env

env.setup()

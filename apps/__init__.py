"""Applications on top of the stages: the `instructflow` CLI and sentence similarity / embedding."""

from instructflow import env

env.setup()

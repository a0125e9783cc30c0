"""One module per pipeline stage; each runs as `python -m tasks.<stage>` (the DVC stage command).

The environment (offline, no telemetry, the project's own services) is set here, before any stage module
imports a library that reads it.
"""

from instructflow import env

env.setup()

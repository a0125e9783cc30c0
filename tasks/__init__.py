"""One module per pipeline stage; each runs as `python -m tasks.<stage>` (the DVC stage command).

The environment (offline, no telemetry, the project's own services) is set here, before any stage module
imports a library that reads it.
"""

from instructflow import env

env.setup()

# In a pipeline run, `python -m tasks.<stage>` hands itself to the run's zygote here, before any stage module
# imports torch: a fork of a process that has imported everything runs it (tasks/zygote.py). Elsewhere: nothing.
import os as _os  # noqa: E402
import sys as _sys  # noqa: E402

if _sys.argv[:1] == ["-m"] and _os.environ.get("INSTRUCTFLOW_ZYGOTE"):
    from tasks import zygote as _zygote

    _zygote.delegate()  # exits with the stage's code, or returns: the stage then runs in this process

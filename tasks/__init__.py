"""One module per pipeline stage; each runs as `python -m tasks.<stage>` (the DVC stage command)."""

import instructflow  # noqa: F401  (offline / no-telemetry environment before anything else loads)

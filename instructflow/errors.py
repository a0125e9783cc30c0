"""Errors a user can act on: each names where the problem is and what was expected."""

from __future__ import annotations

from pathlib import Path


class InstructflowError(Exception):
    """Base class: the message is shown to the user as is, without a traceback."""


class ConfigError(InstructflowError):
    """params.yaml (or an override) has an unknown key or a bad value."""


class DataError(InstructflowError):
    """A data file is malformed: names the file, the line (1-based) and the field."""

    def __init__(self, path: str | Path, message: str, line: int | None = None, field: str | None = None):
        self.path, self.line, self.field, self.reason = str(path), line, field, message
        where = self.path + (f", line {line}" if line is not None else "")
        what = f", field '{field}'" if field else ""
        super().__init__(f"{where}{what}: {message}")

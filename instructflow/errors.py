"""Errors a user can act on: each names where the problem is and what was expected."""

from __future__ import annotations

from pathlib import Path


class InstructflowError(Exception):
    """Base class: the message is shown to the user as is, without a traceback."""


class ConfigError(InstructflowError):
    """params.yaml (or an override) has an unknown key or a bad value."""


class DataError(InstructflowError):
    """A data file is malformed: names the file, the line (1-based) and the field."""

    def __init__(self, path: str | Path, message: str, line: int | None = None, field: str | None = None,
                 element: int | None = None):
        self.path, self.line, self.field, self.reason, self.element = str(path), line, field, message, element
        where = self.path + (f", line {line}" if line is not None else "")
        where += f" (array element [{element}])" if element is not None else ""
        what = f", field '{field}'" if field else ""
        super().__init__(f"{where}{what}: {message}")


class NonFiniteError(InstructflowError):
    """Training produced a non-finite loss, metric (a reward) or gradient norm: names the step and its knobs."""

    def __init__(self, step: int, max_steps: int, name: str, value: float, knobs: str, unit: str = "step"):
        self.step, self.name, self.value, self.knobs = step, name, value, knobs
        super().__init__(f"{unit} {step} of {max_steps}: the {name} is {value} (non-finite), so training stopped; "
                         f"it is fed by {knobs}: lower them (or look for extreme values in the data) and run again")

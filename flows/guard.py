"""What holds before DVC touches anything: one run at a time per checkout, and inputs checked first.

- **The run lock.** `instructflow run`, `instructflow stage` and every pipeline flow run take
  `.instructflow-run.lock` in the project root (an advisory `flock`, which the kernel drops when its process
  ends, plus the holder's PID, start time and command inside). A second one in the same checkout is refused
  at once, naming the first, before it writes params.yaml: so one run's `--set` never trains another run's
  stages. A lock left by a process that is gone is taken over. Nested takes in one process (the CLI, then the
  flow it starts) share the lock.
- **Preflight.** Params are validated by instructflow/config.py; `preflight` then reads every file listed in
  `prepare.sources` through the same readers `prepare` uses, and checks that every data file the stages read
  from outside the pipeline exists; first, the MLflow and Prefect servers the environment names must answer and
  take this process's credentials (instructflow/servers.py). A problem stops the command with its message before
  DVC removes any output (DVC removes a stage's outputs before it runs the stage's command).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from instructflow import signals
from instructflow.errors import InstructflowError
from instructflow.stages import BY_NAME, loop_deps

LOCK_NAME = ".instructflow-run.lock"
_HELD: dict[Path, int] = {}  # lock files this process holds, with their nesting depth
_CHECKED: set[tuple] = set()  # what preflight found good in this process (the CLI, then its flow: read once)


class RunLocked(InstructflowError):
    """Another instructflow run holds this checkout."""


def read_holder(path: Path) -> dict:
    """What the lock file says about its holder (empty if unreadable)."""
    try:
        return json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}


def describe(holder: dict) -> str:
    started = holder.get("started_at", "an unknown time")
    command = f" ({holder['command']})" if holder.get("command") else ""
    return f"PID {holder.get('pid', '?')}{command}, started {started}"


@contextmanager
def run_lock(root: Path, command: str | None = None) -> Iterator[dict]:
    """Hold the checkout's run lock for the block; raise RunLocked naming the holder if another process has it."""
    path = Path(root).resolve() / LOCK_NAME
    if path in _HELD:  # this process holds it already (the CLI, then the flow it runs)
        _HELD[path] += 1
        try:
            yield read_holder(path)
        finally:
            _HELD[path] -= 1
        return
    command = command or " ".join(["instructflow", *sys.argv[1:]])
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = {}
            for _ in range(20):  # the holder writes its details just after it takes the lock
                holder = read_holder(path)
                if holder.get("pid"):
                    break
                time.sleep(0.05)
            raise RunLocked(
                f"another instructflow run is using this checkout: {describe(holder)}. One run at a time per "
                f"checkout (its params.yaml and DVC outputs are shared): wait for it to finish, or stop it "
                f"(kill {holder.get('pid', '<pid>')}). Lock: {path}") from None
        try:  # the file may have been removed by the holder that just released it: lock the one at the path
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    stale = read_holder(path)
    if stale.get("pid") and stale.get("pid") != os.getpid():
        gone = "its process is gone" if not signals.alive(stale["pid"]) else "it no longer holds it"
        print(f"instructflow: taking over the run lock left by {describe(stale)}: {gone}", file=sys.stderr)
    holder = {"pid": os.getpid(), "started_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": command,
              "host": socket.gethostname()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
    _HELD[path] = 1
    try:
        yield holder
    finally:
        del _HELD[path]
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        os.close(fd)  # drops the flock


def upstream_closure(name: str) -> list[str]:
    """The stage and every stage it reads from, transitively: what `dvc repro <name>` may run."""
    todo, seen = [name], []
    while todo:
        stage = todo.pop()
        if stage not in seen:
            seen.append(stage)
            todo.extend(BY_NAME[stage].upstream)
    return [s for s in BY_NAME if s in seen]


def _resolve(read: str, params) -> str:
    """A stage-table read with `${section.key}` resolved from params."""
    if read.startswith("${") and read.endswith("}"):
        value = params
        for part in read[2:-1].split("."):
            value = getattr(value, part)
        return str(value)
    return read


def preflight(root: Path, params, stages: Iterable[str]) -> None:
    """Check what the stages will read, before DVC removes any output; raise one error naming every problem.

    Every file in `prepare.sources` is read and validated row by row (as `prepare` will), and every data file
    a stage reads that no stage makes must exist. Stages whose track is off are not checked.
    """
    from instructflow.data import load_source
    from instructflow.servers import check_services
    from tasks.prepare import user_source

    check_services()  # the MLflow and Prefect servers the environment names: up, and taking our credentials
    stages = [s for s in stages if params.chosen(s)]
    key = (str(root), params.digest(), tuple(stages),
           tuple(_stat(root, source.path) for source in params.prepare.sources))
    if key in _CHECKED:
        return
    made = {out for s in BY_NAME.values() for out in (*s.outs, s.metrics)}
    problems: list[str] = []
    for name in stages:
        for read in BY_NAME[name].reads:
            path = _resolve(read, params)
            if path not in made and not (root / path).exists():
                problems.append(f"stage {name} reads {path}: not found")
    for name, deps in loop_deps(root, params).items():
        for path in deps:
            if name in stages and path not in made and not (root / path).exists():
                hint = (f"; write it with `instructflow label {BY_NAME['generate'].output}/samples.jsonl --export "
                        f"{path}`" if name == "rank" and path == params.rank.labels else "")
                problems.append(f"stage {name} reads {path}: not found{hint}")
    if "prepare" in stages:
        for source in params.prepare.sources:
            try:
                load_source(user_source(source, root))
            except InstructflowError as exc:
                problems.append(f"prepare.sources: {exc}")
    if problems:
        raise InstructflowError("nothing was run and no output was touched:\n  " + "\n  ".join(problems))
    _CHECKED.add(key)


def _stat(root: Path, path: str) -> tuple:
    """A source's identity for the preflight memo: its path, size and modification time (a folder's files too)."""
    full = Path(root) / path
    files = sorted(full.rglob("*")) if full.is_dir() else [full]
    return tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file())


@contextmanager
def params_kept(root: Path) -> Iterator[None]:
    """params.yaml and dvc.yaml as they were if the block fails: a run's overrides live with the run."""
    files = [Path(root) / name for name in ("params.yaml", "dvc.yaml")]
    saved = {path: path.read_bytes() for path in files if path.is_file()}
    try:
        yield
    except BaseException:
        from instructflow.io import atomic_file

        for path in files:
            if path in saved and path.read_bytes() != saved[path]:
                with atomic_file(path) as fh:
                    fh.write(saved[path])
        raise

"""SIGTERM and SIGINT: every process of a run stops at a safe point, and every record says how it ended.

- `Interrupted` is what a stop raises: a KeyboardInterrupt, so every clean-up that already runs after Ctrl-C
  (the registry's rollback, the MLflow runs' end) runs after SIGTERM too. Its exit code is 128 + the signal.
- `handling()` installs the handlers (main thread): the first signal is recorded, forwarded to every child
  process group started with `spawn`, and raises `Interrupted` at once, unless the code is inside
  `deferred()`: then the code stops itself at its next safe point (`check()`), e.g. the training loop after
  an optimiser step, once it has saved a checkpoint. A second signal kills the children (SIGKILL).
- `spawn` starts a child in its own process group (a terminal's Ctrl-C and a `kill` of this process alike
  reach it only through us) and `wait` waits for the whole group, so nothing a stage started outlives it.
  A child that has not stopped `GRACE_S` seconds after the signal is killed.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger("instructflow")

GRACE_S = float(os.environ.get("INSTRUCTFLOW_STOP_GRACE_S", "120"))
FAULT_ENV = "INSTRUCTFLOW_FAULT"  # tests: the name of a fault point at which this process kills itself (SIGKILL)

_received: int | None = None
_deferred = 0
_generation = 0  # bumped by reset(): an escalation timer of an earlier stop then does nothing
_children: dict[int, int] = {}  # pid (= process group) -> the signal that asks it to stop
_lock = threading.Lock()


class Interrupted(KeyboardInterrupt):
    """The run was stopped by a signal (SIGTERM, SIGINT); the code stopped at a safe point."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def received() -> int | None:
    """The first stop signal this process received, None if none."""
    return _received


def name(signum: int | None = None) -> str:
    signum = _received if signum is None else signum
    return signal.Signals(signum).name if signum else "nothing"


def check() -> None:
    """A safe point: raise `Interrupted` if a stop signal was received."""
    if _received is not None:
        raise Interrupted(_received)


def fault_point(point: str) -> None:
    """Tests of crash recovery: when INSTRUCTFLOW_FAULT names this point, die here as a SIGKILL would; when it
    is `<point>=wait`, wait here (up to 5 minutes) for a signal to be sent."""
    fault = os.environ.get(FAULT_ENV)
    if fault == point:
        log.warning("fault point %s: killing this process (SIGKILL)", point)
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)
    elif fault == f"{point}=wait":
        log.warning("fault point %s: waiting for a signal", point)
        for _ in range(3000):
            time.sleep(0.1)
            check()


def _signal_children(sig: int | None = None) -> None:
    with _lock:
        targets = dict(_children)
    for pid, stop in targets.items():
        try:
            os.killpg(pid, sig or stop)
        except (ProcessLookupError, PermissionError):
            pass


def reset() -> None:
    """Forget a stop this process has handled and goes on from (tests): a pending escalation is called off."""
    global _received, _generation
    with _lock:
        _received = None
        _generation += 1


def _escalate_after(seconds: float) -> None:
    started = _generation

    def kill_late() -> None:
        time.sleep(seconds)
        with _lock:
            # only the children of the stop that started this timer: after a reset, later children are not its
            late = list(_children) if _received is not None and _generation == started else []
        if late:
            log.warning("children %s still running %.0f s after %s: killing them", late, seconds, name())
            _signal_children(signal.SIGKILL)

    threading.Thread(target=kill_late, name="instructflow-stop-grace", daemon=True).start()


def _handler(signum: int, frame) -> None:
    global _received
    if _received is None:
        _received = signum
        log.warning("received %s: stopping every process at a safe point", name(signum))
        _signal_children()
        _escalate_after(GRACE_S)
    else:
        log.warning("received %s again: killing the children", name(signum))
        _signal_children(signal.SIGKILL)
    if _deferred == 0:
        raise Interrupted(_received)


@contextmanager
def handling() -> Iterator[None]:
    """Handle SIGTERM and SIGINT in this process (main thread only; elsewhere a no-op) while inside."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {sig: signal.signal(sig, _handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


@contextmanager
def deferred() -> Iterator[None]:
    """Inside, a stop signal only records itself: the code stops at its next `check()`."""
    global _deferred
    _deferred += 1
    try:
        yield
    finally:
        _deferred -= 1


def spawn(cmd: list[str], stop_signal: int = signal.SIGINT, **popen) -> subprocess.Popen:
    """Start a child in its own process group; a stop signal reaches it as `stop_signal`.

    SIGINT suits `dvc repro`: DVC ignores it while its stage command runs and reports the stage as failed
    once the command has stopped, leaving dvc.lock alone.
    """
    proc = subprocess.Popen(cmd, start_new_session=True, **popen)
    with _lock:
        _children[proc.pid] = stop_signal
    if _received is not None:  # the signal came while it was starting
        _signal_children()
    return proc


def alive(pid: int, group: bool = False) -> bool:
    """Whether a process (or, with group, a process group) still exists: signal 0 probes without sending."""
    try:
        (os.killpg if group else os.kill)(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def wait(proc: subprocess.Popen) -> int:
    """Wait for the child and for every process of its group (a stage DVC started); its exit code."""
    try:
        code = proc.wait()
        deadline = time.monotonic() + GRACE_S
        while alive(proc.pid, group=True):
            if time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                deadline = time.monotonic() + 10
            time.sleep(0.1)
        return code
    finally:
        with _lock:
            _children.pop(proc.pid, None)


def stop_descendants(sig: int = signal.SIGINT, grace_s: float = GRACE_S, keep_group: int | None = None) -> list[int]:
    """Send `sig` to every descendant of this process (but those of process group `keep_group`), wait up to
    grace_s for them, then SIGKILL the rest; the pids that had to be killed.

    For a process whose children start their own (Prefect's runner and its flow-run processes).
    """
    import psutil

    def kept(proc) -> bool:
        try:
            if keep_group is not None and os.getpgid(proc.pid) == keep_group:
                return True
            # multiprocessing's resource tracker ignores SIGINT/SIGTERM and ends when this process does
            return "multiprocessing.resource_tracker" in " ".join(proc.cmdline())
        except (ProcessLookupError, psutil.NoSuchProcess, psutil.AccessDenied):
            return True

    procs = [p for p in psutil.Process().children(recursive=True) if not kept(p)]
    for proc in procs:
        try:
            proc.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    return [p.pid for p in alive]

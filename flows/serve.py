"""`instructflow serve`: a local Prefect server plus the pipeline served as a scheduled deployment.

The server keeps its database in the project's PREFECT_HOME, so the UI also lists the flow runs made
earlier by `instructflow run`. Stopping serve (Ctrl-C, SIGTERM) stops the runner and every process under
it (flow runs, DVC, stages: each at a safe point), then the server; nothing is left listening.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from instructflow import signals
from instructflow.config import load_params
from instructflow.errors import InstructflowError


def start_server(port: int, log_path: Path) -> subprocess.Popen:
    """`prefect server start` in its own process group, logging to log_path; waits until it answers."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    prefect = Path(sys.executable).parent / "prefect"
    cmd = [str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    log = log_path.open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    health = f"http://127.0.0.1:{port}/api/health"
    deadline = time.time() + 90
    while time.time() < deadline:
        if proc.poll() is not None:
            raise InstructflowError(f"prefect server exited with {proc.returncode}; see {log_path}")
        try:
            with urllib.request.urlopen(health, timeout=2) as resp:  # loopback only
                if resp.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    stop_server(proc)
    raise InstructflowError(f"prefect server did not answer on {health} within 90 s; see {log_path}")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def start_temporary_server() -> None:
    """Prefect's temporary server for this process (when no PREFECT_API_URL is set), in its own session.

    Prefect starts it in the caller's process group, so a terminal's Ctrl-C killed it at once, before the flow
    could record its stages as stopped (and the CLI then hung on its event clients). Started here first, it is
    the one Prefect uses (its per-process instance); Ctrl-C reaches only the CLI, which stops the stages, records
    their states, and stops the server at exit (Prefect's atexit).
    """
    if os.environ.get("PREFECT_API_URL"):
        return
    from functools import partial
    from unittest import mock

    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    if server.running:
        return
    with mock.patch.object(subprocess, "Popen", partial(subprocess.Popen, start_new_session=True)):
        server.start()


def serve_pipeline(root: Path, cron: str | None = None, port: int = 4200) -> None:
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.settings import PREFECT_API_URL, temporary_settings

    params = load_params(root / "params.yaml")
    cron = cron or params.schedule.cron
    server = start_server(port, root / ".prefect" / "server.log")
    print(f"Prefect server: http://127.0.0.1:{port}  (log: {root / '.prefect' / 'server.log'})", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        with temporary_settings({PREFECT_API_URL: f"http://127.0.0.1:{port}/api"}):
            from flows.pipeline import pipeline

            pipeline.serve(
                name=params.schedule.deployment,
                schedules=[CronSchedule(cron=cron, timezone=params.schedule.timezone)],
                parameters={"root": str(root)},
                description="instructflow pipeline on the preset in params.yaml",
                tags=["instructflow", params.preset],
            )
    except BaseException as exc:  # Ctrl-C reaches us bare or wrapped in the runner's task group
        interrupted = isinstance(exc, KeyboardInterrupt) or (
            isinstance(exc, BaseExceptionGroup) and exc.subgroup(KeyboardInterrupt) is not None)
        if not interrupted:
            raise
    finally:
        # the flow runs the runner started, and the DVC and stage processes under them, stop at a safe point
        # (SIGINT: as `instructflow run` stops), while the server is still there to record their states
        killed = signals.stop_descendants(signal.SIGINT, keep_group=server.pid)
        stop_server(server)
        print(f"stopped the runner, its flow runs and the Prefect server{f' (killed {killed})' if killed else ''}",
              flush=True)

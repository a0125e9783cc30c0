"""A team's setup for per-stage routing, for real on one machine: an origin repository, a `cpu` and a `gpu` work pool
(process type: it stands in for the Kubernetes or Docker pool), a worker per pool in its own clone, the pipeline and
the stage flow deployed from prefect.yaml, on the servers of tests/servers.py (Prefect, MLflow, an S3 DVC remote).

    with servers.server_stack() as stack, routing_rig(stack, folder) as rig:
        flow_run = rig.run(["workers.enabled=true"])      # a micro run triggered through the server

Used by tests/test_routing.py and bench/routing.py. Every worker is stopped on the way out, whatever happens
(the stack stops the servers after them: workers first, as Prefect wants).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from conftest import copy_project
from servers import FOREIGN

BIN = Path(sys.executable).parent
GIT = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
# the worker's settings: poll the server every second (default 10 s) and send a heartbeat every 2 s (default 30 s),
# so a dispatched stage starts at once and a dead worker is found within seconds
WORKER_SETTINGS = {"PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_HEARTBEAT_SECONDS": "2"}


@dataclass
class Worker:
    name: str
    pool: str
    clone: Path
    proc: subprocess.Popen
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.is_file() else ""

    def kill(self) -> None:
        """Die as a machine does: the worker and everything under it (its flow run, DVC, the stage), SIGKILL."""
        try:
            tree = psutil.Process(self.proc.pid).children(recursive=True) + [psutil.Process(self.proc.pid)]
        except psutil.NoSuchProcess:
            return
        for proc in tree:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        self.proc.wait()

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM to the worker's process group, then SIGKILL to whatever of its tree is left."""
        if self.proc.poll() is None:
            tree = psutil.Process(self.proc.pid).children(recursive=True)
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
            except ProcessLookupError:
                pass
            for proc in tree:
                try:
                    proc.kill()
                except psutil.NoSuchProcess:
                    pass
            self.kill()


@dataclass
class Rig:
    folder: Path
    origin: Path
    env: dict[str, str]  # a client's environment: the servers, this venv first on PATH
    settings: dict  # the same as Prefect settings, for this process (temporary_settings)
    workers: dict[str, Worker] = field(default_factory=dict)

    def clone(self, name: str) -> Path:
        dest = self.folder / name
        subprocess.run(["git", "clone", "-q", "-b", "main", str(self.origin), str(dest)], check=True)
        return dest

    def start_worker(self, name: str, pool: str, stack) -> Worker:
        """`prefect worker start` in a clone of its own (INSTRUCTFLOW_CLONE), on the stack's DVC remote."""
        clone = self.clone(name)
        stack.dvc_remote(clone)
        env = {**self.env, **WORKER_SETTINGS, "INSTRUCTFLOW_CLONE": str(clone), "PYTHONPATH": str(clone),
               "PREFECT_HOME": str(self.folder / f"{name}-home"), "HF_HOME": str(self.folder / f"{name}-home" / "hf")}
        log = self.folder / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", pool, "--name", name,
                                     "--limit", "1"], cwd=clone, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        worker = self.workers[name] = Worker(name, pool, clone, proc, log)
        return worker

    def wait_online(self, timeout: float = 120) -> None:
        from prefect.client.orchestration import get_client
        from prefect.settings import temporary_settings

        deadline = time.monotonic() + timeout
        with temporary_settings(self.settings), get_client(sync_client=True) as client:
            while True:
                online = {w.name for pool in {w.pool for w in self.workers.values()}
                          for w in client.read_workers_for_work_pool(pool) if w.status.value == "ONLINE"}
                if set(self.workers) <= online:
                    return
                for worker in self.workers.values():
                    assert worker.proc.poll() is None, f"worker {worker.name} exited:\n{worker.text()[-3000:]}"
                assert time.monotonic() < deadline, f"workers not online after {timeout} s: {online}"
                time.sleep(0.5)

    def trigger(self, overrides: list[str], preset: str = "micro"):
        """A run of the `pipeline` deployment through the server (returns at once: the flow run)."""
        from prefect.deployments import run_deployment
        from prefect.settings import temporary_settings

        with temporary_settings(self.settings):
            return run_deployment("instructflow-pipeline/pipeline", parameters={"preset": preset, "overrides": overrides},
                                  timeout=0, as_subflow=False)

    def wait(self, flow_run_id, timeout: float = 800, each=None):
        """The flow run once it is final; `each()` is called every poll (a test's fault, say)."""
        from prefect.client.orchestration import get_client
        from prefect.settings import temporary_settings

        deadline = time.monotonic() + timeout
        with temporary_settings(self.settings), get_client(sync_client=True) as client:
            while True:
                run = client.read_flow_run(flow_run_id)
                if run.state.is_final():
                    return run
                if each is not None:
                    each()
                assert time.monotonic() < deadline, f"flow run {flow_run_id} not final after {timeout} s: {run.state}\n" \
                                                    + "\n".join(w.text()[-3000:] for w in self.workers.values())
                time.sleep(0.5)

    def stop(self) -> None:
        for worker in self.workers.values():
            worker.stop()


def client_env(stack) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in FOREIGN and k not in {"INSTRUCTFLOW_ROOT", "INSTRUCTFLOW_FAULT", "PYTHONPATH", "PREFECT_HOME"}}
    return {**env, **stack.env, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1"}


@contextmanager
def routing_rig(stack, folder: Path, gpu_workers: tuple[str, ...] = ("gpu-1",), gpu_limit: int = 1) -> Iterator[Rig]:
    """The origin (the working tree, micro preset, committed), the pools, the deployments, a cpu worker and the gpu
    workers, each in its own clone; every worker stopped on the way out."""
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    from flows.pools import create_pools

    folder.mkdir(parents=True, exist_ok=True)
    src = copy_project(folder / "src", "micro")
    origin = folder / "origin.git"
    subprocess.run(["git", "init", "-q", "--bare", str(origin)], check=True)
    subprocess.run(GIT + ["push", "-q", str(origin), "HEAD:refs/heads/main"], cwd=src, check=True)
    settings = {PREFECT_API_URL: stack.env["PREFECT_API_URL"], PREFECT_API_AUTH_STRING: stack.env["PREFECT_API_AUTH_STRING"]}
    rig = Rig(folder, origin, client_env(stack), settings)
    try:
        with temporary_settings(settings):
            create_pools("process", gpu_limit)  # the gpu pool as a process pool: the stand-in for Kubernetes
        deploy = subprocess.run([str(BIN / "prefect"), "--no-prompt", "deploy", "--name", "pipeline",
                                 "--name", "gpu"], cwd=src, env={**rig.env, "PREFECT_HOME": str(folder / "deploy-home")},
                                capture_output=True, text=True, timeout=300)
        assert deploy.returncode == 0, f"prefect deploy failed:\n{deploy.stdout[-3000:]}\n{deploy.stderr[-3000:]}"
        rig.start_worker("cpu-1", "cpu", stack)
        for name in gpu_workers:
            rig.start_worker(name, "gpu", stack)
        rig.wait_online()
        yield rig
    finally:
        rig.stop()

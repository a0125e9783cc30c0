"""What per-stage routing costs: the same micro run on the embedded default and through a Prefect server with its
GPU stages on a worker of the `gpu` pool, and the time from a stage being dispatched to a worker starting it.

    .venv/bin/python bench/routing.py                     # about 8 minutes on 2 cores
    .venv/bin/python bench/routing.py --query-seconds 10  # the workers poll at Prefect's default interval

Both runs start from a fresh copy of the working tree (no outputs, no DVC cache) with the same overrides. The
embedded default is `instructflow run` (a temporary Prefect server, sqlite MLflow, every stage in one checkout).
The server path is tests/routing_rig.py on tests/servers.py's stack (PostgreSQL, Prefect, MLflow, S3 on
loopback): a `cpu` and a `gpu` process worker, each in its own clone, the pipeline triggered through the server
with `workers.enabled=true`; its wall time runs from the trigger to the flow run's end (the servers, the pools,
the deployments and the workers are up before, as a team's are). The dispatch time of a stage is the server's
clock from its flow run's creation to its start (the worker's poll plus the flow-run process's start).

It prints figures; it asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from instructflow import env  # noqa: E402

env.setup(ROOT)

import routing_rig  # noqa: E402
from conftest import copy_project, scratch_env  # noqa: E402
from servers import server_stack  # noqa: E402

OVERRIDES = ["sft.max_steps=2", "reward.max_steps=2", "align.max_steps=2"]


def embedded(folder: Path) -> float:
    root = copy_project(folder / "embedded", "micro")
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "apps.cli", "run", *(a for o in OVERRIDES for a in ("--set", o))],
                          cwd=root, env=scratch_env(root), capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode:
        sys.exit(f"embedded run failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return wall


def routed(folder: Path, query_seconds: str) -> tuple[float, dict[str, float], dict[str, float]]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.settings import temporary_settings

    routing_rig.WORKER_SETTINGS["PREFECT_WORKER_QUERY_SECONDS"] = query_seconds
    with server_stack(folder / "servers") as stack, routing_rig.routing_rig(stack, folder / "rig") as rig:
        started = time.perf_counter()
        run = rig.wait(rig.trigger(["workers.enabled=true", "experiment=routing-bench", *OVERRIDES]).id, timeout=1800)
        wall = time.perf_counter() - started
        if not run.state.is_completed():
            sys.exit(f"routed run ended {run.state}:\n" + "\n".join(w.text()[-3000:] for w in rig.workers.values()))
        with temporary_settings(rig.settings), get_client(sync_client=True) as client:
            deployment = client.read_deployment_by_name("instructflow-stage/gpu")
            children = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])))
            dispatch = {c.parameters["stage"]: (c.start_time - c.created).total_seconds() for c in children}
            on_worker = {c.parameters["stage"]: c.total_run_time.total_seconds() for c in children}
    return wall, dispatch, on_worker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--query-seconds", default="1", help="PREFECT_WORKER_QUERY_SECONDS of the workers (Prefect: 10)")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="instructflow-bench-routing-") as tmp:
        folder = Path(tmp)
        base = embedded(folder)
        wall, dispatch, on_worker = routed(folder, args.query_seconds)
    load = " ".join(f"{x:.2f}" for x in (*load_before, *os.getloadavg()))
    print(f"load average before and after (1, 5, 15 min; {os.cpu_count()} cores): {load}")
    print(f"micro run, {' '.join(OVERRIDES)}, fresh copy each:")
    print(f"  embedded default (instructflow run):        {base:6.1f} s")
    print(f"  server path, GPU stages on the gpu worker:  {wall:6.1f} s  ({wall / base:.2f}x)")
    print(f"dispatch -> worker start (workers poll every {args.query_seconds} s):")
    for stage, seconds in dispatch.items():
        print(f"  {stage:10s} {seconds:5.1f} s   (its flow run on the worker: {on_worker[stage]:5.1f} s)")
    print(f"  median     {statistics.median(dispatch.values()):5.1f} s")


if __name__ == "__main__":
    main()

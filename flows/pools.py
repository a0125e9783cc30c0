"""The work pools on a team's Prefect server: `cpu` (process) runs the pipeline flow, `gpu` runs the stages routed to
it (flows/routing.py), at most `gpu_limit` at a time (the pool's concurrency limit: one per GPU you have).

The gpu pool is Kubernetes (infra/gpu-job-template.json) or Docker on a single GPU box
(infra/gpu-docker-job-template.json); their base job templates ask for `nvidia.com/gpu` / the NVIDIA device, shared
memory, a node selector and tolerations, each a job variable with a default. A process pool stands in for it where
there is no GPU (the tests). Then deploy prefect.yaml's deployments and start the workers (README, "Beyond one
machine"):

    instructflow pools --gpu kubernetes --gpu-limit 4
    prefect deploy --all
"""

from __future__ import annotations

import json
from pathlib import Path

from instructflow.errors import InstructflowError

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = {"kubernetes": "infra/gpu-job-template.json", "docker": "infra/gpu-docker-job-template.json"}
GPU_TYPES = ("kubernetes", "docker", "process")


def gpu_job_template(kind: str, root: Path = ROOT) -> dict:
    """The gpu pool's base job template for a worker type (process: Prefect's own default)."""
    if kind == "process":
        from prefect.workers.process import ProcessWorker

        return ProcessWorker.get_default_base_job_template()
    if kind not in TEMPLATES:
        raise InstructflowError(f"gpu pool type {kind!r}: expected one of {', '.join(GPU_TYPES)}")
    return json.loads((root / TEMPLATES[kind]).read_text(encoding="utf-8"))


def create_pools(gpu: str = "kubernetes", gpu_limit: int = 1, cpu_pool: str = "cpu", gpu_pool: str = "gpu") -> list:
    """Create the two pools, or bring existing ones to this template and limit; the pools as the server has them."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL
    from prefect.workers.process import ProcessWorker

    if not PREFECT_API_URL.value():
        raise InstructflowError("set PREFECT_API_URL to the team's Prefect server (http://host:4200/api): pools made "
                                "on a temporary server vanish with it")
    if gpu_limit < 1:
        raise InstructflowError(f"--gpu-limit {gpu_limit}: expected at least 1 (stages at a time on the gpu pool)")
    wanted = [WorkPoolCreate(name=cpu_pool, type="process", base_job_template=ProcessWorker.get_default_base_job_template(),
                             description="instructflow: the pipeline flow and the stages that run anywhere"),
              WorkPoolCreate(name=gpu_pool, type=gpu, base_job_template=gpu_job_template(gpu), concurrency_limit=gpu_limit,
                             description=f"instructflow: the stages routed to GPUs, {gpu_limit} at a time")]
    with get_client(sync_client=True) as client:
        for pool in wanted:
            try:
                existing = client.read_work_pool(pool.name)
            except ObjectNotFound:
                existing = None
            if existing is not None and existing.type != pool.type:
                raise InstructflowError(f"work pool {pool.name!r} exists with type {existing.type}, not {pool.type}; "
                                        f"Prefect cannot change a pool's type: `prefect work-pool delete {pool.name}` first")
            client.create_work_pool(pool, overwrite=True)
        return [client.read_work_pool(pool.name) for pool in wanted]


"""The worker's side of per-stage routing: one stage of a pipeline run, in this worker's own clone of the project.

Deployed to the `gpu` work pool (prefect.yaml: deployment `gpu` of flow `instructflow-stage`); the pipeline flow
dispatches its GPU stages here (flows/routing.py). Its flow runs start in the worker's clone (the deployment's pull
step goes to INSTRUCTFLOW_CLONE), which keeps its DVC cache between stages. For one stage it:

- checks out the parent's commit (fetched from the clone's origin) and writes the parent's params.yaml, dvc.yaml and
  dvc.lock exactly as they were there (a run's `--set` overrides are not in git);
- `dvc pull`s what the stage reads (earlier stages' outputs, `dvc add`ed data) at the versions dvc.lock names;
- runs `dvc repro --single-item <stage>`, the stage's MLflow run nested under the parent's run (on the parent's
  tracking server);
- pushes the stage's outputs and the run-cache, from which the parent restores them (its dvc.lock is the record);
- reports (status, worker, lineage) as a table artifact on its flow run, which the parent reads.

Any failure raises, and the flow run fails with the message and DVC's last lines. The clone holds the run lock
(flows/guard.py) while the stage runs: start the worker with `--limit 1` so that it takes one stage at a time.
"""

from __future__ import annotations

import os
import re
import socket
import time
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from flows.guard import run_lock
from flows.routing import RUN_FILES, RoutingError, git, inputs, pull, push_outputs, remote_url
from flows.stage_task import dvc_repro
from instructflow import signals
from instructflow.io import atomic_file
from instructflow.stages import stage as stage_named
from tasks.runtime import read_lineage


def checkout(clone: Path, commit: str) -> None:
    """The clone at `commit`, fetched from its origin if it lacks it; tracked files as the commit has them."""
    if not (clone / ".git").exists():
        raise RoutingError(f"{clone} is not a git clone of the project: start the worker in one, with "
                           f"INSTRUCTFLOW_CLONE naming it (README, \"Beyond one machine\")")

    def has() -> bool:
        try:
            git(clone, "cat-file", "-e", f"{commit}^{{commit}}")
            return True
        except RoutingError:
            return False

    if not has():
        git(clone, "fetch", "--quiet", "origin")
    if not has():  # not on a branch the fetch brought: ask for the commit itself
        try:
            git(clone, "fetch", "--quiet", "origin", commit)
        except RoutingError:
            pass
    if not has():
        origin = git(clone, "remote", "get-url", "origin").strip()
        raise RoutingError(f"commit {commit[:12]} is not on this worker's origin ({origin}): push it there")
    git(clone, "checkout", "--quiet", "--force", "--detach", commit)


@flow(name="instructflow-stage", log_prints=True)
def run_stage_on_worker(stage: str, commit: str, files: dict[str, str | None], parent_run_id: str | None,
                        tracking_uri: str, dvc_remote: str) -> dict:
    """Run one stage of a pipeline run here and push its outputs; the report the parent reads back."""
    logger = get_run_logger()
    stage_named(stage)  # a known stage, or a clear error
    if not re.fullmatch(r"[0-9a-f]{40}", commit):
        raise RoutingError(f"commit {commit!r}: expected a full 40-character git commit id")
    if set(files) - set(RUN_FILES):
        raise RoutingError(f"files {sorted(set(files) - set(RUN_FILES))}: a worker is sent only {', '.join(RUN_FILES)}")
    clone = Path.cwd().resolve()
    worker, host = os.environ.get("PREFECT__WORKER_NAME") or socket.gethostname(), socket.gethostname()
    started = time.perf_counter()
    # a stop (the parent cancelled, the worker stopped): the stage stops at a safe point, DVC and all it started with it
    with signals.handling(), signals.deferred(), run_lock(clone, f"instructflow stage {stage} (worker {worker})"):
        logger.info("worker %s on %s: stage %s at commit %s in %s", worker, host, stage, commit[:12], clone)
        checkout(clone, commit)
        for name, text in files.items():
            if text is None:
                (clone / name).unlink(missing_ok=True)
            else:
                with atomic_file(clone / name) as fh:
                    fh.write(text.encode("utf-8"))
        here = remote_url(clone)
        if here != dvc_remote:
            raise RoutingError(f"this worker's DVC remote is {here}, the pipeline's is {dvc_remote}: they must be one "
                               f"store (`dvc remote add --local -d ...` in {clone})")
        targets, _ = inputs(clone, stage)
        pull(clone, targets)
        logger.info("pulled %s", ", ".join(targets) or "nothing (every input is in the commit)")
        # the stage's process: this clone, and the parent's tracking server (credentials: this worker's own)
        os.environ.update({"INSTRUCTFLOW_ROOT": str(clone), "MLFLOW_TRACKING_URI": tracking_uri})
        status = dvc_repro(stage, clone, parent_run_id, logger.info)
        push_outputs(clone, [stage])
    seconds = round(time.perf_counter() - started, 1)
    report = {**(read_lineage(clone, stage) if status == "ran" else {}), "stage": stage, "status": status,
              "worker": worker, "host": host, "commit": commit, "seconds": seconds}
    create_table_artifact([report], description=f"stage {stage} {status} on worker {worker} in {seconds} s")
    logger.info("stage %s %s on worker %s in %.1f s; outputs and run-cache pushed to %s", stage, status, worker,
                seconds, dvc_remote)
    return report

"""Per-stage routing: the stages that want a GPU run on a worker of the `gpu` work pool, the rest where the flow runs.

Off by default (`workers.enabled` in params.yaml): then every stage runs here, as on one machine. On, each stage
in `workers.stages` (default: the stage table's `gpu=True` stages whose track is chosen) makes a round trip:

1. here, DVC decides: a stage that is up to date is skipped and nothing is sent;
2. here: `dvc push` of what the stage reads that DVC holds (earlier stages' outputs, `dvc add`ed data) and of the
   run-cache; everything else it reads (code, data/raw) must be in the commit the workers check out;
3. `run_deployment` of the stage flow (flows/worker.py, deployed to the `gpu` pool) with that commit and this
   checkout's params.yaml, dvc.yaml and dvc.lock (the run's overrides live there, not in git);
4. the worker, in its own clone: checks the commit out, writes the three files, `dvc pull`s the stage's inputs,
   `dvc repro --single-item <stage>`, pushes the outputs and the run-cache, and reports on its flow run;
5. here: `dvc repro --pull --single-item <stage>`, which restores the worker's outputs from the run-cache
   instead of running the stage (it is never run here: see `dvc_repro(refuse_to_run=...)`), so this checkout's
   dvc.lock stays the one record; lineage/<stage>.json comes from the worker's report.

Failures: a stage that fails on the worker fails here with the worker's message and log tail. A worker that dies
(its flow run Crashed, or the worker's heartbeats stop while it holds the stage) costs one retry
(`workers.retries`), which another worker of the pool picks up; the dead one's flow run is marked Crashed and
nothing it did reaches dvc.lock. A stage no worker starts within `workers.start_timeout_s` fails naming the pool.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from contextlib import chdir
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from instructflow import signals
from instructflow.errors import InstructflowError
from instructflow.io import write_json_atomic
from instructflow.stages import BY_NAME
from tasks.runtime import lineage_path

RUN_FILES = ("params.yaml", "dvc.yaml", "dvc.lock")
"""written by the run itself (overrides, the rendered graph, DVC's record): sent to the worker as they are here"""
WORKER_LABEL = "prefect.worker.name"  # the label a Prefect worker gives each flow run it submits
HEARTBEATS_MISSED = 3  # a worker silent for this many heartbeat intervals is gone (Prefect marks it offline too)
POLL_S = 1.0  # how often the parent reads the dispatched flow run's state: one small request
REPORT_KEYS = ("status", "worker", "host", "commit", "seconds")
"""what the worker's report adds to the stage's lineage record (the rest of it is lineage/<stage>.json there)"""


class RoutingError(InstructflowError):
    """Routing was asked for but cannot work: what is missing and how to provide it."""


# ------------------------------------------------------------------------------------------- git and DVC
def git(root: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    if done.returncode != 0:
        raise RoutingError(f"`git {' '.join(args)}` in {root} failed: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def committed(root: Path) -> str:
    """The commit the workers check out; raise when tracked files differ from it or no remote branch holds it."""
    commit = git(root, "rev-parse", "HEAD").strip()
    dirty = [line[3:] for line in git(root, "status", "--porcelain", "--untracked-files=no").splitlines()
             if line[3:] not in RUN_FILES and Path(line[3:]).name != ".gitignore"]  # DVC adds its outputs there
    if dirty:
        shown = ", ".join(dirty[:10]) + (f" and {len(dirty) - 10} more" if len(dirty) > 10 else "")
        raise RoutingError(
            f"workers.enabled: {root} has uncommitted changes to {shown}; the workers check out commit "
            f"{commit[:12]} and cannot see them. Commit and push them, or run without workers (workers.enabled: false)")
    if not git(root, "branch", "--remotes", "--contains", commit).strip():
        raise RoutingError(
            f"workers.enabled: commit {commit[:12]} is on no remote branch of {root}; the workers fetch it from "
            f"their origin: `git push` it first")
    return commit


def remote_url(root: Path) -> str:
    """The default DVC remote, as one URL (a local folder resolved), or RoutingError if there is none."""
    from dvc.config import NoRemoteError
    from dvc.repo import Repo

    with chdir(root), Repo(str(root)) as repo:
        try:
            remote = repo.cloud.get_remote()
        except NoRemoteError:
            raise RoutingError(f"{root}: no default DVC remote; the parent and the workers exchange inputs and "
                               "outputs through one (`dvc remote add -d team s3://...`)") from None
        return remote.fs.unstrip_protocol(remote.path)


def inputs(root: Path, stage: str) -> tuple[list[str], list[str]]:
    """What the stage reads (its deps in dvc.yaml): the DVC targets that carry them to a worker (earlier stages'
    outputs, `.dvc` files of `dvc add`ed data), and the rest (code and data the commit must hold)."""
    stages = yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    cached: dict[str, bool] = {}  # every stage output -> whether DVC caches it
    for entry in stages.values():
        for out in entry.get("outs", []) + entry.get("metrics", []):
            path, opts = (out, {}) if isinstance(out, str) else next(iter(out.items()))
            cached[path] = (opts or {}).get("cache", True)
    targets, plain = [], []
    for dep in stages[stage]["deps"]:
        path = dep if isinstance(dep, str) else next(iter(dep))
        if path in cached:
            if not cached[path]:
                raise RoutingError(f"stage {stage} reads {path}, an output DVC does not cache, so it cannot travel to a "
                                   f"worker: leave {stage} out of workers.stages")
            targets.append(path)
        elif (root / f"{path}.dvc").is_file():
            targets.append(f"{path}.dvc")
        else:
            plain.append(path)
    return targets, plain


def check_in_commit(root: Path, stage: str, paths: list[str], commit: str) -> None:
    """Every input that does not travel through DVC is a file or folder of the commit, unchanged; else say which."""
    tracked = git(root, "ls-files", "-z").split("\0")
    changed = [line[3:] for line in git(root, "status", "--porcelain", "--untracked-files=all").splitlines()]
    missing = []
    for path in paths:
        if Path(path).is_absolute():  # outside the project (a base model folder): the worker must hold it too
            continue
        inside = [t for t in tracked if t == path or t.startswith(path.rstrip("/") + "/")]
        if not inside or any(c == path or c.startswith(path.rstrip("/") + "/") for c in changed):
            missing.append(path)
    if missing:
        raise RoutingError(
            f"stage {stage} reads {', '.join(missing)}: neither committed (commit {commit[:12]}, the one the workers "
            f"check out) nor tracked by DVC, so a worker cannot see it. Commit it, `dvc add` and push it, or leave "
            f"{stage} out of workers.stages")


def _dvc_error(action: str, root: Path, exc: Exception) -> InstructflowError:
    from flows.stage_task import StageFailed

    return StageFailed(f"{action} in {root} failed: {type(exc).__name__}: {exc}")


def push(root: Path, targets: list[str], run_cache: bool = True) -> None:
    """`dvc push` of the targets (and of the whole run-cache): what a stage reads, before it is dispatched."""
    from dvc.repo import Repo

    try:
        with chdir(root), Repo(str(root)) as repo:
            if targets:
                repo.push(targets=targets)
            if run_cache:
                repo.stage_cache.push(None)
    except Exception as exc:  # noqa: BLE001 (DVC's errors: a remote down, credentials, a missing cache file)
        raise _dvc_error(f"dvc push {' '.join(targets)}", root, exc) from None


def pull(root: Path, targets: list[str]) -> None:
    """`dvc pull --force` of exactly these targets at the versions dvc.lock names (over stale copies)."""
    from dvc.repo import Repo

    if not targets:
        return
    try:
        with chdir(root), Repo(str(root)) as repo:
            repo.pull(targets=targets, force=True)
    except Exception as exc:  # noqa: BLE001
        raise _dvc_error(f"dvc pull {' '.join(targets)}", root, exc) from None


def push_outputs(root: Path, stages: list[str] | None = None) -> None:
    """Push the stages' outputs (all of dvc.lock without `stages`), the run-cache, and the objects of their
    uncached outputs (metrics/<stage>.json): `dvc push --run-cache` leaves those out, and without them no other
    checkout can restore the stage from the run-cache (DVC then runs it instead)."""
    from dvc.repo import Repo

    try:
        with chdir(root), Repo(str(root)) as repo:
            repo.push(targets=stages, run_cache=True)
            found = [st for name in stages for st in repo.stage.collect(name)] if stages else list(repo.index.stages)
            # StageCache.save put them in the local cache when the stage ran; a stage restored here has them too
            objs = [out.hash_info for st in found for out in st.outs
                    if not out.use_cache and out.hash_info and repo.cache.local.exists(out.hash_info.value)]
            if objs and (failed := repo.cloud.push(objs).failed):
                raise InstructflowError(f"{len(failed)} uncached output objects were not pushed: {sorted(failed)}")
    except InstructflowError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise _dvc_error(f"dvc push --run-cache {' '.join(stages or [])}", root, exc) from None


# ------------------------------------------------------------------------------------------- the parent
@dataclass(frozen=True)
class Routing:
    """A pipeline run's routing: which stages go to which deployment, and what every worker is given."""

    deployment: str
    pool: str
    stages: frozenset[str]
    commit: str
    tracking_uri: str
    dvc_remote: str
    start_timeout_s: float
    retries: int

    def routes(self, stage: str) -> bool:
        return stage in self.stages

    def run(self, stage: str, root: Path, parent_run_id: str | None, logger, timing: dict) -> tuple[str, dict]:
        """One stage on a worker (the module docstring's steps); (status, what the result adds: worker, timings)."""
        from flows.stage_task import DVC_LOCK, StageFailed, dvc_repro, up_to_date

        started = time.perf_counter()
        with DVC_LOCK:
            if up_to_date(root, stage):  # nothing to send: reported as the local path reports it
                timing["seconds"] = time.perf_counter() - started
                return "skipped", {}
        targets, plain = inputs(root, stage)
        check_in_commit(root, stage, plain, self.commit)
        with DVC_LOCK:
            push(root, targets)
        files = {name: (root / name).read_text(encoding="utf-8") if (root / name).is_file() else None
                 for name in RUN_FILES}
        parameters = {"stage": stage, "commit": self.commit, "files": files, "parent_run_id": parent_run_id,
                      "tracking_uri": self.tracking_uri, "dvc_remote": self.dvc_remote}
        report, dispatch_s = None, None
        for attempt in range(self.retries + 1):
            outcome = self._dispatch(stage, parameters, attempt, logger)
            dispatch_s = outcome.get("dispatch_s", dispatch_s)
            if outcome["ok"]:
                report = outcome["report"]
                break
            if outcome["lost"] and attempt < self.retries:
                logger.warning("stage %s: %s; dispatching it again (retry %d of %d)", stage, outcome["message"],
                               attempt + 1, self.retries)
                continue
            tries = f" (after {attempt} retr{'y' if attempt == 1 else 'ies'})" if attempt else ""
            raise StageFailed(f"stage '{stage}' failed on a worker of pool '{self.pool}'{tries}: {outcome['message']}")
        worker = report["worker"]
        refusal = (f"instructflow: stage {stage} ran on worker {worker}, but this checkout cannot restore its outputs "
                   f"from DVC's run-cache (its inputs here differ from the worker's, or the remote lacks the outputs); "
                   f"it is not run here. dvc.lock is unchanged.")
        restore: dict[str, float] = {}
        dvc_repro(stage, root, parent_run_id, logger.info, restore, refuse_to_run=refusal)
        if report["status"] == "ran":  # the record of the run that made the outputs, as a local run writes it
            write_json_atomic(lineage_path(root, stage), {k: v for k, v in report.items() if k not in REPORT_KEYS})
        timing["seconds"] = time.perf_counter() - started
        extra = {"worker": worker, "worker_s": report["seconds"], "restore_s": round(restore["seconds"], 1)}
        if dispatch_s is not None:
            extra["dispatch_s"] = dispatch_s
        return report["status"], extra

    def _dispatch(self, stage: str, parameters: dict, attempt: int, logger) -> dict:
        """One flow run of the stage deployment, watched until it ends, its worker is lost, or nobody starts it."""
        from prefect.client.orchestration import get_client
        from prefect.deployments import run_deployment
        from prefect.states import Cancelled, Cancelling, Crashed

        child = run_deployment(self.deployment, parameters=parameters, timeout=0,
                               flow_run_name=f"{stage}" + (f" (retry {attempt})" if attempt else ""),
                               tags=["instructflow", f"stage:{stage}"])
        logger.info("stage %s: dispatched to %s (flow run %s, pool %s)", stage, self.deployment, child.id, self.pool)
        dispatched, started_after, last_check = time.monotonic(), None, 0.0
        with get_client(sync_client=True) as client:
            while True:
                if signals.received() is not None:  # the run is stopping: so does the stage on the worker
                    client.set_flow_run_state(child.id, Cancelling(message=f"the pipeline run was stopped by "
                                                                             f"{signals.name()}"), force=True)
                    raise signals.Interrupted(signals.received())
                run = client.read_flow_run(child.id)
                state, worker = run.state, run.labels.get(WORKER_LABEL)
                if started_after is None and run.start_time is not None:
                    started_after = round((run.start_time - run.created).total_seconds(), 1)
                    logger.info("stage %s: worker %s started it %.1f s after it was dispatched", stage, worker,
                                started_after)
                if state.is_completed():
                    return {"ok": True, "report": self._report(client, child.id, stage),
                            "dispatch_s": started_after}
                if state.is_final():
                    crashed = state.is_crashed()
                    why = (f"its flow run {child.id} on worker {worker} crashed ({state.message})" if crashed else
                           f"{state.name} on worker {worker}: {state.message}")
                    return {"ok": False, "lost": crashed, "dispatch_s": started_after,
                            "message": f"{why}\nthe worker's last log lines:\n{log_tail(client, child.id)}"}
                now = time.monotonic()
                if worker and now - last_check >= 2:
                    last_check = now
                    if (gone := self._worker_gone(client, worker)) is not None:
                        client.set_flow_run_state(child.id, Crashed(message=gone), force=True)
                        return {"ok": False, "lost": True, "dispatch_s": started_after,
                                "message": f"{gone} while it held the stage (flow run {child.id} marked Crashed)\n"
                                           f"its last log lines:\n{log_tail(client, child.id)}"}
                if worker is None and state.is_scheduled() and now - dispatched > self.start_timeout_s:
                    client.set_flow_run_state(child.id, Cancelled(message="no worker started it"), force=True)
                    return {"ok": False, "lost": False, "message":
                            f"no worker of pool '{self.pool}' started it within {self.start_timeout_s:.0f} s "
                            f"(workers.start_timeout_s): start one in a clone of the project (`prefect worker start "
                            f"--pool {self.pool}`, README \"Beyond one machine\")"}
                time.sleep(POLL_S)

    def _worker_gone(self, client, name: str) -> str | None:
        """Why worker `name` of the pool counts as gone (no heartbeat for HEARTBEATS_MISSED intervals), or None."""
        found = next((w for w in client.read_workers_for_work_pool(self.pool) if w.name == name), None)
        if found is None or found.last_heartbeat_time is None:
            return f"worker {name} is no longer registered in pool '{self.pool}'"
        interval = found.heartbeat_interval_seconds or 30
        silent = (datetime.now(timezone.utc) - found.last_heartbeat_time).total_seconds()
        if silent > HEARTBEATS_MISSED * interval:
            return f"worker {name} stopped: no heartbeat for {silent:.0f} s (it sends one every {interval} s)"
        return None

    @staticmethod
    def _report(client, flow_run_id, stage: str) -> dict:
        """The worker's report: the table artifact its flow run leaves (flows/worker.py)."""
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        from flows.stage_task import StageFailed

        found = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        tables = [a for a in found if a.type == "table"]
        if not tables:
            raise StageFailed(f"stage '{stage}': the worker's flow run {flow_run_id} completed without its report")
        rows = json.loads(tables[-1].data) if isinstance(tables[-1].data, str) else tables[-1].data
        return rows[0]


def log_tail(client, flow_run_id, lines: int = 20) -> str:
    """The last log lines of a flow run, from the Prefect API (a dead worker's own files are out of reach)."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort

    logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=lines,
                            sort=LogSort.TIMESTAMP_DESC)
    return "\n".join(log.message.strip().splitlines()[-1] if log.message.strip() else "" for log in reversed(logs)) \
        or "(none)"


def routed_stages(params) -> list[str]:
    """The stages a routed run sends to the gpu pool: `workers.stages`, or by default the stage table's `gpu=True`
    stages, in either case only those whose track (and switch) is chosen."""
    cfg = params.workers
    named = cfg.stages if cfg.stages is not None else [s.name for s in BY_NAME.values() if s.gpu]
    return [s for s in named if params.chosen(s)]


def plan(root: Path, params) -> Routing | None:
    """The run's routing from params.yaml's `workers` section, checked before any stage runs; None when off."""
    cfg = params.workers
    if not cfg.enabled:
        return None
    stages = routed_stages(params)
    tracking = os.environ.get("MLFLOW_TRACKING_URI", "")
    if urlsplit(tracking).scheme not in ("http", "https"):
        raise RoutingError(
            f"workers.enabled: the stage runs on the workers nest under this run's MLflow run, so MLflow must be a "
            f"tracking server they reach: set MLFLOW_TRACKING_URI=http(s)://... (now {tracking or 'unset'}: a file "
            f"of this machine)")
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise RoutingError("workers.enabled: stages are dispatched through a Prefect server with a gpu work pool: "
                           "set PREFECT_API_URL (README, \"Beyond one machine\")")
    commit = committed(root)
    dvc_remote = remote_url(root)
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            deployment = client.read_deployment_by_name(cfg.deployment)
        except ObjectNotFound:
            raise RoutingError(
                f"workers.deployment {cfg.deployment!r} is not on the Prefect server {PREFECT_API_URL.value()}: "
                f"deploy it from the project root (`prefect deploy --name gpu`, prefect.yaml)") from None
    if not deployment.work_pool_name:
        raise RoutingError(f"deployment {cfg.deployment!r} has no work pool: deploy it to the gpu pool (prefect.yaml)")
    return Routing(cfg.deployment, deployment.work_pool_name, frozenset(stages), commit, tracking, dvc_remote,
                   float(cfg.start_timeout_s), cfg.retries)

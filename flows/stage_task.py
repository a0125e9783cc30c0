"""How the pipeline flow runs one stage: DVC decides, the stage process works, the result is read back.

What a stage task reports comes from DVC's own records, not from its log wording:
- `skipped`: its entry in dvc.lock is the same before and after `dvc repro`;
- `ran`: the entry changed and the stage process of this call wrote its lineage (lineage/<stage>.json
  carries the id of the call, passed in INSTRUCTFLOW_INVOCATION);
- `restored`: the entry changed but no stage process ran: DVC put the outputs back from its run-cache;
- `off`: the stage's track is off in params.yaml (its metrics say so).

DVC takes a lock on the whole workspace, so stage tasks that Prefect may run side by side (the decoder
and encoder tracks) take turns on `dvc repro` here; the graph stays the one the flow states.

SIGTERM or SIGINT to the run (instructflow.signals): `dvc repro` runs in its own process group and gets
the stop as SIGINT, which DVC leaves to its stage process (a safe point, a checkpoint, its MLflow run
KILLED); DVC then fails the stage without touching dvc.lock. The stage's task run ends Crashed, the stages
not started Cancelled, the flow run Crashed, the parent MLflow run KILLED, and the CLI exits 128 + signal.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import chdir, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import yaml
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Cancelled, StateType

from flows.guard import params_kept, preflight, run_lock
from flows.routing import Routing, push_outputs
from flows.routing import plan as plan_routing
from instructflow import env, signals
from instructflow.config import load_params, write_overrides
from instructflow.errors import InstructflowError
from instructflow.stages import sync_dvc_yaml
from tasks.base_model import prepare_base_model
from tasks.runtime import INVOCATION_ENV, read_lineage
from tasks.register import recover as recover_registry
from tasks.tracking import PARENT_ENV, ended_as_killed_on_signal, experiment_id, mark_stale_runs, owner_tags
from tasks.tracking import flatten
from tasks import zygote

# failures worth a retry: lock contention on DVC's repo lock or on the MLflow sqlite file, never a training error
TRANSIENT = ("Unable to acquire lock", "is busy, it is being blocked by", "database is locked",
             "Connection refused", "Connection reset", "timed out")
# lines DVC prints after every successful repro that ask nothing of a user on one machine
QUIET = ("Use `dvc push` to send your updates to remote storage.",)
DVC_LOCK = threading.Lock()


class StageFailed(InstructflowError):
    """A stage's DVC run failed; the message ends with the stage's last log lines."""


class TransientStageFailure(StageFailed):
    """A failure that another attempt may not meet (a lock, a connection)."""


def retry_transient_only(task_obj, task_run, state) -> bool:
    try:
        state.result()
    except TransientStageFailure:
        return True
    except Exception:
        return False
    return False


def lock_entry(root: Path, stage: str) -> dict | None:
    """The stage's entry in dvc.lock (its deps, params and outs with their hashes), None if never run."""
    path = root / "dvc.lock"
    if not path.is_file():
        return None
    return (yaml.safe_load(path.read_text()) or {}).get("stages", {}).get(stage)


def up_to_date(root: Path, stage: str) -> bool:
    """DVC's own verdict, in this process (no second interpreter): nothing the stage depends on has changed."""
    from dvc.lock import LockError
    from dvc.repo import Repo

    try:  # in the project folder: DVC resolves the stage's paths against the cwd, not the repo it is given
        with chdir(root), Repo(str(root)) as repo:
            return not repo.status(targets=[stage])
    except LockError as exc:  # another DVC command holds the repo: raised here, in this process, not in a log
        raise TransientStageFailure(f"stage '{stage}': DVC is busy in this checkout: {exc}") from None


def track_off(root: Path, stage: str) -> bool:
    metrics = root / "metrics" / f"{stage}.json"
    return metrics.is_file() and json.loads(metrics.read_text()).get("track_chosen") == 0


def dvc_repro(stage: str, root: Path, parent_run_id: str | None, emit, timing: dict | None = None,
              refuse_to_run: str | None = None) -> str:
    """Run `dvc repro --single-item <stage>`, stream its output through emit; return ran/skipped/restored/off.

    A stage DVC finds up to date is reported at once, without starting `dvc repro` and the stage's process.
    `timing["seconds"]` gets the time the stage held DVC (waiting for the other track's turn is not counted).
    With `refuse_to_run` (a worker ran the stage: flows/routing.py), DVC may only restore the outputs from its
    run-cache, pulled from the remote (`--pull`); where it would run the stage instead, the stage's command is a
    stand-in that prints this message and fails, so the stage is never run here.
    """
    timing = {} if timing is None else timing
    folder = tempfile.TemporaryDirectory(prefix="instructflow-restore-only-") if refuse_to_run else nullcontext()
    with DVC_LOCK, folder as stand_in:
        started = time.perf_counter()
        if up_to_date(root, stage):
            timing["seconds"] = time.perf_counter() - started
            return "off" if track_off(root, stage) else "skipped"
        invocation = uuid.uuid4().hex
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"  # this venv's python first
        if refuse_to_run:  # the stage command is `python -m tasks.<stage>`: this `python` comes first on its PATH
            script = Path(stand_in) / "python"
            script.write_text(f"#!/bin/sh\nprintf '%s\\n' {shlex.quote(refuse_to_run)} >&2\nexit 3\n")
            script.chmod(0o755)
            path = f"{stand_in}{os.pathsep}{path}"
        env_vars = {**os.environ, INVOCATION_ENV: invocation, "PATH": path}
        if parent_run_id:
            env_vars[PARENT_ENV] = parent_run_id
        before = lock_entry(root, stage)
        signals.check()  # stopping: no stage starts
        cmd = [sys.executable, "-m", "dvc", "repro", "--single-item", *(["--pull"] if refuse_to_run else []), stage]
        proc = signals.spawn(cmd, cwd=root, env=env_vars, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             bufsize=1)
        tail: list[str] = []
        for line in proc.stdout:
            line = line.rstrip()
            if line and line not in QUIET:
                emit(line)
                tail = (tail + [line])[-25:]
        code = signals.wait(proc)  # DVC and every process it started
        after = lock_entry(root, stage)
        timing["seconds"] = time.perf_counter() - started
    if code != 0 and signals.received() is not None:
        raise signals.Interrupted(signals.received())  # a crash of the task run, not a failure of the stage
    if code != 0:
        text = "\n".join(tail)
        error = TransientStageFailure if any(t in text for t in TRANSIENT) else StageFailed
        raise error(f"stage '{stage}' failed (dvc repro exit {code}):\n{text}")
    if track_off(root, stage):
        return "off"
    if before == after:
        return "skipped"
    return "ran" if read_lineage(root, stage).get("invocation") == invocation else "restored"


@task(retries=2, retry_delay_seconds=5, retry_condition_fn=retry_transient_only, cache_policy=NO_CACHE)
def run_stage(stage: str, ctx: "PipelineRun") -> dict:
    """One pipeline stage: its DVC stage, its log streamed into Prefect, its metrics read back."""
    logger = get_run_logger()
    if signals.received() is not None:  # the run is stopping: this stage does not start
        return Cancelled(message=f"not started: the pipeline run was stopped by {signals.name()}")
    timing: dict[str, float] = {}
    extra: dict = {}
    if ctx.routing is not None and ctx.routing.routes(stage):  # on a worker of the gpu pool (flows/routing.py)
        status, extra = ctx.routing.run(stage, ctx.root, ctx.parent_run_id, logger, timing)
    else:
        status = dvc_repro(stage, ctx.root, ctx.parent_run_id, logger.info, timing)
    wall = timing["seconds"]
    path = ctx.root / "metrics" / f"{stage}.json"
    metrics = json.loads(path.read_text()) if path.is_file() else {}
    if status == "ran":
        metrics.update({k: v for k, v in read_lineage(ctx.root, stage).items() if k == "tokens_per_sec"})
    where = f" on worker {extra['worker']}" if "worker" in extra else ""
    logger.info("stage %s %s in %.1fs%s", stage, status, wall, where)
    return {"stage": stage, "status": status, "wall_s": round(wall, 1), "metrics": metrics, **extra}


@dataclass
class PipelineRun:
    """One pipeline run: its project folder, params and MLflow parent run; collects the stages' results."""

    root: Path
    params: object
    parent_run_id: str | None = None
    routing: Routing | None = None
    """the stages that run on workers of the gpu pool (None: every stage runs here)"""
    results: list[dict] = field(default_factory=list)

    def collect(self, futures: list) -> list[dict]:
        """Wait for every stage; record each in the parent run; raise the first failure once all are done."""
        failures = []
        for future in futures:
            future.wait()
            state = future.state
            if state.type != StateType.COMPLETED:
                failures.append((future.task_run_id, state))
                continue
            result = future.result()
            self.results.append(result)
            mlflow.log_metric(f"{result['stage']}.wall_s", result["wall_s"])
            mlflow.set_tag(f"stage.{result['stage']}", result["status"])
            if "worker" in result:  # routed: where it ran, and how long it waited for a worker to start it
                mlflow.set_tag(f"stage.{result['stage']}.worker", result["worker"])
                if result.get("dispatch_s") is not None:
                    mlflow.log_metric(f"{result['stage']}.dispatch_s", result["dispatch_s"])
            report = self.root / "reports" / "evaluation.md"
            if result["stage"] == "evaluate" and result["status"] != "off" and report.is_file():
                create_markdown_artifact(report.read_text(encoding="utf-8"), key="evaluation-report",
                                         description=f"instructflow evaluation ({self.params.preset} preset)")
        mlflow.set_tag("ran", ",".join(r["stage"] for r in self.results if r["status"] == "ran") or "none")
        if signals.received() is not None:
            cancel_unfinished([task_run_id for task_run_id, state in failures if not state.is_final()])
            raise signals.Interrupted(signals.received())
        trained_otherwise = [r["stage"] for r in self.results if r["status"] == "ran" and
                             read_lineage(self.root, r["stage"]).get("params_hash") != self.params.digest()]
        if trained_otherwise:  # params.yaml was edited during the run: the parent run's params would not be true
            mlflow.set_tag("params_mismatch", ",".join(trained_otherwise))
            raise StageFailed(f"stages {', '.join(trained_otherwise)} trained with other params than this run's "
                              f"(params hash {self.params.digest()}): params.yaml changed during the run")
        for _, state in failures:
            if state.type == StateType.FAILED:  # the stage that failed; those after it never started
                state.result()  # raises its StageFailed
        if failures:
            raise StageFailed(f"stages did not complete: {[s.name for _, s in failures]}")
        if self.routing is not None:  # a team's remote holds every output, as other clones and workers expect
            with DVC_LOCK:
                push_outputs(self.root)
        return self.results


def cancel_unfinished(task_run_ids: list) -> None:
    """Stage task runs that never started because the run stopped (Prefect leaves them NotReady): Cancelled."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        for task_run_id in task_run_ids:
            client.set_task_run_state(task_run_id, Cancelled(message=f"the pipeline run was stopped by {signals.name()}"),
                                      force=True)


@contextmanager
def pipeline_run(preset: str | None, overrides: list[str], root: str | None) -> Iterator[PipelineRun]:
    """Validate params with the overrides (nothing runs on bad input), write them, sync dvc.yaml, open MLflow.

    First of all, a registry transaction a killed register left half-done is settled, and MLflow runs left
    RUNNING by killed processes are marked KILLED. A stop signal inside is taken by the stages (see above).
    """
    logger = get_run_logger()
    project = env.setup(Path(root).resolve() if root else None)
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    with run_lock(project), signals.handling(), signals.deferred():  # one run per checkout (flows/guard.py)
        if (recovered := recover_registry(project)) is not None:
            logger.warning(recovered)
        # the stages fork from one process that imports torch, transformers and MLflow while the run starts
        with zygote.serving(project), _pipeline_run(preset, overrides, project, logger) as run:
            yield run


@contextmanager
def _pipeline_run(preset: str | None, overrides: list[str], project: Path, logger) -> Iterator[PipelineRun]:
    params = load_params(project / "params.yaml", overrides, preset)  # fails here, before any stage
    preflight(project, params, params.stages())  # every source and input, before DVC removes any output
    routing = plan_routing(project, params)  # workers.enabled: the server, the commit, the remote, checked now
    prepare_base_model(project, params)  # a base folder checked, a registry alias resolved: DVC sees it move
    experiment = experiment_id(params.experiment, project)  # a store shared with another clone fails here too
    with params_kept(project):
        if write_overrides(project / "params.yaml", overrides, preset):
            logger.info("params.yaml updated: preset=%s %s", params.preset, " ".join(overrides))
        if sync_dvc_yaml(project):
            logger.info("dvc.yaml rendered again from the stage table (prepare.sources changed)")
    logger.info("pipeline: %s (preset %s, tracks: %s)", " -> ".join(params.stages()), params.preset,
                ", ".join(t for t, on in params.tracks if on))
    if routing is not None:
        logger.info("workers: %s run on %s (pool %s) at commit %s", ", ".join(s for s in params.stages()
                    if routing.routes(s)) or "no stage", routing.deployment, routing.pool, routing.commit[:12])
    for run_id in mark_stale_runs(params.experiment):
        logger.warning("MLflow run %s was left RUNNING by a process that is gone: marked KILLED", run_id)
    with mlflow.start_run(experiment_id=experiment, run_name="pipeline",
                          tags={"instructflow.stage": "pipeline", "instructflow.preset": params.preset,
                                "instructflow.params_hash": params.digest(), **owner_tags()}) as parent, \
            ended_as_killed_on_signal():
        mlflow.log_params({"preset": params.preset, "overrides": " ".join(overrides) or "-",
                           "stages": ",".join(params.stages())})
        # every resolved param, under the names the stage runs log theirs (align.beta, ...): what the stages read
        mlflow.log_params({k: str(v)[:500] for k, v in flatten(params.model_dump(mode="json")).items()})
        yield PipelineRun(project, params, parent.info.run_id, routing)

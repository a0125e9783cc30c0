"""Per-stage routing (flows/routing.py, flows/worker.py, flows/pools.py): the GPU stages of a pipeline run go to the
workers of a `gpu` work pool and come back through DVC's run-cache; the rest runs where the flow runs.

Fast: routing is off by default, what it refuses (a local MLflow store, no Prefect server, uncommitted code, an
unpushed commit, an input neither committed nor tracked by DVC), the round trip of a stage between two clones
through a DVC remote (and the restore that would run the stage instead, refused), the job templates against
Prefect's schema. Slow (e2e, servers): a micro run triggered through a Prefect server, its GPU stages on process
workers of the `gpu` pool, one of which dies in the middle of a stage.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

from flows.routing import RoutingError, check_in_commit, committed, inputs, plan, push_outputs, routed_stages
from flows.stage_task import StageFailed, dvc_repro, lock_entry
from instructflow.config import load_params
from instructflow.errors import InstructflowError

GIT = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
GPU_STAGES = ("pretrain", "sft", "reward", "align", "evaluate")  # the decoder track's GPU stages (the stage table)
ROUTED = ("pretrain", "sft")  # what the e2e run routes (workers.stages): each routed stage costs a worker round trip


def sh(cwd: Path, *cmd: str) -> str:
    done = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True)
    assert done.returncode == 0, f"{cmd}: {done.stdout}\n{done.stderr}"
    return done.stdout


# ---- what routing refuses -----------------------------------------------------------------------------------------

def test_routing_is_off_by_default_so_every_stage_runs_where_the_flow_runs():
    params = load_params(ROOT / "params.yaml")
    assert params.workers.enabled is False
    assert plan(ROOT, params) is None  # nothing checked, nothing dispatched: one machine runs as before
    # where a stage runs does not change what it makes: the params hash (lineage, registry tags) ignores routing
    assert load_params(ROOT / "params.yaml", ["workers.enabled=true", "workers.retries=3"]).digest() == params.digest()


def test_routing_refuses_a_tracking_store_the_workers_cannot_reach_and_a_missing_prefect_server(monkeypatch):
    params = load_params(ROOT / "params.yaml", ["workers.enabled=true"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{ROOT}/mlflow.db")
    with pytest.raises(RoutingError, match=r"MLFLOW_TRACKING_URI=http\(s\).*sqlite:///"):
        plan(ROOT, params)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: None}), pytest.raises(RoutingError, match="set PREFECT_API_URL"):
        plan(ROOT, params)


def test_workers_stages_must_be_known_stages_whose_outputs_dvc_caches():
    from instructflow.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown stage 'sftt'"):
        load_params(ROOT / "params.yaml", ["workers.stages=[sftt]"])
    with pytest.raises(ConfigError, match="stage 'register' cannot run on a worker"):
        load_params(ROOT / "params.yaml", ["workers.stages=[sft, register]"])


def test_a_routed_run_sends_the_chosen_tracks_gpu_stages_unless_workers_stages_names_them():
    on = ["workers.enabled=true"]
    assert routed_stages(load_params(ROOT / "params.yaml", on)) == list(GPU_STAGES)
    both = load_params(ROOT / "params.yaml", [*on, "tracks.encoder=true"])
    assert routed_stages(both) == [*GPU_STAGES, "mlm", "classify", "similarity"]
    loop = load_params(ROOT / "params.yaml", [*on, "loop.enabled=true"])  # a switched-on optional stage joins
    assert routed_stages(loop) == [*GPU_STAGES, "generate", "rank"]
    named = load_params(ROOT / "params.yaml", [*on, "workers.stages=[sft, pretrain]"])
    assert routed_stages(named) == ["sft", "pretrain"]
    # a named stage whose track is off stays out
    assert routed_stages(load_params(ROOT / "params.yaml", [*on, "workers.stages=[sft, mlm]"])) == ["sft"]


@pytest.fixture
def pushed_clone(tmp_path) -> Path:
    """A clone of an origin holding one commit (a tracked module, params.yaml, a data folder)."""
    src, origin, clone = tmp_path / "src", tmp_path / "origin.git", tmp_path / "clone"
    (src / "pkg").mkdir(parents=True)
    (src / "pkg" / "mod.py").write_text("X = 1\n")
    (src / "params.yaml").write_text("seed: 1\n")
    (src / "data").mkdir()
    (src / "data" / "raw.txt").write_text("a\n")
    sh(src, "git", "init", "-q")
    sh(src, *GIT, "add", "-A")
    sh(src, *GIT, "commit", "-qm", "one")
    sh(tmp_path, "git", "init", "-q", "--bare", str(origin))
    sh(src, *GIT, "push", "-q", str(origin), "HEAD:refs/heads/main")
    sh(tmp_path, "git", "clone", "-q", "-b", "main", str(origin), str(clone))
    return clone


def test_the_commit_must_hold_the_code_and_be_on_a_remote_but_the_runs_own_files_may_differ(pushed_clone):
    clone = pushed_clone
    head = sh(clone, "git", "rev-parse", "HEAD").strip()
    (clone / "params.yaml").write_text("seed: 2\n")  # a run's --set overrides: sent to the worker, not committed
    (clone / "data" / ".gitignore").write_text("/prepared\n")  # DVC lists the outputs it makes in .gitignore files
    sh(clone, *GIT, "add", "data/.gitignore")
    sh(clone, *GIT, "commit", "-qm", "ignore")
    sh(clone, *GIT, "push", "-q", "origin", "HEAD:main")
    head = sh(clone, "git", "rev-parse", "HEAD").strip()
    (clone / "data" / ".gitignore").write_text("/prepared\n/generated\n")
    assert committed(clone) == head
    (clone / "pkg" / "mod.py").write_text("X = 2\n")
    with pytest.raises(RoutingError, match=r"uncommitted changes to pkg/mod\.py; the workers check out commit"):
        committed(clone)
    sh(clone, *GIT, "commit", "-qam", "local only")
    with pytest.raises(RoutingError, match="is on no remote branch .* `git push` it first"):
        committed(clone)
    sh(clone, *GIT, "push", "-q", "origin", "HEAD:main")
    sh(clone, "git", "fetch", "-q", "origin")
    assert committed(clone) == sh(clone, "git", "rev-parse", "HEAD").strip()


def test_an_input_neither_committed_nor_tracked_by_dvc_is_named(pushed_clone):
    clone = pushed_clone
    head = sh(clone, "git", "rev-parse", "HEAD").strip()
    check_in_commit(clone, "sft", ["pkg/mod.py", "data", "/abs/base-model"], head)  # committed; outside: the worker's
    (clone / "data" / "new.txt").write_text("b\n")
    (clone / "labels.jsonl").write_text("{}\n")
    with pytest.raises(RoutingError, match=r"stage sft reads data, labels\.jsonl: neither committed .* nor tracked"):
        check_in_commit(clone, "sft", ["pkg/mod.py", "data", "labels.jsonl"], head)


def test_a_stage_reads_earlier_outputs_through_dvc_and_its_code_through_git():
    targets, plain = inputs(ROOT, "align")
    assert targets == ["artifacts/sft", "artifacts/reward", "data/prepared"]
    assert "tasks/align.py" in plain and "models/losses.py" in plain and not any(p.startswith("artifacts") for p in plain)


# ---- the round trip through a DVC remote --------------------------------------------------------------------------

STAGE = """\
import json, os, pathlib
pathlib.Path("ran-here").write_text("1")  # a stage that runs leaves this; one restored from the run-cache does not
pathlib.Path("out").mkdir(exist_ok=True)
pathlib.Path("out/model.txt").write_text(pathlib.Path("in.txt").read_text().upper())
pathlib.Path("metrics").mkdir(exist_ok=True)
pathlib.Path("metrics/s.json").write_text(json.dumps({"chars": len(pathlib.Path("in.txt").read_text())}))
pathlib.Path("lineage").mkdir(exist_ok=True)
pathlib.Path("lineage/s.json").write_text(json.dumps({"invocation": os.environ["INSTRUCTFLOW_INVOCATION"]}))
"""
DVC_YAML = """\
stages:
  s:
    cmd: python stage.py
    deps: [stage.py, in.txt]
    outs: [out]
    metrics: [{metrics/s.json: {cache: false}}]
"""


@pytest.fixture
def two_clones(tmp_path) -> tuple[Path, Path]:
    """A worker's clone and the parent's, of one DVC project whose stage has a cached and an uncached output."""
    remote, worker, parent = tmp_path / "remote", tmp_path / "worker", tmp_path / "parent"
    worker.mkdir()
    (worker / "stage.py").write_text(STAGE)
    (worker / "dvc.yaml").write_text(DVC_YAML)
    (worker / "in.txt").write_text("hello\n")
    (worker / ".gitignore").write_text("/ran-here\n/lineage\n/metrics\n")
    sh(worker, "git", "init", "-q")
    sh(worker, sys.executable, "-m", "dvc", "init", "-q")
    sh(worker, sys.executable, "-m", "dvc", "remote", "add", "-q", "-d", "team", str(remote))
    sh(worker, *GIT, "add", "-A")
    sh(worker, *GIT, "commit", "-qm", "project")
    sh(tmp_path, "git", "clone", "-q", str(worker), str(parent))
    return worker, parent


def test_a_stage_run_on_a_worker_is_restored_in_the_parent_through_the_run_cache_and_never_run_there(two_clones):
    from dvc.repo import Repo

    worker, parent = two_clones
    assert dvc_repro("s", worker, None, lambda line: None) == "ran"
    with Repo(str(worker)) as repo:  # what `dvc push --run-cache` sends: not the uncached metrics file
        repo.push(run_cache=True)
    refusal = "instructflow: not to be run here (test)"
    with pytest.raises(StageFailed, match=r"not to be run here \(test\)"):  # DVC would have run it: refused instead
        dvc_repro("s", parent, None, lambda line: None, refuse_to_run=refusal)
    assert not (parent / "ran-here").exists() and lock_entry(parent, "s") is None

    push_outputs(worker, ["s"])  # the outputs, the run-cache and the uncached outputs' objects
    assert dvc_repro("s", parent, None, lambda line: None, refuse_to_run=refusal) == "restored"
    assert not (parent / "ran-here").exists()
    assert (parent / "out" / "model.txt").read_text() == "HELLO\n"
    assert json.loads((parent / "metrics" / "s.json").read_text()) == {"chars": 6}
    assert lock_entry(parent, "s") == lock_entry(worker, "s")  # the parent's dvc.lock records the worker's outputs

    (parent / "in.txt").write_text("other input\n")  # inputs the worker never saw: no run-cache entry for them
    with pytest.raises(StageFailed, match=r"not to be run here \(test\)"):
        dvc_repro("s", parent, None, lambda line: None, refuse_to_run=refusal)
    assert not (parent / "ran-here").exists()
    assert lock_entry(parent, "s") == lock_entry(worker, "s")  # unchanged


# ---- the job templates --------------------------------------------------------------------------------------------

def _defaults(template: dict) -> dict:
    return {k: v["default"] for k, v in template["variables"]["properties"].items() if v.get("default") is not None}


@pytest.mark.parametrize("kind", ["kubernetes", "docker", "process"])
def test_the_gpu_pools_job_templates_validate_against_prefects_schema(kind):
    import jsonschema
    from prefect._internal.schemas.validators import validate_values_conform_to_schema
    from prefect.server.schemas.actions import validate_base_job_template
    from prefect.utilities.templating import apply_values

    from flows.pools import gpu_job_template

    template = gpu_job_template(kind)
    validate_base_job_template(template)  # what the server checks: every placeholder is a declared variable
    jsonschema.Draft202012Validator.check_schema(template["variables"])
    validate_values_conform_to_schema(_defaults(template), template["variables"])
    if kind == "process":  # Prefect's own, for the process pool that stands in for the GPU pool in tests
        return
    with pytest.raises(ValueError, match="gpu_count"):  # a job variable of the wrong type is refused
        validate_values_conform_to_schema({"gpu_count": "two"}, template["variables"])
    rendered = apply_values(template["job_configuration"], {**_defaults(template), "gpu_count": 2})
    assert rendered["env"] == {"INSTRUCTFLOW_CLONE": "/opt/instructflow"}  # where the stage flow works in the image
    if kind == "kubernetes":
        pod = rendered["job_manifest"]["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
        assert container["volumeMounts"] == [{"name": "dshm", "mountPath": "/dev/shm"}]
        assert pod["volumes"] == [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}}]
        assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    else:  # what docker-py makes of the kwargs prefect-docker passes to containers.create, without a daemon
        from docker.models.containers import _create_container_args

        args = _create_container_args({"image": rendered["image"], "version": "1.45",
                                       **rendered["container_create_kwargs"]})
        assert args["host_config"]["ShmSize"] == 16 * 2**30
        assert args["host_config"]["DeviceRequests"] == [
            {"Driver": "nvidia", "Count": 2, "DeviceIDs": [], "Capabilities": [["gpu"]], "Options": {}}]


def test_prefect_yaml_deploys_the_pipeline_to_cpu_and_the_stage_flow_to_gpu_from_each_workers_clone():
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    by_name = {d["name"]: d for d in spec["deployments"]}
    assert by_name["gpu"]["entrypoint"] == "flows/worker.py:run_stage_on_worker"
    assert by_name["gpu"]["work_pool"]["name"] == "gpu"
    assert {d["work_pool"]["name"] for n, d in by_name.items() if n != "gpu"} == {"cpu"}
    assert spec["pull"] == [{"prefect.deployments.steps.set_working_directory": {"directory": "{{ $INSTRUCTFLOW_CLONE }}"}}]
    flow_name = load_params(ROOT / "params.yaml").workers.deployment.split("/")[0]
    from flows.worker import run_stage_on_worker

    assert run_stage_on_worker.name == flow_name


@pytest.mark.servers
def test_instructflow_pools_makes_the_pools_on_the_server_with_the_gpu_template_and_limit(servers, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    from flows.pools import create_pools, gpu_job_template

    settings = {PREFECT_API_URL: servers.prefect_api_url, PREFECT_API_AUTH_STRING: servers.env["PREFECT_API_AUTH_STRING"]}
    with temporary_settings(settings), get_client(sync_client=True) as client:
        if any(pool.name == "gpu" for pool in client.read_work_pools()):  # the session's server: the e2e's process pool
            client.delete_work_pool("gpu")
    env = {**os.environ, **servers.env, "PREFECT_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([str(Path(sys.executable).parent / "instructflow"), "pools", "--gpu", "kubernetes",
                           "--gpu-limit", "4"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "work pool gpu: type kubernetes, concurrency limit 4" in done.stdout
    with temporary_settings(settings):
        with get_client(sync_client=True) as client:  # the server took the template as it is (it validates it too)
            gpu = client.read_work_pool("gpu")
            assert gpu.base_job_template == gpu_job_template("kubernetes") and gpu.concurrency_limit == 4
            assert client.read_work_pool("cpu").type == "process"
        (_, docker) = create_pools("docker", 2, cpu_pool="cpu", gpu_pool="gpu-docker")
        assert docker.type == "docker" and docker.base_job_template == gpu_job_template("docker")
        with pytest.raises(InstructflowError, match="exists with type kubernetes, not process"):
            create_pools("process", 1)  # a pool's type cannot change: said, not ignored
        with get_client(sync_client=True) as client:  # as the e2e test expects to find the session's server
            client.delete_work_pool("gpu")


# ---- a micro run through the server, its GPU stages on workers ----------------------------------------------------

@pytest.mark.e2e
@pytest.mark.servers
def test_a_micro_run_through_the_server_runs_its_gpu_stages_on_gpu_workers_and_survives_one_dying(servers, tmp_path):
    import mlflow
    import psutil
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.settings import temporary_settings
    from routing_rig import routing_rig

    overrides = ["workers.enabled=true", f"workers.stages=[{', '.join(ROUTED)}]", "experiment=routing-e2e",
                 "pretrain.max_steps=150", "pretrain.eval_steps=50",  # long enough to be killed in the middle
                 "sft.max_steps=2", "reward.max_steps=2", "align.max_steps=2"]
    killed: list[str] = []
    with routing_rig(servers, tmp_path / "rig", gpu_workers=("gpu-1", "gpu-2")) as rig:
        gpus = {name: w for name, w in rig.workers.items() if w.pool == "gpu"}
        parent = rig.workers["cpu-1"].clone

        def kill_the_worker_training_pretrain() -> None:
            for name, worker in gpus.items():
                if not killed and "stage pretrain: preset micro" in worker.text():  # its stage process is training
                    worker.kill()
                    killed.append(name)

        started = time.monotonic()
        run = rig.wait(rig.trigger(overrides).id, each=kill_the_worker_training_pretrain)
        wall = time.monotonic() - started
        logs = "\n".join(w.text()[-4000:] for w in rig.workers.values())
        assert run.state.is_completed(), f"{run.state}\n{logs}"
        assert killed, f"no gpu worker was seen training pretrain:\n{logs}"
        (survivor,) = set(gpus) - set(killed)

        with temporary_settings(rig.settings), get_client(sync_client=True) as client:
            assert client.read_work_pool("gpu").concurrency_limit == 1
            only_gpu = DeploymentFilter(id=DeploymentFilterId(any_=[client.read_deployment_by_name(
                "instructflow-stage/gpu").id]))
            children = client.read_flow_runs(deployment_filter=only_gpu)
        by_stage: dict[str, list] = {}
        for child in children:
            by_stage.setdefault(child.parameters["stage"], []).append(child)
        assert set(by_stage) == set(ROUTED)  # the stages workers.stages names went to the gpu pool, nothing else did
        for stage, runs in by_stage.items():
            assert [r.labels["prefect.worker.name"] for r in runs if r.state.is_completed()] == [survivor], stage
        lost = [(r.state.type.value, r.labels["prefect.worker.name"]) for r in by_stage["pretrain"]
                if not r.state.is_completed()]
        assert lost == [("CRASHED", killed[0])]  # marked by the parent once the worker's heartbeats stopped

        lock = yaml.safe_load((parent / "dvc.lock").read_text())["stages"]
        worker_lock = yaml.safe_load((gpus[survivor].clone / "dvc.lock").read_text())["stages"]
        for stage in ROUTED:  # dvc.lock here records what the worker made; lineage names the run that made it
            assert not (gpus[killed[0]].clone / "lineage" / f"{stage}.json").exists()  # the dead one finished nothing
            here = json.loads((parent / "lineage" / f"{stage}.json").read_text())
            there = json.loads((gpus[survivor].clone / "lineage" / f"{stage}.json").read_text())
            assert here["invocation"] == there["invocation"] and here["mlflow_run_id"] == there["mlflow_run_id"]
            assert lock[stage]["outs"] == worker_lock[stage]["outs"]
        for stage in ("prepare", "tokenizer", "reward", "align", "evaluate", "register"):  # ran here, on no worker
            assert (parent / "lineage" / f"{stage}.json").is_file()
            assert not any((w.clone / "lineage" / f"{stage}.json").exists() for w in gpus.values())
        env = {**rig.env, "PYTHONPATH": str(parent)}
        for args in (["status"], ["status", "--cloud"]):  # dvc.lock matches the workspace; the remote holds it all
            done = subprocess.run([sys.executable, "-m", "dvc", *args, "--json"], cwd=parent, env=env,
                                  capture_output=True, text=True)
            assert json.loads(done.stdout or "null") == {}, (args, done.stdout, done.stderr)

        with pytest.MonkeyPatch.context() as mp:
            for key, value in servers.env.items():
                mp.setenv(key, value)
            client = mlflow.MlflowClient(servers.mlflow_url)
            experiment = client.get_experiment_by_name("routing-e2e")
            (pipeline_run,) = client.search_runs([experiment.experiment_id], "tags.`instructflow.stage` = 'pipeline'")
            tags, metrics = pipeline_run.data.tags, pipeline_run.data.metrics
            for stage in ROUTED:
                assert tags[f"stage.{stage}"] == "ran" and tags[f"stage.{stage}.worker"] == survivor
                nested = client.get_run(json.loads((parent / "lineage" / f"{stage}.json").read_text())["mlflow_run_id"])
                assert nested.data.tags["mlflow.parentRunId"] == pipeline_run.info.run_id
            assert not any(f"stage.{s}.worker" in tags for s in ("prepare", "tokenizer", "reward", "register"))

        # a stage that fails on the worker (here: a worker whose DVC remote is not the pipeline's) fails the run with
        # the worker's message, once (no retry), and dvc.lock keeps its record
        sh(gpus[survivor].clone, sys.executable, "-m", "dvc", "remote", "modify", "--local", "team", "url",
           "s3://dvc/elsewhere")
        failed = rig.wait(rig.trigger([*overrides, "sft.max_steps=3"]).id)
        assert failed.state.is_failed(), failed.state
        assert "stage 'sft' failed on a worker of pool 'gpu'" in failed.state.message
        assert "this worker's DVC remote is s3://dvc/elsewhere, the pipeline's is s3://dvc/store" in failed.state.message
        assert yaml.safe_load((parent / "dvc.lock").read_text())["stages"]["sft"] == lock["sft"]
        with temporary_settings(rig.settings), get_client(sync_client=True) as client:
            again = [r for r in client.read_flow_runs(deployment_filter=only_gpu) if r.id not in {c.id for c in children}]
        assert [(r.parameters["stage"], r.state.type.value) for r in again] == [("sft", "FAILED")]

    left = [p.info for p in psutil.process_iter(["pid", "cmdline", "cwd"])
            if str(p.info.get("cwd") or "").startswith(str(tmp_path))]
    assert left == [], f"processes left running in the rig's clones: {left}"  # the workers and all they started
    dispatch = {stage: metrics.get(f"{stage}.dispatch_s") for stage in ROUTED}
    print(f"\nrouted micro run: {wall:.0f} s; dispatch -> worker start (s): {dispatch}; killed {killed[0]}")

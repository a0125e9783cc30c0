"""The shared servers for real, on loopback (tests/servers.py): Prefect and MLflow on PostgreSQL behind their
auth, MLflow's artifacts and the DVC remote on an S3 server; and the errors a user gets when a server is down or
refuses the credentials. The compose file is checked for what can be checked without a container engine."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, copy_project, free_port, scratch_env

from instructflow.errors import InstructflowError
from instructflow.servers import ServerError, check_services

pytestmark = pytest.mark.servers


def _get(url: str, auth: str | None = None) -> int:
    headers = {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()} if auth else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _query(stack, database: str, sql: str, *args) -> list[tuple]:
    import psycopg

    with psycopg.connect(f"{stack.postgres_url}/{database}") as conn:
        return conn.execute(sql, args).fetchall()


def _s3_keys(stack, bucket: str) -> list[str]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=stack.s3_endpoint, aws_access_key_id=stack.env["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=stack.env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


# ---- Prefect ------------------------------------------------------------------------------------------------------

def test_prefect_server_answers_with_its_auth_string_refuses_without_and_keeps_state_in_postgres(servers):
    api, auth = servers.prefect_api_url, servers.env["PREFECT_API_AUTH_STRING"]
    assert _get(f"{api}/admin/version") == 401
    assert _get(f"{api}/admin/version", auth="instructflow:wrong") == 401
    assert _get(f"{api}/admin/version", auth=auth) == 200
    assert _get(f"{api}/health") == 200  # probes stay open, as Prefect designs it

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api, PREFECT_API_AUTH_STRING: auth}):
        with get_client(sync_client=True) as client:
            client.create_work_pool(WorkPoolCreate(name="cpu-test", type="process"))
    assert _query(servers, "prefect", "SELECT type FROM work_pool WHERE name = %s", "cpu-test") == [("process",)]


def test_a_worker_the_harness_starts_polls_its_pool_through_the_auth(servers, tmp_path):
    worker = servers.worker("cpu-harness", cwd=tmp_path)
    assert worker.proc.poll() is None
    assert _query(servers, "prefect", "SELECT p.type FROM worker w JOIN work_pool p ON w.work_pool_id = p.id "
                  "WHERE p.name = %s", "cpu-harness") == [("process",)]


# ---- MLflow -------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def registered(servers, tmp_path_factory):
    """A micro policy registered on the server through the project's own register code (tasks/registry.py)."""
    import mlflow
    import torch
    from helpers_tokenizer import make_test_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    from tasks.registry import log_and_register

    folder = tmp_path_factory.mktemp("policy")
    tokenizer = make_test_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in servers.env.items():
            mp.setenv(key, value)
        mlflow.set_tracking_uri(servers.mlflow_url)
        try:
            experiment = mlflow.create_experiment("servers-registry")
            with mlflow.start_run(experiment_id=experiment) as run:
                version = log_and_register("instructflow-policy", folder, "text-generation",
                                           {"git_commit": "test"}, {"exact_match": 0.5}, run_id=run.info.run_id)
        finally:
            mlflow.set_tracking_uri(None)
    return version, run.info.run_id


def test_registered_model_loads_from_the_server_with_credentials_and_is_refused_without(servers, registered,
                                                                                         monkeypatch, tmp_path):
    import mlflow
    from mlflow.exceptions import MlflowException

    version, run_id = registered
    uri = f"models:/instructflow-policy/{version.version}"
    for key, value in servers.env.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):  # artifacts come through the server (proxied)
        monkeypatch.delenv(key)
    mlflow.set_tracking_uri(servers.mlflow_url)
    try:
        components = mlflow.transformers.load_model(uri, return_type="components")
        assert components["task"] == "text-generation" and components["model"].config.hidden_size == 32

        monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
        monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
        with pytest.raises(MlflowException, match="401|Unauthorized|credentials"):
            mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path / "anonymous"))
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-the-password")
        with pytest.raises(MlflowException, match="401|Unauthorized|credentials"):
            mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path / "wrong"))
    finally:
        mlflow.set_tracking_uri(None)
    # the artifacts sit in the S3 store behind the server; the run and the version in PostgreSQL
    keys = _s3_keys(servers, "mlflow")
    assert any(key.startswith("artifacts/") and key.endswith("model.safetensors") for key in keys)
    # (the stack is the session's: other tests, the routed pipeline run among them, may register versions too)
    assert _query(servers, "mlflow", "SELECT run_id FROM model_versions WHERE name = %s AND version = %s",
                  "instructflow-policy", int(version.version)) == [(run_id,)]
    assert _query(servers, "mlflow", "SELECT artifact_uri FROM runs WHERE run_uuid = %s",
                  run_id)[0][0].startswith("mlflow-artifacts:/")


def test_mlflow_refuses_a_model_version_whose_source_is_outside_its_stores(servers, registered, monkeypatch):
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    for key, value in servers.env.items():
        monkeypatch.setenv(key, value)
    client = MlflowClient(servers.mlflow_url)
    with pytest.raises(MlflowException, match="Invalid model version source"):
        client.create_model_version("instructflow-policy", "file:///etc")


def test_mlflow_answers_only_to_the_hosts_it_was_given(servers):
    port = servers.mlflow_url.rsplit(":", 1)[1]
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=1",
                                     headers={"Host": f"evil.example:{port}"})  # (/health answers any host)
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code in (400, 403)


# ---- a stage against the servers, then the DVC remote ------------------------------------------------------------

@pytest.fixture(scope="module")
def staged(servers, tmp_path_factory):
    """A micro project whose `prepare` stage ran through `instructflow stage` against the servers, committed."""
    root = copy_project(tmp_path_factory.mktemp("staged"))
    servers.dvc_remote(root)
    env = {**scratch_env(root), **servers.env}
    done = subprocess.run([sys.executable, "-m", "apps.cli", "stage", "prepare"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    subprocess.run(git + ["add", "-A"], cwd=root, check=True)
    subprocess.run(git + ["commit", "-qm", "prepare"], cwd=root, check=True)
    return root, env, done


def test_a_stage_run_lands_in_postgres_with_its_artifacts_on_the_server(servers, staged):
    root, env, done = staged
    experiment = yaml.safe_load((root / "params.yaml").read_text())["experiment"]
    rows = _query(servers, "mlflow", "SELECT r.name, r.status, r.artifact_uri FROM runs r JOIN experiments e "
                  "ON r.experiment_id = e.experiment_id WHERE e.name = %s", experiment)
    assert [(name, status) for name, status, _ in rows] == [("prepare", "FINISHED")]
    assert rows[0][2].startswith("mlflow-artifacts:/")
    # no secret in the stage's output, the servers' logs or MLflow's params
    output = done.stdout + done.stderr + "".join(log.read_text(errors="replace")
                                                 for log in (servers.folder / "logs").glob("*.log"))
    params = _query(servers, "mlflow", "SELECT key, value FROM params")
    secrets = [servers.env[name].split(":")[-1] for name in ("MLFLOW_TRACKING_PASSWORD", "PREFECT_API_AUTH_STRING",
                                                             "AWS_SECRET_ACCESS_KEY")]
    secrets.append(servers.postgres_url.split(":")[2].split("@")[0])  # PostgreSQL's password
    for secret in secrets:
        assert secret not in output and all(secret not in value for _, value in params)
    assert not (root / "mlartifacts").exists()  # nothing went to a local artifact folder


def test_dvc_push_sends_every_output_to_the_s3_remote_and_a_fresh_clone_pulls_them(servers, staged, tmp_path):
    root, env, _ = staged
    pushed = subprocess.run([sys.executable, "-m", "dvc", "push", "--run-cache"], cwd=root, env=env,
                            capture_output=True, text=True, timeout=300)
    assert pushed.returncode == 0, pushed.stderr
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]["prepare"]
    cached = _cached_outs(root, "prepare")  # the rest (metrics, cache: false) is in git
    assert cached and set(cached) < {out["path"] for out in lock["outs"]}
    outs = [out["path"] for out in lock["outs"] if out["path"] in cached]
    keys = _s3_keys(servers, "dvc")
    for out in (out for out in lock["outs"] if out["path"] in cached):
        md5 = out["md5"].removesuffix(".dir")
        assert any(key.endswith(f"{md5[:2]}/{md5[2:]}") or key.endswith(f"{md5[:2]}/{md5[2:]}.dir")
                   for key in keys), f"{out['path']} ({out['md5']}) is not on the remote"
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "--cloud", "--json", "prepare"], cwd=root, env=env,
                            capture_output=True, text=True, timeout=120)
    assert json.loads(status.stdout or "{}") == {}, status.stdout

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(root), str(clone)], check=True)
    servers.dvc_remote(clone)
    pulled = subprocess.run([sys.executable, "-m", "dvc", "pull", "prepare"], cwd=clone,
                            env={**env, "INSTRUCTFLOW_ROOT": str(clone)},
                            capture_output=True, text=True, timeout=300)
    assert pulled.returncode == 0, pulled.stderr
    for out in outs:
        files = sorted(p.relative_to(root / out) for p in (root / out).rglob("*") if p.is_file()) \
            if (root / out).is_dir() else [Path()]
        for rel in files:
            assert (clone / out / rel).read_bytes() == (root / out / rel).read_bytes(), f"{out}/{rel}"
    assert "secret" not in (clone / ".dvc" / "config").read_text().lower()
    assert "AWS" not in (root / ".dvc" / "config.local").read_text()  # credentials stay in the environment


def _cached_outs(root: Path, stage: str) -> list[str]:
    """The stage's outputs that DVC caches (and pushes): those not marked `cache: false` in dvc.yaml."""
    spec = yaml.safe_load((root / "dvc.yaml").read_text())["stages"][stage]
    paths = []
    for entry in (*spec.get("outs", []), *spec.get("metrics", []), *spec.get("plots", [])):
        path, options = (entry, {}) if isinstance(entry, str) else next(iter(entry.items()))
        if (options or {}).get("cache", True):
            paths.append(path)
    return paths


# ---- a server down or refusing: the CLI says what to set, before DVC touches anything -----------------------------

def _cli_stage(root: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "apps.cli", "stage", "prepare"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("variable, path", [("MLFLOW_TRACKING_URI", ""), ("PREFECT_API_URL", "/api")])
def test_a_server_that_is_down_stops_the_cli_naming_the_url_and_the_variable(tmp_path, variable, path):
    root = copy_project(tmp_path)
    url = f"http://127.0.0.1:{free_port()}{path}"
    done = _cli_stage(root, {**scratch_env(root), variable: url})
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert f"{url} ({variable}) does not answer" in " ".join(output.split()) and f"set {variable}" in output
    assert "Traceback" not in output
    assert not (root / "dvc.lock").exists() and not (root / "data" / "prepared").exists()  # DVC never ran


def test_wrong_mlflow_credentials_are_refused_by_the_cli_naming_the_server_and_the_variables(servers, tmp_path):
    root = copy_project(tmp_path)
    env = {**scratch_env(root), **servers.env, "MLFLOW_TRACKING_PASSWORD": "wrong-password-123"}
    done = _cli_stage(root, env)
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert servers.mlflow_url in output and "refused the credentials" in output
    assert "MLFLOW_TRACKING_USERNAME" in output and "MLFLOW_TRACKING_PASSWORD" in output
    assert "wrong-password-123" not in output and "Traceback" not in output
    assert not (root / "dvc.lock").exists()


def test_the_prefect_api_refusing_or_down_names_the_url_and_the_variable(servers):
    env = dict(servers.env)
    check_services(env)  # all good
    with pytest.raises(ServerError, match=r"Prefect API at .*refused the credentials.*PREFECT_API_AUTH_STRING"):
        check_services({**env, "PREFECT_API_AUTH_STRING": "instructflow:wrong"})
    with pytest.raises(ServerError, match=r"sent no credentials.*PREFECT_API_AUTH_STRING"):
        check_services({k: v for k, v in env.items() if k != "PREFECT_API_AUTH_STRING"})
    down = f"http://127.0.0.1:{free_port()}/api"
    with pytest.raises(ServerError, match=rf"Prefect API at {re.escape(down)} \(PREFECT_API_URL\) does not answer"):
        check_services({**env, "PREFECT_API_URL": down})
    with pytest.raises(ServerError, match=r"MLflow tracking server .*refused.*sent no credentials"):
        check_services({k: v for k, v in env.items() if not k.startswith("MLFLOW_TRACKING_") or k.endswith("URI")})


def test_the_embedded_default_needs_no_server_and_a_bad_api_url_is_named():
    check_services({"MLFLOW_TRACKING_URI": "sqlite:///mlflow.db"})  # nothing to reach: no error
    with pytest.raises(InstructflowError, match=r"PREFECT_API_URL is 'localhost:4200'.*http\(s\)://host:4200/api"):
        check_services({"PREFECT_API_URL": "localhost:4200"})
    url = f"http://user:s3cret@127.0.0.1:{free_port()}"
    with pytest.raises(ServerError) as down:
        check_services({"MLFLOW_TRACKING_URI": url})
    assert "s3cret" not in str(down.value) and "127.0.0.1" in str(down.value)


# ---- the compose file and the worker images (no container engine needed) ---------------------------------------

COMPOSE = ROOT / "infra" / "compose.yaml"


def test_compose_has_no_default_secrets_and_refuses_to_start_without_them():
    text = COMPOSE.read_text()
    secrets = {"POSTGRES_PASSWORD", "MLFLOW_ADMIN_PASSWORD", "MLFLOW_FLASK_SECRET_KEY", "PREFECT_AUTH_STRING",
               "S3_ACCESS_KEY", "S3_SECRET_KEY"}
    used = set(re.findall(r"\$\{([A-Z0-9_]+)", text))
    assert secrets <= used, secrets - used
    for name in secrets:
        for form in re.findall(rf"\$\{{{name}(:?[-?=+]?)", text):
            assert form == ":?", f"{name} has a default or may be empty: ${{{name}{form}...}}"
    assert "change-me" not in text
    for service, spec in yaml.safe_load(text)["services"].items():  # a secret's value always comes from outside
        for key, value in (spec.get("environment") or {}).items():
            if re.search(r"PASSWORD|SECRET|AUTH_STRING|ACCESS_KEY|CONNECTION_URL|STORE_URI", key):
                assert "${" in str(value) and ":?" in str(value), (service, key, value)


def test_compose_hardens_the_servers():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    mlflow = services["mlflow-server"]
    for flag in ("--app-name basic-auth", "--allowed-hosts", "--artifacts-destination s3://"):
        assert flag in mlflow["command"], flag
    assert mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")
    assert mlflow["environment"]["MLFLOW_CREATE_MODEL_VERSION_SOURCE_VALIDATION_REGEX"].startswith("^")
    assert mlflow["environment"]["MLFLOW_AUTH_ADMIN_PASSWORD"].startswith("${MLFLOW_ADMIN_PASSWORD:?")
    assert "PREFECT_SERVER_API_AUTH_STRING" in services["prefect-server"]["environment"]
    for name, service in services.items():  # published only on loopback, or behind auth
        for port in service.get("ports", []):
            assert str(port).startswith(("${BIND_ADDRESS:-127.0.0.1}:", "127.0.0.1:")), (name, port)
    for worker in ("worker-cpu",):
        assert services[worker]["environment"]["PREFECT_API_AUTH_STRING"].startswith("${PREFECT_AUTH_STRING:?")


@pytest.mark.skipif(shutil.which("docker") is None or subprocess.run(
    ["docker", "compose", "version"], capture_output=True).returncode != 0,
    reason="docker compose is not installed here: the compose file is checked as YAML only")
def test_docker_compose_renders_the_file_with_secrets_and_refuses_without():
    secrets = {name: "x" * 16 for name in ("POSTGRES_PASSWORD", "MLFLOW_ADMIN_PASSWORD", "MLFLOW_FLASK_SECRET_KEY",
                                           "PREFECT_AUTH_STRING", "S3_ACCESS_KEY", "S3_SECRET_KEY")}
    base = {k: v for k, v in os.environ.items() if k not in secrets}
    ok = subprocess.run(["docker", "compose", "-f", str(COMPOSE), "config", "-q"], env={**base, **secrets},
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    refused = subprocess.run(["docker", "compose", "-f", str(COMPOSE), "config", "-q"], env=base, capture_output=True,
                             text=True)
    assert refused.returncode != 0 and "POSTGRES_PASSWORD" in refused.stderr

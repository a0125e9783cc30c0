"""Shared test helpers: a throwaway copy of the project for end-to-end runs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from instructflow import env
from servers import free_port  # noqa: F401 (tests import it from here; tests/servers.py also runs on its own)

ROOT = Path(__file__).resolve().parents[1]
env.setup()  # as every entry point does: offline, no telemetry, before any test imports transformers


def copy_project(dest: Path, preset: str = "micro", tracks: dict | None = None) -> Path:
    """A fresh git + DVC checkout of the project's tracked and new files in dest, on the given preset."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split("\n")
    committed = set(subprocess.run(["git", "ls-tree", "-r", "--name-only", "HEAD"], cwd=ROOT, capture_output=True,
                                   text=True, check=True).stdout.split("\n"))
    # what a pipeline run in this checkout wrote and DVC staged (`make run` before `make test`): dvc.lock and the
    # .gitignore files naming its outputs are the run's record, not the project's, and a test project starts fresh
    made_by_a_run = {name for name in files if name == "dvc.lock" or
                     (Path(name).name == ".gitignore" and name not in committed)}
    for name in filter(None, files):
        if name in made_by_a_run:
            continue
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    params = (dest / "params.yaml").read_text()
    params = params.replace("preset: tiny", f"preset: {preset}", 1)
    for track, on in (tracks or {}).items():
        params = params.replace(f"  {track}: {'false' if on else 'true'}", f"  {track}: {'true' if on else 'false'}", 1)
    (dest / "params.yaml").write_text(params)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run(git + ["add", "-A"], cwd=dest, check=True)
    subprocess.run(git + ["commit", "-qm", "test project"], cwd=dest, check=True)
    return dest


def pytest_configure(config):
    # (here, not in pyproject.toml: editing that file makes `make` reinstall the venv)
    config.addinivalue_line("markers", "faults: signals and kills sent to real pipeline processes, micro preset (slow)")
    config.addinivalue_line("markers", "servers: PostgreSQL, Prefect, MLflow and S3 servers started on loopback (slow)")


class FakeRun:
    """Stands in for tasks.tracking.StageRun when a test calls a stage body without MLflow."""

    run_id = "test-run"

    def __init__(self):
        self.steps: list[tuple[int, dict]] = []

    def log_step(self, step, row):
        self.steps.append((step, row))

    def log_metrics(self, metrics):
        pass

    def log_artifact(self, path, folder=None):
        pass

    def log_json(self, data, name):
        pass


@pytest.fixture(autouse=True)
def _restore_environ():
    """The CLI points this process at a project's services (os.environ); undo that after each test."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@contextmanager
def sqlite_store(folder: Path, experiment: str) -> Iterator[tuple[str, str]]:
    """A throwaway MLflow store: sqlite tracking and registry in `folder`, artifacts under it; this process and
    its children point at it until the block ends. Yields (tracking URI, experiment id)."""
    import mlflow

    uri = f"sqlite:///{folder}/mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        try:
            yield uri, mlflow.create_experiment(experiment, artifact_location=(folder / "artifacts").as_uri())
        finally:
            mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op torch thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`): micro models
    gain nothing from intra-op threads, and on a busy shared CPU spinning threads make every stage ~10x slower
    (measured: sft 10 s with 2 threads under load, 1 s with 1); restored afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def mlm_folder(tmp_path_factory):
    """A micro masked LM saved as the mlm stage saves it: untrained weights (the encoder-track stages only have to
    run on it) and the encoder's framing tokenizer. For tests/test_classify.py and tests/test_similarity_stage.py."""
    import torch
    from helpers_tokenizer import make_test_tokenizer

    from models.encoder import build_encoder, encoder_tokenizer

    folder = tmp_path_factory.mktemp("mlm")
    tok = make_test_tokenizer()
    torch.manual_seed(0)
    build_encoder(len(tok), tok.pad_token_id, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                  max_position_embeddings=128).save_pretrained(folder)
    encoder_tokenizer(tok, 64).save_pretrained(folder)
    return folder


def scratch_env(root: Path) -> dict[str, str]:
    """The copy's own code, MLflow store and Prefect home (not those `make test` exports for the checkout)."""
    env = {k: v for k, v in os.environ.items()
           if k not in {"INSTRUCTFLOW_PARENT_RUN_ID", "PREFECT_API_URL", "MLFLOW_RUN_ID", "INSTRUCTFLOW_FAULT"}}
    env.update({"INSTRUCTFLOW_ROOT": str(root), "PREFECT_HOME": str(root / ".prefect"),
                "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", "HF_HOME": str(root / ".prefect" / "hf"),
                "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1",
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"})
    return env


def cli(root: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "apps.cli", *args], cwd=root, env=scratch_env(root),
                          capture_output=True, text=True, timeout=timeout)


TWICE = """
import json, sys
from prefect.testing.utilities import prefect_test_harness
from flows.pipeline import pipeline
with prefect_test_harness(server_startup_timeout=120):
    runs = [pipeline(root=sys.argv[1]) for _ in range(2)]
print("RESULTS " + json.dumps(runs, default=str))
"""


def needs_trained(item) -> bool:
    return "trained_project" in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(config, items):
    """The tests on the trained project run last, in their order: it trains in the background (a process of its
    own on the other core) while the others run."""
    items.sort(key=needs_trained)  # stable: each group keeps its order


@pytest.fixture(scope="session", autouse=True)
def _trained_in_background(request, tmp_path_factory):
    """Starts the trained project's pipeline runs at the start of the session when a selected test needs it."""
    if not any(map(needs_trained, request.session.items)):
        yield None
        return
    import torch

    root = copy_project(tmp_path_factory.mktemp("trained"), "micro", tracks={"encoder": True})
    log = root.parent / "trained.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-c", TWICE, str(root)], cwd=root, env=scratch_env(root),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core each: the tests here, the pipeline there
    yield root, proc, log
    torch.set_num_threads(threads)
    if proc.poll() is None:
        os.killpg(proc.pid, 9)
        proc.wait()


@pytest.fixture(scope="session")
def trained_project(_trained_in_background) -> tuple[Path, list, list]:
    """A scratch micro project with both tracks on whose pipeline flow has run twice under Prefect's test harness
    (every stage ran once, then all were skipped; one registered version of each model), and the two runs' stage
    results. The slowest thing in the suite, so one serves every module that needs a trained project: compare,
    pipeline_e2e, then rounds. Each leaves it as it found it (`dvc status` clean, params.yaml as it was), or runs
    last on it (rounds). The flow runs in a process of its own, started with the session (the copy's code;
    nothing it sets, such as INSTRUCTFLOW_ROOT or MLflow's tracking URI, leaks into the tests)."""
    root, proc, log = _trained_in_background
    try:
        code = proc.wait(timeout=1500)
    except subprocess.TimeoutExpired:
        code = None
    text = log.read_text()
    results = [line for line in text.splitlines() if line.startswith("RESULTS ")]
    assert code == 0 and results, f"the trained project's pipeline runs: exit {code}\n{text[-8000:]}"
    first, second = json.loads(results[-1].removeprefix("RESULTS "))
    return root, first, second


@pytest.fixture(scope="session")
def micro_pipeline(trained_project) -> Path:
    return trained_project[0]


@pytest.fixture(scope="session")
def servers(tmp_path_factory):
    """The shared servers on loopback, started once for the session (tests/servers.py: PostgreSQL, Prefect and
    MLflow on it, an S3 store): a `servers.Stack` with their URLs and `env`, the variables a client sets. Skips,
    saying what to install, only when PostgreSQL's package is missing (`sh infra/system-packages.sh`)."""
    from servers import Unavailable, server_stack

    try:
        with server_stack(tmp_path_factory.mktemp("servers")) as stack:
            yield stack
    except Unavailable as exc:
        pytest.skip(str(exc))

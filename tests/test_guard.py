"""Faults lose nothing: bad input is refused before DVC touches an output, a stage that fails under plain
`dvc repro` puts its last good outputs back, and one run at a time holds a checkout.

One micro project for the module, where `instructflow stage prepare` ran for real; every case runs the
real commands in it and compares data/prepared, metrics/, dvc.lock and params.yaml before and after.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import copy_project

from flows.guard import LOCK_NAME, RunLocked, params_kept, run_lock

BAD_JSONL = '{"prompt": "hi", "completion": "hello"}\n{"prompt": "x", "completion": \n'


def environ(root: Path) -> dict:
    """A user's shell in the project: this venv first on PATH, the project's own services."""
    env = {k: v for k, v in os.environ.items() if k not in ("INSTRUCTFLOW_ROOT", "MLFLOW_TRACKING_URI", "PREFECT_HOME",
                                                            "HF_HOME")}
    return {**env, "OMP_NUM_THREADS": "1", "COLUMNS": "200", "PYTHONPATH": str(root),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"}


def cli(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "apps.cli", *args, "--root", str(root)], cwd=root, env=environ(root),
                          capture_output=True, text=True, timeout=300)


def dvc(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=environ(root), capture_output=True,
                          text=True, timeout=300)


def snapshot(root: Path) -> dict[str, str]:
    """Every file of the outputs and records a fault must not touch, by content hash."""
    files = {}
    for folder in ("data/prepared", "metrics", "artifacts"):
        for path in sorted((root / folder).rglob("*")):
            if path.is_file():
                files[str(path.relative_to(root))] = hashlib.md5(path.read_bytes()).hexdigest()
    for name in ("dvc.lock", "dvc.yaml", "params.yaml"):
        files[name] = hashlib.md5((root / name).read_bytes()).hexdigest()
    return files


def one_line(text: str) -> str:
    return " ".join(text.split())  # rich wraps long messages


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = copy_project(tmp_path_factory.mktemp("guard"), "micro")
    done = cli(root, "stage", "prepare")
    assert done.returncode == 0, done.stdout + done.stderr
    (root / "data" / "user" / "bad.jsonl").write_text(BAD_JSONL, encoding="utf-8")
    before = snapshot(root)
    assert len([k for k in before if k.startswith("data/prepared/")]) > 5 and "metrics/prepare.json" in before
    return root


@pytest.fixture
def params(project):
    """params.yaml (and dvc.yaml, rendered from it) as the module's project has them, put back after the test."""
    path, rendered = project / "params.yaml", project / "dvc.yaml"
    text, dvc_yaml = path.read_text(), rendered.read_text()
    yield path
    path.write_text(text)
    rendered.write_text(dvc_yaml)


def list_bad_source(path: Path) -> None:
    path.write_text(path.read_text().replace("  sources: []", "  sources: [{path: data/user/bad.jsonl, role: sft}]", 1))


# ---------------------------------------------------------------------------------------------------
# refused before DVC: nothing written, nothing removed


def test_stage_with_a_bad_params_value_is_refused_before_any_output_is_removed(project, params):
    params.write_text(params.read_text().replace("  beta: 0.1 ", "  beta: -1  ", 1))
    before = snapshot(project)

    done = cli(project, "stage", "align")

    assert done.returncode == 2, done.stdout + done.stderr
    assert "align.beta = -1: Input should be greater than 0" in one_line(done.stdout)
    assert snapshot(project) == before


def test_stage_with_a_bad_source_file_is_refused_naming_its_line_before_any_output_is_removed(project, params):
    list_bad_source(params)
    before = snapshot(project)

    done = cli(project, "stage", "prepare")

    assert done.returncode == 2, done.stdout + done.stderr
    message = one_line(done.stdout)
    assert "nothing was run and no output was touched" in message
    assert "bad.jsonl, line 2: malformed JSON" in message
    assert snapshot(project) == before


def test_run_with_an_override_naming_a_bad_source_leaves_params_yaml_as_it_was(project):
    before = snapshot(project)

    done = cli(project, "run", "--set", "prepare.sources=[{path: data/user/bad.jsonl, role: sft}]")

    assert done.returncode == 2, done.stdout + done.stderr
    assert "bad.jsonl, line 2: malformed JSON" in one_line(done.stdout)
    assert snapshot(project) == before  # params.yaml included: the override was never written


def test_params_yaml_and_dvc_yaml_come_back_when_a_run_fails_after_writing_them(project, params):
    from instructflow.config import write_overrides

    before = snapshot(project)
    with pytest.raises(RuntimeError), params_kept(project):
        write_overrides(params, ["align.beta=0.3"])
        (project / "dvc.yaml").write_text("stages: {}\n")
        raise RuntimeError("a check after the write failed")
    assert snapshot(project) == before


# ---------------------------------------------------------------------------------------------------
# plain `dvc repro`: DVC removes the outputs first; the failed stage puts the last good ones back


@pytest.mark.parametrize("fault", ["bad source file", "bad params value"])
def test_a_stage_failing_under_plain_dvc_repro_restores_its_outputs(project, params, fault):
    if fault == "bad source file":
        list_bad_source(params)
        assert cli(project, "dvc-yaml").returncode == 0  # the listed file becomes a dep of prepare
        expected = "bad.jsonl, line 2: malformed JSON"
    else:
        params.write_text(params.read_text().replace("  eval_fraction: 0.1", "  eval_fraction: 0.9", 1))
        expected = "prepare.eval_fraction = 0.9"
    before = snapshot(project)

    done = dvc(project, "repro", "prepare")

    assert done.returncode != 0
    assert expected in done.stdout + done.stderr
    assert "its previous outputs are back" in done.stdout
    assert snapshot(project) == before  # data/prepared, metrics/prepare.json and dvc.lock as they were
    status = dvc(project, "status", "prepare", "--json")
    assert "deleted" not in status.stdout  # DVC finds the outputs in place (only the fault itself changed)


# ---------------------------------------------------------------------------------------------------
# one run at a time per checkout


def test_a_second_run_in_the_checkout_is_refused_naming_the_first(project):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from flows.guard import run_lock; "
                               "lock = run_lock(sys.argv[1], 'instructflow run --preset micro'); lock.__enter__(); "
                               "print('held', flush=True); time.sleep(120)", str(project)],
        cwd=project, env=environ(project), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(project)

        second = cli(project, "run", "--set", "align.beta=0.3")
        single = cli(project, "stage", "prepare")

        for done in (second, single):
            assert done.returncode == 2, done.stdout + done.stderr
            message = one_line(done.stdout)
            assert f"another instructflow run is using this checkout: PID {holder.pid} " \
                   f"(instructflow run --preset micro), started " in message
        assert snapshot(project) == before  # params.yaml never got beta 0.3
    finally:
        holder.send_signal(signal.SIGKILL)  # gone without releasing: the lock file stays, stale
        holder.wait()
    assert (project / LOCK_NAME).is_file()
    with run_lock(project, "test") as held:  # the kernel dropped the dead holder's lock: taken over
        assert held["pid"] == os.getpid()
        with run_lock(project):  # nested in one process (the CLI, then its flow): shared
            pass
        assert (project / LOCK_NAME).is_file()
    assert not (project / LOCK_NAME).exists()


def test_a_lock_held_in_this_process_refuses_another_process(project):
    with run_lock(project, "instructflow stage sft"):
        probe = subprocess.run([sys.executable, "-c", "import sys; from flows.guard import run_lock\n"
                                "try:\n    run_lock(sys.argv[1]).__enter__()\nexcept Exception as e:\n    print(e)",
                                str(project)], cwd=project, env=environ(project), capture_output=True, text=True)
    assert f"PID {os.getpid()} (instructflow stage sft)" in probe.stdout
    assert issubclass(RunLocked, Exception)


# ---------------------------------------------------------------------------------------------------
# DVC's lock, met in this process, is a transient failure the flow retries


def test_dvc_busy_on_the_status_check_is_a_transient_failure(project):
    from flows.stage_task import TransientStageFailure, up_to_date

    sleeper = subprocess.Popen(["sleep", "60"])
    rwlock = project / ".dvc" / "tmp" / "rwlock"
    try:
        rwlock.parent.mkdir(parents=True, exist_ok=True)
        rwlock.write_text(json.dumps({"read": {}, "write": {
            str(project / "data" / "prepared"): {"pid": sleeper.pid, "cmd": "dvc repro prepare"}}}))
        with pytest.raises(TransientStageFailure, match="is busy, it is being blocked by"):
            up_to_date(project, "tokenizer")
    finally:
        sleeper.kill()
        sleeper.wait()
        rwlock.unlink(missing_ok=True)

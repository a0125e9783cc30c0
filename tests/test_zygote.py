"""The stage zygote (tasks/zygote.py): a stage command forked from one warm process behaves as the command itself.

A probe module in a project copy stands in for a stage: it reports where it runs (its pid, folder, arguments,
environment, stdin, whether torch was imported before it started) and exits, fails or waits as told."""

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
from conftest import copy_project, scratch_env

from tasks import zygote

PROBE = '''
import json, os, sys, time


def main():
    mode = os.environ.get("PROBE_MODE")
    try:
        print(json.dumps({"pid": os.getpid(), "cwd": os.getcwd(), "argv": sys.argv, "probe": os.environ.get("PROBE"),
                          "stdin": sys.stdin.readline().strip(), "warm": "torch" in sys.modules}), flush=True)
        if mode == "wait":
            time.sleep(120)
    except KeyboardInterrupt:
        print("stopped by SIGINT", flush=True)
        sys.exit(130)
    if mode == "exit":
        sys.exit(int(os.environ["PROBE_CODE"]))
    if mode == "raise":
        raise RuntimeError("the probe failed on purpose")


if __name__ == "__main__":
    main()
'''


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = copy_project(tmp_path_factory.mktemp("zygote"))
    (root / "tasks" / "probe.py").write_text(PROBE)
    return root


@pytest.fixture(scope="module")
def warm(project):
    """A zygote that has imported torch and the probe, serving the project copy's commands."""
    saved = dict(os.environ)
    os.environ.update(scratch_env(project))
    os.environ.pop(zygote.ENV, None)
    try:
        with zygote.serving(project, ["torch", "tasks.probe"]) as path:
            assert path is not None
            first = probe(project, path)  # waits until the zygote has imported everything
            assert first.returncode == 0, first.stderr
            yield path
    finally:
        os.environ.clear()
        os.environ.update(saved)


def probe_env(project: Path, path: str | None, **extra) -> dict:
    env = {k: v for k, v in scratch_env(project).items() if k != zygote.ENV}
    return {**env, **({zygote.ENV: path} if path else {}), "PROBE": "seen", **extra}


def probe(project: Path, path: str | None, stdin: str = "hello\n", **extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tasks.probe"], cwd=project, env=probe_env(project, path, **extra),
                          input=stdin, capture_output=True, text=True, timeout=120)


def report(proc) -> dict:
    return json.loads(proc.stdout.splitlines()[0])


def gone(pid: int, within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_a_stage_command_runs_warm_with_its_own_folder_arguments_environment_and_stdin(project, warm):
    cold, hot = probe(project, None), probe(project, warm)
    assert cold.returncode == hot.returncode == 0, hot.stderr
    assert hot.stderr == ""  # nothing said when it was handed over
    cold_report, hot_report = report(cold), report(hot)
    assert not cold_report["warm"] and hot_report["warm"]  # forked from the process that imported torch
    for key in ("cwd", "argv", "probe", "stdin"):
        assert hot_report[key] == cold_report[key], key
    assert hot_report["argv"] == [str(project / "tasks" / "probe.py")]
    assert hot_report["stdin"] == "hello" and hot_report["probe"] == "seen"


def test_exit_codes_and_tracebacks_come_back_as_they_would_from_the_command(project, warm):
    code = probe(project, warm, PROBE_MODE="exit", PROBE_CODE="3")
    assert code.returncode == 3 and report(code)["warm"]
    failed = probe(project, warm, PROBE_MODE="raise")
    assert failed.returncode == 1
    assert "RuntimeError: the probe failed on purpose" in failed.stderr
    assert report(failed)["warm"]


def waiting_probe(project: Path, path: str) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-m", "tasks.probe"], cwd=project,
                            env=probe_env(project, path, PROBE_MODE="wait"), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = json.loads(proc.stdout.readline())
    assert first["warm"] and first["pid"] != proc.pid
    return proc, first["pid"]


def test_a_stop_signal_reaches_the_stage_and_its_exit_code_comes_back(project, warm):
    proc, stage_pid = waiting_probe(project, warm)
    proc.send_signal(signal.SIGINT)  # what DVC's process group gets when the flow stops
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "stopped by SIGINT" in out, err
    assert gone(stage_pid)


def test_a_killed_command_takes_its_stage_with_it(project, warm):
    proc, stage_pid = waiting_probe(project, warm)
    proc.kill()  # SIGKILL cannot be passed on: the zygote sees the command's end of the socket close
    proc.wait(10)
    assert gone(stage_pid)


def test_an_edited_project_file_makes_the_command_start_fresh(project, warm, tmp_path):
    probe_file = project / "tasks" / "probe.py"
    text = probe_file.read_text()
    try:
        probe_file.write_text(text + "\n# edited\n")  # the zygote holds the old code
        fresh = probe(project, warm)
        assert fresh.returncode == 0
        assert "tasks.probe starts in a fresh process: tasks/probe.py changed since the zygote imported it" in fresh.stderr
        assert not report(fresh)["warm"]
    finally:
        probe_file.write_text(text)


def test_other_import_time_variables_make_the_command_start_fresh(project, warm):
    fresh = probe(project, warm, OMP_NUM_THREADS="2")  # torch sized its thread pool for the zygote's value
    assert fresh.returncode == 0 and not report(fresh)["warm"]
    assert "variables read at import differ from the zygote's: OMP_NUM_THREADS" in fresh.stderr


def test_a_module_the_zygote_did_not_import_starts_by_itself_silently(project, warm):
    proc = subprocess.run([sys.executable, "-m", "tasks.prepare", "--help"], cwd=project,
                          env=probe_env(project, warm), capture_output=True, text=True, timeout=120)
    assert "fresh process" not in proc.stderr


def test_without_a_zygote_the_command_says_so_and_runs_itself(project, tmp_path):
    missing = str(tmp_path / "no-such-socket")
    (tmp_path / "modules").write_text("tasks.probe\n")
    proc = probe(project, missing)
    assert proc.returncode == 0 and not report(proc)["warm"]
    assert "did not answer" in proc.stderr and missing in proc.stderr


def test_serving_cleans_up_and_can_be_turned_off(project, monkeypatch):
    monkeypatch.setenv(zygote.ENV, "0")
    with zygote.serving(project, ["tasks.probe"]) as path:
        assert path is None and os.environ[zygote.ENV] == "0"
    monkeypatch.delenv(zygote.ENV)
    with zygote.serving(project, ["tasks.probe"]) as path:
        assert os.environ[zygote.ENV] == path and Path(path).exists()
    assert zygote.ENV not in os.environ and not Path(path).parent.exists()


def test_a_block_inside_one_for_the_same_project_and_modules_reuses_its_zygote(project, monkeypatch):
    """compare's values and rounds' rounds are pipeline runs inside one serving block: one zygote for all."""
    monkeypatch.delenv(zygote.ENV, raising=False)
    with zygote.serving(project, ["tasks.probe"]) as outer:
        with zygote.serving(project, ["tasks.probe"]) as inner:
            assert inner == outer
        assert os.environ[zygote.ENV] == outer and Path(outer).exists()  # the inner block did not stop it
        with zygote.serving(project, ["tasks.probe", "tasks.keep"]) as other:  # other modules: its own zygote
            assert other != outer and os.environ[zygote.ENV] == other
        assert os.environ[zygote.ENV] == outer and Path(outer).exists() and not Path(other).parent.exists()
        assert probe(project, outer).returncode == 0
    assert zygote.ENV not in os.environ and not Path(outer).parent.exists()


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            h.update(str(f.relative_to(folder)).encode() + f.read_bytes())
    return h.hexdigest()


def test_a_stage_forked_warm_writes_the_same_bytes_as_a_fresh_one(tmp_path):
    """micro tokenizer and pretrain, once as fresh processes and once forked from the zygote: the same model."""
    root = copy_project(tmp_path)
    env = scratch_env(root)
    run = lambda stage, **extra: subprocess.run([sys.executable, "-m", f"tasks.{stage}"], cwd=root,  # noqa: E731
                                                env={**env, **extra}, capture_output=True, text=True, timeout=300)
    assert run("prepare").returncode == 0
    fresh = {}
    for stage in ("tokenizer", "pretrain"):
        assert (proc := run(stage)).returncode == 0, proc.stderr
        fresh[stage] = digest(root / "artifacts" / stage)
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        with zygote.serving(root, ["tasks.tokenizer", "tasks.pretrain"]) as path:
            for stage in ("tokenizer", "pretrain"):
                proc = run(stage, **{zygote.ENV: path})
                assert proc.returncode == 0 and "fresh process" not in proc.stderr, proc.stderr
                assert digest(root / "artifacts" / stage) == fresh[stage], stage
    finally:
        os.environ.clear()
        os.environ.update(saved)

"""Stage processes and the CLI on bad input: a clear message, exit code 2, nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import copy_project
from typer.testing import CliRunner

from apps.cli import app
from instructflow.stages import sync_dvc_yaml


def run_stage(root, stage):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", "INSTRUCTFLOW_ROOT": str(root)}
    return subprocess.run([sys.executable, "-m", f"tasks.{stage}"], cwd=root, env=env, capture_output=True, text=True)


def test_prepare_fails_on_a_bad_user_row_and_keeps_the_previous_output(tmp_path):
    root = copy_project(tmp_path, "micro")
    assert run_stage(root, "prepare").returncode == 0
    before = {p.name: p.read_bytes() for p in (root / "data" / "prepared").iterdir()}

    # given a user SFT file whose second line has an empty response
    (root / "data" / "user" / "chats.jsonl").write_text(
        '{"prompt": "Say hi", "completion": "hi"}\n{"prompt": "Say bye", "completion": "  "}\n', encoding="utf-8")
    params = (root / "params.yaml").read_text().replace(
        "  sources: []", "  sources:\n    - {path: data/user/chats.jsonl, role: sft}")
    (root / "params.yaml").write_text(params)
    sync_dvc_yaml(root)  # what `instructflow run` / `instructflow stage` do before DVC runs

    result = run_stage(root, "prepare")

    assert result.returncode == 2
    message = result.stdout + result.stderr
    assert "chats.jsonl, line 2, field 'completion'" in message
    after = {p.name: p.read_bytes() for p in (root / "data" / "prepared").iterdir()}
    assert after == before  # nothing partial: the old output stands, byte for byte
    assert not [p for p in (root / "data").iterdir() if p.name.startswith(".")]  # no temp folder left behind


def test_a_stage_whose_track_is_off_records_it_and_trains_nothing(tmp_path):
    root = copy_project(tmp_path, "micro")  # tracks: decoder on, encoder off
    result = run_stage(root, "mlm")
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads((root / "metrics" / "mlm.json").read_text()) == {"track_chosen": 0}
    assert sorted(p.name for p in (root / "artifacts" / "mlm").iterdir()) == ["history.csv", "track_off.json"]
    assert (root / "artifacts" / "mlm" / "history.csv").read_text() == "step,loss,eval_loss\n"  # for `dvc plots`


def test_run_rejects_a_bad_override_before_any_work(tmp_path):
    root = copy_project(tmp_path, "micro")
    params = (root / "params.yaml").read_text()

    result = CliRunner().invoke(app, ["run", "--root", str(root), "--set", "align.betaa=0.2"])

    assert result.exit_code == 2
    assert "unknown key 'align.betaa'" in result.output and "beta" in result.output
    assert (root / "params.yaml").read_text() == params
    assert not (root / "data" / "prepared").exists() and not (root / ".prefect").exists()


def test_run_rejects_a_bad_value_naming_what_is_allowed(tmp_path):
    root = copy_project(tmp_path, "micro")
    result = CliRunner().invoke(app, ["run", "--root", str(root), "--set", "align.loss_type=hinge"])
    assert result.exit_code == 2
    assert "align.loss_type = 'hinge'" in result.output and "'sigmoid' or 'ipo'" in result.output


def test_lineage_commit_is_dirty_only_when_code_changed(tmp_path):
    from tasks.register import git_commit

    root = copy_project(tmp_path, "micro")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    (root / "dvc.lock").write_text("schema: '2.0'\n")  # written by every run: not a code change
    (root / "params.yaml").write_text((root / "params.yaml").read_text() + "\n")  # covered by params_hash
    assert git_commit(root) == head
    (root / "tasks" / "sft.py").write_text((root / "tasks" / "sft.py").read_text() + "\n# edited\n")
    assert git_commit(root) == head + "-dirty"


def test_prepare_refuses_a_listed_source_that_dvc_does_not_track(tmp_path):
    root = copy_project(tmp_path, "micro")
    (root / "data" / "user" / "chats.jsonl").write_text('{"prompt": "Say hi", "completion": "hi"}\n')
    params = (root / "params.yaml").read_text().replace(
        "  sources: []", "  sources:\n    - {path: data/user/chats.jsonl, role: sft}")
    (root / "params.yaml").write_text(params)  # edited by hand, dvc.yaml not rendered again

    result = run_stage(root, "prepare")

    assert result.returncode == 2
    assert "prepare.sources or prepare.tasks names ['data/user/chats.jsonl']" in result.stdout and "instructflow dvc-yaml" in result.stdout
    assert not (root / "data" / "prepared").exists()
    assert sync_dvc_yaml(root) and "data/user/chats.jsonl" in (root / "dvc.yaml").read_text()


def test_a_finished_stage_exits_after_its_atexit_handlers_and_flushes_without_the_teardown():
    """tasks.runtime.exit_without_teardown: atexit handlers run (MLflow's end of run, logging's flush), buffered
    output is written, the exit code is kept; finalizers of the interpreter's teardown (the slow part) do not run."""
    from conftest import ROOT

    script = (
        "import atexit, sys\n"
        "from tasks.runtime import exit_without_teardown\n"
        "class Late:\n"
        "    def __del__(self): print('teardown ran', flush=True)\n"
        "late = Late()\n"  # a module global: finalised only by the interpreter's teardown
        "atexit.register(lambda: print('atexit ran'))\n"
        "sys.stdout.write('buffered, no newline')\n"
        "sys.stderr.write('stderr too')\n"
        "exit_without_teardown(3)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 3
    assert done.stdout == "buffered, no newlineatexit ran\n"
    assert done.stderr == "stderr too"
    plain = subprocess.run([sys.executable, "-c", script.replace("exit_without_teardown(3)", "sys.exit(3)")],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "teardown ran" in plain.stdout  # the check above can fail: a normal exit does run the finalizer

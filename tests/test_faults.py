"""Faults in real processes: signals to the run and to a stage, a stage killed outright, a register killed
between its two models. After each: the states in MLflow (and Prefect), dvc.lock, no process left behind,
and what the next run does about it.

The project is a scratch copy on the micro preset (decoder track) whose pretraining is made long enough to
be caught in the middle (60 steps, a checkpoint every 10, a log line every step).
"""

from __future__ import annotations

import csv
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import ROOT, copy_project

pytestmark = pytest.mark.faults

STEPS = 60


def scratch_env(root: Path) -> dict[str, str]:
    """The copy's own code, MLflow store and Prefect home; this venv's tools first on PATH."""
    env = {k: v for k, v in os.environ.items()
           if k not in {"INSTRUCTFLOW_PARENT_RUN_ID", "PREFECT_API_URL", "MLFLOW_RUN_ID", "INSTRUCTFLOW_FAULT"}}
    env.update({"INSTRUCTFLOW_ROOT": str(root), "PREFECT_HOME": str(root / ".prefect"),
                "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", "HF_HOME": str(root / ".prefect" / "hf"),
                "PYTHONPATH": str(root), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",
                "OMP_NUM_THREADS": "1", "COLUMNS": "200"})
    return env


class Cli:
    """`instructflow ARGS` in the scratch project, its output collected in a file as it runs."""

    def __init__(self, root: Path, *args: str, env: dict | None = None):
        self.log = root.parent / f"cli-{time.monotonic_ns()}.log"
        self.out = self.log.open("w")
        self.proc = subprocess.Popen([str(Path(sys.executable).parent / "instructflow"), *args], cwd=root,
                                     env=env or scratch_env(root), stdout=self.out, stderr=subprocess.STDOUT)

    def text(self) -> str:
        return self.log.read_text()

    def wait_for(self, needle: str, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.text():
            assert self.proc.poll() is None, f"exited {self.proc.returncode} before {needle!r}:\n{self.text()[-3000:]}"
            assert time.monotonic() < deadline, f"no {needle!r} in {timeout} s:\n{self.text()[-3000:]}"
            time.sleep(0.2)

    def descendants(self) -> list[psutil.Process]:
        return psutil.Process(self.proc.pid).children(recursive=True)

    def commands(self) -> dict[psutil.Process, str]:
        """The processes under the CLI now, with their command lines."""
        found = {}
        for proc in self.descendants():
            try:
                found[proc] = " ".join(proc.cmdline())
            except psutil.NoSuchProcess:
                pass
        return found

    def finish(self, timeout: float = 240) -> int:
        code = self.proc.wait(timeout)
        self.out.close()
        return code


def stage_process(cli: Cli, stage: str) -> psutil.Process:
    commands = cli.commands()
    # DVC runs the stage's command through `sh -c`; dash may fork rather than exec it, so the shell's own command
    # line names the stage too. The stage process is the Python one.
    found = [p for p, command in commands.items()
             if f"-m tasks.{stage}" in command and not command.split()[0].endswith("sh")]
    assert len(found) == 1, commands
    return found[0]


def assert_all_gone(procs: list[psutil.Process]) -> None:
    _, alive = psutil.wait_procs(procs, timeout=15)
    assert not alive, f"left behind: {[(p.pid, p.cmdline()) for p in alive]}"


def lock_entry(root: Path, stage: str):
    path = root / "dvc.lock"
    return (yaml.safe_load(path.read_text()) or {}).get("stages", {}).get(stage) if path.is_file() else None


def runs(root: Path, name: str) -> list:
    """MLflow runs of that name, newest first."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("instructflow")
    return client.search_runs([exp.experiment_id], f"attributes.run_name = '{name}'", order_by=["start_time DESC"])


def loss_steps(root: Path, run_id: str) -> list[int]:
    from mlflow import MlflowClient

    return sorted(m.step for m in MlflowClient(f"sqlite:///{root / 'mlflow.db'}").get_metric_history(run_id, "loss")
                  if m.step > 0)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = copy_project(tmp_path_factory.mktemp("faults"), "micro")
    params = root / "params.yaml"
    params.write_text(params.read_text().replace(
        "pretrain:\n", f"pretrain:\n  max_steps: {STEPS}\n  save_steps: 10\n  logging_steps: 1\n", 1))
    cli = Cli(root, "stage", "tokenizer")
    assert cli.finish() == 0, cli.text()
    return root


@pytest.fixture(scope="module")
def sigterm_to_the_run(project):
    """`instructflow run`, SIGTERM to it while pretrain trains."""
    lock_before = lock_entry(project, "pretrain")
    cli = Cli(project, "run")
    cli.wait_for(f"step 15/{STEPS}")
    children = cli.commands()
    cli.proc.send_signal(signal.SIGTERM)
    code = cli.finish()
    return {"code": code, "log": cli.text(), "children": children, "lock_before": lock_before}


def test_sigterm_to_the_run_stops_every_process_and_leaves_dvc_lock(sigterm_to_the_run, project):
    result = sigterm_to_the_run
    assert result["code"] == 143, result["log"][-3000:]
    assert "stopped by SIGTERM" in result["log"]
    commands = result["children"].values()
    assert any("uvicorn" in command for command in commands)  # Prefect's temporary server
    assert any("-m tasks.pretrain" in command for command in commands)
    assert_all_gone(list(result["children"]))
    assert lock_entry(project, "pretrain") == result["lock_before"]
    assert list((project / "checkpoints" / "pretrain").glob("step-*")), "no checkpoint saved at the stop"


def test_sigterm_to_the_run_ends_every_record_in_a_terminal_state(sigterm_to_the_run, project):
    assert [r.info.status for r in runs(project, "pipeline")][:1] == ["KILLED"]
    pretrain = runs(project, "pretrain")[0]
    assert pretrain.info.status == "KILLED" and pretrain.data.tags["instructflow.stopped_by"] in ("SIGINT", "SIGTERM")
    with sqlite3.connect(project / ".prefect" / "prefect.db") as db:
        flow_state = db.execute("select state_type from flow_run order by created desc limit 1").fetchone()[0]
        task_states = dict(db.execute("select name, state_type from task_run"))
    assert flow_state in ("CRASHED", "CANCELLED")
    assert task_states["pretrain"] in ("CRASHED", "CANCELLED")
    assert {s for s in task_states.values()} <= {"COMPLETED", "CRASHED", "CANCELLED"}, task_states


@pytest.fixture(scope="module")
def stage_faults(project, sigterm_to_the_run):
    """`instructflow stage pretrain` three times: SIGTERM to its stage process, then SIGKILL to it, then to the end."""
    out = {}
    cli = Cli(project, "stage", "pretrain")  # resumes from the run's checkpoint
    cli.wait_for("resumed from")
    child = stage_process(cli, "pretrain")
    cli.wait_for(f"step 25/{STEPS}")
    child.send_signal(signal.SIGTERM)
    out["sigterm"] = {"code": cli.finish(), "log": cli.text(), "lock": lock_entry(project, "pretrain")}

    cli = Cli(project, "stage", "pretrain")
    cli.wait_for(f"step 35/{STEPS}")
    stage_process(cli, "pretrain").send_signal(signal.SIGKILL)
    out["sigkill"] = {"code": cli.finish(), "log": cli.text(), "run": runs(project, "pretrain")[0]}

    cli = Cli(project, "stage", "pretrain")
    out["rerun"] = {"code": cli.finish(), "log": cli.text()}
    return out


def test_sigterm_to_a_stage_process_ends_its_run_killed_at_a_checkpoint(stage_faults, project):
    result = stage_faults["sigterm"]
    assert result["code"] != 0 and "exited with 143" in result["log"], result["log"][-3000:]
    assert "stopped by SIGTERM after step" in result["log"] and "checkpoint" in result["log"]
    assert result["lock"] is None  # pretrain never finished: DVC recorded nothing


def test_a_stage_killed_outright_is_marked_killed_by_the_next_run(stage_faults, project):
    killed = stage_faults["sigkill"]["run"]
    assert killed.info.status == "RUNNING"  # nobody could say otherwise while it was gone
    rerun = stage_faults["rerun"]
    assert rerun["code"] == 0, rerun["log"][-3000:]
    assert f"MLflow run {killed.info.run_id}" in rerun["log"] and "marked KILLED" in rerun["log"]
    after = {r.info.run_id: r for r in runs(project, "pretrain")}[killed.info.run_id]
    assert after.info.status == "KILLED" and "process gone" in after.data.tags["instructflow.stopped_by"]


def test_the_resumed_run_logs_its_whole_history_from_step_1(stage_faults, project):
    assert "resumed from" in stage_faults["rerun"]["log"]
    finished = runs(project, "pretrain")[0]
    assert finished.info.status == "FINISHED"
    assert loss_steps(project, finished.info.run_id) == list(range(1, STEPS + 1))
    with (project / "artifacts" / "pretrain" / "history.csv").open() as fh:
        assert [int(row["step"]) for row in csv.DictReader(fh)] == list(range(1, STEPS + 1))
    assert lock_entry(project, "pretrain") is not None
    assert not (project / "checkpoints" / "pretrain").exists()


# ---------------------------------------------------------------------------------------------------
# register killed between its two models (SIGKILL), then the next register's repair


@pytest.fixture(scope="module")
def register_faults(tmp_path_factory):
    import torch
    from helpers_tokenizer import make_test_tokenizer
    from test_registry import fake_project
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    models = tmp_path_factory.mktemp("models")
    tok = make_test_tokenizer()
    dims = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=2, max_position_embeddings=64, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**dims)).save_pretrained(models / "policy")
    LlamaForSequenceClassification(LlamaConfig(**dims, num_labels=1)).save_pretrained(models / "reward")
    for folder in ("policy", "reward"):
        tok.save_pretrained(models / folder)
    root = fake_project(tmp_path_factory.mktemp("register"), models / "policy", models / "reward")
    env = {**scratch_env(root), "PYTHONPATH": str(ROOT)}

    def register(fault: str | None = None, sigterm_after: str | None = None) -> dict:
        log = root.parent / f"register-{time.monotonic_ns()}.log"
        with log.open("w") as out:
            proc = subprocess.Popen([sys.executable, "-m", "tasks.register"], cwd=root, stdout=out,
                                    stderr=subprocess.STDOUT, env={**env, **({"INSTRUCTFLOW_FAULT": fault} if fault else {})})
            deadline = time.monotonic() + 300
            while sigterm_after and sigterm_after not in log.read_text() and proc.poll() is None:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            if sigterm_after:
                proc.send_signal(signal.SIGTERM)
            code = proc.wait(300)
        done = subprocess.CompletedProcess(proc.args, code, log.read_text(), "")
        from mlflow import MlflowClient

        client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
        state = {}
        for name in ("instructflow-policy", "instructflow-reward"):
            versions = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
            held = client.get_registered_model(name).aliases if versions else {}
            state[name] = (versions, {k: int(v) for k, v in held.items()})
        return {"code": done.returncode, "log": done.stdout + done.stderr, "registry": state,
                "journal": (root / "checkpoints" / "register" / "transaction.json").is_file()}

    return {"sigterm": register("register.registered.instructflow-policy=wait",
                                sigterm_after="fault point register.registered.instructflow-policy: waiting"),
            "undone": register("register.registered.instructflow-policy"),
            "repaired_then_killed": register("register.moved.instructflow-policy"),
            "completed": register(), "root": root}


def test_sigterm_between_the_two_models_rolls_the_register_back(register_faults):
    stopped = register_faults["sigterm"]
    assert stopped["code"] == 143, stopped["log"][-3000:]
    assert "rolled back after Interrupted" in stopped["log"] and not stopped["journal"]
    assert stopped["registry"] == {"instructflow-policy": ([], {}), "instructflow-reward": ([], {})}


def test_a_register_killed_before_any_alias_moved_is_undone_by_the_next(register_faults):
    undone = register_faults["undone"]
    assert undone["code"] == -signal.SIGKILL and undone["journal"], undone["log"][-3000:]
    assert undone["registry"]["instructflow-policy"] == ([1], {})  # its version made, nothing moved
    repaired = register_faults["repaired_then_killed"]
    assert "registry transaction left half-done by a killed register" in repaired["log"]
    assert "rolled it back" in repaired["log"]


def test_a_register_killed_between_its_alias_moves_is_completed_by_the_next(register_faults):
    killed = register_faults["repaired_then_killed"]
    assert killed["code"] == -signal.SIGKILL and killed["journal"], killed["log"][-3000:]
    policy_versions, policy_aliases = killed["registry"]["instructflow-policy"]
    assert policy_aliases == {"champion": policy_versions[-1], "challenger": policy_versions[-1]}
    assert killed["registry"]["instructflow-reward"][1] == {}  # the half-done state the journal records
    completed = register_faults["completed"]
    assert completed["code"] == 0, completed["log"][-3000:]
    assert "completed it" in completed["log"] and not completed["journal"]
    for name in ("instructflow-policy", "instructflow-reward"):
        versions, held = completed["registry"][name]
        assert held == {"champion": versions[-1], "challenger": versions[-1]}
        assert len(versions) == 1  # the rerun found the same weights and registered nothing new


def test_the_killed_register_runs_are_marked_killed(register_faults):
    from mlflow import MlflowClient

    root = register_faults["root"]
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("instructflow")
    statuses = sorted(r.info.status for r in client.search_runs([exp.experiment_id]))
    assert statuses == ["FINISHED", "KILLED", "KILLED", "KILLED"]  # SIGTERM, SIGKILL, SIGKILL, then the last

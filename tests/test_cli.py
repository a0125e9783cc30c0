"""The CLI's `status` and `stage`: what they show and run, first against a stand-in for DVC, then for real."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, copy_project
from rich.console import Console
from typer.testing import CliRunner

from apps import cli
from instructflow.config import load_params
from instructflow.stages import BY_NAME, NAMES


class FakeDvc:
    """Stands in for the `subprocess` module of apps.cli: records each command, answers DVC's part."""

    def __init__(self, status: dict | None = None, status_rc: int = 0, repro_rc: int = 0):
        self.status, self.status_rc, self.repro_rc = status or {}, status_rc, repro_rc
        self.calls: list[tuple[list[str], dict]] = []

    def run(self, cmd, **kwargs):
        self.calls.append((cmd, kwargs))
        assert cmd == [sys.executable, "-m", "dvc", "status", "--json"], cmd
        stdout = json.dumps(self.status) if self.status_rc == 0 else ""
        stderr = "" if self.status_rc == 0 else "ERROR: you are not inside of a DVC repository"
        return subprocess.CompletedProcess(cmd, self.status_rc, stdout, stderr)

    def call(self, cmd, **kwargs):
        self.calls.append((cmd, kwargs))
        return self.repro_rc

    def spawn(self, cmd, **kwargs):  # instructflow.signals.spawn: `dvc repro` in its own process group
        self.calls.append((cmd, kwargs))
        return cmd

    def wait(self, proc):  # instructflow.signals.wait
        return self.repro_rc


@pytest.fixture
def wide(monkeypatch):
    """The CLI's console without colours and wide enough that no table cell wraps."""
    monkeypatch.setattr(cli, "console", Console(width=250, color_system=None))


@pytest.fixture(autouse=True)
def _own_root(tmp_path, monkeypatch):
    """Every test's project is tmp_path, also for a late `env.setup()` (importing `tasks` runs one; see
    test_status_reads_the_registry_of_the_root_it_is_given), so no test touches the checkout's MLflow store:
    not even the one `make test` names in MLFLOW_TRACKING_URI: each test has its own, tmp_path/mlflow.db."""
    monkeypatch.setenv("INSTRUCTFLOW_ROOT", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")


def invoke(*args: str):
    return CliRunner().invoke(cli.app, list(args))


def row(output: str, stage: str) -> list[str]:
    """The cells of a stage's row in the printed table."""
    for line in output.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("│").split("│")]
        if cells[0] == stage:
            return cells
    raise AssertionError(f"no row for stage {stage!r} in:\n{output}")


def project(root: Path) -> Path:
    """A project folder as far as `status` and `stage` read one without DVC: its params.yaml (and the demo data's
    folder, which `stage` checks is there before DVC runs)."""
    shutil.copy2(ROOT / "params.yaml", root / "params.yaml")
    (root / "data" / "raw").mkdir(parents=True, exist_ok=True)
    return root


def write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


# ---------------------------------------------------------------------------------------------------
# status


def test_status_shows_each_stage_state_from_dvc_and_its_key_metrics(tmp_path, monkeypatch, wide):
    # given: prepare and pretrain ran (pretrain's throughput is in its lineage record); DVC says tokenizer changed
    root = project(tmp_path)
    write(root / "metrics" / "prepare.json", {"sft_train": 243, "preference_train": 152, "pretrain_train": 63,
                                              "not_a_key_metric": 1})
    write(root / "metrics" / "pretrain.json", {"eval_loss": 2.345678, "eval_perplexity": 10.4419})
    write(root / "lineage" / "pretrain.json", {"mlflow_run_id": "r1", "tokens_per_sec": 12345.6})
    write(root / "metrics" / "tokenizer.json", {"vocab_size": 512})
    dvc = FakeDvc(status={"tokenizer": [{"changed deps": {"data/prepared": "modified"}}]})
    monkeypatch.setattr(cli, "subprocess", dvc)

    result = invoke("status", "--root", str(root))

    # then: one row per stage, its state from DVC's answer and the files, its key metrics formatted
    assert result.exit_code == 0, result.output
    (cmd, kwargs), = dvc.calls
    assert cmd == [sys.executable, "-m", "dvc", "status", "--json"] and kwargs["cwd"] == root
    assert row(result.output, "prepare") == ["prepare", "up to date", "sft_train=243 preference_train=152 pretrain_train=63"]
    assert row(result.output, "tokenizer") == ["tokenizer", "changed", "vocab_size=512"]
    assert row(result.output, "pretrain") == ["pretrain", "up to date",
                                              "eval_loss=2.346 eval_perplexity=10.44 tokens_per_sec=12,346"]
    assert row(result.output, "sft") == ["sft", "never run", ""]
    assert row(result.output, "mlm") == ["mlm", "never run (track off)", ""]  # params.yaml: encoder track off
    assert [name for name in NAMES if row(result.output, name)] == list(NAMES)
    assert f"({load_params(root / 'params.yaml').preset} preset, tracks: decoder)" in result.output
    assert "No registered models yet" in result.output


def test_status_fails_with_dvc_message_and_exit_2(tmp_path, monkeypatch, wide):
    monkeypatch.setattr(cli, "subprocess", FakeDvc(status_rc=1))
    result = invoke("status", "--root", str(project(tmp_path)))
    assert result.exit_code == 2
    assert "dvc status failed: ERROR: you are not inside of a DVC repository" in result.output


# ---------------------------------------------------------------------------------------------------
# stage


def test_stage_with_an_unknown_name_exits_2_naming_the_stages(tmp_path, monkeypatch, wide):
    dvc = FakeDvc()
    monkeypatch.setattr(cli, "subprocess", dvc)

    result = invoke("stage", "pretrian", "--root", str(project(tmp_path)))

    assert result.exit_code == 2
    message = " ".join(result.output.split())  # the console may wrap the line
    assert f"unknown stage 'pretrian': expected one of {', '.join(NAMES)}" in message
    assert dvc.calls == [] and not (tmp_path / "dvc.yaml").exists()  # nothing ran, nothing written


def test_stage_runs_dvc_repro_of_that_stage_and_exits_with_its_code(tmp_path, monkeypatch, wide):
    # given: a project without dvc.yaml, and a DVC that fails with code 3
    root = project(tmp_path)
    dvc = FakeDvc(repro_rc=3)
    monkeypatch.setattr(cli, "subprocess", dvc)
    monkeypatch.setattr(cli.signals, "spawn", dvc.spawn)
    monkeypatch.setattr(cli.signals, "wait", dvc.wait)

    result = invoke("stage", "sft", "--root", str(root))

    # then: dvc.yaml is rendered first, `dvc repro sft` runs in the project with this Python's tools first
    # on PATH (so the stage command `python` is this one), and its exit code is the command's
    (cmd, kwargs), = dvc.calls
    assert cmd == [sys.executable, "-m", "dvc", "repro", "sft"]
    assert kwargs["cwd"] == root
    assert kwargs["env"]["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    assert "sft" in yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    assert result.exit_code == 3


def test_stage_with_bad_params_exits_2_before_dvc(tmp_path, monkeypatch, wide):
    root = project(tmp_path)
    (root / "params.yaml").write_text((root / "params.yaml").read_text().replace("  beta: 0.1", "  betaa: 0.1"))
    dvc = FakeDvc()
    monkeypatch.setattr(cli, "subprocess", dvc)

    result = invoke("stage", "align", "--root", str(root))

    assert result.exit_code == 2 and "betaa" in result.output
    assert dvc.calls == []


# ---------------------------------------------------------------------------------------------------
# For real: `stage prepare` through DVC, then `status`


def test_stage_prepare_runs_it_through_dvc_and_status_then_shows_it_up_to_date(tmp_path, wide):
    root = copy_project(tmp_path, "micro")

    ran = invoke("stage", "prepare", "--root", str(root))

    # then: DVC ran prepare alone and locked it
    assert ran.exit_code == 0, ran.output
    assert (root / "data" / "prepared" / "sft_train.jsonl").is_file()
    assert list(yaml.safe_load((root / "dvc.lock").read_text())["stages"]) == ["prepare"]
    assert not (root / "artifacts" / "tokenizer").exists()

    shown = invoke("status", "--root", str(root))

    # then: prepare is up to date with the figures it wrote; the stages after it are not
    assert shown.exit_code == 0, shown.output
    metrics = json.loads((root / "metrics" / "prepare.json").read_text())
    figures = " ".join(f"{key}={metrics[key]}" for key in BY_NAME["prepare"].key_metrics)
    assert row(shown.output, "prepare") == ["prepare", "up to date", figures]
    for name in NAMES[1:]:
        assert row(shown.output, name)[1].startswith("changed"), row(shown.output, name)
    assert row(shown.output, "classify")[1] == "changed (track off)"


def test_status_reads_the_registry_of_the_root_it_is_given(tmp_path):
    # given: a DVC project to look at, and the command run from inside another project
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    for folder in (root, elsewhere):
        folder.mkdir()
        project(folder)
    (elsewhere / "dvc.yaml").write_text("stages: {}\n")
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=root, check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("INSTRUCTFLOW_ROOT", "MLFLOW_TRACKING_URI")}

    result = subprocess.run([sys.executable, "-m", "apps.cli", "status", "--root", str(root)], cwd=elsewhere, env=env,
                            capture_output=True, text=True, check=False)

    # then: the registry shown is root's; nothing is created in the other project
    assert result.returncode == 0, result.stdout + result.stderr
    assert (root / "mlflow.db").is_file()
    assert not (elsewhere / "mlflow.db").exists()


# ---------------------------------------------------------------------------------------------------
# per-stage gains: the summary after `run` flags a stage that does not beat its baseline


def gains_metrics() -> dict[str, dict]:
    """metrics/evaluate.json and metrics/classify.json as the stages write them: gains among other figures."""
    from models.stats import Gain, gain_metrics

    evaluate = gain_metrics([
        Gain("sft", "exact_match", "all", "base", 0.5, 0.0, 0.5, 0.3, 0.7, 200),
        Gain("reward", "accuracy", "synthetic", "tfidf", 0.9, 0.6, 0.3, 0.2, 0.4, 100),
        Gain("reward", "accuracy", "real", "tfidf", 0.55, 0.61, -0.06, -0.12, 0.01, 100),
        Gain("align", "win_rate", "all", "tie", 0.7, 0.5, 0.2, 0.05, 0.35, 48),
    ])
    classify = gain_metrics([Gain("mlm", "accuracy", "all", "random_init", 0.7, 0.6, 0.1, 0.05, 0.15, 5000),
                             Gain("classify", "accuracy", "all", "tfidf", 0.7, 0.8, -0.1, -0.15, -0.05, 5000)])
    return {"evaluate": {"exact_match": 0.5, "exact_match_ci_low": 0.3, "exact_match_ci_high": 0.7, **evaluate},
            "classify": {"accuracy": 0.7, "macro_f1": 0.69, **classify}}


def test_summary_flags_each_stage_that_does_not_beat_its_baseline(monkeypatch, wide):
    from types import SimpleNamespace

    monkeypatch.setattr(cli, "registry_table", lambda params: None)
    figures = gains_metrics()
    results = [{"stage": name, "status": "ran", "wall_s": 1.0, "metrics": figures.get(name, {})} for name in NAMES]
    with cli.console.capture() as captured:
        cli.print_summary(results, SimpleNamespace(preset="micro"), Path("/p"), 10.0)
    output = captured.get()

    # then: a `vs baseline` column on the row of each judged stage (the gains live in evaluate's and classify's files)
    assert row(output, "sft")[-1] == "beats 1/1"
    assert row(output, "reward")[-1] == "beats 1/2"
    assert row(output, "align")[-1] == "beats 1/1"
    assert row(output, "mlm")[-1] == "beats 1/1" and row(output, "classify")[-1] == "beats 0/1"
    assert row(output, "evaluate")[-1] == "" and row(output, "pretrain")[-1] == ""
    # and one line per failing stage naming the comparison it fails, with the figures
    flags = [line for line in output.splitlines() if line.startswith("does not beat")]
    assert flags == [
        "does not beat its baseline: reward (accuracy (real): 0.55 vs TF-IDF 0.61, gain -0.060 [-0.120, +0.010])",
        "does not beat its baseline: classify (accuracy: 0.7 vs TF-IDF 0.8, gain -0.100 [-0.150, -0.050])"]


def test_summary_says_when_every_stage_beats_its_baselines(monkeypatch, wide):
    from types import SimpleNamespace

    from models.stats import Gain, gain_metrics

    monkeypatch.setattr(cli, "registry_table", lambda params: None)
    metrics = gain_metrics([Gain("sft", "exact_match", "all", "base", 0.5, 0.0, 0.5, 0.3, 0.7, 200)])
    results = [{"stage": "evaluate", "status": "skipped", "wall_s": 0.1, "metrics": metrics}]
    with cli.console.capture() as captured:
        cli.print_summary(results, SimpleNamespace(preset="micro"), Path("/p"), 1.0)
    assert "does not beat" not in captured.get()
    assert "every stage measured beats its baselines (sft)" in captured.get()


def test_status_flags_a_stage_that_does_not_beat_its_baseline(tmp_path, monkeypatch, wide):
    root = project(tmp_path)
    for name, metrics in gains_metrics().items():
        write(root / "metrics" / f"{name}.json", metrics)
    monkeypatch.setattr(cli, "subprocess", FakeDvc())

    result = invoke("status", "--root", str(root))

    assert result.exit_code == 0, result.output
    assert "does not beat its baseline: reward (accuracy (real): 0.55 vs TF-IDF 0.61" in result.output
    assert "does not beat its baseline: classify (accuracy: 0.7 vs TF-IDF 0.8" in result.output
    assert "sft (" not in result.output


def test_the_summary_points_at_the_shared_servers_the_environment_names_without_credentials(monkeypatch):
    from apps.cli import ui_hint

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert ui_hint("MLFLOW_TRACKING_URI", "make mlflow-ui") == "make mlflow-ui"
    assert ui_hint("PREFECT_API_URL", "make prefect-ui") == "make prefect-ui"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://ana:secret@mlflow.example:5000/")
    monkeypatch.setenv("PREFECT_API_URL", "http://10.0.0.1:4200/api")
    assert ui_hint("MLFLOW_TRACKING_URI", "-") == "https://mlflow.example:5000  (MLFLOW_TRACKING_URI)"
    assert ui_hint("PREFECT_API_URL", "-") == "http://10.0.0.1:4200  (PREFECT_API_URL)"

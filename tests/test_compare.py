"""`instructflow compare`: one param's values side by side, up to evaluate, nothing registered, all put back.

Given a scratch micro project whose pipeline has run (the session's trained project: every stage up to date, one
registered version), when `instructflow compare align.beta=0.1,0.5` runs (params.yaml holds 0.1), then the table has a row
per value with its figures, SFT and the reward model trained once (0.5 aligns from the same ones), params.yaml is
byte for byte as before, `dvc status` is clean (align and evaluate came back from the run-cache), nothing was
registered, and MLflow has one `compare` run with each value's pipeline run under it. A bad value, or another run
holding the checkout, stops it before anything runs. One pipeline run and one comparison serve every test here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from conftest import cli, scratch_env

e2e = pytest.mark.e2e  # the tests of the one pipeline run and comparison (the fast ones at the end are not)


def dvc_status(root: Path) -> dict:
    out = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=root, env=scratch_env(root),
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout or "{}")


def mlflow_runs(root: Path) -> list:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("instructflow")
    return client.search_runs([exp.experiment_id], max_results=500)


def policy_versions(root: Path) -> int:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    return len(client.search_model_versions("name='instructflow-policy'"))


@pytest.fixture(scope="module")
def compared(micro_pipeline):
    root = micro_pipeline
    before = {"params": (root / "params.yaml").read_bytes(), "status": dvc_status(root),
              "runs": len(mlflow_runs(root)), "names": Counter(r.info.run_name for r in mlflow_runs(root)),
              "versions": policy_versions(root),
              "lock": (root / "dvc.lock").read_bytes()}
    bad = cli(root, "compare", "align.beta=0.1,-1")
    after_bad = {"params": (root / "params.yaml").read_bytes(), "runs": len(mlflow_runs(root))}
    result = cli(root, "compare", "align.beta=0.1,0.5")
    return {"root": root, "before": before, "bad": bad, "after_bad": after_bad, "result": result}


def rows(markdown: str, key: str) -> dict[str, dict[str, str]]:
    """The table's rows by value, each as {column: cell}."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[0] == key
    return {cells[0]: dict(zip(header, cells)) for cells in
            ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])}


@e2e
def test_a_bad_value_fails_before_anything_runs_naming_key_and_value(compared):
    bad = compared["bad"]
    assert bad.returncode == 2, bad.stdout + bad.stderr
    text = " ".join((bad.stdout + bad.stderr).split())
    assert "align.beta = -1" in text and "greater than 0" in text and "nothing was run" in text
    assert compared["after_bad"]["params"] == compared["before"]["params"]
    assert compared["after_bad"]["runs"] == compared["before"]["runs"]  # no MLflow run, no stage


@e2e
def test_the_table_has_a_row_per_value_with_its_figures(compared):
    root, result = compared["root"], compared["result"]
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    table = rows((root / "comparisons" / "compare.md").read_text(), "align.beta")
    assert list(table) == ["0.1", "0.5"]
    for value, row in table.items():
        assert row["status"] == "ok", row
        for column in ("reward gain over SFT", "win-rate vs SFT [CI]", "KL to SFT [CI]", "exact match [CI]"):
            assert row[column] not in ("", "–"), (value, column)
        assert row["win-rate vs SFT [CI]"].count("[") == 1  # with its interval
    assert "(align, evaluate)" in table["0.5"]["wall s (stages run)"]  # DVC reran only what beta changes
    assert "none: up to date" in table["0.1"]["wall s (stages run)"]  # params.yaml's own value: nothing reran

    data = json.loads((root / "comparisons" / "compare.json").read_text())
    assert data["key"] == "align.beta" and [v["value"] for v in data["variants"]] == [0.1, 0.5]
    for v in data["variants"]:
        f = v["figures"]
        assert f["reward_gain"] == pytest.approx(v["evaluate"]["policy_mean_reward"] - v["evaluate"]["sft_mean_reward"])
        assert f["win_rate"]["ci_low"] <= f["win_rate"]["value"] <= f["win_rate"]["ci_high"]
        assert set(f["kl_to_reference"]) == {"value", "ci_low", "ci_high"} and "exact_match_gain.all" in f
    assert data["variants"][1]["ran"] == ["align", "evaluate"] and data["variants"][1]["wall_s"] > 0
    assert data["variants"][0]["evaluate"] != data["variants"][1]["evaluate"]  # two policies were judged


@e2e
def test_sft_and_the_reward_model_trained_once_and_nothing_was_registered(compared):
    root = compared["root"]
    new = Counter(r.info.run_name for r in mlflow_runs(root)) - compared["before"]["names"]
    assert new["sft"] == 0 and new["reward"] == 0  # both values reused the pipeline's
    assert new["align"] == 1 and new["evaluate"] == 1  # beta 0.5's (0.1 is params.yaml's: up to date)
    assert new["register"] == 0
    assert policy_versions(root) == compared["before"]["versions"] == 1


@e2e
def test_params_dvc_status_and_dvc_lock_are_as_before(compared):
    root, before = compared["root"], compared["before"]
    assert (root / "params.yaml").read_bytes() == before["params"]
    assert before["status"] == {} and dvc_status(root) == {}  # align and evaluate came back from the run-cache
    assert (root / "dvc.lock").read_bytes() == before["lock"]
    assert "align restored" in compared["result"].stdout and "evaluate restored" in compared["result"].stdout


@e2e
def test_mlflow_has_one_compare_run_with_each_value_nested_under_it(compared):
    root = compared["root"]
    runs = mlflow_runs(root)
    [parent] = [r for r in runs if r.info.run_name == "compare"]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["key"] == "align.beta" and parent.data.params["values"] == "0.1,0.5"
    for value in ("0.1", "0.5"):
        assert {f"{value}/win_rate", f"{value}/win_rate_ci_low", f"{value}/kl_to_reference",
                f"{value}/reward_gain", f"{value}/exact_match"} <= set(parent.data.metrics)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == ["compare align.beta=0.1", "compare align.beta=0.5"]
    beta5 = next(r for r in children if r.info.run_name.endswith("0.5"))
    assert beta5.data.params["align.beta"] == "0.5"
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} == {"compare.md", "compare.json"}


@e2e
def test_another_run_holding_the_checkout_is_refused_before_anything(compared):
    from flows.guard import run_lock

    root = compared["root"]
    params = (root / "params.yaml").read_bytes()
    with run_lock(root, command="instructflow run (the test)"):
        refused = cli(root, "compare", "align.beta=0.2,0.3")
    assert refused.returncode == 2 and "another instructflow run is using this checkout" in refused.stdout
    assert (root / "params.yaml").read_bytes() == params


@e2e
def test_a_failing_value_is_a_failed_row_and_the_others_still_run(compared):
    root = compared["root"]
    params = (root / "params.yaml").read_bytes()
    result = cli(root, "compare", "align.max_length=16,96")  # 16: no preference pair fits; 96: params.yaml's own
    assert result.returncode == 1, result.stdout[-4000:]
    table = rows((root / "comparisons" / "compare.md").read_text(), "align.max_length")
    assert table["16"]["status"].startswith("failed: stage 'align' failed: ") and "max_length 16" in table["16"]["status"]
    assert table["96"]["status"] == "ok" and table["96"]["win-rate vs SFT [CI]"] != "–"
    assert (root / "params.yaml").read_bytes() == params and dvc_status(root) == {}


@e2e
def test_a_stop_ends_the_comparison_and_puts_everything_back(compared):
    import signal
    import time

    root = compared["root"]
    params = (root / "params.yaml").read_bytes()
    log = root / "stop.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "apps.cli", "compare", "align.beta=0.3,0.5"], cwd=root,
                                env=scratch_env(root), stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while "Running stage 'align'" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=300) == 130, log.read_text()[-4000:]
    table = rows((root / "comparisons" / "compare.md").read_text(), "align.beta")
    assert table["0.3"]["status"] == "stopped by SIGINT" and table["0.5"]["status"] == "not run"
    assert (root / "params.yaml").read_bytes() == params and dvc_status(root) == {}
    [run] = [r for r in mlflow_runs(root) if r.info.run_name == "compare" and r.data.params["values"] == "0.3,0.5"]
    assert run.info.status == "KILLED"


# ------------------------------------------------------------------------------------------- fast, no pipeline
def test_values_split_on_top_level_commas_only():
    from flows.compare import split_values

    assert split_values("dpo,kto, ppo") == ["dpo", "kto", "ppo"]
    assert split_values("[translate,rename],[arithmetic]") == ["[translate,rename]", "[arithmetic]"]
    assert split_values("'a,b',c") == ["'a,b'", "c"]


def test_per_kind_exact_match_gains_of_the_policy_get_their_own_columns_when_evaluate_records_them():
    from flows.compare import Plan, Variant, table
    from instructflow.config import Params
    from models.stats import Gain, gain_metrics

    def variant(label: str, em: float) -> Variant:
        gains = [Gain("align", "exact_match", subset, "sft", em, 0.5, em - 0.5, em - 0.6, em - 0.4, 10)
                 for subset in ("all", "translate")]
        ev = {"policy_mean_reward": 1.0, "sft_mean_reward": 0.25, "win_rate": 0.6, "win_rate_ci_low": 0.5,
              "win_rate_ci_high": 0.7, "exact_match": em, **gain_metrics(gains)}
        return Variant(label, label, [f"align.algorithm={label}"], Params(), status="ok", evaluate=ev,
                       stages=[{"stage": "align", "status": "ran", "wall_s": 3.0}])

    header, body = table(Plan("align.algorithm", [variant("dpo", 0.75), variant("kto", 0.5)], [], None))
    assert "exact match gain, translate [CI]" in header
    row = dict(zip(header, body[0]))
    assert row["reward gain over SFT"] == "+0.7500" and row["win-rate vs SFT [CI]"] == "0.600 [0.500, 0.700]"
    assert row["exact match gain, translate [CI]"] == "+0.250 [+0.150, +0.350]"
    assert row["wall s (stages run)"] == "3.0 (align)"


def test_a_failed_value_shows_the_stage_and_its_own_error_line():
    from flows.compare import short_error

    error = ("stage 'align' failed (dvc repro exit 255):\nRunning stage 'align':\n> python -m tasks.align\n"
             "23:25:18 ERROR instructflow: stage align failed: preference_train: no preference pair fits max_length 17\n"
             "ERROR: failed to reproduce 'align': failed to run: python -m tasks.align, exited with 2")
    assert short_error(error) == "stage 'align' failed: preference_train: no preference pair fits max_length 17"
    assert short_error("the flow could not start") == "the flow could not start"

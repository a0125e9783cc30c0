"""End to end: the whole pipeline on the micro preset under Prefect's test harness, then again (all skipped).

Given a fresh copy of the project (its own git repo, DVC cache, MLflow store, Prefect home),
when the flow runs twice, then every stage ran once, the runs and the registry are in MLflow,
and the second run skipped everything and registered nothing new.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

DECODER = ["pretrain", "sft", "reward", "align", "evaluate"]
ENCODER = ["mlm", "classify", "similarity"]
OPTIONAL = ["self_instruct", "generate", "rank"]


@pytest.fixture(scope="module")
def project(trained_project):
    """The session's trained project (conftest.py), with this module's MLflow store as the tracking URI."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{trained_project[0] / 'mlflow.db'}")
        yield trained_project


def statuses(results):
    return {r["stage"]: r["status"] for r in results}


def test_every_stage_ran_and_wrote_its_metrics(project):
    root, first, _ = project
    # optional stages are off unless switched on (self_instruct.enabled, loop.enabled): DVC still records them
    assert statuses(first) == {**{s: "ran" for s in ["prepare", "tokenizer", *DECODER, *ENCODER, "register"]},
                               **{s: "off" for s in OPTIONAL}}
    for stage in ["prepare", "tokenizer", *DECODER, *ENCODER, "register"]:
        assert (root / "metrics" / f"{stage}.json").is_file(), stage
        lineage = json.loads((root / "lineage" / f"{stage}.json").read_text())  # outside DVC's outputs
        assert lineage["wall_time_s"] > 0 and lineage["mlflow_run_id"], stage
    evaluation = json.loads((root / "metrics" / "evaluate.json").read_text())
    for key in ("exact_match", "win_rate", "reward_accuracy", "kl_to_reference", "policy_perplexity"):
        assert evaluation[f"{key}_ci_low"] <= evaluation[key] <= evaluation[f"{key}_ci_high"] if \
            f"{key}_ci_low" in evaluation else key in evaluation
    assert (root / "reports" / "evaluation.md").read_text().startswith("# Evaluation report")
    assert (root / "artifacts" / "pretrain" / "history.csv").is_file()
    similarity = json.loads((root / "metrics" / "similarity.json").read_text())
    for key in ("spearman", "mlm_spearman", "tfidf_spearman", "gain_over_tfidf"):
        assert similarity[f"{key}_ci_low"] <= similarity[key] <= similarity[f"{key}_ci_high"], key
    assert similarity["beats_tfidf"] in (0, 1) and similarity["dev_pairs"] > 0
    assert (root / "artifacts" / "similarity" / "report.md").read_text().startswith("# Sentence similarity")


def test_second_run_skips_every_stage(project):
    _, _, second = project
    assert statuses(second) == {s: "off" if s in OPTIONAL else "skipped" for s in statuses(second)}
    assert len(statuses(second)) == 14


def test_the_cli_answers_a_no_op_run_from_dvc_without_starting_prefect(project):
    from typer.testing import CliRunner

    from apps.cli import app

    root, _, _ = project
    result = CliRunner().invoke(app, ["run", "--root", str(root)])
    assert result.exit_code == 0, result.output
    assert "Nothing changed since the last run" in result.output
    assert "ran " not in result.output and "skipped" in result.output  # and no MLflow parent run (next test: 2)
    # overrides that params.yaml already holds (the same resolved params) are a no-op too
    from instructflow.config import load_params

    beta = load_params(root / "params.yaml").align.beta
    again = CliRunner().invoke(app, ["run", "--root", str(root), "--set", f"align.beta={beta}"])
    assert again.exit_code == 0, again.output
    assert "Nothing changed since the last run" in again.output


def test_mlflow_has_a_parent_run_with_a_nested_run_per_stage(project):
    import mlflow

    root, _, _ = project
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("instructflow")
    runs = client.search_runs([exp.experiment_id], max_results=200)
    parents = [r for r in runs if r.info.run_name == "pipeline"]
    assert len(parents) == 2  # one per pipeline run
    first_parent = min(parents, key=lambda r: r.info.start_time)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == first_parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == sorted(
        ["prepare", "tokenizer", *DECODER, *ENCODER, "register"])
    sft = next(r for r in children if r.info.run_name == "sft")
    assert "sft.lr" in sft.data.params
    history = client.get_metric_history(sft.info.run_id, "loss")
    assert len(history) >= 2 and {"learning_rate", "grad_norm", "tokens_per_sec"} <= set(sft.data.metrics)


def test_the_parent_run_records_the_params_its_stages_trained_with(project):
    """Each stage's MLflow run logs its section of params.yaml as it read it; the parent run logs every resolved
    param under the same names, with the same params hash: what the history says ran is what trained."""
    import mlflow

    root, _, _ = project
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("instructflow").experiment_id], max_results=200)
    for parent in (r for r in runs if r.info.run_name == "pipeline"):
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        for child in children:
            assert child.data.tags["instructflow.params_hash"] == parent.data.tags["instructflow.params_hash"]
            read = {k: v for k, v in child.data.params.items()  # not what MLflow's model flavours log beside them
                    if k in ("preset", "seed") or k.startswith(f"{child.info.run_name}.")}
            assert len(read) > 2 and {k: parent.data.params.get(k) for k in read} == read, child.info.run_name
        assert "params_mismatch" not in parent.data.tags


def test_registry_holds_champions_with_lineage(project):
    from mlflow import MlflowClient

    root, _, _ = project
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}", f"sqlite:///{root / 'mlflow.db'}")
    for name in ("instructflow-policy", "instructflow-reward", "instructflow-encoder", "instructflow-classifier",
                 "instructflow-embedder"):
        versions = client.search_model_versions(f"name = '{name}'")
        assert len(versions) == 1, f"{name}: the second run must register nothing new"
        champion = client.get_model_version_by_alias(name, "champion")
        tags = champion.tags
        assert tags["git_commit"] and tags["params_hash"]
        assert any(k.startswith("data.data/raw") and k.endswith(".md5") for k in tags), tags
        assert {"run.prepare", "run.tokenizer"} <= set(tags)
    policy = client.get_model_version_by_alias("instructflow-policy", "champion")
    assert {"run.sft", "run.align", "run.evaluate", "metric.exact_match"} <= set(policy.tags)
    assert policy.tags["align.algorithm"] == "dpo"
    embedder = client.get_model_version_by_alias("instructflow-embedder", "champion")
    assert {"run.mlm", "run.similarity", "metric.spearman", "metric.spearman.ci_low"} <= set(embedder.tags)


def test_changing_align_beta_invalidates_only_align(project):
    from instructflow.config import write_overrides

    root, _, _ = project
    params = (root / "params.yaml").read_text()
    try:
        write_overrides(root / "params.yaml", ["align.beta=0.25"])
        out = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=root, capture_output=True,
                             text=True, check=True)
        assert set(json.loads(out.stdout)) == {"align"}
    finally:
        (root / "params.yaml").write_text(params)


def test_dvc_alone_agrees_that_everything_is_up_to_date(project):
    root, _, _ = project
    status = subprocess.run([sys.executable, "-m", "dvc", "status"], cwd=root, capture_output=True, text=True,
                            check=True)
    assert "Data and pipelines are up to date" in status.stdout
    repro = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=root, capture_output=True, text=True,
                           check=True, env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"})
    assert "Running stage" not in repro.stdout
    assert "didn't change, skipping" in repro.stdout


def dvc(root, *args):
    """`dvc ARGS` as a user runs it: this venv first on PATH, so a stage's `python` is the project's."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True, env=env)
    assert done.returncode == 0, f"dvc {' '.join(args)}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done


def test_no_cached_output_holds_a_run_id_or_a_timing(project):
    root, _, _ = project
    lineage = json.loads((root / "lineage" / "sft.json").read_text())
    for folder in ("data/prepared", "artifacts", "reports"):
        for path in (root / folder).rglob("*"):
            if path.is_file() and path.suffix in {".json", ".csv", ".md", ".jsonl"}:
                text = path.read_text(encoding="utf-8")
                assert lineage["mlflow_run_id"] not in text and "tokens_per_sec" not in text, path


def test_a_file_nobody_lists_in_data_user_reruns_nothing(project):
    root, _, _ = project
    (root / "data" / "user" / "notes.tsv").write_text("id\tdocument\tlabel\n1\t좋아요\t1\n", encoding="utf-8")
    try:
        assert json.loads(dvc(root, "status", "--json").stdout) == {}
    finally:
        (root / "data" / "user" / "notes.tsv").unlink()


def test_rerunning_prepare_tokenizer_and_pretrain_writes_the_same_bytes(project):
    """Forced reruns with the same inputs and seed: DVC then finds every later stage up to date."""
    root, _, _ = project
    for stage in ("prepare", "tokenizer", "pretrain"):
        dvc(root, "repro", "--force", "--single-item", stage)
        assert json.loads(dvc(root, "status", "--json").stdout) == {}, f"{stage} wrote different outputs"
    repro = dvc(root, "repro")
    assert "Running stage" not in repro.stdout


def test_a_change_to_exact_match_makes_dvc_rerun_the_stages_that_import_it(project):
    root, _, _ = project
    path = root / "instructflow" / "synthetic.py"
    code = path.read_text()
    try:
        path.write_text(code.replace("def exact_match(prediction: str, answer: str) -> bool:",
                                     "def exact_match(prediction: str, answer: str) -> bool:  # case-sensitive now", 1))
        assert path.read_text() != code
        changed = set(json.loads(dvc(root, "status", "--json").stdout))
        assert {"prepare", "evaluate"} <= changed  # the two stages whose code imports instructflow/synthetic.py
        dry = dvc(root, "repro", "--dry").stdout
        assert "Running stage 'evaluate'" in dry
    finally:
        path.write_text(code)


def test_the_flow_reports_a_stage_restored_from_the_run_cache(project):
    from flows.stage_task import dvc_repro
    from instructflow.config import write_overrides

    root, _, _ = project
    params = (root / "params.yaml").read_text()
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    try:
        write_overrides(root / "params.yaml", ["align.beta=0.25"])
        assert dvc_repro("align", root, None, lambda line: None) == "ran"
        (root / "params.yaml").write_text(params)  # back to the beta that trained the current champion
        assert dvc_repro("align", root, None, lambda line: None) == "restored"
        assert dvc_repro("align", root, None, lambda line: None) == "skipped"
    finally:
        (root / "params.yaml").write_text(params)

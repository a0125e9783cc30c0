"""The model registry: the promotion gate by hand, then a micro Llama logged into a throwaway MLflow."""

from __future__ import annotations

import json
import logging
import math
import shutil
import subprocess
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from conftest import ROOT, FakeRun
from helpers_tokenizer import make_test_tokenizer
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import (
    RESOURCE_DOES_NOT_EXIST,
    TEMPORARILY_UNAVAILABLE,
)
from mlflow.tracking import MlflowClient
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
)

from instructflow.config import load_params
from instructflow.errors import InstructflowError
from tasks import register as register_stage
from tasks.registry import (
    WEIGHTS_TAG,
    Decision,
    MetricValue,
    RollbackError,
    aliases,
    decide,
    describe,
    log_and_register,
    metric_value,
    promote,
    register_unless_same,
    registry_transaction,
    serving_requirements,
    version_tags,
    weights_sha256,
    with_retries,
)

# ---------------------------------------------------------------------------------------------------
# decide: hand-worked


def test_first_version_is_promoted():
    decision = decide(MetricValue(0.40, 0.33, 0.47), None, metric="exact_match")
    assert decision == Decision(True, "challenger exact_match 0.4 [0.33, 0.47], no champion yet: promoted")


def test_ci_beyond_the_champion_promotes_and_the_reason_carries_the_numbers():
    decision = decide(MetricValue(0.62, 0.55, 0.70), MetricValue(0.40), metric="exact_match")
    assert decision.promote
    assert decision.reason.startswith("challenger exact_match 0.62 [0.55, 0.7] vs champion 0.4: promoted")


def test_worse_challenger_is_not_promoted():
    decision = decide(MetricValue(0.30, 0.22, 0.38), MetricValue(0.40, 0.33, 0.47))
    assert not decision.promote
    assert "kept champion" in decision.reason and "0.22" in decision.reason


def test_better_value_within_the_ci_is_not_promoted_unless_ci_is_off():
    # given: 0.45 > 0.40, but the interval [0.35, 0.55] still holds the champion's 0.40
    challenger, champion = MetricValue(0.45, 0.35, 0.55), MetricValue(0.40)
    assert not decide(challenger, champion, use_ci=True).promote
    assert decide(challenger, champion, use_ci=False).promote


def test_ci_low_equal_to_the_champion_is_not_beyond_it():
    assert not decide(MetricValue(0.5, 0.40, 0.60), MetricValue(0.40)).promote


def test_without_a_ci_values_compare_strictly():
    assert decide(MetricValue(0.41), MetricValue(0.40)).promote
    assert not decide(MetricValue(0.40), MetricValue(0.40)).promote


def test_lower_is_better_looks_at_the_upper_bound():
    champion = MetricValue(2.0)  # e.g. a perplexity
    assert decide(MetricValue(1.5, 1.2, 1.9), champion, greater_is_better=False).promote
    assert not decide(MetricValue(1.5, 1.2, 2.1), champion, greater_is_better=False).promote
    assert not decide(MetricValue(2.5), champion, greater_is_better=False, use_ci=False).promote
    assert "below" in decide(MetricValue(1.5), champion, greater_is_better=False).reason


def test_nan_never_wins_and_always_loses():
    assert not decide(MetricValue(math.nan), MetricValue(0.1)).promote
    assert not decide(MetricValue(math.nan), None).promote
    assert decide(MetricValue(0.1), MetricValue(math.nan)).promote


def test_metric_value_rejects_half_or_inverted_intervals():
    with pytest.raises(ValueError, match="both bounds"):
        MetricValue(0.5, ci_low=0.4)
    with pytest.raises(ValueError, match=r"\[0.6, 0.4\]"):
        MetricValue(0.5, 0.6, 0.4)


def test_version_tags_put_ci_bounds_under_their_metric():
    tags = version_tags(
        {"git_commit": "abc123", "data.sft.jsonl.md5": "d41d8c"},
        {"exact_match": 0.62, "exact_match_ci_low": 0.55, "exact_match_ci_high": 0.7, "loss_ci_low": 1.0},
    )
    assert tags == {
        "git_commit": "abc123",
        "data.sft.jsonl.md5": "d41d8c",
        "metric.exact_match": "0.62",
        "metric.exact_match.ci_low": "0.55",
        "metric.exact_match.ci_high": "0.7",
        "metric.loss_ci_low": "1.0",  # no `loss` metric: kept as a metric of its own
    }


def test_serving_requirements_are_exact_pins_without_local_labels():
    reqs = serving_requirements()
    assert [r.split("==")[0] for r in reqs] == ["torch", "transformers", "tokenizers", "safetensors", "accelerate"]
    assert all("==" in r and "+" not in r for r in reqs)


def test_retries_transient_errors_only():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise MlflowException("database is locked", error_code=TEMPORARILY_UNAVAILABLE)
        return "ok"

    assert with_retries(flaky, backoff_s=0) == "ok" and len(calls) == 3

    calls.clear()

    def broken():
        calls.append(1)
        raise MlflowException("no such model", error_code=RESOURCE_DOES_NOT_EXIST)

    with pytest.raises(MlflowException, match="no such model"):
        with_retries(broken, backoff_s=0)
    assert len(calls) == 1

    calls.clear()

    def always_busy():
        calls.append(1)
        raise MlflowException("busy", error_code=TEMPORARILY_UNAVAILABLE)

    with pytest.raises(MlflowException, match="busy"):
        with_retries(always_busy, backoff_s=0)
    assert len(calls) == 3


# ---------------------------------------------------------------------------------------------------
# MLflow: a micro Llama in a throwaway tracking store

LINEAGE = {"git_commit": "0123abcd", "params_hash": "feedbeef", "data.sft.jsonl.md5": "d41d8cd98f00b204", "run.sft": "r-sft-1"}
BASE = {"exact_match": 0.40, "exact_match_ci_low": 0.33, "exact_match_ci_high": 0.47}
WORSE = {"exact_match": 0.30, "exact_match_ci_low": 0.22, "exact_match_ci_high": 0.38}
BETTER = {"exact_match": 0.62, "exact_match_ci_low": 0.55, "exact_match_ci_high": 0.70}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A sqlite tracking store and artifact folder under tmp, and a micro causal LM folder."""
    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root}/mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        experiment_id = mlflow.create_experiment("registry-tests", artifact_location=(root / "artifacts").as_uri())

        tokenizer = make_test_tokenizer()
        dims = {
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "max_position_embeddings": 64,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        }
        config = LlamaConfig(**dims)
        torch.manual_seed(0)
        model_dir = root / "policy"
        LlamaForCausalLM(config).save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        torch.manual_seed(1)  # the same architecture, other weights
        other_dir = root / "policy-other"
        LlamaForCausalLM(config).save_pretrained(other_dir)
        tokenizer.save_pretrained(other_dir)
        reward_dirs = []
        for seed in (2, 3):  # two reward models: a scalar head on the same trunk, different weights
            torch.manual_seed(seed)
            reward_dirs.append(root / f"reward-{seed}")
            LlamaForSequenceClassification(LlamaConfig(**dims, num_labels=1)).save_pretrained(reward_dirs[-1])
            tokenizer.save_pretrained(reward_dirs[-1])
        yield {"root": root, "experiment_id": experiment_id, "model_dir": model_dir, "other_dir": other_dir,
               "reward_dirs": reward_dirs}
        mlflow.set_tracking_uri(None)


def register(store, name: str, metrics: dict[str, float]):
    with mlflow.start_run(experiment_id=store["experiment_id"]) as run:
        return log_and_register(name, store["model_dir"], "text-generation", LINEAGE, metrics, run_id=run.info.run_id)


@pytest.fixture(scope="module")
def policy(store):
    """`policy`: v1 (base, champion), v2 (worse), v3 (better, CI beyond), promoted in turn."""
    name = "policy"
    decisions = {}
    for metrics in (BASE, WORSE, BETTER):
        version = register(store, name, metrics)
        decisions[int(version.version)] = (aliases(name), promote(name, version.version, "exact_match"), aliases(name))
    return name, decisions


def test_first_version_becomes_champion(policy):
    name, decisions = policy
    before, decision, after = decisions[1]
    assert before == {} and decision.promote
    assert after == {"champion": 1, "challenger": 1}


def test_worse_challenger_stays_challenger(policy):
    _, decisions = policy
    _, decision, after = decisions[2]
    assert not decision.promote
    assert "challenger exact_match 0.3 [0.22, 0.38] vs champion 0.4: kept champion" in decision.reason
    assert after == {"champion": 1, "challenger": 2}


def test_better_challenger_becomes_champion(policy):
    name, decisions = policy
    _, decision, after = decisions[3]
    assert decision.promote and "0.62 [0.55, 0.7] vs champion 0.4: promoted" in decision.reason
    assert after == {"champion": 3, "challenger": 3}
    assert aliases(name) == {"champion": 3, "challenger": 3}


def test_promoting_the_champion_again_keeps_it(policy):
    name, _ = policy
    assert promote(name, 3, "exact_match").promote
    assert aliases(name) == {"champion": 3, "challenger": 3}


def test_version_carries_lineage_and_metric_tags(policy, store):
    name, _ = policy
    version = MlflowClient().get_model_version(name, "3")
    for key, value in LINEAGE.items():
        assert version.tags[key] == value
    assert version.tags[WEIGHTS_TAG] == weights_sha256(store["model_dir"])
    assert version.tags["metric.exact_match"] == "0.62"
    assert metric_value(version, "exact_match") == MetricValue(0.62, 0.55, 0.70)
    assert version.run_id  # registered from a run


def test_missing_metric_tag_names_what_the_version_has(policy):
    name, _ = policy
    before = aliases(name)
    with pytest.raises(InstructflowError, match=r"no tag 'metric.rouge'.*metric.exact_match"):
        promote(name, 2, "rouge")
    assert aliases(name) == before  # nothing moved


def test_champion_loads_through_mlflow_and_plain_transformers(policy, store, tmp_path):
    name, _ = policy
    components = mlflow.transformers.load_model(f"models:/{name}@champion", return_type="components")
    assert components["task"] == "text-generation"
    assert components["model"].config.hidden_size == 32

    local = mlflow.artifacts.download_artifacts(f"models:/{name}@champion", dst_path=str(tmp_path))
    model = AutoModelForCausalLM.from_pretrained(f"{local}/model")
    tokenizer = AutoTokenizer.from_pretrained(f"{local}/components/tokenizer")
    ids = tokenizer("hello", return_tensors="pt").input_ids  # (1, T)
    assert model(ids).logits.shape == (1, ids.shape[1], len(tokenizer))
    requirements = (tmp_path / "requirements.txt").read_text()
    assert "torch==" in requirements and "torchvision" not in requirements


def test_describe_lists_aliased_versions_with_metrics(policy):
    name, _ = policy
    rows = describe([name, "never-registered"])
    assert [(row["version"], row["aliases"]) for row in rows] == [(3, ["challenger", "champion"])]
    assert rows[0]["metrics"] == {"exact_match": 0.62, "exact_match.ci_low": 0.55, "exact_match.ci_high": 0.70}
    assert rows[0]["git_commit"] == LINEAGE["git_commit"]


def test_registering_needs_a_run_and_a_model_folder(store, tmp_path):
    with pytest.raises(InstructflowError, match="needs an MLflow run"):
        log_and_register("policy", store["model_dir"], "text-generation", LINEAGE, BASE)
    with mlflow.start_run(experiment_id=store["experiment_id"]):
        with pytest.raises(InstructflowError, match="no config.json"):
            log_and_register("policy", tmp_path, "text-generation", LINEAGE, BASE)
        with pytest.raises(InstructflowError, match="task 'summarization'"):
            log_and_register("policy", store["model_dir"], "summarization", LINEAGE, BASE)


def test_transaction_rolls_back_aliases_and_versions(store):
    # given: a model with v1 as champion and challenger, and a second model not registered yet
    name, fresh = "txn-policy", "txn-reward"
    register(store, name, BASE)
    promote(name, 1, "exact_match")
    client = MlflowClient()
    client.set_registered_model_alias(name, "stable", "1")

    # when: a block registers and promotes a better v2, adds and removes aliases, registers a new model, then fails
    with pytest.raises(RuntimeError, match="evaluation broke"):
        with registry_transaction([name, fresh]):
            v2 = register(store, name, BETTER)
            assert promote(name, v2.version, "exact_match").promote
            client.set_registered_model_alias(name, "canary", "1")  # an added alias on a version that stays
            client.delete_registered_model_alias(name, "stable")
            register(store, fresh, BASE)
            assert aliases(name) == {"champion": 2, "challenger": 2, "canary": 1}
            raise RuntimeError("evaluation broke")

    # then: aliases are as before, v2 is gone, the new model is gone
    assert aliases(name) == {"champion": 1, "challenger": 1, "stable": 1}
    assert [int(v.version) for v in client.search_model_versions(f"name = '{name}'")] == [1]
    assert aliases(fresh) == {}
    with pytest.raises(MlflowException, match="not found|does not exist|RESOURCE_DOES_NOT_EXIST"):
        client.get_registered_model(fresh)

    # and: a block that succeeds keeps its changes
    with registry_transaction([name]):
        client.set_registered_model_alias(name, "canary", "1")
    assert aliases(name) == {"champion": 1, "challenger": 1, "stable": 1, "canary": 1}


def test_failed_rollback_raises_from_the_original_error(store):
    name = "txn-broken"
    register(store, name, BASE)
    promote(name, 1, "exact_match")
    client = MlflowClient()
    with pytest.raises(RollbackError, match="txn-broken") as caught:
        with registry_transaction([name]):
            client.delete_model_version(name, "1")  # the champion's version: cannot be restored
            raise KeyError("boom")
    assert isinstance(caught.value.__cause__, KeyError)


# ---------------------------------------------------------------------------------------------------
# Same weights, no new version


def test_weights_hash_follows_the_weight_bytes_only(tmp_path):
    # given: two folders with the same weight bytes but other by-products, and a third with one byte changed
    first, second, changed = (tmp_path / name for name in ("first", "second", "changed"))
    for folder, weights, extra in ((first, b"\x00\x01\x02", "loss\n1.0\n"), (second, b"\x00\x01\x02", "loss\n9.9\n"),
                                   (changed, b"\x00\x01\x03", "loss\n1.0\n")):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(weights)
        (folder / "history.csv").write_text(extra)
    (second / "loss.png").write_bytes(b"png")

    # then: the same weights hash the same wherever they lie and whatever lies beside them; one byte changes it
    assert weights_sha256(first) == weights_sha256(second)
    assert weights_sha256(first) != weights_sha256(changed)
    assert len(weights_sha256(first)) == 64


def test_weights_hash_needs_weight_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(InstructflowError, match=r"no weight files; expected files ending in \.safetensors"):
        weights_sha256(tmp_path)


def versions_of(name: str) -> list[int]:
    return sorted(int(v.version) for v in MlflowClient().search_model_versions(f"name = '{name}'"))


def register_once(store, name: str, folder: Path, metrics: dict[str, float] = BASE):
    with mlflow.start_run(experiment_id=store["experiment_id"]) as run:
        return register_unless_same(name, folder, "text-generation", LINEAGE, metrics, run_id=run.info.run_id)


def test_the_same_folder_twice_makes_one_version_and_changed_weights_a_new_one(store, tmp_path, caplog):
    name = "dedupe-policy"
    # given: a first registration, made champion and challenger
    first = register_once(store, name, store["model_dir"])
    promote(name, first.version.version, "exact_match")
    assert first.skipped is None and first.version.tags[WEIGHTS_TAG] == first.weights_sha256

    # when: the same weights come again, from a copy of the folder
    copy = shutil.copytree(store["model_dir"], tmp_path / "copy")
    with caplog.at_level(logging.INFO, logger="tasks.registry"):
        again = register_once(store, name, copy)

    # then: no new version; the registration names the version it matched and why
    assert versions_of(name) == [1]
    assert int(again.version.version) == 1
    assert again.skipped.startswith("weights identical to version 1 (challenger and champion), weights_sha256 ")
    assert any(name in r.getMessage() and "skipped" in r.getMessage() and "version 1" in r.getMessage()
               for r in caplog.records)

    # when: one weight of the copy changes
    model = AutoModelForCausalLM.from_pretrained(copy)
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1.0
    changed = tmp_path / "changed"
    model.save_pretrained(changed)
    AutoTokenizer.from_pretrained(copy).save_pretrained(changed)
    new = register_once(store, name, changed)

    # then: a new version, tagged with its own weights hash
    assert new.skipped is None and versions_of(name) == [1, 2]
    assert new.version.tags[WEIGHTS_TAG] == weights_sha256(changed) != first.weights_sha256


def test_the_version_replaced_is_the_challenger_or_the_champion_else_the_latest(store):
    name = "replaced-policy"
    # given: v1 champion; v2, other weights and worse, the challenger
    promote(name, register_once(store, name, store["model_dir"]).version.version, "exact_match")
    assert not promote(name, register_once(store, name, store["other_dir"], WORSE).version.version, "exact_match").promote
    assert aliases(name) == {"champion": 1, "challenger": 2}

    # when / then: the champion's weights again match the champion
    assert register_once(store, name, store["model_dir"]).skipped.startswith("weights identical to version 1 (champion)")

    # when / then: with both aliases gone (moved by hand), v2's weights match the latest version
    client = MlflowClient()
    for alias in ("champion", "challenger"):
        client.delete_registered_model_alias(name, alias)
    assert register_once(store, name, store["other_dir"]).skipped.startswith("weights identical to version 2 (latest)")
    assert versions_of(name) == [1, 2]

    # and: v1's weights are not the latest version's, so they make a new version
    assert register_once(store, name, store["model_dir"]).skipped is None
    assert versions_of(name) == [1, 2, 3]


# ---------------------------------------------------------------------------------------------------
# The register stage on a fake project: lineage tags, skipping, all-or-nothing

EVALUATION = {"exact_match": 0.40, "exact_match_ci_low": 0.33, "exact_match_ci_high": 0.47,
              "reward_accuracy": 0.70, "reward_accuracy_ci_low": 0.60, "reward_accuracy_ci_high": 0.80, "win_rate": 0.5}
LOCK = {"schema": "2.0", "stages": {"prepare": {
    "cmd": "python -m tasks.prepare",
    "deps": [{"path": "data/raw", "md5": "0a1b2c3d4e5f60718293a4b5c6d7e8f9.dir"},
             {"path": "tasks/prepare.py", "md5": "99999999999999999999999999999999"}],
    "outs": [{"path": "data/prepared", "md5": "f9e8d7c6b5a4938271605f4e3d2c1b0a.dir"}]}}}
RECORDED = ("prepare", "tokenizer", "sft", "reward", "align", "evaluate")  # pretrain: no record, as after a restore


def fake_project(root: Path, policy_dir: Path | None = None, reward_dir: Path | None = None) -> Path:
    """A committed project as `register` finds it after the decoder track: params.yaml and dvc.lock in git;
    metrics/evaluate.json, lineage records of every stage but pretrain, and the model folders beside them."""
    shutil.copy2(ROOT / "params.yaml", root / "params.yaml")
    (root / "dvc.lock").write_text(yaml.safe_dump(LOCK))
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run(git + ["add", "-A"], cwd=root, check=True)
    subprocess.run(git + ["commit", "-qm", "fake project"], cwd=root, check=True)
    (root / "metrics").mkdir()
    (root / "metrics" / "evaluate.json").write_text(json.dumps(EVALUATION))
    (root / "lineage").mkdir()
    for stage in RECORDED:
        (root / "lineage" / f"{stage}.json").write_text(json.dumps({"stage": stage, "mlflow_run_id": f"run-{stage}"}))
    for stage, folder in (("align", policy_dir), ("reward", reward_dir)):
        if folder is not None:
            shutil.copytree(folder, root / "artifacts" / stage)
    return root


def test_lineage_tags_come_from_git_params_dvc_lock_and_the_lineage_records(tmp_path, caplog):
    # given: a project whose pretrain output has no record of the run that made it
    root = fake_project(tmp_path)
    params = load_params(root / "params.yaml")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()

    with caplog.at_level(logging.WARNING, logger="instructflow"):
        tags = register_stage.lineage(params, root, ["prepare", "pretrain", "sft"])

    assert tags == {
        "git_commit": head,  # clean: the untracked outputs beside the code do not make it dirty
        "params_hash": params.digest(),
        "preset": params.preset,
        "data.data/raw.md5": "0a1b2c3d4e5f60718293a4b5c6d7e8f9.dir",  # data only: no code deps
        "data.data/prepared.md5": "f9e8d7c6b5a4938271605f4e3d2c1b0a.dir",
        "run.prepare": "run-prepare",
        "run.pretrain": "unknown",
        "run.sft": "run-sft",
    }
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "lineage/pretrain.json" in warnings[0] and "stage 'pretrain'" in warnings[0]


def test_lineage_needs_dvc_lock(tmp_path):
    root = fake_project(tmp_path)
    (root / "dvc.lock").unlink()
    with pytest.raises(InstructflowError, match=r"dvc.lock: not found; run the pipeline through DVC"):
        register_stage.lineage(load_params(root / "params.yaml"), root, ["prepare"])


@pytest.fixture(scope="module")
def stage_runs(store, tmp_path_factory):
    """The register stage's body on a fake project, five times: first; again on the same folders; with the
    reward model's weights changed and the record failing to write; with them changed; with the first
    weights back. For each: the stage's metrics, registry/register.json and each model's versions and
    aliases afterwards."""
    root = fake_project(tmp_path_factory.mktemp("project"), store["model_dir"], store["reward_dirs"][0])
    params = load_params(root / "params.yaml")
    names = (params.register.policy_name, params.register.reward_name)

    def run_stage():
        with mlflow.start_run(experiment_id=store["experiment_id"]) as active:
            run = FakeRun()
            run.run_id = active.info.run_id
            return register_stage.body(params, root, run)

    def after(metrics):
        record = json.loads((root / "registry" / "register.json").read_text())
        return {"metrics": metrics, "record": record, "registry": {n: (versions_of(n), aliases(n)) for n in names}}

    runs = {"first": after(run_stage()), "again": after(run_stage())}

    shutil.rmtree(root / "artifacts" / "reward")
    shutil.copytree(store["reward_dirs"][1], root / "artifacts" / "reward")

    def disk_full(path, data):
        raise OSError("disk full")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(register_stage, "write_json_atomic", disk_full)
        with pytest.raises(OSError, match="disk full"):
            run_stage()
    runs["failed"] = after(None)
    runs["changed"] = after(run_stage())

    shutil.rmtree(root / "artifacts" / "reward")
    shutil.copytree(store["reward_dirs"][0], root / "artifacts" / "reward")
    runs["back"] = after(run_stage())
    return {"root": root, "params": params, "names": names, "runs": runs}


def test_register_tags_each_version_with_the_project_lineage_and_its_weights(stage_runs, store):
    policy_name, reward_name = stage_runs["names"]
    root, params = stage_runs["root"], stage_runs["params"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
    client = MlflowClient()
    for name, folder in ((policy_name, store["model_dir"]), (reward_name, store["reward_dirs"][0])):
        tags = client.get_model_version(name, "1").tags
        assert tags["git_commit"] == head and tags["params_hash"] == params.digest()
        assert tags["data.data/raw.md5"] == "0a1b2c3d4e5f60718293a4b5c6d7e8f9.dir"
        assert {key: tags[f"run.{key}"] for key in ("prepare", "sft", "align", "pretrain")} == \
            {"prepare": "run-prepare", "sft": "run-sft", "align": "run-align", "pretrain": "unknown"}
        assert tags["align.algorithm"] == params.align.algorithm == "dpo"
        assert tags[WEIGHTS_TAG] == weights_sha256(folder)
    assert client.get_model_version(policy_name, "1").tags["metric.exact_match.ci_low"] == "0.33"
    assert stage_runs["runs"]["first"]["record"]["lineage"]["run.pretrain"] == "unknown"


def test_first_register_makes_a_champion_of_each_model(stage_runs):
    first = stage_runs["runs"]["first"]
    for name in stage_runs["names"]:
        assert first["registry"][name] == ([1], {"champion": 1, "challenger": 1})
        assert first["metrics"][f"{name}.version"] == 1 and first["metrics"][f"{name}.skipped"] == 0
        assert first["record"]["models"][name]["skipped"] is False
        assert first["record"]["models"][name]["skip_reason"] is None


def test_register_again_on_the_same_weights_adds_no_version_and_says_so(stage_runs):
    again = stage_runs["runs"]["again"]
    for name in stage_runs["names"]:
        assert again["registry"][name] == ([1], {"champion": 1, "challenger": 1})
        assert again["metrics"][f"{name}.skipped"] == 1 and again["metrics"][f"{name}.version"] == 1
        model = again["record"]["models"][name]
        assert model["skipped"] is True and model["version"] == 1
        assert model["skip_reason"].startswith("weights identical to version 1 (challenger and champion)")
        assert model["weights_sha256"] == stage_runs["runs"]["first"]["record"]["models"][name]["weights_sha256"]


def test_a_failed_register_leaves_the_registry_and_the_record_as_they_were(stage_runs):
    # the reward model's new version was made, then the record failed to write: it is gone again
    runs = stage_runs["runs"]
    assert runs["failed"]["registry"] == runs["again"]["registry"]
    assert runs["failed"]["record"] == runs["again"]["record"]


def test_register_with_changed_weights_adds_a_version_of_that_model_only(stage_runs):
    policy_name, reward_name = stage_runs["names"]
    changed = stage_runs["runs"]["changed"]
    versions, held = changed["registry"][reward_name]
    assert len(versions) == 2 and versions[-1] > 1
    assert held == {"champion": 1, "challenger": versions[-1]}  # the same scores: no CI beyond the champion
    assert changed["metrics"][f"{reward_name}.skipped"] == 0
    assert changed["record"]["models"][reward_name]["version"] == versions[-1]
    assert changed["metrics"][f"{policy_name}.skipped"] == 1
    assert changed["registry"][policy_name] == ([1], {"champion": 1, "challenger": 1})


def test_register_of_the_champions_weights_again_points_the_challenger_back_at_it(stage_runs):
    # given: reward v1 champion and a later challenger; the reward folder holds v1's weights again
    _, reward_name = stage_runs["names"]
    versions, _ = stage_runs["runs"]["changed"]["registry"][reward_name]
    back = stage_runs["runs"]["back"]

    # then: no new version; v1 took the challenger's place and the gate says it is the champion already
    assert back["registry"][reward_name] == (versions, {"champion": 1, "challenger": 1})
    model = back["record"]["models"][reward_name]
    assert model["skipped"] is True and model["skip_reason"].startswith("weights identical to version 1 (champion)")
    assert model["reason"] == f"{reward_name} version 1 is already the champion"


def test_a_store_whose_experiment_keeps_artifacts_in_another_checkout_is_refused(tmp_path, monkeypatch):
    from tasks.tracking import experiment_id

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    try:
        first, second = tmp_path / "clone-a", tmp_path / "clone-b"
        first.mkdir(), second.mkdir()
        made = experiment_id("shared", first)  # clone A made the experiment: artifacts in clone-a/mlartifacts
        assert experiment_id("shared", first) == made
        with pytest.raises(InstructflowError) as caught:
            experiment_id("shared", second)  # clone B, same sqlite store
        message = str(caught.value)
        assert f"keeps its artifacts in {(first / 'mlartifacts').resolve()}" in message
        assert f"outside this project ({second.resolve()})" in message and "tracking server" in message
        # an experiment on a server's artifact store is shared by design
        mlflow.create_experiment("served", artifact_location="mlflow-artifacts:/served")
        assert experiment_id("served", second)
    finally:
        mlflow.set_tracking_uri(None)

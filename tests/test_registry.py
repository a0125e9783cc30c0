"""The model registry: the promotion gate by hand, then a micro Llama logged into a throwaway MLflow."""

from __future__ import annotations

import instructflow  # noqa: F401  (offline environment first)

import math

import mlflow
import pytest
import torch
from helpers_tokenizer import make_test_tokenizer
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, TEMPORARILY_UNAVAILABLE
from mlflow.tracking import MlflowClient
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from instructflow.errors import InstructflowError
from instructflow.registry import (
    Decision,
    MetricValue,
    RollbackError,
    aliases,
    decide,
    describe,
    log_and_register,
    metric_value,
    promote,
    registry_transaction,
    serving_requirements,
    version_tags,
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
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=64,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        torch.manual_seed(0)
        model_dir = root / "policy"
        LlamaForCausalLM(config).save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        yield {"root": root, "experiment_id": experiment_id, "model_dir": model_dir}
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


def test_version_carries_lineage_and_metric_tags(policy):
    name, _ = policy
    version = MlflowClient().get_model_version(name, "3")
    for key, value in LINEAGE.items():
        assert version.tags[key] == value
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

"""reward.kwise: a ranked list's pairs as one batch element (InstructGPT sec. 3.5), from the ranking to the stage.

Pure rankings first, then a micro decoder with a one-label head (the reward stage's model, untrained), then the stage
body on hand-written prepared files and a saved micro "SFT" folder, both ways.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from functools import partial
from pathlib import Path

import pytest
import torch
from conftest import FakeRun
from helpers_tokenizer import make_test_tokenizer
from transformers import LlamaForSequenceClassification

import tasks.reward
from instructflow.config import load_params
from instructflow.ranking import RankingError, check_tiers, ranking_pairs, strict_tiers
from models.decoder import build_decoder, collate_groups, collate_pairs
from models.training import LoopSettings, train
from tasks.reward import (
    group_set,
    kwise_step,
    preference_groups,
    preference_set,
    ranked_groups,
    reward_step,
)
from tasks.runtime import seed_everything

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
pytestmark = pytest.mark.usefixtures("one_thread")


# ---- rankings -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", range(2, 10))
def test_a_strict_ranking_of_k_makes_k_choose_2_pairs_weighted_to_one(k):
    pairs = ranking_pairs(strict_tiers(k))
    assert len(pairs) == k * (k - 1) // 2
    assert len({(p.better, p.worse) for p in pairs}) == len(pairs) and all(p.better < p.worse for p in pairs)
    assert all(p.weight == 1 / len(pairs) for p in pairs) and math.isclose(sum(p.weight for p in pairs), 1.0)


def test_tied_responses_make_no_pair_and_the_weights_still_sum_to_one():
    # [[0], [2, 1], [3]]: 0 > {2, 1} > 3 -> (0,2) (0,1) (0,3) (2,3) (1,3); K = 4 would make 6 without the tie
    pairs = ranking_pairs(check_tiers([[0], [2, 1], [3]], 4))
    assert [(p.better, p.worse) for p in pairs] == [(0, 2), (0, 1), (0, 3), (2, 3), (1, 3)]
    assert [p.weight for p in pairs] == [0.2] * 5


@pytest.mark.parametrize("tiers,field,message", [
    ([[0], [1]], "", "response(s) [2] are in no tier"),
    ([[0, 2], [1, 2]], "[1][1]", "response 2 is ranked twice"),
    ([[0], [3], [1, 2]], "[1][0]", "3 is not a response index: expected an integer in 0..2"),
    ([[0, 1, 2]], "", "has one tier"),
    ([[0], [True], [1, 2]], "[1][0]", "True is not a response index"),
    ("0,1,2", "", "expected a list of tiers"),
])
def test_tiers_that_are_not_a_partition_are_refused_where_they_go_wrong(tiers, field, message):
    with pytest.raises(RankingError, match=re.escape(message)) as caught:
        check_tiers(tiers, 3)
    assert caught.value.field == field


# ---- grouping prepared rows -------------------------------------------------------------------------------------
def row(prompt: str, chosen: str, rejected: str, group: str | None = None) -> dict:
    out = {"prompt": [{"role": "user", "content": prompt}], "chosen": chosen, "rejected": rejected, "source": "s"}
    return {**out, "group": group} if group else out


# a K = 3 list (r.jsonl:1) and a K = 4 list (r.jsonl:2) shuffled apart, as prepare writes them, two plain pairs
ROWS = [row("Q1", "a", "b", "r.jsonl:1"), row("P", "good", "bad"), row("Q2", "w", "z", "r.jsonl:2"),
        row("Q1", "b", "c", "r.jsonl:1"), row("Q2", "w", "x", "r.jsonl:2"), row("Q1", "a", "c", "r.jsonl:1"),
        row("Q2", "x", "y", "r.jsonl:2"), row("Q2", "w", "y", "r.jsonl:2"), row("Q2", "x", "z", "r.jsonl:2"),
        row("Q2", "y", "z", "r.jsonl:2"), row("P", "fine", "bad")]


def test_prepared_rows_group_into_ranked_lists_each_response_once():
    groups = preference_groups(ROWS)
    assert [(g.prompt[0]["content"], g.responses, g.pairs) for g in groups] == [
        ("Q1", ["a", "b", "c"], [(0, 1), (1, 2), (0, 2)]),
        ("P", ["good", "bad"], [(0, 1)]),  # no group: a list of K = 2 each, even under one prompt
        ("Q2", ["w", "z", "x", "y"], [(0, 1), (0, 2), (2, 3), (0, 3), (2, 1), (3, 1)]),
        ("P", ["fine", "bad"], [(0, 1)])]


def test_one_id_under_two_prompts_stays_two_lists():
    groups = preference_groups([row("Q1", "a", "b", "f.jsonl:1"), row("Q9", "a", "b", "f.jsonl:1")])
    assert [g.prompt[0]["content"] for g in groups] == ["Q1", "Q9"]


def test_ranked_groups_turns_feedback_rows_into_the_rows_prepare_writes():
    rows = ranked_groups([{"prompt": [{"role": "user", "content": "Q"}], "responses": ["a", "b", "c"]},
                          {"prompt": "R", "responses": ["x", "y", "z"], "tiers": [[2], [0, 1]]}],
                         "data/feedback/day1.jsonl")
    assert [(r["chosen"], r["rejected"], r["group"]) for r in rows] == [
        ("a", "b", "day1.jsonl:1"), ("a", "c", "day1.jsonl:1"), ("b", "c", "day1.jsonl:1"),
        ("z", "x", "day1.jsonl:2"), ("z", "y", "day1.jsonl:2")]
    assert [(g.responses, g.pairs) for g in preference_groups(rows)] == [
        (["a", "b", "c"], [(0, 1), (0, 2), (1, 2)]), (["z", "x", "y"], [(0, 1), (0, 2)])]


# ---- the K-wise step on a micro reward model --------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok():
    return make_test_tokenizer()


def reward_model(tok, seed: int = 0):
    torch.manual_seed(seed)
    config = build_decoder(tok, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                           max_position_embeddings=128).config
    config.num_labels = 1
    return LlamaForSequenceClassification(config).eval()


def test_each_response_is_forwarded_once_not_once_per_pair(tok):
    elements = group_set(tok, preference_groups(ROWS), 64, "test")
    batch = collate_groups(elements, tok.pad_token_id)
    assert batch["input_ids"].shape[0] == 3 + 2 + 4 + 2  # 11 responses for 11 pairs; flattened: 22 rows
    assert batch["pairs"].tolist()[:4] == [[0, 1], [1, 2], [0, 2], [3, 4]]  # offsets into the batch
    assert batch["group_of_pair"].tolist() == [0, 0, 0, 1, 2, 2, 2, 2, 2, 2, 3]
    rows_seen = []
    model = reward_model(tok)
    forward = model.forward
    model.forward = lambda **kw: rows_seen.append(kw["input_ids"].shape[0]) or forward(**kw)
    loss, metrics, _ = kwise_step(model, batch)
    assert rows_seen == [11] and math.isfinite(float(loss.detach())) and 0 <= metrics["accuracy"] <= 1


def test_lists_of_two_give_the_flattened_loss_on_the_same_pairs(tok):
    pairs = [r for r in ROWS if "group" not in r] + [row(f"T{i}", f"yes {i}", f"no {i}") for i in range(4)]
    model = reward_model(tok)
    flat = reward_step(model, collate_pairs(preference_set(tok, pairs, 64, "test"), tok.pad_token_id))
    kwise = kwise_step(model, collate_groups(group_set(tok, preference_groups(pairs), 64, "test"), tok.pad_token_id))
    assert float(kwise[0].detach()) == pytest.approx(float(flat[0].detach()), abs=1e-5)
    assert kwise[1] == pytest.approx(flat[1], abs=1e-5) and kwise[2] == flat[2]


def test_pair_only_data_trains_the_same_either_way(tok):
    pairs = [row(f"T{i}", f"yes {i}", f"no {'x' * i}") for i in range(12)]
    settings = LoopSettings(batch_size=4, max_steps=4, lr=1e-2, bf16=False, logging_steps=1)
    flat_set, kwise_set = preference_set(tok, pairs, 64, "test"), group_set(tok, preference_groups(pairs), 64, "test")
    flat = train(reward_model(tok), flat_set, partial(collate_pairs, pad_id=tok.pad_token_id), reward_step,
                 settings, lengths=tasks.reward.pair_lengths(flat_set))
    kwise = train(reward_model(tok), kwise_set, partial(collate_groups, pad_id=tok.pad_token_id), kwise_step,
                  settings, lengths=tasks.reward.group_lengths(kwise_set))
    assert [r["loss"] for r in kwise] == pytest.approx([r["loss"] for r in flat], abs=1e-4)


def test_cut_counts_are_per_pair_as_the_flattened_path_counts_them(tok):
    long = "a much longer response " * 6
    rows = [row("Q", "ok", long, "g:1"), row("Q", "ok", "no", "g:1"), row("Q", long, "no", "g:1")]
    flat, kwise = Counter(), Counter()
    preference_set(tok, rows, 24, "test", flat)
    group_set(tok, preference_groups(rows), 24, "test", kwise)
    assert kwise == flat and flat["truncated"] == 2  # the two pairs with the long response
    assert group_set(tok, preference_groups(rows), 24, "test")[0]["pairs"] == [(0, 1), (0, 2), (1, 2)]


def test_a_kwise_train_step_changes_the_weights(tok):
    model = reward_model(tok)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    elements = group_set(tok, preference_groups(ROWS), 64, "test")
    settings = LoopSettings(batch_size=2, max_steps=2, lr=1e-2, bf16=False, logging_steps=1)
    history = train(model, elements, partial(collate_groups, pad_id=tok.pad_token_id), kwise_step, settings,
                    lengths=tasks.reward.group_lengths(elements))
    assert [r["step"] for r in history] == [1, 2] and all(math.isfinite(r["loss"]) for r in history)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert "score.weight" in changed and "model.embed_tokens.weight" in changed


def test_a_kwise_run_resumes_from_its_checkpoint_to_the_same_weights(tok, tmp_path):
    elements = group_set(tok, preference_groups(ROWS), 64, "test")
    collate = partial(collate_groups, pad_id=tok.pad_token_id)
    settings = LoopSettings(batch_size=2, max_steps=4, lr=1e-2, bf16=False, save_steps=2, logging_steps=1)
    resume = dict(checkpoint_dir=tmp_path, resume_key="k", lengths=tasks.reward.group_lengths(elements))
    whole = reward_model(tok)
    full = train(whole, elements, collate, kwise_step, settings, **resume)
    assert [p.name for p in tmp_path.iterdir()] == ["step-2"]  # what a run stopped after step 2 leaves
    resumed = reward_model(tok, seed=1)  # other weights: all it has comes from the checkpoint
    history = train(resumed, elements, collate, kwise_step, settings, **resume)
    assert [r["step"] for r in history] == [1, 2, 3, 4]  # 1 and 2 carried over from the checkpoint
    assert history[-1]["loss"] == pytest.approx(full[-1]["loss"], abs=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(whole.state_dict().values(),
                                                                 resumed.state_dict().values()))


# ---- the stage, both ways ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sft_project(tmp_path_factory, tok):
    """A project with a micro causal LM saved as artifacts/sft and hand-written preference files."""
    root = tmp_path_factory.mktemp("reward")
    torch.manual_seed(0)
    build_decoder(tok, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                  max_position_embeddings=128).save_pretrained(root / "artifacts" / "sft")
    tok.save_pretrained(root / "artifacts" / "sft")
    ranked = ranked_groups([{"prompt": f"Count to {i}", "responses": [" ".join(map(str, range(1, i + 1))),
                                                                      f"{i}", "no"]} for i in range(2, 12)], "r.jsonl")
    prepared = root / "data" / "prepared"
    prepared.mkdir(parents=True)
    for name, rows in (("preference_train", ranked + ROWS), ("preference_eval", ROWS[:4])):
        (prepared / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.mark.parametrize("kwise", [True, False])
def test_the_stage_runs_on_micro_both_ways(sft_project, kwise):
    params = load_params(PARAMS, overrides=[f"reward.kwise={str(kwise).lower()}", "reward.max_steps=3",
                                            "reward.batch_size=4", "reward.eval_steps=3"], preset="micro")
    seed_everything(params.seed)
    metrics = tasks.reward.body(params, sft_project, FakeRun())
    assert metrics["train_pairs"] == 10 * 3 + len(ROWS) and metrics["eval_pairs"] == 4
    assert metrics.get("train_groups") == (10 + 4 if kwise else None)  # 10 + 2 ranked lists, 2 plain pairs
    assert 0 <= metrics["eval_accuracy"] <= 1 and math.isfinite(metrics["eval_loss"])
    assert (sft_project / "artifacts" / "reward" / "model.safetensors").is_file()

"""align.algorithm: kto on the micro preset: the stage body trains from the unpaired rows against the SFT reference.

The project (prepare -> tokenizer -> pretrain -> sft) comes from tests/test_stage_bodies.py's fixture; each KTO run
goes into a fork of it that links the prepared data and the SFT model, so nothing here changes what the DPO tests
see.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import test_stage_bodies as bodies
from conftest import FakeRun
from test_stage_bodies import causal_lm, differing, fork, weights

import tasks.align
from instructflow.config import load_params
from instructflow.errors import InstructflowError
from models.tokenizer import IGNORE_INDEX, encode_response, load_tokenizer
from models.training import LoopSettings, planned_batches
from tasks.runtime import read_prepared, seed_everything

# bf16 autocast (on by default where the CPU has it) would make the policy's first log-probs differ from the
# fp32 reference's by rounding; in fp32 they agree to float noise, so the first loss is 1/2 to 1e-5
FP32 = ["align.algorithm=kto", "align.bf16=false"]

# test_stage_bodies' module fixture, built once for this module too: the micro project; one intra-op thread
project = bodies.project
pytestmark = pytest.mark.usefixtures("one_thread")


def run_kto(project, dest: Path, overrides: list[str]) -> SimpleNamespace:
    params = load_params(project.root / "params.yaml", overrides=overrides)
    run = FakeRun()
    seed_everything(params.seed)
    metrics = tasks.align.body(params, dest, run)
    return SimpleNamespace(root=dest, params=params, metrics=metrics, steps=dict(run.steps))


@pytest.fixture(scope="module")
def kto_run(project, tmp_path_factory):
    dest = fork(project.root, tmp_path_factory.mktemp("align-kto"), "data/prepared", "artifacts/sft")
    return run_kto(project, dest, FP32)


def test_kto_moves_the_policy_away_from_the_sft_model(project, kto_run):
    policy = weights(causal_lm(kto_run.root / "artifacts" / "align"))
    sft = weights(causal_lm(project.root / "artifacts" / "sft"))
    assert policy.keys() == sft.keys()
    assert "model.layers.0.self_attn.q_proj.weight" in differing(policy, sft)


def test_kto_reports_its_metrics(project, kto_run):
    m = kto_run.metrics
    keys = {"loss", "kl", "reward_accuracy", "eval_loss", "eval_kl", "eval_reward_accuracy", "eval_reward_margin",
            "eval_desirable_reward", "eval_undesirable_reward", "eval_desirable_above_z", "eval_undesirable_below_z",
            "train_rows", "rows_drawn", "eval_rows", "train_rows_dropped", "eval_rows_dropped"}
    assert keys <= m.keys()
    assert all(math.isfinite(m[k]) for k in keys)
    for share in ("eval_reward_accuracy", "eval_desirable_above_z", "eval_undesirable_below_z"):
        assert 0 <= m[share] <= 1
    assert m["eval_kl"] >= 0 and m["kl"] >= 0  # z is clamped at 0
    assert m["eval_reward_margin"] == pytest.approx(m["eval_desirable_reward"] - m["eval_undesirable_reward"])
    # every prepared row fits micro's max_length 96; the synthetic tasks give one desirable and one undesirable
    # completion per prompt
    train, held_out = read_prepared(project.root, "unpaired_train"), read_prepared(project.root, "unpaired_eval")
    assert (m["train_rows"], m["eval_rows"]) == (len(train), len(held_out))
    assert m["train_desirable"] == sum(r["label"] for r in train) == m["train_undesirable"]
    assert 0 < m["rows_drawn"] <= m["train_rows"]
    # the curve: every logged step, step 1 included
    assert {1, kto_run.params.align.max_steps} <= kto_run.steps.keys()


def test_kto_first_step_loss_is_one_half_against_the_precomputed_reference(kto_run):
    # the policy starts as the reference: every log-ratio is 0 and z = max(0, 0) = 0, so each row's loss is
    # 1 - sigmoid(0) = 1/2 and (weights 1 and 1) so is the mean. A missing or wrong reference value would not give it.
    first = kto_run.steps[1]
    assert first["loss"] == pytest.approx(0.5, abs=1e-5)
    assert first["kl"] == pytest.approx(0.0, abs=1e-5)
    assert first["desirable_reward"] == pytest.approx(0.0, abs=1e-5)
    assert first["undesirable_reward"] == pytest.approx(0.0, abs=1e-5)


def test_kto_weights_scale_the_first_step_loss_by_the_batch_kinds(project, tmp_path):
    # weights 2 (desirable) and 1: the first batch's loss is mean(w_i * 1/2) = (2 n_d + n_u) / (2 B)
    dest = fork(project.root, tmp_path, "data/prepared", "artifacts/sft")
    run = run_kto(project, dest, FP32 + ["align.kto.desirable_weight=2", "align.max_steps=1"])
    cfg = run.params.align
    tok = load_tokenizer(project.root / "artifacts" / "sft")
    rows = tasks.align.unpaired_set(tok, read_prepared(project.root, "unpaired_train"), cfg.max_length, "train",
                                    run.params.seed)
    settings = LoopSettings.from_config(cfg, run.params.seed)
    first = planned_batches(len(rows), cfg.batch_size, settings.seed, 0,
                            lengths=tasks.align.unpaired_lengths(rows))[0]
    n_d = sum(rows[i]["desirable"] for i in first)
    assert run.steps[1]["loss"] == pytest.approx((2 * n_d + (len(first) - n_d)) / (2 * len(first)), abs=1e-5)


def prepared_without(project, dest: Path, name: str, content: str | None) -> Path:
    """A fork whose data/prepared links every prepared file but `name`, which holds `content` (None: absent)."""
    fork(project.root, dest, "artifacts/sft")
    prepared = dest / "data" / "prepared"
    prepared.mkdir(parents=True)
    for f in (project.root / "data" / "prepared").iterdir():
        if f.name != name:
            (prepared / f.name).symlink_to(f)
    if content is not None:
        (prepared / name).write_text(content)
    return dest


@pytest.mark.parametrize("content, says", [("", "has no rows"), (None, "does not exist")])
def test_kto_without_unpaired_rows_says_which_file_and_what_it_needs(project, tmp_path, content, says):
    dest = prepared_without(project, tmp_path, "unpaired_train.jsonl", content)
    params = load_params(project.root / "params.yaml", overrides=["align.algorithm=kto"])
    with pytest.raises(InstructflowError) as error:
        tasks.align.body(params, dest, FakeRun())
    message = str(error.value)
    assert message.startswith(f"data/prepared/unpaired_train.jsonl {says}")
    for part in ("align.algorithm: kto", "`unpaired` rows", "synthetic tasks", "role: unpaired"):
        assert part in message


# --- the data KTO trains on ------------------------------------------------------------------------------


def test_kto_examples_label_only_the_completion_and_pair_each_prompt_with_another_prompts_completion(project):
    tok = load_tokenizer(project.root / "artifacts" / "sft")
    rows = read_prepared(project.root, "unpaired_eval")
    examples = tasks.align.unpaired_set(tok, rows, 96, "unpaired_eval", seed=0)
    partners = tasks.align.kl_partners([r["prompt"] for r in rows], seed=0)
    assert len(examples) == len(rows)
    for row, ex, j in zip(rows, examples, partners):
        assert ex["desirable"] is bool(row["label"])
        starts = []
        for key, completion in (("completion", row["completion"]), ("kl", rows[j]["completion"])):
            ids, labels = ex[key]["input_ids"], ex[key]["labels"]
            assert len(ids) == len(labels) <= 96
            start = next(i for i, t in enumerate(labels) if t != IGNORE_INDEX)
            # from there on, the completion and its <|eos|> (cut at max_length), then at most the template's newline
            trained = [t for t in labels if t != IGNORE_INDEX]
            assert trained == labels[start:start + len(trained)] == ids[start:start + len(trained)]
            assert trained == encode_response(tok, completion)[:len(trained)]
            starts.append(start)
        assert rows[j]["prompt"] != row["prompt"]  # mismatched: another prompt's completion
        # the KL pair keeps the row's own prompt
        assert starts[0] == starts[1]
        assert ex["kl"]["input_ids"][:starts[0]] == ex["completion"]["input_ids"][:starts[0]]


def test_kl_partners_are_seeded_and_fall_back_to_the_next_row_for_one_prompt():
    prompts = [[{"role": "user", "content": c}] for c in "aabbccdd"]
    partners = tasks.align.kl_partners(prompts, seed=3)
    assert partners == tasks.align.kl_partners(prompts, seed=3)
    assert all(prompts[j] != prompts[i] for i, j in enumerate(partners))
    same = tasks.align.kl_partners([prompts[0]] * 4, seed=3)
    assert sorted(same) == [0, 1, 2, 3] and all(j != i for i, j in enumerate(same))  # one cycle through the rows
    assert tasks.align.kl_partners([prompts[0]], seed=3) == [0]


def test_kto_drops_rows_whose_prompt_fills_max_length_and_counts_them(project):
    tok = load_tokenizer(project.root / "artifacts" / "sft")
    rows = read_prepared(project.root, "unpaired_eval")[:4]
    long = {**rows[0], "prompt": [{"role": "user", "content": "x " * 200}]}
    counts = Counter()
    examples = tasks.align.unpaired_set(tok, [long, *rows], 96, "unpaired_eval", seed=0, counts=counts)
    assert len(examples) == len(rows) and counts["dropped"] == 1
    with pytest.raises(InstructflowError, match="no unpaired row fits max_length 16"):
        tasks.align.unpaired_set(tok, rows, 16, "unpaired_eval", seed=0)


def test_feedback_rankings_give_kto_the_top_as_desirable_and_the_bottom_as_undesirable():
    from tasks.reward import ranked_groups

    # one list of 4 best first, one with the top two tied ([[1, 0], [2]]), one list of 2
    rows = ranked_groups([(1, {"prompt": "p", "responses": ["a", "b", "c", "d"]}),
                          (2, {"prompt": "q", "responses": ["x", "y", "z"], "tiers": [[1, 0], [2]]}),
                          (3, {"prompt": "r", "responses": ["u", "v"]})], "data/feedback/round_1.jsonl")
    got = [(r["completion"], r["label"]) for r in tasks.align.feedback_unpaired(rows)]
    # the middle of a list of 4 ("b", "c") gets no label; tied tops are both desirable
    assert sorted(got) == sorted([("a", True), ("d", False), ("x", True), ("y", True), ("z", False),
                                  ("u", True), ("v", False)])

"""The decoder track's stage bodies on the micro preset: sft (full and LoRA), reward, align, evaluate.

One copied micro project is prepared, tokenized, pretrained and fine-tuned once for the module; each test
runs the real stage code on it (or on a fork of it that links the upstream outputs it reads) and checks what
the stage must do, not just that it ran.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from itertools import pairwise
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import FakeRun, copy_project
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import tasks.align
import tasks.evaluate
import tasks.prepare
import tasks.pretrain
import tasks.reward
import tasks.sft
import tasks.tokenizer
from instructflow.config import load_params
from models.decoder import build_decoder
from models.stats import gains_from_metrics
from models.tokenizer import IGNORE_INDEX, chat_example, encode_chat, load_tokenizer
from tasks.runtime import read_prepared, seed_everything

LORA_LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def run_body(stage, params, root: Path) -> dict:
    """A stage body as run_stage calls it (seeded first), without MLflow."""
    seed_everything(params.seed)
    return stage.body(params, root, FakeRun())


def fork(src: Path, dest: Path, *links: str) -> Path:
    """A project folder whose upstream outputs are links to src's: a stage run in it writes only into dest."""
    for rel in ("params.yaml", *links):
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        (dest / rel).symlink_to(src / rel, target_is_directory=(src / rel).is_dir())
    return dest


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def causal_lm(path: Path):
    return AutoModelForCausalLM.from_pretrained(path).eval()


def differing(a: dict, b: dict) -> set[str]:
    return {k for k in a.keys() & b.keys() if not torch.equal(a[k], b[k])}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """prepare -> tokenizer -> pretrain -> sft (full) on the micro preset, once for the module."""
    root = copy_project(tmp_path_factory.mktemp("project"), "micro")
    params = load_params(root / "params.yaml")
    assert params.preset == "micro" and params.sft.method == "full"
    metrics = {}
    for name, stage in (("prepare", tasks.prepare), ("tokenizer", tasks.tokenizer), ("pretrain", tasks.pretrain),
                        ("sft", tasks.sft)):
        metrics[name] = run_body(stage, params, root)
    return SimpleNamespace(root=root, params=params, metrics=metrics)


@pytest.fixture(scope="module")
def reward_run(project):
    return run_body(tasks.reward, project.params, project.root)


@pytest.fixture(scope="module")
def aligned(project, tmp_path_factory):
    """align as params.yaml says (sigmoid, beta 0.1) into the project; each loss at a tiny beta into a fork."""
    root = project.root
    runs = {"params.yaml": SimpleNamespace(root=root, params=project.params,
                                           metrics=run_body(tasks.align, project.params, root))}
    for loss_type in ("sigmoid", "ipo"):
        params = load_params(root / "params.yaml", overrides=[f"align.loss_type={loss_type}", "align.beta=0.01"])
        dest = fork(root, tmp_path_factory.mktemp(f"align-{loss_type}"), "data/prepared", "artifacts/sft")
        runs[loss_type] = SimpleNamespace(root=dest, params=params, metrics=run_body(tasks.align, params, dest))
    return runs


# --- sft, full fine-tuning ------------------------------------------------------------------------


def test_full_sft_trains_every_weight_and_saves_a_loadable_model(project):
    root, metrics = project.root, project.metrics["sft"]
    pretrained = causal_lm(root / "artifacts" / "pretrain")
    sft = causal_lm(root / "artifacts" / "sft")  # the saved folder loads as a plain causal LM

    # full fine-tuning: every parameter is trainable, and every one moved away from the pretrained model
    n_params = sum(p.numel() for p in pretrained.parameters())
    assert metrics["trainable_params"] == n_params == project.metrics["pretrain"]["n_params"]
    before, after = dict(pretrained.named_parameters()), dict(sft.named_parameters())
    assert before.keys() == after.keys()
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, unchanged

    assert {"loss", "eval_loss", "eval_perplexity", "trainable_params", "train_rows", "train_rows_truncated",
            "train_rows_dropped", "eval_rows_truncated", "eval_rows_dropped"} <= metrics.keys()
    assert math.isfinite(metrics["eval_loss"]) and metrics["eval_loss"] > 0
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))
    # rows whose prompt alone fills sft.max_length are dropped (and counted); the rest are trained on, the multi-task
    # records' rows (composed under sft.multitask, sequential: one per task) among them
    assert metrics["multitask_rows"] == 3 * len((root / "data" / "prepared" / "multitask_train.jsonl").read_text()
                                                .splitlines()) > 0
    assert metrics["train_rows"] + metrics["train_rows_dropped"] == len(
        (root / "data" / "prepared" / "sft_train.jsonl").read_text().splitlines()) + metrics["multitask_rows"]
    out = root / "artifacts" / "sft"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "history.csv", "loss.png"):
        assert (out / name).is_file(), name
    assert load_tokenizer(out).get_vocab() == load_tokenizer(root / "artifacts" / "tokenizer").get_vocab()


def test_sft_eval_loss_is_the_loss_on_responses_only(project):
    """The stage's final eval_loss matches a response-only cross-entropy of the saved model, not an all-token one."""
    root = project.root
    tok = load_tokenizer(root / "artifacts" / "sft")
    model = causal_lm(root / "artifacts" / "sft")
    rows = [json.loads(line) for line in (root / "data" / "prepared" / "sft_eval.jsonl").read_text().splitlines()]
    sums = {"responses": [0.0, 0], "all": [0.0, 0]}
    with torch.no_grad():
        for row in rows:
            example = chat_example(tok, row["messages"], project.params.sft.max_length)
            if example is None:
                continue
            ids, labels = example["input_ids"], example["labels"]
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()  # (T-1, V)
            losses = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none")  # (T-1,)
            on_response = torch.tensor(labels[1:]) != IGNORE_INDEX
            sums["responses"][0] += float(losses[on_response].sum())
            sums["responses"][1] += int(on_response.sum())
            sums["all"][0] += float(losses.sum())
            sums["all"][1] += losses.numel()
    response_loss, all_loss = (total / count for total, count in sums.values())
    eval_loss = project.metrics["sft"]["eval_loss"]
    # bf16 autocast (where the CPU has it) and truncation keep these from being equal to the last digit
    assert eval_loss == pytest.approx(response_loss, abs=0.03)
    assert abs(eval_loss - response_loss) < abs(eval_loss - all_loss)


def test_chat_example_labels_exactly_the_assistant_turns_and_their_eos(project):
    tok = load_tokenizer(project.root / "artifacts" / "tokenizer")
    messages = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "It is 5."},
                {"role": "user", "content": "And 4 + 4?"}, {"role": "assistant", "content": "Eight, 8."}]

    example = chat_example(tok, messages, max_length=512)

    ids, labels = example["input_ids"], example["labels"]
    rendered = tok.apply_chat_template(messages, tokenize=False)
    assert ids == tok(rendered, add_special_tokens=False)["input_ids"]  # the same ids as the chat template
    trained = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    assert all(labels[i] == ids[i] for i in trained)
    spans, start = [], trained[0]
    for prev, cur in pairwise(trained):
        if cur != prev + 1:
            spans.append((start, prev + 1))
            start = cur
    spans.append((start, trained[-1] + 1))
    assert [tok.decode(ids[a:b]) for a, b in spans] == ["It is 5.<|eos|>", "Eight, 8.<|eos|>"]
    assert tok.decode(ids[:spans[0][0]]).endswith("<|user|>\nWhat is 2 + 3?\n<|assistant|>\n")
    assert tok.decode(ids[:spans[1][0]]).endswith("<|user|>\nAnd 4 + 4?\n<|assistant|>\n")

    # preference pairs train on the last response only
    _, last_only = encode_chat(tok, messages, train_on="last_assistant")
    assert [i for i, label in enumerate(last_only) if label != IGNORE_INDEX] == list(range(*spans[1]))
    # cut to max_length at the end: the prompt and the start of the first answer stay; a prompt that leaves no
    # room for an answer token is no example at all (dropped), never a left-cut tail without its user turn
    cut = chat_example(tok, messages, max_length=spans[0][0] + 2)
    assert cut["input_ids"] == ids[:spans[0][0] + 2] and cut["labels"] == labels[:spans[0][0] + 2]
    assert chat_example(tok, messages, max_length=spans[0][0]) is None  # the prompt alone


# --- sft, LoRA ------------------------------------------------------------------------------------


def test_lora_trains_only_adapters_and_the_merged_model_gives_the_adapter_models_logits(project):
    cfg = project.params.sft.lora
    tok = load_tokenizer(project.root / "artifacts" / "tokenizer")
    torch.manual_seed(0)
    base = build_decoder(tok, hidden_size=128, num_layers=2, num_heads=4, intermediate_size=384,
                         max_position_embeddings=128).eval()
    n_base = sum(p.numel() for p in base.parameters())
    ids = torch.randint(0, len(tok), (2, 24))
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits

    model = tasks.sft.apply_lora(base, cfg)

    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    linears = [m for n, m in base.named_modules() if n.split(".")[-1] in cfg.target_modules
               and hasattr(m, "base_layer")]
    assert len(linears) == 2 * len(LORA_LAYERS)
    expected = sum(cfg.r * (m.base_layer.in_features + m.base_layer.out_features) for m in linears)
    assert sum(p.numel() for p in trainable.values()) == expected < n_base / 4

    # LoRA B starts at zero: the adapter model is the base model until trained
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, base_logits)
        generator = torch.Generator().manual_seed(1)
        for name, p in trainable.items():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
        adapted = model(input_ids=ids).logits
    assert (adapted - base_logits).abs().max() > 1e-2  # the adapters now matter

    merged = model.merge_and_unload().eval()

    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        merged_logits = merged(input_ids=ids).logits
    assert (merged_logits - adapted).abs().max().item() < 1e-5


def test_lora_sft_saves_a_plain_merged_model_that_moved_only_the_adapted_weights(project, tmp_path):
    root = fork(project.root, tmp_path, "data/prepared", "artifacts/pretrain")
    params = load_params(root / "params.yaml", overrides=["sft.method=lora"])
    cfg = params.sft.lora

    metrics = run_body(tasks.sft, params, root)

    out = root / "artifacts" / "sft"
    assert not (out / "adapter_config.json").exists()  # merged before saving: no adapter folder
    model = causal_lm(out)
    pretrained = causal_lm(root / "artifacts" / "pretrain")
    assert type(model) is type(pretrained)
    after, before = weights(model), weights(pretrained)
    assert after.keys() == before.keys() and not any("lora" in k for k in after)
    moved = differing(after, before)
    adapted = {k for k in after if k.split(".")[-2] in cfg.target_modules}
    assert moved == adapted  # adapted linears changed; embeddings and norms are the pretrained ones
    assert metrics["trainable_params"] == sum(cfg.r * sum(before[k].shape) for k in adapted)
    assert metrics["trainable_params"] < sum(p.numel() for p in pretrained.parameters())
    assert math.isfinite(metrics["eval_loss"])


# --- reward ---------------------------------------------------------------------------------------


def test_reward_stage_trains_a_one_label_head_on_the_sft_model(project, reward_run):
    root = project.root
    reward = AutoModelForSequenceClassification.from_pretrained(root / "artifacts" / "reward").eval()
    sft = causal_lm(root / "artifacts" / "sft")
    tok = load_tokenizer(root / "artifacts" / "reward")

    assert reward.config.num_labels == 1 and reward.score.weight.shape == (1, reward.config.hidden_size)
    assert reward.config.pad_token_id == tok.pad_token_id
    shared = {k: v for k, v in weights(reward).items() if k.startswith("model.")}
    sft_weights = weights(sft)
    assert shared and shared.keys() <= sft_weights.keys()
    moved = differing(shared, sft_weights)
    assert "model.layers.0.self_attn.q_proj.weight" in moved and "model.embed_tokens.weight" in moved

    assert {"loss", "accuracy", "eval_loss", "eval_accuracy", "train_pairs", "eval_pairs", "train_pairs_truncated",
            "train_pairs_dropped", "eval_pairs_truncated", "eval_pairs_dropped"} <= reward_run.keys()
    assert 0 <= reward_run["eval_accuracy"] <= 1 and math.isfinite(reward_run["eval_loss"])
    assert reward_run["eval_pairs"] > 0 and reward_run["train_pairs"] > reward_run["eval_pairs"]

    # a score is read at the last real token: right padding in a batch does not change it
    short = [tok.bos_token_id, *tok("Hello there", add_special_tokens=False)["input_ids"], tok.eos_token_id]
    longer = short + tok(" and a much longer reply after it", add_special_tokens=False)["input_ids"]
    batch = torch.full((2, len(longer)), tok.pad_token_id)
    batch[0, :len(short)], batch[1] = torch.tensor(short), torch.tensor(longer)
    with torch.no_grad():
        alone = reward(input_ids=torch.tensor([short])).logits.squeeze(-1)
        padded = reward(input_ids=batch, attention_mask=(torch.arange(len(longer)) < torch.tensor(
            [[len(short)], [len(longer)]])).long()).logits.squeeze(-1)
    assert padded[0].item() == pytest.approx(alone.item(), abs=1e-5)


# --- align ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("run_name", ["params.yaml", "sigmoid", "ipo"])
def test_align_moves_the_policy_away_from_the_sft_model(project, aligned, run_name):
    run = aligned[run_name]
    policy = weights(causal_lm(run.root / "artifacts" / "align"))
    sft = weights(causal_lm(project.root / "artifacts" / "sft"))
    assert policy.keys() == sft.keys()
    assert "model.layers.0.self_attn.q_proj.weight" in differing(policy, sft)
    keys = {"loss", "reward_accuracy", "eval_loss", "eval_reward_accuracy", "eval_reward_margin", "train_pairs",
            "eval_pairs"}
    assert keys <= run.metrics.keys()
    assert all(math.isfinite(run.metrics[k]) for k in keys)
    assert 0 <= run.metrics["eval_reward_accuracy"] <= 1
    assert run.metrics["eval_pairs"] > 0 and run.metrics["train_pairs"] > run.metrics["eval_pairs"]


def test_ipo_and_sigmoid_losses_differ_at_a_tiny_beta(aligned):
    """At beta 0.01 and a policy still near its reference (h ~ 0): sigmoid ~ log 2, IPO ~ (1 / (2 beta))^2 = 2500."""
    sigmoid, ipo = aligned["sigmoid"], aligned["ipo"]
    assert (sigmoid.params.align.loss_type, ipo.params.align.loss_type) == ("sigmoid", "ipo")
    assert sigmoid.params.align.beta == ipo.params.align.beta == 0.01
    assert sigmoid.metrics["eval_loss"] == pytest.approx(math.log(2), abs=0.01)
    assert ipo.metrics["eval_loss"] == pytest.approx(2500, rel=0.05)
    a = weights(causal_lm(sigmoid.root / "artifacts" / "align"))
    b = weights(causal_lm(ipo.root / "artifacts" / "align"))
    assert "model.layers.0.self_attn.q_proj.weight" in differing(a, b)


# --- evaluate -------------------------------------------------------------------------------------

CI_METRICS = ("win_rate", "kl_to_reference", "reward_accuracy", "exact_match")


def evaluate_in(root: Path, params) -> dict:
    return run_body(tasks.evaluate, params, root)


def test_evaluate_writes_its_report_and_every_rate_lies_in_its_interval(project, reward_run, aligned):
    root, params = project.root, project.params
    metrics = evaluate_in(root, params)

    for key in CI_METRICS:
        assert metrics[f"{key}_ci_low"] <= metrics[key] <= metrics[f"{key}_ci_high"], key
    for key in ("win_rate", "reward_accuracy", "exact_match"):
        assert 0 <= metrics[f"{key}_ci_low"] and metrics[f"{key}_ci_high"] <= 1, key
    assert metrics["exact_match"] == metrics["policy_exact_match"]
    assert math.isfinite(metrics["policy_perplexity"]) and math.isfinite(metrics["sft_perplexity"])

    out = root / "reports"
    report = (out / "evaluation.md").read_text(encoding="utf-8")
    assert report.startswith("# Evaluation report (micro preset)")
    assert "| win_rate |" in report and "| kl_to_reference |" in report
    # the held-out multi-task records, asked the sft.multitask way (sequential: one call per task), in the report
    assert metrics["n_multitask_records"] == len(read_prepared(root, "multitask_eval")) > 0
    assert metrics["multitask_calls_per_record"] == 3 and "## Multi-task records" in report
    assert metrics["multitask_all_correct_ci_low"] <= metrics["multitask_all_correct"] <= 1
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    prompts = (root / "data" / "prepared" / "prompts_eval.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(samples) == len(prompts) > 0
    assert {"prompt", "reference", "policy_greedy", "policy_sampled", "sft_greedy"} <= samples[0].keys()
    with (out / "rewards.csv").open(newline="") as fh:
        rewards = list(csv.DictReader(fh))
    assert len(rewards) == metrics["n_judged_prompts"] == params.evaluate.reward_prompts
    policy_mean = sum(float(r["policy_reward"]) for r in rewards) / len(rewards)
    assert policy_mean == pytest.approx(metrics["policy_mean_reward"], abs=1e-4)

    # per-stage gains: each decoder stage against its baselines, on the same items, with an interval and a verdict
    gains = {g.id: g for g in gains_from_metrics(metrics)}
    scored = [r for r in read_prepared(root, "sft_eval") if r.get("answer")][: params.evaluate.max_eval_rows]
    kinds = sorted({r["task"] for r in scored})  # the kinds among the held-out synthetic tasks evaluate scores
    expected = {"sft.exact_match.all.base", *(f"sft.exact_match.{k}.base" for k in kinds),
                *(f"reward.accuracy.{subset}.{baseline}" for subset in ("synthetic", "real")
                  for baseline in ("tfidf", "length")),
                "align.win_rate.all.tie", "align.exact_match.all.sft", *(f"align.exact_match.{k}.sft" for k in kinds),
                "align.win_rate.synthetic.tie", "align.win_rate.real.tie"}
    pref_eval = [r for r in read_prepared(root, "preference_eval") if r["source"] == "synthetic"]
    pair_kinds = sorted({r["task"] for r in pref_eval[: params.evaluate.max_eval_rows]})
    expected |= {f"reward.accuracy.{k}.tfidf" for k in pair_kinds}
    assert set(gains) == expected and len(kinds) >= 2 and len(pair_kinds) >= 2
    for g in gains.values():
        assert g.gain == pytest.approx(g.model_value - g.baseline_value), g.id
        assert g.ci_low <= g.gain <= g.ci_high and metrics[f"beats.{g.id}"] == float(g.ci_low > 0), g.id
    # the base model's row is the base model's exact match; SFT's is the plain metric evaluate always reported
    sft_base = gains["sft.exact_match.all.base"]
    assert (sft_base.model_value, sft_base.baseline_value) == (metrics["sft_exact_match"], metrics["base_exact_match"])
    assert sft_base.n == metrics["n_exact_match"] == sum(gains[f"sft.exact_match.{k}.base"].n for k in kinds)
    assert gains["align.win_rate.all.tie"].model_value == metrics["win_rate"]
    assert gains["align.win_rate.all.tie"].baseline_value == 0.5
    assert gains["align.exact_match.all.sft"].model_value == metrics["exact_match"]
    assert metrics["n_exact_match"] == sum(gains[f"align.exact_match.{k}.sft"].n for k in kinds)
    # win-rate on synthetic and on real prompts apart: half the judged prompts each, the same per-prompt outcomes
    synthetic, real = gains["align.win_rate.synthetic.tie"], gains["align.win_rate.real.tie"]
    assert synthetic.n == metrics["n_judged_synthetic"] == params.evaluate.reward_prompts // 2
    assert synthetic.n + real.n == metrics["n_judged_prompts"]
    assert (synthetic.model_value * synthetic.n + real.model_value * real.n) / metrics["n_judged_prompts"] == \
        pytest.approx(metrics["win_rate"])
    assert [r["subset"] for r in rewards] == ["synthetic"] * synthetic.n + ["real"] * real.n
    # per task kind, the reward model's accuracy on the synthetic pairs adds up to its synthetic accuracy
    per_kind = [gains[f"reward.accuracy.{k}.tfidf"] for k in pair_kinds]
    assert sum(g.n for g in per_kind) == gains["reward.accuracy.synthetic.tfidf"].n
    assert sum(g.model_value * g.n for g in per_kind) == pytest.approx(
        gains["reward.accuracy.synthetic.tfidf"].model_value * gains["reward.accuracy.synthetic.tfidf"].n)
    # reward pairs split by source: synthetic and real (the demo's HH-RLHF pairs), scored separately
    for subset in ("synthetic", "real"):
        tfidf, length = gains[f"reward.accuracy.{subset}.tfidf"], gains[f"reward.accuracy.{subset}.length"]
        assert tfidf.model_value == length.model_value and tfidf.n == length.n > 0
    assert "## Per-stage gains" in report
    table = [line for line in report.splitlines() if line.startswith("| ") and line.endswith(("beats baseline |",
                                                                                            "its baseline** |"))]
    assert len(table) == len(gains)
    assert any(line.startswith("| reward | accuracy (real) |") and "| TF-IDF " in line for line in table)


@pytest.fixture(scope="module")
def self_evaluation(project, reward_run, tmp_path_factory):
    """evaluate where the aligned policy IS the SFT model (artifacts/sft copied to artifacts/align)."""
    root = fork(project.root, tmp_path_factory.mktemp("self"), "data/prepared", "artifacts/sft", "artifacts/reward",
                "artifacts/pretrain")
    shutil.copytree(project.root / "artifacts" / "sft", root / "artifacts" / "align")
    return evaluate_in(root, project.params)


def test_a_policy_that_is_the_sft_model_has_no_kl_to_it(self_evaluation):
    metrics = self_evaluation
    assert abs(metrics["kl_to_reference"]) < 1e-3
    assert metrics["kl_to_reference_ci_low"] <= metrics["kl_to_reference"] <= metrics["kl_to_reference_ci_high"]
    assert metrics["policy_perplexity"] == pytest.approx(metrics["sft_perplexity"])
    assert metrics["policy_exact_match"] == metrics["sft_exact_match"]


def test_a_policy_that_is_the_sft_model_wins_half(self_evaluation):
    # every prompt ties (the same model, the same samples, the same rewards): ties count half
    assert self_evaluation["win_rate"] == 0.5


def test_a_policy_that_is_the_sft_model_does_not_beat_it(self_evaluation):
    # align gained nothing: both of its gains are exactly 0 with a point interval, and it is flagged
    gains = {g.id: g for g in gains_from_metrics(self_evaluation)}
    for gid in ("align.win_rate.all.tie", "align.exact_match.all.sft"):
        assert (gains[gid].gain, gains[gid].ci_low, gains[gid].ci_high) == (0.0, 0.0, 0.0), gid
        assert self_evaluation[f"beats.{gid}"] == 0.0


# ------------------------------------------------------------------------------------------ the feedback loop
def loop_params(params, **sections):
    """params with the loop on and the given sections updated ({'generate': {'samples': 3}, ...})."""
    update = {"loop": params.loop.model_copy(update={"enabled": True, **sections.pop("loop", {})})}
    for name, values in sections.items():
        update[name] = getattr(params, name).model_copy(update=values)
    return params.model_copy(update=update)


def test_generate_stage_samples_k_responses_to_each_prompt_of_its_round(project, tmp_path):
    import tasks.generate

    root = fork(project.root, tmp_path, "data/prepared", "artifacts/sft")
    params = loop_params(project.params, loop={"round": 1}, generate={"model": "sft", "samples": 3, "n_prompts": 5,
                                                                        "max_new_tokens": 8})
    metrics = run_body(tasks.generate, params, root)
    path = root / "data" / "generated" / "samples.jsonl"
    first = path.read_bytes()
    rows = [json.loads(line) for line in first.decode().splitlines()]
    assert len(rows) == 15 and metrics["rows"] == 15 and metrics["prompts"] == 5
    assert sorted((r["prompt_index"], r["sample"]) for r in rows) == [(p, s) for p in range(5) for s in range(3)]
    assert all(r["round"] == 1 and r["source"] == "synthetic" and r["answer"] and r["task"] for r in rows)
    assert all(r["model_version"].startswith("artifacts/sft@") and r["sampling"]["temperature"] == 1.0 for r in rows)
    train_prompts = {json.dumps(r["messages"][:-1]) for r in read_prepared(root, "sft_train")}
    assert {json.dumps(r["prompt"]) for r in rows} <= train_prompts  # never a held-out prompt
    run_body(tasks.generate, params, root)
    assert path.read_bytes() == first  # the same inputs write the same bytes (DVC spares rank)
    round_two = loop_params(params, loop={"round": 2})
    run_body(tasks.generate, round_two, root)
    second = {json.dumps(json.loads(line)["prompt"]) for line in path.read_text().splitlines()}
    assert not second & {json.dumps(r["prompt"]) for r in rows}  # a later round asks other prompts


def test_rank_stage_orders_by_the_reward_models_scores(project, reward_run, tmp_path):
    import tasks.generate
    import tasks.rank

    root = fork(project.root, tmp_path, "data/prepared", "artifacts/sft", "artifacts/reward")
    params = loop_params(project.params, loop={"round": 1},
                         generate={"model": "sft", "samples": 4, "n_prompts": 4, "max_new_tokens": 8},
                         rank={"method": "reward_model", "reward_model": "reward"})
    run_body(tasks.generate, params, root)
    metrics = run_body(tasks.rank, params, root)
    rows = [json.loads(line) for line in (root / "data" / "ranked" / "ranked.jsonl").read_text().splitlines()]
    assert rows and metrics["groups"] == len(rows)
    for row in rows:
        assert row["ranked_by"].startswith("reward_model:artifacts/reward@")
        samples = [json.loads(line) for line in (root / "data" / "generated" / "samples.jsonl").read_text().splitlines()
                   if json.loads(line)["prompt_index"] == row["prompt_index"]]
        score_of = dict(zip((s["response"] for s in samples), row["scores"]))
        best_first = [score_of[text] for text in row["responses"]]
        assert best_first == sorted(best_first, reverse=True)  # highest score first

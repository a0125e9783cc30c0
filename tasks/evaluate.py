"""Stage `evaluate`: the aligned policy against its SFT reference, under the reward model.

Held-out perplexity; exact match on held-out synthetic tasks; greedy and sampled generations (KV cache) for
real prompts; reward-model pairwise accuracy; the policy's mean reward and win-rate against the SFT model;
the KL to the reference. Every rate carries a bootstrap confidence interval. Writes DVC metrics, a plot
and a markdown report.

Per-stage gains (`gain.*` / `beats.*` metrics, the report's "Per-stage gains" table): each decoder stage
against its simple baseline on the same items, with a paired bootstrap interval of the difference:
- sft: exact match of the SFT model against the base model (artifacts/pretrain), overall and per task kind;
- reward: pairwise accuracy of the reward model against a TF-IDF pairwise model trained on the same training
  pairs and against "the longer response wins", on synthetic and on real held-out pairs separately;
- align: the policy's win-rate against a tie with SFT (0.5), overall and on synthetic and real prompts apart, and
  its exact match against SFT's.

Multi-task records (`multitask_*` metrics, tasks/multitask_eval.py): per-task exact match and all-N-correct, model
calls and generated tokens per record, under the strategy `sft.multitask` trained.
"""

from __future__ import annotations

import csv
import logging
from functools import partial
from pathlib import Path

import torch

from instructflow.config import Params
from instructflow.io import write_jsonl
from instructflow.synthetic import KINDS, exact_match
from models.classification import length_baseline, tfidf_pairwise_baseline
from models.decoder import Judge, collate_lm, collate_pairs, fit_prompt, lm_eval_loss, pad_inputs, reward_scores
from models.generate import generate, generate_batched, sequence_logprobs_of
from models.stats import Gain, baseline_flags, bootstrap_ci, gain_metrics, gain_table, paired_gain, win_rate
from models.tokenizer import chat_example, encode_chat, encode_prompt, load_tokenizer, preference_example
from models.training import for_inference, perplexity
from tasks.multitask_eval import evaluate_multitask
from tasks.reward import preference_set, rewards
from tasks.runtime import read_prepared, run_stage, stage_output
from tasks.tracking import StageRun

log = logging.getLogger("instructflow")


@torch.no_grad()
def pair_outcomes(reward_model, pairs: list[dict], pad_id: int, batch_size: int) -> list[float]:
    """Per preference pair: 1.0 where the reward model scores the chosen response above the rejected one, else 0.0."""
    correct = []
    for i in range(0, len(pairs), batch_size):
        chosen, rejected = rewards(reward_model, collate_pairs(pairs[i:i + batch_size], pad_id))  # (b,), (b,)
        correct += (chosen > rejected).float().tolist()
    return correct


def pair_texts(row: dict) -> tuple[str, str]:
    """(prompt + chosen, prompt + rejected) as plain text, for the TF-IDF pairwise baseline."""
    prompt = "\n".join(m["content"] for m in row["prompt"])
    return f"{prompt}\n{row['chosen']}", f"{prompt}\n{row['rejected']}"


def pair_subset(row: dict) -> str:
    """A preference row's subset in the gain table: `synthetic` tasks, or `real` (any real data set)."""
    return "synthetic" if row.get("source") == "synthetic" else "real"


def reward_gains(reward_model, tok, train_rows: list[dict], eval_rows: list[dict], params: Params,
                 gain) -> list[Gain]:
    """The reward model's pairwise accuracy against the TF-IDF pairwise and the length baselines, per subset.

    The pairs are those the reward stage can score (within reward.max_length), the TF-IDF model trained on the
    same training pairs as the reward model; each subset's first evaluate.max_eval_rows held-out pairs.
    """
    cfg = params.evaluate
    fits = partial(preference_example, tok, max_length=params.reward.max_length)
    train = [r for r in train_rows if fits(r) is not None]
    gains = []
    for subset in ("synthetic", "real"):
        rows = [(r, ex) for r in eval_rows if pair_subset(r) == subset and (ex := fits(r)) is not None]
        rows = rows[: cfg.max_eval_rows]
        if not rows or not train:
            log.warning("evaluate: no %s held-out preference pairs (or no training pairs): no reward gain for them",
                        subset)
            continue
        model = pair_outcomes(reward_model, [ex for _, ex in rows], tok.pad_token_id, cfg.batch_size)
        tfidf = tfidf_pairwise_baseline([pair_texts(r) for r in train], [pair_texts(r) for r, _ in rows],
                                        seed=params.seed)
        length = length_baseline([(r["chosen"], r["rejected"]) for r, _ in rows])
        gains += [gain("reward", "accuracy", "tfidf", model, tfidf, subset=subset),
                  gain("reward", "accuracy", "length", model, length, subset=subset)]
        if subset == "synthetic":  # per task kind: which slips the reward model catches (TF-IDF on the same pairs)
            gains += kind_gains([r.get("task") for r, _ in rows], model, tfidf, partial(gain, "reward", "accuracy",
                                                                                        "tfidf"))
    return gains


def judged_prompts(real: list[dict], preference_eval: list[dict], n: int) -> list[tuple[list[dict], str]]:
    """Up to n (prompt messages, subset) the reward model judges: held-out synthetic task prompts, and real prompts
    (the real eval prompts, then the real preference prompts); half each, a short subset's room going to the other.
    """
    pools = {"synthetic": [r["prompt"] for r in preference_eval if pair_subset(r) == "synthetic"],
             "real": [r["messages"] for r in real] + [r["prompt"] for r in preference_eval
                                                      if pair_subset(r) == "real"]}
    take = {"synthetic": min(len(pools["synthetic"]), n // 2)}
    take["real"] = min(len(pools["real"]), n - take["synthetic"])
    take["synthetic"] = min(len(pools["synthetic"]), n - take["real"])
    return [(m, subset) for subset in ("synthetic", "real") for m in pools[subset][: take[subset]]]


def exact_match_gains(tasks: list[dict], hits: dict[str, list[float]], gain) -> list[Gain]:
    """SFT against the base model and the policy against SFT, each overall and per task kind."""
    kinds = [r.get("task") for r in tasks]
    gains = [gain("sft", "exact_match", "base", hits["sft"], hits["base"])]
    gains += kind_gains(kinds, hits["sft"], hits["base"], partial(gain, "sft", "exact_match", "base"))
    gains += [gain("align", "exact_match", "sft", hits["policy"], hits["sft"])]
    return gains + kind_gains(kinds, hits["policy"], hits["sft"], partial(gain, "align", "exact_match", "sft"))


def kind_gains(kinds: list[str | None], model: list[float], baseline: list[float], gain) -> list[Gain]:
    """One gain per task kind present (the synthetic kinds in their order, then any other, sorted): the items of
    that kind only. `gain(model, baseline, subset=kind)` is the stage's gain with its names bound."""
    present = set(kinds)
    order = [k for k in KINDS if k in present] + sorted(k for k in present - set(KINDS) if k)
    return [gain([model[i] for i in idx], [baseline[i] for i in idx], subset=kind)
            for kind in order for idx in [[i for i, k in enumerate(kinds) if k == kind]]]


def ci(values: list[float], cfg, seed: int) -> dict[str, float]:
    est, low, high = bootstrap_ci(values, cfg.bootstrap_resamples, cfg.confidence, seed)
    return {"value": est, "ci_low": low, "ci_high": high}


def body(params: Params, root: Path, run: StageRun) -> dict:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cfg = params.evaluate
    art = root / "artifacts"
    tok = load_tokenizer(art / "align")
    # every model on the device train() would pick; each pass below moves its batches to its model
    policy = for_inference(AutoModelForCausalLM.from_pretrained(art / "align"))
    reference = for_inference(AutoModelForCausalLM.from_pretrained(art / "sft"))
    reward_model = for_inference(AutoModelForSequenceClassification.from_pretrained(art / "reward"))
    max_pos = policy.config.max_position_embeddings
    prompt_limit = max_pos - cfg.max_new_tokens
    limits = {"max_new_tokens": cfg.max_new_tokens, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    gen = partial(generate, **limits)
    gen_all = partial(generate_batched, batch_size=cfg.batch_size, **limits)
    decode = partial(tok.decode, skip_special_tokens=True)
    results: dict[str, dict[str, float]] = {}
    flat: dict[str, float] = {}

    # 1. perplexity of the responses of held-out conversations
    sft_eval = read_prepared(root, "sft_eval")[: cfg.max_eval_rows]
    examples = [e for e in (chat_example(tok, r["messages"], max_pos) for r in sft_eval) if e]
    batches = [collate_lm(examples[i:i + cfg.batch_size], tok.pad_token_id)
               for i in range(0, len(examples), cfg.batch_size)]
    for name, model in (("policy", policy), ("sft", reference)):
        flat[f"{name}_perplexity"] = perplexity(lm_eval_loss(model, batches))

    # 2. exact match on held-out synthetic tasks, greedy
    tasks = [r for r in read_prepared(root, "sft_eval") if r.get("answer")][: cfg.max_eval_rows]
    prompts = [fit_prompt(encode_prompt(tok, r["messages"][:-1]), prompt_limit) for r in tasks]
    answers, hits = {}, {}
    # the base model (pretrain, before SFT) answers the same prompts: the baseline SFT must beat
    base = for_inference(AutoModelForCausalLM.from_pretrained(art / "pretrain"))
    for name, model in (("policy", policy), ("sft", reference), ("base", base)):
        answers[name] = [decode(o).strip() for o in gen_all(model, prompts)]
        hits[name] = [float(exact_match(a, r["answer"])) for a, r in zip(answers[name], tasks)]
        results[f"{name}_exact_match"] = ci(hits[name], cfg, params.seed)
    del base
    results["exact_match"] = results["policy_exact_match"]
    gain = partial(paired_gain, n_resamples=cfg.bootstrap_resamples, confidence=cfg.confidence, seed=params.seed)
    gains = exact_match_gains(tasks, hits, gain) if tasks else []

    # 3. reward model: pairwise accuracy on held-out preference pairs
    pairs = preference_set(tok, read_prepared(root, "preference_eval")[: cfg.max_eval_rows],
                           params.reward.max_length, "preference_eval")
    results["reward_accuracy"] = ci(pair_outcomes(reward_model, pairs, tok.pad_token_id, cfg.batch_size),
                                    cfg, params.seed)
    gains += reward_gains(reward_model, tok, read_prepared(root, "preference_train"),
                          read_prepared(root, "preference_eval"), params, gain)

    # 4. sampled responses of the policy and of SFT, judged by the reward model, on two subsets of prompts:
    # `synthetic` (held-out task prompts, where the reward model knows right from wrong) and `real` (the real
    # prompts, then the real preference prompts), reward_prompts in all, half each where both exist
    real = read_prepared(root, "prompts_eval")
    judged = judged_prompts(real, read_prepared(root, "preference_eval"), cfg.reward_prompts)
    prompts_judged = [m for m, _ in judged]
    judged_ids = [fit_prompt(encode_prompt(tok, m), prompt_limit) for m in prompts_judged]
    repeated = [ids for ids in judged_ids for _ in range(cfg.n_samples)]  # each prompt n_samples times
    sampling = {"temperature": cfg.temperature, "top_k": cfg.top_k, "top_p": cfg.top_p}
    sample = partial(gen, **sampling)
    judge = Judge(reward_model, tok, params.reward.max_length, cfg.batch_size)
    mean_reward = {}
    for name, model in (("policy", policy), ("sft", reference)):
        # the same random numbers for both models (common random numbers): a policy equal to its reference draws
        # the same samples and ties, so the win-rate measures the models, not the sampling noise
        texts = [decode(o) for o in gen_all(model, repeated, seed=params.seed, **sampling)]
        scores = judge([m for m in prompts_judged for _ in range(cfg.n_samples)], texts)
        per_prompt = [sum(scores[j:j + cfg.n_samples]) / cfg.n_samples for j in range(0, len(scores), cfg.n_samples)]
        mean_reward[name] = per_prompt
        results[f"{name}_mean_reward"] = ci(per_prompt, cfg, params.seed)
    wins = win_rate(mean_reward["policy"], mean_reward["sft"])
    results["win_rate"] = ci(wins, cfg, params.seed)
    gains.append(gain("align", "win_rate", "tie", wins, [0.5] * len(wins)))
    for subset in ("synthetic", "real"):
        part = [w for w, (_, s) in zip(wins, judged) if s == subset]
        if part and len(part) < len(wins):
            results[f"win_rate_{subset}"] = ci(part, cfg, params.seed)
            gains.append(gain("align", "win_rate", "tie", part, [0.5] * len(part), subset=subset))

    # 5. KL(policy || reference), Monte Carlo: E_{y ~ pi}[log pi(y|x) - log ref(y|x)]. The expectation is over
    # the policy's own distribution, so these samples are drawn at temperature 1 with no top-k / top-p cut.
    pure = gen_all(policy, repeated, seed=params.seed + 104729, temperature=1.0)
    lp_policy = sequence_logprobs_of(policy, repeated, pure, cfg.batch_size)
    lp_ref = sequence_logprobs_of(reference, repeated, pure, cfg.batch_size)
    results["kl_to_reference"] = ci([a - b for a, b in zip(lp_policy, lp_ref)], cfg, params.seed)

    samples = []
    for row in real:
        ids = fit_prompt(encode_prompt(tok, row["messages"]), prompt_limit)
        greedy = {name: decode(gen(model, [ids])[0]) for name, model in (("policy", policy), ("sft", reference))}
        drawn = decode(sample(policy, [ids], seed=params.seed)[0])
        samples.append({"prompt": row["messages"][-1]["content"], "reference": row.get("reference", ""),
                        "policy_greedy": greedy["policy"], "policy_sampled": drawn, "sft_greedy": greedy["sft"]})

    for key, value in results.items():
        flat[key] = value["value"]
        flat[f"{key}_ci_low"] = value["ci_low"]
        flat[f"{key}_ci_high"] = value["ci_high"]
    flat.update(n_exact_match=len(tasks), n_reward_pairs=len(pairs), n_judged_prompts=len(judged),
                n_judged_synthetic=sum(s == "synthetic" for _, s in judged))
    # 6. held-out multi-task records (if prepare wrote any), asked the sft.multitask way (tasks/multitask_eval.py)
    multitask_metrics, multitask_report = evaluate_multitask(policy, tok, params, root)
    flat.update(multitask_metrics)
    order = {"sft": 0, "reward": 1, "align": 2}  # pipeline order in the table
    gains = sorted(gains, key=lambda g: order.get(g.stage, len(order)))
    flat.update(gain_metrics(gains))
    report = render_report(params, results, flat, samples, tasks, answers, gains)
    report += "\n".join(multitask_report) + "\n" * bool(multitask_report)

    with stage_output(root, "evaluate", run) as out:
        (out / "evaluation.md").write_text(report, encoding="utf-8")
        write_jsonl(out / "samples.jsonl", samples)
        with (out / "rewards.csv").open("w", newline="") as fh:  # per-prompt mean rewards: a DVC scatter plot
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(["prompt", "subset", "policy_reward", "sft_reward"])
            for i, (a, b, (_, subset)) in enumerate(zip(mean_reward["policy"], mean_reward["sft"], judged)):
                writer.writerow([i, subset, round(a, 5), round(b, 5)])
        for name in ("evaluation.md", "samples.jsonl", "rewards.csv"):
            run.log_artifact(out / name, "report")
    return flat


def render_report(params: Params, results: dict, flat: dict, samples: list[dict], tasks: list[dict],
                  answers: dict[str, list[str]], gains: list[Gain] = ()) -> str:
    conf = int(params.evaluate.confidence * 100)
    lines = [f"# Evaluation report ({params.preset} preset)", "",
             f"Aligned policy (`{params.align.algorithm}`, {params.align.loss_type} loss, beta {params.align.beta}) "
             f"against its SFT reference. Intervals: {conf}% percentile bootstrap.", "",
             "| metric | value | CI |", "| --- | --- | --- |"]
    for key, value in results.items():
        if key == "exact_match":
            continue
        lines.append(f"| {key} | {value['value']:.4f} | [{value['ci_low']:.4f}, {value['ci_high']:.4f}] |")
    lines += [f"| policy_perplexity | {flat['policy_perplexity']:.3f} | |",
              f"| sft_perplexity | {flat['sft_perplexity']:.3f} | |", "",
              f"Exact match over {len(tasks)} held-out synthetic tasks; reward accuracy over "
              f"{flat['n_reward_pairs']} held-out pairs; rewards and win-rate over {flat['n_judged_prompts']} prompts "
              f"({flat['n_judged_synthetic']} held-out synthetic task prompts, the rest real) x "
              f"{params.evaluate.n_samples} samples.", ""]
    lines += render_gains(gains, params.evaluate.confidence)
    lines += ["## Synthetic tasks (first 5)", ""]
    for row, pol, ref, base in list(zip(tasks, answers["policy"], answers["sft"], answers.get("base", ())))[:5]:
        lines.append(f"- `{row['messages'][-2]['content'][:80]}` expected `{row['answer']}`; "
                     f"policy `{pol[:60]}`; sft `{ref[:60]}`; base `{base[:60]}`")
    lines += ["", "## Real prompts", ""]
    for s in samples:
        lines += [f"**Prompt:** {s['prompt'][:300]}", "",
                  f"- policy, greedy: {s['policy_greedy'][:300]!r}",
                  f"- policy, sampled (T={params.evaluate.temperature}, top-k {params.evaluate.top_k}, "
                  f"top-p {params.evaluate.top_p}): {s['policy_sampled'][:300]!r}",
                  f"- SFT, greedy: {s['sft_greedy'][:300]!r}", ""]
    return "\n".join(lines) + "\n"


def render_gains(gains: list[Gain], confidence: float) -> list[str]:
    """The report's "Per-stage gains" section: the table, then the stages that do not beat their baseline."""
    lines = ["## Per-stage gains", "",
             "Each stage against its simple baseline on the same held-out items: gain = model - baseline, with a "
             f"{confidence:.0%} paired bootstrap interval; a stage beats its baseline when the whole interval lies "
             "above 0. sft: the SFT model against the base model (pretrain) it started from. reward: the reward model "
             "against a TF-IDF pairwise logistic regression trained on the same pairs, and against \"the longer "
             "response wins\" (ties half). align: the policy's win-rate against a tie with SFT (0.5), overall and on "
             "synthetic and real prompts apart (the reward model is a fair judge only where it beats its baselines), "
             "its exact match against SFT's. The encoder track's gains are in metrics/classify.json (and the CLI summary).", ""]
    if not gains:
        return lines + ["No gains could be measured (no held-out synthetic tasks or preference pairs).", ""]
    lines += gain_table(gains, confidence)
    flags = baseline_flags(gains)
    return lines + [""] + ([f"- **{line}**" for line in flags] if flags else ["Every stage beats its baselines."]) + [""]


def main() -> None:
    run_stage("evaluate", body)


if __name__ == "__main__":
    main()

"""Stage `evaluate`: the aligned policy against its SFT reference, under the reward model.

Held-out perplexity; exact match on held-out synthetic tasks; greedy and sampled generations (KV cache) for
real prompts; reward-model pairwise accuracy; the policy's mean reward and win-rate against the SFT model;
the KL to the reference. Every rate carries a bootstrap confidence interval. Writes DVC metrics, a plot
and a markdown report.
"""

from __future__ import annotations

import csv
import logging
from functools import partial
from pathlib import Path

import torch

import instructflow  # noqa: F401
from instructflow.config import Params
from instructflow.data import write_jsonl
from instructflow.stage import atomic_dir, read_prepared, run_stage, write_run_info
from instructflow.synthetic import exact_match
from instructflow.tracking import StageRun
from models.decoder import collate_lm, collate_pairs, lm_eval_loss, pad_batch
from models.generate import generate, sequence_logprobs_of
from models.stats import bootstrap_ci, win_rate
from models.tokenizer import chat_example, encode_chat, encode_prompt, load_tokenizer
from models.training import perplexity
from tasks.reward import preference_set

log = logging.getLogger("instructflow")


def fit_prompt(ids: list[int], limit: int) -> list[int]:
    """Keep <|bos|> and the last tokens of a prompt so prompt + answer fit the model's positions."""
    return ids if len(ids) <= limit else ids[:1] + ids[len(ids) - limit + 1:]


class Judge:
    """Scores (prompt, response) pairs with the reward model."""

    def __init__(self, model, tok, max_length: int, batch_size: int):
        self.model, self.tok, self.max_length, self.batch_size = model, tok, max_length, batch_size

    @torch.no_grad()
    def __call__(self, prompts: list[list[dict]], responses: list[str]) -> list[float]:
        rows = []
        for messages, response in zip(prompts, responses):
            ids, _ = encode_chat(self.tok, [*messages, {"role": "assistant", "content": response}])
            rows.append(fit_prompt(ids, self.max_length))
        scores = []
        for i in range(0, len(rows), self.batch_size):
            chunk = rows[i:i + self.batch_size]
            ids = pad_batch(chunk, self.tok.pad_token_id)  # (b, T)
            mask = pad_batch([[1] * len(r) for r in chunk], 0)  # (b, T)
            scores += self.model(input_ids=ids, attention_mask=mask).logits.squeeze(-1).float().tolist()
        return scores


def ci(values: list[float], cfg, seed: int) -> dict[str, float]:
    est, low, high = bootstrap_ci(values, cfg.bootstrap_resamples, cfg.confidence, seed)
    return {"value": est, "ci_low": low, "ci_high": high}


def body(params: Params, root: Path, run: StageRun) -> dict:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cfg = params.evaluate
    art = root / "artifacts"
    tok = load_tokenizer(art / "align")
    policy = AutoModelForCausalLM.from_pretrained(art / "align").eval()
    reference = AutoModelForCausalLM.from_pretrained(art / "sft").eval()
    reward_model = AutoModelForSequenceClassification.from_pretrained(art / "reward").eval()
    max_pos = policy.config.max_position_embeddings
    prompt_limit = max_pos - cfg.max_new_tokens
    gen = partial(generate, max_new_tokens=cfg.max_new_tokens, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id)
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
    answers = {}
    for name, model in (("policy", policy), ("sft", reference)):
        outs = []
        for i in range(0, len(prompts), cfg.batch_size):
            outs += gen(model, prompts[i:i + cfg.batch_size])
        answers[name] = [decode(o).strip() for o in outs]
        hits = [float(exact_match(a, r["answer"])) for a, r in zip(answers[name], tasks)]
        results[f"{name}_exact_match"] = ci(hits, cfg, params.seed)
    results["exact_match"] = results["policy_exact_match"]

    # 3. reward model: pairwise accuracy on held-out preference pairs
    pairs = preference_set(tok, read_prepared(root, "preference_eval")[: cfg.max_eval_rows],
                           params.reward.max_length, "preference_eval")
    correct = []
    with torch.no_grad():
        for i in range(0, len(pairs), cfg.batch_size):
            batch = collate_pairs(pairs[i:i + cfg.batch_size], tok.pad_token_id)
            scores = reward_model(input_ids=batch["input_ids"],
                                  attention_mask=batch["attention_mask"]).logits.squeeze(-1).float()
            chosen, rejected = scores.chunk(2)
            correct += (chosen > rejected).float().tolist()
    results["reward_accuracy"] = ci(correct, cfg, params.seed)

    # 4. real prompts: greedy and sampled generations, and sampled responses scored by the reward model
    real = read_prepared(root, "prompts_eval")
    pref_prompts = [r["prompt"] for r in read_prepared(root, "preference_eval")]
    judged = ([r["messages"] for r in real] + pref_prompts)[: cfg.reward_prompts]
    judged_ids = [fit_prompt(encode_prompt(tok, m), prompt_limit) for m in judged]
    repeated = [ids for ids in judged_ids for _ in range(cfg.n_samples)]  # each prompt n_samples times
    sample = partial(gen, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)
    judge = Judge(reward_model, tok, params.reward.max_length, cfg.batch_size)
    sampled, mean_reward = {}, {}
    for k, (name, model) in enumerate((("policy", policy), ("sft", reference))):
        outs = []
        for i in range(0, len(repeated), cfg.batch_size):
            outs += sample(model, repeated[i:i + cfg.batch_size], seed=params.seed + 7919 * k + i)
        sampled[name] = outs
        texts = [decode(o) for o in outs]
        scores = judge([m for m in judged for _ in range(cfg.n_samples)], texts)
        per_prompt = [sum(scores[j:j + cfg.n_samples]) / cfg.n_samples for j in range(0, len(scores), cfg.n_samples)]
        mean_reward[name] = per_prompt
        results[f"{name}_mean_reward"] = ci(per_prompt, cfg, params.seed)
    results["win_rate"] = ci(win_rate(mean_reward["policy"], mean_reward["sft"]), cfg, params.seed)

    # 5. KL(policy || reference), Monte Carlo: E_{y ~ pi}[log pi(y|x) - log ref(y|x)]. The expectation is over
    # the policy's own distribution, so these samples are drawn at temperature 1 with no top-k / top-p cut.
    pure = []
    for i in range(0, len(repeated), cfg.batch_size):
        pure += gen(policy, repeated[i:i + cfg.batch_size], temperature=1.0, seed=params.seed + 104729 + i)
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
    flat.update(n_exact_match=len(tasks), n_reward_pairs=len(pairs), n_judged_prompts=len(judged))
    report = render_report(params, results, flat, samples, tasks, answers)

    with atomic_dir(root / "reports") as out:
        (out / "evaluation.md").write_text(report, encoding="utf-8")
        write_jsonl(out / "samples.jsonl", samples)
        with (out / "rewards.csv").open("w", newline="") as fh:  # per-prompt mean rewards: a DVC scatter plot
            writer = csv.writer(fh)
            writer.writerow(["prompt", "policy_reward", "sft_reward"])
            for i, (a, b) in enumerate(zip(mean_reward["policy"], mean_reward["sft"])):
                writer.writerow([i, round(a, 5), round(b, 5)])
        write_run_info(out, "evaluate", run, params)
        for name in ("evaluation.md", "samples.jsonl", "rewards.csv"):
            run.log_artifact(out / name, "report")
    return flat


def render_report(params: Params, results: dict, flat: dict, samples: list[dict], tasks: list[dict],
                  answers: dict[str, list[str]]) -> str:
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
              f"x {params.evaluate.n_samples} samples.", "", "## Synthetic tasks (first 5)", ""]
    for row, pol, ref in list(zip(tasks, answers["policy"], answers["sft"]))[:5]:
        lines.append(f"- `{row['messages'][-2]['content'][:80]}` expected `{row['answer']}`; "
                     f"policy `{pol[:60]}`; sft `{ref[:60]}`")
    lines += ["", "## Real prompts", ""]
    for s in samples:
        lines += [f"**Prompt:** {s['prompt'][:300]}", "",
                  f"- policy, greedy: {s['policy_greedy'][:300]!r}",
                  f"- policy, sampled (T={params.evaluate.temperature}, top-k {params.evaluate.top_k}, "
                  f"top-p {params.evaluate.top_p}): {s['policy_sampled'][:300]!r}",
                  f"- SFT, greedy: {s['sft_greedy'][:300]!r}", ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    run_stage("evaluate", body)


if __name__ == "__main__":
    main()

"""The multi-task part of `evaluate`: the held-out multi-task records asked the `sft.multitask` way, scored.

`instructflow.multitask.run_strategy` decides what is asked and in which rounds; this module is its model call
(greedy, batched, with the chat template, as the rest of `evaluate` generates) and its metrics: per-task exact
match and the all-N-correct rate with bootstrap intervals, model calls and generated tokens per record, and the
wall time (volatile: MLflow and lineage only, never the cached report).
"""

from __future__ import annotations

import time
from pathlib import Path

from instructflow import multitask
from instructflow.config import Params
from instructflow.io import read_jsonl
from models.generate import generate_batched
from models.stats import bootstrap_ci
from models.tokenizer import encode_prompt

EVAL_FILE = Path("data") / "prepared" / "multitask_eval.jsonl"


def completer(model, tok, max_new_tokens: int, batch_size: int) -> multitask.Complete:
    """The model as `run_strategy`'s call: greedy replies (special tokens dropped) and their new-token counts.

    A prompt longer than the model's positions allow keeps <|bos|> and its end (evaluate's fit_prompt).
    """
    from models.decoder import fit_prompt

    limit = model.config.max_position_embeddings - max_new_tokens

    def complete(prompts: list[multitask.Messages]) -> list[tuple[str, int]]:
        ids = [fit_prompt(encode_prompt(tok, messages), limit) for messages in prompts]
        outs = generate_batched(model, ids, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        return [(tok.decode(o, skip_special_tokens=True), len(o)) for o in outs]

    return complete


def metrics_of(scored: dict, params: Params) -> dict[str, float]:
    """multitask_* metrics from `multitask.score`'s lists: rates with their bootstrap interval, means per record."""
    cfg = params.evaluate
    rates = {f"multitask_exact_match_{name}": hits for name, hits in scored["per_task"].items()}
    rates["multitask_all_correct"] = scored["all_correct"]
    out: dict[str, float] = {}
    for key, values in rates.items():
        out[key], out[f"{key}_ci_low"], out[f"{key}_ci_high"] = bootstrap_ci(
            values, cfg.bootstrap_resamples, cfg.confidence, params.seed)
    n = len(scored["all_correct"])
    out["multitask_calls_per_record"] = sum(scored["calls"]) / n
    out["multitask_tokens_per_record"] = sum(scored["tokens"]) / n
    out["n_multitask_records"] = n
    return out


def evaluate_multitask(model, tok, params: Params, root: Path) -> tuple[dict[str, float], list[str]]:
    """(metrics, report lines) of the model on the held-out multi-task records; nothing when there are none."""
    path = root / EVAL_FILE
    records = read_jsonl(path)[: params.evaluate.max_eval_rows] if path.is_file() else []
    if not records:
        return {}, []
    strategy = params.sft.multitask
    n_tasks = max(len(r["tasks"]) for r in records)
    # a joint reply holds every answer: it gets max_new_tokens per task
    per_call = params.evaluate.max_new_tokens * (n_tasks if strategy == "joint" else 1)
    started = time.perf_counter()
    results = multitask.run_strategy(strategy, records, completer(model, tok, per_call, params.evaluate.batch_size))
    seconds = time.perf_counter() - started
    scored = multitask.score(records, results)
    metrics = metrics_of(scored, params)
    if strategy == "joint":
        metrics["multitask_joint_parsed"] = sum(r["parsed"] for r in results) / len(results)
    report = report_section(metrics, list(scored["per_task"]), strategy, params, records, results)
    metrics["multitask_seconds"] = round(seconds, 2)  # volatile: after the report, which is a cached output
    return metrics, report


def report_section(metrics: dict, names: list[str], strategy: str, params: Params, records: list[dict],
                   results: list[dict]) -> list[str]:
    """The report's "Multi-task records" section: the table, then the first records asked."""
    conf = int(params.evaluate.confidence * 100)
    n = int(metrics["n_multitask_records"])
    lines = ["## Multi-task records", "",
             f"The policy on {n} held-out multi-task records (data/prepared/multitask_eval.jsonl), asked the way "
             f"`sft.multitask: {strategy}` trained it, greedy; {conf}% bootstrap intervals. Compare strategies with "
             "`instructflow compare sft.multitask=joint,sequential,cumulative`.", "",
             "| metric | value | CI |", "| --- | --- | --- |"]
    for key in [f"multitask_exact_match_{name}" for name in names] + ["multitask_all_correct"]:
        lines.append(f"| {key} | {metrics[key]:.4f} | [{metrics[f'{key}_ci_low']:.4f}, "
                     f"{metrics[f'{key}_ci_high']:.4f}] |")
    for key in ("multitask_calls_per_record", "multitask_tokens_per_record", "multitask_joint_parsed"):
        if key in metrics:
            lines.append(f"| {key} | {metrics[key]:.3f} | |")
    lines += ["", "First records (expected / predicted; `-`: the joint reply did not parse):", ""]
    for record, result in list(zip(records, results))[:3]:
        cells = [f"{t['name']} `{t['answer'][:40]}` / `{'-' if p is None else p[:40]}`"
                 for t, p in zip(record["tasks"], result["predictions"])]
        lines.append(f"- {record['id']}: " + "; ".join(cells))
    return lines + [""]

"""Stage `generate` (the feedback loop, loop.enabled): K responses per prompt from the current policy, for `rank`.

InstructGPT's data loop starts here: the model writes K responses to each prompt, someone or something ranks
them (stage `rank`), and the rankings train the next reward model. The prompts are the round's share of the
chosen source (generate.prompts), never the held-out ones evaluate scores:
- synthetic: the synthetic tasks of sft_train, with their exact answer on every row (the verifier ranks by it);
- sft: the real SFT prompts; preference: the real preference prompts.
They are put in a seeded order once; round r (loop.round, set by the `rounds` flow; 0 counts as 1) takes the r-th
slice of generate.n_prompts, so no prompt comes back in a later round.

The rows are `instructflow generate`'s (tasks/generation.py: prompt_index, prompt, sample, response,
finish_reason, new_tokens, seed, model_version, sampling) plus `round`, `source`, and for synthetic prompts `task`
and `answer`, in data/generated/samples.jsonl. Sampling is seeded per (seed, prompt, sample), and the model is
named by its weights' hash, so the same inputs write the same bytes.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

from instructflow.config import Params
from instructflow.errors import InstructflowError
from tasks.generation import Prompt, SamplingParams, generate_rows, load_model, write_rows
from tasks.runtime import read_prepared, run_stage, stage_output
from tasks.tracking import StageRun

log = logging.getLogger("instructflow")
SAMPLES_FILE = "samples.jsonl"


def candidate_prompts(source: str, sft_rows: list[dict], preference_rows: list[dict]) -> list[dict]:
    """The distinct prompts of a source, in file order: {messages, task, answer} (task and answer for synthetic)."""
    out, seen = [], set()
    if source == "preference":
        rows = [(r["prompt"], None, None) for r in preference_rows if r.get("source") != "synthetic"]
    else:
        synthetic = source == "synthetic"
        rows = [(r["messages"][:-1], r.get("task"), r.get("answer")) for r in sft_rows
                if (r.get("source") == "synthetic" and r.get("answer") is not None) == synthetic]
    for messages, task, answer in rows:
        key = repr(messages)
        if messages and messages[-1]["role"] == "user" and key not in seen:
            seen.add(key)
            out.append({"messages": messages, "task": task, "answer": answer})
    return out


def round_slice(candidates: list, n: int, round_: int, seed: int, source: str) -> list:
    """Round r's n prompts: slice r of one seeded order of the candidates (round 0 counts as round 1)."""
    order = list(candidates)
    random.Random(f"{seed}/generate/{source}").shuffle(order)
    r = max(round_, 1)
    chosen = order[(r - 1) * n: r * n]
    if not chosen:
        raise InstructflowError(f"generate: round {r} needs prompts {(r - 1) * n + 1}..{r * n} of generate.prompts "
                                f"{source!r}, which has {len(order)}; lower generate.n_prompts or loop.rounds")
    return chosen


def body(params: Params, root: Path, run: StageRun) -> dict:
    from models.tokenizer import encode_prompt

    cfg = params.generate
    round_ = max(params.loop.round, 1)
    candidates = candidate_prompts(cfg.prompts, read_prepared(root, "sft_train"), read_prepared(root, "preference_train"))
    if not candidates:
        raise InstructflowError(f"generate: data/prepared has no {cfg.prompts!r} prompts (generate.prompts); "
                                "expected sft_train rows with synthetic tasks, or real sft / preference rows")
    loaded = load_model(cfg.model, root)
    chosen = round_slice(candidates, cfg.n_prompts, round_, params.seed, cfg.prompts)
    fits = [c for c in chosen if len(encode_prompt(loaded.tokenizer, c["messages"])) <= cfg.max_prompt_length]
    if not fits:
        raise InstructflowError(f"generate: none of round {round_}'s {len(chosen)} prompts fits "
                                f"generate.max_prompt_length {cfg.max_prompt_length}")
    sampling = SamplingParams(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                              max_new_tokens=cfg.max_new_tokens, n=cfg.samples, seed=params.seed)
    prompts = [Prompt(c["messages"], c["messages"]) for c in fits]
    extra = [{"round": round_, "source": cfg.prompts,
              **({"task": c["task"], "answer": c["answer"]} if cfg.prompts == "synthetic" else {})} for c in fits]
    rows = [{**row, **extra[row["prompt_index"]]}
            for row in generate_rows(loaded, prompts, sampling, batch_size=cfg.batch_size * cfg.samples, progress=False)]
    with stage_output(root, "generate", run) as out:
        write_rows(out / SAMPLES_FILE, rows)
    per_prompt: dict[int, set[str]] = {}
    for row in rows:
        per_prompt.setdefault(row["prompt_index"], set()).add(row["response"])
    log.info("generate: round %d, %d prompts x %d samples from %s", round_, len(fits), cfg.samples, loaded.model_version)
    return {
        "round": round_, "prompts": len(fits), "prompts_too_long": len(chosen) - len(fits),
        "samples_per_prompt": cfg.samples, "rows": len(rows),
        "distinct_share": sum(len(s) for s in per_prompt.values()) / len(rows),  # 1: all K differ; 1/K: all alike
        "eos_share": sum(r["finish_reason"] == "eos" for r in rows) / len(rows),
        "mean_new_tokens": sum(r["new_tokens"] for r in rows) / len(rows),
    }


def main() -> None:
    run_stage("generate", body)


if __name__ == "__main__":
    main()

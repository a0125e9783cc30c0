"""How much can online RL on the exact-answer verifier add? Greedy, sampled and pass@k exact match of a model.

RL from a verifier (align.algorithm grpo / rloo / ppo with align.online.rewards exact_answer) raises the
probability of answers the model already samples: its reachable gain on greedy exact match is bounded, to a
first approximation, by pass@k (some of k samples right) minus greedy. This prints both per task kind on the
held-out synthetic tasks of a project that has run `sft` (or `align`):

    .venv/bin/python bench/headroom.py --project . --model artifacts/sft --k 8 --n 200

It prints figures; it asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from instructflow import env  # noqa: E402

env.setup(ROOT)

import torch  # noqa: E402

from instructflow.io import read_jsonl  # noqa: E402
from instructflow.synthetic import exact_match  # noqa: E402
from models.generate import generate  # noqa: E402
from models.tokenizer import encode_prompt, load_tokenizer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", type=Path, default=Path("."))
    parser.add_argument("--model", default="artifacts/sft", help="a causal LM folder, relative to the project")
    parser.add_argument("--k", type=int, default=8, help="samples per task")
    parser.add_argument("--n", type=int, default=200, help="held-out synthetic tasks (data/prepared/sft_eval.jsonl)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    folder = args.project / args.model
    tok = load_tokenizer(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    rows = [r for r in read_jsonl(args.project / "data" / "prepared" / "sft_eval.jsonl") if r.get("answer")][: args.n]
    prompts = [encode_prompt(tok, r["messages"][:-1]) for r in rows]

    def text(ids: list[int]) -> str:
        return tok.decode([t for t in ids if t != tok.eos_token_id], skip_special_tokens=True)

    def run(temperature: float, seed: int) -> list[bool]:
        out = []
        for i in range(0, len(prompts), args.batch):
            out += generate(model, prompts[i:i + args.batch], args.max_new_tokens, tok.eos_token_id,
                            tok.pad_token_id, temperature=temperature, seed=seed + i)
        return [exact_match(text(o), r["answer"]) for o, r in zip(out, rows)]

    started = time.perf_counter()
    greedy = run(0.0, 0)
    samples = [run(args.temperature, 1000 * (s + 1)) for s in range(args.k)]
    by_kind: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        by_kind[row.get("task", "?")].append(i)
    by_kind["all"] = list(range(len(rows)))
    print(f"{folder}: {len(rows)} held-out tasks, {args.k} samples each at temperature {args.temperature:g} "
          f"({time.perf_counter() - started:.0f} s, load average {os.getloadavg()[0]:.2f})")
    print(f"{'kind':12s} {'n':>4s} {'greedy':>7s} {'sample':>7s} {f'pass@{args.k}':>7s} {'headroom':>9s}")
    for kind, index in by_kind.items():
        g = sum(greedy[i] for i in index) / len(index)
        s = sum(sum(samples[k][i] for k in range(args.k)) for i in index) / (len(index) * args.k)
        p = sum(any(samples[k][i] for k in range(args.k)) for i in index) / len(index)
        print(f"{kind:12s} {len(index):4d} {g:7.3f} {s:7.3f} {p:7.3f} {p - g:+9.3f}")


if __name__ == "__main__":
    main()

"""K-wise against flattened reward-model training (reward.kwise) on the same rankings: held-out accuracy and time.

The rankings are the synthetic tasks (instructflow/synthetic.py), each with its exact answer first and systematic
slips after it (ranked_row): arithmetic K = 4 strictly by distance, [answer, off by 1, off by 2, off by 10] (6
pairs); translation K = 4, the answer above three other lexicon words that tie (tiers [[0], [1, 2, 3]]: 3 pairs);
renaming K = 3, the answer above the sentence with the old name kept and with a third name, tied (2 pairs). Both
modes train the same reward model (an SFT folder with a fresh one-label head) on the same rankings from the same
seed for the same steps and, on average, the same pairs a step: K-wise --lists-per-step lists, flattened that many
times the mean pairs a list, shuffled apart. The held-out figures are the reward stage's own pairwise_eval on every
pair of the held-out rankings (and on those whose better side is the exact answer), the same code for both. Wall
time is the training loop's alone.

    OMP_NUM_THREADS=1 .venv/bin/python bench/kwise.py --model artifacts/sft --seeds 1 2 3

It prints figures; it asserts nothing.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import statistics
import sys
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from instructflow import env  # noqa: E402

env.setup(ROOT)

import torch  # noqa: E402

from instructflow import synthetic  # noqa: E402
from models.decoder import collate_groups, collate_pairs  # noqa: E402
from models.tokenizer import load_tokenizer  # noqa: E402
from models.training import LoopSettings, train  # noqa: E402
from tasks.reward import (  # noqa: E402
    group_lengths,
    group_set,
    kwise_step,
    pair_lengths,
    pairwise_eval,
    preference_groups,
    preference_set,
    ranked_groups,
    reward_step,
)
from tasks.runtime import seed_everything  # noqa: E402

SLIPS = (1, 2, 10)  # arithmetic's ranked wrong answers, nearest first
ENGLISH, KOREAN = ([en for _, en in synthetic.LEXICON], [ko for ko, _ in synthetic.LEXICON])


def ranked_row(task: synthetic.Task, rng: random.Random) -> dict:
    """A ranked row for one synthetic task: {"prompt", "responses"[, "tiers"]}, the exact answer first."""
    if task.kind == "arithmetic":  # strict: the nearer the slip, the better
        value = int(task.answer)
        return {"prompt": task.prompt, "responses": [task.answer, *(str(value + rng.choice((-1, 1)) * d)
                                                                    for d in SLIPS)]}
    if task.kind == "translate":  # the answer above three other words of the same language, which tie
        words = ENGLISH if task.answer in ENGLISH else KOREAN
        others = rng.sample([w for w in words if w != task.answer], 3)
        return {"prompt": task.prompt, "responses": [task.answer, *others], "tiers": [[0], [1, 2, 3]]}
    new = next(name for name in synthetic.NAMES if name in task.answer and name not in task.wrong)
    old = next(name for name in synthetic.NAMES if name in task.wrong and name not in task.answer)
    third = rng.choice([name for name in synthetic.NAMES if name not in (new, old)])
    return {"prompt": task.prompt, "responses": [task.answer, task.wrong, task.answer.replace(new, third)],
            "tiers": [[0], [1, 2]]}  # the old name kept and a third name: both wrong, tied


def ranked_rows(tasks: list[synthetic.Task], seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [ranked_row(task, rng) for task in tasks]


def run(mode: str, model_dir: Path, tok, train_rows: list[dict], eval_batches: list[dict], args, seed: int) -> dict:
    from transformers import AutoModelForSequenceClassification

    seed_everything(seed)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, pad_token_id=tok.pad_token_id)
    groups = preference_groups(train_rows)
    if mode == "kwise":
        dataset = group_set(tok, groups, args.max_length, "train")
        collate, step, lengths = partial(collate_groups, pad_id=tok.pad_token_id), kwise_step, group_lengths(dataset)
        batch_size = args.lists_per_step
        rows_per_step = batch_size * sum(len(g.responses) for g in groups) / len(groups)
    else:
        dataset = preference_set(tok, train_rows, args.max_length, "train")
        collate, step, lengths = partial(collate_pairs, pad_id=tok.pad_token_id), reward_step, pair_lengths(dataset)
        batch_size = flat_batch(args.lists_per_step, train_rows, groups)
        rows_per_step = 2 * batch_size
    settings = LoopSettings(batch_size=batch_size, max_steps=args.steps, lr=args.lr, bf16=args.bf16,
                            logging_steps=args.steps, eval_steps=args.steps, seed=seed)
    start = time.perf_counter()
    history = train(model, dataset, collate, step, settings, lengths=lengths)
    seconds = time.perf_counter() - start
    held_out = {name: pairwise_eval(model, batches) for name, batches in eval_batches.items()}
    return {"mode": mode, "seed": seed, "accuracy": held_out["all"]["accuracy"], "loss": held_out["all"]["loss"],
            "answer_accuracy": held_out["answer"]["accuracy"], "train_loss": history[-1]["loss"], "seconds": seconds,
            "rows_per_step": rows_per_step, "batch": f"{batch_size} {'lists' if mode == 'kwise' else 'pairs'}"}


def flat_batch(lists_per_step: int, rows: list[dict], groups: list) -> int:
    """Pairs a flattened step takes for the same pairs a step, on average, as lists_per_step ranked lists."""
    return round(lists_per_step * len(rows) / len(groups))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path("artifacts/sft"),
                        help="an SFT folder (causal LM + tokenizer)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--train-lists", type=int, default=600, help="ranked lists to train on, kinds balanced")
    parser.add_argument("--eval-lists", type=int, default=150, help="held-out ranked lists")
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--lists-per-step", type=int, default=6, help="K-wise batch; flattened: as many pairs")
    parser.add_argument("--lr", type=float, default=3e-4, help="reward.lr's default")
    parser.add_argument("--max-length", type=int, default=192, help="tiny's reward.max_length")
    parser.add_argument("--modes", nargs="+", default=["kwise", "flat"], choices=["kwise", "flat"])
    parser.add_argument("--bf16", default="auto", choices=["auto", "true", "false"])
    args = parser.parse_args()
    args.bf16 = {"auto": "auto", "true": True, "false": False}[args.bf16]
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    tok = load_tokenizer(args.model)
    tasks = synthetic.generate(args.train_lists, args.eval_lists, seed=0)
    train_rows = ranked_groups(ranked_rows(tasks.train, 0), "bench_train.jsonl")
    eval_rows = ranked_groups(ranked_rows(tasks.eval, 1), "bench_eval.jsonl")
    answers = {task.prompt: task.answer for task in tasks.eval}
    eval_batches = {}
    for name, rows in (("all", eval_rows),
                       ("answer", [r for r in eval_rows if answers[r["prompt"][0]["content"]] == r["chosen"]])):
        pairs = preference_set(tok, rows, args.max_length, f"eval {name}")
        eval_batches[name] = [collate_pairs(pairs[i:i + 64], tok.pad_token_id) for i in range(0, len(pairs), 64)]
    pairs_per_step = flat_batch(args.lists_per_step, train_rows, preference_groups(train_rows))
    epochs = args.steps * pairs_per_step / len(train_rows)
    print(f"model {args.model}; {len(tasks.train)} train lists ({len(train_rows)} pairs), {len(tasks.eval)} held-out "
          f"lists ({len(eval_rows)} pairs); {args.steps} steps x {args.lists_per_step} lists or {pairs_per_step} pairs "
          f"= {epochs:.2f} epochs; lr {args.lr:g}; threads {torch.get_num_threads()}; load average "
          f"{os.getloadavg()[0]:.2f}", flush=True)
    results = []
    for seed in args.seeds:
        for mode in args.modes:
            result = run(mode, args.model, tok, train_rows, eval_batches, args, seed)
            results.append(result)
            print(f"seed {seed} {mode:>5}: held-out pairwise accuracy {result['accuracy']:.3f} (answer first "
                  f"{result['answer_accuracy']:.3f}), loss {result['loss']:.3f} "
                  f"(train loss {result['train_loss']:.3f}); "
                  f"train {result['seconds']:.1f} s, {result['rows_per_step']:.1f} sequences forwarded a step "
                  f"({result['batch']})", flush=True)
    print(f"\nmean over seeds {args.seeds} (load average {os.getloadavg()[0]:.2f}):")
    for mode in args.modes:
        mine = [r for r in results if r["mode"] == mode]
        accuracy = [r["accuracy"] for r in mine]
        spread = f" (min {min(accuracy):.3f}, max {max(accuracy):.3f})" if len(mine) > 1 else ""
        print(f"  {mode:>5}: held-out pairwise accuracy {statistics.mean(accuracy):.3f}{spread}, answer first "
              f"{statistics.mean(r['answer_accuracy'] for r in mine):.3f}, loss "
              f"{statistics.mean(r['loss'] for r in mine):.3f}, "
              f"train {statistics.mean(r['seconds'] for r in mine):.1f} s")


if __name__ == "__main__":
    main()

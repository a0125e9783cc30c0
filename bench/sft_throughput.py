"""SFT training throughput: the project's loop (`models.training.train`) beside a plain PyTorch loop.

Both train the same tiny-preset decoder on the same batches (the ones `train` draws, replayed), with the same
dtype, optimiser (AdamW, betas 0.9/0.95, the same param groups) and clipping. Throughput is non-pad input
tokens per second over the steps after the warmup steps; each side is repeated from the same initial weights.
The ratio is the cost of what the loop adds: Accelerate's wrappers, the scheduler, logging.

    .venv/bin/python bench/sft_throughput.py                 # 40 steps, 8 warmup, 3 repeats, batch 16 x 160
    .venv/bin/python bench/sft_throughput.py --steps 20 --repeats 2 --bf16 false --threads 1

It prints figures; it asserts nothing.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from instructflow import env  # noqa: E402

env.setup(ROOT)  # offline, no telemetry, before torch and transformers load

import torch  # noqa: E402

from instructflow.config import SyntheticConfig, validate  # noqa: E402
from models.decoder import build_decoder, collate_lm, lm_step  # noqa: E402
from models.tokenizer import load_tokenizer, train_tokenizer  # noqa: E402
from models.training import LoopSettings, param_groups, train, use_bf16  # noqa: E402
from tasks.prepare import build  # noqa: E402
from tasks.sft import sft_examples  # noqa: E402


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", default="tiny", help="model sizes, vocab and SFT shapes of this preset (tiny)")
    ap.add_argument("--steps", type=int, default=40, help="optimiser steps per timed run, warmup included")
    ap.add_argument("--warmup", type=int, default=8, help="steps left out of the timing (first-call costs)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each side, from the same initial weights")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the preset's sft.batch_size")
    ap.add_argument("--max-length", type=int, default=None, help="default: the preset's sft.max_length")
    ap.add_argument("--bf16", default="auto", choices=["auto", "true", "false"],
                    help="bf16 autocast on both sides; auto: models.training.use_bf16('auto')")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice, the cores)")
    ap.add_argument("--sft-rows", type=int, default=800, help="real SFT rows to prepare (plus 400 synthetic)")
    args = ap.parse_args()
    if args.warmup >= args.steps:
        ap.error(f"--warmup {args.warmup} must be below --steps {args.steps}")
    return args


def tokenizer_and_examples(params, max_length: int, sft_rows: int, work: Path):
    """The project tokenizer (artifacts/tokenizer if it has the preset's vocabulary, else trained here) and SFT rows."""
    cfg = params.prepare.model_copy(update={
        "max_pretrain_chars": 300_000, "max_sft_rows": sft_rows, "max_preference_rows": 10, "max_prompt_rows": 1,
        "synthetic": SyntheticConfig(n_train=400, n_eval=1)})
    started = time.perf_counter()
    build(cfg, params.seed, ROOT / "data" / "raw", work / "prepared")

    def read(name: str) -> list[dict]:
        with (work / "prepared" / name).open(encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.strip()]

    tok, where = None, ""
    if (ROOT / "artifacts" / "tokenizer" / "tokenizer.json").is_file():
        tok = load_tokenizer(ROOT / "artifacts" / "tokenizer")
        where = "artifacts/tokenizer"
        if abs(len(tok) - params.tokenizer.vocab_size) > 64:  # made by another preset: not this model's vocab
            tok, where = None, ""
    if tok is None:
        texts = [row["text"] for row in read("pretrain_train.jsonl")]
        tok = train_tokenizer(texts, params.tokenizer.vocab_size, params.tokenizer.min_frequency)
        where = f"trained here on {sum(map(len, texts)):,} chars"
    examples = sft_examples(tok, read("sft_train.jsonl"), max_length)
    print(f"data: {len(examples)} SFT examples (max_length {max_length}), tokenizer {len(tok)} tokens ({where}), "
          f"{time.perf_counter() - started:.1f}s to prepare")
    return tok, examples


def time_train(model, examples, collate, loop: LoopSettings, warmup: int) -> tuple[float, list[dict]]:
    """tokens/s of models.training.train over steps warmup+1..N; also the batches it drew, in order."""
    batches, marks = [], {}

    def step_fn(m, batch):
        batches.append({k: v.detach().cpu().clone() for k, v in batch.items()})
        return lm_step(m, batch)

    def on_log(step, row):
        if step == warmup:
            marks["start"] = time.perf_counter()

    train(model, examples, collate, step_fn, loop, on_log=on_log)
    elapsed = time.perf_counter() - marks["start"]
    tokens = sum(int(b["attention_mask"].sum()) for b in batches[warmup:])
    return tokens / elapsed, batches


def time_plain(model, batches: list[dict], loop: LoopSettings, bf16: bool, warmup: int) -> float:
    """tokens/s of a plain loop: AdamW, autocast forward, backward, clip, step; the same batches in the same order."""
    optimizer = torch.optim.AdamW(param_groups(model, loop.weight_decay), lr=loop.lr, betas=(0.9, 0.95))
    model.train()
    tokens, start = 0, None
    for step, batch in enumerate(batches, 1):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), loop.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step == warmup:
            start = time.perf_counter()
        elif step > warmup:
            tokens += int(batch["attention_mask"].sum())
    return tokens / (time.perf_counter() - start)


def main() -> None:
    args = parse_args()
    params = validate({"preset": args.preset})
    batch_size = args.batch_size or params.sft.batch_size
    max_length = args.max_length or params.sft.max_length
    bf16 = use_bf16("auto" if args.bf16 == "auto" else args.bf16 == "true")
    torch.manual_seed(params.seed)
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="sft-bench-") as tmp:
        tok, examples = tokenizer_and_examples(params, max_length, args.sft_rows, Path(tmp))
    if len(examples) < batch_size:
        sys.exit(f"only {len(examples)} examples for batch size {batch_size}")
    template = build_decoder(tok, **params.pretrain.model.model_dump())
    n_params = sum(p.numel() for p in template.parameters())
    collate = partial(collate_lm, pad_id=tok.pad_token_id)
    loop = LoopSettings.from_config(params.sft, params.seed, max_steps=args.steps, batch_size=batch_size,
                                    bf16=bf16, logging_steps=1, eval_steps=10**9, grad_accum=1)
    print(f"model: {args.preset} decoder, {n_params / 1e6:.2f}M parameters; batch {batch_size} x <= {max_length}; "
          f"{'bf16 autocast' if bf16 else 'fp32'}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}; load average {os.getloadavg()[0]:.2f}")
    print(f"timing steps {args.warmup + 1}..{args.steps} of {args.steps}, {args.repeats} repeats each, alternating\n")

    loop_rates, plain_rates, batches = [], [], None
    for repeat in range(1, args.repeats + 1):
        rate, drawn = time_train(copy.deepcopy(template), examples, collate, loop, args.warmup)
        batches = batches or drawn
        loop_rates.append(rate)
        plain_rates.append(time_plain(copy.deepcopy(template), batches, loop, bf16, args.warmup))
        print(f"  repeat {repeat}: models.training.train {loop_rates[-1]:8,.0f} tok/s   "
              f"plain loop {plain_rates[-1]:8,.0f} tok/s")

    pad_share = 1 - sum(int(b["attention_mask"].sum()) for b in batches) / sum(b["input_ids"].numel() for b in batches)
    med_loop, med_plain = statistics.median(loop_rates), statistics.median(plain_rates)
    print(f"\n{'':28}{'median':>10}{'best':>10}   (non-pad input tokens / s; {pad_share:.0%} of batch slots are pad)")
    print(f"{'models.training.train':28}{med_loop:10,.0f}{max(loop_rates):10,.0f}")
    print(f"{'plain PyTorch loop':28}{med_plain:10,.0f}{max(plain_rates):10,.0f}")
    print(f"ratio train / plain (median): {med_loop / med_plain:.2f}   (load average after: {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()

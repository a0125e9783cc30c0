"""Generation throughput with and without the KV cache: what `use_cache` buys at each length and batch size.

`models.generate.generate` on one model at new-token lengths 64, 256 and 512 (each capped at the model's
max_position_embeddings minus the prompt) and batch sizes 1, 8 and 32, greedy, with the KV cache (the prompt
once, then one token a step) and without it (the whole sequence recomputed every step). EOS is switched off
(eos_token_id -1), so every row runs to the full length and both sides generate exactly the same tokens
(checked). The prompts are random token ids, `--prompt-len` each (16).

    .venv/bin/python bench/generation.py                          # artifacts/sft if present, else a tiny decoder
    .venv/bin/python bench/generation.py artifacts/align --repeats 3 --threads 1
    .venv/bin/python bench/generation.py --lengths 64,128 --batch-sizes 1,8

tokens/s = batch x new tokens / wall seconds of the `generate` call (the prompt's forward pass included), the
median of `--repeats` (3) runs with the cache; without it `--repeats` runs up to `--slow-tokens` (1,000)
generated tokens a cell and one run above, since those take minutes. One warmup call comes first. It prints
figures; it asserts nothing but that cached and uncached outputs agree.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from instructflow import env  # noqa: E402

env.setup(ROOT)  # offline, no telemetry, before torch and transformers load

import torch  # noqa: E402

from models.generate import generate  # noqa: E402
from models.training import for_inference  # noqa: E402


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("model", nargs="?", default=None,
                    help="a causal LM folder (default: artifacts/sft if present, else a tiny-preset decoder at random init)")
    ap.add_argument("--preset", default="tiny", help="the sizes of the decoder built when there is no model folder")
    ap.add_argument("--lengths", default="64,256,512", help="new tokens, comma-separated (capped by the model)")
    ap.add_argument("--batch-sizes", default="1,8,32", help="rows per call, comma-separated")
    ap.add_argument("--prompt-len", type=int, default=16, help="tokens per prompt")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per cell (median)")
    ap.add_argument("--slow-tokens", type=int, default=1000,
                    help="without the cache, a cell generating more tokens than this is timed once")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice, the cores)")
    return ap.parse_args()


def ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


class _Vocab:
    """What `build_decoder` reads of a tokenizer, for a model built without one: its size and special ids."""

    def __init__(self, size: int):
        self.size, self.pad_token_id, self.bos_token_id, self.eos_token_id = size, 0, 1, 2

    def __len__(self) -> int:
        return self.size


def load(model_arg: str | None, preset: str) -> tuple[torch.nn.Module, str]:
    """The model to time and a line saying what it is."""
    folder = Path(model_arg) if model_arg else ROOT / "artifacts" / "sft"
    if (folder / "config.json").is_file():
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(folder), str(folder)
    if model_arg:
        sys.exit(f"{folder}: no config.json; expected a causal LM folder")
    from instructflow.config import validate
    from models.decoder import build_decoder

    params = validate({"preset": preset})
    torch.manual_seed(params.seed)
    model = build_decoder(_Vocab(params.tokenizer.vocab_size), **params.pretrain.model.model_dump())
    return model, f"a {preset}-preset decoder at random init (no {folder.relative_to(ROOT)})"


def timed(model, prompts: list[list[int]], new_tokens: int, use_cache: bool) -> tuple[float, list[list[int]]]:
    """Wall seconds of one greedy `generate` call that runs to `new_tokens` (EOS off), and its output."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    out = generate(model, prompts, new_tokens, eos_token_id=-1, pad_token_id=0, use_cache=use_cache)
    return time.perf_counter() - started, out


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, what = load(args.model, args.preset)
    model = for_inference(model)
    positions = int(model.config.max_position_embeddings)
    room = positions - args.prompt_len
    lengths = sorted({min(length, room) for length in ints(args.lengths)})
    capped = [length for length in ints(args.lengths) if length > room]
    vocab = int(model.config.vocab_size)
    n_params = sum(p.numel() for p in model.parameters())
    device = next(model.parameters()).device
    print(f"model: {what}; {n_params / 1e6:.2f}M parameters, {model.config.num_hidden_layers} layers, hidden "
          f"{model.config.hidden_size}, {positions} positions; {device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.2f}")
    if capped:
        print(f"new-token lengths {', '.join(map(str, capped))} capped at {room} ({positions} positions - "
              f"{args.prompt_len}-token prompt)")
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, vocab, (max(ints(args.batch_sizes)), args.prompt_len), generator=generator).tolist()
    timed(model, prompts[:2], 8, True)  # warmup: first-call costs
    timed(model, prompts[:2], 8, False)

    print(f"\n{'batch':>5} {'new tok':>8} {'cache tok/s':>12} {'no cache tok/s':>15} {'speed-up':>9}  runs")
    for batch in ints(args.batch_sizes):
        for length in lengths:
            rows = prompts[:batch]
            with_cache, without, reference = [], [], None
            slow_runs = args.repeats if batch * length <= args.slow_tokens else 1
            for repeat in range(max(args.repeats, slow_runs)):
                seconds, out = timed(model, rows, length, True)
                with_cache.append(batch * length / seconds)
                reference = reference or out
                if repeat < slow_runs:
                    seconds, out = timed(model, rows, length, False)
                    without.append(batch * length / seconds)
                    if out != reference:  # greedy: cached and uncached must agree token for token
                        print(f"  batch {batch}, {length} tokens: cached and uncached outputs differ")
            cached, plain = statistics.median(with_cache), statistics.median(without)
            print(f"{batch:>5} {length:>8} {cached:>12,.0f} {plain:>15,.0f} {cached / plain:>8.1f}x  "
                  f"{len(with_cache)}/{len(without)}", flush=True)
    print(f"(load average after: {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()

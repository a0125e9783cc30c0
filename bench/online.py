"""Online RL throughput: what an update of `models.online.train_online` costs, for ppo, grpo and rloo.

A tiny-preset decoder (sizes from `instructflow/presets.yaml`) at random init is the policy and, copied, the
frozen reference; PPO's value model is a `LlamaForSequenceClassification` of the same config (num_labels=1).
The prompts are the project's synthetic tasks (`tasks.prepare.build` into a temp folder, as
`sft_throughput.py` does), the tokenizer is trained here on the prepared pretraining text, and the rewarder is
`tasks.online.Rewarder` with no reward model: the exact answer of the synthetic task (weight 1) minus the
missing-EOS penalty. Nothing is downloaded and no reward model is trained.

Each update is timed from outside, through `train_online`'s per-update history rows (logging_steps=1):
the whole update is the wall time between two consecutive rows; `rollout_seconds` (the sampling) and
`update_seconds` (the PPO epochs) are logged by the loop; the rest is scoring (rewarder, the old / reference
log-prob and value forwards, advantages). A model at random init samples long responses that rarely end in
EOS, so most responses run to --max-new-tokens: the response length and EOS share are printed.

    .venv/bin/python bench/online.py                                   # ppo,grpo,rloo; 10 updates, 2 warmup
    .venv/bin/python bench/online.py --updates 6 --warmup 1 --threads 1 --algorithms grpo

It prints figures; it asserts nothing.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from instructflow import env  # noqa: E402

env.setup(ROOT)  # offline, no telemetry, before torch and transformers load

import torch  # noqa: E402
from transformers import LlamaForSequenceClassification  # noqa: E402

from instructflow.config import SyntheticConfig, validate  # noqa: E402
from models.decoder import build_decoder  # noqa: E402
from models.online import ALGORITHMS, Models, train_online  # noqa: E402
from models.tokenizer import train_tokenizer  # noqa: E402
from models.training import pick_device, use_bf16  # noqa: E402
from tasks.online import Rewarder, collect_prompts, settings_from  # noqa: E402
from tasks.prepare import build  # noqa: E402


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", default="tiny", help="model sizes and vocabulary of this preset (tiny)")
    ap.add_argument("--algorithms", default=",".join(ALGORITHMS), help="comma-separated, of ppo,grpo,rloo")
    ap.add_argument("--updates", type=int, default=10, help="updates per algorithm, warmup included")
    ap.add_argument("--warmup", type=int, default=2, help="updates left out of the timing (first-call costs)")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per update (align.batch_size)")
    ap.add_argument("--samples", type=int, default=4, help="responses per prompt (align.online.samples_per_prompt)")
    ap.add_argument("--max-new-tokens", type=int, default=24, help="response-length cap")
    ap.add_argument("--bf16", default="auto", choices=["auto", "true", "false"],
                    help="bf16 autocast; auto: models.training.use_bf16('auto')")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice, the cores)")
    ap.add_argument("--synthetic", type=int, default=400, help="synthetic tasks to prepare (the prompt pool)")
    args = ap.parse_args()
    args.algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    bad = [a for a in args.algorithms if a not in ALGORITHMS]
    if bad or not args.algorithms:
        ap.error(f"--algorithms: expected some of {','.join(ALGORITHMS)}, got {bad or 'none'}")
    if args.warmup >= args.updates:
        ap.error(f"--warmup {args.warmup} must be below --updates {args.updates}")
    return args


def tokenizer_and_rows(params, n_synthetic: int, work: Path):
    """A tokenizer of the preset's vocabulary trained on the prepared pretraining text, and the SFT rows."""
    cfg = params.prepare.model_copy(update={
        "max_pretrain_chars": 300_000, "max_sft_rows": 1, "max_preference_rows": 10, "max_prompt_rows": 1,
        "synthetic": SyntheticConfig(n_train=n_synthetic, n_eval=1)})
    started = time.perf_counter()
    build(cfg, params.seed, ROOT / "data" / "raw", work / "prepared")

    def read(name: str) -> list[dict]:
        with (work / "prepared" / name).open(encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.strip()]

    texts = [row["text"] for row in read("pretrain_train.jsonl")]
    tok = train_tokenizer(texts, params.tokenizer.vocab_size, params.tokenizer.min_frequency)
    return tok, read("sft_train.jsonl"), sum(map(len, texts)), time.perf_counter() - started


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux: 5 > /proc/self/clear_refs); False if it can't."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mib(field: str = "VmHWM") -> float:
    """VmHWM (peak RSS since the last reset) or VmRSS (now) in MiB; ru_maxrss (the process's peak) if neither."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(algorithm: str, params, tok, policy0, prompts, rewarder, args, bf16: bool) -> dict:
    """train_online for --updates updates of one algorithm from policy0's weights; the timed figures."""
    aligned = params.model_copy(update={"align": params.align.model_copy(update={"algorithm": algorithm})})
    settings = dataclasses.replace(
        settings_from(aligned, tok), prompts_per_update=args.prompts, samples=args.samples,
        max_steps=args.updates, max_new_tokens=args.max_new_tokens, bf16=bf16, logging_steps=1,
        eval_steps=10**9)
    device = pick_device()
    torch.manual_seed(params.seed)
    policy = copy.deepcopy(policy0).to(device)
    reference = copy.deepcopy(policy0).to(device).eval()
    value = None
    if algorithm == "ppo":
        config = copy.deepcopy(policy0.config)
        config.num_labels = 1
        value = LlamaForSequenceClassification(config).to(device)
    rss_reset = reset_peak_rss()
    rss_before = peak_rss_mib("VmRSS")
    marks: list[float] = []

    def on_log(step: int, row: dict) -> None:
        marks.append(time.perf_counter())

    start = time.perf_counter()
    history = train_online(Models(policy, reference, value), prompts, rewarder, settings, on_log=on_log)
    peak = peak_rss_mib()
    ends = [start, *marks]
    timed = range(args.warmup, len(history))
    whole = [ends[i + 1] - ends[i] for i in timed]
    rollout_s = [history[i]["rollout_seconds"] for i in timed]
    update_s = [history[i]["update_seconds"] for i in timed]
    n = args.prompts * args.samples
    tokens = sum(history[i]["response_length"] * n for i in timed)
    total = sum(whole)
    return {
        "algorithm": algorithm, "updates": len(whole), "total": total,
        "rollout_tok_s": tokens / sum(rollout_s), "updates_per_min": 60 * len(whole) / total,
        "rollout": sum(rollout_s) / len(whole), "score": (total - sum(rollout_s) - sum(update_s)) / len(whole),
        "optimise": sum(update_s) / len(whole), "whole": total / len(whole),
        "response_length": sum(history[i]["response_length"] for i in timed) / len(whole),
        "eos_share": sum(history[i]["eos_share"] for i in timed) / len(whole),
        "reward_mean": sum(history[i]["reward_mean"] for i in timed) / len(whole),
        "peak_rss": peak, "rss_before": rss_before, "rss_reset": rss_reset, "optimizer_steps": settings.epochs * settings.minibatches,
        "params": sum(p.numel() for m in (policy, value) if m is not None for p in m.parameters()),
    }


def main() -> None:
    args = parse_args()
    params = validate({"preset": args.preset})
    bf16 = use_bf16("auto" if args.bf16 == "auto" else args.bf16 == "true")
    torch.manual_seed(params.seed)
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="online-bench-") as tmp:
        tok, sft_rows, chars, prep_s = tokenizer_and_rows(params, args.synthetic, Path(tmp))
    online = params.align.online
    model_cfg = params.pretrain.model.model_dump()
    room = model_cfg["max_position_embeddings"] - args.max_new_tokens
    picked, _ = collect_prompts(tok, sft_rows, [], ["synthetic"], online.max_prompt_length, room, "bench prompts")
    if len(picked) < args.prompts:
        sys.exit(f"only {len(picked)} synthetic prompts for --prompts {args.prompts}")
    rewarder = Rewarder(tok, picked, {"exact_answer": 1.0}, online.eos_penalty)
    prompts = [p.ids for p in picked]
    policy0 = build_decoder(tok, **model_cfg)
    n_params = sum(p.numel() for p in policy0.parameters())
    plen = sum(map(len, prompts)) / len(prompts)
    print(f"data: {len(prompts)} synthetic-task prompts (mean {plen:.0f} tokens), tokenizer {len(tok)} tokens "
          f"(trained here on {chars:,} chars), {prep_s:.1f}s to prepare")
    print(f"model: {args.preset} decoder at random init, {n_params / 1e6:.2f}M parameters (PPO adds a value model "
          f"of the same config); {'bf16 autocast' if bf16 else 'fp32'}; device {pick_device().type}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.2f}")
    print(f"per update: {args.prompts} prompts x {args.samples} samples = {args.prompts * args.samples} responses "
          f"of <= {args.max_new_tokens} tokens, {online.epochs} epochs x {online.minibatches} minibatches; "
          f"reward: exact answer - {online.eos_penalty:g} if no EOS; timing updates {args.warmup + 1}..{args.updates}\n")

    results = []
    for algorithm in args.algorithms:
        r = run_one(algorithm, params, tok, policy0, prompts, rewarder, args, bf16)
        results.append(r)
        print(f"  {algorithm}: {r['updates']} timed updates in {r['total']:.1f}s "
              f"(load average {os.getloadavg()[0]:.2f})", flush=True)

    print(f"\n{'':6}{'rollout':>10}{'updates':>9}{'s/update':>10}{'rollout':>9}{'scoring':>9}{'optimise':>10}"
          f"{'resp':>7}{'EOS':>6}{'reward':>8}{'peak RSS':>10}")
    print(f"{'':6}{'tok/s':>10}{'/ min':>9}{'whole':>10}{'s':>9}{'s':>9}{'s':>10}{'len':>7}{'share':>6}"
          f"{'mean':>8}{'MiB':>10}{'(start)':>9}")
    for r in results:
        print(f"{r['algorithm']:6}{r['rollout_tok_s']:10,.0f}{r['updates_per_min']:9.1f}{r['whole']:10.2f}"
              f"{r['rollout']:9.2f}{r['score']:9.2f}{r['optimise']:10.2f}{r['response_length']:7.1f}"
              f"{r['eos_share']:6.0%}{r['reward_mean']:8.2f}{r['peak_rss']:10,.0f}{r['rss_before']:9,.0f}")
    print("\nseconds are per update, means over the timed updates; scoring = whole - rollout - optimise (rewarder, "
          "old/ref log-probs, PPO's values, advantages).")
    print("random-init policy: responses mostly run to --max-new-tokens without EOS (resp len, EOS share above), so "
          "rollouts are as long as they can be and the reward is mostly the missing-EOS penalty.")
    reset = all(r["rss_reset"] for r in results)
    print(f"peak RSS: {'per algorithm (VmHWM reset before each)' if reset else 'of the process so far (no reset)'}, "
          f"the data, tokenizer, torch and transformers included; (start): the RSS as the algorithm's models were "
          f"built: memory an earlier algorithm freed stays with the process, so for one algorithm's own peak run it "
          f"alone (--algorithms grpo). load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()

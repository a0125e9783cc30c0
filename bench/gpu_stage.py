"""One training stage of the `small` preset on the GPU: tokens/s and model FLOPs utilisation (MFU).

    .venv/bin/python bench/gpu_stage.py                          # pretrain, 300 steps, on a GPU worker
    .venv/bin/python bench/gpu_stage.py --stage sft --steps 200
    .venv/bin/python bench/gpu_stage.py --allow-cpu --steps 10 --peak-tflops 0.9   # the script itself, on a CPU

What it does, in a scratch copy of the working tree (bench/pipeline.py's snapshot: this project is untouched):
1. writes `preset: small` and `<stage>.max_steps` / `<stage>.eval_steps` into the copy's params.yaml;
2. runs the stages before it with `instructflow stage` (prepare and tokenizer for pretrain; up to pretrain
   for sft: those run as a user runs them, wherever they want to run);
3. runs the stage itself in this process, as `dvc repro` would run it (`tasks.runtime.run_stage`, its MLflow
   run into the copy's store), with one process (INSTRUCTFLOW_NPROC=1: the forward hook below sees only this
   process) and a global forward hook on every Hugging Face model call that records the device of each tensor
   going in and coming out, in training and in evaluation (`model.training` tells them apart);
4. asserts that every model call, training and evaluation alike, ran on the GPU with its tensors there
   (`--allow-cpu`: on the CPU, to check the script where there is no GPU), that there were both, and that the
   stage's own device choice (`models.training.pick_device`) is that device;
5. prints the training tokens/s (the median of the logged rows after the first, non-pad tokens: the loop's
   own `tokens_per_sec`, evaluation excluded) and MFU = model FLOPs per token x tokens/s / peak FLOP/s, where
   FLOPs per token = 6 x (parameters in matrix products) + 12 x layers x hidden x sequence length (attention
   scores and values, forward and backward; PaLM's appendix B). The peak is the GPU's dense bf16 figure
   from the table below by device name, or `--peak-tflops`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from pipeline import isolated_env, snapshot  # noqa: E402

# dense bf16 tensor-core peaks (vendor datasheets, no sparsity), TFLOP/s, by a substring of the device name
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0,
                    "L4": 121.0, "A10G": 70.0, "A10": 125.0, "RTX 4090": 165.0, "V100": 125.0}
BEFORE = {"pretrain": "tokenizer", "sft": "pretrain"}


def peak_flops(device_name: str, override: float | None) -> tuple[float, str]:
    if override is not None:
        return override * 1e12, f"--peak-tflops {override:g}"
    for key, tflops in PEAK_BF16_TFLOPS.items():  # in order: "H100 PCIe" before "H100"
        if key in device_name:
            return tflops * 1e12, f"{key} dense bf16 {tflops:g} TFLOP/s"
    raise SystemExit(f"no peak FLOP/s known for '{device_name}': give --peak-tflops")


class DeviceHook:
    """Every call of a Hugging Face model: where its tensors were, in training and in evaluation."""

    def __init__(self) -> None:
        self.calls: Counter = Counter()  # (mode, device types seen) -> count

    def __call__(self, module, args, kwargs, output) -> None:
        from transformers import PreTrainedModel

        if not isinstance(module, PreTrainedModel):
            return
        devices = {t.device.type for t in _tensors((args, kwargs, output))}
        devices |= {p.device.type for p in module.parameters(recurse=False)} | \
            {next(module.parameters()).device.type}
        self.calls[("train" if module.training else "eval", tuple(sorted(devices)))] += 1


def _tensors(value):
    import torch

    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict) or hasattr(value, "items"):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def flops_per_token(model_dir: Path, seq_len: int) -> tuple[float, int]:
    """6 x matmul parameters + 12 x layers x hidden x seq_len, and the parameter count."""
    from transformers import AutoConfig
    from safetensors import safe_open

    config = AutoConfig.from_pretrained(model_dir)
    total, embedding = 0, 0
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        for name in f.keys():
            numel = f.get_slice(name).get_shape()
            count = 1
            for d in numel:
                count *= d
            total += count
            if name.endswith("embed_tokens.weight"):
                embedding = count
    tied = getattr(config, "tie_word_embeddings", False)
    matmul = total if tied else total - embedding  # a lookup is no matmul; a tied table is the LM head's too
    return 6 * matmul + 12 * config.num_hidden_layers * config.hidden_size * seq_len, total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=sorted(BEFORE), default="pretrain")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's peak (default: by name)")
    parser.add_argument("--allow-cpu", action="store_true", help="run on the CPU when there is no GPU")
    parser.add_argument("--keep", action="store_true", help="keep the scratch project")
    args = parser.parse_args()

    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        raise SystemExit("no GPU visible (torch.cuda.is_available() is False); --allow-cpu checks the script here")
    expected = "cuda" if cuda else "cpu"
    device_name = torch.cuda.get_device_name(0) if cuda else "CPU"
    peak, peak_source = peak_flops(device_name, args.peak_tflops)

    scratch = Path(tempfile.mkdtemp(prefix="instructflow-gpu-stage-"))
    project = scratch / "project"
    project.mkdir()
    snapshot(ROOT, project)
    venv_bin = ROOT / ".venv" / "bin"
    if not (venv_bin / "instructflow").is_file():
        venv_bin = Path(sys.executable).parent
    env = {**isolated_env(project, venv_bin), "INSTRUCTFLOW_NPROC": "1"}

    from instructflow.config import load_params, write_overrides

    overrides = [f"{args.stage}.max_steps={args.steps}", f"{args.stage}.eval_steps={max(args.steps // 2, 1)}"]
    load_params(project / "params.yaml", overrides, "small")  # validated first, as `run` does
    write_overrides(project / "params.yaml", overrides, "small")
    print(f"scratch project {project}; small preset, {args.stage} for {args.steps} steps on {device_name}")
    started = time.perf_counter()
    before = subprocess.run([str(venv_bin / "instructflow"), "stage", BEFORE[args.stage], "--root", str(project)],
                            cwd=project, env=env, capture_output=True, text=True)
    if before.returncode != 0:
        print(before.stdout[-3000:], before.stderr[-3000:])
        raise SystemExit(f"the stages before {args.stage} failed (exit {before.returncode})")
    print(f"stages up to {BEFORE[args.stage]}: {time.perf_counter() - started:.0f} s")

    # the stage itself, here: the copy's project and store, one process, the hook on every model call
    os.environ.update(env)  # (the copy's code is this checkout's: the snapshot was taken from it just now)
    import importlib

    from torch.nn.modules.module import register_module_forward_hook

    hook = DeviceHook()
    handle = register_module_forward_hook(hook, with_kwargs=True)
    runtime = importlib.import_module("tasks.runtime")
    stage_module = importlib.import_module(f"tasks.{args.stage}")
    training = importlib.import_module("models.training")
    picked = training.pick_device().type
    started = time.perf_counter()
    try:
        runtime.run_stage(args.stage, stage_module.body)
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise SystemExit(f"stage {args.stage} failed (exit {exc.code}); its log is above")
    finally:
        handle.remove()
    wall = time.perf_counter() - started

    assert picked == expected, f"the stages would train on {picked}, not {expected}"
    for mode in ("train", "eval"):
        assert any(m == mode for m, _ in hook.calls), f"no model call in {mode} mode was seen"
    elsewhere = {key: n for key, n in hook.calls.items() if key[1] != (expected,)}
    assert not elsewhere, f"model calls with tensors off {expected}: {elsewhere}"
    print("device check: " + ", ".join(f"{n} {mode} calls on {'/'.join(devs)}"
                                       for (mode, devs), n in sorted(hook.calls.items())))

    out = project / "artifacts" / args.stage
    # the loop's logged tokens_per_sec, per logged row, from the stage's MLflow run (history.csv leaves out
    # what varies from run to run, so that a rerun writes the same bytes)
    from mlflow.tracking import MlflowClient

    run_id = json.loads((project / "lineage" / f"{args.stage}.json").read_text())["mlflow_run_id"]
    logged = sorted(MlflowClient().get_metric_history(run_id, "tokens_per_sec"), key=lambda m: m.step)
    rates = [m.value for m in logged[1:] or logged]  # the first row carries the warmup
    tokens_per_sec = statistics.median(rates)
    params = load_params(project / "params.yaml")
    seq_len = params.pretrain.seq_len if args.stage == "pretrain" else params.sft.max_length
    per_token, n_params = flops_per_token(out, seq_len)
    mfu = per_token * tokens_per_sec / peak
    print(f"\n{args.stage} on {device_name}: {n_params / 1e6:.1f}M parameters, sequence length {seq_len}, "
          f"{args.steps} steps in {wall:.0f} s (setup and evaluation included)")
    print(f"  tokens/s (median of {len(rates)} logged rows): {tokens_per_sec:,.0f}")
    print(f"  FLOPs per token: {per_token / 1e9:.3f} GFLOP (6 x matmul parameters + attention)")
    print(f"  MFU: {mfu:.1%} of {peak / 1e12:g} TFLOP/s ({peak_source})")
    if args.keep:
        print(f"kept: {project}")
    else:
        import shutil

        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

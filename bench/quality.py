"""Quality over seeds: the pipeline run once per seed, each stage's figures as mean, spread and range.

One run tells little at these sizes (two tiny runs of the same code gave reward accuracies 0.59 and
0.54). This runs `instructflow run --set seed=S` for S = seed, seed+1, ... in scratch copies of the working
tree (as bench/pipeline.py does), then prints, for every quality figure the stages write, the value per
seed, the mean, the sample standard deviation and the range, so a gain can be told from noise.

    .venv/bin/python bench/quality.py --preset tiny --seeds 3
    .venv/bin/python bench/quality.py --preset micro --seeds 2 --set tracks.encoder=true
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from pipeline import isolated_env, run_pipeline, snapshot  # noqa: E402  (bench/pipeline.py)

# the stages whose metrics are quality figures, and the figures left out of the table (counts, bounds)
QUALITY_STAGES = ("pretrain", "sft", "reward", "align", "evaluate", "mlm", "classify", "similarity")
LEFT_OUT_SUFFIX = ("_ci_low", "_ci_high")
LEFT_OUT_PREFIX = ("n_", "train_", "eval_pairs", "pairs_drawn", "num_labels", "val_rows", "test_rows",
                   "trainable_params", "track_chosen", "loss", "eval_loss")


def figures(project: Path) -> dict[str, float]:
    out = {}
    for stage in QUALITY_STAGES:
        path = project / "metrics" / f"{stage}.json"
        if not path.is_file():
            continue
        for key, value in json.loads(path.read_text()).items():
            name = key.rsplit(".", 1)[-1]
            if isinstance(value, (int, float)) and not name.endswith(LEFT_OUT_SUFFIX) and \
                    not name.startswith(LEFT_OUT_PREFIX):
                out[f"{stage}.{key}"] = float(value)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny", choices=["micro", "tiny", "small"])
    ap.add_argument("--seeds", type=int, default=3, help="how many seeds (default 3)")
    ap.add_argument("--seed", type=int, default=1234, help="the first seed (default: params.yaml's 1234)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--keep", action="store_true", help="keep the scratch projects")
    args = ap.parse_args()

    venv_bin = ROOT / ".venv" / "bin"
    if not (venv_bin / "instructflow").is_file():
        venv_bin = Path(sys.executable).parent
    scratch = Path(tempfile.mkdtemp(prefix="instructflow-quality-"))
    per_seed: dict[int, dict[str, float]] = {}
    walls: dict[int, float] = {}
    try:
        for seed in range(args.seed, args.seed + args.seeds):
            project = scratch / f"seed-{seed}"
            project.mkdir()
            snapshot(ROOT, project)
            cmd = [str(venv_bin / "instructflow"), "run", "--preset", args.preset, "--set", f"seed={seed}",
                   *(x for o in args.overrides for x in ("--set", o))]
            print(f"seed {seed}: {' '.join(cmd[1:])}  (load average {os.getloadavg()[0]:.2f})", flush=True)
            code, wall, output = run_pipeline(cmd, project, isolated_env(project, venv_bin),
                                              scratch / f"seed-{seed}.log", echo=False)
            if code != 0:
                print("\n".join(output.splitlines()[-30:]))
                print(f"seed {seed} failed (exit {code}); log: {scratch / f'seed-{seed}.log'}")
                args.keep = True
                return code
            per_seed[seed], walls[seed] = figures(project), wall
            print(f"  done in {wall:.0f}s", flush=True)

        seeds = list(per_seed)
        keys = sorted({k for f in per_seed.values() for k in f})
        width = max(len(k) for k in keys)
        print(f"\n{'figure':{width}}  " + "  ".join(f"{'seed ' + str(s):>10}" for s in seeds) +
              f"  {'mean':>9} {'sd':>8} {'min':>9} {'max':>9}")
        for key in keys:
            values = [per_seed[s][key] for s in seeds if key in per_seed[s]]
            sd = statistics.stdev(values) if len(values) > 1 else float("nan")
            cells = "  ".join(f"{per_seed[s][key]:10.4g}" if key in per_seed[s] else f"{'-':>10}" for s in seeds)
            print(f"{key:{width}}  {cells}  {statistics.mean(values):9.4g} {sd:8.3g} {min(values):9.4g} "
                  f"{max(values):9.4g}")
        print("\nwall time per run: " + ", ".join(f"seed {s} {w:.0f}s" for s, w in walls.items()) +
              f" ({args.preset} preset, {os.cpu_count()} cores)")
        return 0
    finally:
        if args.keep:
            print(f"kept: {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

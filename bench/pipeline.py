"""The whole pipeline, end to end, in a scratch copy of the project: wall time per stage, then a no-op rerun.

    make bench                                   # tiny preset (about 13 minutes on 2 cores)
    .venv/bin/python bench/pipeline.py --preset micro --keep

It copies the working tree as it is (tracked and untracked files that git does not ignore: uncommitted work
included, no outputs, no caches) into a temp folder, commits it to a fresh git repository there (DVC
needs one; `.dvc/` comes with the copy), and runs `instructflow run --preset P` in it with its own Prefect
home and MLflow store, so nothing of this project is touched. Then it runs the pipeline again: with
nothing changed, DVC should skip every stage, and the figure is the fixed cost of a pipeline run.

It prints figures; it asserts nothing (a failed run prints its log tail and exits with its code).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from apps.cli import KEY_METRICS, stage_figures  # noqa: E402
from instructflow.stages import NAMES as STAGES  # noqa: E402
from tasks.tracking import PARENT_ENV  # noqa: E402

# flows/pipeline.py logs "stage <name> <status> in <s>s" for each stage (off: its track is not chosen), and the
# CLI titles its summary table
STAGE_LINE = re.compile(r"stage (\w+) (ran|skipped|restored|failed|off) in ([\d.]+)s")
TITLE = re.compile(r"instructflow pipeline \((\w+) preset\) in (\d+)s")


def snapshot(src: Path, dest: Path) -> int:
    """Copy src's tracked + untracked, not-ignored files to dest and commit them there; the number of files."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=src, check=True,
                            capture_output=True).stdout.decode().split("\0")
    count = 0
    for rel in filter(None, listed):
        source = src / rel
        if not source.is_file():  # deleted in the working tree but still tracked
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
        count += 1
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "-c", "init.defaultBranch=main"]
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "bench snapshot"]):
        subprocess.run(git + cmd, cwd=dest, check=True, capture_output=True)
    return count


def isolated_env(project: Path, venv_bin: Path) -> dict[str, str]:
    """The environment of the scratch run: its own root, Prefect home and MLflow store, its own code first."""
    env = {k: v for k, v in os.environ.items()
           if k not in {PARENT_ENV, "PREFECT_API_URL", "PREFECT_PROFILES_PATH", "MLFLOW_RUN_ID"}}
    env.update({
        "INSTRUCTFLOW_ROOT": str(project),
        "PREFECT_HOME": str(project / ".prefect"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}",
        "HF_HOME": str(project / ".prefect" / "hf-home"),
        "PYTHONPATH": str(project),  # the copy's code, not the editable install's (which points here)
        "PATH": f"{venv_bin}{os.pathsep}{env.get('PATH', '')}",
        "COLUMNS": "160",
    })
    return env


def run_pipeline(cmd: list[str], project: Path, env: dict, log_path: Path, echo: bool) -> tuple[int, float, str]:
    """Run the CLI, writing its output to log_path (and the terminal with echo); (exit code, wall s, output)."""
    started = time.perf_counter()
    with log_path.open("w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)
        for line in proc.stdout:
            log.write(line)
            if echo:
                sys.stdout.write(line)
        code = proc.wait()
    return code, time.perf_counter() - started, log_path.read_text(encoding="utf-8")


def stage_results(output: str) -> dict[str, tuple[str, float]]:
    return {m.group(1): (m.group(2), float(m.group(3))) for m in STAGE_LINE.finditer(output)}


LOG_LINE = re.compile(r"^(\d\d):(\d\d):(\d\d)\.(\d{3}) \| \w+ +\| Task run '([\w-]+)' - (.*)$")


def overheads(output: str) -> dict[str, dict[str, float]]:
    """Where each stage's time went, from the Prefect log's timestamps (a stage that ran):

    dvc_start: the stage's turn began -> DVC starts its command (the flow's status check, `dvc repro` start-up
    and DVC's own check); imports: the command starts -> the stage's first log line (Python, torch,
    transformers, MLflow imports and the MLflow run); work: the stage's own timer; lock: the stage ends ->
    the task ends (DVC hashes the outputs and writes dvc.lock).
    """
    seen: dict[str, dict[str, float]] = {}
    for line in output.splitlines():
        m = LOG_LINE.match(line)
        if not m:
            continue
        h, mi, sec, ms, stage, text = m.groups()
        t = int(h) * 3600 + int(mi) * 60 + int(sec) + int(ms) / 1000
        marks = seen.setdefault(stage, {})
        if text.startswith("> python -m tasks."):
            marks["cmd"] = t
        elif f"instructflow: stage {stage}: preset" in text:
            marks["first"] = t
        elif work := re.search(rf"instructflow: stage {stage} done in ([\d.]+)s", text):
            marks["done"], marks["work"] = t, float(work.group(1))
        elif ran := re.match(rf"stage {stage} ran in ([\d.]+)s", text):
            marks["end"], marks["wall"] = t, float(ran.group(1))
    out = {}
    for stage, m in seen.items():
        if {"cmd", "first", "done", "end", "wall"} <= set(m):
            out[stage] = {"dvc_start": m["wall"] - (m["end"] - m["cmd"]), "imports": m["first"] - m["cmd"],
                          "work": m["work"], "lock": m["end"] - m["done"]}
    return out


def print_overheads(output: str) -> None:
    rows = overheads(output)
    if not rows:
        return
    print(f"\n{'stage':10} {'dvc start':>9} {'imports':>8} {'work':>8} {'lock':>8}   (seconds; stages that ran)")
    for stage, r in rows.items():
        print(f"{stage:10} {r['dvc_start']:9.1f} {r['imports']:8.1f} {r['work']:8.1f} {r['lock']:8.1f}")
    total = {k: sum(r[k] for r in rows.values()) for k in ("dvc_start", "imports", "work", "lock")}
    print(f"{'sum':10} {total['dvc_start']:9.1f} {total['imports']:8.1f} {total['work']:8.1f} {total['lock']:8.1f}")


def read_metrics(project: Path) -> dict[str, dict]:
    """Each stage's figures: metrics/<stage>.json, with lineage/<stage>.json's timings (wall_time_s, tokens/s)."""
    return {stage: stage_figures(project, stage) for stage in STAGES}


def fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


def print_table(results: dict[str, tuple[str, float]], metrics: dict[str, dict]) -> None:
    rows = [(s, *results[s]) for s in STAGES if s in results]
    print(f"{'stage':10} {'status':9} {'task s':>8} {'stage s':>8}  key metrics")
    print(f"{'':10} {'':9} {'(flow)':>8} {'(lineage)':>8}")
    for stage, status, wall in rows:
        m = metrics.get(stage, {})
        stage_wall = m.get("wall_time_s")
        figures = " ".join(f"{k}={fmt(m[k])}" for k in KEY_METRICS.get(stage, ()) if k in m)
        print(f"{stage:10} {status:9} {wall:8.1f} {fmt(stage_wall) if stage_wall is not None else '-':>8}  {figures}")
    task_sum = sum(w for _, _, w in rows)
    stage_sum = sum(metrics.get(s, {}).get("wall_time_s", 0.0) for s, _, _ in rows)
    print(f"{'sum':10} {'':9} {task_sum:8.1f} {stage_sum:8.1f}")
    print(f"  task s - stage s = {task_sum - stage_sum:.1f}s: `dvc repro`, process start and imports, MLflow, "
          f"outside the stages' own timers")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny", choices=["micro", "tiny", "small"], help="default: tiny")
    ap.add_argument("--keep", action="store_true", help="keep the scratch project (its path is printed)")
    ap.add_argument("--echo", action="store_true", help="stream the pipeline's own output too")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="passed to `instructflow run --set` (repeatable), e.g. tracks.encoder=true")
    args = ap.parse_args()

    venv_bin = ROOT / ".venv" / "bin"
    if not (venv_bin / "instructflow").is_file():
        venv_bin = Path(sys.executable).parent
    cli = venv_bin / "instructflow"
    scratch = Path(tempfile.mkdtemp(prefix="instructflow-bench-"))
    project = scratch / "project"
    project.mkdir()
    try:
        n_files = snapshot(ROOT, project)
        env = isolated_env(project, venv_bin)
        cmd = [str(cli), "run", "--preset", args.preset, *(x for o in args.overrides for x in ("--set", o))]
        print(f"scratch project: {project} ({n_files} files from {ROOT})")
        print(f"running: {' '.join(cmd)}  (cores: {os.cpu_count()}, load average {os.getloadavg()[0]:.2f})\n")

        code, wall, output = run_pipeline(cmd, project, env, scratch / "run-1.log", args.echo)
        if code != 0:
            print("\n".join(output.splitlines()[-40:]))
            print(f"\npipeline failed (exit {code}) after {wall:.1f}s; full log: {scratch / 'run-1.log'}")
            args.keep = True
            return code
        print_table(stage_results(output), read_metrics(project))
        print_overheads(output)
        title = TITLE.search(output)
        flow_wall = f", flow {title.group(2)}s" if title else ""
        print(f"\nfirst run: {wall:.1f}s wall for `instructflow run` ({args.preset} preset{flow_wall}; "
              f"the rest is process start, Prefect's ephemeral server and MLflow)")

        code, wall2, output2 = run_pipeline(cmd, project, env, scratch / "run-2.log", args.echo)
        statuses = stage_results(output2)
        summary = ", ".join(f"{s} {status}" for s, (status, _) in statuses.items())
        if "Nothing changed since the last run" in output2:  # the CLI answered from DVC; no flow ran
            summary = "DVC found every stage up to date; no flow run was started"
        print(f"second run (nothing changed): {wall2:.1f}s wall, exit {code}; {summary}")
        not_skipped = [s for s, (status, _) in statuses.items() if status not in {"skipped", "off"}]
        if not_skipped:
            print(f"  not skipped: {', '.join(not_skipped)}")
        print(f"load average after: {os.getloadavg()[0]:.2f}")
        return 0
    finally:
        if args.keep:
            print(f"kept: {project} (logs in {scratch})")
        else:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

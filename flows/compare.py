"""`instructflow compare KEY=V1,V2,...`: the values of one param side by side, up to `evaluate`, nothing registered.

A comparison is a loop of pipeline runs that stop before `register`, one per value, on the machinery
`instructflow run` uses: each value is a Prefect flow run (`compare_variant`) that validates and writes its
overrides into params.yaml (flows/stage_task.py `pipeline_run`, as `run --set` does) and runs the stages up to
`evaluate` as stage tasks over `dvc repro --single-item` (`run_stage`). DVC decides what reruns, so a stage whose
inputs did not change is not rerun: comparing `align.*` values trains the SFT and reward models at most once
and every value aligns from the same ones.

- **Checked first.** Every value's params go through the same validation and preflight as `run` before any
  stage runs: a bad value stops the comparison naming the key, the value and what is allowed. A key that no
  stage up to `evaluate` reads (the rows would all be alike) is refused too.
- **Figures.** Per value, from metrics/align.json and metrics/evaluate.json: the policy's mean reward minus the
  SFT model's under the reward model, the win-rate against SFT with its interval (also on synthetic and real
  prompts apart), the KL to the reference, exact match (with the paired gain over SFT, per task kind where
  evaluate records one), align's own key metrics, where evaluate measured multi-task records their per-task exact
  match, all-N-correct, calls, tokens and seconds (`sft.multitask=joint,sequential,cumulative`), and the wall
  time of the stages that ran for it. One
  markdown table, `comparisons/compare.md`, with `comparisons/compare.json` beside it (not under `reports/`:
  that folder is evaluate's DVC output, which DVC empties when evaluate reruns and reports as modified when it
  holds a file of ours). MLflow gets one parent run `compare`: the key and values as params, each value's
  figures as metrics prefixed `<value>/`, the table and the JSON as artifacts, and each value's pipeline run
  (with its stage runs under it) nested under it.
- **A failed value** (a stage that fails) is a row marked failed with its error; the other values still run.
  A stop (Ctrl-C, SIGTERM) ends the comparison: the values not yet run are rows marked not run.
- **Put back afterwards**, whatever happened: params.yaml byte for byte as it was (dvc.yaml rendered for it), then every
  stage up to `evaluate` that was up to date before (or every one of them, when a value that completed had
  params.yaml's own params) is brought back to the original params with `dvc repro`, which checks its outputs
  out from DVC's run-cache (no training: the stage ran with those params before), and its lineage/<stage>.json
  is put back. `dvc status` then says what it said before.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable
from contextlib import chdir
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
from prefect import flow, get_run_logger

from flows.guard import preflight, upstream_closure
from flows.stage_task import StageFailed, TransientStageFailure, dvc_repro, pipeline_run, run_stage
from instructflow import signals
from instructflow.config import Params, load_params, parse_override
from instructflow.errors import ConfigError, InstructflowError
from instructflow.io import atomic_file
from instructflow.stages import BY_NAME, sync_dvc_yaml
from models.stats import gains_from_metrics
from tasks import zygote
from tasks.tracking import experiment_id, owner_tags

STAGES = upstream_closure("evaluate")  # prepare .. evaluate: a comparison never reaches register
OUT_DIR = "comparisons"
_CURRENT: dict[str, str | None] = {"run_id": None}  # the MLflow run of the variant flow in progress (this process)


# ------------------------------------------------------------------------------------------------ the plan
@dataclass
class Variant:
    """One value of the compared key: its params, and what happened when it ran."""

    label: str  # the value as typed
    value: Any  # parsed as YAML, as --set parses it
    overrides: list[str]  # the fixed --set overrides, then key=label
    params: Params
    status: str = "not run"  # ok | failed | stopped | not run
    error: str = ""
    stages: list[dict] = field(default_factory=list)
    elapsed_s: float = 0.0  # the whole flow run, Prefect's start included
    run_id: str | None = None  # its pipeline run in MLflow (nested under the compare run)
    align: dict = field(default_factory=dict)
    evaluate: dict = field(default_factory=dict)
    align_train_s: float | None = None  # the align stage's own wall time, from lineage when it is this value's

    @property
    def ran(self) -> list[str]:
        return [s["stage"] for s in self.stages if s["status"] == "ran"]

    @property
    def wall_s(self) -> float:
        """Seconds the stages that ran (or came back from the run-cache) for this value took."""
        return round(sum(s["wall_s"] for s in self.stages if s["status"] in ("ran", "restored")), 1)


@dataclass
class Plan:
    key: str
    variants: list[Variant]
    sets: list[str]
    preset: str | None


def split_values(raw: str) -> list[str]:
    """`0.1,0.5` -> ['0.1', '0.5']; commas inside brackets, braces or quotes belong to the value (`[a,b],[c]`)."""
    values, depth, quote, current = [], 0, "", ""
    for ch in raw:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            values.append(current.strip())
            current = ""
            continue
        current += ch
    values.append(current.strip())
    return values


def _at(data: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data


def read_by_stages(params: Params) -> dict[str, Any]:
    """The params the stages up to evaluate depend on (their DVC params: preset, seed, track, sections)."""
    data = params.model_dump(mode="json")
    keys: dict[str, Any] = {}
    for name in STAGES:
        s = BY_NAME[name]
        for key in ("preset", "seed", *((f"tracks.{s.track}",) if s.track else ()), *s.params, s.name):
            keys[key] = _at(data, key)
    return keys


def plan(project: Path, spec: str, sets: list[str] | None = None, preset: str | None = None) -> Plan:
    """Parse `key=v1,v2,...` and check every value's params as `run` checks them; raise ConfigError naming each
    bad value (key, value, what is allowed) before anything runs."""
    sets = list(sets or [])
    if "=" not in spec:
        raise ConfigError(f"compare {spec!r}: expected section.key=value1,value2,... (e.g. align.beta=0.1,0.5)")
    key, raw = (part.strip() for part in spec.split("=", 1))
    parts, _ = parse_override(f"{key}=0")
    key = ".".join(parts)
    if key == "preset" and preset is not None:
        raise ConfigError("compare preset=...: the values are the presets; leave out --preset")
    if any(parse_override(item)[0] == parts for item in sets):
        raise ConfigError(f"compare {key}: --set also sets {key}; the compared key takes its values from the list")
    labels = split_values(raw)
    if any(not label for label in labels):
        raise ConfigError(f"compare {key}={raw}: an empty value in the list (values are comma-separated)")
    if len(labels) < 2:
        raise ConfigError(f"compare {key}={raw}: give two values or more, comma-separated (e.g. {key}=a,b)")
    variants, problems, seen = [], [], {}
    for label in labels:
        _, value = parse_override(f"{key}={label}")
        marker = json.dumps(value, sort_keys=True, default=str)
        if marker in seen:
            problems.append(f"{key} = {label}: the same value as {seen[marker]} (each value once)")
            continue
        seen[marker] = label
        overrides = [*sets, f"{key}={label}"]
        try:
            params = load_params(project / "params.yaml", overrides, preset)
            if not params.tracks.decoder:
                raise ConfigError(f"{key} = {label}: tracks.decoder is false; compare runs the decoder track "
                                  f"({' -> '.join(STAGES)})")
            preflight(project, params, params.stages())
        except InstructflowError as exc:
            problems.append(f"{key} = {label}: {exc}")
            continue
        variants.append(Variant(label, value, overrides, params))
    if problems:
        raise ConfigError(f"compare {key}: nothing was run and params.yaml was not touched:\n  " +
                          "\n  ".join(p.replace("\n", "\n    ") for p in problems))
    if len({json.dumps(read_by_stages(v.params), sort_keys=True) for v in variants}) == 1:
        raise ConfigError(f"compare {key}: no stage up to evaluate ({', '.join(STAGES)}) reads {key}, so every "
                          f"value would give the same row; compare a key of those stages' sections "
                          f"(e.g. align.beta, align.algorithm, sft.lr)")
    experiment_id(variants[0].params.experiment, project)  # an MLflow store shared with another clone: refused here
    return Plan(key, variants, sets, preset)


# ------------------------------------------------------------------------------------------ one variant
@flow(name="instructflow-compare", log_prints=True)
def compare_variant(overrides: list[str], preset: str | None = None, root: str | None = None) -> list[dict]:
    """One value of a comparison: params written as `run --set` writes them, the stages up to evaluate (DVC
    skips those up to date), never register. The same pipeline run and stage tasks as `instructflow run`."""
    with pipeline_run(preset, overrides, root) as ctx:
        _CURRENT["run_id"] = ctx.parent_run_id
        mlflow.set_tag("instructflow.until", "evaluate")
        get_run_logger().info("compare: %s only; register does not run", " -> ".join(STAGES))
        futures: dict[str, Any] = {}
        for name in STAGES:  # the stage table's edges, as flows/pipeline.py states them
            after = [futures[u] for u in BY_NAME[name].upstream if u in futures]
            futures[name] = run_stage.with_options(name=name, task_run_name=name).submit(name, ctx, wait_for=after)
        return ctx.collect(list(futures.values()))


def run_variant(project: Path, variant: Variant, preset: str | None, key: str) -> None:
    """Run one value; record its stages, figures and error. A stop signal propagates (KeyboardInterrupt)."""
    _CURRENT["run_id"] = None
    started = time.perf_counter()
    try:
        variant.stages = compare_variant.with_options(flow_run_name=f"compare {key}={variant.label}")(
            overrides=variant.overrides, preset=preset, root=str(project))
        variant.status = "ok"
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt) or signals.received() is not None:  # stopped (or Prefect's crash after)
            variant.status, variant.error = "stopped", f"stopped by {signals.name(signals.received() or 2)}"
            raise signals.Interrupted(signals.received() or 2) from exc
        if not isinstance(exc, Exception):
            raise
        # a stage failed (StageFailed), or the flow could not run: this value's row says so, the others still run
        variant.status, variant.error = "failed", str(exc) or type(exc).__name__
    finally:
        variant.elapsed_s = round(time.perf_counter() - started, 1)
        variant.run_id = _CURRENT["run_id"]
    for name in ("align", "evaluate"):
        path = project / "metrics" / f"{name}.json"
        setattr(variant, name, json.loads(path.read_text()) if path.is_file() else {})
    lineage = project / "lineage" / "align.json"
    if lineage.is_file():
        record = json.loads(lineage.read_text())
        if record.get("params_hash") == variant.params.digest():  # the run that made this value's align output
            variant.align_train_s = record.get("wall_time_s")
    lineage = project / "lineage" / "evaluate.json"  # multitask_seconds is volatile: lineage, not metrics
    if lineage.is_file() and variant.evaluate:
        record = json.loads(lineage.read_text())
        if record.get("params_hash") == variant.params.digest() and "multitask_seconds" in record:
            variant.evaluate = {**variant.evaluate, "multitask_seconds": record["multitask_seconds"]}


# ------------------------------------------------------------------------------------------ putting back
@dataclass
class Snapshot:
    """What the workspace was before the comparison: params.yaml's bytes, which stages up to evaluate were up to
    date, their lineage files. dvc.yaml is rendered from the stage table and params.yaml, so it is rendered
    again after, not copied back (a copy of a stale one would change the stages' deps and miss DVC's run-cache)."""

    root: Path
    files: dict[str, bytes]
    up_to_date: dict[str, bool]
    lineage: dict[str, bytes]
    digest: str | None  # of the params params.yaml resolves to

    @classmethod
    def take(cls, root: Path) -> "Snapshot":
        sync_dvc_yaml(root)  # as `run` does first: DVC's verdicts below are on the current stage graph
        files = {"params.yaml": (root / "params.yaml").read_bytes()}
        changed = dvc_changed(root)
        lineage = {s: (root / "lineage" / f"{s}.json").read_bytes() for s in STAGES
                   if (root / "lineage" / f"{s}.json").is_file()}
        try:
            digest = load_params(root / "params.yaml").digest()
        except InstructflowError:
            digest = None
        return cls(root, files, {s: s not in changed for s in STAGES}, lineage, digest)

    def put_params_back(self) -> list[str]:
        """params.yaml byte for byte as it was, dvc.yaml rendered for it; the names of those that changed."""
        back = []
        for name, data in self.files.items():
            path = self.root / name
            if not path.is_file() or path.read_bytes() != data:
                with atomic_file(path) as fh:
                    fh.write(data)
                back.append(name)
        if sync_dvc_yaml(self.root):
            back.append("dvc.yaml")
        return back

    def restore(self, parent_run_id: str | None, emit: Callable[[str], None], variants: list[Variant]) -> dict:
        """params.yaml back, then the stages DVC's run-cache holds for it brought back: those up to date before,
        and every one when a value that completed had the very params of params.yaml (the original value among
        the values compared); a stage out of date before and not cached stays as DVC finds it."""
        started = time.perf_counter()
        done = {"files": self.put_params_back(), "stages": {}, "problems": []}
        cached = any(v.status == "ok" and v.params.digest() == self.digest for v in variants)
        for name in STAGES:
            if not (self.up_to_date[name] or cached):
                continue  # out of date before the comparison and never run on these params: DVC says so still
            try:
                status = dvc_repro(name, self.root, parent_run_id, emit)
            except StageFailed as exc:
                done["problems"].append(f"{name}: {exc}")
                break
            done["stages"][name] = status
            if status == "restored" and name in self.lineage:  # the outputs are the original run's again
                with atomic_file(self.root / "lineage" / f"{name}.json") as fh:
                    fh.write(self.lineage[name])
        changed = dvc_changed(self.root)
        done["not_back"] = [s for s in STAGES if (self.up_to_date[s] or cached) and s in changed]
        done["seconds"] = round(time.perf_counter() - started, 1)
        return done


def dvc_changed(root: Path) -> set[str]:
    """The stages up to evaluate that DVC finds out of date (one status call, in this process)."""
    from dvc.lock import LockError
    from dvc.repo import Repo

    if not (root / "dvc.lock").is_file():
        return set(STAGES)
    try:
        with chdir(root), Repo(str(root)) as repo:
            return {name.split(":")[-1] for name in repo.status(targets=list(STAGES))}
    except LockError as exc:
        raise TransientStageFailure(f"DVC is busy in this checkout: {exc}") from None


# ---------------------------------------------------------------------------------------------- figures
def _ci(metrics: dict, key: str) -> dict | None:
    if key not in metrics:
        return None
    out = {"value": metrics[key]}
    if f"{key}_ci_low" in metrics:
        out.update(ci_low=metrics[f"{key}_ci_low"], ci_high=metrics[f"{key}_ci_high"])
    return out


def figures(variant: Variant) -> dict[str, Any]:
    """The comparable figures of one value (None where its metrics do not have them)."""
    ev = variant.evaluate if variant.status == "ok" else {}
    al = variant.align if variant.status == "ok" else {}
    out: dict[str, Any] = {}
    if "policy_mean_reward" in ev and "sft_mean_reward" in ev:
        out["reward_gain"] = ev["policy_mean_reward"] - ev["sft_mean_reward"]
    for key in ("policy_mean_reward", "sft_mean_reward", "win_rate", "win_rate_synthetic", "win_rate_real",
                "kl_to_reference", "exact_match", "sft_exact_match"):
        out[key] = _ci(ev, key)
    for g in gains_from_metrics(ev):  # the policy against SFT, paired: overall and per task kind where recorded
        if g.stage == "align" and g.metric == "exact_match":
            out[f"exact_match_gain.{g.subset}"] = {"value": g.gain, "ci_low": g.ci_low, "ci_high": g.ci_high,
                                                  "model": g.model_value, "baseline": g.baseline_value, "n": g.n}
    for key in BY_NAME["align"].key_metrics:
        out[f"align.{key}"] = al.get(key)
    out["wall_s"] = variant.wall_s if variant.status != "not run" else None
    out["align_train_s"] = variant.align_train_s if variant.status == "ok" else None
    # multi-task records (evaluate, under sft.multitask), where evaluate measured them
    per_task = (k for k in ev if k.startswith("multitask_exact_match_") and not k.endswith(("_ci_low", "_ci_high")))
    for key in sorted(per_task):
        out[key] = _ci(ev, key)
    if "multitask_all_correct" in ev:
        out["multitask_all_correct"] = _ci(ev, "multitask_all_correct")
        for key in ("multitask_calls_per_record", "multitask_tokens_per_record", "multitask_seconds"):
            out[key] = ev.get(key)
    return out


def _num(x: float | None, signed: bool = False, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def _cell(f: dict | None, signed: bool = False) -> str:
    if not f:
        return "–"
    if "ci_low" in f:
        return f"{_num(f['value'], signed)} [{_num(f['ci_low'], signed)}, {_num(f['ci_high'], signed)}]"
    return _num(f["value"], signed)


def short_error(error: str, limit: int = 200) -> str:
    """A failed value's cell: the stage that failed and the stage's own error line (its log's `ERROR instructflow:`),
    else the message's first and last lines; the whole message is in compare.json."""
    lines = [line.strip() for line in error.splitlines() if line.strip()]
    if not lines:
        return ""
    said = [m.group(1) for line in lines if (m := re.search(r"ERROR instructflow: (?:stage \S+ failed: )?(.*)", line))]
    if said:
        text = f"{lines[0].split(' (dvc repro')[0]}: {said[0]}"
    else:
        text = lines[0] if len(lines) == 1 else f"{lines[0]} … {lines[-1]}"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def table(plan_: Plan) -> tuple[list[str], list[list[str]]]:
    """The comparison's one table: its header and a row per value (also what the CLI prints)."""
    rows_figures = [figures(v) for v in plan_.variants]
    kinds = sorted({k.split(".", 1)[1] for f in rows_figures for k in f if k.startswith("exact_match_gain.")}
                   - {"all"})
    align_keys = [f"align.{k}" for k in BY_NAME["align"].key_metrics
                  if any(f.get(f"align.{k}") is not None for f in rows_figures)]
    tasks = sorted({k.removeprefix("multitask_exact_match_") for f in rows_figures for k in f
                    if k.startswith("multitask_exact_match_")})
    multitask = [*[f"multitask: {t} [CI]" for t in tasks], "multitask: all correct [CI]", "calls / record",
                 "tokens / record", "multitask s"] if tasks else []
    header = [plan_.key, "status", "reward gain over SFT", "win-rate vs SFT [CI]", "KL to SFT [CI]",
              "exact match [CI]", "exact match gain over SFT [CI]",
              *[f"exact match gain, {k} [CI]" for k in kinds], *align_keys, *multitask, "wall s (stages run)"]
    rows = []
    for v, f in zip(plan_.variants, rows_figures):
        status = {"failed": f"failed: {short_error(v.error)}", "stopped": v.error}.get(v.status, v.status)
        ran = ", ".join(v.ran) or ("none: up to date" if v.status == "ok" else "")
        if not v.ran and v.align_train_s is not None:  # made earlier: its align run's own time (lineage)
            ran += f"; align took {v.align_train_s:.1f} s when it ran"
        wall = f"{v.wall_s:.1f} ({ran})" if ran else "–"
        rows.append([v.label, status, _num(f.get("reward_gain"), signed=True, digits=4), _cell(f["win_rate"]),
                     _cell(f["kl_to_reference"]), _cell(f["exact_match"]),
                     _cell(f.get("exact_match_gain.all"), signed=True),
                     *[_cell(f.get(f"exact_match_gain.{k}"), signed=True) for k in kinds],
                     *[_num(f.get(k)) for k in align_keys],
                     *([*[_cell(f.get(f"multitask_exact_match_{t}")) for t in tasks],
                        _cell(f.get("multitask_all_correct")), _num(f.get("multitask_calls_per_record"), digits=2),
                        _num(f.get("multitask_tokens_per_record"), digits=1),
                        _num(f.get("multitask_seconds"), digits=1)] if tasks else []), wall])
    return header, rows


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(plan_: Plan, restore: dict, compare_run_id: str | None) -> str:
    header, rows = table(plan_)
    ok = [v for v in plan_.variants if v.status == "ok"]
    first = ok[0].evaluate if ok else {}
    fixed = " ".join(f"`--set {s}`" for s in plan_.sets)
    preset = plan_.variants[0].params.preset
    lines = [f"# Comparing {plan_.key}: {', '.join(v.label for v in plan_.variants)}", "",
             f"Preset {preset}{'; also ' + fixed if fixed else ''}. Each value ran the stages up to evaluate "
             f"({' -> '.join(STAGES)}; never register); DVC reran only what the value changes.", "",
             "| " + " | ".join(_md(h) for h in header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(_md(c) for c in row) + " |" for row in rows]
    if ok:
        lines += ["", "Reward gain: the policy's mean reward minus the SFT model's under the reward model (the same "
                  "prompts). Win-rate: the share of prompts whose policy samples the reward model scores above "
                  "SFT's (0.5 = a tie). Exact match: greedy answers to held-out synthetic tasks. Intervals: "
                  f"{ok[0].params.evaluate.confidence:.0%} bootstrap; gains over SFT are paired."]
    else:
        lines += ["", "No value completed."]
    sft = {(_cell(_ci(v.evaluate, 'sft_exact_match')), _num(v.evaluate.get('sft_mean_reward'))) for v in ok}
    if len(sft) == 1 and first:
        em, reward = sft.pop()
        lines += ["", f"SFT (the reference, the same for every value): exact match {em}, mean reward {reward}."]
    lines += ["", reading(plan_)]
    back = ", ".join(f"{s} {st}" for s, st in restore.get("stages", {}).items() if st != "skipped")
    lines += ["", "Afterwards params.yaml was put back as it was (byte for byte)"
              + (f" and DVC's run-cache gave back the original outputs ({back})" if back else "") + "."]
    if restore.get("not_back") or restore.get("problems"):
        lines.append(f"**Not put back**: {', '.join(restore.get('not_back', []))} "
                     f"{' '.join(restore.get('problems', []))}; run `instructflow stage evaluate`.")
    if compare_run_id:
        lines += ["", f"MLflow: run `compare` {compare_run_id} (each value's pipeline run nested under it)."]
    return "\n".join(lines) + "\n"


def reading(plan_: Plan) -> str:
    """One sentence for the user who must pick: the best win-rate, and whether the intervals can tell."""
    scored = [(v, figures(v)["win_rate"]) for v in plan_.variants if v.status == "ok"]
    scored = [(v, f) for v, f in scored if f]
    if len(scored) < 2:
        return "Too few values completed to compare."
    best, fb = max(scored, key=lambda item: item[1]["value"])
    others = [(v, f) for v, f in scored if v is not best]
    if "ci_low" in fb and all("ci_high" in f and fb["ci_low"] > f["ci_high"] for _, f in others):
        return (f"Highest win-rate against SFT: {plan_.key}={best.label} ({_cell(fb)}), its interval clear of "
                f"every other value's.")
    overlap = [v.label for v, f in others if "ci_high" in f and "ci_low" in fb and f["ci_high"] >= fb["ci_low"]]
    return (f"Highest win-rate against SFT: {plan_.key}={best.label} ({_cell(fb)}); its interval overlaps "
            f"{', '.join(overlap) or 'the others'}: at this size the evaluation does not tell them apart "
            f"(more reward_prompts or a larger preset narrow the intervals).")


def as_json(plan_: Plan, restore: dict, compare_run_id: str | None) -> dict:
    return {"key": plan_.key, "values": [v.label for v in plan_.variants], "set": plan_.sets,
            "preset": plan_.variants[0].params.preset, "stages": list(STAGES), "mlflow_run_id": compare_run_id,
            "restore": restore,
            "variants": [{"value": v.value, "label": v.label, "status": v.status, "error": v.error,
                          "wall_s": v.wall_s, "elapsed_s": v.elapsed_s, "ran": v.ran, "stages": v.stages and
                          {s["stage"]: {"status": s["status"], "wall_s": s["wall_s"]} for s in v.stages},
                          "params_hash": v.params.digest(), "mlflow_run_id": v.run_id, "figures": figures(v),
                          "align": v.align if v.status == "ok" else {},
                          "evaluate": v.evaluate if v.status == "ok" else {}} for v in plan_.variants]}


# ------------------------------------------------------------------------------------------------ MLflow
def _metric_name(label: str) -> str:
    return re.sub(r"[^\w.\- /]", "_", label)[:120] or "_"


def start_compare_run(plan_: Plan, project: Path) -> str:
    """The parent run `compare` (RUNNING while the values run; one killed outright is marked by the next run)."""
    client = mlflow.MlflowClient()
    params = plan_.variants[0].params
    run = client.create_run(experiment_id(params.experiment, project), run_name="compare",
                            tags={"instructflow.stage": "compare", "instructflow.preset": params.preset,
                                  "instructflow.compare_key": plan_.key, **owner_tags()})
    client.log_batch(run.info.run_id, params=[
        mlflow.entities.Param("key", plan_.key),
        mlflow.entities.Param("values", ",".join(v.label for v in plan_.variants)[:500]),
        mlflow.entities.Param("set", " ".join(plan_.sets)[:500] or "-"),
        mlflow.entities.Param("preset", params.preset)])
    return run.info.run_id


def log_variant(compare_run_id: str, plan_: Plan, variant: Variant) -> None:
    """A value's figures as `<value>/<figure>` metrics of the compare run; its pipeline run nested under it."""
    client = mlflow.MlflowClient()
    prefix = _metric_name(variant.label)
    stamp = int(time.time() * 1000)
    metrics = []
    for name, f in figures(variant).items():
        if isinstance(f, dict):
            metrics += [(f"{name}{suffix}", f[part]) for part, suffix in
                        (("value", ""), ("ci_low", "_ci_low"), ("ci_high", "_ci_high")) if part in f]
        elif isinstance(f, (int, float)):
            metrics.append((name, f))
    client.log_batch(compare_run_id, metrics=[mlflow.entities.Metric(f"{prefix}/{k}", float(v), stamp, 0)
                                              for k, v in metrics if v is not None and not math.isnan(float(v))])
    client.set_tag(compare_run_id, f"status.{prefix}", variant.status)
    if variant.run_id:
        client.set_tag(variant.run_id, "mlflow.parentRunId", compare_run_id)
        client.set_tag(variant.run_id, "mlflow.runName", f"compare {plan_.key}={variant.label}")
        client.set_tag(variant.run_id, "instructflow.compare", compare_run_id)


def end_compare_run(compare_run_id: str, root: Path, status: str) -> None:
    client = mlflow.MlflowClient()
    for name in ("compare.md", "compare.json"):
        client.log_artifact(compare_run_id, str(root / OUT_DIR / name))
    client.set_terminated(compare_run_id, status)


# ----------------------------------------------------------------------------------------------- the loop
def compare(project: Path, plan_: Plan, emit: Callable[[str], None]) -> tuple[dict, int | None]:
    """Run every value of the plan, put the workspace back, write the table and log it; (restore summary, the
    stop signal if one ended it). The caller holds the run lock and handles signals (deferred inside)."""
    import os

    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    snapshot = Snapshot.take(project)
    compare_run_id = start_compare_run(plan_, project)
    stopped: int | None = None
    status = "FINISHED"
    restore: dict = {}
    try:
        # a stop is taken between values, and by the stages inside one; one zygote serves every value's stages
        with signals.deferred(), zygote.serving(project):
            for variant in plan_.variants:
                signals.check()
                emit(f"compare {plan_.key}={variant.label}: {' '.join(variant.overrides)}")
                try:
                    run_variant(project, variant, plan_.preset, plan_.key)
                finally:
                    log_variant(compare_run_id, plan_, variant)
                emit(f"compare {plan_.key}={variant.label}: {variant.status} in {variant.elapsed_s:.0f}s"
                     + (f" ({short_error(variant.error)})" if variant.error else ""))
    except BaseException as exc:
        if not (isinstance(exc, KeyboardInterrupt) or signals.received() is not None):
            status = "FAILED"
            raise
        stopped = signals.received() or getattr(exc, "signum", 2)
        status = "KILLED"
    finally:
        snapshot.put_params_back()  # at once, whatever comes next
        signals.reset()  # a stop ends the values, not the putting back (a second stop ends that)
        try:
            with signals.deferred():
                restore = snapshot.restore(compare_run_id, emit, plan_.variants)
        except (KeyboardInterrupt, InstructflowError) as exc:
            problem = "stopped while putting the outputs back" if isinstance(exc, KeyboardInterrupt) else str(exc)
            restore = {"files": [], "stages": {}, "problems": [problem],
                       "not_back": [s for s in STAGES if snapshot.up_to_date[s]]}
            if isinstance(exc, KeyboardInterrupt):
                stopped, status = stopped or signals.received() or 2, "KILLED"
        out = project / OUT_DIR
        out.mkdir(exist_ok=True)
        with atomic_file(out / "compare.md") as fh:
            fh.write(render_markdown(plan_, restore, compare_run_id).encode())
        with atomic_file(out / "compare.json") as fh:
            fh.write((json.dumps(as_json(plan_, restore, compare_run_id), indent=2, default=str) + "\n").encode())
        end_compare_run(compare_run_id, project, status)
    return restore, stopped

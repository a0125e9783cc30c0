"""Stage `register`: log the policy and the reward model to MLflow, register them with their lineage,
and move `champion` through the promotion gate, all or nothing.

A new version gets the alias `challenger`; it becomes `champion` only when it beats the current champion
on `register.metric` (its confidence interval included, with `register.use_ci`). If anything fails after
an alias moved, the registry goes back to where it was (instructflow.registry.registry_transaction).
"""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path

import yaml

import instructflow  # noqa: F401
from instructflow import registry
from instructflow.config import Params
from instructflow.errors import InstructflowError
from instructflow.stage import atomic_dir, read_run_info, run_stage
from instructflow.tracking import StageRun, write_json_atomic

log = logging.getLogger("instructflow")


def git_commit(root: Path) -> str:
    """HEAD's commit, '-dirty' when tracked code differs from it; 'unknown' outside a git checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        # dvc.lock is rewritten by the run itself and params.yaml is in params_hash: neither makes the code dirty
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)dvc.lock", ":(exclude)params.yaml"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty else "")


def data_md5s(root: Path, stages: list[str]) -> dict[str, str]:
    """The DVC md5 of every data dependency (and the prepared data) of the given stages, from dvc.lock."""
    lock_path = root / "dvc.lock"
    if not lock_path.is_file():
        raise InstructflowError(f"{lock_path}: not found; run the pipeline through DVC (`dvc repro` or `instructflow run`)")
    lock = yaml.safe_load(lock_path.read_text()) or {}
    found = {}
    for stage in stages:
        entry = lock.get("stages", {}).get(stage, {})
        for item in entry.get("deps", []) + entry.get("outs", []):
            if item["path"].startswith("data/") and "md5" in item:
                found[f"data.{item['path']}.md5"] = item["md5"]
    if not found:
        raise InstructflowError(f"{lock_path}: no data dependency recorded for stages {stages}")
    return found


def lineage(params: Params, root: Path, made_by: dict[str, Path]) -> dict[str, str]:
    tags = {"git_commit": git_commit(root), "params_hash": params.digest(), "preset": params.preset,
            **data_md5s(root, ["prepare"])}
    for stage, folder in made_by.items():
        run_id = read_run_info(folder).get("mlflow_run_id")
        if not run_id:
            raise InstructflowError(f"{folder}/run.json: no MLflow run id for stage '{stage}'; rerun that stage")
        tags[f"run.{stage}"] = run_id
    return tags


def body(params: Params, root: Path, run: StageRun) -> dict:
    cfg = params.register
    art = root / "artifacts"
    plan = []  # (model name, folder, transformers task, metrics, gate metric)
    made_by = {"prepare": root / "data" / "prepared", "tokenizer": art / "tokenizer"}
    if params.tracks.decoder:
        evaluation = json.loads((root / "metrics" / "evaluate.json").read_text())
        check_metric(evaluation, cfg.metric, "register.metric", "evaluate")
        reward_metrics = {k: v for k, v in evaluation.items() if k.startswith("reward_accuracy")}
        plan += [(cfg.policy_name, art / "align", "text-generation", evaluation, cfg.metric),
                 (cfg.reward_name, art / "reward", "text-classification", reward_metrics, "reward_accuracy")]
        made_by.update({s: art / s for s in ("pretrain", "sft", "reward", "align")}, evaluate=root / "reports")
    if params.tracks.encoder:
        scores = json.loads((root / "metrics" / "classify.json").read_text())
        scores.update({f"mlm_{k}": v for k, v in json.loads((root / "metrics" / "mlm.json").read_text()).items()})
        check_metric(scores, cfg.classifier_metric, "register.classifier_metric", "classify")
        plan += [(cfg.encoder_name, art / "mlm", "feature-extraction", scores, cfg.classifier_metric),
                 (cfg.classifier_name, art / "classify", "text-classification", scores, cfg.classifier_metric)]
        made_by.update(mlm=art / "mlm", classify=art / "classify")
    tags = lineage(params, root, made_by)

    summary = {}
    with registry.registry_transaction([name for name, *_ in plan]):
        for name, folder, task, metrics, gate_metric in plan:
            version = registry.log_and_register(name, folder, task, tags, metrics, run_id=run.run_id)
            decision = registry.promote(name, version.version, gate_metric, cfg.greater_is_better, cfg.use_ci)
            summary[name] = {"version": int(version.version), "promoted": decision.promote,
                             "reason": decision.reason, "aliases": registry.aliases(name)}
        # the last step inside the transaction: if writing the record fails, the aliases move back
        with atomic_dir(root / "registry") as out:
            write_json_atomic(out / "register.json", {"models": summary, "lineage": tags})
    run.log_json(summary, "registry/summary.json")
    return {f"{name}.version": s["version"] for name, s in summary.items()} | \
        {f"{name}.promoted": int(s["promoted"]) for name, s in summary.items()}


def check_metric(metrics: dict, key: str, knob: str, stage: str) -> None:
    if key not in metrics:
        names = sorted(k for k in metrics if not k.endswith(("_ci_low", "_ci_high")))
        raise InstructflowError(f"params.yaml: {knob} = {key!r} is not a metric of stage '{stage}'; choose one of {names}")


def main() -> None:
    run_stage("register", body)


if __name__ == "__main__":
    main()

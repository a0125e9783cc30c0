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
from instructflow.stage import read_run_info, run_stage
from instructflow.tracking import StageRun, write_json_atomic

log = logging.getLogger("instructflow")


def git_commit(root: Path) -> str:
    """HEAD's commit, with '-dirty' when tracked files differ from it; 'unknown' outside a git checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
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
    evaluation = json.loads((root / "metrics" / "evaluate.json").read_text())
    if cfg.metric not in evaluation:
        raise InstructflowError(f"params.yaml: register.metric = {cfg.metric!r} is not an evaluation metric; "
                                f"choose one of {sorted(k for k in evaluation if not k.endswith(('_ci_low', '_ci_high')))}")
    made_by = {s: art / s for s in ("tokenizer", "pretrain", "sft", "reward", "align")}
    made_by["evaluate"] = root / "reports"
    made_by["prepare"] = root / "data" / "prepared"
    tags = lineage(params, root, made_by)
    reward_metrics = {k: v for k, v in evaluation.items() if k.startswith("reward_accuracy")}
    plan = [  # (model name, folder, transformers task, metrics, gate metric)
        (cfg.policy_name, art / "align", "text-generation", evaluation, cfg.metric),
        (cfg.reward_name, art / "reward", "text-classification", reward_metrics, "reward_accuracy"),
    ]
    summary = {}
    with registry.registry_transaction([name for name, *_ in plan]):
        for name, folder, task, metrics, gate_metric in plan:
            version = registry.log_and_register(name, folder, task, tags, metrics, run_id=run.run_id)
            decision = registry.promote(name, version.version, gate_metric, cfg.greater_is_better, cfg.use_ci)
            summary[name] = {"version": int(version.version), "promoted": decision.promote,
                             "reason": decision.reason, "aliases": registry.aliases(name)}
            log.info("%s v%s: %s", name, version.version, decision.reason)
        # the last step inside the transaction: if writing the record fails, the aliases move back
        write_json_atomic(root / "registry" / "register.json", {"models": summary, "lineage": tags})
    run.log_json(summary, "registry/summary.json")
    return {f"{name}.version": s["version"] for name, s in summary.items()} | \
        {f"{name}.promoted": int(s["promoted"]) for name, s in summary.items()}


def main() -> None:
    run_stage("register", body)


if __name__ == "__main__":
    main()

"""Stage `register`: log the policy and the reward model (decoder track) and the encoder, the classifier and
the sentence embedder (encoder track) to MLflow, register them with their lineage, and move `champion`
through the promotion gate, all or nothing (one transaction over every model).

A new version gets the alias `challenger`; it becomes `champion` only when it beats the current champion
on `register.metric` (its confidence interval included, with `register.use_ci`). If anything fails after
an alias moved, the registry goes back to where it was (tasks.registry.registry_transaction). Every
version is made and every gate decided before the first alias moves, so the models of one run move
together. Ctrl-C and SIGTERM roll back; after a SIGKILL the journal (checkpoints/register/transaction.json)
tells the next run to complete the alias moves or to undo the versions (`recover`), and it says which.

Same weights, no new version: a model folder whose weights (`weights_sha256`, a hash of its weight files)
are those of the version a new one would replace -- the `challenger` or the `champion` (the latest
version when the model has neither alias) -- is not registered again. That existing version goes through
the gate in its place: `challenger` points at it (it usually does already) and the gate compares its
recorded metrics with the champion's under today's `register` settings, so a changed gate still applies
while the weights stand still; on a plain rerun nothing moves. The summary (registry/register.json, the
stage's metrics `<model>.skipped`) says which models were skipped and why.
"""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path

import yaml

from instructflow import signals
from instructflow.config import Params
from instructflow.errors import InstructflowError
from instructflow.io import atomic_dir, write_json_atomic
from instructflow.stages import BASE_RESOLUTION
from tasks import base_model, registry
from tasks.runtime import lineage_path, read_lineage, run_stage
from tasks.tracking import StageRun, owner_tags

log = logging.getLogger("instructflow")


def git_commit(root: Path) -> str:
    """HEAD's commit, '-dirty' when tracked code differs from it; 'unknown' outside a git checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        # dvc.lock is rewritten by the run itself, params.yaml is in params_hash and a registry base model's
        # resolution (base/base_model.json) in the base_model.* tags: none makes the code dirty
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)dvc.lock", ":(exclude)params.yaml", f":(exclude){BASE_RESOLUTION}"], cwd=root,
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


def lineage(params: Params, root: Path, made_by: list[str]) -> dict[str, str]:
    """Version tags: the commit, the params hash, the data's DVC md5s and the MLflow run of every stage behind it.

    A stage's run id comes from lineage/<stage>.json, written by the run that made its current output. An
    output restored from DVC's cache in another checkout has no such record here: its tag says so. A policy
    fine-tuned from `pretrain.base_model` names its base: `base_model`, its weights hash, and the registry
    version (`base_model.name`, `.version`, `.run_id`) or the folder's DVC md5 (`base_model.dvc_md5`).
    """
    tags = {"git_commit": git_commit(root), "params_hash": params.digest(), "preset": params.preset,
            **data_md5s(root, ["prepare"])}
    for stage in made_by:
        run_id = read_lineage(root, stage).get("mlflow_run_id")
        if not run_id:
            log.warning("%s: no record of the run that made stage '%s' (restored from DVC's cache?)",
                        lineage_path(root, stage), stage)
        tags[f"run.{stage}"] = run_id or "unknown"
    if "align" in made_by:  # which of dpo, kto, ppo, grpo, rloo made the policy: the registry's first question
        tags["align.algorithm"] = params.align.algorithm
    if params.loop.enabled:  # the feedback loop: the round that made it, and the rounds of feedback behind it
        tags["loop.round"] = str(max(params.loop.round, 1))
        feedback = root / params.loop.feedback_dir
        tags["loop.feedback_rounds"] = str(len(list(feedback.glob("round_*.jsonl"))) if feedback.is_dir() else 0)
    base = root / "artifacts" / "pretrain" / "base_model.json"  # pretrain took pretrain.base_model: name it
    if "pretrain" in made_by and base.is_file():
        record = json.loads(base.read_text())
        tags.update(base_model.lineage_tags(record))
        lock = yaml.safe_load((root / "dvc.lock").read_text()) or {}
        for dep in lock.get("stages", {}).get("pretrain", {}).get("deps", []):
            if dep["path"] == record["base_model"] and "md5" in dep:  # a folder's content hash, as DVC has it
                tags["base_model.dvc_md5"] = dep["md5"]
    return tags


def journal_path(root: Path) -> Path:
    """Where an open registry transaction of this checkout keeps its journal (gone once it is over)."""
    return root / "checkpoints" / "register" / "transaction.json"


def recover(root: Path) -> str | None:
    """Settle a registry transaction a killed register left half-done; what was done (None: nothing)."""
    return registry.recover_transaction(journal_path(root))


def body(params: Params, root: Path, run: StageRun) -> dict:
    recover(root)
    cfg = params.register
    art = root / "artifacts"
    plan = []  # (model name, folder, transformers task, metrics, gate metric)
    made_by = ["prepare", "tokenizer"]
    if params.tracks.decoder:
        evaluation = json.loads((root / "metrics" / "evaluate.json").read_text())
        check_metric(evaluation, cfg.metric, "register.metric", "evaluate")
        reward_metrics = {k: v for k, v in evaluation.items() if k.startswith("reward_accuracy")}
        plan += [(cfg.policy_name, art / "align", "text-generation", evaluation, cfg.metric),
                 (cfg.reward_name, art / "reward", "text-classification", reward_metrics, "reward_accuracy")]
        made_by += ["pretrain", "sft", "reward", "align", "evaluate"]
    if params.tracks.encoder:
        scores = json.loads((root / "metrics" / "classify.json").read_text())
        scores.update({f"mlm_{k}": v for k, v in json.loads((root / "metrics" / "mlm.json").read_text()).items()})
        check_metric(scores, cfg.classifier_metric, "register.classifier_metric", "classify")
        embedding = json.loads((root / "metrics" / "similarity.json").read_text())
        check_metric(embedding, cfg.embedder_metric, "register.embedder_metric", "similarity")
        plan += [(cfg.encoder_name, art / "mlm", "feature-extraction", scores, cfg.classifier_metric),
                 (cfg.classifier_name, art / "classify", "text-classification", scores, cfg.classifier_metric),
                 (cfg.embedder_name, art / "similarity", "feature-extraction", embedding, cfg.embedder_metric)]
        made_by += ["mlm", "classify", "similarity"]
    tags = lineage(params, root, made_by)

    summary = {}
    with registry.registry_transaction([name for name, *_ in plan], journal_path(root),
                                       {**owner_tags(), "run_id": run.run_id}) as transaction:
        decided = {}  # first every version and every decision, then the alias moves together
        for name, folder, task, metrics, gate_metric in plan:
            registration = registry.register_unless_same(name, folder, task, tags, metrics, run_id=run.run_id)
            version = registration.version.version
            decided[name] = (registration, registry.gate(name, version, gate_metric, cfg.greater_is_better, cfg.use_ci))
            signals.fault_point(f"register.registered.{name}")
        transaction.commit({name: (reg.version.version, decision.promote) for name, (reg, decision) in decided.items()})
        for name, (registration, decision) in decided.items():
            registry.move_aliases(name, registration.version.version, decision)
            signals.fault_point(f"register.moved.{name}")
        for name, (registration, decision) in decided.items():
            summary[name] = {"version": int(registration.version.version), "skipped": registration.skipped is not None,
                             "skip_reason": registration.skipped, "weights_sha256": registration.weights_sha256,
                             "promoted": decision.promote, "reason": decision.reason, "aliases": registry.aliases(name)}
        # the last step inside the transaction: if writing the record fails, the aliases move back
        with atomic_dir(root / "registry") as out:
            write_json_atomic(out / "register.json", {"models": summary, "lineage": tags})
    skipped = [name for name, s in summary.items() if s["skipped"]]
    log.info("register: %d new versions, %d skipped as identical to a registered version%s", len(summary) - len(skipped),
             len(skipped), f" ({', '.join(skipped)})" if skipped else "")
    run.log_json(summary, "registry/summary.json")
    return {f"{name}.{key}": int(s[key]) for name, s in summary.items() for key in ("version", "promoted", "skipped")}


def check_metric(metrics: dict, key: str, knob: str, stage: str) -> None:
    if key not in metrics:
        names = sorted(k for k in metrics if not k.endswith(("_ci_low", "_ci_high")))
        raise InstructflowError(f"params.yaml: {knob} = {key!r} is not a metric of stage '{stage}'; choose one of {names}")


def main() -> None:
    run_stage("register", body)


if __name__ == "__main__":
    main()

"""Stage `prepare`: raw data files -> validated, deduplicated, split canonical JSON lines in data/prepared.

Reads the demo data (a built-in list of sources) and the user's `prepare.sources` through one code
path, adds the synthetic tasks, and writes, all or nothing:

    pretrain_{train,eval}.jsonl    {"text", "source"}
    sft_{train,eval}.jsonl         {"messages", "source", "task", "answer"}
    preference_{train,eval}.jsonl  {"prompt", "chosen", "rejected", "source"[, "task"]}
    unpaired_{train,eval}.jsonl    {"prompt", "completion", "label", "source"[, "task"]}
    prompts_eval.jsonl             {"messages", "reference", "source"}   real prompts for sample generation
    multitask_{train,eval}.jsonl   {"id", "fields", "tasks": [{"name", "instruction", "input", "answer"}], "source"}
                                   multi-task records (the `tasks` sources and, with demo, the built-in example),
                                   rendered but not yet composed: sft composes them under sft.multitask
    multitask_tasks.json           the task definitions, per source
    stats.json                     row counts per file and per source, duplicates dropped, rows capped
"""

from __future__ import annotations


import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

from instructflow import multitask, synthetic
from instructflow.data import (
    Loaded,
    Source,
    dedup,
    load_source,
    sample_balanced,
    shuffled,
    split,
)
from instructflow.io import atomic_dir, write_jsonl

log = logging.getLogger("instructflow")

SPLIT_ROLES = ("pretrain", "sft", "preference", "unpaired")


def demo_sources(raw_dir: Path) -> list[Source]:
    """The demo data as ordinary sources: the same readers as user files, with their column mappings."""
    qa = {"prompt": "Q", "completion": "A"}
    return [
        Source(raw_dir / "tinyshakespeare.txt", "pretrain"),
        # NSMC reviews and chatbot Q/A pairs are a line or two each: ~20 make one document
        Source(raw_dir / "nsmc_train.tsv", "pretrain", columns={"text": "document"}, group_rows=20),
        Source(raw_dir / "ko_chatbot_qa.csv", "pretrain", columns=qa, group_rows=20),
        Source(raw_dir / "self_instruct_seed_tasks.jsonl", "sft"),
        Source(raw_dir / "ko_chatbot_qa.csv", "sft", columns=qa),
        # 7 of its 1,800 upstream pairs are malformed (an empty chosen reply, transcripts whose turns do not
        # line up); they are skipped and counted in stats.json rather than failing the demo
        Source(raw_dir / "hh_rlhf_harmless_pairs.jsonl", "preference", skip_invalid=True),
        Source(raw_dir / "self_instruct_user_oriented.jsonl", "prompts"),
    ]


def user_source(cfg_source: Any, root: Path, max_chars: int | None = None) -> Source:
    """A `prepare.sources` entry as a Source; a relative path is relative to the project root.

    max_chars (prepare.max_chars) bounds the rows of user files; the demo data is pinned (data/raw/SHA256SUMS).
    A `tasks` source renders its rows with its task definitions (its own, or prepare.tasks), checked here.
    """
    tasks = getattr(cfg_source, "tasks", None) if cfg_source.role == "tasks" else None
    path = Path(cfg_source.path)
    return Source(
        path=path if path.is_absolute() else root / path,
        role=cfg_source.role,
        format=getattr(cfg_source, "format", "auto"),
        columns=dict(getattr(cfg_source, "columns", None) or {}),
        group_rows=getattr(cfg_source, "group_rows", 1),
        skip_invalid=getattr(cfg_source, "skip_invalid", False),
        max_chars=max_chars,
        render_tasks=multitask.renderer(multitask.load_task_defs(tasks, root, f"prepare.sources ({cfg_source.path})"))
        if tasks else None,
    )


def _per_source(rows: list[dict]) -> Counter:
    return Counter(row["source"] for row in rows)


def build(cfg: Any, seed: int, raw_dir: Path, out_dir: Path) -> dict:
    """Read, validate, deduplicate, cap and split every source, add synthetic tasks, write out_dir; return stats.

    Every source is read and validated before anything is written, and out_dir is replaced only
    once all files are complete, so a bad row leaves the previous outputs as they were.
    """
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    root = raw_dir.parent.parent
    max_chars = getattr(cfg, "max_chars", None)
    sources = (demo_sources(raw_dir) if cfg.demo else []) + [user_source(s, root, max_chars) for s in cfg.sources]
    loaded: list[Loaded] = [load_source(source) for source in sources]
    for item in loaded:
        log.info("read %s as %s: %d rows -> %d records%s", item.source.path.name, item.source.role, item.rows,
                 len(item.records), f", {len(item.skipped)} invalid rows skipped" if item.skipped else "")

    per_role: dict[str, list[dict]] = {role: [] for role in (*SPLIT_ROLES, "prompts", "tasks")}
    for item in loaded:
        per_role[item.source.role] += item.records

    tasks = synthetic.generate(cfg.synthetic.n_train, cfg.synthetic.n_eval, cfg.synthetic.kinds, seed)
    synthetic_rows = {
        "sft": (lambda t: [synthetic.sft_record(t)]),
        "preference": (lambda t: [synthetic.preference_record(t)]),
        "unpaired": synthetic.unpaired_records,
    }
    caps = {"pretrain": (cfg.max_pretrain_chars, lambda r: len(r["text"])),
            "sft": (cfg.max_sft_rows, lambda r: 1),
            "preference": (cfg.max_preference_rows, lambda r: 1),
            "unpaired": (None, lambda r: 1),
            "prompts": (cfg.max_prompt_rows, lambda r: 1)}

    outputs: dict[str, list[dict]] = {}
    dropped: dict[str, Counter] = {}
    capped: dict[str, Counter] = {}
    for role in (*SPLIT_ROLES, "prompts"):
        kept, duplicates = dedup(per_role[role])
        dropped[role] = _per_source(duplicates)
        cap, cost = caps[role]
        if cap is not None:
            before = _per_source(kept)
            kept = sample_balanced(kept, cap, seed, cost)
            capped[role] = before - _per_source(kept)
        if role == "prompts":
            outputs["prompts_eval.jsonl"] = kept
            continue
        train, held_out = split(kept, cfg.eval_fraction, seed)
        if role in synthetic_rows:
            train += [row for task in tasks.train for row in synthetic_rows[role](task)]
            held_out += [row for task in tasks.eval for row in synthetic_rows[role](task)]
        outputs[f"{role}_train.jsonl"] = shuffled(train, seed)
        outputs[f"{role}_eval.jsonl"] = shuffled(held_out, seed)

    definitions = {item.source.label: multitask.definitions(item.source.render_tasks.tasks) for item in loaded
                   if item.source.role == "tasks"}
    definitions.update(multitask_outputs(cfg, seed, per_role["tasks"], tasks, outputs, dropped))
    stats = _stats(seed, loaded, outputs, dropped, capped, tasks)
    with atomic_dir(out_dir) as tmp:
        for name, rows in outputs.items():
            write_jsonl(tmp / name, rows)
        if definitions:
            (tmp / "multitask_tasks.json").write_text(json.dumps(definitions, ensure_ascii=False, indent=2) + "\n",
                                                      encoding="utf-8")
        (tmp / "stats.json").write_text(json.dumps(stats, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    log.info("wrote %s: %s", out_dir, ", ".join(f"{name} {n}" for name, n in stats["files"].items()))
    return stats


def multitask_outputs(cfg: Any, seed: int, records: list[dict], tasks: synthetic.SyntheticSplits,
                      outputs: dict[str, list[dict]], dropped: dict[str, Counter]) -> dict:
    """Add multitask_{train,eval}.jsonl to outputs (when there are records): the `tasks` sources' records,
    deduplicated and split, plus with demo the built-in example; return the built-in example's task definitions."""
    kept, duplicates = dedup(records, multitask.record_key)
    dropped["tasks"] = _per_source(duplicates)
    train, held_out = split(kept, cfg.eval_fraction, seed, key=multitask.record_key)
    definitions = {}
    n_train = getattr(cfg.synthetic, "multitask_train", 0)
    n_eval = getattr(cfg.synthetic, "multitask_eval", 0)
    if cfg.demo and n_train + n_eval:
        demo_train, demo_eval = multitask.demo_records(n_train, n_eval, tasks.eval, seed)
        train += demo_prepared(demo_train, "train")
        held_out += demo_prepared(demo_eval, "eval")
        definitions[multitask.DEMO_SOURCE] = multitask.definitions(multitask.DEMO_TASKS)
    if train or held_out:
        outputs["multitask_train.jsonl"] = shuffled(train, seed)
        outputs["multitask_eval.jsonl"] = held_out
    return definitions


def demo_prepared(records: list[dict], part: str) -> list[dict]:
    """The built-in example's field records rendered as a `tasks` source's are."""
    where = f"<built-in multitask example, {part}>"
    return [{"id": f"{multitask.DEMO_SOURCE}:{part}:{i}", "fields": fields,
             "tasks": multitask.render_record(fields, multitask.DEMO_TASKS, where, i), "source": multitask.DEMO_SOURCE}
            for i, fields in enumerate(records, 1)]


def _stats(seed: int, loaded: list[Loaded], outputs: dict[str, list[dict]], dropped: dict[str, Counter],
           capped: dict[str, Counter], tasks: synthetic.SyntheticSplits) -> dict:
    """stats.json: what went in, what was dropped and why, and what came out, per file and per source."""
    sources: dict[str, dict[str, dict[str, int]]] = {}
    for item in loaded:
        role, label = item.source.role, item.source.label
        empty = {"rows": 0, "records": 0, "invalid_skipped": 0, **({} if role == "prompts" else {"train": 0}), "eval": 0}
        entry = sources.setdefault(role, {}).setdefault(label, empty)
        entry["rows"] += item.rows
        entry["records"] += len(item.records)
        entry["invalid_skipped"] += len(item.skipped)
    for role, by_source in sources.items():
        for label, entry in by_source.items():
            entry["duplicates_dropped"] = dropped[role][label]
            entry["capped"] = capped.get(role, Counter())[label]
    for name, rows in outputs.items():
        role, part = name.removesuffix(".jsonl").rsplit("_", 1)
        role = "tasks" if role == "multitask" else role
        for label, n in _per_source(rows).items():
            sources.setdefault(role, {}).setdefault(label, {})[part] = n
    return {
        "seed": seed,
        "files": {name: len(rows) for name, rows in outputs.items()},
        "pretrain_chars": {part: sum(len(r["text"]) for r in outputs[f"pretrain_{part}.jsonl"])
                           for part in ("train", "eval")},
        "duplicates_dropped": {role: sum(counter.values()) for role, counter in dropped.items()},
        "capped": {role: sum(counter.values()) for role, counter in capped.items()},
        "sources": sources,
        "invalid_rows": {item.source.label: item.skipped[:5] for item in loaded if item.skipped},
        "synthetic": {"train": len(tasks.train), "eval": len(tasks.eval),
                      "kinds": dict(Counter(t.kind for t in tasks.train + tasks.eval))},
    }


def check_sources_tracked(params, root: Path) -> None:
    """Every file prepare.sources (or a task-definition file) names must be a DVC dep of this stage, or DVC would
    miss its changes."""
    import yaml

    from instructflow.errors import ConfigError
    from instructflow.stages import source_paths

    deps = (yaml.safe_load((root / "dvc.yaml").read_text()) or {}).get("stages", {}).get("prepare", {}).get("deps", [])
    missing = [path for path in source_paths(params) if path not in deps]
    if missing:
        raise ConfigError(f"params.yaml: prepare.sources or prepare.tasks names {missing}, which dvc.yaml does not track yet; "
                          "run `instructflow dvc-yaml` (instructflow run and instructflow stage do it for you)")


def body(params, root: Path, run) -> dict:
    check_sources_tracked(params, root)
    out = root / "data" / "prepared"
    stats = build(params.prepare, params.seed, root / "data" / "raw", out)
    run.log_json(stats, "data/stats.json")
    metrics = {name.removesuffix(".jsonl"): n for name, n in stats["files"].items()}
    metrics.update({f"pretrain_chars_{part}": n for part, n in stats["pretrain_chars"].items()})
    return metrics


def main() -> None:
    from tasks.runtime import run_stage

    run_stage("prepare", body)


if __name__ == "__main__":
    main()

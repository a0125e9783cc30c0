"""Stage `reward`: the SFT model with a scalar head, trained on chosen/rejected pairs (Bradley-Terry).

reward.kwise (InstructGPT, Ouyang et al. 2022, sec. 3.5): the pairs of one ranked list (prepare's `group`) are one
batch element, its K responses scored once and its pairs' losses averaged (models.losses.kwise_loss); a pair
without a group is an element of K = 2. Off, every pair is trained on its own, shuffled apart from its list. Either
way the held-out figures are the same pairwise ones (pairwise_eval), so the two compare.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from instructflow.config import Params
from instructflow.data import iter_jsonl, ranked_records, read_text
from instructflow.errors import InstructflowError
from models.decoder import collate_groups, collate_pairs, reward_scores
from models.losses import bradley_terry_loss, kwise_loss
from models.tokenizer import load_tokenizer, preference_example, response_example
from models.training import LoopSettings, train
from tasks.runtime import final_metrics, read_prepared, resumable, run_stage, stage_output
from tasks.tracking import StageRun

log = logging.getLogger("instructflow")


def preference_set(tok, rows: list[dict], max_length: int, name: str, counts: Counter | None = None) -> list[dict]:
    """Pairs as {chosen, rejected} token examples, cut to max_length as preference_example says: the prompt is
    kept and a response truncated, or the pair dropped when its prompt leaves no room; counted and logged."""
    counts = Counter() if counts is None else counts
    pairs = [preference_example(tok, row, max_length, counts=counts) for row in rows]
    return _kept(pairs, counts, len(rows), max_length, name)


def _kept(examples: list[dict | None], counts: Counter, n_pairs: int, max_length: int, name: str) -> list[dict]:
    """The examples that fit (not None), after logging how many pairs were cut; an error when none fits."""
    if counts["truncated"] or counts["dropped"]:
        log.warning("%s: %d of %d pairs are longer than max_length %d: %d kept with a response truncated, "
                    "%d dropped (the prompt alone fills max_length)", name, counts["truncated"] + counts["dropped"],
                    n_pairs, max_length, counts["truncated"], counts["dropped"])
    kept = [e for e in examples if e is not None]
    if not kept:
        raise InstructflowError(f"{name}: no preference pair fits max_length {max_length}")
    return kept


# ---- K-wise: a ranked list's pairs as one element ------------------------------------------------------------
@dataclass(frozen=True)
class RankedGroup:
    """One prompt's responses, each once, and the (better, worse) index pairs ranked among them."""

    prompt: list[dict]
    responses: list[str]
    pairs: list[tuple[int, int]]


def ranked_groups(rows: Iterable[dict] | Iterable[tuple[int, dict]], source: str | Path) -> list[dict]:
    """Ranked rows from outside prepare (user feedback) as the preference rows prepare writes: for the training set.

    Each row is {"prompt": a string or chat messages ending with a user turn, "responses": [K >= 2 distinct
    strings], "tiers": optional}: without "tiers" the responses are best first; with it, "tiers" lists response
    indices best first, [[0], [2, 1], [3]], and the responses of one tier tie (no pair between them). Rows are
    numbered from 1, or given as (line, row) as instructflow.data.iter_jsonl yields them. Returns one row
    {"prompt", "chosen", "rejected", "source", "group"} per ranked pair, `group` = "<file name of source>:<line>";
    add them to the preference_train rows and both modes train on them (preference_groups regroups them for
    reward.kwise). A bad row (fewer than 2 responses, duplicates, tiers that are not a partition of 0..K-1)
    raises a DataError naming `source`, the line and the field.
    """
    return ranked_records(rows, source)


def preference_groups(rows: Iterable[dict]) -> list[RankedGroup]:
    """Preference rows gathered into ranked lists: the rows sharing a `group` (and a prompt, so two files' ids
    cannot merge different prompts) are one list; a row without a group is a list of K = 2. In the order of each
    list's first row, so pair-only data keeps the flattened order, batch for batch."""
    building: dict[str, tuple[list[dict], dict[str, int], list[tuple[int, int]]]] = {}
    for i, row in enumerate(rows):
        key = json.dumps([row["group"], row["prompt"]], ensure_ascii=False) if row.get("group") else f"row {i}"
        prompt, index, pairs = building.setdefault(key, (row["prompt"], {}, []))
        better, worse = (index.setdefault(row[side], len(index)) for side in ("chosen", "rejected"))
        pairs.append((better, worse))
    return [RankedGroup(prompt, list(index), pairs) for prompt, index, pairs in building.values()]


def group_set(tok, groups: list[RankedGroup], max_length: int, name: str, counts: Counter | None = None) -> list[dict]:
    """Ranked lists as {responses: [token examples], pairs} (collate_groups' rows), each response cut as
    preference_example cuts it; `counts` counts pairs as preference_set does (truncated: either side was cut;
    dropped: the prompt fills max_length, which drops the whole list)."""
    counts = Counter() if counts is None else counts
    examples: list[dict | None] = []
    for group in groups:
        cut = [Counter() for _ in group.responses]
        responses = [response_example(tok, group.prompt, response, max_length, counts=c)
                     for response, c in zip(group.responses, cut)]
        if any(r is None for r in responses):
            counts["dropped"] += len(group.pairs)
            examples.append(None)
            continue
        counts["truncated"] += sum(bool(cut[b]["truncated"] or cut[w]["truncated"]) for b, w in group.pairs)
        examples.append({"responses": responses, "pairs": group.pairs})
    return _kept(examples, counts, sum(len(g.pairs) for g in groups), max_length, name)


def group_lengths(groups: list[dict]) -> list[int]:
    """A ranked list's padded length in a batch: its longest response (for length-grouped batches)."""
    return [max(len(r["input_ids"]) for r in g["responses"]) for g in groups]


def kwise_step(model, batch: dict) -> tuple[torch.Tensor, dict, int]:
    """One K-wise step on a collate_groups batch: each response scored once, the loss kwise_loss."""
    scores = reward_scores(model, batch)  # (N,)
    pairs = batch["pairs"]  # (P, 2)
    loss = kwise_loss(scores, pairs, batch["group_of_pair"])
    return loss, pair_metrics(scores[pairs[:, 0]], scores[pairs[:, 1]]), int(batch["attention_mask"].sum())


def cut_metrics(cut: dict[str, Counter]) -> dict[str, int]:
    """{train,eval}_pairs_{truncated,dropped}: the pairs cut to max_length, for the stage's metrics."""
    return {f"{part}_pairs_{what}": counter[what] for part, counter in cut.items() for what in ("truncated", "dropped")}


def pair_lengths(pairs: list[dict]) -> list[int]:
    """A pair's padded length in a batch: its longer side (for length-grouped batches)."""
    return [max(len(p["chosen"]["input_ids"]), len(p["rejected"]["input_ids"])) for p in pairs]


def rewards(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Scalar rewards of the chosen and the rejected side of a [chosen..., rejected...] batch (collate_pairs)."""
    return reward_scores(model, batch).chunk(2)  # (B,), (B,)


def pair_metrics(better: torch.Tensor, worse: torch.Tensor) -> dict[str, float]:
    """accuracy (the share of pairs ordered right) and mean margin of a batch's pairs (P,), for logging only."""
    margin = (better - worse).detach()  # (P,)
    return {"accuracy": float((margin > 0).float().mean()), "margin": float(margin.mean())}


def reward_step(model, batch: dict) -> tuple[torch.Tensor, dict, int]:
    chosen, rejected = rewards(model, batch)  # (B,), (B,)
    loss = bradley_terry_loss(chosen, rejected)
    return loss, pair_metrics(chosen, rejected), int(batch["attention_mask"].sum())


@torch.no_grad()
def pairwise_eval(model, batches: list[dict]) -> dict[str, float]:
    """Held-out Bradley-Terry loss and pairwise accuracy (share of pairs where chosen scores higher)."""
    correct, total, loss_sum = 0, 0, 0.0
    for batch in batches:
        chosen, rejected = rewards(model, batch)  # reward_scores moves the batch to the model
        correct += int((chosen > rejected).sum())
        total += chosen.numel()
        loss_sum += float(bradley_terry_loss(chosen, rejected)) * chosen.numel()
    return {"loss": loss_sum / total, "accuracy": correct / total}


def feedback_rows(root: Path, params: Params) -> tuple[list[dict], list[Path]]:
    """The feedback loop's rankings (loop.feedback_dir/round_<r>.jsonl: stage `rank`'s rows, added by the `rounds`
    flow) as preference rows for training, in round order, and the files read. The held-out figures stay on
    preference_eval, so the rounds compare on one fixed set."""
    folder = root / params.loop.feedback_dir
    files = sorted(folder.glob("round_*.jsonl"), key=lambda p: int(p.stem.split("_")[1]) if p.stem.split("_")[1].isdigit()
                   else -1) if folder.is_dir() else []
    rows: list[dict] = []
    for path in files:
        rows += ranked_groups(iter_jsonl(path, read_text(path)), path)
    return rows, files


def body(params: Params, root: Path, run: StageRun) -> dict:
    from transformers import AutoModelForSequenceClassification

    cfg = params.reward
    source = root / "artifacts" / "sft"
    tok = load_tokenizer(source)
    model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=1, pad_token_id=tok.pad_token_id)
    cut = {"train": Counter(), "eval": Counter()}
    feedback, feedback_files = feedback_rows(root, params)
    if feedback:
        log.info("reward model: %d pairs of feedback from %s", len(feedback), ", ".join(p.name for p in feedback_files))
    train_rows = read_prepared(root, "preference_train") + feedback
    if cfg.kwise:  # elements are ranked lists: batch_size lists a step
        train_set = group_set(tok, preference_groups(train_rows), cfg.max_length, "preference_train", cut["train"])
        collate_train, step, lengths = partial(collate_groups, pad_id=tok.pad_token_id), kwise_step, group_lengths
        train_pairs = sum(len(g["pairs"]) for g in train_set)
    else:
        train_set = preference_set(tok, train_rows, cfg.max_length, "preference_train", cut["train"])
        collate_train, step, lengths = partial(collate_pairs, pad_id=tok.pad_token_id), reward_step, pair_lengths
        train_pairs = len(train_set)
    eval_set = preference_set(tok, read_prepared(root, "preference_eval"), cfg.max_length, "preference_eval",
                              cut["eval"])
    log.info("reward model: %d train pairs%s / %d eval pairs", train_pairs,
             f" in {len(train_set)} ranked lists (K-wise)" if cfg.kwise else "", len(eval_set))
    collate = partial(collate_pairs, pad_id=tok.pad_token_id)
    eval_batches = [collate(eval_set[i:i + cfg.batch_size]) for i in range(0, len(eval_set), cfg.batch_size)]
    settings = LoopSettings.from_config(cfg, params.seed,
                                        knobs=f"reward.lr={cfg.lr:g}, reward.max_grad_norm={cfg.max_grad_norm:g}")
    history = train(model, train_set, collate_train, step, settings,
                    eval_fn=lambda m: pairwise_eval(m, eval_batches), on_log=run.log_step,
                    lengths=lengths(train_set),
                    **resumable(root, "reward", params, root / "artifacts" / "sft", root / "data" / "prepared",
                                *feedback_files))
    with stage_output(root, "reward", run, model=model, tokenizer=tok, history=history):
        pass
    metrics = final_metrics(history, ("loss", "accuracy", "eval_loss", "eval_accuracy", "tokens_per_sec"))
    metrics.update(train_pairs=train_pairs, eval_pairs=len(eval_set))
    if cfg.kwise:
        metrics["train_groups"] = len(train_set)
    if feedback_files:
        metrics.update(feedback_rounds=len(feedback_files), feedback_pairs=len(feedback),
                       feedback_groups=len({row["group"] for row in feedback}))
    metrics.update(cut_metrics(cut))
    return metrics


def main() -> None:
    run_stage("reward", body)


if __name__ == "__main__":
    main()

"""Stage `reward`: the SFT model with a scalar head, trained on chosen/rejected pairs (Bradley-Terry)."""

from __future__ import annotations

import logging
from collections import Counter
from functools import partial
from pathlib import Path

import torch

from instructflow.config import Params
from instructflow.errors import InstructflowError
from models.decoder import collate_pairs, reward_scores
from models.losses import bradley_terry_loss
from models.tokenizer import load_tokenizer, preference_example
from models.training import LoopSettings, train
from tasks.runtime import final_metrics, read_prepared, resumable, run_stage, stage_output
from tasks.tracking import StageRun

log = logging.getLogger("instructflow")


def preference_set(tok, rows: list[dict], max_length: int, name: str, counts: Counter | None = None) -> list[dict]:
    """Pairs as {chosen, rejected} token examples, cut to max_length as preference_example says: the prompt is
    kept and a response truncated, or the pair dropped when its prompt leaves no room; counted and logged."""
    counts = Counter() if counts is None else counts
    pairs = [preference_example(tok, row, max_length, counts=counts) for row in rows]
    if counts["truncated"] or counts["dropped"]:
        log.warning("%s: %d of %d pairs are longer than max_length %d: %d kept with a response truncated, "
                    "%d dropped (the prompt alone fills max_length)", name, counts["truncated"] + counts["dropped"],
                    len(rows), max_length, counts["truncated"], counts["dropped"])
    kept = [p for p in pairs if p is not None]
    if not kept:
        raise InstructflowError(f"{name}: no preference pair fits max_length {max_length}")
    return kept


def cut_metrics(cut: dict[str, Counter]) -> dict[str, int]:
    """{train,eval}_pairs_{truncated,dropped}: the pairs cut to max_length, for the stage's metrics."""
    return {f"{part}_pairs_{what}": counter[what] for part, counter in cut.items() for what in ("truncated", "dropped")}


def pair_lengths(pairs: list[dict]) -> list[int]:
    """A pair's padded length in a batch: its longer side (for length-grouped batches)."""
    return [max(len(p["chosen"]["input_ids"]), len(p["rejected"]["input_ids"])) for p in pairs]


def rewards(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Scalar rewards of the chosen and the rejected side of a [chosen..., rejected...] batch (collate_pairs)."""
    return reward_scores(model, batch).chunk(2)  # (B,), (B,)


def reward_step(model, batch: dict) -> tuple[torch.Tensor, dict, int]:
    chosen, rejected = rewards(model, batch)  # (B,), (B,)
    loss = bradley_terry_loss(chosen, rejected)
    margin = (chosen - rejected).detach()  # (B,)  for logging only
    metrics = {"accuracy": float((chosen > rejected).float().mean()), "margin": float(margin.mean())}
    return loss, metrics, int(batch["attention_mask"].sum())


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


def body(params: Params, root: Path, run: StageRun) -> dict:
    from transformers import AutoModelForSequenceClassification

    cfg = params.reward
    source = root / "artifacts" / "sft"
    tok = load_tokenizer(source)
    model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=1, pad_token_id=tok.pad_token_id)
    cut = {"train": Counter(), "eval": Counter()}
    train_set = preference_set(tok, read_prepared(root, "preference_train"), cfg.max_length, "preference_train",
                               cut["train"])
    eval_set = preference_set(tok, read_prepared(root, "preference_eval"), cfg.max_length, "preference_eval",
                              cut["eval"])
    log.info("reward model: %d train / %d eval pairs", len(train_set), len(eval_set))
    collate = partial(collate_pairs, pad_id=tok.pad_token_id)
    eval_batches = [collate(eval_set[i:i + cfg.batch_size]) for i in range(0, len(eval_set), cfg.batch_size)]
    settings = LoopSettings.from_config(cfg, params.seed,
                                        knobs=f"reward.lr={cfg.lr:g}, reward.max_grad_norm={cfg.max_grad_norm:g}")
    history = train(model, train_set, collate, reward_step, settings,
                    eval_fn=lambda m: pairwise_eval(m, eval_batches), on_log=run.log_step,
                    lengths=pair_lengths(train_set),
                    **resumable(root, "reward", params, root / "artifacts" / "sft", root / "data" / "prepared"))
    with stage_output(root, "reward", run, model=model, tokenizer=tok, history=history):
        pass
    metrics = final_metrics(history, ("loss", "accuracy", "eval_loss", "eval_accuracy", "tokens_per_sec"))
    metrics.update(train_pairs=len(train_set), eval_pairs=len(eval_set))
    metrics.update(cut_metrics(cut))
    return metrics


def main() -> None:
    run_stage("reward", body)


if __name__ == "__main__":
    main()

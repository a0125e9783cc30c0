"""Stage `classify`: the MLM encoder fine-tuned with a [CLS] classification head, scored beside a TF-IDF baseline.

Default task: Korean movie-review sentiment (NSMC). Any CSV / TSV / JSONL with a text column (or a
sentence pair) and a label column works, named in params.yaml. Every row of both files is checked
before any training (an empty text, a missing label, a test label never seen in training: an error
naming the file, line and column), and nothing is written unless the whole stage succeeds.

Outputs, in artifacts/classify: the model and tokenizer (id2label / label2id in its config; the
tokenizer adds [CLS] / [SEP] itself and truncates to classify.max_length, so the classifier served
through MLflow's text-classification pipeline sees its inputs as the fine-tuning did),
labels.json, predictions.csv on the test set, evaluation.json (the confusion matrices and the gains),
confusion.png (the encoder) and confusion_baseline.png (TF-IDF + logistic regression).

Per-stage gains (`gain.*` / `beats.*` metrics, see models/stats.py), test accuracy on the same rows with a
paired bootstrap interval: mlm, the fine-tuned pretrained encoder against a randomly initialised encoder of the
same config given the same fine-tuning (same rows, steps and seed: what masked-LM pretraining adds); classify,
the fine-tuned encoder against the TF-IDF baseline. The random-init fine-tune doubles the stage's training time:
it is the measurement that says whether pretraining the encoder earns its place.
"""

from __future__ import annotations

import csv
import logging
import random
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForMaskedLM

from instructflow.config import Params
from instructflow.errors import DataError, InstructflowError
from instructflow.io import write_json_atomic
from models.classification import (
    LabelMap,
    classification_metrics,
    plot_confusion,
    read_classification,
    tfidf_baseline,
)
from models.encoder import build_classifier, encode, encoder_tokenizer
from models.stats import gain_metrics, paired_gain
from models.tokenizer import load_tokenizer
from models.training import LoopSettings, to_device, train
from tasks.runtime import final_metrics, run_stage, stage_output
from tasks.tracking import StageRun

log = logging.getLogger("instructflow")

VALIDATION_FRACTION = 0.1  # of the training rows, held out to watch the fine-tuning (the test set stays unseen)


def subsample(rows: list[dict], limit: int | None, seed: int) -> list[dict]:
    """At most `limit` rows, drawn with a fixed seed and kept in file order (None: all)."""
    if limit is None or len(rows) <= limit:
        return rows
    keep = sorted(random.Random(seed).sample(range(len(rows)), limit))
    return [rows[i] for i in keep]


def hold_out(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, validation): a seeded random `fraction` of the rows (at least one) held out."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(fraction * len(rows)))
    val = set(order[:n_val])
    return [r for i, r in enumerate(rows) if i not in val], [r for i, r in enumerate(rows) if i in val]


def collate_rows(rows: list[dict], tok, max_length: int) -> dict[str, torch.Tensor]:
    pairs = [r["text_pair"] for r in rows] if rows[0]["text_pair"] is not None else None
    batch = encode(tok, [r["text"] for r in rows], pairs, max_length=max_length)  # (B, T) each
    batch["labels"] = torch.tensor([r["label_id"] for r in rows])  # (B,)
    return batch


def batched(rows: list[dict], collate, size: int) -> list[dict]:
    return [collate(rows[i:i + size]) for i in range(0, len(rows), size)]


def classify_step(model, batch: dict) -> tuple[torch.Tensor, dict, int]:
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits  # (B, C)
    loss = F.cross_entropy(logits.float(), batch["labels"])
    accuracy = float((logits.argmax(-1) == batch["labels"]).float().mean())
    return loss, {"accuracy": accuracy}, int(batch["attention_mask"].sum())


@torch.no_grad()
def predict(model, batches: list[dict]) -> tuple[list[int], float]:
    """Predicted label ids over the batches, and the mean cross-entropy against their labels."""
    predictions, loss_sum, n = [], 0.0, 0
    for batch in batches:
        batch = to_device(batch, model)
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits  # (B, C)
        loss_sum += float(F.cross_entropy(logits.float(), batch["labels"], reduction="sum"))
        n += len(batch["labels"])
        predictions += logits.argmax(-1).tolist()
    return predictions, loss_sum / n


def validation_eval(model, batches: list[dict]) -> dict[str, float]:
    predicted, loss = predict(model, batches)
    gold = [label for batch in batches for label in batch["labels"].tolist()]
    return {"loss": loss, "accuracy": sum(p == g for p, g in zip(predicted, gold)) / len(gold)}


def baseline_text(row: dict) -> str:
    return row["text"] if row["text_pair"] is None else f"{row['text']} | {row['text_pair']}"


def write_predictions(path: Path, rows: list[dict], predicted: list[str], baseline: list[str],
                      random_init: list[str]) -> None:
    pair = rows[0]["text_pair"] is not None
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", *(["text_pair"] if pair else []), "label", "prediction", "baseline_prediction",
                         "random_init_prediction"])
        for row, p, b, r in zip(rows, predicted, baseline, random_init):
            writer.writerow([row["text"], *([row["text_pair"]] if pair else []), row["label"], p, b, r])


def classify_gains(gold: list[str], encoder: list[str], random_init: list[str], tfidf: list[str], seed: int) -> list:
    """Test accuracy of the fine-tuned encoder against the random-init encoder (mlm's gain) and TF-IDF (classify's),
    per row hit or miss on the same rows, with a 95% paired bootstrap interval (1,000 resamples, as macro-F1's)."""
    def hits(predicted: list[str]) -> list[float]:
        return [float(p == g) for p, g in zip(predicted, gold)]

    gain = partial(paired_gain, n_resamples=1000, confidence=0.95, seed=seed)
    return [gain("mlm", "accuracy", "random_init", hits(encoder), hits(random_init)),
            gain("classify", "accuracy", "tfidf", hits(encoder), hits(tfidf))]


def macro_f1_interval(gold: list[str], predicted: list[str], seed: int) -> dict[str, float]:
    """95% percentile-bootstrap interval (1,000 resamples of the test rows) of the test macro-F1."""
    from sklearn.metrics import f1_score

    from models.stats import bootstrap_ci

    y, p = np.array(gold), np.array(predicted)

    def macro_f1(rows: np.ndarray) -> float:
        rows = rows.astype(int)
        return f1_score(y[rows], p[rows], average="macro", zero_division=0)

    _, low, high = bootstrap_ci(np.arange(len(y)), 1000, 0.95, seed, statistic=macro_f1)
    return {"macro_f1_ci_low": low, "macro_f1_ci_high": high}


def body(params: Params, root: Path, run: StageRun) -> dict:
    cfg = params.classify
    train_path, test_path = (root / path for path in (cfg.train_path, cfg.test_path))  # an absolute path stays as it is
    columns = dict(text_column=cfg.text_column, label_column=cfg.label_column, text_pair_column=cfg.text_pair_column)

    # every row of both files is checked before anything is trained or written
    train_rows = read_classification(train_path, **columns)
    labels = LabelMap.from_labels(r["label"] for r in train_rows)
    if len(labels) < 2:
        raise DataError(train_path, f"column '{cfg.label_column}' holds only the label {list(labels.labels)}; "
                                    "a classifier needs at least two", field=cfg.label_column)
    test_rows = read_classification(test_path, **columns, labels=labels)

    train_rows = subsample(train_rows, cfg.max_train_rows, params.seed)
    test_rows = subsample(test_rows, cfg.max_test_rows, params.seed + 1)
    fit_rows, val_rows = hold_out(train_rows, VALIDATION_FRACTION, params.seed)
    for row in (*fit_rows, *val_rows, *test_rows):
        row["label_id"] = labels.to_id(row["label"])
    log.info("classify: %d labels %s; %d train / %d validation / %d test rows", len(labels), list(labels.labels),
             len(fit_rows), len(val_rows), len(test_rows))

    source = root / "artifacts" / "mlm"
    if not (source / "config.json").is_file():
        raise InstructflowError(f"{source}: no masked LM to fine-tune; run the mlm stage first")
    model = build_classifier(source, len(labels), labels.id2label, labels.label2id)
    if cfg.max_length > model.config.max_position_embeddings:
        raise InstructflowError(f"classify.max_length = {cfg.max_length} exceeds the encoder's "
                                f"max_position_embeddings = {model.config.max_position_embeddings} (mlm.model)")
    mlm_tok = load_tokenizer(source)
    if None in (mlm_tok.cls_token_id, mlm_tok.sep_token_id, mlm_tok.pad_token_id):
        raise InstructflowError(f"{source}: the tokenizer lacks [CLS], [SEP] or padding; "
                                "rerun the tokenizer and mlm stages")
    # the masked LM's framing ([CLS] a [SEP], [CLS] a [SEP] b [SEP]), cut at the length fine-tuned on: saved with
    # the classifier, it is what a served pipeline tokenizes with
    tok = encoder_tokenizer(mlm_tok, cfg.max_length)
    collate = partial(collate_rows, tok=tok, max_length=cfg.max_length)
    val_batches, test_batches = (batched(rows, collate, cfg.batch_size) for rows in (val_rows, test_rows))
    settings = LoopSettings.from_config(cfg, params.seed)
    history = train(model, fit_rows, collate, classify_step, settings,
                    eval_fn=lambda m: validation_eval(m, val_batches), on_log=run.log_step)
    predicted = [labels.to_label(i) for i in predict(model, test_batches)[0]]

    # the same fine-tuning from a randomly initialised encoder of the same config: what pretraining adds
    torch.manual_seed(params.seed)
    scratch = build_classifier(BertForMaskedLM(BertConfig.from_pretrained(source)), len(labels), labels.id2label,
                               labels.label2id)
    train(scratch, fit_rows, collate, classify_step, settings, eval_fn=lambda m: validation_eval(m, val_batches),
          on_log=lambda step, row: run.log_step(step, {f"random_init_{k}": v for k, v in row.items()}))
    scratch_predicted = [labels.to_label(i) for i in predict(scratch, test_batches)[0]]
    del scratch

    baseline = [str(p) for p in tfidf_baseline([baseline_text(r) for r in fit_rows], [r["label"] for r in fit_rows],
                                               [baseline_text(r) for r in test_rows], seed=params.seed)]
    gold = [r["label"] for r in test_rows]
    encoder_scores = classification_metrics(gold, predicted, labels.labels)
    baseline_scores = classification_metrics(gold, baseline, labels.labels)
    scratch_scores = classification_metrics(gold, scratch_predicted, labels.labels)
    log.info("test: encoder accuracy %.4f macro-F1 %.4f | TF-IDF baseline accuracy %.4f macro-F1 %.4f | "
             "random-init encoder accuracy %.4f macro-F1 %.4f", encoder_scores["accuracy"], encoder_scores["macro_f1"],
             baseline_scores["accuracy"], baseline_scores["macro_f1"], scratch_scores["accuracy"],
             scratch_scores["macro_f1"])
    gains = classify_gains(gold, predicted, scratch_predicted, baseline, params.seed)

    with stage_output(root, "classify", run, model=model, tokenizer=tok, history=history) as out:
        (out / "labels.json").write_text(labels.to_json() + "\n", encoding="utf-8")
        write_predictions(out / "predictions.csv", test_rows, predicted, baseline, scratch_predicted)
        write_json_atomic(out / "evaluation.json", {"encoder": encoder_scores, "baseline": baseline_scores,
                                                    "random_init": scratch_scores, "gains": gain_metrics(gains),
                                                    "test_path": cfg.test_path, "test_rows": len(test_rows)})
        plot_confusion(encoder_scores["confusion_matrix"], labels.labels, out / "confusion.png")
        plot_confusion(baseline_scores["confusion_matrix"], labels.labels, out / "confusion_baseline.png")
        for name in ("confusion.png", "confusion_baseline.png", "evaluation.json", "predictions.csv"):
            run.log_artifact(out / name, "evaluation")

    metrics = final_metrics(history, ("loss", "eval_loss", "eval_accuracy", "tokens_per_sec"))
    metrics.update(macro_f1_interval(gold, predicted, params.seed))  # the registry's gate compares these
    metrics.update(accuracy=encoder_scores["accuracy"], macro_f1=encoder_scores["macro_f1"],
                   baseline_accuracy=baseline_scores["accuracy"], baseline_macro_f1=baseline_scores["macro_f1"],
                   num_labels=len(labels), train_rows=len(fit_rows), val_rows=len(val_rows), test_rows=len(test_rows),
                   random_init_accuracy=scratch_scores["accuracy"], random_init_macro_f1=scratch_scores["macro_f1"])
    metrics.update(gain_metrics(gains))
    return metrics


def main() -> None:
    run_stage("classify", body)


if __name__ == "__main__":
    main()

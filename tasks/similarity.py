"""Stage `similarity`: sentence embeddings trained for it, from the mlm encoder, scored on KorSTS dev.

The masked LM's mean-pooled states carry next to no meaning (every two Korean sentences score a cosine near
0.9). This stage fine-tunes a copy of its encoder so that the cosine of two sentences' mean-pooled vectors
follows how alike people judged them: KorSTS train pairs, scored 0-5, with the loss `similarity.objective`
(default `cosine`, Sentence-BERT's regression of the cosine on score / 5, chosen by measurement on KorSTS dev:
see SimilarityConfig.objective). Its vectors are exactly what `instructflow similarity` / `embed` compute
(`models.encoder.embed`, mean pooling), so what is scored here is what is served.

Scored on the dev pairs (Spearman of cosine against the gold score, Sentence-BERT's STS check), each with a
percentile-bootstrap interval over the pairs:
  - `spearman`: the trained embeddings (the registry's gate, `register.embedder_metric`);
  - `mlm_spearman`: the untrained mlm encoder, the same pooling: what the stage starts from;
  - `tfidf_spearman`: character 1-3-gram TF-IDF cosine fit on the train sentences, the lexical bar;
  - `gain_over_tfidf` with a paired bootstrap interval, and `beats_tfidf` = 1 when that whole interval lies
    above 0 (a gain the evaluation noise cannot explain).
And the README's example: a paraphrase, an unrelated sentence and an opposite one against "영화 정말 재밌어요",
before and after (`example_*`, `mlm_example_*`).

Outputs, in artifacts/similarity: the embedder (a BertModel, no pooler) with its tokenizer, history.csv,
loss.png, evaluation.json (every figure), dev_predictions.csv (the three similarities per dev pair) and
report.md. Nothing in them depends on run ids or timings.
"""

from __future__ import annotations

import csv
import logging
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from instructflow.config import Params
from instructflow.errors import InstructflowError
from instructflow.io import write_json_atomic
from models.encoder import build_embedder, embed, encode, encoder_tokenizer, sentence_vectors
from models.losses import cosent_loss, cosine_similarity_loss, in_batch_negatives_loss
from models.stats import gain_metrics
from models.sts import (
    StsPair,
    pair_cosines,
    read_sts,
    spearman,
    spearman_gain,
    spearman_with_ci,
    tfidf_cosines,
)
from models.tokenizer import load_tokenizer
from models.training import LoopSettings, train
from tasks.runtime import final_metrics, run_stage, stage_output
from tasks.tracking import StageRun

log = logging.getLogger("instructflow")

# the README's example: the first sentence against a paraphrase, an unrelated sentence and its opposite
EXAMPLE_ANCHOR = "영화 정말 재밌어요"
EXAMPLES = {"paraphrase": "이 영화 최고예요", "unrelated": "오늘 주식 시장이 크게 하락했다", "opposite": "영화 정말 재미없어요"}
POOLING = "mean"  # what `instructflow similarity` / `embed` use by default


def sample(pairs: list[StsPair], limit: int | None, seed: int) -> list[StsPair]:
    """At most `limit` pairs, drawn with a fixed seed and kept in file order (None: all)."""
    if limit is None or len(pairs) <= limit:
        return pairs
    keep = sorted(random.Random(seed).sample(range(len(pairs)), limit))
    return [pairs[i] for i in keep]


def training_rows(pairs: list[StsPair], objective: str, positive_score: float) -> list[tuple[str, str, float]]:
    """(sentence a, sentence b, score) rows the objective trains on.

    cosent / cosine: every pair. in_batch_negatives: the pairs scored at least positive_score, each both ways
    round (the batch's other second sentences are the negatives). simcse: every distinct train sentence paired
    with itself (the two dropout masks make the two views); the scores are not used.
    """
    if objective in ("cosent", "cosine"):
        return [(p.sentence1, p.sentence2, p.score) for p in pairs]
    if objective == "in_batch_negatives":
        rows = [(p.sentence1, p.sentence2, p.score) for p in pairs if p.score >= positive_score]
        return rows + [(b, a, s) for a, b, s in rows]
    if objective == "simcse":
        sentences = dict.fromkeys(s for p in pairs for s in (p.sentence1, p.sentence2))
        return [(s, s, float("nan")) for s in sentences]
    raise ValueError(f"unknown objective {objective!r}")


class PairCollate:
    """A batch of rows -> one encoder batch of the B first sentences then the B second ones (2B, T), and scores (B,)."""

    def __init__(self, tok, max_length: int):
        self.tok, self.max_length = tok, max_length

    def __call__(self, rows: list[tuple[str, str, float]]) -> dict[str, torch.Tensor]:
        batch = encode(self.tok, [r[0] for r in rows] + [r[1] for r in rows], max_length=self.max_length)  # (2B, T)
        batch["scores"] = torch.tensor([r[2] for r in rows], dtype=torch.float32)  # (B,)
        return batch


def make_step(objective: str, scale: float, max_score: float):
    """The training step of an objective: (model, batch) -> (loss, metrics, tokens)."""

    def step(model, batch: dict) -> tuple[torch.Tensor, dict, int]:
        vectors = sentence_vectors(model, batch, POOLING)  # (2B, H)
        a, b = vectors.chunk(2)  # (B, H) each
        if objective == "cosent":
            loss = cosent_loss(F.cosine_similarity(a.float(), b.float(), dim=-1), batch["scores"], scale)
        elif objective == "cosine":
            loss = cosine_similarity_loss(F.cosine_similarity(a.float(), b.float(), dim=-1), batch["scores"], max_score)
        else:  # in_batch_negatives, simcse: the same loss; simcse's two views differ by their dropout masks
            loss = in_batch_negatives_loss(a, b, scale)
        return loss, {}, int(batch["attention_mask"].sum())

    return step


def dev_cosines(model, tok, pairs: list[StsPair], max_length: int) -> np.ndarray:
    """Cosine (N,) of each dev pair's embeddings; every distinct sentence embedded once."""
    sentences = list(dict.fromkeys(s for p in pairs for s in (p.sentence1, p.sentence2)))
    index = {s: i for i, s in enumerate(sentences)}
    vectors = embed(model, tok, sentences, pooling=POOLING, batch_size=64, max_length=max_length).numpy()  # (S, H)
    return pair_cosines(vectors[[index[p.sentence1] for p in pairs]], vectors[[index[p.sentence2] for p in pairs]])


def example_scores(model, tok, max_length: int) -> dict[str, float]:
    """Cosine of the README's anchor sentence with each example sentence."""
    vectors = embed(model, tok, [EXAMPLE_ANCHOR, *EXAMPLES.values()], pooling=POOLING, max_length=max_length)
    cos = pair_cosines(vectors[:1].repeat(len(EXAMPLES), 1).numpy(), vectors[1:].numpy())  # (3,)
    return {name: round(float(c), 4) for name, c in zip(EXAMPLES, cos)}


def write_predictions(path: Path, pairs: list[StsPair], columns: dict[str, np.ndarray]) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["sentence1", "sentence2", "score", *columns])
        for i, p in enumerate(pairs):
            writer.writerow([p.sentence1, p.sentence2, p.score, *(f"{c[i]:.6f}" for c in columns.values())])


def report(metrics: dict, cfg) -> str:
    """A short markdown report of the stage's figures."""
    def row(label: str, key: str) -> str:
        return f"| {label} | {metrics[key]:.4f} | [{metrics[key + '_ci_low']:.4f}, {metrics[key + '_ci_high']:.4f}] |"

    level = f"{cfg.confidence:.0%}"
    lines = [
        "# Sentence similarity (KorSTS dev)",
        "",
        f"Spearman correlation between the cosine of two sentences' embeddings and the gold score (0-5), over "
        f"{metrics['dev_pairs']} dev pairs; {level} percentile-bootstrap intervals over the pairs "
        f"({cfg.bootstrap_resamples} resamples). Trained with `{cfg.objective}` on {metrics['train_rows']} rows "
        f"from {metrics['train_pairs']} train pairs, {cfg.max_steps} steps of {cfg.batch_size}.",
        "",
        f"| similarity | Spearman | {level} interval |",
        "| --- | --- | --- |",
        row("trained embeddings (this stage)", "spearman"),
        row("mlm encoder, untrained for it (mean pooling)", "mlm_spearman"),
        row("TF-IDF char 1-3-gram cosine (fit on train sentences)", "tfidf_spearman"),
        row("gain over TF-IDF (paired)", "gain_over_tfidf"),
        row("gain over the mlm encoder (paired)", "gain_over_mlm"),
        "",
        f"Beats TF-IDF (the paired interval of the gain lies above 0): **{'yes' if metrics['beats_tfidf'] else 'no'}**.",
        "",
        f"## Example: \"{EXAMPLE_ANCHOR}\" against",
        "",
        "| sentence | mlm encoder | trained embeddings |",
        "| --- | --- | --- |",
        *(f"| {name}: \"{text}\" | {metrics['mlm_example_' + name]:.4f} | {metrics['example_' + name]:.4f} |"
          for name, text in EXAMPLES.items()),
        "",
        f"The paraphrase scores above the unrelated sentence: "
        f"**{'yes' if metrics['example_paraphrase_above_unrelated'] else 'no'}**. KorSTS scores a sentence and its "
        "negation as close in meaning (same topic, same words), so the opposite is not expected to score low.",
        "",
    ]
    return "\n".join(lines)


def body(params: Params, root: Path, run: StageRun) -> dict:
    cfg = params.similarity
    mlm_dir = root / "artifacts" / "mlm"
    if not (mlm_dir / "config.json").is_file():
        raise InstructflowError(f"{mlm_dir}: no masked LM to start from; run the mlm stage first")
    train_pairs = sample(read_sts(root / cfg.train_path, cfg.max_score), cfg.max_train_pairs, params.seed)
    dev_pairs = sample(read_sts(root / cfg.dev_path, cfg.max_score), cfg.max_dev_pairs, params.seed)
    rows = training_rows(train_pairs, cfg.objective, cfg.positive_score)
    if len(rows) < 2:
        raise InstructflowError(f"{cfg.train_path}: {len(rows)} training rows for objective '{cfg.objective}' "
                                f"(positive_score {cfg.positive_score}); a batch needs at least two")
    mlm = build_embedder(mlm_dir)  # the masked LM's encoder as it is: the "before" figures
    if cfg.max_length > mlm.config.max_position_embeddings:
        raise InstructflowError(f"similarity.max_length = {cfg.max_length} exceeds the mlm encoder's "
                                f"max_position_embeddings = {mlm.config.max_position_embeddings}")
    tok = encoder_tokenizer(load_tokenizer(mlm_dir), cfg.max_length)
    gold = np.array([p.score for p in dev_pairs])
    log.info("similarity: %d train pairs -> %d %s rows; %d dev pairs", len(train_pairs), len(rows), cfg.objective,
             len(dev_pairs))

    tfidf = tfidf_cosines([s for p in train_pairs for s in (p.sentence1, p.sentence2)], dev_pairs)  # (N,)
    before = dev_cosines(mlm, tok, dev_pairs, cfg.max_length)  # (N,)
    before_examples = example_scores(mlm, tok, cfg.max_length)

    embedder = build_embedder(mlm_dir)
    history = train(embedder, rows, PairCollate(tok, cfg.max_length), make_step(cfg.objective, cfg.scale, cfg.max_score),
                    LoopSettings.from_config(cfg, params.seed),
                    eval_fn=lambda m: {"spearman": spearman(dev_cosines(m, tok, dev_pairs, cfg.max_length), gold)},
                    on_log=run.log_step)
    after = dev_cosines(embedder, tok, dev_pairs, cfg.max_length)  # (N,)
    after_examples = example_scores(embedder, tok, cfg.max_length)

    figures: dict[str, float] = {}
    boot = {"n_resamples": cfg.bootstrap_resamples, "confidence": cfg.confidence, "seed": params.seed}
    for key, sims in (("spearman", after), ("mlm_spearman", before), ("tfidf_spearman", tfidf)):
        value, low, high = spearman_with_ci(sims, dev_pairs, **boot)
        figures.update({key: value, f"{key}_ci_low": low, f"{key}_ci_high": high})
    gains = [spearman_gain("similarity", baseline, after, sims, dev_pairs, **boot)
             for baseline, sims in (("tfidf_cosine", tfidf), ("mlm", before))]
    for key, gain in zip(("gain_over_tfidf", "gain_over_mlm"), gains):
        figures.update({key: gain.gain, f"{key}_ci_low": gain.ci_low, f"{key}_ci_high": gain.ci_high})
    metrics = {key: round(value, 4) for key, value in figures.items()}
    metrics["beats_tfidf"] = int(gains[0].beats)  # the paired interval of the gain lies above 0
    metrics.update({f"example_{k}": v for k, v in after_examples.items()})
    metrics.update({f"mlm_example_{k}": v for k, v in before_examples.items()})
    metrics["example_paraphrase_above_unrelated"] = int(after_examples["paraphrase"] > after_examples["unrelated"])
    metrics.update(train_pairs=len(train_pairs), train_rows=len(rows), dev_pairs=len(dev_pairs))
    metrics.update(final_metrics(history, ("loss", "tokens_per_sec")))
    metrics.update(gain_metrics(gains))  # the per-stage gain table's rows (gain.similarity.spearman.all.<baseline>)

    with stage_output(root, "similarity", run, model=embedder, tokenizer=tok, history=history) as out:
        write_json_atomic(out / "evaluation.json", {k: v for k, v in metrics.items() if k != "tokens_per_sec"})
        write_predictions(out / "dev_predictions.csv", dev_pairs,
                          {"embedder_cosine": after, "mlm_cosine": before, "tfidf_cosine": tfidf})
        (out / "report.md").write_text(report(metrics, cfg), encoding="utf-8")
        run.log_artifact(out / "report.md", "report")
    log.info("similarity: dev Spearman %.4f [%.4f, %.4f] (mlm encoder %.4f, TF-IDF %.4f); beats TF-IDF: %s",
             metrics["spearman"], metrics["spearman_ci_low"], metrics["spearman_ci_high"], metrics["mlm_spearman"],
             metrics["tfidf_spearman"], bool(metrics["beats_tfidf"]))
    return metrics


def main() -> None:
    run_stage("similarity", body)


if __name__ == "__main__":
    main()

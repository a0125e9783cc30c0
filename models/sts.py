"""Semantic textual similarity (STS): sentence pairs scored by people, and how well a similarity ranks them.

The standard check of sentence embeddings (Reimers & Gurevych 2019, "Sentence-BERT", section 4.1): the
Spearman correlation, over the pairs of a held-out set, between the cosine of the two sentences' embeddings
and the gold score. Files as KorSTS ships them (Ham et al. 2020, "KorNLI and KorSTS"): TSV with a header
naming `score`, `sentence1` and `sentence2` (other columns ignored), cells unquoted; scores 0 to 5.

The baseline any embedding must clear is lexical: cosine of character 1-3-gram TF-IDF vectors, fit on the
training sentences (the n-grams of `models.classification.tfidf_baseline`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from instructflow.data import iter_csv, iter_jsonl, read_text
from instructflow.errors import DataError
from models.stats import Gain, bootstrap_ci, paired_gain

STS_COLUMNS = ("sentence1", "sentence2", "score")
MAX_SCORE = 5.0


@dataclass(frozen=True)
class StsPair:
    sentence1: str
    sentence2: str
    score: float


def read_sts(path: str | Path, max_score: float = MAX_SCORE) -> list[StsPair]:
    """The pairs of an STS file (.tsv, .csv or .jsonl with sentence1, sentence2, score), in file order.

    An empty sentence, a missing column or a score that is not a number in [0, max_score] is a DataError
    naming the file, line and column; nothing is returned unless every row is good.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".tsv", ".csv", ".jsonl"):
        raise DataError(path, f"unknown extension {suffix!r}; expected .tsv, .csv or .jsonl")
    if not path.is_file():
        raise DataError(path, "file not found")
    text = read_text(path)
    rows = iter_jsonl(path, text) if suffix == ".jsonl" else iter_csv(path, text, "\t" if suffix == ".tsv" else ",")
    pairs = []
    for line, row in rows:
        for column in STS_COLUMNS:
            if column not in row:
                raise DataError(path, f"no column '{column}'; columns found: {list(row)}", line=line, field=column)
        for column in STS_COLUMNS[:2]:
            if not isinstance(row[column], str) or not row[column].strip():
                raise DataError(path, f"expected a sentence, found {json.dumps(row[column], ensure_ascii=False)}",
                                line=line, field=column)
        try:
            score = float(row["score"])
        except (TypeError, ValueError):
            score = float("nan")
        if not 0 <= score <= max_score:  # NaN fails too
            raise DataError(path, f"score {row['score']!r} is not a number from 0 to {max_score:g}", line=line,
                            field="score")
        pairs.append(StsPair(row["sentence1"], row["sentence2"], score))
    if not pairs:
        raise DataError(path, "no sentence pairs", line=1)
    return pairs


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation: Pearson's correlation of the ranks (ties get their average rank).

    NaN when either side is constant (no order to correlate), as scipy.stats.spearmanr gives.
    """
    from scipy.stats import rankdata

    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)  # (N,), (N,)
    if a.shape != b.shape or a.ndim != 1 or a.size < 2:
        raise ValueError(f"spearman needs two 1-D lists of the same length >= 2, got shapes {a.shape} and {b.shape}")
    ra, rb = rankdata(a) - (a.size + 1) / 2, rankdata(b) - (b.size + 1) / 2  # centred ranks
    denominator = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / denominator) if denominator > 0 else float("nan")


def pair_cosines(vectors1: np.ndarray, vectors2: np.ndarray) -> np.ndarray:
    """Row-wise cosines (N,) of two (N, H) arrays; a zero vector has cosine 0 with anything."""
    a, b = np.asarray(vectors1, dtype=np.float64), np.asarray(vectors2, dtype=np.float64)  # (N, H) each
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)  # (N,)
    return np.where(norms > 0, (a * b).sum(axis=1) / np.where(norms > 0, norms, 1), 0.0)


def tfidf_cosines(train_sentences: Sequence[str], pairs: Sequence[StsPair]) -> np.ndarray:
    """Cosine (N,) of each pair's character 1-3-gram TF-IDF vectors, the vocabulary and weights fit on
    `train_sentences` (within word boundaries, sublinear tf, as `models.classification.tfidf_baseline`)."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectorizer = TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 3), sublinear_tf=True)
    vectorizer.fit(list(train_sentences))
    a = vectorizer.transform([p.sentence1 for p in pairs])  # (N, V) sparse, rows l2-normalised
    b = vectorizer.transform([p.sentence2 for p in pairs])  # (N, V)
    return np.asarray(a.multiply(b).sum(axis=1)).ravel()  # (N,)


def spearman_with_ci(similarities: Sequence[float], pairs: Sequence[StsPair], n_resamples: int = 1000,
                     confidence: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(Spearman, low, high): the rank correlation of the similarities with the gold scores, and its
    percentile-bootstrap interval over the pairs (resampled with replacement)."""
    sims, gold = np.asarray(similarities, dtype=float), np.array([p.score for p in pairs])  # (N,), (N,)
    if sims.shape != gold.shape:
        raise ValueError(f"{sims.size} similarities for {gold.size} pairs")
    return bootstrap_ci(np.arange(gold.size), n_resamples, confidence, seed,
                        statistic=lambda rows: spearman(sims[rows.astype(int)], gold[rows.astype(int)]))


def spearman_gain(stage: str, baseline: str, similarities: Sequence[float], baseline_similarities: Sequence[float],
                  pairs: Sequence[StsPair], n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0) -> Gain:
    """Spearman of `similarities` minus Spearman of `baseline_similarities` on the same pairs, with a paired
    bootstrap interval (both scored on each resample of the pairs), as one row of the per-stage gain table."""
    gold = np.array([p.score for p in pairs])  # (N,)
    rows = [np.column_stack([np.asarray(sims, dtype=float), gold]) for sims in (similarities, baseline_similarities)]
    return paired_gain(stage, "spearman", baseline, rows[0], rows[1], n_resamples=n_resamples, confidence=confidence,
                       seed=seed, statistic=lambda r: spearman(r[:, 0], r[:, 1]))

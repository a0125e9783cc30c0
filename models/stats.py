"""Small statistics for evaluation: percentile bootstrap intervals, paired win-rates and per-stage gains
against baselines (a paired bootstrap of the difference on the same items)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np


def bootstrap_ci(
    values: Sequence[float],
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    statistic: Callable[[np.ndarray], float] = np.mean,
) -> tuple[float, float, float]:
    """(estimate, low, high): `statistic` on `values` and its percentile bootstrap interval.

    Efron & Tibshirani 1993, "An Introduction to the Bootstrap", ch. 13: resample the items
    with replacement, recompute the statistic, and read the interval off its quantiles.
    Seeded, so the same values give the same interval.
    """
    x = np.asarray(values, dtype=float)  # (N,)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"bootstrap_ci needs a non-empty 1-D list of values, got shape {x.shape}")
    if not 0 < confidence < 1:
        raise ValueError(f"bootstrap_ci confidence must be in (0, 1), got {confidence}")
    if n_resamples < 1:
        raise ValueError(f"bootstrap_ci n_resamples must be >= 1, got {n_resamples}")

    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(n_resamples, x.size))  # (R, N)
    stats = np.array([statistic(x[row]) for row in idx])  # (R,)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(stats, [alpha, 1 - alpha])
    return float(statistic(x)), float(low), float(high)


def win_rate(a_scores: Sequence[float], b_scores: Sequence[float]) -> list[float]:
    """Per-item outcome of A against B on paired scores: 1 win, 0.5 tie, 0 loss.

    The mean of the list is A's win-rate (ties count half); feed the list to `bootstrap_ci`.
    """
    if len(a_scores) != len(b_scores):
        raise ValueError(f"win_rate needs paired scores, got {len(a_scores)} for A and {len(b_scores)} for B")
    return [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(a_scores, b_scores)]


# ------------------------------------------------------------------------------------------ per-stage gains
# A stage earns its place by beating a simple baseline on the same items. One gain = the model's statistic minus
# the baseline's, with a paired bootstrap interval (the same resampled items for both), and a verdict: the stage
# beats its baseline when the whole interval lies above 0. Gains travel through the metrics files (numbers only,
# as DVC and MLflow want them) under keys made by `gain_metrics` and read back by `gains_from_metrics`:
#
#   gain.<id>             model - baseline          gain.<id>_model      the model's statistic
#   gain.<id>_ci_low      paired bootstrap interval  gain.<id>_baseline   the baseline's statistic
#   gain.<id>_ci_high                                gain.<id>_n          items compared
#   beats.<id>            1.0 when ci_low > 0, else 0.0
#
# with <id> = <stage>.<metric>.<subset>.<baseline> (each a slug without dots; subset "all" for the whole set).

GAIN_SUFFIXES = ("_ci_low", "_ci_high", "_model", "_baseline", "_n")
BASELINE_LABELS = {"base": "base model", "sft": "SFT", "tie": "tie (0.5)", "tfidf": "TF-IDF", "length": "length",
                   "random_init": "random-init encoder", "tfidf_cosine": "TF-IDF cosine"}
"""How reports name a baseline slug (a slug not listed here is shown as it is)."""


@dataclass(frozen=True)
class Gain:
    """One row of a gain table: a stage's metric on a subset of items, against one baseline, on the same items."""

    stage: str
    metric: str
    subset: str
    baseline: str
    model_value: float
    baseline_value: float
    gain: float
    ci_low: float
    ci_high: float
    n: int

    def __post_init__(self) -> None:
        for field in ("stage", "metric", "subset", "baseline"):
            value = getattr(self, field)
            if not value or "." in value or value.endswith(GAIN_SUFFIXES) or value != value.strip():
                raise ValueError(f"gain {field} must be a non-empty slug without dots or a gain suffix, got {value!r}")

    @property
    def id(self) -> str:
        return f"{self.stage}.{self.metric}.{self.subset}.{self.baseline}"

    @property
    def beats(self) -> bool:
        """Whether the stage beats its baseline: the interval of the gain lies entirely above 0."""
        return self.ci_low > 0

    @property
    def baseline_label(self) -> str:
        return BASELINE_LABELS.get(self.baseline, self.baseline)

    @property
    def where(self) -> str:
        """The metric and its subset in words: `exact_match`, `exact_match (translate)`."""
        return self.metric if self.subset == "all" else f"{self.metric} ({self.subset})"

    def describe(self) -> str:
        """`accuracy (real): 0.55 vs TF-IDF 0.61, gain -0.06 [-0.12, +0.01]`"""
        return (f"{self.where}: {self.model_value:.3g} vs {self.baseline_label} {self.baseline_value:.3g}, "
                f"gain {self.gain:+.3f} [{self.ci_low:+.3f}, {self.ci_high:+.3f}]")


def paired_gain(
    stage: str,
    metric: str,
    baseline: str,
    model_items: Sequence | np.ndarray,
    baseline_items: Sequence | np.ndarray,
    subset: str = "all",
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    statistic: Callable[[np.ndarray], float] = np.mean,
) -> Gain:
    """The model's `statistic` minus the baseline's on the same items, with a paired percentile bootstrap interval.

    `model_items[i]` and `baseline_items[i]` are the two outcomes on item i (1/0 for a hit, 1/0.5/0 for a win, a
    score...). Each resample draws item indices with replacement and recomputes both statistics on the same items,
    so what the items share (an easy item is easy for both) cancels out of the difference. With the default mean,
    the gain is the mean paired difference. A statistic over rows (e.g. Spearman's rho of columns [prediction,
    gold]) takes 2-D items, one row per item. Seeded, so the same outcomes give the same interval.
    """
    a, b = np.asarray(model_items, dtype=float), np.asarray(baseline_items, dtype=float)  # (N, ...) each
    if a.ndim == 0 or a.shape[0] == 0:
        raise ValueError(f"paired_gain {stage}.{metric}.{subset}: needs at least one item")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"paired_gain {stage}.{metric}.{subset}: needs paired items, got {a.shape[0]} for the "
                         f"model and {b.shape[0]} for the baseline")
    if not 0 < confidence < 1:
        raise ValueError(f"paired_gain confidence must be in (0, 1), got {confidence}")
    if n_resamples < 1:
        raise ValueError(f"paired_gain n_resamples must be >= 1, got {n_resamples}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, a.shape[0], size=(n_resamples, a.shape[0]))  # (R, N)
    diffs = np.array([statistic(a[row]) - statistic(b[row]) for row in idx])  # (R,)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(diffs, [alpha, 1 - alpha])
    model_value, baseline_value = float(statistic(a)), float(statistic(b))
    return Gain(stage, metric, subset, baseline, model_value, baseline_value, model_value - baseline_value,
                float(low), float(high), int(a.shape[0]))


def gain_metrics(gains: Sequence[Gain]) -> dict[str, float]:
    """The gains as flat numeric metrics (the keys above), for metrics/<stage>.json."""
    flat: dict[str, float] = {}
    for g in gains:
        if f"gain.{g.id}" in flat:
            raise ValueError(f"gain {g.id} appears twice")
        flat.update({f"gain.{g.id}": g.gain, f"gain.{g.id}_ci_low": g.ci_low, f"gain.{g.id}_ci_high": g.ci_high,
                     f"gain.{g.id}_model": g.model_value, f"gain.{g.id}_baseline": g.baseline_value,
                     f"gain.{g.id}_n": g.n, f"beats.{g.id}": float(g.beats)})
    return flat


def gains_from_metrics(metrics: dict) -> list[Gain]:
    """The gains recorded in a metrics dict by `gain_metrics`, in the order recorded; other keys are ignored."""
    gains = []
    for key in metrics:
        if not key.startswith("gain.") or key.endswith(GAIN_SUFFIXES):
            continue
        gid = key.removeprefix("gain.")
        parts = gid.split(".")
        if len(parts) != 4 or any(f"{key}{s}" not in metrics for s in GAIN_SUFFIXES):
            continue  # not one of ours
        stage, metric, subset, baseline = parts
        gains.append(Gain(stage, metric, subset, baseline, float(metrics[f"{key}_model"]),
                          float(metrics[f"{key}_baseline"]), float(metrics[key]), float(metrics[f"{key}_ci_low"]),
                          float(metrics[f"{key}_ci_high"]), int(metrics[f"{key}_n"])))
    return gains


def gain_table(gains: Sequence[Gain], confidence: float | None = None) -> list[str]:
    """Markdown lines of the per-stage gain table: stage, metric, model, baseline, gain [CI], n, verdict."""
    conf = f"{confidence:.0%} " if confidence is not None else ""
    lines = [f"| stage | metric | model | baseline | gain [{conf}CI] | n | verdict |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for g in gains:
        verdict = "beats baseline" if g.beats else "**does not beat its baseline**"
        lines.append(f"| {g.stage} | {g.where} | {g.model_value:.4f} | {g.baseline_label} {g.baseline_value:.4f} | "
                     f"{g.gain:+.4f} [{g.ci_low:+.4f}, {g.ci_high:+.4f}] | {g.n} | {verdict} |")
    return lines



def baseline_flags(gains: Sequence[Gain]) -> list[str]:
    """One line per stage that does not beat one of its baselines, naming each comparison it fails, e.g.
    `does not beat its baseline: reward (accuracy (real): 0.55 vs TF-IDF 0.61, gain -0.060 [-0.120, +0.010])`."""
    failing: dict[str, list[Gain]] = {}
    for g in gains:
        if not g.beats:
            failing.setdefault(g.stage, []).append(g)
    return [f"does not beat its baseline: {stage} ({'; '.join(g.describe() for g in misses)})"
            for stage, misses in failing.items()]

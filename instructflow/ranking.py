"""A ranking of K responses to one prompt, as the (better, worse) pairs a reward model learns from.

InstructGPT (Ouyang et al. 2022, sec. 3.5): labelers rank K = 4..9 responses to a prompt, which gives K(K-1)/2
comparisons. Shuffled into the data set as independent pairs they overfit the reward model (each response is
seen K-1 times an epoch), so the paper keeps a ranking's pairs together as one element of a batch, each weighted
1 / (K(K-1)/2): every ranking counts once, however many pairs it makes.

A ranking is given as tiers, best first: [[0], [2, 1], [3]] says response 0 beats 2 and 1, which tie, and
both beat 3. A strict ranking is one response per tier (`strict_tiers`). Responses that tie make no pair.
Pure Python (no torch): prepare writes the pairs, the reward stage weights them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

Tiers = list[list[int]]


class RankingError(ValueError):
    """A ranking that is not a partition of 0..K-1 into at least two tiers; `field` is where (e.g. "[1][0]")."""

    def __init__(self, message: str, field: str = ""):
        super().__init__(message)
        self.field = field


class RankedPair(NamedTuple):
    better: int
    worse: int
    weight: float  # 1 / (the ranking's number of pairs): a ranking's weights sum to 1


def strict_tiers(k: int) -> Tiers:
    """K responses best first, no ties: [[0], [1], ..., [K-1]]."""
    return [[i] for i in range(k)]


def check_tiers(tiers: object, k: int) -> Tiers:
    """The tiers as lists of ints, or a RankingError: each of 0..k-1 in exactly one tier, no tier empty, >= 2 tiers."""
    if not isinstance(tiers, list):
        raise RankingError(f"expected a list of tiers (lists of response indices, best first), got "
                           f"{type(tiers).__name__}")
    seen: dict[int, str] = {}
    for t, tier in enumerate(tiers):
        if not isinstance(tier, list) or not tier:
            got = "an empty list" if isinstance(tier, list) else type(tier).__name__
            raise RankingError(f"expected a non-empty list of response indices, got {got}", f"[{t}]")
        for j, index in enumerate(tier):
            where = f"[{t}][{j}]"
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < k:
                raise RankingError(f"{index!r} is not a response index: expected an integer in 0..{k - 1} "
                                   f"({k} responses)", where)
            if index in seen:
                raise RankingError(f"response {index} is ranked twice (also at {seen[index]}); each response "
                                   f"belongs to exactly one tier", where)
            seen[index] = where
    missing = sorted(set(range(k)) - set(seen))
    if missing:
        raise RankingError(f"response(s) {missing} are in no tier; the tiers must hold each of 0..{k - 1} once")
    if len(tiers) < 2:
        raise RankingError("has one tier: every response ties, so there is no pair to learn from; expected >= 2 tiers")
    return [list(tier) for tier in tiers]


def ranking_pairs(tiers: Sequence[Sequence[int]]) -> list[RankedPair]:
    """Every (better, worse) pair of a ranking, tier by tier in order, each weighted 1 / (number of pairs).

    K responses in K tiers give K(K-1)/2 pairs, in the order of itertools.combinations (0, 1), (0, 2), ... (1, 2);
    responses in one tier are not compared. `tiers` is assumed valid (check_tiers).
    """
    pairs = [(better, worse) for t, tier in enumerate(tiers) for lower in tiers[t + 1:]
             for better in tier for worse in lower]
    return [RankedPair(better, worse, 1 / len(pairs)) for better, worse in pairs]

"""Human feedback on a model's samples: the K responses per prompt `instructflow generate --n K` wrote, the
rankings people give them (`instructflow label`), and the labels file the `rank` stage reads.

- `read_generation(path)`: a generation file (JSON lines, a row per sample: prompt_index, prompt, sample, response,
  ...; tasks/generation.py `generate_rows`) as `Group`s, one per prompt, its responses in `sample` order, with the
  sha256 of the file's bytes (`generation_hash`), which ties every label to the exact samples it ranks.
- A ranking is tiers of response indices (a response's index is its `sample`), best first: [[2], [0, 3], [1]]
  means 2 best, 0 and 3 tied, 1 worst; a strict ranking has one index per tier. `check_ranking` validates and
  normalises one (a flat list [2, 0, 3, 1] is strict tiers); `kendall_tau` compares two (tau-b, ties handled).
- The labels file: JSON lines, one row per (annotator, prompt):
  {"generation": <sha256 of the generation file>, "prompt_index", "annotator", "ranking": tiers,
   "unacceptable": [response indices], "time": ISO-8601 UTC}
  `write_labels` writes it atomically; `read_labels` reads it back against its generation, every bad row a
  DataError naming the file, the line and the field.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

from instructflow.data import _At, _prompt, _type, iter_jsonl, read_text
from instructflow.errors import DataError
from instructflow.io import write_jsonl

Tiers = tuple[tuple[int, ...], ...]
LABEL_FIELDS = ("generation", "prompt_index", "annotator", "ranking", "unacceptable", "time")


def generation_hash(path: str | Path) -> str:
    """The sha256 (hex) of the file's bytes: the identity of a generation, stamped on every label made from it."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# The generation: K responses per prompt


@dataclass(frozen=True)
class Group:
    """One prompt and its K responses, in `sample` order (response i is sample i)."""

    prompt_index: int
    prompt: str | list[dict]
    responses: tuple[str, ...]

    @property
    def k(self) -> int:
        return len(self.responses)


@dataclass(frozen=True)
class Generation:
    """A generation file: its path, the sha256 of its bytes and its prompts' groups, by ascending prompt_index."""

    path: Path
    hash: str
    groups: tuple[Group, ...]
    by_index: Mapping[int, Group] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_index", MappingProxyType({g.prompt_index: g for g in self.groups}))

    def __len__(self) -> int:
        return len(self.groups)


def _int(at: _At, row: dict, key: str) -> int:
    value = row.get(key)
    if value is None:
        raise at.error(key, "missing; expected a whole number >= 0")
    if isinstance(value, bool) or not isinstance(value, int):
        raise at.error(key, f"expected a whole number >= 0, got {_type(value)} ({value!r})")
    if value < 0:
        raise at.error(key, f"expected a whole number >= 0, got {value}")
    return value


def read_generation(path: str | Path) -> Generation:
    """The groups of a generation file (what `instructflow generate --n K` writes), checked row by row.

    Each row needs `prompt_index` and `sample` (whole numbers >= 0), `prompt` (a string, or chat messages ending
    with a user turn) and `response` (a string); other fields are ignored. The rows of one prompt_index carry the
    same prompt, samples 0..K-1 each once (in any order), K >= 2. A DataError names the file, line and field.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "no such file; expected the JSON lines `instructflow generate --n K --out FILE` writes")
    text = read_text(path)
    rows: dict[int, dict[int, tuple[int, str]]] = {}  # prompt_index -> sample -> (line, response)
    prompts: dict[int, tuple[int, Any]] = {}  # prompt_index -> (first line, prompt as given)
    for line, row in iter_jsonl(path, text):
        at = _At(path, line)
        index = _int(at, row, "prompt_index")
        sample = _int(at, row, "sample")
        _prompt(at, row)  # a string or messages ending with a user turn, else an error naming it
        response = row.get("response")
        if response is None:
            raise at.error("response", "missing; expected the sample's text (a string)")
        if not isinstance(response, str):
            raise at.error("response", f"expected a string, got {_type(response)}")
        if index in prompts and row["prompt"] != prompts[index][1]:
            raise at.error("prompt", f"differs from the prompt of prompt_index {index} on line {prompts[index][0]}; "
                                     "expected every sample of a prompt to carry the same prompt")
        prompts.setdefault(index, (line, row["prompt"]))
        samples = rows.setdefault(index, {})
        if sample in samples:
            raise at.error("sample", f"prompt_index {index} has sample {sample} twice (first on line "
                                     f"{samples[sample][0]}); expected each (prompt_index, sample) once")
        samples[sample] = (line, response)
    if not rows:
        raise DataError(path, "has no rows; expected the JSON lines `instructflow generate --n K` writes (K >= 2)")
    groups = []
    for index in sorted(rows):
        samples, first = rows[index], prompts[index][0]
        if len(samples) < 2:
            raise DataError(path, f"prompt_index {index} has {len(samples)} response; ranking needs at least 2 per "
                                  "prompt (generate with --n 2 or more)", line=first, field="sample")
        if sorted(samples) != list(range(len(samples))):
            missing = sorted(set(range(max(samples) + 1)) - set(samples))
            raise DataError(path, f"prompt_index {index} has samples {sorted(samples)}; expected 0..{len(samples) - 1} "
                                  f"(missing {', '.join(map(str, missing))})", line=samples[max(samples)][0],
                            field="sample")
        groups.append(Group(index, prompts[index][1], tuple(samples[s][1] for s in range(len(samples)))))
    return Generation(path, generation_hash(path), tuple(groups))


# --------------------------------------------------------------------------------------------------
# Rankings


def check_ranking(tiers: Any, k: int, allow_ties: bool) -> Tiers:
    """Tiers of response indices, best first, checked to partition range(k); each tier sorted.

    `tiers` is a list of tiers (lists of indices) or a flat list of indices (strict tiers); a bare index among
    tiers is a tier of one. Without `allow_ties` every tier holds one index. A ValueError says what is wrong.
    """
    if isinstance(tiers, (str, bytes)) or not isinstance(tiers, Sequence):
        raise ValueError(f"expected a list of tiers (lists of response indices), got {_type(tiers)}")
    out: list[tuple[int, ...]] = []
    seen: set[int] = set()
    for t, tier in enumerate(tiers):
        members = [tier] if isinstance(tier, int) and not isinstance(tier, bool) else tier
        if isinstance(members, (str, bytes)) or not isinstance(members, Sequence):
            raise ValueError(f"tier {t}: expected a list of response indices, got {_type(tier)}")
        if not members:
            raise ValueError(f"tier {t} is empty; expected at least one response index")
        for i in members:
            if isinstance(i, bool) or not isinstance(i, int):
                raise ValueError(f"tier {t}: expected response indices (whole numbers), got {_type(i)} ({i!r})")
            if not 0 <= i < k:
                raise ValueError(f"tier {t}: response {i} does not exist; expected indices 0..{k - 1}")
            if i in seen:
                raise ValueError(f"response {i} is ranked twice; expected each of 0..{k - 1} once")
            seen.add(i)
        if len(members) > 1 and not allow_ties:
            raise ValueError(f"tier {t} ties responses {', '.join(map(str, members))}; ties are not allowed here "
                             "(one response per tier)")
        out.append(tuple(sorted(members)))
    if len(seen) != k:
        missing = sorted(set(range(k)) - seen)
        raise ValueError(f"response{'s' * (len(missing) > 1)} {', '.join(map(str, missing))} "
                         f"{'are' if len(missing) > 1 else 'is'} not ranked; expected each of 0..{k - 1} once")
    return tuple(out)


def _positions(tiers: Sequence[Sequence[int]]) -> dict[int, int]:
    return {i: t for t, tier in enumerate(tiers) for i in tier}


def kendall_tau(a: Any, b: Any) -> float:
    """Kendall's tau-b between two rankings (tiers, or flat strict lists) of the same k responses.

    Over the k(k-1)/2 pairs: (concordant - discordant) / sqrt((pairs - pairs tied in a) * (pairs - pairs tied in
    b)); a pair tied in either ranking is neither. 1: the same order, -1: reversed. NaN when a ranking ties every
    response (no order to compare).
    """
    k = sum(1 if isinstance(t, int) else len(t) for t in a)
    ra, rb = _positions(check_ranking(a, k, True)), _positions(check_ranking(b, k, True))
    concordant = discordant = tied_a = tied_b = 0
    for i in range(k):
        for j in range(i + 1, k):
            da, db = ra[i] - ra[j], rb[i] - rb[j]
            tied_a += da == 0
            tied_b += db == 0
            if da * db > 0:
                concordant += 1
            elif da * db < 0:
                discordant += 1
    pairs = k * (k - 1) // 2
    denominator = math.sqrt((pairs - tied_a) * (pairs - tied_b))
    return (concordant - discordant) / denominator if denominator else math.nan


# --------------------------------------------------------------------------------------------------
# Labels


@dataclass(frozen=True)
class Label:
    """One person's ranking of one prompt's responses (a row of the labels file)."""

    generation: str
    prompt_index: int
    annotator: str
    ranking: Tiers
    unacceptable: tuple[int, ...] = ()
    time: str = ""

    def to_row(self) -> dict:
        return {"generation": self.generation, "prompt_index": self.prompt_index, "annotator": self.annotator,
                "ranking": [list(t) for t in self.ranking], "unacceptable": list(self.unacceptable),
                "time": self.time}


def write_labels(path: str | Path, rows: Iterable[Label | Mapping]) -> int:
    """The labels file: a JSON line per Label (or row dict), written atomically; returns the count."""
    return write_jsonl(Path(path), (r.to_row() if isinstance(r, Label) else {k: r[k] for k in LABEL_FIELDS}
                                    for r in rows))


def _unacceptable(at: _At, value: Any, k: int) -> tuple[int, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise at.error("unacceptable", f"expected a list of response indices, got {_type(value)}")
    for i in value:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < k:
            raise at.error("unacceptable", f"{i!r} is not a response index; expected indices 0..{k - 1}")
    if len(set(value)) != len(value):
        raise at.error("unacceptable", "names a response twice; expected each index once")
    return tuple(sorted(value))


def read_labels(path: str | Path, generation: Generation) -> dict[int, list[Label]]:
    """The labels of a labels file, by prompt_index (only prompts with labels; each list in file order).

    Every row must come from `generation` (its hash), name one of its prompts, rank all of that prompt's
    responses (ties allowed), and be the only row of its (annotator, prompt_index); else a DataError naming the
    file, the line and the field.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "no such file; expected a labels file (`instructflow label FILE --export OUT`)")
    out: dict[int, list[Label]] = {}
    seen: dict[tuple[str, int], int] = {}
    for line, row in iter_jsonl(path, read_text(path)):
        at = _At(path, line)
        made_from = row.get("generation")
        if not isinstance(made_from, str):
            raise at.error("generation", f"expected the sha256 of the generation file, got {_type(made_from)}")
        if made_from != generation.hash:
            raise at.error("generation", f"was made from generation {made_from}, not {generation.hash} "
                                         f"({generation.path})")
        index = _int(at, row, "prompt_index")
        if index not in generation.by_index:
            raise at.error("prompt_index", f"{index} is not a prompt of {generation.path} (it has "
                                           f"{_index_span(generation)})")
        annotator = row.get("annotator")
        if not isinstance(annotator, str) or not annotator.strip():
            raise at.error("annotator", f"expected a non-empty string, got {_type(annotator)}")
        k = generation.by_index[index].k
        try:
            ranking = check_ranking(row.get("ranking"), k, allow_ties=True)
        except ValueError as exc:
            raise at.error("ranking", f"{exc} (prompt_index {index} has {k} responses)") from None
        unacceptable = _unacceptable(at, row.get("unacceptable"), k)
        time = row.get("time")
        try:
            datetime.fromisoformat(time) if isinstance(time, str) else None
        except ValueError:
            time = None
        if not isinstance(time, str):
            raise at.error("time", "expected an ISO-8601 time such as 2026-12-05T12:00:00+00:00, got "
                                   f"{row.get('time')!r}")
        key = (annotator, index)
        if key in seen:
            raise at.error("annotator", f"{annotator!r} ranked prompt_index {index} already on line {seen[key]}; "
                                        "expected one row per (annotator, prompt_index)")
        seen[key] = line
        out.setdefault(index, []).append(Label(made_from, index, annotator, ranking, unacceptable, time))
    return out


def _index_span(generation: Generation) -> str:
    indices = list(generation.by_index)
    contiguous = indices == list(range(indices[0], indices[0] + len(indices)))
    return (f"prompt_index {indices[0]}..{indices[-1]}" if contiguous
            else f"{len(indices)} prompts: {', '.join(map(str, indices[:10]))}{', ...' if len(indices) > 10 else ''}")

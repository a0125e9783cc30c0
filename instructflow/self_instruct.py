"""Self-Instruct (Wang et al. 2022): grow a pool of instructions from a model's own suggestions, filtered.

The loop follows the reference implementation (yizhongw/self-instruct, `bootstrap_instructions.py`): each prompt
is "Come up with a series of tasks:" and 8 numbered instructions (2 from the machine pool once it has some, the
rest from the human seed tasks, shuffled), ending with the next number, "9."; the model continues the list; the
numbered items it writes are parsed and kept only if they pass every filter:

- `truncated`: the last item of a completion that ran out of tokens (it may stop mid-sentence). The reference
  dropped the whole completion then; here only the cut item goes;
- `malformed`: an empty item, one whose number is not the next in the list (the model started a new list), or
  one with a replacement character or a control character: bytes that do not decode to text, which a byte-level
  tokenizer lets a small model write (GPT-3 never did, so the paper needed no such filter);
- `length`: 3 words or fewer, or more than 150;
- `keyword`: a word a text-only model cannot act on (image, file, plot, go to, ...: BANNED_KEYWORDS);
- `program`: starts with "Write a program" (the paper's model added it to many tasks);
- `punctuation`: starts with punctuation;
- `language`: starts with a character that is not ASCII. The reference drops every non-English start; this project
  is bilingual (its tokenizer and chat data are Korean and English), so a Hangul start is kept unless
  `keep_korean` is off, and the ROUGE-L tokens include runs of Hangul syllables so near-copies in Korean are caught;
- `duplicate`: the same text (case and spaces aside) as an instruction already in the pool;
- `similar`: ROUGE-L F-measure >= 0.7 with an instruction in the pool (seeds and the ones kept so far).

Each filter is its own function returning the reason it drops a candidate (None: passes), so a candidate counts
once, under the first filter it fails. Pure Python: the model is the `complete` callable `bootstrap` is given.
"""

from __future__ import annotations

import random
import re
import string
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from instructflow.data import iter_jsonl, read_text
from instructflow.errors import DataError

PROMPT_HEADER = "Come up with a series of tasks:\n"
STOP = "\n\n"  # the reference's stop sequence: a completion that contains it ended; one without ran out of tokens
MIN_WORDS, MAX_WORDS = 4, 150  # the reference keeps 3 < words <= 150
BANNED_KEYWORDS = ("image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps",
                   "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram")
ROUGE_THRESHOLD = 0.7
REASONS = ("truncated", "malformed", "length", "keyword", "program", "punctuation", "language", "duplicate",
           "similar")

_BANNED = re.compile(r"\b(" + "|".join(re.escape(w) for w in BANNED_KEYWORDS) + r")\b", re.IGNORECASE)
_NUMBERED = re.compile(r"^\s*(\d+)\s?\.(?:\s+|$)(.*)$")  # "10. text", "10 . text"; not "3.5 apples"
_TOKEN = re.compile(r"[a-z0-9]+|[\uac00-\ud7a3]+")  # rouge_score's default tokens, plus Hangul syllable runs


def is_hangul(char: str) -> bool:
    return "\uac00" <= char <= "\ud7a3"


def normalise(text: str) -> str:
    """Whitespace runs to one space, stripped: how instructions are compared, prompted and stored."""
    return re.sub(r"\s+", " ", text).strip()


# ---------------------------------------------------------------------------------------------- seeds
def load_seeds(path: Path) -> list[str]:
    """The seed tasks' instructions (yizhongw/self-instruct `seed_tasks.jsonl`: one object per line with an
    `instruction`); a malformed row is a DataError naming the file, the line and the field."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found; expected the Self-Instruct seed tasks (JSON lines with 'instruction')")
    seeds = []
    for line, row in iter_jsonl(path, read_text(path)):
        value = row.get("instruction")
        if not isinstance(value, str) or not value.strip():
            got = "missing" if value is None else f"got {value!r:.40}"
            raise DataError(path, f"{got}; expected a non-empty string", line=line, field="instruction")
        seeds.append(normalise(value))
    if not seeds:
        raise DataError(path, "no seed tasks; expected JSON lines with an 'instruction' each")
    return seeds


# --------------------------------------------------------------------------------------------- prompts
def encode_prompt(instructions: Sequence[str]) -> str:
    """The reference's prompt: the header, the instructions numbered from 1 (a trailing ':' dropped), the next
    number, which the model continues."""
    lines = [f"{i}. {normalise(inst).rstrip(':')}\n" for i, inst in enumerate(instructions, start=1)]
    return PROMPT_HEADER + "".join(lines) + f"{len(instructions) + 1}."


def sample_prompt_instructions(seeds: Sequence[str], machine: Sequence[str], rng: random.Random,
                               n_human: int = 6, n_machine: int = 2) -> list[str]:
    """Up to n_machine instructions from the machine pool, seeds for the rest of n_human + n_machine, shuffled."""
    chosen = rng.sample(list(machine), min(n_machine, len(machine)))
    chosen += rng.sample(list(seeds), n_human + n_machine - len(chosen))
    rng.shuffle(chosen)
    return chosen


# --------------------------------------------------------------------------------------------- parsing
@dataclass(frozen=True)
class Candidate:
    text: str
    reason: str | None = None  # set when parsing already rules it out: truncated or malformed


def parse_completion(text: str, first_number: int) -> list[Candidate]:
    """The numbered items a completion of `encode_prompt(...)` (which ends with "{first_number}.") writes.

    The completion is cut at STOP; the text before the first numbered line is item `first_number`. A line that
    is not numbered continues the item above it. Each item is a candidate: `malformed` when empty or when its
    number is not first_number + its position; `truncated` when it is the last item and the completion has no
    STOP (the token budget cut it).
    """
    body, stop, _ = text.partition(STOP)
    items: list[tuple[int, list[str]]] = [(first_number, [])]
    for line in body.split("\n"):
        match = _NUMBERED.match(line)
        if match:
            items.append((int(match[1]), [match[2]]))
        else:
            items[-1][1].append(line)
    candidates = []
    for position, (number, lines) in enumerate(items):
        content = normalise(" ".join(lines))
        if position == len(items) - 1 and not stop:
            reason = "truncated"
        elif not content or number != first_number + position:
            reason = "malformed"
        else:
            reason = None
        candidates.append(Candidate(content, reason))
    return candidates


# --------------------------------------------------------------------------------------------- filters
def malformed_reason(text: str) -> str | None:
    """`malformed` when the text holds U+FFFD (undecodable bytes) or a control character."""
    bad = "\ufffd" in text or any(unicodedata.category(char) == "Cc" for char in text)
    return "malformed" if bad else None


def length_reason(text: str) -> str | None:
    """`length` unless MIN_WORDS <= words <= MAX_WORDS (whitespace-separated words)."""
    return None if MIN_WORDS <= len(text.split()) <= MAX_WORDS else "length"


def keyword_reason(text: str) -> str | None:
    """`keyword` when a banned word appears as a whole word, any case ("Images" yes, "profile" no)."""
    return "keyword" if _BANNED.search(text) else None


def program_reason(text: str) -> str | None:
    return "program" if text.lower().startswith("write a program") else None


def punctuation_reason(text: str) -> str | None:
    return "punctuation" if text[:1] in set(string.punctuation) else None


def language_reason(text: str, keep_korean: bool = True) -> str | None:
    """`language` when the first character is not ASCII (a Hangul syllable passes while keep_korean)."""
    first = text[:1]
    return None if first.isascii() or (keep_korean and is_hangul(first)) else "language"


def text_reason(text: str, keep_korean: bool = True) -> str | None:
    """The first of the filters that need only the text to drop it, or None."""
    for check in (malformed_reason, length_reason, keyword_reason, program_reason, punctuation_reason):
        if reason := check(text):
            return reason
    return language_reason(text, keep_korean)


# ---------------------------------------------------------------------------------------------- ROUGE-L
def rouge_tokens(text: str) -> list[str]:
    """rouge_score's default tokenizer (lowercase, runs of a-z0-9, no stemming), plus runs of Hangul syllables."""
    return _TOKEN.findall(text.lower())


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence, by dynamic programming over one row."""
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0  # row[j - 1] of the previous row
        for j, y in enumerate(b, start=1):
            diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l_tokens(a: Sequence[str], b: Sequence[str]) -> float:
    """ROUGE-L F-measure of two token lists: 2PR / (P + R) with P = LCS / len(b), R = LCS / len(a), which is
    2 LCS / (len(a) + len(b)), computed so (one division: 7 of 10 and 10 tokens gives exactly 0.7)."""
    if not a or not b:
        return 0.0
    return 2 * lcs_length(a, b) / (len(a) + len(b))


def rouge_l(a: str, b: str) -> float:
    """ROUGE-L F-measure of two texts on `rouge_tokens` (symmetric; 0 when either has no tokens)."""
    return rouge_l_tokens(rouge_tokens(a), rouge_tokens(b))


# ---------------------------------------------------------------------------------------------- the loop
@dataclass
class Pool:
    """Every instruction new ones are compared with: the seeds and the ones kept so far."""

    tokens: list[list[str]] = field(default_factory=list)  # each instruction's ROUGE tokens
    keys: set[str] = field(default_factory=set)  # each instruction lowercased: exact duplicates

    def add(self, text: str) -> None:
        self.tokens.append(rouge_tokens(text))
        self.keys.add(text.lower())

    def max_rouge_l(self, text: str) -> float:
        """The highest ROUGE-L F-measure of text against the pool (0 for an empty pool)."""
        tokens = rouge_tokens(text)
        return max((rouge_l_tokens(tokens, other) for other in self.tokens), default=0.0)

    def judge(self, candidate: Candidate, threshold: float, keep_korean: bool = True) -> tuple[str | None, float]:
        """(the reason it is dropped or None, its highest ROUGE-L with the pool: 0 unless it got that far)."""
        reason = candidate.reason or text_reason(candidate.text, keep_korean)
        if reason is None and candidate.text.lower() in self.keys:
            reason = "duplicate"
        if reason:
            return reason, 0.0
        score = self.max_rouge_l(candidate.text)
        return ("similar" if score >= threshold else None), score


@dataclass
class Result:
    kept: list[dict]  # {instruction, source: model, round, max_rouge_l}
    dropped: dict[str, int]  # reason -> count, every reason in REASONS
    generated: int  # candidates examined (kept + dropped)
    rounds: int
    prompts: int

    def metrics(self) -> dict[str, float]:
        return {"generated": self.generated, "kept": len(self.kept), "rounds": self.rounds, "prompts": self.prompts,
                "keep_rate": round(len(self.kept) / self.generated, 4) if self.generated else 0.0,
                **{f"dropped_{reason}": n for reason, n in self.dropped.items()}}


def bootstrap(seeds: Sequence[str], complete: Callable[[list[str]], list[str]], n_target: int, *,
              prompts_per_round: int = 8, max_rounds: int = 20, rng: random.Random | None = None,
              n_human: int = 6, n_machine: int = 2, threshold: float = ROUGE_THRESHOLD,
              keep_korean: bool = True) -> Result:
    """Rounds of prompts until n_target instructions are kept or max_rounds have run.

    Each round samples prompts_per_round prompts (`sample_prompt_instructions`, `encode_prompt`), calls
    `complete(prompts) -> texts` once (the model; a text without STOP ran out of tokens, see
    `parse_completion`), and passes every candidate through the filters in order; a kept one joins the pool at
    once, so later candidates are compared with it too. Candidates after the n_target-th kept one are not looked
    at (nor counted).
    """
    seeds = [normalise(s) for s in seeds]
    if len(seeds) < n_human + n_machine:
        raise ValueError(f"a prompt takes {n_human + n_machine} instructions, but there are only {len(seeds)} seeds")
    rng = rng or random.Random(0)
    pool = Pool()
    for seed in seeds:
        pool.add(seed)
    kept: list[dict] = []
    dropped = dict.fromkeys(REASONS, 0)
    generated = rounds = n_prompts = 0
    while len(kept) < n_target and rounds < max_rounds:
        rounds += 1
        machine = [row["instruction"] for row in kept]
        prompts = [encode_prompt(sample_prompt_instructions(seeds, machine, rng, n_human, n_machine))
                   for _ in range(prompts_per_round)]
        texts = complete(prompts)
        if len(texts) != len(prompts):
            raise ValueError(f"complete() returned {len(texts)} texts for {len(prompts)} prompts")
        n_prompts += len(prompts)
        for text in texts:
            for candidate in parse_completion(text, n_human + n_machine + 1):
                if len(kept) >= n_target:
                    break
                generated += 1
                reason, score = pool.judge(candidate, threshold, keep_korean)
                if reason:
                    dropped[reason] += 1
                    continue
                kept.append({"instruction": candidate.text, "source": "model", "round": rounds,
                             "max_rouge_l": round(score, 4)})
                pool.add(candidate.text)
    return Result(kept, dropped, generated, rounds, n_prompts)

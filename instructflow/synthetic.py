"""Synthetic instruction tasks with exact answers, so instruction following can be measured.

Three kinds in the spirit of instruction tuning's classic examples: translate a word between Korean
and English from a small built-in lexicon, replace a person's name in a sentence, and short
arithmetic. Every task has one exact answer and one plausible wrong answer (another lexicon word,
the sentence with the old name kept, an off-by-some number); the wrong answer makes the rejected
response of a preference pair and the False row of the unpaired data.

Generation is deterministic for a seed. Train and eval tasks never share a prompt, and the eval
tasks do not depend on `n_train`, so accuracy stays comparable across training sizes.
"""

from __future__ import annotations

import random
import unicodedata
from dataclasses import dataclass

from instructflow.errors import ConfigError

KINDS = ("translate", "rename", "arithmetic")
SOURCE = "synthetic"

# Korean -> English, one sense each both ways (no 배 pear/ship/belly, 눈 eye/snow, 차 tea/car).
LEXICON: tuple[tuple[str, str], ...] = (
    ("사과", "apple"), ("바나나", "banana"), ("포도", "grape"), ("딸기", "strawberry"),
    ("수박", "watermelon"), ("우유", "milk"), ("빵", "bread"), ("쌀", "rice"),
    ("고기", "meat"), ("생선", "fish"), ("계란", "egg"), ("소금", "salt"),
    ("설탕", "sugar"), ("커피", "coffee"), ("개", "dog"), ("고양이", "cat"),
    ("돼지", "pig"), ("닭", "chicken"), ("곰", "bear"), ("호랑이", "tiger"),
    ("토끼", "rabbit"), ("원숭이", "monkey"), ("코끼리", "elephant"), ("사자", "lion"),
    ("뱀", "snake"), ("나무", "tree"), ("꽃", "flower"), ("산", "mountain"),
    ("바다", "sea"), ("강", "river"), ("하늘", "sky"), ("별", "star"),
    ("달", "moon"), ("태양", "sun"), ("비", "rain"), ("바람", "wind"),
    ("집", "house"), ("학교", "school"), ("병원", "hospital"), ("책", "book"),
    ("연필", "pencil"), ("의자", "chair"), ("책상", "desk"), ("창문", "window"),
    ("시계", "clock"), ("모자", "hat"), ("가방", "bag"), ("자동차", "car"),
    ("기차", "train"), ("비행기", "airplane"), ("자전거", "bicycle"), ("손", "hand"),
    ("귀", "ear"), ("코", "nose"), ("친구", "friend"), ("어머니", "mother"),
    ("아버지", "father"), ("겨울", "winter"), ("여름", "summer"), ("가을", "autumn"),
    ("음악", "music"), ("돈", "money"), ("우산", "umbrella"), ("거울", "mirror"),
)  # fmt: skip

# No name is a substring of another name or of a template, so a replacement touches one place only.
NAMES = (
    "Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Irene", "James", "Karen", "Liam",
    "Maria", "Nora", "Oscar", "Paul", "Rosa", "Tina", "Victor", "Wendy", "Yuki", "Minji", "Jisoo", "Hana",
)  # fmt: skip
SENTENCES = (
    "{name} went to the market.", "{name} is reading a book in the garden.",
    "Yesterday {name} baked a chocolate cake.", "The teacher gave {name} a gold star.",
    "{name} plays the piano every evening.", "We met {name} at the train station.",
    "{name} forgot the umbrella at home.", "After lunch, {name} took a short nap.",
    "{name} painted the fence blue.", "The dog followed {name} to school.",
    "{name} wrote a letter to a friend.", "Everyone clapped when {name} finished the race.",
    "{name} planted tomatoes in the spring.", "The phone rang while {name} was cooking.",
    "{name} is learning to speak Korean.", "My neighbour {name} fixes old bicycles.",
    "{name} found a coin under the sofa.", "On Monday, {name} started a new job.",
    "{name} lost the keys again.", "The children asked {name} for a story.",
)  # fmt: skip

KO_TO_EN = (
    "Translate the Korean word '{word}' into English.",
    "What is the English word for '{word}'?",
    "Give the English translation of the Korean word '{word}'.",
    "In English, what does the Korean word '{word}' mean? Answer with one word.",
)
EN_TO_KO = (
    "Translate the English word '{word}' into Korean.",
    "What is the Korean word for '{word}'?",
    "Give the Korean translation of the English word '{word}'.",
    "How do you say '{word}' in Korean? Answer with one word.",
)
RENAME = (
    "Replace the name {old} with {new} in: '{sentence}'",
    "Rewrite this sentence with {new} instead of {old}: '{sentence}'",
)
ARITHMETIC = ("What is {a} {op} {b}?", "Compute {a} {op} {b}.", "Calculate {a} {op} {b} and give only the number.")
OPERANDS = {"+": (range(1, 51), None), "-": (range(1, 100), "le_a"), "*": (range(2, 16), None)}
OFF_BY = (-10, -2, -1, 1, 2, 10)  # plausible arithmetic slips

QUOTES = "'\"`‘’“”"
TRAILING_PUNCTUATION = ".!?,;:。！？"


@dataclass(frozen=True)
class Task:
    """One synthetic task: the user prompt, its exact answer, and a plausible wrong answer."""

    kind: str
    prompt: str
    answer: str
    wrong: str


@dataclass(frozen=True)
class SyntheticSplits:
    """Train and held-out eval tasks; no prompt appears in both."""

    train: list[Task]
    eval: list[Task]


# A candidate before the draw: prompt, answer, the wrong answers to pick one from.
_Candidate = tuple[str, str, tuple[str, ...]]


def _translate_pools() -> list[list[_Candidate]]:
    """Two pools (Korean->English, English->Korean) of every word in every phrasing."""
    korean, english = [ko for ko, _ in LEXICON], [en for _, en in LEXICON]
    ko_en = [(t.format(word=ko), en, tuple(w for w in english if w != en)) for ko, en in LEXICON for t in KO_TO_EN]
    en_ko = [(t.format(word=en), ko, tuple(w for w in korean if w != ko)) for ko, en in LEXICON for t in EN_TO_KO]
    return [ko_en, en_ko]


def _rename_pools() -> list[list[_Candidate]]:
    """One pool: every sentence, ordered pair of names and phrasing; the wrong answer keeps the old name."""
    pool = []
    for template in SENTENCES:
        for old in NAMES:
            sentence = template.format(name=old)
            for new in NAMES:
                if new != old:
                    answer = template.format(name=new)
                    pool += [(t.format(old=old, new=new, sentence=sentence), answer, (sentence,)) for t in RENAME]
    return [pool]


def _arithmetic_pools() -> list[list[_Candidate]]:
    """One pool per operator, so +, - and * are drawn equally often (* has far fewer small problems)."""
    pools = []
    for op, (numbers, rule) in OPERANDS.items():
        pool = []
        for a in numbers:
            for b in numbers:
                if rule == "le_a" and b > a:  # keep differences non-negative
                    continue
                value = a + b if op == "+" else a - b if op == "-" else a * b
                wrongs = tuple(str(value + d) for d in OFF_BY)
                pool += [(t.format(a=a, op=op, b=b), str(value), wrongs) for t in ARITHMETIC]
        pools.append(pool)
    return pools


POOLS = {"translate": _translate_pools, "rename": _rename_pools, "arithmetic": _arithmetic_pools}


def capacity(kind: str) -> int:
    """How many distinct prompts a kind can make (train and eval together)."""
    return sum(len(pool) for pool in POOLS[kind]())


def _allocate(n: int, room: dict[str, int]) -> dict[str, int]:
    """Split n tasks as evenly as possible across kinds, giving a full kind's share to the others."""
    share = {kind: 0 for kind in room}
    left = n
    while left > 0:
        open_kinds = [kind for kind in room if share[kind] < room[kind]]
        if not open_kinds:
            break
        for i, kind in enumerate(open_kinds):
            extra = min(left // len(open_kinds) + (i < left % len(open_kinds)), room[kind] - share[kind])
            share[kind] += extra
        left = n - sum(share.values())
    return share


def _draw(pools: list[list[_Candidate]], n: int, rng: random.Random) -> list[_Candidate]:
    """n distinct candidates, taking from the pools in turn so each pool is equally represented."""
    queues = [rng.sample(pool, len(pool)) for pool in pools]
    drawn: list[_Candidate] = []
    while len(drawn) < n:
        for queue in queues:
            if queue and len(drawn) < n:
                drawn.append(queue.pop())
    return drawn


def generate(n_train: int, n_eval: int, kinds: list[str] | tuple[str, ...] = KINDS, seed: int = 0) -> SyntheticSplits:
    """Make n_train training and n_eval held-out tasks, kinds balanced, deterministic for the seed.

    Eval tasks are drawn first from each kind, so they stay the same when n_train changes.
    """
    kinds = list(dict.fromkeys(kinds))
    unknown = [kind for kind in kinds if kind not in KINDS]
    if unknown:
        raise ConfigError(f"synthetic.kinds: unknown kind {unknown[0]!r}; expected some of {', '.join(KINDS)}")
    if n_train < 0 or n_eval < 0:
        raise ConfigError(f"synthetic: n_train and n_eval must be >= 0, got {n_train} and {n_eval}")
    pools = {kind: POOLS[kind]() for kind in kinds}
    room = {kind: sum(len(pool) for pool in pools[kind]) for kind in kinds}
    if n_train + n_eval > sum(room.values()):
        raise ConfigError(
            f"synthetic: asked for {n_train} + {n_eval} tasks but kinds {kinds} make only "
            f"{sum(room.values())} distinct prompts; lower synthetic.n_train / n_eval or add kinds")
    eval_n = _allocate(n_eval, room)
    train_n = _allocate(n_train, {kind: room[kind] - eval_n[kind] for kind in kinds})
    train: list[Task] = []
    held_out: list[Task] = []
    for kind in kinds:
        rng = random.Random(f"{seed}:{kind}")  # one stream per kind: adding a kind leaves the others as they were
        drawn = _draw(pools[kind], eval_n[kind] + train_n[kind], rng)
        tasks = [Task(kind, prompt, answer, rng.choice(wrongs)) for prompt, answer, wrongs in drawn]
        held_out += tasks[: eval_n[kind]]
        train += tasks[eval_n[kind]:]
    random.Random(f"{seed}:train-order").shuffle(train)  # mix the kinds
    random.Random(f"{seed}:eval-order").shuffle(held_out)
    return SyntheticSplits(train=train, eval=held_out)


def normalise_answer(text: str) -> str:
    """Canonical form for comparing answers: NFC, case-folded, single spaces, no wrapping quotes or final stop."""
    text = " ".join(unicodedata.normalize("NFC", text).casefold().split())
    previous = None
    while text != previous:
        previous = text
        text = text.strip(QUOTES + " ").rstrip(TRAILING_PUNCTUATION + " ")
    return text


def exact_match(prediction: str, answer: str) -> bool:
    """True when the prediction is the answer up to whitespace, case, wrapping quotes and trailing punctuation."""
    return normalise_answer(prediction) == normalise_answer(answer)


def sft_record(task: Task) -> dict:
    """The canonical SFT row: the prompt as a user turn, the exact answer as the assistant turn."""
    messages = [{"role": "user", "content": task.prompt}, {"role": "assistant", "content": task.answer}]
    return {"messages": messages, "source": SOURCE, "task": task.kind, "answer": task.answer}


def preference_record(task: Task) -> dict:
    """The canonical preference pair: the exact answer is chosen over the wrong one."""
    return {"prompt": [{"role": "user", "content": task.prompt}], "chosen": task.answer, "rejected": task.wrong,
            "source": SOURCE, "task": task.kind}


def unpaired_records(task: Task) -> list[dict]:
    """Two canonical unpaired rows: the exact answer labelled True, the wrong one False."""
    prompt = [{"role": "user", "content": task.prompt}]
    return [{"prompt": prompt, "completion": task.answer, "label": True, "source": SOURCE, "task": task.kind},
            {"prompt": prompt, "completion": task.wrong, "label": False, "source": SOURCE, "task": task.kind}]


"""Several tasks on one record: task definitions rendered into prompts, and the three ways to ask for N answers.

A record is a set of key-value fields (a JSONL object, a CSV row); a task definition says what to ask of it:

    name         the task's key in the joint format and in the metrics (letters, digits, _ and -)
    instruction  fixed text: what to do
    template     Jinja over the record's fields: this record's input (e.g. "{{ a }} {{ op }} {{ b }}")
    answer       a field name or a Jinja expression over the fields (e.g. "sentence | replace(old, new)")

Templates and answers run in Jinja's immutable sandbox with StrictUndefined: an expression can compute but not
reach Python internals, and a field the record lacks is an error naming the file, the line and the field, never
an empty string. `prepare` renders every record into its pieces (per task: name, instruction, input, gold
answer) and writes them strategy-agnostic; the `sft` stage composes training rows under `sft.multitask` and
`evaluate` runs that strategy's inference, so comparing strategies reruns only sft onward.

The strategies (`sft.multitask`), each fixing both the training rows and the inference:
    joint       one prompt asks for all N tasks; the answer is one `name: answer` line per task, in task order,
                parsed back strictly (`parse_joint`): a reply that does not parse counts every task wrong.
    sequential  one prompt per task (the shape of the synthetic SFT rows): N independent calls.
    cumulative  one conversation, task k's prompt after the answers to tasks 1..k-1; trained on the gold
                answers (each answer is trained once), run on the model's own earlier answers, so an early
                mistake propagates the way it does in use.

Pure Python (no torch): the model is a `complete(prompts) -> [(text, new tokens)]` callable.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from instructflow import synthetic
from instructflow.errors import ConfigError, DataError

STRATEGIES = ("joint", "sequential", "cumulative")
NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
SPEC_KEYS = ("name", "instruction", "template", "answer")
DEMO_SOURCE = "synthetic-multitask"

Messages = list[dict[str, str]]
# the model: a batch of prompts (each a list of chat messages ending with a user turn) -> (reply, new tokens) each
Complete = Callable[[list[Messages]], list[tuple[str, int]]]


@lru_cache(maxsize=1)
def _environment():
    from jinja2 import StrictUndefined
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    return ImmutableSandboxedEnvironment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=False)


@dataclass(frozen=True)
class TaskDef:
    """One task definition; `check()` compiles its template and answer (syntax errors name the key)."""

    name: str
    instruction: str
    template: str
    answer: str

    def check(self, where: str) -> None:
        """ValueError naming `where`.<key> unless the name fits the joint format and both Jinja parts compile."""
        if not NAME.fullmatch(self.name):
            raise ValueError(f"{where}.name = {self.name!r}: expected letters, digits, _ or - starting with a letter "
                             f"(it is the task's key in the joint `name: answer` format)")
        if not self.instruction.strip() or "\n" in self.instruction:
            raise ValueError(f"{where}.instruction = {self.instruction!r}: expected one non-empty line")
        from jinja2 import TemplateSyntaxError

        for key, text in (("template", self.template), ("answer", "{{ " + self.answer + " }}")):
            if not text.strip() or (key == "answer" and not self.answer.strip()):
                raise ValueError(f"{where}.{key}: empty; expected {'Jinja text' if key == 'template' else 'a field'}")
            try:
                _environment().parse(text)
            except TemplateSyntaxError as e:
                raise ValueError(f"{where}.{key} = {getattr(self, key)!r}: not valid Jinja: {e.message}") from None

    def fields(self) -> list[str]:
        """The record fields its template and answer read, sorted."""
        return _fields(self.template, self.answer)

    def render(self, fields: dict) -> tuple[str, str]:
        """(input, answer) for a record's fields, each stripped; Jinja's errors propagate."""
        return (_template(self.template).render(fields).strip(),
                str(_expression(self.answer)(**fields)).strip())


@lru_cache(maxsize=256)
def _fields(template: str, answer: str) -> list[str]:
    from jinja2 import meta

    env = _environment()
    return sorted(meta.find_undeclared_variables(env.parse(template))
                  | meta.find_undeclared_variables(env.parse("{{ " + answer + " }}")))


@lru_cache(maxsize=256)
def _template(text: str):
    return _environment().from_string(text)


@lru_cache(maxsize=256)
def _expression(text: str):
    return _environment().compile_expression(text, undefined_to_none=False)


def task_defs(specs: Any, where: str = "prepare.tasks") -> list[TaskDef]:
    """Task definitions from a list of mappings (params.yaml or a YAML file), each checked; ValueError names the key."""
    if not isinstance(specs, list) or not specs:
        raise ValueError(f"{where}: expected a non-empty list of tasks, each with {', '.join(SPEC_KEYS)}")
    defs = []
    for i, spec in enumerate(specs):
        at = f"{where}[{i}]"
        if not isinstance(spec, dict):
            raise ValueError(f"{at}: expected a mapping with {', '.join(SPEC_KEYS)}, got {type(spec).__name__}")
        missing = [k for k in SPEC_KEYS if k not in spec]
        extra = sorted(set(spec) - set(SPEC_KEYS))
        if missing or extra:
            what = f"missing {', '.join(missing)}" if missing else f"unknown key {', '.join(extra)}"
            raise ValueError(f"{at}: {what}; expected exactly {', '.join(SPEC_KEYS)}")
        bad = [k for k in SPEC_KEYS if not isinstance(spec[k], str)]
        if bad:
            raise ValueError(f"{at}.{bad[0]} = {spec[bad[0]]!r}: expected a string")
        task = TaskDef(**{k: spec[k] for k in SPEC_KEYS})
        task.check(at)
        defs.append(task)
    names = [t.name for t in defs]
    twice = next((n for n in names if names.count(n) > 1), None)
    if twice:
        raise ValueError(f"{where}: task name {twice!r} appears {names.count(twice)} times; expected each once")
    return defs


def load_task_defs(spec: list | str, root: Path, where: str = "prepare") -> list[TaskDef]:
    """Task definitions (prepare.tasks, or a source's own): the inline list, or a YAML file (relative to the project
    root) holding that list. A ConfigError names `where` in params.yaml (or the file), the task's index and key."""
    import yaml

    if isinstance(spec, list):
        try:
            return task_defs(spec, "tasks")
        except ValueError as e:
            raise ConfigError(f"params.yaml: {where}: {e}") from None
    path = Path(spec) if Path(spec).is_absolute() else root / spec
    if not path.is_file():
        raise ConfigError(f"params.yaml: {where}: tasks = {spec!r}: file not found (expected a YAML list of tasks, "
                          f"relative to the project root)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    try:
        return task_defs(data, "tasks")
    except ValueError as e:
        raise ConfigError(f"{path}: {e}") from None


# ------------------------------------------------------------------------------------------ rendering
def render_record(fields: dict, tasks: Sequence[TaskDef], path: str | Path, line: int | None,
                  element: int | None = None) -> list[dict]:
    """Per task {name, instruction, input, answer} for one record; DataError names the file, line and field.

    Every field a template or answer reads must be present and not null; an answer must render to one
    non-empty line (the joint format holds one line per answer).
    """
    pieces = []
    for task in tasks:
        for name in task.fields():
            if fields.get(name) is None:
                state = "null" if name in fields else "missing"
                raise DataError(path, f"{state}: task '{task.name}' reads it (template {task.template!r}, answer "
                                      f"{task.answer!r}); the record's fields are {', '.join(fields) or 'none'}",
                                line=line, field=name, element=element)
        try:
            text, answer = task.render(fields)
        except Exception as e:  # a type error in an expression, a sandbox refusal: the record, not the code
            raise DataError(path, f"task '{task.name}' cannot be rendered from this record: {e}", line=line,
                            field=task.name, element=element) from None
        field = task.answer if task.answer in fields else task.name
        if not answer or "\n" in answer:
            raise DataError(path, f"task '{task.name}': the answer {answer!r} must be one non-empty line",
                            line=line, field=field, element=element)
        if not text:
            raise DataError(path, f"task '{task.name}': the template renders to nothing", line=line,
                            field=task.name, element=element)
        pieces.append({"name": task.name, "instruction": task.instruction, "input": text, "answer": answer})
    return pieces


def renderer(tasks: Sequence[TaskDef]) -> Callable[[dict, str | Path, int | None, int | None], list[dict]]:
    """render_record bound to these tasks: what a `tasks` Source renders its rows with (data.py stays Jinja-free)."""
    def render(fields: dict, path: str | Path, line: int | None, element: int | None = None) -> list[dict]:
        return render_record(fields, tasks, path, line, element)

    render.tasks = tuple(tasks)
    return render


def definitions(tasks: Sequence[TaskDef]) -> list[dict]:
    """Task definitions as mappings (prepare writes them beside the records)."""
    return [vars(t) for t in tasks]


def record_key(record: dict) -> str:
    """What makes two records the same (dedup, and the train/eval split): their rendered tasks."""
    return json.dumps([[t["name"], t["input"]] for t in record["tasks"]], ensure_ascii=False)


# ------------------------------------------------------------------------------------- strategy rows
def task_message(task: dict) -> str:
    """The user turn asking one task: its instruction, then its input."""
    return f"{task['instruction']}\n{task['input']}"


def joint_message(tasks: Sequence[dict]) -> str:
    """The user turn asking every task at once: one `name: instruction input` line per task, in task order.

    No header explaining the reply's format: SFT teaches it, and on the tiny preset one would cost ~15 of the
    96 tokens a row may have (a joint row already holds every input and answer).
    """
    return "\n".join(f"{t['name']}: {t['instruction']} {t['input']}" for t in tasks)


def format_joint(names: Sequence[str], answers: Sequence[str]) -> str:
    """The joint reply: one `name: answer` line per task, in task order."""
    if len(names) != len(answers):
        raise ValueError(f"got {len(names)} task names but {len(answers)} answers")
    bad = [a for a in answers if "\n" in a]
    if bad:
        raise ValueError(f"the answer {bad[0]!r} spans lines; the joint format holds one line per answer")
    return "\n".join(f"{name}: {answer}" for name, answer in zip(names, answers))


def parse_joint(text: str, names: Sequence[str]) -> list[str] | None:
    """The answers of a joint reply, in task order, or None unless it is exactly the format.

    Exactly len(names) lines (the reply's outer whitespace aside), line k being `names[k]: answer`: a reordered,
    missing, repeated or extra line, or any other text, is a parse failure.
    """
    lines = text.strip().split("\n")
    if len(lines) != len(names):
        return None
    answers = []
    for line, name in zip(lines, names):
        if not line.startswith(f"{name}: "):
            return None
        answers.append(line[len(name) + 2:].strip())
    return answers


def _tagged(messages: Messages, record: dict, strategy: str, tasks: Sequence[dict]) -> dict:
    """A canonical sft row plus its provenance: the record, the strategy and the tasks whose answers it trains."""
    return {"messages": messages, "source": record["source"],
            "task": tasks[0]["name"] if len(tasks) == 1 else None,
            "answer": tasks[0]["answer"] if len(tasks) == 1 else None,
            "record": record["id"], "strategy": strategy, "tasks": [t["name"] for t in tasks]}


def strategy_rows(strategy: str, record: dict) -> list[dict]:
    """The SFT rows of one prepared record under a strategy; every assistant turn is a gold answer (or the joint
    reply), so `chat_example` puts the loss on exactly the answers and their EOS."""
    tasks = record["tasks"]
    if strategy == "joint":
        reply = format_joint([t["name"] for t in tasks], [t["answer"] for t in tasks])
        return [_tagged([{"role": "user", "content": joint_message(tasks)},
                         {"role": "assistant", "content": reply}], record, strategy, tasks)]
    if strategy == "sequential":
        return [_tagged([{"role": "user", "content": task_message(t)}, {"role": "assistant", "content": t["answer"]}],
                        record, strategy, [t]) for t in tasks]
    if strategy == "cumulative":
        messages = [m for t in tasks for m in ({"role": "user", "content": task_message(t)},
                                                {"role": "assistant", "content": t["answer"]})]
        return [_tagged(messages, record, strategy, tasks)]
    raise ValueError(f"unknown multitask strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")


def sft_rows(strategy: str, records: Sequence[dict]) -> list[dict]:
    """Every record's rows under the strategy, in record order."""
    return [row for record in records for row in strategy_rows(strategy, record)]


# ----------------------------------------------------------------------------------------- inference
def run_strategy(strategy: str, records: Sequence[dict], complete: Complete) -> list[dict]:
    """Ask every record's tasks the strategy's way; per record {id, predictions (None: no answer), calls, tokens}.

    Prompts are batched across records, one `complete` call per round: joint one round, sequential one,
    cumulative one per task position, each round's prompts carrying the model's own replies so far.
    """
    results = [{"id": r["id"], "predictions": [None] * len(r["tasks"]), "calls": 0, "tokens": 0} for r in records]

    def ask(prompts: list[tuple[int, Messages]]) -> list[str]:
        replies = complete([messages for _, messages in prompts]) if prompts else []
        if len(replies) != len(prompts):
            raise ValueError(f"complete() returned {len(replies)} replies for {len(prompts)} prompts")
        for (i, _), (_, n_tokens) in zip(prompts, replies):
            results[i]["calls"] += 1
            results[i]["tokens"] += n_tokens
        return [text.strip() for text, _ in replies]

    if strategy == "joint":
        replies = ask([(i, [{"role": "user", "content": joint_message(r["tasks"])}]) for i, r in enumerate(records)])
        for i, reply in enumerate(replies):
            parsed = parse_joint(reply, [t["name"] for t in records[i]["tasks"]])
            results[i]["predictions"] = parsed or [None] * len(records[i]["tasks"])
            results[i]["parsed"] = parsed is not None
    elif strategy == "sequential":
        slots = [(i, k) for i, r in enumerate(records) for k in range(len(r["tasks"]))]
        replies = ask([(i, [{"role": "user", "content": task_message(records[i]["tasks"][k])}]) for i, k in slots])
        for (i, k), reply in zip(slots, replies):
            results[i]["predictions"][k] = reply
    elif strategy == "cumulative":
        history: list[Messages] = [[] for _ in records]
        for k in range(max((len(r["tasks"]) for r in records), default=0)):
            todo = [i for i, r in enumerate(records) if k < len(r["tasks"])]
            for i in todo:
                history[i].append({"role": "user", "content": task_message(records[i]["tasks"][k])})
            replies = ask([(i, [dict(m) for m in history[i]]) for i in todo])
            for i, reply in zip(todo, replies):
                results[i]["predictions"][k] = reply
                history[i].append({"role": "assistant", "content": reply})  # its own answer, right or wrong
    else:
        raise ValueError(f"unknown multitask strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
    return results


def score(records: Sequence[dict], results: Sequence[dict]) -> dict[str, Any]:
    """Per-item 0/1 lists: `per_task[name]` (exact match, synthetic.exact_match) over the records that have the
    task, `all_correct` per record; and per record `calls` and `tokens`."""
    per_task: dict[str, list[float]] = {}
    all_correct = []
    for record, result in zip(records, results, strict=True):
        hits = [float(p is not None and synthetic.exact_match(p, t["answer"]))
                for t, p in zip(record["tasks"], result["predictions"], strict=True)]
        for t, hit in zip(record["tasks"], hits):
            per_task.setdefault(t["name"], []).append(hit)
        all_correct.append(float(all(hits)))
    return {"per_task": per_task, "all_correct": all_correct, "calls": [float(r["calls"]) for r in results],
            "tokens": [float(r["tokens"]) for r in results]}


# --------------------------------------------------------------------------------- built-in example
# Short names, instructions and sentences: a joint row or a cumulative conversation holds all three inputs and
# answers, and must fit the tiny preset's sft.max_length of 96 tokens. Measured on the tiny tokenizer (4,096 BPE):
# joint rows at most 95 tokens (mean 88), cumulative 90 (83), sequential 44 (28); the synthetic tasks' wordings
# with every sentence made 174 and 122, every row cut. The rename prompt shows only the new name: each sentence
# holds one name, and the answer's expression reads the old one from the record.
DEMO_TASKS = (
    TaskDef("word", "Translate.", "{{ word }} into {{ to }}", "translation"),
    TaskDef("rename", "Rename to", "{{ new }}: {{ sentence }}", "sentence | replace(old, new)"),  # one name each
    TaskDef("math", "Compute.", "{{ a }} {{ op }} {{ b }}", "a + b if op == '+' else (a - b if op == '-' else a * b)"),
)
DEMO_SENTENCE_CHARS = 24  # the rename sentences used: at most this many characters besides the name
_QUOTED = re.compile(r"'([^']+)'")
_SUM = re.compile(r"(\d+) ([-+*]) (\d+)")


def _held_out_keys(task: synthetic.Task) -> tuple:
    """The content of a synthetic task, whatever its phrasing: (kind, ...) as the demo's fields would hold it."""
    if task.kind == "translate":
        return ("translate", _QUOTED.search(task.prompt)[1], task.answer)
    if task.kind == "rename":
        return ("rename", task.wrong, task.answer)  # the wrong answer is the sentence with the old name kept
    a, op, b = _SUM.search(task.prompt).groups()
    return ("arithmetic", int(a), op, int(b))


def _demo_pools(held_out: set[tuple]) -> dict[str, list[dict]]:
    """Every translate / rename / arithmetic item as demo fields, less the held-out synthetic tasks' content."""
    translate = [{"word": w, "to": to, "translation": t} for ko, en in synthetic.LEXICON
                 for w, to, t in ((ko, "English", en), (en, "Korean", ko))]
    short = [s for s in synthetic.SENTENCES if len(s.replace("{name}", "")) <= DEMO_SENTENCE_CHARS]
    rename = [{"sentence": s.format(name=old), "old": old, "new": new} for s in short
              for old in synthetic.NAMES for new in synthetic.NAMES if new != old]
    arithmetic = [{"a": a, "op": op, "b": b} for op, (numbers, rule) in synthetic.OPERANDS.items()
                  for a in numbers for b in numbers if not (rule == "le_a" and b > a)]
    keys = {"translate": lambda f: ("translate", f["word"], f["translation"]),
            "rename": lambda f: ("rename", f["sentence"], f["sentence"].replace(f["old"], f["new"])),
            "arithmetic": lambda f: ("arithmetic", f["a"], f["op"], f["b"])}
    pools = {"translate": translate, "rename": rename, "arithmetic": arithmetic}
    return {kind: [f for f in pool if keys[kind](f) not in held_out] for kind, pool in pools.items()}


def demo_records(n_train: int, n_eval: int, held_out: Sequence[synthetic.Task], seed: int) -> tuple[list, list]:
    """(train, eval) field records for DEMO_TASKS, none holding a held-out synthetic task's content.

    Kinds as the synthetic tasks': a word translated either way, a name replaced in one of the short sentences, and
    a sum, difference or product.
    Rename and arithmetic items are drawn without replacement (no item in two records, train or eval); the lexicon
    has only 128 translate items, most held out in some phrasing, so those are drawn with replacement.
    """
    pools = _demo_pools({_held_out_keys(t) for t in held_out})
    n = n_train + n_eval
    room = min(len(pools["rename"]), len(pools["arithmetic"]))
    if n > room or (n and not pools["translate"]):
        raise ConfigError(f"prepare.synthetic: asked for {n_train} + {n_eval} multitask records but the built-in "
                          f"tasks make only {room}; lower multitask_train / multitask_eval")
    rng = random.Random(f"{seed}:multitask")
    renames, sums = rng.sample(pools["rename"], n), rng.sample(pools["arithmetic"], n)
    records = [{**rng.choice(pools["translate"]), **rename, **sums_} for rename, sums_ in zip(renames, sums)]
    return records[n_eval:], records[:n_eval]

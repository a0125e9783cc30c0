"""The data layer of `prepare`: read the formats people already have, validate every row, and turn
each into the canonical records the later stages read.

One code path for the demo data and user files: a `Source` names a file (or a folder of files), what
its rows are for (`role`) and, where its names differ, which column holds which canonical field. The
file format comes from the extension (or is named); the record schema from the keys of the first row.
Every bad row raises a DataError naming the file, the 1-based line (and, in a JSON array, the element)
and the field, so a user can fix it before any training starts.

Canonical records (one JSON object per line in the prepared files):
    pretrain    {"text", "source"}
    sft         {"messages": [{"role", "content"}, ...ending with assistant], "source", "task", "answer"}
    preference  {"prompt": [messages ending with user], "chosen", "rejected", "source"[, "group"]}
                (a pair from a ranked list carries its list's id in `group`, "<file>:<line>": the reward stage
                keeps a ranking's pairs together, InstructGPT's K-wise loss)
    unpaired    {"prompt": [messages ending with user], "completion", "label": bool, "source"}
    prompts     {"messages": [messages ending with user], "reference", "source"}   (eval-time prompts)
    tasks       {"id", "fields", "tasks": [{"name", "instruction", "input", "answer"}, ...], "source"}
                (a record of key-value fields rendered by the task definitions: instructflow/multitask.py)
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import logging
import random
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from instructflow.errors import ConfigError, DataError
from instructflow.ranking import RankingError, check_tiers, ranking_pairs, strict_tiers

log = logging.getLogger("instructflow")

ROLES = ("pretrain", "sft", "preference", "unpaired", "prompts", "tasks")
FORMATS = ("text", "jsonl", "json", "csv", "tsv")  # json: an array of records (or JSON lines; both are read)
EXTENSIONS = {".txt": "text", ".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv"}
CHAT_ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
HH_SPEAKERS = {"Human": "user", "Assistant": "assistant"}
HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")
BAD_BYTE = re.compile("[\udc80-\udcff]")  # what undecodable bytes become under errors="surrogateescape"

# Record schemas by the keys that identify them; the first whose keys a row has wins (order matters:
# self-instruct before Alpaca, ranked lists before pairs).
SFT_SCHEMAS = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "self_instruct": ("instruction", "instances"),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
}
SCHEMAS: dict[str, dict[str, tuple[str, ...]]] = {
    "pretrain": {"text": ("text",), **SFT_SCHEMAS},  # chat rows become text: their turns, one per line
    "sft": SFT_SCHEMAS,
    "prompts": SFT_SCHEMAS,
    "preference": {"ranked": ("prompt", "responses"), "pair": ("prompt", "chosen", "rejected"),
                   "implicit_prompt": ("chosen", "rejected")},
    "unpaired": {"unpaired": ("prompt", "completion", "label")},
}
# The fields of each role's canonical record, in the order they are written.
RECORD_FIELDS = {
    "pretrain": ("text", "source"),
    "sft": ("messages", "source", "task", "answer"),
    "preference": ("prompt", "chosen", "rejected", "source"),
    "unpaired": ("prompt", "completion", "label", "source"),
    "prompts": ("messages", "reference", "source"),
    "tasks": ("id", "fields", "tasks", "source"),
}
OPTIONAL_FIELDS = {"preference": ("group",)}  # written after the others, only where a record has them
TRUE_WORDS, FALSE_WORDS = ("true", "1", "yes"), ("false", "0", "no")

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Source:
    """One input file and how to read it."""

    path: Path
    role: str  # one of ROLES
    format: str = "auto"  # auto: from the extension
    columns: dict[str, str] = field(default_factory=dict)  # canonical field -> column (or key) name in the file
    group_rows: int = 1  # pretrain from rows: consecutive rows joined into one document (short reviews, Q/A)
    chunk_chars: int = 2000  # pretrain from plain text: paragraphs packed into documents of up to this many chars
    skip_invalid: bool = False  # drop bad rows (counted in stats) instead of failing: only for known-quirky data
    name: str = ""  # the `source` label in the outputs; default: the file name
    max_chars: int | None = None  # refuse a row (a plain-text line) with more characters than this (prepare.max_chars)
    # role tasks: (fields, path, line, element) -> the row's rendered tasks (multitask.renderer of prepare.tasks)
    render_tasks: Callable[[dict, Path, int | None, int | None], list[dict]] | None = None

    @property
    def label(self) -> str:
        return self.name or self.path.name


@dataclass
class Loaded:
    """A source's canonical records, how many rows were read, and the errors of rows skipped."""

    source: Source
    records: list[dict]
    rows: int
    skipped: list[str]


@dataclass(frozen=True)
class _At:
    """Where a row is, to build errors that name it."""

    path: Path
    line: int | None
    element: int | None = None  # the 0-based index in a JSON array

    def error(self, field_name: str | None, message: str) -> DataError:
        return DataError(self.path, message, line=self.line, field=field_name, element=self.element)


# ------------------------------------------------------------------------------------------- reading
def detect_format(path: Path, fmt: str = "auto") -> str:
    """The file format: the named one, or the one the extension implies."""
    if fmt != "auto":
        if fmt not in FORMATS:
            raise DataError(path, f"unknown format {fmt!r}; expected auto, {', '.join(FORMATS)}")
        return fmt
    suffix = path.suffix.lower()
    if suffix not in EXTENSIONS:
        raise DataError(path, f"cannot tell the format from the extension {suffix!r}; expected one of "
                              f"{', '.join(EXTENSIONS)} or a `format:` of {', '.join(FORMATS)}")
    return EXTENSIONS[suffix]


def _bad_byte_error(at: _At, text: str, field_name: str | None = None) -> DataError:
    byte = ord(BAD_BYTE.search(text)[0]) - 0xDC00
    return at.error(field_name, f"not valid UTF-8 (byte 0x{byte:02x}); save the file as UTF-8")


def read_text(path: Path) -> str:
    """The file's text. Undecodable bytes are kept as escapes so the reader can name their line and field."""
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark, as spreadsheet programs write
        data = data[3:]
    return data.decode("utf-8", errors="surrogateescape")


def _lines(text: str) -> list[str]:
    """Physical lines; unlike str.splitlines, U+2028 and friends inside JSON strings do not split."""
    return [line.removesuffix("\r") for line in text.split("\n")]


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


class _DuplicateKey(ValueError):
    def __init__(self, key: str, first: Any, second: Any):
        super().__init__(key)
        self.key, self.first, self.second = key, first, second


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    """json's object_pairs_hook: an object, or _DuplicateKey where a key appears twice (json keeps the last)."""
    obj: dict = {}
    for key, value in pairs:
        if key in obj:
            raise _DuplicateKey(key, obj[key], value)
        obj[key] = value
    return obj


def _short(value: Any) -> str:
    shown = json.dumps(value, ensure_ascii=False)
    return shown if len(shown) <= 40 else shown[:37] + "..."


def _duplicate_error(at: _At, e: _DuplicateKey) -> DataError:
    return at.error(e.key, f"duplicate key: it appears twice in one object (first {_short(e.first)}, then "
                           f"{_short(e.second)}); expected each key once")


def _json_row(at: _At, raw: str, row: Any) -> dict:
    """A parsed row checked: an object whose text has no undecodable bytes."""
    if not isinstance(row, dict):
        raise at.error(None, f"expected a JSON object, got {_type(row)}")
    if BAD_BYTE.search(raw):
        key = next(k for k, v in row.items() if BAD_BYTE.search(k + json.dumps(v, ensure_ascii=False)))
        raise _bad_byte_error(at, raw, key)
    return row


def _is_array(lines: list[str]) -> bool:
    """Whether a JSON file is one array (pretty-printed or on one line) rather than JSON lines."""
    filled = [line for line in lines if line.strip()]
    if not filled or not filled[0].lstrip().startswith("["):
        return False
    return len(filled) == 1 or not _is_json(filled[0])  # several lines each a complete list: JSON lines of lists


def _rows_json(path: Path, text: str) -> Iterator[tuple[_At, dict]]:
    """(where, object) for each record of a JSON lines file or of a JSON array of objects (Alpaca's own format)."""
    lines = _lines(text)
    if _is_array(lines):
        yield from _rows_json_array(path, text)
        return
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        at = _At(path, number)
        try:
            row = json.loads(line, object_pairs_hook=_unique_keys)
        except _DuplicateKey as e:
            raise _duplicate_error(at, e) from None
        except json.JSONDecodeError as e:
            if BAD_BYTE.search(line):
                raise _bad_byte_error(at, line) from None
            raise at.error(None, f"malformed JSON at column {e.colno}: {e.msg}") from None
        yield at, _json_row(at, line, row)


def _rows_json_array(path: Path, text: str) -> Iterator[tuple[_At, dict]]:
    """The elements of a JSON array one at a time, each with its index and the line it starts on."""
    decoder = json.JSONDecoder(object_pairs_hook=_unique_keys)
    space = re.compile(r"\s*")
    line, counted = 1, 0

    def line_at(pos: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, pos)
        counted = pos
        return line

    pos = space.match(text, 0).end() + 1  # past the "["
    pos = space.match(text, pos).end()
    index = 0
    if text.startswith("]", pos):
        pos += 1
    else:
        while True:
            at = _At(path, line_at(pos), index)
            if pos >= len(text):
                raise at.error(None, "the array is not closed: expected an element and ']' at the end of the file")
            try:
                row, end = decoder.raw_decode(text, pos)
            except _DuplicateKey as e:
                raise _duplicate_error(at, e) from None
            except json.JSONDecodeError as e:
                if BAD_BYTE.search(text, pos, e.pos + 1):
                    raise _bad_byte_error(_At(path, e.lineno, index), text[pos:e.pos + 1]) from None
                raise DataError(path, f"malformed JSON at column {e.colno}: {e.msg}", line=e.lineno,
                                element=index) from None
            yield at, _json_row(at, text[pos:end], row)
            pos = space.match(text, end).end()
            if text.startswith(",", pos):
                pos = space.match(text, pos + 1).end()
                if text.startswith("]", pos):
                    raise DataError(path, f"a comma after the last array element [{index}]; JSON allows none "
                                          f"before ']'", line=line_at(pos))
                index += 1
                continue
            if text.startswith("]", pos):
                pos += 1
                break
            raise DataError(path, f"malformed JSON after array element [{index}]: expected ',' or ']'",
                            line=line_at(pos))
    pos = space.match(text, pos).end()
    if pos < len(text):
        raise DataError(path, "has more text after the closing ']' of the array; expected one array of objects",
                        line=line_at(pos))


def iter_jsonl(path: Path, text: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSON lines file, or each element of a JSON array.

    A key twice in one object is an error (json alone would keep the last value silently).
    """
    for at, row in _rows_json(path, text):
        yield at.line, row


def iter_csv(path: Path, text: str, delimiter: str = ",",
             columns: dict[str, str] | None = None) -> Iterator[tuple[int, dict]]:
    """(line number, {column: cell}) for each row after the header; TSV cells are unquoted, as in NSMC.

    A header naming a column twice is an error, and so is a `columns` mapping (canonical field -> column)
    naming a column the header does not have.
    """
    kind, quoting = ("TSV", csv.QUOTE_NONE) if delimiter == "\t" else ("CSV", csv.QUOTE_MINIMAL)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting, strict=True)
    header: list[str] | None = None
    next_line = 1
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise DataError(path, f"malformed {kind}: {e}", line=next_line) from None
        at, next_line = _At(path, next_line), reader.line_num + 1
        if not cells:  # a blank line
            continue
        if header is None:
            header = [cell.strip() for cell in cells]
            if any(BAD_BYTE.search(cell) for cell in header):
                raise _bad_byte_error(at, "".join(header))
            twice = sorted({cell for cell in header if header.count(cell) > 1})
            if twice:
                raise at.error(twice[0], f"the header names column {twice[0]!r} {header.count(twice[0])} times; "
                                         f"expected each column once (header: {', '.join(header)})")
            absent = {field_name: column for field_name, column in (columns or {}).items() if column not in header}
            if absent:
                mapping = ", ".join(f"{field_name}: {column}" for field_name, column in absent.items())
                names = ", ".join(repr(column) for column in absent.values())
                plural = "s" * (len(absent) > 1)
                raise at.error(None, f"`columns` maps {{{mapping}}} but the header has no column{plural} {names}; "
                                     f"the file's columns are: {', '.join(header)}")
            continue
        if len(cells) != len(header):
            raise at.error(None, f"has {len(cells)} columns but the header has {len(header)} ({', '.join(header)})")
        row = dict(zip(header, cells))
        for column, cell in row.items():
            if BAD_BYTE.search(cell):
                raise _bad_byte_error(at, cell, column)
        yield at.line, row


def text_documents(text: str, chunk_chars: int = 2000) -> list[str]:
    """Plain text split on blank lines into paragraphs, packed in order into documents of up to chunk_chars.

    Short paragraphs (a line of dialogue) are too small to learn from alone; one paragraph longer
    than chunk_chars is cut at line ends.
    """
    documents: list[str] = []
    current = ""
    for paragraph in re.split(r"\n[ \t\r]*\n", text.replace("\r\n", "\n")):
        paragraph = paragraph.strip()
        pieces = [paragraph] if len(paragraph) <= chunk_chars else _pack(paragraph.split("\n"), chunk_chars, "\n")
        for piece in filter(None, pieces):
            if current and len(current) + 2 + len(piece) > chunk_chars:
                documents.append(current)
                current = piece
            else:
                current = f"{current}\n\n{piece}" if current else piece
    if current:
        documents.append(current)
    return documents


def _pack(parts: list[str], limit: int, joiner: str) -> list[str]:
    """Consecutive parts joined into pieces of up to limit characters (a longer part stays whole)."""
    pieces: list[str] = []
    for part in parts:
        if pieces and len(pieces[-1]) + len(joiner) + len(part) <= limit:
            pieces[-1] += joiner + part
        else:
            pieces.append(part)
    return pieces


# ---------------------------------------------------------------------------------------- validation
def _type(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _need(at: _At, row: dict, key: str, what: str) -> Any:
    if row.get(key) is None:
        raise at.error(key, f"missing; expected {what}")
    return row[key]


def _string(at: _At, value: Any, name: str, *, optional: bool = False) -> str:
    """A stripped string; empty only where optional (Alpaca's `input`)."""
    if value is None and optional:
        return ""
    if value is None:
        raise at.error(name, "missing; expected a non-empty string")
    if not isinstance(value, str):
        raise at.error(name, f"expected a string, got {_type(value)}")
    if not value.strip() and not optional:
        raise at.error(name, "is empty; expected a non-empty string")
    return value.strip()


def _messages(at: _At, value: Any, name: str, role_key: str = "role", content_key: str = "content",
              roles: dict[str, str] | None = None) -> Messages:
    """Chat messages as [{"role", "content"}], roles mapped to system/user/assistant."""
    roles = roles or {role: role for role in CHAT_ROLES}
    if not isinstance(value, list):
        raise at.error(name, f"expected a list of messages, got {_type(value)}")
    if not value:
        raise at.error(name, "is empty; expected at least one message")
    messages = []
    for i, message in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(message, dict):
            raise at.error(where, f"expected an object with '{role_key}' and '{content_key}', got {_type(message)}")
        role = message.get(role_key)
        if not isinstance(role, str):
            raise at.error(f"{where}.{role_key}", f"expected a role string, got {_type(role)}")
        if role.strip().lower() not in roles:
            raise at.error(f"{where}.{role_key}", f"unknown role {role!r}; expected one of {', '.join(roles)}")
        content = _string(at, message.get(content_key), f"{where}.{content_key}")
        messages.append({"role": roles[role.strip().lower()], "content": content})
    return messages


def _sft_conversation(at: _At, messages: Messages, name: str) -> Messages:
    """Check a conversation can be trained on: it has a user turn and ends with the assistant's answer."""
    if messages[-1]["role"] != "assistant":
        raise at.error(name, f"must end with an assistant turn for SFT; the last role is '{messages[-1]['role']}'")
    if not any(m["role"] == "user" for m in messages):
        raise at.error(name, "has no user turn; expected at least one before the assistant's answer")
    return messages


def _prompt(at: _At, row: dict, key: str = "prompt") -> Messages:
    """A prompt as messages ending with the user's turn; a plain string is one user turn."""
    value = _need(at, row, key, "a string or a list of messages")
    if isinstance(value, str):
        return [{"role": "user", "content": _string(at, value, key)}]
    messages = _messages(at, value, key)
    if messages[-1]["role"] != "user":
        raise at.error(key, f"must end with a user turn; the last role is '{messages[-1]['role']}'")
    return messages


def _response(at: _At, row: dict, key: str) -> str:
    """A response as a string; TRL's conversational form, one assistant message, is accepted too."""
    value = _need(at, row, key, "a non-empty string")
    if isinstance(value, list):
        messages = _messages(at, value, key)
        if len(messages) != 1 or messages[0]["role"] != "assistant":
            raise at.error(key, f"expected a string or a list of one assistant message, got {len(messages)} "
                                f"message(s) with roles {[m['role'] for m in messages]}")
        return messages[0]["content"]
    return _string(at, value, key)


def _label(at: _At, row: dict) -> bool:
    """An unpaired label: true/false, 1/0 (as JSON values or as text in a CSV cell)."""
    value = _need(at, row, "label", "a boolean (true/false or 1/0)")
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in TRUE_WORDS + FALSE_WORDS:
        return value.strip().lower() in TRUE_WORDS
    raise at.error("label", f"expected a boolean (true/false or 1/0), got {value!r}")


def _different(at: _At, chosen: str, rejected: str, name: str = "rejected", other: str = "chosen") -> None:
    if normalise_whitespace(chosen) == normalise_whitespace(rejected):
        raise at.error(name, f"is the same as '{other}'; a preference pair needs two different responses")


def _user_turn(instruction: str, input_text: str) -> dict[str, str]:
    """An instruction and its optional input as one user message, separated by a blank line."""
    return {"role": "user", "content": f"{instruction}\n\n{input_text}" if input_text else instruction}


def parse_hh_transcript(text: str) -> Messages:
    """An Anthropic hh-rlhf transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...") as chat messages.

    Raises ValueError saying what is wrong, for the caller to turn into a DataError naming the field.
    """
    parts = HH_TURN.split(text)
    if len(parts) < 3:
        raise ValueError("expected a transcript of '\\n\\nHuman: ...\\n\\nAssistant: ...' turns")
    if parts[0].strip():
        raise ValueError(f"has text before the first 'Human:' turn: {parts[0].strip()[:40]!r}")
    messages = []
    for i, (speaker, content) in enumerate(zip(parts[1::2], parts[2::2]), 1):
        if not content.strip():
            raise ValueError(f"turn {i} ({speaker}) is empty")
        messages.append({"role": HH_SPEAKERS[speaker], "content": content.strip()})
    return messages


def _conversations(at: _At, row: dict, schema: str) -> list[Messages]:
    """The conversations in an SFT-schema row (self-instruct rows hold one per instance)."""
    if schema == "messages":
        return [_sft_conversation(at, _messages(at, _need(at, row, "messages", "a list of messages"), "messages"),
                                  "messages")]
    if schema == "sharegpt":
        value = _need(at, row, "conversations", "a list of {from, value} turns")
        turns = _messages(at, value, "conversations", "from", "value", SHAREGPT_ROLES)
        return [_sft_conversation(at, turns, "conversations")]
    if schema == "self_instruct":
        instruction = _string(at, row.get("instruction"), "instruction")
        instances = _need(at, row, "instances", "a list of {input, output} objects")
        if not isinstance(instances, list) or not instances:
            got = "an empty list" if isinstance(instances, list) else _type(instances)
            raise at.error("instances", f"expected a non-empty list of {{input, output}} objects, got {got}")
        conversations = []
        for i, instance in enumerate(instances):
            if not isinstance(instance, dict):
                raise at.error(f"instances[{i}]",
                               f"expected an object with 'input' and 'output', got {_type(instance)}")
            input_text = _string(at, instance.get("input"), f"instances[{i}].input", optional=True)
            output = _string(at, instance.get("output"), f"instances[{i}].output")
            conversations.append([_user_turn(instruction, input_text), {"role": "assistant", "content": output}])
        return conversations
    if schema == "alpaca":
        instruction = _string(at, row.get("instruction"), "instruction")
        input_text = _string(at, row.get("input"), "input", optional=True)
        output = _string(at, row.get("output"), "output")
        return [[_user_turn(instruction, input_text), {"role": "assistant", "content": output}]]
    if schema == "prompt_completion":
        prompt = _prompt(at, row)
        return [prompt + [{"role": "assistant", "content": _response(at, row, "completion")}]]
    raise AssertionError(schema)


def _preference(at: _At, row: dict, schema: str) -> list[tuple[Messages, str, str]]:
    """(prompt, chosen, rejected) pairs in a preference-schema row."""
    if schema == "pair":
        prompt, chosen, rejected = _prompt(at, row), _response(at, row, "chosen"), _response(at, row, "rejected")
        _different(at, chosen, rejected)
        return [(prompt, chosen, rejected)]
    if schema == "ranked":  # InstructGPT: K ranked responses make K(K-1)/2 pairs (fewer where tiers tie)
        prompt, responses, tiers = _ranked(at, row)
        return [(prompt, responses[pair.better], responses[pair.worse]) for pair in ranking_pairs(tiers)]
    if schema == "implicit_prompt":  # the prompt is the conversation both share before the final answer
        both = {}
        for key in ("chosen", "rejected"):
            value = _need(at, row, key, "a transcript string or a list of messages")
            if isinstance(value, str):
                try:
                    both[key] = parse_hh_transcript(value)
                except ValueError as e:
                    raise at.error(key, str(e)) from None
            else:
                both[key] = _messages(at, value, key)
            if both[key][-1]["role"] != "assistant":
                raise at.error(key, f"must end with an assistant turn; the last role is '{both[key][-1]['role']}'")
        prompt, chosen, rejected = both["chosen"][:-1], both["chosen"][-1]["content"], both["rejected"][-1]["content"]
        if normalise_whitespace(prompt) != normalise_whitespace(both["rejected"][:-1]):
            raise at.error("rejected", "does not share the conversation before the final assistant turn with 'chosen'")
        if not prompt or prompt[-1]["role"] != "user":
            raise at.error("chosen", "the turns before the final assistant turn must end with a user (Human) turn")
        _different(at, chosen, rejected)
        return [(prompt, chosen, rejected)]
    raise AssertionError(schema)


def _ranked(at: _At, row: dict) -> tuple[Messages, list[str], list[list[int]]]:
    """A ranked row's prompt, its K >= 2 distinct responses and their ranking as tiers (instructflow.ranking):
    the row's `tiers` (indices into `responses`, best first, ties within a tier) when it has them, else the
    responses' own order, best first."""
    prompt = _prompt(at, row)
    value = _need(at, row, "responses", "a list of at least 2 responses, best first")
    if not isinstance(value, list) or len(value) < 2:
        got = f"{len(value)} response(s)" if isinstance(value, list) else _type(value)
        raise at.error("responses", f"expected a list of at least 2 responses (best first), got {got}")
    responses = [_string(at, r, f"responses[{i}]") for i, r in enumerate(value)]
    for (i, better), (j, worse) in itertools.combinations(enumerate(responses), 2):
        _different(at, better, worse, f"responses[{j}]", f"responses[{i}]")
    if row.get("tiers") is None:
        return prompt, responses, strict_tiers(len(responses))
    try:
        return prompt, responses, check_tiers(row["tiers"], len(responses))
    except RankingError as e:
        raise at.error("tiers" + e.field, str(e)) from None


def ranked_group_id(at: _At, label: str) -> str:
    """The stable id of a ranked row's pairs, "<source>:<line>" (a folder source's file and a JSON array's
    element added): the `group` its pairs carry through prepare's files into the reward stage."""
    name = label if at.path.name == label else f"{label}/{at.path.name}"
    return f"{name}:{at.line}" + (f"[{at.element}]" if at.element is not None else "")


def ranked_records(rows: Iterable[dict] | Iterable[tuple[int, dict]], source: str | Path) -> list[dict]:
    """Canonical preference records, each with its `group`, of ranked rows held in memory: what prepare makes of
    a ranked file, for rows that come from elsewhere (user feedback).

    A row is {"prompt": a string or messages ending with a user turn, "responses": [K >= 2 distinct strings],
    "tiers": optional [[indices], ...]}: without tiers the responses are best first; with them, tiers list the
    response indices best first and responses in one tier tie (no pair). Rows are numbered from 1, or given as
    (line, row) as instructflow.data.iter_jsonl yields them; a bad row raises a DataError naming `source`, the
    line and the field. Each record's `source` is the file name of `source`, its group "<name>:<line>".
    """
    path = Path(source)
    records: list[dict] = []
    for number, item in enumerate(rows, 1):
        line, row = item if isinstance(item, tuple) else (number, item)
        at = _At(path, line)
        if not isinstance(row, dict):
            raise at.error(None, f"expected a ranked row (an object with prompt and responses), got {_type(row)}")
        group = ranked_group_id(at, path.name)
        records += [{**r, "source": path.name, "group": group} for r in convert(at, row, "ranked", "preference")]
    return records


def detect_schema(keys: Iterable[str], role: str) -> str | None:
    """The record schema a row with these keys has for this role, or None."""
    keys = set(keys)
    return next((name for name, needed in SCHEMAS[role].items() if keys.issuperset(needed)), None)


def _schema(at: _At, row: dict, role: str) -> str:
    """The row's schema, or a DataError naming the field that the closest schema misses."""
    schema = detect_schema((k for k, v in row.items() if v is not None), role)
    if schema:
        return schema
    expected = "; ".join("+".join(keys) for keys in SCHEMAS[role].values())
    overlap = {name: len(set(keys) & set(row)) for name, keys in SCHEMAS[role].items()}
    closest = max(overlap, key=overlap.get)
    if overlap[closest]:
        missing = next(k for k in SCHEMAS[role][closest] if row.get(k) is None)
        needs = "+".join(SCHEMAS[role][closest])
        raise at.error(missing, f"missing; a {role} row with keys {sorted(row)} needs {needs}")
    raise at.error(None, f"keys {sorted(row)} match no {role} format; expected one of: {expected} "
                         f"(use `columns` to map other names)")


def convert(at: _At, row: dict, schema: str, role: str) -> list[dict]:
    """Canonical records (without `source`) from one validated row."""
    if role == "pretrain":
        if schema == "text":
            return [{"text": _string(at, row.get("text"), "text")}]
        return [{"text": "\n".join(m["content"] for m in conv)} for conv in _conversations(at, row, schema)]
    if role == "sft":
        return [{"messages": conv, "task": None, "answer": None} for conv in _conversations(at, row, schema)]
    if role == "prompts":  # one eval prompt per task: the first instance's conversation
        conv = _conversations(at, row, schema)[0]
        return [{"messages": conv[:-1], "reference": conv[-1]["content"]}]
    if role == "preference":
        return [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in _preference(at, row, schema)]
    if role == "unpaired":
        return [{"prompt": _prompt(at, row), "completion": _response(at, row, "completion"), "label": _label(at, row)}]
    raise AssertionError(role)


def task_record(at: _At, row: dict, source: Source) -> dict:
    """A `tasks` row: its fields and, per task definition, the rendered input and gold answer."""
    if source.render_tasks is None:
        raise ConfigError(f"source {source.path}: role tasks needs task definitions (prepare.tasks)")
    element = f"[{at.element}]" if at.element is not None else ""
    return {"id": f"{source.label}:{at.line}{element}", "fields": row,
            "tasks": source.render_tasks(row, at.path, at.line, at.element)}


def _mapped(row: dict, columns: dict[str, str]) -> dict:
    """The row with its columns renamed to canonical fields."""
    if not columns:
        return row
    renamed = {k: v for k, v in row.items() if k not in columns.values()}
    renamed.update({canonical: row[column] for canonical, column in columns.items() if column in row})
    return renamed


def _in_file_terms(error: DataError, columns: dict[str, str]) -> DataError:
    """The error with a canonical field named as the file's column, which is what the user sees."""
    if not error.field or not columns:
        return error
    root = re.match(r"[^\[.]+", error.field)[0]
    if root not in columns:
        return error
    return DataError(error.path, error.reason, line=error.line, field=columns[root] + error.field[len(root):],
                     element=error.element)


def _row_schema(at: _At, raw: dict, row: dict, source: Source) -> str:
    """The schema of the first row; when none matches and `columns` names keys the row lacks, say so."""
    try:
        return _schema(at, row, source.role)
    except DataError:
        absent = {f: c for f, c in source.columns.items() if c not in raw}
        if not absent:
            raise
        mapping = ", ".join(f"{f}: {c}" for f, c in absent.items())
        raise at.error(None, f"`columns` maps {{{mapping}}} but the row has no key{'s' * (len(absent) > 1)} "
                             f"{', '.join(repr(c) for c in absent.values())}; its keys are: "
                             f"{', '.join(raw)}") from None


def _chars(value: Any) -> int:
    """Characters of text in a row: every string in it, at any depth (keys not counted)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(_chars(v) for v in value.values())
    if isinstance(value, list):
        return sum(_chars(v) for v in value)
    return 0


def _check_length(at: _At, row: dict, max_chars: int | None) -> None:
    """A row longer than prepare.max_chars is refused, naming its longest field and its length."""
    if max_chars is None:
        return
    total = _chars(row)
    if total > max_chars:
        longest = max(row, key=lambda k: _chars(row[k]))
        raise at.error(longest, f"the row has {total:,} characters ({_chars(row[longest]):,} in this field), more "
                                f"than prepare.max_chars = {max_chars:,}; shorten or split it, or raise the bound")


def folder_files(folder: Path, fmt: str = "auto") -> list[Path]:
    """The files a folder source reads: its supported files (any file when the format is named), by name.

    Not recursive; hidden files (a leading '.') are skipped, and so, with a warning, are files of other types.
    """
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if fmt != "auto":
        return files
    other = [p.name for p in files if p.suffix.lower() not in EXTENSIONS]
    if other:
        log.warning("%s: skipping %d file(s) of no supported type: %s", folder, len(other), ", ".join(other[:5]))
    return [p for p in files if p.suffix.lower() in EXTENSIONS]


def _load_folder(source: Source) -> Loaded:
    """A folder source: each of its files read as the source says, in name order, as one source."""
    folder = Path(source.path)
    files = folder_files(folder, source.format)
    if not files:
        held = sorted(p.name + "/" * p.is_dir() for p in folder.iterdir())
        raise DataError(folder, f"is a folder with no {'files' if source.format != 'auto' else 'supported files'} "
                                f"(it holds {', '.join(held[:10]) or 'nothing'}{', ...' * (len(held) > 10)}; "
                                f"subfolders are not read); expected files ending in {', '.join(EXTENSIONS)}")
    parts = [load_source(replace(source, path=file, name=source.label)) for file in files]
    return Loaded(source, [r for part in parts for r in part.records], sum(part.rows for part in parts),
                  [error for part in parts for error in part.skipped])


def load_source(source: Source) -> Loaded:
    """Read, validate and convert one source file (or every supported file of a folder); raises DataError on
    the first bad row unless skip_invalid."""
    path = Path(source.path)
    if source.role not in ROLES:
        raise ConfigError(f"source {path}: unknown role {source.role!r}; expected one of {', '.join(ROLES)}")
    if path.is_dir():
        return _load_folder(source)
    if not path.exists():
        raise DataError(path, "file not found")
    if not path.is_file():
        raise DataError(path, "is not a regular file or folder; expected a data file")
    fmt = detect_format(path, source.format)
    text = read_text(path)
    label = source.label
    if fmt == "text":
        if source.role != "pretrain":
            raise DataError(path, f"plain text can only be a pretrain source; a {source.role} source needs "
                                  f"JSON lines, CSV or TSV")
        for number, line in enumerate(_lines(text), 1):
            if BAD_BYTE.search(line):
                raise _bad_byte_error(_At(path, number), line)
            if source.max_chars is not None and len(line) > source.max_chars:
                raise DataError(path, f"the line has {len(line):,} characters, more than prepare.max_chars = "
                                      f"{source.max_chars:,}; shorten or split it, or raise the bound", line=number)
        documents = text_documents(text, source.chunk_chars)
        if not documents:
            raise DataError(path, "has no text; expected at least one non-blank paragraph")
        return Loaded(source, [{"text": doc, "source": label} for doc in documents], len(documents), [])

    if fmt in ("jsonl", "json"):
        rows = _rows_json(path, text)
    else:
        csv_rows = iter_csv(path, text, "," if fmt == "csv" else "\t", source.columns)
        rows = ((_At(path, number), row) for number, row in csv_rows)
    records: list[dict] = []
    skipped: list[str] = []
    schema = None
    count = 0
    for at, raw in rows:
        count += 1
        row = _mapped(raw, source.columns)
        try:
            _check_length(at, raw, source.max_chars)
            if source.role == "tasks":
                records.append(task_record(at, row, source))
            else:
                schema = schema or _row_schema(at, raw, row, source)
                converted = convert(at, row, schema, source.role)
                if schema == "ranked":  # a ranked list's pairs stay one group (tasks/reward.py, reward.kwise)
                    converted = [{**r, "group": ranked_group_id(at, label)} for r in converted]
                records += converted
        except DataError as e:
            error = _in_file_terms(e, source.columns)
            if not source.skip_invalid:
                raise error from None
            skipped.append(str(error))
    if count == 0:
        raise DataError(path, "has no rows; expected at least one record")
    if not records:
        raise DataError(path, f"none of its {count} rows is valid; the first error: {skipped[0]}")
    if source.role == "pretrain" and source.group_rows > 1:
        texts = [r["text"] for r in records]
        records = [{"text": "\n".join(texts[i:i + source.group_rows])} for i in range(0, len(texts), source.group_rows)]
    fields, optional = RECORD_FIELDS[source.role], OPTIONAL_FIELDS.get(source.role, ())
    canonical = [{**{k: {**r, "source": label}[k] for k in fields}, **{k: r[k] for k in optional if k in r}}
                 for r in records]
    return Loaded(source, canonical, count, skipped)


# ---------------------------------------------------------------------------- dedup, caps and splits
def normalise_whitespace(value: Any) -> Any:
    """Every string in value with runs of whitespace made one space and the ends stripped."""
    if isinstance(value, str):
        return " ".join(value.split())
    if isinstance(value, list):
        return [normalise_whitespace(v) for v in value]
    if isinstance(value, dict):
        return {k: normalise_whitespace(v) for k, v in value.items()}
    return value


def record_key(record: dict) -> str:
    """The record, whitespace-normalised and without its source or group: equal keys are duplicates (a pair two
    ranked lists share is one comparison, kept in the first list's group)."""
    body = {k: v for k, v in record.items() if k not in ("source", "group")}
    return json.dumps(normalise_whitespace(body), ensure_ascii=False, sort_keys=True)


def dedup(records: list[dict], key: Callable[[dict], str] = record_key) -> tuple[list[dict], list[dict]]:
    """(kept, dropped): the first of each set of duplicate records (equal keys) is kept, in order."""
    seen: set[str] = set()
    kept, dropped = [], []
    for record in records:
        k = key(record)
        (dropped if k in seen else kept).append(record)
        seen.add(k)
    return kept, dropped


def group_key(record: dict) -> str:
    """What must not be split across train and eval: the prompt (all pairs of a ranked list, all answers to
    one question go together), or the text of a pretraining document."""
    if "text" in record:
        value: Any = record["text"]
    elif "messages" in record:
        value = record["messages"][:-1]
    else:
        value = record["prompt"]
    return json.dumps(normalise_whitespace(value), ensure_ascii=False)


def unit_key(record: dict) -> str:
    """What a split keeps whole when it cannot go by prompt: a ranked list's pairs (their `group`), else the record
    itself (sample_balanced keeps a list whole the same way)."""
    return record.get("group") or record_key(record)


def _unit(seed: int, key: str) -> float:
    """A uniform number in [0, 1) from the seed and key: stable across runs, machines and Python versions."""
    digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split(records: list[dict], eval_fraction: float, seed: int,
          key: Callable[[dict], str] = group_key) -> tuple[list[dict], list[dict]]:
    """(train, eval): each group goes to eval when its hash falls below eval_fraction.

    Hash-based, so a record keeps its side when others are added. With at least two groups, both
    sides get at least one; a single group (one prompt) is split by record instead, a ranked list's pairs
    still kept together (unit_key).
    """
    if len({key(r) for r in records}) < 2:
        key = unit_key
    units = [_unit(seed, key(r)) for r in records]
    groups = sorted(set(units))
    held_out = {u for u in groups if u < eval_fraction}
    if len(groups) >= 2 and not held_out:
        held_out = {groups[0]}
    if len(groups) >= 2 and len(held_out) == len(groups):
        held_out.discard(groups[-1])
    train = [r for r, u in zip(records, units) if u not in held_out]
    held = [r for r, u in zip(records, units) if u in held_out]
    return train, held


def shuffled(records: list[dict], seed: int) -> list[dict]:
    """The records in a seeded order that mixes sources (trainers that read in file order see a mix)."""
    return sorted(records, key=lambda r: _unit(seed, record_key(r)))


def sample_balanced(records: list[dict], budget: int, seed: int,
                    cost: Callable[[dict], int] = lambda r: 1) -> list[dict]:
    """A seeded sample whose total cost stays within budget, shared equally across sources.

    The source with the least taken so far gives its next (shuffled) record, so a large source cannot
    crowd out a small one (English Shakespeare and the Korean sets all stay represented); a record too
    large for what is left is passed over. The pairs of one ranked list (the same `group`) are one unit, taken
    or passed over together, so a cap never leaves part of a ranking. Returns the kept records in their
    original order.
    """
    by_source: dict[str, list[list[int]]] = {}
    groups: dict[tuple[str, str], list[int]] = {}
    for i, record in enumerate(records):
        group = record.get("group")
        if group is None:
            by_source.setdefault(record["source"], []).append([i])
        elif (record["source"], group) in groups:
            groups[record["source"], group].append(i)
        else:
            groups[record["source"], group] = [i]
            by_source.setdefault(record["source"], []).append(groups[record["source"], group])
    # (a sample's order depends on the length alone: records without a group are drawn as they always were)
    queues = {name: random.Random(f"{seed}:{name}").sample(units, len(units)) for name, units in by_source.items()}
    taken = {name: 0 for name in queues}
    kept: list[int] = []
    total = 0
    while queues:
        name = min(queues, key=lambda n: (taken[n], n))
        unit = queues[name].pop()
        unit_cost = sum(cost(records[i]) for i in unit)
        if total + unit_cost <= budget:
            kept += unit
            taken[name] += unit_cost
            total += unit_cost
        if not queues[name]:
            del queues[name]
    return [records[i] for i in sorted(kept)]

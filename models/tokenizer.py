"""Byte-level BPE tokenizer trained locally, with the chat template and the SFT label mask.

Byte-level BPE (GPT-2 style) covers every UTF-8 string, so Hangul and any other script round-trip exactly.
The chat format, rendered by the Jinja template for inference and by `encode_chat` for training:

    <|bos|><|system|>\n{system}\n<|user|>\n{user}\n<|assistant|>\n{response}<|eos|>\n

`encode_chat` tokenizes segment by segment so the training mask covers exactly each assistant response and
the <|eos|> after it; a test checks its ids equal the template's.
"""

from __future__ import annotations

from collections.abc import Iterable, MutableMapping, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
ROLES = ("system", "user", "assistant")
ROLE_TOKENS = {role: f"<|{role}|>" for role in ROLES}
CLS, SEP, MASK = "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS = [PAD, BOS, EOS, *ROLE_TOKENS.values(), CLS, SEP, MASK]
IGNORE_INDEX = -100

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on texts and wrap it as a Hugging Face tokenizer with the chat template."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is ever unknown
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS, eos_token=EOS, pad_token=PAD,
        cls_token=CLS, sep_token=SEP, mask_token=MASK,
        additional_special_tokens=list(ROLE_TOKENS.values()),
        clean_up_tokenization_spaces=False,
        model_max_length=1_000_000,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    tok = PreTrainedTokenizerFast.from_pretrained(str(path))
    if tok.chat_template is None:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def _ids(tok: PreTrainedTokenizerFast, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def encode_chat(tok: PreTrainedTokenizerFast, messages: Sequence[dict], add_generation_prompt: bool = False,
                train_on: str = "all_assistant") -> tuple[list[int], list[int]]:
    """Token ids of a conversation and its labels: the ids on assistant responses and their <|eos|>, else -100.

    train_on: "all_assistant" trains on every assistant turn; "last_assistant" only on the final one.
    """
    ids = [tok.bos_token_id]
    labels = [IGNORE_INDEX]
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    for i, message in enumerate(messages):
        header = ROLE_TOKENS[message["role"]] + "\n"
        if message["role"] != "assistant":
            # untrained text is tokenized whole, as the template renders it (a trailing newline in the
            # content merges with the template's own)
            context = _ids(tok, header + message["content"] + "\n")
            ids += context
            labels += [IGNORE_INDEX] * len(context)
            continue
        # <|eos|> is special, so nothing merges across it; the response starts on a pre-token boundary
        # after the header's newline (prepare strips contents, so none starts with whitespace)
        head = _ids(tok, header)
        body = _ids(tok, message["content"]) + [tok.eos_token_id]
        trained = train_on == "all_assistant" or i == last
        newline = _ids(tok, "\n")
        ids += head + body + newline
        labels += [IGNORE_INDEX] * len(head) + (body if trained else [IGNORE_INDEX] * len(body)) \
            + [IGNORE_INDEX] * len(newline)
    if add_generation_prompt:
        gen = _ids(tok, ROLE_TOKENS["assistant"] + "\n")
        ids += gen
        labels += [IGNORE_INDEX] * len(gen)
    return ids, labels


def encode_prompt(tok: PreTrainedTokenizerFast, messages: Sequence[dict]) -> list[int]:
    """Ids of a prompt ready for the assistant's answer (ends with '<|assistant|>\\n')."""
    return encode_chat(tok, messages, add_generation_prompt=True)[0]


def encode_response(tok: PreTrainedTokenizerFast, response: str) -> list[int]:
    """Ids of an assistant response as it follows `encode_prompt`: the text, then <|eos|>."""
    return _ids(tok, response) + [tok.eos_token_id]


def truncate_right(ids: list[int], labels: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Keep the first max_length tokens: <|bos|> and the prompt stay whole, the response loses its end."""
    return ids[:max_length], labels[:max_length]


def chat_example(tok: PreTrainedTokenizerFast, messages: Sequence[dict], max_length: int,
                 train_on: str = "all_assistant", counts: MutableMapping[str, int] | None = None) -> dict | None:
    """{input_ids, labels} of a conversation cut to max_length, or None (dropped) when no response token fits.

    A conversation longer than max_length keeps its start: <|bos|>, the prompt and the turns before the trained
    response stay whole and the response is cut at its end (so it has no <|eos|>); later turns go. When the prompt
    alone leaves no room for a response token the example is dropped. `counts` (a Counter, say) gets "truncated"
    (a trained token was cut) or "dropped" added, for the stage's log and metrics.
    """
    full_ids, full_labels = encode_chat(tok, messages, train_on=train_on)
    ids, labels = truncate_right(full_ids, full_labels, max_length)
    if all(label == IGNORE_INDEX for label in labels):
        if counts is not None:
            counts["dropped"] = counts.get("dropped", 0) + 1
        return None
    if counts is not None and any(label != IGNORE_INDEX for label in full_labels[max_length:]):
        counts["truncated"] = counts.get("truncated", 0) + 1
    return {"input_ids": ids, "labels": labels}


def response_example(tok: PreTrainedTokenizerFast, prompt: Sequence[dict], response: str, max_length: int,
                     counts: MutableMapping[str, int] | None = None) -> dict | None:
    """{input_ids, labels}: the prompt followed by one response, labels on the response and its <|eos|> only, cut
    as chat_example cuts (a reward model's or a preference pair's side)."""
    messages = [*prompt, {"role": "assistant", "content": response}]
    return chat_example(tok, messages, max_length, train_on="last_assistant", counts=counts)


def preference_example(tok: PreTrainedTokenizerFast, row: dict, max_length: int,
                       counts: MutableMapping[str, int] | None = None) -> dict | None:
    """{chosen, rejected}: the prompt followed by each response, labels on the response and its <|eos|> only.

    Cut as chat_example cuts: the prompt is kept and a response truncated; None (dropped) when the prompt leaves
    no room for a response token. `counts` gets "truncated" (either response was cut) or "dropped" added once.
    """
    pair, sides = {}, {}
    for side in ("chosen", "rejected"):
        pair[side] = response_example(tok, row["prompt"], row[side], max_length, counts=sides)
        if pair[side] is None:
            break
    if counts is not None:
        outcome = "dropped" if sides.get("dropped") else "truncated" if sides.get("truncated") else None
        if outcome:
            counts[outcome] = counts.get(outcome, 0) + 1
    return None if sides.get("dropped") else pair

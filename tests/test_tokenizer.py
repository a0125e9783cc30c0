"""models/tokenizer.py: exact round trips, the chat template, the SFT label mask (loss on responses only), and the
encoder's framing copy of the tokenizer leaving the decoder's alone."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import pytest

from models.encoder import encoder_tokenizer
from models.tokenizer import (
    IGNORE_INDEX,
    ROLE_TOKENS,
    SPECIAL_TOKENS,
    chat_example,
    encode_chat,
    encode_prompt,
    encode_response,
    load_tokenizer,
    preference_example,
    train_tokenizer,
    truncate_right,
)

RAW = Path(__file__).resolve().parents[1] / "data" / "raw"

SINGLE = [
    {"role": "system", "content": "You answer in one short sentence."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris is the capital of France."},
]
MULTI = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "이 영화 어땠어요?"},
    {"role": "assistant", "content": "정말 좋았어요."},
    {"role": "user", "content": "And in English?"},
    {"role": "assistant", "content": "It was really good 👍"},
]


@pytest.fixture(scope="module")
def tok():
    """BPE (vocab 600) on ~300 Shakespeare paragraphs (newlines kept, so '\\n' merges exist) and 300 NSMC reviews."""
    paragraphs = RAW.joinpath("tinyshakespeare.txt").read_text(encoding="utf-8")[:20000].split("\n\n")
    english = [p + "\n\n" for p in paragraphs][:300]
    with RAW.joinpath("nsmc_train.tsv").open(encoding="utf-8", newline="") as fh:
        korean = [row["document"] for _, row in zip(range(300), csv.DictReader(fh, delimiter="\t"))]
    return train_tokenizer(english + korean, vocab_size=600)


def ids_of(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def template_ids(tok, messages, add_generation_prompt: bool = False) -> list[int]:
    return tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)["input_ids"]


def response_positions(tok, ids: list[int], turns: set[int] | None = None) -> list[int]:
    """Positions of each assistant turn's content and its <|eos|>, found from the ids alone.

    An assistant turn starts after '<|assistant|>' and the newline that follows it, and ends with <|eos|>.
    turns: which assistant turns (0-based) to return; None: all.
    """
    assistant, newline = tok.convert_tokens_to_ids(ROLE_TOKENS["assistant"]), ids_of(tok, "\n")
    positions, turn, i = [], 0, 0
    while i < len(ids):
        if ids[i] == assistant:
            assert ids[i + 1: i + 1 + len(newline)] == newline
            j = i + 1 + len(newline)
            end = ids.index(tok.eos_token_id, j)
            if turns is None or turn in turns:
                positions += range(j, end + 1)
            turn, i = turn + 1, end
        i += 1
    return positions


def labelled(labels: list[int]) -> list[int]:
    return [i for i, label in enumerate(labels) if label != IGNORE_INDEX]


# ------------------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("text", [
    "First Citizen:\nBefore we proceed any further, hear me speak.",
    "정말 재미있는 영화였어요. 배우들 연기가 최고!",
    "ㄱㄴㄷ ㅏㅑㅓ ᄀᄂᄃ ᅡᅣ ᆨᆫ",  # compatibility jamo and conjoining jamo: rare, so byte-level
    "🙂 👩‍👩‍👧 🇰🇷 ✨",  # multi-codepoint emoji (ZWJ sequence, flag)
    "Mixed 한국어 and English 🎬\twith a tab,  two spaces\nand a newline; 숫자 12345.",
    "  leading and trailing spaces  ",
])
def test_text_round_trips_exactly(tok, text):
    ids = ids_of(tok, text)

    assert tok.decode(ids) == text
    assert tok.unk_token_id is None or tok.unk_token_id not in ids


def test_training_data_merges_common_words(tok):
    # a trained BPE: a frequent word is fewer tokens than its bytes
    assert len(ids_of(tok, " the")) == 1
    assert len(ids_of(tok, "영화")) < len("영화".encode())


def test_special_tokens_are_single_ids(tok):
    for special in SPECIAL_TOKENS:
        ids = ids_of(tok, special)
        assert len(ids) == 1, special
        assert tok.convert_ids_to_tokens(ids[0]) == special
    assert {tok.pad_token, tok.bos_token, tok.eos_token} == {"<|pad|>", "<|bos|>", "<|eos|>"}
    assert {tok.cls_token, tok.sep_token, tok.mask_token} == {"[CLS]", "[SEP]", "[MASK]"}
    assert len(set(tok.convert_tokens_to_ids(SPECIAL_TOKENS))) == len(SPECIAL_TOKENS)


def test_tokenizer_adds_no_specials_by_itself(tok):
    # the chat code places <|bos|> and <|eos|> itself: plain encoding must not add them
    assert tok("hello")["input_ids"] == ids_of(tok, "hello")


# ------------------------------------------------------------------------------------------ the encoder's copy
def test_the_encoder_copy_frames_its_inputs_and_the_decoder_tokenizer_stays_as_it_was(tok, tmp_path):
    # given the decoder's view of the trained tokenizer before the encoder's copy is made
    chat, prompt = encode_chat(tok, MULTI), template_ids(tok, MULTI[:4], add_generation_prompt=True)
    hello, there = ids_of(tok, "hello"), ids_of(tok, "there")

    # when the encoder's copy is made, and both are saved and loaded as the stages do
    encoder = encoder_tokenizer(tok, 128)
    tok.save_pretrained(tmp_path / "tokenizer")
    encoder.save_pretrained(tmp_path / "mlm")
    decoders = (tok, load_tokenizer(tmp_path / "tokenizer"))
    encoders = (encoder, load_tokenizer(tmp_path / "mlm"))

    # then the encoder's adds exactly [CLS] ... [SEP] (and the pair form) ...
    cls, sep = tok.cls_token_id, tok.sep_token_id
    for framed in encoders:
        assert framed("hello")["input_ids"] == [cls, *hello, sep]
        assert framed("hello", "there")["input_ids"] == [cls, *hello, sep, *there, sep]
    # ... and the decoder's adds nothing, its chat ids and template unchanged
    for plain in decoders:
        assert plain("hello")["input_ids"] == hello
        assert plain("hello", "there")["input_ids"] == hello + there
        assert encode_chat(plain, MULTI) == chat
        assert template_ids(plain, MULTI[:4], add_generation_prompt=True) == prompt
        assert cls not in template_ids(plain, MULTI) and sep not in template_ids(plain, MULTI)


# ------------------------------------------------------------------------------------------ the chat template
@pytest.mark.parametrize("messages", [SINGLE, SINGLE[1:], MULTI], ids=["system-user-assistant", "user-assistant",
                                                                        "multi-turn"])
def test_encode_chat_equals_the_template(tok, messages):
    ids, labels = encode_chat(tok, messages)

    assert ids == template_ids(tok, messages)
    assert len(labels) == len(ids)


@pytest.mark.parametrize("messages", [SINGLE[:2], SINGLE[1:2], MULTI[:4]], ids=["system-user", "user", "multi-turn"])
def test_encode_prompt_equals_the_template_with_generation_prompt(tok, messages):
    prompt = encode_prompt(tok, messages)

    assert prompt == template_ids(tok, messages, add_generation_prompt=True)
    assert prompt[-1 - len(ids_of(tok, "\n")):] == [tok.convert_tokens_to_ids("<|assistant|>"), *ids_of(tok, "\n")]


def test_prompt_plus_response_is_the_training_conversation(tok):
    # what generation sees (prompt, then the response and <|eos|>) is what SFT trained on, minus the final newline
    prompt = encode_prompt(tok, SINGLE[:2])
    response = encode_response(tok, SINGLE[2]["content"])
    ids, _ = encode_chat(tok, SINGLE)

    assert response[-1] == tok.eos_token_id
    assert prompt + response + ids_of(tok, "\n") == ids


def test_encode_chat_equals_the_template_when_content_ends_with_a_newline(tok):
    messages = [{"role": "user", "content": "What is it?\n"}, {"role": "assistant", "content": "A test."}]

    assert encode_chat(tok, messages)[0] == template_ids(tok, messages)


# ------------------------------------------------------------------------------------------ the SFT label mask
def test_label_mask_covers_exactly_the_response_and_its_eos(tok):
    ids, labels = encode_chat(tok, SINGLE)

    # by text: the labelled ids are the response, then <|eos|>
    assert tok.decode([ids[i] for i in labelled(labels)]) == "Paris is the capital of France.<|eos|>"
    # by position: exactly the response's ids and the <|eos|> after them, labels equal to the ids there
    assert labelled(labels) == response_positions(tok, ids)
    assert [labels[i] for i in labelled(labels)] == ids_of(tok, SINGLE[2]["content"]) + [tok.eos_token_id]
    # never the bos, the role headers, the newlines, the system or user text
    for i in (0, *[i for i, t in enumerate(ids) if t in tok.convert_tokens_to_ids(list(ROLE_TOKENS.values()))]):
        assert labels[i] == IGNORE_INDEX
    assert labels[-1] == IGNORE_INDEX  # the newline after <|eos|>


def test_multi_turn_all_assistant_trains_on_every_response(tok):
    ids, labels = encode_chat(tok, MULTI, train_on="all_assistant")

    assert labelled(labels) == response_positions(tok, ids)
    assert tok.decode([ids[i] for i in labelled(labels)]) == "정말 좋았어요.<|eos|>It was really good 👍<|eos|>"
    assert sum(ids[i] == tok.eos_token_id for i in labelled(labels)) == 2


def test_multi_turn_last_assistant_trains_on_the_final_response_only(tok):
    ids, labels = encode_chat(tok, MULTI, train_on="last_assistant")

    assert ids == encode_chat(tok, MULTI, train_on="all_assistant")[0]  # same ids, fewer labels
    assert labelled(labels) == response_positions(tok, ids, turns={1})
    assert tok.decode([ids[i] for i in labelled(labels)]) == "It was really good 👍<|eos|>"


def test_generation_prompt_is_never_labelled(tok):
    _, labels = encode_chat(tok, SINGLE[:2], add_generation_prompt=True)

    assert labelled(labels) == []


# ------------------------------------------------------------------------------------------ truncation
def test_truncate_right_keeps_bos_and_the_start():
    ids, labels = list(range(10)), [IGNORE_INDEX] * 6 + [6, 7, 8, 9]

    cut_ids, cut_labels = truncate_right(ids, labels, 8)

    assert cut_ids == [0, 1, 2, 3, 4, 5, 6, 7]
    assert cut_labels == [IGNORE_INDEX] * 6 + [6, 7]
    assert truncate_right(ids, labels, 10) == (ids, labels)  # fits: unchanged


def prompt_length(tok, messages) -> int:
    """Tokens before the final response: <|bos|>, the earlier turns and '<|assistant|>\n'."""
    return len(encode_prompt(tok, messages[:-1]))


def test_chat_example_keeps_the_prompt_and_cuts_the_end_of_the_response(tok):
    ids, labels = encode_chat(tok, SINGLE)
    n_prompt = prompt_length(tok, SINGLE)
    counts = Counter()

    example = chat_example(tok, SINGLE, n_prompt + 3, counts=counts)

    assert example["input_ids"] == ids[:n_prompt + 3] and example["labels"] == labels[:n_prompt + 3]
    assert tok.decode(example["input_ids"][:n_prompt]).startswith("<|bos|><|system|>\nYou answer")
    assert "<|user|>\nWhat is the capital of France?\n<|assistant|>\n" in tok.decode(example["input_ids"])
    assert len(labelled(example["labels"])) == 3 and tok.eos_token_id not in example["input_ids"]
    assert counts == {"truncated": 1}


def test_a_huge_response_keeps_the_user_turn_and_the_start_of_the_response(tok):
    # the case: a 680 KB row used to become <|bos|> plus the last response tokens, with no user turn
    response = "Paris is the capital of France. " * 2000  # 64,000 characters
    messages = [*SINGLE[:2], {"role": "assistant", "content": response.strip()}]
    counts = Counter()

    example = chat_example(tok, messages, 96, counts=counts)

    text = tok.decode(example["input_ids"])
    assert len(example["input_ids"]) == 96
    assert text.startswith("<|bos|><|system|>\nYou answer in one short sentence.\n<|user|>\nWhat is the capital")
    assert "<|assistant|>\nParis is the capital of France. Paris" in text
    assert labelled(example["labels"]) == list(range(prompt_length(tok, messages), 96))
    assert counts == {"truncated": 1}


def test_chat_example_is_dropped_when_the_prompt_leaves_no_room_for_a_response_token(tok):
    n_prompt = prompt_length(tok, SINGLE)
    counts = Counter()

    assert chat_example(tok, SINGLE, n_prompt, counts=counts) is None  # the prompt alone: dropped, not left-cut
    assert chat_example(tok, SINGLE, 2, counts=counts) is None
    assert counts == {"dropped": 2}
    example = chat_example(tok, SINGLE, n_prompt + 1, counts=counts)  # one response token is enough
    assert len(labelled(example["labels"])) == 1 and counts == {"dropped": 2, "truncated": 1}


def test_chat_example_that_fits_counts_nothing(tok):
    counts = Counter()
    ids, labels = encode_chat(tok, SINGLE)

    assert chat_example(tok, SINGLE, len(ids), counts=counts) == {"input_ids": ids, "labels": labels}
    # only the newline after <|eos|> cut: no trained token lost, so not counted as truncated
    assert chat_example(tok, SINGLE, len(ids) - 1, counts=counts)["labels"] == labels[:-1]
    assert counts == {}


def test_a_long_multi_turn_chat_keeps_its_earlier_turns_whole(tok):
    ids, labels = encode_chat(tok, MULTI)
    first_end = labels.index(tok.eos_token_id) + 1  # the end of the first assistant response, <|eos|> included
    counts = Counter()

    example = chat_example(tok, MULTI, first_end + 2, counts=counts)

    assert example["input_ids"] == ids[:first_end + 2]
    assert tok.decode([i for i, l in zip(example["input_ids"], example["labels"]) if l != IGNORE_INDEX]) \
        == "정말 좋았어요.<|eos|>"
    assert counts == {"truncated": 1}  # the second response's trained tokens were cut


def test_chat_example_without_truncation_is_encode_chat(tok):
    ids, labels = encode_chat(tok, MULTI)

    assert chat_example(tok, MULTI, 10_000) == {"input_ids": ids, "labels": labels}


# ------------------------------------------------------------------------------------------ preference pairs
def test_preference_example_labels_only_the_final_response(tok):
    row = {"prompt": MULTI[:4], "chosen": "It was great.", "rejected": "No."}

    pair = preference_example(tok, row, 10_000)

    for side in ("chosen", "rejected"):
        ids, labels = pair[side]["input_ids"], pair[side]["labels"]
        assert labelled(labels) == response_positions(tok, ids, turns={1})  # not the earlier assistant turn
        assert tok.decode([ids[i] for i in labelled(labels)]) == row[side] + "<|eos|>"
        assert ids == encode_chat(tok, [*row["prompt"], {"role": "assistant", "content": row[side]}])[0]


def test_preference_example_is_dropped_when_the_prompt_fills_max_length(tok):
    row = {"prompt": SINGLE[1:2], "chosen": "Paris.", "rejected": "Lyon."}
    n_prompt = len(encode_prompt(tok, row["prompt"]))
    counts = Counter()

    assert preference_example(tok, row, n_prompt, counts=counts) is None  # no response token fits: dropped
    assert preference_example(tok, row, 2, counts=counts) is None
    assert counts == {"dropped": 2}  # one count per pair, not per side


def test_preference_example_keeps_the_prompt_and_truncates_a_long_response(tok):
    row = {"prompt": SINGLE[1:2], "chosen": "Paris. " * 200, "rejected": "Lyon."}
    n_prompt = len(encode_prompt(tok, row["prompt"]))
    counts = Counter()

    pair = preference_example(tok, row, n_prompt + 8, counts=counts)

    assert len(pair["chosen"]["input_ids"]) == n_prompt + 8  # cut: the start of the chosen response is kept
    assert pair["chosen"]["input_ids"][:n_prompt] == encode_prompt(tok, row["prompt"])
    assert tok.decode(pair["rejected"]["input_ids"]).endswith("Lyon.<|eos|>\n")  # fits: whole
    assert counts == {"truncated": 1}

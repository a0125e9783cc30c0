"""Over-long rows in the sft, reward and align stages: the prompt is kept and the response cut, or the row dropped
when the prompt alone fills max_length; both are counted in the stage's log and metrics."""

from __future__ import annotations

import logging
from collections import Counter

import pytest
from helpers_tokenizer import make_test_tokenizer

from models.tokenizer import IGNORE_INDEX, encode_prompt
from tasks.reward import cut_metrics, preference_set
from tasks.sft import sft_examples

MAX_LENGTH = 40


@pytest.fixture(scope="module")
def tok():
    return make_test_tokenizer()


def chat(prompt: str, response: str) -> dict:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]}


def test_sft_rows_keep_their_prompt_lose_the_response_end_or_are_dropped_and_counted(tok, caplog):
    rows = [chat("A short question?", "A short answer."),
            chat("A short question?", "A very long answer. " * 200),
            chat("A very long question. " * 200, "Short.")]
    counts = Counter()

    with caplog.at_level(logging.WARNING, logger="instructflow"):
        examples = sft_examples(tok, rows, MAX_LENGTH, "sft_train", counts)

    assert len(examples) == 2 and counts == {"truncated": 1, "dropped": 1}
    long = examples[1]
    n_prompt = len(encode_prompt(tok, rows[1]["messages"][:-1]))
    assert len(long["input_ids"]) == MAX_LENGTH
    assert long["input_ids"][:n_prompt] == encode_prompt(tok, rows[1]["messages"][:-1])  # the user turn is there
    assert all(label != IGNORE_INDEX for label in long["labels"][n_prompt:])  # the response's start is trained
    assert ("sft_train: 2 of 3 conversations are longer than sft.max_length 40: 1 kept with the response truncated, "
            "1 dropped (the prompt alone fills max_length)") in caplog.text


def test_preference_pairs_are_cut_the_same_way_and_counted_in_the_metrics(tok, caplog):
    prompt = [{"role": "user", "content": "A short question?"}]
    rows = [{"prompt": prompt, "chosen": "Yes.", "rejected": "No."},
            {"prompt": prompt, "chosen": "Yes, because " * 100, "rejected": "No."},
            {"prompt": [{"role": "user", "content": "A very long question. " * 100}], "chosen": "Yes.",
             "rejected": "No."}]
    cut = {"train": Counter(), "eval": Counter()}

    with caplog.at_level(logging.WARNING, logger="instructflow"):
        pairs = preference_set(tok, rows, MAX_LENGTH, "preference_train", cut["train"])

    assert len(pairs) == 2 and len(pairs[1]["chosen"]["input_ids"]) == MAX_LENGTH
    assert cut_metrics(cut) == {"train_pairs_truncated": 1, "train_pairs_dropped": 1, "eval_pairs_truncated": 0,
                                "eval_pairs_dropped": 0}
    assert ("preference_train: 2 of 3 pairs are longer than max_length 40: 1 kept with a response truncated, "
            "1 dropped (the prompt alone fills max_length)") in caplog.text

"""instructflow.synthetic: answers are right, wrong answers are wrong, train and eval never share a prompt."""

from __future__ import annotations

import re
import unicodedata
from collections import Counter

import pytest

from instructflow import synthetic
from instructflow.errors import ConfigError
from instructflow.synthetic import Task, exact_match, generate


@pytest.fixture(scope="module")
def splits() -> synthetic.SyntheticSplits:
    return generate(n_train=900, n_eval=150, kinds=synthetic.KINDS, seed=7)


def test_same_seed_same_tasks_other_seed_other_tasks(splits):
    assert generate(900, 150, synthetic.KINDS, seed=7) == splits
    assert generate(900, 150, synthetic.KINDS, seed=8).eval != splits.eval


def test_counts_kinds_balanced_and_prompts_unique(splits):
    assert len(splits.train) == 900 and len(splits.eval) == 150
    assert Counter(t.kind for t in splits.eval) == {"translate": 50, "rename": 50, "arithmetic": 50}
    prompts = [t.prompt for t in splits.train + splits.eval]
    assert len(set(prompts)) == len(prompts)  # so train and eval are disjoint too


def test_eval_tasks_do_not_depend_on_n_train(splits):
    assert generate(10, 150, synthetic.KINDS, seed=7).eval == splits.eval


def test_arithmetic_answers_equal_the_expression(splits):
    tasks = [t for t in splits.train + splits.eval if t.kind == "arithmetic"]
    assert {op for t in tasks for op in re.findall(r" ([+\-*]) ", t.prompt)} == {"+", "-", "*"}
    for task in tasks:
        a, op, b = re.search(r"(\d+) ([+\-*]) (\d+)", task.prompt).groups()
        assert task.answer == str(eval(f"{a} {op} {b}"))  # noqa: S307 (digits and one operator)
        assert abs(int(task.wrong) - int(task.answer)) in (1, 2, 10)


def test_translate_answers_come_from_the_lexicon(splits):
    ko_to_en = dict(synthetic.LEXICON)
    en_to_ko = {en: ko for ko, en in synthetic.LEXICON}
    for task in (t for t in splits.train + splits.eval if t.kind == "translate"):
        word = re.search(r"'([^']+)'", task.prompt)[1]
        lexicon = ko_to_en if word in ko_to_en else en_to_ko
        assert task.answer == lexicon[word] and task.wrong in lexicon.values() and task.wrong != task.answer


def test_rename_replaces_the_one_name(splits):
    for task in (t for t in splits.train + splits.eval if t.kind == "rename"):
        names = [n for n in synthetic.NAMES if n in task.prompt]
        sentence = re.search(r"'(.+)'", task.prompt)[1]
        old = next(n for n in names if n in sentence)
        new = next(n for n in names if n != old)
        assert task.answer == sentence.replace(old, new) and task.wrong == sentence


def test_every_wrong_answer_differs_from_the_answer(splits):
    assert all(not exact_match(t.wrong, t.answer) for t in splits.train + splits.eval)


def test_lexicon_is_one_to_one_and_names_cannot_collide():
    korean, english = zip(*synthetic.LEXICON)
    assert len(synthetic.LEXICON) >= 60 and len(set(korean)) == len(set(english)) == len(synthetic.LEXICON)
    for name in synthetic.NAMES:
        assert not any(name in other for other in synthetic.NAMES if other != name)
        assert all(name not in template for template in synthetic.SENTENCES)


def test_a_subset_of_kinds_and_overflow_to_other_kinds():
    only = generate(20, 4, ["arithmetic"], seed=0)
    assert {t.kind for t in only.train + only.eval} == {"arithmetic"}
    many = generate(1500, 30, ["translate", "rename"], seed=0)  # translate has fewer prompts than its half
    counts = Counter(t.kind for t in many.train)
    assert counts["translate"] == synthetic.capacity("translate") - 15
    assert counts["rename"] == 1500 - counts["translate"]


def test_impossible_requests_fail_with_the_numbers():
    with pytest.raises(ConfigError, match="unknown kind 'poetry'"):
        generate(1, 1, ["poetry"], seed=0)
    with pytest.raises(ConfigError, match=r"asked for 600 \+ 10 tasks .* only 512"):
        generate(600, 10, ["translate"], seed=0)


@pytest.mark.parametrize("prediction,answer,expected", [
    ("42", "42", True), (" 42. ", "42", True), ("Apple", "apple", True), ("'apple'", "apple", True),
    ("Bob  went to the market", "Bob went to the market.", True),
    ('"Bob went to the market."', "Bob went to the market.", True),
    (unicodedata.normalize("NFD", "사과"), "사과", True), ("43", "42", False), ("apple pie", "apple", False),
    ("-5", "5", False), ("", "42", False),
])
def test_exact_match_ignores_only_case_space_quotes_and_final_punctuation(prediction, answer, expected):
    assert exact_match(prediction, answer) is expected


def test_converters_make_canonical_rows():
    task = Task("arithmetic", "What is 2 + 2?", "4", "5")
    prompt = [{"role": "user", "content": "What is 2 + 2?"}]
    assert synthetic.sft_record(task) == {"messages": prompt + [{"role": "assistant", "content": "4"}],
                                          "source": "synthetic", "task": "arithmetic", "answer": "4"}
    assert synthetic.preference_record(task) == {"prompt": prompt, "chosen": "4", "rejected": "5",
                                                 "source": "synthetic", "task": "arithmetic"}
    assert [(r["completion"], r["label"]) for r in synthetic.unpaired_records(task)] == [("4", True), ("5", False)]

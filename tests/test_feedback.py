"""instructflow/feedback.py: generation files read into groups (every bad row named), rankings checked, Kendall's
tau-b on hand-worked rankings, and labels files written and read back against their generation."""

from __future__ import annotations

import hashlib
import json
import math

import pytest

from instructflow.errors import DataError
from instructflow.feedback import (
    Generation,
    Group,
    Label,
    check_ranking,
    generation_hash,
    kendall_tau,
    read_generation,
    read_labels,
    write_labels,
)

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fruit."}]


def rows(k=3, prompts=("Translate to English: 사과", MESSAGES)):
    """What `instructflow generate --n k` writes for these prompts (tasks/generation.py generate_rows)."""
    return [{"prompt_index": p, "prompt": prompt, "sample": s, "response": f"answer {p}.{s}",
             "finish_reason": "eos", "new_tokens": 3, "seed": 1000 * p + s, "model_version": "artifacts/sft@abc",
             "sampling": {"n": k}} for p, prompt in enumerate(prompts) for s in range(k)]


def write(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n"
                            for r in records), encoding="utf-8")
    return path


def test_generation_groups_and_hash(tmp_path):
    records = rows()
    records[0], records[2] = records[2], records[0]  # samples in any order: responses come back in sample order
    path = write(tmp_path / "gen.jsonl", records)
    gen = read_generation(path)
    assert gen.hash == generation_hash(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert gen.path == path and len(gen) == 2
    assert gen.groups == (Group(0, "Translate to English: 사과", ("answer 0.0", "answer 0.1", "answer 0.2")),
                          Group(1, MESSAGES, ("answer 1.0", "answer 1.1", "answer 1.2")))
    assert gen.by_index[1].prompt == MESSAGES and gen.by_index[0].k == 3
    assert isinstance(gen, Generation)


def test_the_hash_changes_with_any_byte(tmp_path):
    a = write(tmp_path / "a.jsonl", rows())
    b = write(tmp_path / "b.jsonl", rows())
    assert generation_hash(a) == generation_hash(b)
    b.write_bytes(b.read_bytes().replace(b"answer 1.2", b"answer 1.3"))
    assert generation_hash(a) != generation_hash(b)


def _bad(records, index, **change):
    records = [dict(r) for r in records]
    for key, value in change.items():
        if value is ...:
            del records[index][key]
        else:
            records[index][key] = value
    return records


@pytest.mark.parametrize("records, line, field, words", [
    (rows()[:2] + ['{"prompt_index": 0,'] + rows()[3:], 3, None, "malformed JSON"),
    (_bad(rows(), 1, prompt_index=...), 2, "prompt_index", "missing; expected a whole number"),
    (_bad(rows(), 1, prompt_index="0"), 2, "prompt_index", "expected a whole number >= 0, got a string"),
    (_bad(rows(), 1, prompt_index=-1), 2, "prompt_index", "got -1"),
    (_bad(rows(), 4, sample=...), 5, "sample", "missing"),
    (_bad(rows(), 4, sample=1.0), 5, "sample", "got a number (1.0)"),
    (_bad(rows(), 2, response=...), 3, "response", "missing; expected the sample's text"),
    (_bad(rows(), 2, response=["text"]), 3, "response", "expected a string, got a list"),
    (_bad(rows(), 0, prompt=...), 1, "prompt", "missing"),
    (_bad(rows(), 3, prompt=[{"role": "assistant", "content": "hi"}]), 4, "prompt", "must end with a user turn"),
    (_bad(rows(), 2, prompt="another prompt"), 3, "prompt", "differs from the prompt of prompt_index 0 on line 1"),
    (_bad(rows(), 2, sample=0), 3, "sample", "prompt_index 0 has sample 0 twice (first on line 1)"),
    (rows(k=1), 1, "sample", "prompt_index 0 has 1 response; ranking needs at least 2"),
    (_bad(rows(), 2, sample=5), 3, "sample", "has samples [0, 1, 5]; expected 0..2 (missing 2, 3, 4)"),
])
def test_bad_generation_rows_are_named(tmp_path, records, line, field, words):
    path = write(tmp_path / "gen.jsonl", records)
    with pytest.raises(DataError) as err:
        read_generation(path)
    assert (err.value.path, err.value.line, err.value.field) == (str(path), line, field)
    assert words in str(err.value) and str(path) in str(err.value)


def test_empty_and_missing_generation(tmp_path):
    with pytest.raises(DataError, match="has no rows"):
        read_generation(write(tmp_path / "empty.jsonl", []))
    with pytest.raises(DataError, match="no such file"):
        read_generation(tmp_path / "nope.jsonl")


def test_check_ranking_normalises_and_refuses():
    assert check_ranking([[2], [3, 0], [1]], 4, allow_ties=True) == ((2,), (0, 3), (1,))
    assert check_ranking([2, 0, 3, 1], 4, allow_ties=False) == ((2,), (0,), (3,), (1,))  # flat = strict
    assert check_ranking([[1], [0]], 2, allow_ties=False) == ((1,), (0,))
    problems = [
        ([[2], [0, 3], [1]], False, "tier 1 ties responses 0, 3; ties are not allowed"),
        ([2, 0, 1], False, "response 3 is not ranked; expected each of 0..3 once"),
        ([2, 0], True, "responses 1, 3 are not ranked"),
        ([2, 0, 3, 1, 0], False, "response 0 is ranked twice"),
        ([2, 0, 3, 4], False, "tier 3: response 4 does not exist; expected indices 0..3"),
        ([[2], [], [0, 1, 3]], True, "tier 1 is empty"),
        ([2, 0, 3, "1"], False, "tier 3: expected a list of response indices, got a string"),
        ([2, 0, 3, True], False, "tier 3: expected a list of response indices, got a boolean"),
        ([[2], [0], [3], [True]], False, "tier 3: expected response indices (whole numbers), got a boolean"),
        ("2031", False, "expected a list of tiers"),
        ({"a": 1}, False, "expected a list of tiers"),
    ]
    for tiers, ties, words in problems:
        with pytest.raises(ValueError) as err:
            check_ranking(tiers, 4, ties)
        assert words in str(err.value), (tiers, str(err.value))


def test_kendall_tau_b_hand_worked():
    # a: 0 > 1 > 2 > 3; b: 1 > {0, 3} > 2. Pairs (i, j): a orders every one i before j.
    # b: (0,1) 1 first: discordant; (0,2) concordant; (0,3) tied in b; (1,2) c; (1,3) c; (2,3) 3 first: d.
    # concordant 3, discordant 2, 6 pairs, none tied in a, 1 tied in b: tau_b = (3 - 2) / sqrt(6 * 5)
    assert kendall_tau([0, 1, 2, 3], [[1], [0, 3], [2]]) == pytest.approx(1 / math.sqrt(30))
    assert kendall_tau([[1], [0, 3], [2]], [0, 1, 2, 3]) == pytest.approx(1 / math.sqrt(30))  # symmetric
    assert kendall_tau([2, 0, 1], [2, 0, 1]) == 1.0
    assert kendall_tau([2, 0, 1], [1, 0, 2]) == -1.0
    # 3 responses, a strict, b ties 0 and 1 at the top: pairs (0,1) tied in b; (0,2) c; (1,2): a 2 > 1, b 1 > 2: d
    assert kendall_tau([0, 2, 1], [[0, 1], [2]]) == pytest.approx(0 / math.sqrt(3 * 2))
    assert math.isnan(kendall_tau([[0, 1, 2]], [0, 1, 2]))  # all tied: no order to compare


def test_kendall_tau_matches_scipy():
    from scipy.stats import kendalltau

    a, b = [[3], [0, 1], [4], [2]], [[0], [3], [2, 4], [1]]
    ranks = lambda tiers: [next(t for t, tier in enumerate(tiers) if i in tier) for i in range(5)]  # noqa: E731
    assert kendall_tau(a, b) == pytest.approx(kendalltau(ranks(a), ranks(b)).statistic)


def test_kendall_tau_needs_the_same_responses():
    with pytest.raises(ValueError, match="response 3 does not exist"):
        kendall_tau([0, 1, 2], [0, 1, 2, 3])


def labels_for(gen):
    return [Label(gen.hash, 0, "ana", ((2,), (0,), (1,)), (1,), "2026-12-05T10:00:00+00:00"),
            Label(gen.hash, 0, "bo", ((0, 2), (1,)), (), "2026-12-05T10:01:00+00:00"),
            {"generation": gen.hash, "prompt_index": 1, "annotator": "ana", "ranking": [[1], [0], [2]],
             "unacceptable": [], "time": "2026-12-05T10:02:00+00:00"}]


def test_labels_round_trip(tmp_path):
    gen = read_generation(write(tmp_path / "gen.jsonl", rows()))
    out = tmp_path / "labels" / "labels.jsonl"
    assert write_labels(out, labels_for(gen)) == 3
    assert not [p for p in out.parent.iterdir() if p.name != "labels.jsonl"]  # atomic: no temporary left
    first = json.loads(out.read_text().split("\n")[0])
    assert first == {"generation": gen.hash, "prompt_index": 0, "annotator": "ana", "ranking": [[2], [0], [1]],
                     "unacceptable": [1], "time": "2026-12-05T10:00:00+00:00"}
    back = read_labels(out, gen)
    assert sorted(back) == [0, 1]
    assert [lab.annotator for lab in back[0]] == ["ana", "bo"]
    assert back[0][1].ranking == ((0, 2), (1,)) and back[0][0].unacceptable == (1,)
    assert back[1] == [Label(gen.hash, 1, "ana", ((1,), (0,), (2,)), (), "2026-12-05T10:02:00+00:00")]


def _label_row(gen, **change):
    row = {"generation": gen.hash, "prompt_index": 0, "annotator": "ana", "ranking": [[2], [0], [1]],
           "unacceptable": [], "time": "2026-12-05T10:00:00+00:00"}
    row.update(change)
    return row


def test_bad_labels_are_named(tmp_path):
    gen_path = write(tmp_path / "gen.jsonl", rows())
    gen = read_generation(gen_path)
    other = "f" * 64
    cases = [
        ([_label_row(gen, generation=other)], 1, "generation",
         f"was made from generation {other}, not {gen.hash} ({gen_path})"),
        ([_label_row(gen, prompt_index=7)], 1, "prompt_index", "7 is not a prompt of"),
        ([_label_row(gen), _label_row(gen, ranking=[[2], [0]])], 2, "ranking", "response 1 is not ranked"),
        ([_label_row(gen, ranking=[2, 0, 2])], 1, "ranking", "response 2 is ranked twice"),
        ([_label_row(gen, annotator="")], 1, "annotator", "expected a non-empty string"),
        ([_label_row(gen, unacceptable=[3])], 1, "unacceptable", "3 is not a response index"),
        ([_label_row(gen, time="yesterday")], 1, "time", "expected an ISO-8601 time"),
        ([_label_row(gen), _label_row(gen, prompt_index=1), _label_row(gen, ranking=[0, 1, 2])], 3, "annotator",
         "'ana' ranked prompt_index 0 already on line 1"),
    ]
    for records, line, field, words in cases:
        path = write(tmp_path / "labels.jsonl", records)
        with pytest.raises(DataError) as err:
            read_labels(path, gen)
        assert (err.value.line, err.value.field) == (line, field), str(err.value)
        assert words in str(err.value) and str(path) in str(err.value)

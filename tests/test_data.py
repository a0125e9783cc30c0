"""instructflow.data: every accepted format parses to the canonical record, every bad row names its place."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from instructflow.data import (
    Source,
    dedup,
    load_source,
    parse_hh_transcript,
    ranked_records,
    sample_balanced,
    split,
    text_documents,
)
from instructflow.errors import DataError
from instructflow.io import atomic_dir, read_jsonl, write_jsonl


def write(folder: Path, name: str, content: str | bytes) -> Path:
    path = folder / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def jsonl(*rows: dict) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def records(path: Path, role: str, **kwargs) -> list[dict]:
    return load_source(Source(path, role, **kwargs)).records


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


# ------------------------------------------------------------------------------------------ formats
def test_plain_text_is_split_on_blank_lines_and_packed_into_documents(tmp_path):
    path = write(tmp_path, "book.txt", "First para.\nstill first.\n\nSecond.\n\n\n\nThird one here.\n")
    assert records(path, "pretrain") == [
        {"text": "First para.\nstill first.\n\nSecond.\n\nThird one here.", "source": "book.txt"}]
    assert [r["text"] for r in records(path, "pretrain", chunk_chars=30)] == [
        "First para.\nstill first.", "Second.\n\nThird one here."]


def test_text_documents_cuts_a_long_paragraph_at_line_ends():
    assert text_documents("aaaa\nbbbb\ncccc", chunk_chars=9) == ["aaaa\nbbbb", "cccc"]


def test_jsonl_text_rows_and_group_rows_for_pretrain(tmp_path):
    path = write(tmp_path, "t.jsonl", jsonl({"text": "one"}, {"text": "two"}, {"text": "three"}))
    assert [r["text"] for r in records(path, "pretrain")] == ["one", "two", "three"]
    assert [r["text"] for r in records(path, "pretrain", group_rows=2)] == ["one\ntwo", "three"]


def test_trl_prompt_completion_string_and_conversational(tmp_path):
    path = write(tmp_path, "pc.jsonl", jsonl(
        {"prompt": "  Hi? ", "completion": "Hello."},
        {"prompt": [{"role": "system", "content": "Be brief."}, user("2+2?")],
         "completion": [assistant("4")]}))
    assert records(path, "sft") == [
        {"messages": [user("Hi?"), assistant("Hello.")], "source": "pc.jsonl", "task": None, "answer": None},
        {"messages": [{"role": "system", "content": "Be brief."}, user("2+2?"), assistant("4")],
         "source": "pc.jsonl", "task": None, "answer": None}]


def test_messages_alpaca_sharegpt_and_self_instruct_become_the_same_chat(tmp_path):
    messages = write(tmp_path, "m.jsonl", jsonl({"messages": [user("Q"), assistant("A")]}))
    alpaca = write(tmp_path, "a.jsonl", jsonl({"instruction": "Sum.", "input": "1 2", "output": "3"},
                                                {"instruction": "Say hi.", "input": "", "output": "hi"}))
    sharegpt = write(tmp_path, "s.jsonl", jsonl({"conversations": [
        {"from": "system", "value": "S"}, {"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}))
    self_instruct = write(tmp_path, "si.jsonl", jsonl({"instruction": "Sum.", "instances": [
        {"input": "1 2", "output": "3"}, {"input": "", "output": "0"}]}))
    assert [r["messages"] for r in records(messages, "sft")] == [[user("Q"), assistant("A")]]
    assert [r["messages"] for r in records(alpaca, "sft")] == [
        [user("Sum.\n\n1 2"), assistant("3")], [user("Say hi."), assistant("hi")]]
    assert [r["messages"] for r in records(sharegpt, "sft")] == [
        [{"role": "system", "content": "S"}, user("Q"), assistant("A")]]
    assert [r["messages"] for r in records(self_instruct, "sft")] == [
        [user("Sum.\n\n1 2"), assistant("3")], [user("Sum."), assistant("0")]]


def test_self_instruct_as_eval_prompts_takes_the_first_instance(tmp_path):
    path = write(tmp_path, "u.jsonl", jsonl({"instruction": "Fix it.", "instances": [
        {"input": "teh cat", "output": "the cat"}, {"input": "x", "output": "y"}]}))
    assert records(path, "prompts") == [
        {"messages": [user("Fix it.\n\nteh cat")], "reference": "the cat", "source": "u.jsonl"}]


def test_csv_and_tsv_with_a_column_mapping(tmp_path):
    csv_path = write(tmp_path, "qa.csv", 'Q,A,label\n"안녕, 반가워","네,\n반가워요",0\n')
    tsv_path = write(tmp_path, "r.tsv", 'id\tdocument\tlabel\n1\t"따옴표" 그대로\t1\n')
    assert [r["messages"] for r in records(csv_path, "sft", columns={"prompt": "Q", "completion": "A"})] == [
        [user("안녕, 반가워"), assistant("네,\n반가워요")]]
    assert [r["text"] for r in records(tsv_path, "pretrain", columns={"text": "document"})] == ['"따옴표" 그대로']
    assert [r["text"] for r in records(csv_path, "pretrain", columns={"prompt": "Q", "completion": "A"})] == [
        "안녕, 반가워\n네,\n반가워요"]


def test_named_format_overrides_the_extension_and_a_bom_is_ignored(tmp_path):
    path = write(tmp_path, "data.dat", b"\xef\xbb\xbf" + jsonl({"text": "x"}).encode())
    assert records(path, "pretrain", format="jsonl") == [{"text": "x", "source": "data.dat"}]


def test_preference_pairs_strings_and_conversational(tmp_path):
    path = write(tmp_path, "p.jsonl", jsonl(
        {"prompt": "Q?", "chosen": "good", "rejected": "bad"},
        {"prompt": [user("Q2?")], "chosen": [assistant("good2")], "rejected": [assistant("bad2")]}))
    assert records(path, "preference") == [
        {"prompt": [user("Q?")], "chosen": "good", "rejected": "bad", "source": "p.jsonl"},
        {"prompt": [user("Q2?")], "chosen": "good2", "rejected": "bad2", "source": "p.jsonl"}]


def test_hh_transcript_parses_into_prompt_turns_and_final_responses(tmp_path):
    shared = "\n\nHuman: Hi there\n\nAssistant: Hello!  \n\nHuman: Tell me a joke."
    path = write(tmp_path, "hh.jsonl", jsonl({"chosen": shared + "\n\nAssistant: A pun.",
                                              "rejected": shared + "\n\nAssistant: No."}))
    assert parse_hh_transcript(shared) == [user("Hi there"), assistant("Hello!"), user("Tell me a joke.")]
    assert records(path, "preference") == [{
        "prompt": [user("Hi there"), assistant("Hello!"), user("Tell me a joke.")],
        "chosen": "A pun.", "rejected": "No.", "source": "hh.jsonl"}]


def test_ranked_list_of_three_makes_three_pairs_best_first(tmp_path):
    path = write(tmp_path, "r.jsonl", jsonl({"prompt": "Q", "responses": ["best", "middle", "worst"]}))
    assert [(r["chosen"], r["rejected"]) for r in records(path, "preference")] == [
        ("best", "middle"), ("best", "worst"), ("middle", "worst")]


def test_a_ranked_lists_pairs_carry_its_group_and_a_pair_row_none(tmp_path):
    ranked = write(tmp_path, "r.jsonl", jsonl({"prompt": "Q", "responses": ["best", "worst"]},
                                              {"prompt": "Q2", "responses": ["x", "y", "z"]}))
    assert [r["group"] for r in records(ranked, "preference")] == ["r.jsonl:1", "r.jsonl:2", "r.jsonl:2", "r.jsonl:2"]
    assert records(ranked, "preference")[0] == {"prompt": [user("Q")], "chosen": "best", "rejected": "worst",
                                                "source": "r.jsonl", "group": "r.jsonl:1"}
    pair = write(tmp_path, "p.jsonl", jsonl({"prompt": "Q", "chosen": "a", "rejected": "b"}))
    assert "group" not in records(pair, "preference")[0]
    array = write(tmp_path, "a.json", json.dumps([{"prompt": "Q", "responses": ["a", "b"]}] * 2))
    assert [r["group"] for r in records(array, "preference")] == ["a.json:1[0]", "a.json:1[1]"]


def test_tiers_rank_responses_with_ties_and_tied_responses_make_no_pair(tmp_path):
    path = write(tmp_path, "r.jsonl", jsonl({"prompt": "Q", "responses": ["a", "b", "c", "d"],
                                             "tiers": [[0], [2, 1], [3]]}))
    assert [(r["chosen"], r["rejected"]) for r in records(path, "preference")] == [
        ("a", "c"), ("a", "b"), ("a", "d"), ("c", "d"), ("b", "d")]  # not (c, b) nor (b, c): they tie


def test_ranked_records_from_memory_match_what_prepare_reads_and_name_the_bad_line(tmp_path):
    row = {"prompt": [user("Q")], "responses": ["a", "b", "c"], "tiers": [[0, 1], [2]]}
    path = write(tmp_path, "feedback.jsonl", jsonl({"prompt": "Other", "responses": ["x", "y"]}, row))
    assert ranked_records([{"prompt": "Other", "responses": ["x", "y"]}, row], path) == records(path, "preference")
    assert [r["group"] for r in ranked_records([(7, row)], "data/feedback/f.jsonl")] == ["f.jsonl:7"] * 2
    with pytest.raises(DataError, match=r"f\.jsonl, line 2, field 'tiers\[0\]\[1\]': 3 is not a response index"):
        ranked_records([row, {**row, "tiers": [[0, 3], [2]]}], "f.jsonl")
    with pytest.raises(DataError, match=r"f\.jsonl, line 1: expected a ranked row"):
        ranked_records(["not a row"], "f.jsonl")


def test_unpaired_labels_accept_booleans_and_1_0(tmp_path):
    path = write(tmp_path, "u.jsonl", jsonl(
        *({"prompt": "Q", "completion": f"c{i}", "label": label} for i, label in
          enumerate([True, False, 1, 0, "true", "False"]))))
    assert [r["label"] for r in records(path, "unpaired")] == [True, False, True, False, True, False]
    assert records(path, "unpaired")[0] == {"prompt": [user("Q")], "completion": "c0", "label": True,
                                            "source": "u.jsonl"}


# ------------------------------------------------------------------------------------------- errors
ERRORS = [
    # name, file, content, role, columns, line, field, words in the reason
    ("malformed_json", "a.jsonl", '{"text": "ok"}\n{"text": "broken\n', "pretrain", {}, 2, None, "malformed JSON"),
    ("empty_text", "t.jsonl", jsonl({"text": "a"}, {"text": " \n"}), "pretrain", {}, 2, "text", "empty"),
    ("missing_field", "a.jsonl", jsonl({"prompt": "Q", "completion": "A"}, {"prompt": "Q2"}), "sft", {}, 2,
     "completion", "missing"),
    ("empty_field", "a.jsonl", jsonl({"prompt": "Q", "completion": "A"}, {"prompt": "Q2", "completion": "  "}),
     "sft", {}, 2, "completion", "empty"),
    ("wrong_type", "a.jsonl", jsonl({"prompt": "Q", "completion": 5}), "sft", {}, 1, "completion", "string"),
    ("chosen_equals_rejected", "p.jsonl",
     "\n" + jsonl({"prompt": "Q", "chosen": "Same  text", "rejected": "Same text"}),
     "preference", {}, 2, "rejected", "same as 'chosen'"),
    ("non_utf8_jsonl", "a.jsonl", jsonl({"text": "ok"}).encode() + b'{"text": "caf\xe9"}\n', "pretrain", {}, 2,
     "text", "UTF-8"),
    ("non_utf8_csv", "a.csv", "Q,A\nhi,there\n".encode() + b"ok,caf\xe9\n", "sft", {"prompt": "Q", "completion": "A"},
     3, "A", "UTF-8"),
    ("unknown_role", "m.jsonl", jsonl({"messages": [user("Q"), {"role": "bot", "content": "A"}]}), "sft", {}, 1,
     "messages[1].role", "unknown role 'bot'"),
    ("not_ending_with_assistant", "m.jsonl", jsonl({"messages": [user("Q"), assistant("A"), user("Q2")]}), "sft", {},
     1, "messages", "must end with an assistant turn"),
    ("label_not_boolean", "u.jsonl", jsonl({"prompt": "Q", "completion": "A", "label": "maybe"}), "unpaired", {}, 1,
     "label", "boolean"),
    ("mapped_column_missing", "qa.csv", "Q,B\nhi,there\n", "sft", {"prompt": "Q", "completion": "A"}, 1, None,
     "`columns` maps {completion: A} but the header has no column 'A'; the file's columns are: Q, B"),
    ("ranked_ties", "r.jsonl", jsonl({"prompt": "Q", "responses": ["a", "b", "a"]}), "preference", {}, 1,
     "responses[2]", "same as 'responses[0]'"),
    ("ranked_one_response", "r.jsonl", jsonl({"prompt": "Q", "responses": ["a"]}), "preference", {}, 1,
     "responses", "at least 2 responses (best first), got 1 response(s)"),
    ("tiers_miss_a_response", "r.jsonl", jsonl({"prompt": "Q", "responses": ["a", "b", "c"], "tiers": [[0], [2]]}),
     "preference", {}, 1, "tiers", "response(s) [1] are in no tier"),
    ("tiers_rank_twice", "r.jsonl", jsonl({"prompt": "Q", "responses": ["a", "b"], "tiers": [[0, 1], [1]]}),
     "preference", {}, 1, "tiers[1][0]", "response 1 is ranked twice (also at [0][1])"),
    ("tiers_one_tier", "r.jsonl", jsonl({"prompt": "Q", "responses": ["a", "b"], "tiers": [[1, 0]]}),
     "preference", {}, 1, "tiers", "has one tier"),
    ("tiers_empty_tier", "r.jsonl", jsonl({"prompt": "Q", "responses": ["a", "b"], "tiers": [[0], [], [1]]}),
     "preference", {}, 1, "tiers[1]", "got an empty list"),
    ("hh_prefix_differs", "hh.jsonl", jsonl({"chosen": "\n\nHuman: A\n\nAssistant: x",
                                             "rejected": "\n\nHuman: B\n\nAssistant: y"}), "preference", {}, 1,
     "rejected", "does not share"),
    ("hh_empty_reply", "hh.jsonl", jsonl({"chosen": "\n\nHuman: A\n\nAssistant: ",
                                          "rejected": "\n\nHuman: A\n\nAssistant: y"}), "preference", {}, 1,
     "chosen", "empty"),
    ("csv_short_row", "a.csv", "Q,A\nonly-one\n", "sft", {"prompt": "Q", "completion": "A"}, 2, None, "columns"),
]


@pytest.mark.parametrize("name,filename,content,role,columns,line,field,reason", ERRORS, ids=[e[0] for e in ERRORS])
def test_bad_rows_name_the_file_line_and_field(tmp_path, name, filename, content, role, columns, line, field, reason):
    path = write(tmp_path, filename, content)
    with pytest.raises(DataError) as caught:
        load_source(Source(path, role, columns=columns))
    error, message = caught.value, str(caught.value)
    assert (error.line, error.field) == (line, field)
    assert filename in message and f"line {line}" in message and reason in message
    if field:
        assert f"field '{field}'" in message


def test_empty_file_names_the_file(tmp_path):
    for name, content in [("empty.jsonl", ""), ("blank.jsonl", "\n\n"), ("header_only.csv", "prompt,completion\n"),
                          ("empty.txt", "\n  \n")]:
        path = write(tmp_path, name, content)
        with pytest.raises(DataError, match=rf"{name}: has no (rows|text)"):
            load_source(Source(path, "pretrain" if name.endswith(".txt") else "sft"))


def test_plain_text_with_bad_bytes_names_the_line(tmp_path):
    path = write(tmp_path, "book.txt", b"fine\n\nline two is b\xffd\n")
    with pytest.raises(DataError, match=r"book\.txt, line 3: not valid UTF-8 \(byte 0xff\)"):
        load_source(Source(path, "pretrain"))


def test_rows_matching_no_format_say_what_was_expected(tmp_path):
    path = write(tmp_path, "x.jsonl", jsonl({"question": "Q", "answer": "A"}))
    with pytest.raises(DataError, match=r"x\.jsonl, line 1: keys \['answer', 'question'\] match no sft format"):
        load_source(Source(path, "sft"))


def test_skip_invalid_drops_bad_rows_and_reports_them(tmp_path):
    path = write(tmp_path, "p.jsonl", jsonl({"prompt": "Q", "chosen": "a", "rejected": "a"},
                                            {"prompt": "Q", "chosen": "a", "rejected": "b"}))
    loaded = load_source(Source(path, "preference", skip_invalid=True))
    assert [r["rejected"] for r in loaded.records] == ["b"]
    assert loaded.rows == 2 and len(loaded.skipped) == 1 and "line 1" in loaded.skipped[0]


# ------------------------------------------------------------------- JSON arrays, folders, keys, lengths
ALPACA = [{"instruction": "Say hello.", "input": "", "output": "Hello!"},
          {"instruction": "Add the numbers.", "input": "2 3", "output": "5"}]


def test_alpacas_own_json_array_is_read_pretty_printed_or_on_one_line(tmp_path):
    expected = [[user("Say hello."), assistant("Hello!")], [user("Add the numbers.\n\n2 3"), assistant("5")]]
    for name, text in [("alpaca_data.json", json.dumps(ALPACA, indent=4)), ("one_line.json", json.dumps(ALPACA)),
                       ("named.jsonl", json.dumps(ALPACA, indent=2))]:  # an array in a .jsonl file is read too
        path = write(tmp_path, name, text)
        assert [r["messages"] for r in records(path, "sft")] == expected, name
    pairs = [{"prompt": "Q", "chosen": "good", "rejected": "bad"}]  # any row shape, any role
    assert records(write(tmp_path, "p.json", json.dumps(pairs, indent=1)), "preference")[0]["chosen"] == "good"
    assert load_source(Source(write(tmp_path, "a.json", json.dumps(ALPACA, indent=2)), "sft")).rows == 2


def test_json_lines_in_a_json_file_are_still_json_lines(tmp_path):
    path = write(tmp_path, "rows.json", jsonl(*ALPACA))
    assert len(records(path, "sft")) == 2


ARRAY_ERRORS = [
    # name, content, line, element, field, message after "file, line N (array element [i])[, field 'f']: "
    ("not_an_object", '[\n  {"instruction": "a", "output": "b"},\n  7,\n  {"instruction": "c", "output": "d"}\n]\n',
     3, 1, None, "expected a JSON object, got a number"),
    ("empty_output", '[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c",\n   "output": " "}\n]\n',
     3, 1, "output", "is empty; expected a non-empty string"),
    ("malformed", '[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c" "output": "d"}\n]\n',
     3, 1, None, "malformed JSON at column 23: Expecting ',' delimiter"),
    ("duplicate_key", '[\n  {"instruction": "a", "output": "b",\n   "output": "c"}\n]\n',
     2, 0, "output", 'duplicate key: it appears twice in one object (first "b", then "c"); expected each key once'),
    ("not_closed", '[\n  {"instruction": "a", "output": "b"},\n', 3, 1, None,
     "the array is not closed: expected an element and ']' at the end of the file"),
]


@pytest.mark.parametrize("name,content,line,element,field,message", ARRAY_ERRORS, ids=[e[0] for e in ARRAY_ERRORS])
def test_a_bad_array_element_is_named_by_its_index_and_line(tmp_path, name, content, line, element, field, message):
    path = write(tmp_path, "alpaca.json", content)
    with pytest.raises(DataError) as caught:
        load_source(Source(path, "sft"))
    error = caught.value
    assert (error.line, error.element, error.field) == (line, element, field)
    where = f"{path}, line {line} (array element [{element}])" + (f", field '{field}'" if field else "")
    assert str(error) == f"{where}: {message}"


def test_a_trailing_comma_or_text_after_the_array_is_named(tmp_path):
    path = write(tmp_path, "a.json", '[\n  {"instruction": "a", "output": "b"},\n]\n')
    with pytest.raises(DataError) as caught:
        load_source(Source(path, "sft"))
    assert str(caught.value) == f"{path}, line 3: a comma after the last array element [0]; JSON allows none before ']'"
    path = write(tmp_path, "b.json", '[\n  {"instruction": "a", "output": "b"}\n]\n{"instruction": "c"}\n')
    with pytest.raises(DataError, match=r"b\.json, line 4: has more text after the closing '\]' of the array"):
        load_source(Source(path, "sft"))


def test_a_duplicate_key_in_a_json_line_names_file_line_and_key(tmp_path):
    path = write(tmp_path, "d.jsonl", '{"prompt": "Q", "completion": "A"}\n{"prompt": "Q", "completion": "A", '
                                      '"prompt": "Q2"}\n')
    with pytest.raises(DataError) as caught:
        load_source(Source(path, "sft"))
    assert (caught.value.line, caught.value.field) == (2, "prompt")
    assert str(caught.value) == (f"{path}, line 2, field 'prompt': duplicate key: it appears twice in one object "
                                 f'(first "Q", then "Q2"); expected each key once')
    nested = write(tmp_path, "n.jsonl", jsonl({"messages": [user("Q"), assistant("A")]}).replace(
        '"content": "A"', '"content": "A", "content": "B"'))
    with pytest.raises(DataError, match=r"n\.jsonl, line 1, field 'content': duplicate key"):
        load_source(Source(nested, "sft"))


def test_a_csv_header_naming_a_column_twice_is_an_error(tmp_path):
    path = write(tmp_path, "twice.csv", "Q,A,Q\nhi,there,again\n")
    with pytest.raises(DataError) as caught:
        load_source(Source(path, "sft", columns={"prompt": "Q", "completion": "A"}))
    assert str(caught.value) == (f"{path}, line 1, field 'Q': the header names column 'Q' 2 times; expected each "
                                 f"column once (header: Q, A, Q)")


def test_a_column_mapping_naming_absent_columns_names_them_and_the_files_columns(tmp_path):
    path = write(tmp_path, "reviews.tsv", "id\tdoc\tlabel\n1\tgood film\t1\n")
    with pytest.raises(DataError) as caught:
        load_source(Source(path, "sft", columns={"prompt": "question", "completion": "answer"}))
    assert str(caught.value) == (f"{path}, line 1: `columns` maps {{prompt: question, completion: answer}} but the "
                                 f"header has no columns 'question', 'answer'; the file's columns are: id, doc, label")
    assert records(path, "pretrain", columns={"text": "doc"})[0]["text"] == "good film"  # a right mapping reads
    rows = write(tmp_path, "q.jsonl", jsonl({"q": "Q", "a": "A"}))
    with pytest.raises(DataError) as caught:
        load_source(Source(rows, "sft", columns={"prompt": "question", "completion": "a"}))
    assert str(caught.value) == (f"{rows}, line 1: `columns` maps {{prompt: question}} but the row has no key "
                                 f"'question'; its keys are: q, a")


def test_a_folder_source_reads_its_supported_files_in_name_order(tmp_path, caplog):
    folder = tmp_path / "chats"
    folder.mkdir()
    write(folder, "b.jsonl", jsonl({"prompt": "second", "completion": "B"}))
    write(folder, "a.json", json.dumps([{"prompt": "first", "completion": "A"}], indent=2))
    write(folder, "c.csv", "prompt,completion\nthird,C\n")
    write(folder, "README.md", "not data")
    write(folder, ".hidden.jsonl", "not read")
    (folder / "sub").mkdir()
    write(folder / "sub", "d.jsonl", "not read either")

    loaded = load_source(Source(folder, "sft"))

    assert [r["messages"][0]["content"] for r in loaded.records] == ["first", "second", "third"]
    assert {r["source"] for r in loaded.records} == {"chats"} and loaded.rows == 3
    assert "skipping 1 file(s) of no supported type: README.md" in caplog.text
    write(folder, "bad.jsonl", jsonl({"prompt": "Q"}))  # a bad row in one file is named by that file
    with pytest.raises(DataError, match=r"chats/bad\.jsonl, line 1, field 'completion': missing"):
        load_source(Source(folder, "sft"))


def test_a_folder_without_supported_files_is_refused_by_name(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    write(folder, "notes.md", "x")
    with pytest.raises(DataError) as caught:
        load_source(Source(folder, "sft"))
    message = str(caught.value)
    assert message == (f"{folder}: is a folder with no supported files (it holds notes.md; subfolders are not read); "
                       f"expected files ending in .txt, .jsonl, .json, .csv, .tsv")
    assert "not found" not in message
    with pytest.raises(DataError, match=r"nope\.jsonl: file not found"):
        load_source(Source(tmp_path / "nope.jsonl", "sft"))


def test_max_chars_refuses_a_long_row_naming_file_line_field_and_length(tmp_path):
    rows = jsonl({"prompt": "short", "completion": "fine"}, {"prompt": "Q", "completion": "x" * 5000})
    path = write(tmp_path, "long.jsonl", rows)
    with pytest.raises(DataError) as caught:
        load_source(Source(path, "sft", max_chars=1000))
    assert (caught.value.line, caught.value.field) == (2, "completion")
    assert str(caught.value) == (f"{path}, line 2, field 'completion': the row has 5,001 characters (5,000 in this "
                                 f"field), more than prepare.max_chars = 1,000; shorten or split it, or raise the "
                                 f"bound")
    assert len(records(path, "sft", max_chars=5001)) == 2 and len(records(path, "sft")) == 2  # within / no bound
    skipped = load_source(Source(path, "sft", max_chars=1000, skip_invalid=True))
    assert len(skipped.records) == 1 and "5,001 characters" in skipped.skipped[0]
    book = write(tmp_path, "book.txt", "short\n\n" + "y" * 3000 + "\n")
    with pytest.raises(DataError) as caught:
        load_source(Source(book, "pretrain", max_chars=1000))
    assert str(caught.value) == (f"{book}, line 3: the line has 3,000 characters, more than prepare.max_chars = "
                                 f"1,000; shorten or split it, or raise the bound")
    csv_path = write(tmp_path, "long.csv", "Q,A\nhi,there\nQ," + "z" * 2000 + "\n")
    with pytest.raises(DataError, match=r"long\.csv, line 3, field 'A': the row has 2,001 characters"):
        load_source(Source(csv_path, "sft", columns={"prompt": "Q", "completion": "A"}, max_chars=1000))


# ------------------------------------------------------------------------------ dedup, split, sample
def test_dedup_drops_whitespace_variants_across_sources_and_keeps_the_first():
    rows = [{"text": "a  b\n", "source": "x"}, {"text": "c", "source": "x"}, {"text": " a b", "source": "y"}]
    kept, dropped = dedup(rows)
    assert kept == rows[:2] and dropped == [rows[2]]


def pairs(n: int) -> list[dict]:
    return [{"prompt": [user(f"q{i}")], "chosen": "a", "rejected": f"b{i}", "source": "s"} for i in range(n)]


def test_split_is_deterministic_disjoint_and_depends_on_the_seed():
    rows = pairs(200)
    train, held_out = split(rows, 0.2, seed=1)
    assert split(rows, 0.2, seed=1) == (train, held_out)
    assert split(rows, 0.2, seed=2)[1] != held_out
    assert sorted(r["rejected"] for r in train + held_out) == sorted(r["rejected"] for r in rows)
    assert not {r["rejected"] for r in train} & {r["rejected"] for r in held_out}
    assert 20 <= len(held_out) <= 60


def test_split_keeps_all_pairs_of_a_prompt_on_one_side():
    rows = [{"prompt": [user(f"q{i // 3}")], "chosen": "a", "rejected": f"b{i}", "source": "s"} for i in range(90)]
    train, held_out = split(rows, 0.3, seed=0)
    assert held_out and not {r["prompt"][0]["content"] for r in train} & {r["prompt"][0]["content"] for r in held_out}


def ranked(group: str, prompt: str, n: int, source: str = "s") -> list[dict]:
    return [{"prompt": [user(prompt)], "chosen": "a", "rejected": f"b{i}", "source": source, "group": group}
            for i in range(n)]


def test_dedup_ignores_the_group_and_split_never_splits_one_even_under_a_single_prompt():
    first, again = ranked("r.jsonl:1", "q", 3), ranked("r.jsonl:9", "q", 3)
    assert dedup(first + again) == (first, again)  # one comparison, kept in the first list
    one_prompt = [row for i in range(40) for row in ranked(f"r.jsonl:{i}", "q", 3)]
    train, held_out = split(one_prompt, 0.3, seed=0)  # one prompt: split by list, not by pair
    assert train and held_out and not {r["group"] for r in train} & {r["group"] for r in held_out}


def test_sample_balanced_takes_a_ranked_list_whole_or_not_at_all():
    rows = [row for i in range(10) for row in ranked(f"g{i}", f"q{i}", 6)] + pairs(30)
    for seed in range(5):
        sample = sample_balanced(rows, 20, seed)
        taken = [r for r in sample if "group" in r]
        assert len(sample) <= 20 and taken and len(sample) > len(taken)
        assert all(sum(r["group"] == g for r in taken) == 6 for g in {r["group"] for r in taken})


def test_split_gives_both_sides_a_row_when_there_are_two():
    for seed in range(20):
        train, held_out = split(pairs(2), 0.01, seed)
        assert len(train) == len(held_out) == 1
    one_prompt = [pairs(1)[0], {**pairs(1)[0], "rejected": "other"}]  # a single group: split by record instead
    train, held_out = split(one_prompt, 0.01, seed=0)
    assert len(train) == len(held_out) == 1


def test_sample_balanced_stays_within_budget_and_keeps_every_source():
    rows = ([{"text": "e" * 100, "source": "english"}] * 50 + [{"text": "한" * 40, "source": "korean"}] * 50)
    sample = sample_balanced(rows, 1000, seed=0, cost=lambda r: len(r["text"]))
    chars = {s: sum(len(r["text"]) for r in sample if r["source"] == s) for s in ("english", "korean")}
    assert sum(chars.values()) <= 1000 and chars["english"] >= 400 and chars["korean"] >= 400
    assert sample_balanced(rows, 1000, seed=0, cost=lambda r: len(r["text"])) == sample
    assert len(sample_balanced(rows, 7, seed=3)) == 7


# ------------------------------------------------------------------------------------------- writing
def test_write_jsonl_keeps_korean_readable(tmp_path):
    path = tmp_path / "k.jsonl"
    write_jsonl(path, [{"text": "사과"}])
    assert path.read_text(encoding="utf-8") == '{"text": "사과"}\n' and read_jsonl(path) == [{"text": "사과"}]


def test_atomic_dir_replaces_only_on_success(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("boom")
    assert [p.name for p in out.iterdir()] == ["old.txt"] and [p.name for p in tmp_path.iterdir()] == ["out"]
    with atomic_dir(out) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new.txt"] and [p.name for p in tmp_path.iterdir()] == ["out"]

"""models/classification.py: label maps, reading labelled files, the TF-IDF baseline and metrics."""

from __future__ import annotations

import json

import pytest
from helpers_tokenizer import make_test_tokenizer
from transformers import AutoConfig, AutoModelForSequenceClassification

from instructflow.errors import DataError
from models.classification import (
    LabelMap,
    classification_metrics,
    plot_confusion,
    read_classification,
    tfidf_baseline,
)
from models.encoder import build_classifier, build_encoder

# --- LabelMap ------------------------------------------------------------------------------------


def test_label_map_sorts_deterministically():
    assert LabelMap.from_labels(["pos", "neg", "pos", "neu"]).labels == ("neg", "neu", "pos")
    assert LabelMap.from_labels(["10", "2", 1, "0"]).labels == ("0", "1", "2", "10")  # numbers numerically
    assert LabelMap.from_labels(["b", "a"]) == LabelMap.from_labels(["a", "b", "a"])


def test_label_map_round_trips():
    labels = LabelMap.from_labels(["긍정", "부정"])
    assert [labels.to_label(labels.to_id(x)) for x in ("긍정", "부정")] == ["긍정", "부정"]
    assert labels.to_id(labels.to_label(1)) == 1
    assert LabelMap.from_json(labels.to_json()) == labels
    assert LabelMap.from_id2label(json.loads(json.dumps(labels.id2label))) == labels  # keys become strings
    assert labels.label2id == {"긍정": 0, "부정": 1}
    with pytest.raises(KeyError, match="unknown label 'neutral'"):
        labels.to_id("neutral")
    with pytest.raises(KeyError, match="out of range"):
        labels.to_label(2)


def test_label_map_round_trips_through_saved_model_config(tmp_path):
    # given a classifier built with a label map and saved
    labels = LabelMap.from_labels(["neg", "pos", "neu"])
    tokenizer = make_test_tokenizer()
    encoder = build_encoder(len(tokenizer), tokenizer.pad_token_id, 32, 1, 2, 64, 32)
    build_classifier(encoder, len(labels), labels.id2label, labels.label2id).save_pretrained(tmp_path)

    # when its config and model are loaded back
    config = AutoConfig.from_pretrained(tmp_path)
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path)

    # then the same label map comes out
    assert LabelMap.from_id2label(config.id2label) == labels
    assert config.label2id == labels.label2id
    assert model.config.num_labels == 3


# --- read_classification: good files --------------------------------------------------------------


def write(path, text: str | bytes):
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def test_reads_csv_tsv_and_jsonl(tmp_path):
    csv_file = write(tmp_path / "train.csv", 'id,document,label\n1,정말 좋아요,1\n2,"쉼표, 그리고\n줄바꿈",0\n')
    tsv_file = write(tmp_path / "pairs.tsv", "a\tb\tlabel\n하늘이 파랗다\t하늘은 파란색이다\tentail\n")
    jsonl_file = write(tmp_path / "test.jsonl", '{"text": "좋아", "label": 1}\n\n{"text": "싫어", "label": "0"}\n')

    assert read_classification(csv_file, "document", "label") == [
        {"text": "정말 좋아요", "text_pair": None, "label": "1"},
        {"text": "쉼표, 그리고\n줄바꿈", "text_pair": None, "label": "0"},
    ]
    assert read_classification(tsv_file, "a", "label", text_pair_column="b") == [
        {"text": "하늘이 파랗다", "text_pair": "하늘은 파란색이다", "label": "entail"}
    ]
    rows = read_classification(jsonl_file, "text", "label", labels=LabelMap.from_labels(["0", "1"]))
    assert [r["label"] for r in rows] == ["1", "0"]  # an integer label and its string are the same label


# --- read_classification: each bad file names the file, the line and the column --------------------

BAD_FILES = {
    # name: (file name, content, text_column, label_column, known labels, line, field, words in the message)
    "csv without the column": ("a.csv", "id,review,label\n1,좋아,1\n", "document", "label", None, 1, "document",
                               ["no column 'document'", "['id', 'review', 'label']"]),
    "jsonl row without the label": ("a.jsonl", '{"text": "좋아", "label": 1}\n{"text": "싫어"}\n', "text", "label", None,
                                    2, "label", ["no column 'label'", "['text']"]),
    "empty text": ("a.csv", "document,label\n좋아,1\n   ,0\n", "document", "label", None, 3, "document", ["text is empty"]),
    "empty text after a two-line field": ("a.csv", 'document,label\n"좋아\n정말",1\n"",0\n', "document", "label", None,
                                          4, "document", ["text is empty"]),
    "missing label (tsv)": ("a.tsv", "document\tlabel\n좋아\t1\n싫어\t\n", "document", "label", None, 3, "label",
                            ["label is missing"]),
    "null label (jsonl)": ("a.jsonl", '{"text": "좋아", "label": null}\n', "text", "label", None, 1, "label",
                           ["label is missing"]),
    "label unseen in training": ("test.csv", "document,label\n좋아,1\n그저 그래,2\n", "document", "label", ["0", "1"],
                                 3, "label", ["label '2' is not one of the known labels ['0', '1']"]),
    "malformed json": ("a.jsonl", '{"text": "좋아", "label": 1}\n{"text": "싫어", "label": 0\n', "text", "label", None,
                       2, None, ["malformed JSON"]),
    "text not a string": ("a.jsonl", '{"text": 42, "label": 1}\n', "text", "label", None, 1, "text",
                          ["expected a string"]),
    "wrong field count": ("a.csv", "document,label\n좋아,1,extra\n", "document", "label", None, 2, None,
                          ["has 3 columns but the header has 2"]),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_rows_name_file_line_and_column(tmp_path, case):
    name, content, text_column, label_column, known, line, field, words = BAD_FILES[case]
    path = write(tmp_path / name, content)
    labels = LabelMap.from_labels(known) if known else None

    with pytest.raises(DataError) as caught:
        read_classification(path, text_column, label_column, labels=labels)

    error, message = caught.value, str(caught.value)
    assert (error.path, error.line, error.field) == (str(path), line, field)
    assert message.startswith(f"{path}, line {line}")
    if field:
        assert f"field '{field}'" in message
    for word in words:
        assert word in message


def test_non_utf8_bytes_name_the_line(tmp_path):
    path = write(tmp_path / "a.csv", "document,label\n좋아,1\n".encode() + b"caf\xe9,0\n")
    with pytest.raises(DataError, match=r"a\.csv, line 3, field 'document': not valid UTF-8 \(byte 0xe9\)"):
        read_classification(path, "document", "label")


@pytest.mark.parametrize(("name", "content", "line"), [("a.csv", "", None), ("a.jsonl", "\n  \n", None),
                                                       ("a.csv", "document,label\n", 1)])
def test_empty_files_are_errors(tmp_path, name, content, line):
    path = write(tmp_path / name, content)
    with pytest.raises(DataError) as caught:
        read_classification(path, "document", "label")
    assert caught.value.line == line and str(path) in str(caught.value)


def test_unknown_extension(tmp_path):
    with pytest.raises(DataError, match="unknown extension '.txt'"):
        read_classification(write(tmp_path / "a.txt", "x"), "document", "label")


# --- baseline and metrics -------------------------------------------------------------------------

POSITIVE = ["정말 좋아요", "너무 좋아", "최고의 영화", "배우가 좋아요", "다시 보고 싶어요", "재미있고 좋아요", "최고예요", "좋아 좋아"]
NEGATIVE = ["정말 싫어요", "너무 싫어", "최악의 영화", "배우가 싫어요", "다시는 안 봐요", "지루하고 싫어요", "최악이에요", "싫어 싫어"]


def test_tfidf_baseline_beats_chance():
    train_texts, train_labels = POSITIVE[:6] + NEGATIVE[:6], ["pos"] * 6 + ["neg"] * 6
    test_texts, test_labels = POSITIVE[6:] + NEGATIVE[6:], ["pos"] * 2 + ["neg"] * 2
    predictions = tfidf_baseline(train_texts, train_labels, test_texts, seed=0)
    assert len(predictions) == 4 and set(predictions) <= {"pos", "neg"}
    assert classification_metrics(test_labels, predictions, ["neg", "pos"])["accuracy"] == 1.0
    assert tfidf_baseline(train_texts, train_labels, test_texts, seed=0) == predictions  # reproducible


def test_classification_metrics_by_hand():
    # a: precision 1, recall 1/2 -> F1 2/3; b: precision 2/3, recall 1 -> F1 4/5; macro (2/3 + 4/5) / 2
    metrics = classification_metrics(["a", "a", "b", "b"], ["a", "b", "b", "b"], ["a", "b"])
    assert metrics["accuracy"] == 0.75
    assert metrics["macro_f1"] == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert metrics["confusion_matrix"] == [[1, 1], [0, 2]]  # rows true, columns predicted
    json.dumps(metrics)  # goes into a DVC metrics file as is


def test_plot_confusion_writes_png(tmp_path):
    path = plot_confusion([[5, 1], [2, 7]], ["neg", "pos"], tmp_path / "plots" / "confusion.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


"""Stage `classify`: a micro fine-tune beside the TF-IDF baseline, its saved labels, bad input that writes nothing,
and the registered classifier, served through MLflow's pipeline, predicting as the stage did."""

from __future__ import annotations

import csv
import json
import math

import mlflow
import pytest
import torch
from conftest import FakeRun
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertForMaskedLM,
)

import tasks.classify as stage
from instructflow.config import validate
from instructflow.errors import DataError, InstructflowError
from models.classification import LabelMap
from models.encoder import encoder_tokenizer
from models.stats import gains_from_metrics
from models.tokenizer import load_tokenizer
from tasks.registry import log_and_register

POSITIVE = ["이 영화 정말 좋아요", "배우들 연기가 최고였어요", "좋아 좋아 정말 좋아", "I really liked this movie",
            "the actors were great", "음식이 맛있어서 또 가고 싶어요"]
NEGATIVE = ["너무 지루하고 재미없어요", "시간이 아까웠어요", "싫어 싫어 진짜 싫어", "This film was boring",
            "far too long", "진짜 싫어 지루해"]


def write_tsv(path, rows, header=("id", "document", "label")):
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["\t".join(header)] + ["\t".join(map(str, row)) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture
def project(tmp_path, mlm_folder):
    (tmp_path / "artifacts").mkdir()
    (tmp_path / "artifacts" / "mlm").symlink_to(mlm_folder, target_is_directory=True)
    train = [(i, text, label) for i, (text, label) in
             enumerate([(t, "pos") for t in POSITIVE * 4] + [(t, "neg") for t in NEGATIVE * 4])]
    write_tsv(tmp_path / "data" / "train.tsv", train)
    test = [(t, "pos") for t in POSITIVE] + [(t, "neg") for t in NEGATIVE]
    write_tsv(tmp_path / "data" / "test.tsv", [(100 + i, text, label) for i, (text, label) in enumerate(test)])
    return tmp_path


def micro_params(**classify):
    section = {"train_path": "data/train.tsv", "test_path": "data/test.tsv", "max_steps": 4, "batch_size": 8,
               "eval_steps": 2, "max_train_rows": None, "max_test_rows": None, **classify}
    return validate({"preset": "micro", "tracks": {"decoder": False, "encoder": True}, "classify": section})


def test_stage_reports_encoder_and_baseline_and_saves_the_label_map(project, mlm_folder):
    # when the stage fine-tunes the micro encoder on a 48-row task labelled "pos" / "neg"
    metrics = stage.body(micro_params(), project, FakeRun())

    # then: test metrics of the encoder and of the TF-IDF baseline, on the same 12 test rows
    for key in ("accuracy", "macro_f1", "baseline_accuracy", "baseline_macro_f1", "eval_loss", "eval_accuracy"):
        assert 0 <= metrics[key] <= (math.inf if key == "eval_loss" else 1), key
    assert metrics["test_rows"] == 12 and metrics["train_rows"] + metrics["val_rows"] == 48
    assert metrics["val_rows"] == 5 and metrics["num_labels"] == 2
    # the baseline has seen the very sentences of the test set: it must get them right
    assert metrics["baseline_accuracy"] == 1.0

    out = project / "artifacts" / "classify"
    labels = LabelMap.from_json((out / "labels.json").read_text())
    assert labels == LabelMap(("neg", "pos"))
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert LabelMap.from_id2label(model.config.id2label) == labels
    assert model.config.label2id == {"neg": 0, "pos": 1}
    # the encoder started as the masked LM's and was fine-tuned
    start = BertForMaskedLM.from_pretrained(mlm_folder).bert.encoder.layer[0].attention.self.query.weight
    assert not torch.equal(start, model.bert.encoder.layer[0].attention.self.query.weight)

    with (out / "predictions.csv").open(encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["text"] for r in rows] == POSITIVE + NEGATIVE
    assert {r["prediction"] for r in rows} <= {"neg", "pos"} and rows[0]["label"] == "pos"
    assert {r["random_init_prediction"] for r in rows} <= {"neg", "pos"}
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["encoder"]["accuracy"] == metrics["accuracy"]
    assert evaluation["random_init"]["accuracy"] == metrics["random_init_accuracy"]
    assert all(metrics[key] == value for key, value in evaluation["gains"].items())
    assert sum(map(sum, evaluation["baseline"]["confusion_matrix"])) == 12
    for name in ("confusion.png", "confusion_baseline.png", "loss.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    for name in ("model.safetensors", "tokenizer.json", "history.csv"):
        assert (out / name).is_file(), name

    # the saved tokenizer frames inputs itself and cuts them at classify.max_length, as the fine-tuning did
    saved_tok = AutoTokenizer.from_pretrained(out)
    ids = saved_tok("좋아요", add_special_tokens=False)["input_ids"]
    assert saved_tok("좋아요")["input_ids"] == [saved_tok.cls_token_id, *ids, saved_tok.sep_token_id]
    assert saved_tok.model_max_length == micro_params().classify.max_length


def test_gains_against_a_random_init_encoder_and_tfidf(project, mlm_folder):
    # when the stage fine-tunes the pretrained encoder and, the same way, a randomly initialised one of its config
    metrics = stage.body(micro_params(), project, FakeRun())
    out = project / "artifacts" / "classify"
    with (out / "predictions.csv").open(encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))

    # then: two gains in test accuracy on the same 12 rows, recomputed here from the predictions
    gains = {g.id: g for g in gains_from_metrics(metrics)}
    assert set(gains) == {"mlm.accuracy.all.random_init", "classify.accuracy.all.tfidf"}
    accuracy = {col: sum(r[col] == r["label"] for r in rows) / len(rows)
                for col in ("prediction", "baseline_prediction", "random_init_prediction")}
    mlm, tfidf = gains["mlm.accuracy.all.random_init"], gains["classify.accuracy.all.tfidf"]
    assert (mlm.model_value, mlm.baseline_value) == (accuracy["prediction"], accuracy["random_init_prediction"])
    assert (tfidf.model_value, tfidf.baseline_value) == (accuracy["prediction"], accuracy["baseline_prediction"])
    assert metrics["random_init_accuracy"] == accuracy["random_init_prediction"] and mlm.n == tfidf.n == 12
    # TF-IDF has seen these very sentences and gets all 12 right: nothing can beat it, and the stage is flagged
    assert tfidf.baseline_value == 1.0 and tfidf.ci_high <= 0 and metrics["beats.classify.accuracy.all.tfidf"] == 0.0
    assert metrics["beats.mlm.accuracy.all.random_init"] == float(mlm.ci_low > 0)


def test_unknown_test_label_names_file_line_column_and_writes_nothing(project):
    # given a test file whose 3rd data row (line 4) has a label the training file never had
    write_tsv(project / "data" / "test.tsv", [(1, "좋아요", "pos"), (2, "싫어요", "neg"), (3, "그냥 그래요", "neutral")])

    with pytest.raises(DataError) as raised:
        stage.body(micro_params(), project, FakeRun())

    message = str(raised.value)
    assert message.startswith(f"{project / 'data' / 'test.tsv'}, line 4, field 'label'")
    assert "'neutral'" in message and "['neg', 'pos']" in message
    assert not (project / "artifacts" / "classify").exists()


@pytest.mark.parametrize(
    ("rows", "header", "expected"),
    [
        ([(1, "좋아요", "pos"), (2, "", "neg")], ("id", "document", "label"), "line 3, field 'document': text is empty"),
        ([(1, "좋아요", "pos"), (2, "싫어요", " ")], ("id", "document", "label"), "line 3, field 'label': label is missing"),
        ([(1, "좋아요", "pos")], ("id", "review", "label"), "line 1, field 'document': no column 'document'"),
    ],
)
def test_bad_training_rows_fail_before_any_training(project, rows, header, expected):
    write_tsv(project / "data" / "train.tsv", rows, header)
    with pytest.raises(DataError, match=expected):
        stage.body(micro_params(), project, FakeRun())
    assert not (project / "artifacts" / "classify").exists()


def test_a_single_label_is_not_a_classification_task(project):
    write_tsv(project / "data" / "train.tsv", [(i, t, "pos") for i, t in enumerate(POSITIVE)])
    with pytest.raises(DataError, match="only the label \\['pos'\\]; a classifier needs at least two"):
        stage.body(micro_params(), project, FakeRun())


def test_sentence_pairs_from_jsonl(project):
    # given a JSONL pair task with integer labels: 1 when the two sentences agree in sentiment
    pairs = [(a, b, int((a in POSITIVE) == (b in POSITIVE))) for a in POSITIVE[:3] + NEGATIVE[:3]
             for b in POSITIVE[3:] + NEGATIVE[3:]]
    lines = [json.dumps({"s1": a, "s2": b, "same": y}, ensure_ascii=False) for a, b, y in pairs]
    (project / "data" / "pairs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")

    metrics = stage.body(micro_params(train_path="data/pairs.jsonl", test_path="data/pairs.jsonl", text_column="s1",
                                      text_pair_column="s2", label_column="same", max_steps=2), project, FakeRun())

    assert metrics["test_rows"] == 36 and metrics["num_labels"] == 2
    with (project / "artifacts" / "classify" / "predictions.csv").open(encoding="utf-8") as fh:
        first = next(csv.DictReader(fh))
    assert (first["text"], first["text_pair"], first["label"]) == (pairs[0][0], pairs[0][1], "1")


def test_subsample_is_seeded_and_keeps_file_order():
    rows = [{"i": i} for i in range(100)]
    picked = stage.subsample(rows, 10, seed=3)
    assert picked == stage.subsample(rows, 10, seed=3) != stage.subsample(rows, 10, seed=4)
    assert [r["i"] for r in picked] == sorted(r["i"] for r in picked)
    assert stage.subsample(rows, None, seed=3) is rows and stage.subsample(rows, 200, seed=3) is rows


def test_hold_out_splits_a_tenth_without_overlap():
    rows = [{"i": i} for i in range(48)]
    train, val = stage.hold_out(rows, 0.1, seed=0)
    assert len(val) == 5 and len(train) == 43
    assert sorted(r["i"] for r in train + val) == list(range(48))


def test_without_a_masked_lm_the_stage_says_which_stage_to_run(project):
    (project / "artifacts" / "mlm").unlink()
    with pytest.raises(InstructflowError, match="no masked LM to fine-tune; run the mlm stage first"):
        stage.body(micro_params(), project, FakeRun())


# --- the registered classifier, served -------------------------------------------------------------

LONG = "이 영화 정말 좋아요 배우들 연기가 최고였어요 " * 6  # well past classify.max_length = 24 tokens


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """A throwaway sqlite tracking store and artifact folder; yields its experiment id."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    try:
        yield mlflow.create_experiment("classify-tests", artifact_location=(tmp_path / "mlartifacts").as_uri())
    finally:
        mlflow.set_tracking_uri(None)


def stage_probabilities(folder, mlm_folder, rows: list[dict], max_length: int) -> torch.Tensor:
    """Class probabilities (N, C) the stage's way: its tokenizer (the masked LM's, framed) through `collate_rows`."""
    tok = encoder_tokenizer(load_tokenizer(mlm_folder), max_length)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    batch = stage.collate_rows([{**row, "label_id": 0} for row in rows], tok, max_length)
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits  # (N, C)
    return logits.softmax(-1)


def served_probabilities(pipe, inputs: list, labels: list[str], **kwargs) -> torch.Tensor:
    """Class probabilities (N, C), in label-id order, from a text-classification pipeline."""
    outputs = pipe(inputs, top_k=None, **kwargs)  # per input: [{"label", "score"}] for every label
    return torch.tensor([[{o["label"]: o["score"] for o in row}[label] for label in labels] for row in outputs])


@pytest.mark.parametrize("pair", [False, True], ids=["text", "text-pair"])
def test_the_registered_classifier_served_by_mlflow_predicts_as_the_stage(project, mlm_folder, mlflow_store, pair):
    # given the stage's classifier (inputs cut at 24 tokens; one test text is longer), registered as `register` does
    test = [(t, "pos") for t in POSITIVE + [LONG]] + [(t, "neg") for t in NEGATIVE]
    if pair:
        lines = [json.dumps({"a": a, "b": b, "label": y}, ensure_ascii=False)
                 for (a, y), (b, _) in zip(test, test[1:] + test[:1])]  # LONG is once text A, once text B
        (project / "data" / "pairs.jsonl").write_text("\n".join(lines * 3) + "\n", encoding="utf-8")
        (project / "data" / "pairs_test.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        params = micro_params(train_path="data/pairs.jsonl", test_path="data/pairs_test.jsonl", text_column="a",
                              text_pair_column="b", max_length=24)
    else:
        write_tsv(project / "data" / "test.tsv", [(100 + i, text, label) for i, (text, label) in enumerate(test)])
        params = micro_params(max_length=24)
    stage.body(params, project, FakeRun())
    out = project / "artifacts" / "classify"
    with mlflow.start_run(experiment_id=mlflow_store) as run:
        version = log_and_register("test-classifier", out, "text-classification", {"params_hash": params.digest()},
                                   {"macro_f1": 0.5}, run_id=run.info.run_id)

    # when MLflow's pipeline classifies the stage's test rows (truncation=True: cut at the saved max_length)
    pipe = mlflow.transformers.load_model(f"models:/test-classifier/{version.version}")
    with (out / "predictions.csv").open(encoding="utf-8") as fh:
        rows = [{"text": r["text"], "text_pair": r.get("text_pair"), "prediction": r["prediction"]}
                for r in csv.DictReader(fh)]
    inputs = [{"text": r["text"], "text_pair": r["text_pair"]} if pair else r["text"] for r in rows]
    labels = LabelMap.from_json((out / "labels.json").read_text()).labels
    served = served_probabilities(pipe, inputs, list(labels), truncation=True)

    # then it predicts every row as the stage did, with the stage's very probabilities
    assert len(rows) == len(test) and LONG in [r["text"] for r in rows]
    assert [labels[i] for i in served.argmax(-1).tolist()] == [r["prediction"] for r in rows]
    expected = stage_probabilities(out, mlm_folder, rows, params.classify.max_length)
    torch.testing.assert_close(served, expected, atol=1e-5, rtol=1e-4)
    # and the comparison has teeth: without [CLS] / [SEP] (the skew this guards against) the scores move
    unframed = served_probabilities(pipe, inputs, list(labels), truncation=True, add_special_tokens=False)
    assert not torch.allclose(unframed, expected, atol=1e-4)

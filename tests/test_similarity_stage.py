"""Stage `similarity`: a micro encoder fine-tuned on sentence pairs ranks paraphrases above unrelated pairs better
than before, reports every figure with ordered intervals, and serves what it scored; bad data writes nothing."""

from __future__ import annotations

import csv
import itertools
import json

import mlflow
import pytest
from conftest import FakeRun
from helpers_tokenizer import make_test_tokenizer
from transformers import AutoModel

import tasks.similarity as stage
from apps.similarity import load_encoder, sentence_similarity
from instructflow.config import validate
from instructflow.errors import DataError, InstructflowError
from models.encoder import encoder_tokenizer
from tasks.registry import log_and_register

# four topics of three sentences each: two sentences of a topic are paraphrases (score 4-5), of two topics
# unrelated (score 0-1); the words overlap across topics as much as within them, so the masked LM cannot tell
TOPICS = [
    ["이 영화 정말 좋아요", "배우들 연기가 최고였어요", "I really liked this movie"],
    ["너무 지루하고 재미없어요", "시간이 아까웠어요", "This film was boring and far too long"],
    ["오늘 날씨가 맑고 기분이 좋다", "The quick brown fox jumps over the lazy dog", "좋아 좋아 정말 좋아"],
    ["음식이 맛있어서 또 가고 싶어요", "A small model trained on a laptop", "싫어 싫어 진짜 싫어"],
]


def sts_pairs() -> list[tuple[str, str, float]]:
    pairs = []
    for t, topic in enumerate(TOPICS):
        pairs += [(a, b, 5.0 - 0.5 * (i % 2)) for i, (a, b) in enumerate(itertools.combinations(topic, 2))]
        other = TOPICS[(t + 1) % len(TOPICS)]
        pairs += [(a, b, 0.5 * (i % 3)) for i, (a, b) in enumerate(zip(topic, other))]
    return pairs  # 4 x (3 paraphrases + 3 unrelated) = 24 pairs


def write_sts(path, pairs, header=("genre", "id", "score", "sentence1", "sentence2")):
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["\t".join(header)] + [f"main\t{i}\t{s}\t{a}\t{b}" for i, (a, b, s) in enumerate(pairs)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture
def project(tmp_path, mlm_folder):
    (tmp_path / "artifacts").mkdir()
    (tmp_path / "artifacts" / "mlm").symlink_to(mlm_folder, target_is_directory=True)
    write_sts(tmp_path / "data" / "train.tsv", sts_pairs())
    write_sts(tmp_path / "data" / "dev.tsv", sts_pairs())
    return tmp_path


def micro_params(**similarity):
    section = {"train_path": "data/train.tsv", "dev_path": "data/dev.tsv", "max_steps": 30, "batch_size": 8,
               "eval_steps": 15, "logging_steps": 5, "lr": 3e-3, "max_length": 32, "bootstrap_resamples": 200,
               "max_train_pairs": None, "max_dev_pairs": None, **similarity}
    return validate({"preset": "micro", "tracks": {"decoder": False, "encoder": True}, "similarity": section})


def ordered_share(rows: list[dict], column: str) -> float:
    """The share of (paraphrase, unrelated) couples of dev pairs whose paraphrase has the higher cosine."""
    para = [float(r[column]) for r in rows if float(r["score"]) >= 4]
    unrelated = [float(r[column]) for r in rows if float(r["score"]) <= 1]
    return sum(p > u for p in para for u in unrelated) / (len(para) * len(unrelated))


def test_trained_embeddings_rank_paraphrases_above_unrelated_pairs_better_than_the_mlm_encoder(project):
    # when the stage fine-tunes the micro encoder with its default objective on 24 scored pairs
    metrics = stage.body(micro_params(), project, FakeRun())

    # then its dev Spearman beats the untrained encoder's, and more paraphrases outrank unrelated pairs
    assert metrics["spearman"] > metrics["mlm_spearman"] + 0.2, metrics
    out = project / "artifacts" / "similarity"
    with (out / "dev_predictions.csv").open(encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 24 and list(rows[0]) == ["sentence1", "sentence2", "score", "embedder_cosine", "mlm_cosine",
                                                  "tfidf_cosine"]
    before, after = ordered_share(rows, "mlm_cosine"), ordered_share(rows, "embedder_cosine")
    assert after > before and after >= 0.9, (before, after)

    # every figure is there, each interval ordered around its estimate
    for key in ("spearman", "mlm_spearman", "tfidf_spearman", "gain_over_tfidf", "gain_over_mlm"):
        assert metrics[f"{key}_ci_low"] <= metrics[key] <= metrics[f"{key}_ci_high"], key
    assert metrics["gain_over_mlm"] == pytest.approx(metrics["spearman"] - metrics["mlm_spearman"], abs=2e-4)
    assert metrics["beats_tfidf"] in (0, 1) and metrics["example_paraphrase_above_unrelated"] in (0, 1)
    assert metrics["beats_tfidf"] == int(metrics["gain_over_tfidf_ci_low"] > 0)
    for name in ("paraphrase", "unrelated", "opposite"):
        assert -1 <= metrics[f"example_{name}"] <= 1 and -1 <= metrics[f"mlm_example_{name}"] <= 1
    assert (metrics["train_pairs"], metrics["train_rows"], metrics["dev_pairs"]) == (24, 24, 24)
    assert metrics["gain.similarity.spearman.all.tfidf_cosine"] == pytest.approx(metrics["gain_over_tfidf"], abs=1e-4)
    assert metrics["beats.similarity.spearman.all.tfidf_cosine"] == metrics["beats_tfidf"]

    # the output: the embedder (a plain BertModel), its tokenizer, the evaluation and the report
    for name in ("model.safetensors", "tokenizer.json", "history.csv", "loss.png", "report.md"):
        assert (out / name).is_file(), name
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["spearman"] == metrics["spearman"] and "tokens_per_sec" not in evaluation
    assert AutoModel.from_pretrained(out).config.architectures == ["BertModel"]
    report = (out / "report.md").read_text()
    assert report.startswith("# Sentence similarity (KorSTS dev)") and f"{metrics['spearman']:.4f}" in report
    assert "eval_spearman" in (out / "history.csv").read_text().splitlines()[0]

    # what `instructflow similarity` computes from the folder is what the stage scored
    encoder = load_encoder(out)
    served = sentence_similarity(rows[0]["sentence1"], rows[0]["sentence2"], source=encoder)
    assert served == pytest.approx(float(rows[0]["embedder_cosine"]), abs=1e-4)


@pytest.mark.parametrize("objective", ["cosent", "in_batch_negatives", "simcse"])
def test_every_objective_trains(project, objective):
    metrics = stage.body(micro_params(objective=objective, max_steps=4, eval_steps=4), project, FakeRun())
    expected_rows = {"cosent": 24, "in_batch_negatives": 2 * 12, "simcse": 12}[objective]
    assert metrics["train_rows"] == expected_rows and metrics["loss"] >= 0


def test_a_bad_score_names_file_line_column_and_writes_nothing(project):
    pairs = sts_pairs()
    pairs[2] = (pairs[2][0], pairs[2][1], 7.5)  # data line 3 is file line 4
    write_sts(project / "data" / "train.tsv", pairs)
    with pytest.raises(DataError) as raised:
        stage.body(micro_params(), project, FakeRun())
    assert str(raised.value).startswith(f"{project / 'data' / 'train.tsv'}, line 4, field 'score'")
    assert "'7.5' is not a number from 0 to 5" in str(raised.value)
    assert not (project / "artifacts" / "similarity").exists()


def test_a_missing_column_is_named(project):
    write_sts(project / "data" / "dev.tsv", sts_pairs(), header=("genre", "id", "score", "sentence1", "second"))
    with pytest.raises(DataError, match="no column 'sentence2'"):
        stage.body(micro_params(), project, FakeRun())


def test_without_a_masked_lm_the_stage_says_which_stage_to_run(project):
    (project / "artifacts" / "mlm").unlink()
    with pytest.raises(InstructflowError, match="run the mlm stage first"):
        stage.body(micro_params(), project, FakeRun())


def test_too_few_positive_pairs_for_in_batch_negatives(project):
    with pytest.raises(InstructflowError, match="at least two"):
        stage.body(micro_params(objective="in_batch_negatives", positive_score=6.0, max_score=10.0), project, FakeRun())


def test_training_rows_per_objective():
    from models.sts import StsPair

    pairs = [StsPair("a", "b", 5.0), StsPair("a", "c", 1.0), StsPair("d", "b", 4.0)]
    assert stage.training_rows(pairs, "cosent", 4.0) == [("a", "b", 5.0), ("a", "c", 1.0), ("d", "b", 4.0)]
    assert stage.training_rows(pairs, "in_batch_negatives", 4.0) == [("a", "b", 5.0), ("d", "b", 4.0),
                                                                     ("b", "a", 5.0), ("b", "d", 4.0)]
    assert [r[:2] for r in stage.training_rows(pairs, "simcse", 4.0)] == [("a", "a"), ("b", "b"), ("c", "c"),
                                                                          ("d", "d")]


def test_the_registered_embedder_serves_the_similarity_the_stage_scored(project, tmp_path, monkeypatch):
    stage.body(micro_params(max_steps=4, eval_steps=4), project, FakeRun())
    out = project / "artifacts" / "similarity"
    expected = sentence_similarity(TOPICS[0][0], TOPICS[0][1], source=out)

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("test")
    try:
        with mlflow.start_run():
            version = log_and_register("test-embedder", out, "feature-extraction", {"git_commit": "x"},
                                       {"spearman": 0.5})
        mlflow.MlflowClient().set_registered_model_alias("test-embedder", "champion", version.version)
        served = sentence_similarity(TOPICS[0][0], TOPICS[0][1], source="models:/test-embedder@champion")
    finally:
        mlflow.set_tracking_uri(None)
    assert served == pytest.approx(expected, abs=1e-5)


# --- register: the embedder joins the encoder and the classifier in one all-or-nothing transaction ----------


def test_register_adds_the_embedder_to_the_encoder_track_all_or_nothing(project, mlm_folder, tmp_path, monkeypatch):
    import shutil

    import yaml
    from mlflow import MlflowClient

    import tasks.register as register_stage
    from models.encoder import build_classifier
    from tasks import registry

    # given: an encoder-track project after mlm, classify and similarity (micro models, their metrics, dvc.lock)
    scored = stage.body(micro_params(max_steps=2, eval_steps=2), project, FakeRun())
    (project / "metrics").mkdir()
    (project / "metrics" / "similarity.json").write_text(json.dumps(scored))  # as run_stage writes it
    shutil.copytree(mlm_folder, project / "artifacts" / "mlm-copy")
    (project / "artifacts" / "mlm").unlink()
    (project / "artifacts" / "mlm-copy").rename(project / "artifacts" / "mlm")
    build_classifier(mlm_folder, 2).save_pretrained(project / "artifacts" / "classify")
    encoder_tokenizer(make_test_tokenizer(), 64).save_pretrained(project / "artifacts" / "classify")
    (project / "metrics" / "classify.json").write_text(json.dumps({"macro_f1": 0.6, "macro_f1_ci_low": 0.5,
                                                                    "macro_f1_ci_high": 0.7}))
    (project / "metrics" / "mlm.json").write_text(json.dumps({"eval_masked_accuracy": 0.1}))
    lock = {"schema": "2.0", "stages": {"prepare": {"cmd": "python -m tasks.prepare", "deps": [
        {"path": "data/raw", "md5": "0a1b2c3d4e5f60718293a4b5c6d7e8f9.dir"}], "outs": []}}}
    (project / "dvc.lock").write_text(yaml.safe_dump(lock))
    params = validate({"preset": "micro", "tracks": {"decoder": False, "encoder": True}})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("register-test")  # in this store (not an experiment another test left active)
    names = ("instructflow-encoder", "instructflow-classifier", "instructflow-embedder")

    def run_register():
        with mlflow.start_run() as active:
            run = FakeRun()
            run.run_id = active.info.run_id
            return register_stage.body(params, project, run)

    try:
        # when the embedder's alias move fails, after the encoder's and the classifier's aliases moved
        move_aliases = registry.move_aliases  # the last step: the other two have moved theirs by then

        def failing(name, *args, **kwargs):
            if name == "instructflow-embedder":
                raise RuntimeError("registry went away")
            return move_aliases(name, *args, **kwargs)

        with monkeypatch.context() as mp:
            mp.setattr(registry, "move_aliases", failing)
            with pytest.raises(RuntimeError, match="registry went away"):
                run_register()
        # then nothing of that run is left: no version of any of the three, no record
        client = MlflowClient()
        assert all(client.search_model_versions(f"name = '{n}'") == [] for n in names)
        assert not (project / "registry").exists()

        # and when it succeeds, each of the three is a champion; the embedder carries its Spearman and interval
        metrics = run_register()
        for name in names:
            assert metrics[f"{name}.version"] == 1 and metrics[f"{name}.promoted"] == 1
        tags = client.get_model_version_by_alias("instructflow-embedder", "champion").tags
        assert {"metric.spearman", "metric.spearman.ci_low", "metric.spearman.ci_high"} <= set(tags)
        assert float(tags["metric.spearman"]) == pytest.approx(scored["spearman"])
    finally:
        mlflow.set_tracking_uri(None)

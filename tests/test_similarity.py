"""apps/similarity.py: cosine similarity and file embeddings from a folder or a registered encoder."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest
import torch
from helpers_tokenizer import make_test_tokenizer
from mlflow.tracking import MlflowClient

from apps.similarity import (
    DEFAULT_SOURCE,
    Encoder,
    embed_file,
    embed_texts,
    load_encoder,
    read_sentences,
    sentence_similarity,
)
from instructflow.errors import DataError, InstructflowError
from models.encoder import build_encoder, encoder_tokenizer
from tasks.registry import log_and_register

HIDDEN = 32


def save_micro_encoder(out, tokenizer):
    torch.manual_seed(0)
    build_encoder(len(tokenizer), tokenizer.pad_token_id, hidden_size=HIDDEN, num_layers=2, num_heads=2,
                  intermediate_size=64, max_position_embeddings=64).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A micro masked LM + tokenizer saved as artifacts/mlm is: the encoder tokenizer, framing its inputs."""
    return save_micro_encoder(tmp_path_factory.mktemp("mlm"), encoder_tokenizer(make_test_tokenizer(), 64))


@pytest.fixture(scope="module")
def encoder(folder):
    return load_encoder(folder)


# --- similarity -----------------------------------------------------------------------------------


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_a_sentence_is_fully_similar_to_itself_from_a_folder(folder, pooling):
    score = sentence_similarity("이 영화 정말 좋아요", "이 영화 정말 좋아요", source=folder, pooling=pooling)
    assert score == pytest.approx(1.0, abs=1e-6) and score <= 1.0


def test_different_sentences_score_a_cosine_below_one(encoder):
    score = sentence_similarity("이 영화 정말 좋아요", "This film was boring and far too long.", source=encoder)
    assert -1.0 <= score < 0.9999


def test_similarity_is_the_cosine_of_the_embeddings(encoder):
    a, b = embed_texts(["좋아 좋아 정말 좋아", "싫어 싫어 진짜 싫어"], encoder, pooling="cls")  # (H,), (H,)
    expected = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    assert sentence_similarity("좋아 좋아 정말 좋아", "싫어 싫어 진짜 싫어", encoder, "cls") == pytest.approx(expected, abs=1e-5)


def test_bad_arguments_are_named(folder, encoder, tmp_path):
    with pytest.raises(InstructflowError, match="pooling = 'max': expected one of mean, cls"):
        sentence_similarity("a", "b", source=encoder, pooling="max")
    with pytest.raises(InstructflowError, match="the second sentence is empty"):
        sentence_similarity("a", "  ", source=encoder)
    with pytest.raises(InstructflowError, match="no such folder"):
        load_encoder(tmp_path / "missing")
    with pytest.raises(InstructflowError, match="neither a Hugging Face model folder"):
        load_encoder(tmp_path)


def test_an_encoder_whose_tokenizer_does_not_frame_its_inputs_is_refused(tmp_path):
    # given an encoder saved with the shared tokenizer (no [CLS] / [SEP] of its own), as older mlm stages did
    old = save_micro_encoder(tmp_path / "old", make_test_tokenizer())

    # then loading it says why and what to do, rather than embedding sentences unlike the training
    with pytest.raises(InstructflowError, match=f"{old}: the tokenizer does not add \\[CLS\\] / \\[SEP\\] itself.*"
                                                "rerun the mlm stage"):
        load_encoder(old)


def test_sentences_are_cut_at_the_length_the_tokenizer_was_saved_with(tmp_path):
    # given an encoder whose tokenizer was saved with max_length 12 (the pretraining seq_len), positions for 64
    short = load_encoder(save_micro_encoder(tmp_path / "short", encoder_tokenizer(make_test_tokenizer(), 12)))
    long_text = "The quick brown fox jumps over the lazy dog. " * 3
    first_ten = short.tokenizer.decode(short.tokenizer(long_text, add_special_tokens=False)["input_ids"][:10])

    # then a long sentence embeds as its first 10 tokens between [CLS] and [SEP]
    assert short.max_length == 12
    np.testing.assert_allclose(embed_texts([long_text], short), embed_texts([first_ten], short), atol=1e-6)


def test_a_registered_encoder_loads_from_its_model_uri(folder, encoder, tmp_path, monkeypatch):
    # given the encoder logged and registered as the register stage does it, in a throwaway store
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    try:
        experiment = mlflow.create_experiment("similarity-tests", artifact_location=(tmp_path / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment) as run:
            version = log_and_register("test-encoder", folder, "feature-extraction", {"params_hash": "x"},
                                       {"macro_f1": 0.5}, run_id=run.info.run_id)
        MlflowClient().set_registered_model_alias("test-encoder", "champion", version.version)

        # when it is loaded by alias
        registered = load_encoder("models:/test-encoder@champion")

        # then it embeds exactly as the folder does
        texts = ["이 영화 정말 좋아요", "너무 지루하고 재미없어요"]
        np.testing.assert_allclose(embed_texts(texts, registered), embed_texts(texts, encoder), atol=1e-5)
        # and MLflow's feature-extraction pipeline (the served encoder) sees [CLS] text [SEP], as `embed` does
        pipe = mlflow.transformers.load_model(f"models:/test-encoder/{version.version}")
        for text, cls_vector in zip(texts, embed_texts(texts, encoder, pooling="cls")):
            states = np.array(pipe(text))[0]  # (T, H) last hidden states
            assert len(states) == len(encoder.tokenizer(text, add_special_tokens=False)["input_ids"]) + 2
            np.testing.assert_allclose(states[0], cls_vector, atol=1e-5)
        with pytest.raises(InstructflowError, match="cannot load an encoder from 'models:/test-encoder@nobody'"):
            load_encoder("models:/test-encoder@nobody")
    finally:
        mlflow.set_tracking_uri(None)


# --- files ----------------------------------------------------------------------------------------


def test_embed_txt_to_jsonl_and_npy(encoder, tmp_path):
    source = tmp_path / "sentences.txt"
    source.write_text("이 영화 정말 좋아요\nThis film was boring.\n좋아 좋아 정말 좋아\n\n", encoding="utf-8")

    assert embed_file(source, tmp_path / "out.jsonl", encoder) == 3
    assert embed_file(source, tmp_path / "out.npy", encoder, pooling="cls") == 3

    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["text"] for r in records] == ["이 영화 정말 좋아요", "This film was boring.", "좋아 좋아 정말 좋아"]
    expected = embed_texts([r["text"] for r in records], encoder)
    np.testing.assert_array_equal(np.array([r["embedding"] for r in records], dtype=np.float32), expected)
    array = np.load(tmp_path / "out.npy")
    assert array.shape == (3, HIDDEN) and array.dtype == np.float32
    np.testing.assert_array_equal(array, embed_texts([r["text"] for r in records], encoder, pooling="cls"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl", "out.npy", "sentences.txt"]  # no temp files


def test_columns_of_csv_tsv_and_jsonl(tmp_path):
    (tmp_path / "a.csv").write_text('id,review\n1,"좋아요, 정말"\n2,싫어요\n', encoding="utf-8")
    (tmp_path / "a.tsv").write_text('id\ttext\n1\t"\n2\t"인용" 뒤에 글\n', encoding="utf-8")  # TSV is unquoted, as NSMC
    (tmp_path / "a.jsonl").write_text('{"text": "하나"}\n\n{"text": "둘"}\n', encoding="utf-8")

    assert read_sentences(tmp_path / "a.csv", "review") == ["좋아요, 정말", "싫어요"]
    assert read_sentences(tmp_path / "a.tsv") == ['"', '"인용" 뒤에 글']
    assert read_sentences(tmp_path / "a.jsonl") == ["하나", "둘"]


@pytest.mark.parametrize(
    ("name", "content", "column", "expected"),
    [
        ("a.txt", "하나\n\n둘\n", None, "a.txt, line 2: empty line"),
        ("a.csv", "id,text\n1,하나\n2,\n", None, "a.csv, line 3, field 'text': text is empty"),
        ("a.csv", "id,review\n1,하나\n", None, "a.csv, line 2, field 'text': no column 'text'; columns found"),
        ("a.jsonl", '{"text": "하나"}\n{"text": 3}\n', None, "a.jsonl, line 2, field 'text': expected text, found 3"),
        ("a.txt", "하나\n", "text", "a.txt: a .txt file holds one sentence per line"),
        ("a.xml", "<a/>", None, "a.xml: unknown extension '.xml'"),
        ("a.txt", "\n\n", None, "a.txt: no sentences to embed"),
    ],
)
def test_bad_input_names_file_line_column_and_writes_nothing(encoder, tmp_path, name, content, column, expected):
    (tmp_path / name).write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=expected):
        embed_file(tmp_path / name, tmp_path / "out.jsonl", encoder, text_column=column)
    assert not (tmp_path / "out.jsonl").exists()


def test_unknown_output_extension_fails_before_reading(encoder, tmp_path):
    with pytest.raises(InstructflowError, match="unknown output extension '.csv'; expected one of .jsonl, .npy"):
        embed_file(tmp_path / "missing.txt", tmp_path / "out.csv", encoder)


def test_a_loaded_encoder_is_passed_through(encoder):
    assert load_encoder(encoder) is encoder and isinstance(encoder, Encoder)
    assert encoder.max_length == 64


# --- the default source: the sentence embedder the similarity stage trained ------------------------


def test_the_default_source_is_the_registered_sentence_embedder():
    assert DEFAULT_SOURCE == "models:/instructflow-embedder@champion"


@pytest.mark.parametrize("command", [["similarity", "영화 정말 재밌어요", "이 영화 최고예요"], ["embed", "in.txt", "out.jsonl"]])
def test_the_cli_embeds_from_the_default_source_unless_told(command, monkeypatch, tmp_path):
    """`instructflow similarity` / `embed` without --source read the registered embedder, not the masked LM."""
    import apps.similarity as similarity_app
    from typer.testing import CliRunner

    from apps.cli import app

    seen = []
    monkeypatch.setattr(similarity_app, "sentence_similarity", lambda a, b, source, pooling: seen.append(source) or 0.5)
    monkeypatch.setattr(similarity_app, "embed_file", lambda i, o, source, pooling, text_column: seen.append(source) or 1)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, [*command, "--root", str(tmp_path)])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, [*command, "--root", str(tmp_path), "--source", "artifacts/mlm"])
    assert result.exit_code == 0, result.output
    assert seen == [DEFAULT_SOURCE, "artifacts/mlm"]

"""Stage `mlm`: chunking, per-batch masking, the chosen-positions loss, and a micro run that must learn."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import FakeRun
from helpers_tokenizer import CORPUS, make_test_tokenizer
from transformers import AutoTokenizer, BertForMaskedLM

import tasks.mlm as stage
from instructflow.config import validate
from instructflow.errors import InstructflowError
from models.encoder import IGNORE_INDEX, encoder_tokenizer
from tasks.mlm import (
    ChosenPositionsMLM,
    MaskingCollate,
    chunk_documents,
    masked_lm_loss,
)


@pytest.fixture(scope="module")
def tok():
    """The encoder's tokenizer at seq_len 32, as the stage makes it: it adds [CLS] / [SEP] itself."""
    return encoder_tokenizer(make_test_tokenizer(), 32)


@pytest.fixture
def project(tmp_path):
    """A project folder holding what the mlm stage reads: the shared tokenizer and the prepared pretraining text."""
    make_test_tokenizer().save_pretrained(tmp_path / "artifacts" / "tokenizer")
    prepared = tmp_path / "data" / "prepared"
    prepared.mkdir(parents=True)
    docs = [" ".join(CORPUS[i:] + CORPUS[:i]) for i in range(len(CORPUS))]  # ~10 documents of ~150 tokens
    (prepared / "pretrain_train.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs * 3))
    (prepared / "pretrain_eval.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:3]))
    return tmp_path


def micro_params(**mlm):
    section = {"seq_len": 32, "batch_size": 8, "max_steps": 6, "logging_steps": 3, "eval_steps": 3, "lr": 3e-3, **mlm}
    return validate({"preset": "micro", "tracks": {"decoder": False, "encoder": True}, "mlm": section})


# --- chunking -------------------------------------------------------------------------------------


def test_long_documents_become_equal_cls_sep_chunks(tok):
    # given a document of 70 tokens and a sequence length of 32 (30 text tokens per chunk)
    text = " ".join(CORPUS)
    ids = tok(text, add_special_tokens=False)["input_ids"][:70]
    text = tok.decode(ids)
    assert tok(text, add_special_tokens=False)["input_ids"] == ids

    # when chunked
    chunks = chunk_documents(tok, [text, ""], seq_len=32)

    # then 3 chunks of 24, 24 and 22 text tokens (no 10-token leftover), each [CLS] ... [SEP], covering it in order
    assert [len(c) - 2 for c in chunks] == [24, 24, 22]
    assert all(c[0] == tok.cls_token_id and c[-1] == tok.sep_token_id for c in chunks)
    assert [i for c in chunks for i in c[1:-1]] == ids


def test_chunks_keep_document_order_across_chunk_sizes(tok):
    # given documents cut into chunks of different sizes (70 tokens: 3 x ~24; short ones: 1 chunk each)
    long_text = tok.decode(tok(" ".join(CORPUS), add_special_tokens=False)["input_ids"][:70])
    texts = [CORPUS[0], long_text, CORPUS[4], long_text[:40]]

    chunks = chunk_documents(tok, texts, seq_len=32)

    # then the chunks follow the documents, and each document's chunks join back into its ids
    whole = [i for t in texts for i in tok(t, add_special_tokens=False)["input_ids"]]
    assert [i for c in chunks for i in c[1:-1]] == whole
    assert max(len(c) for c in chunks) <= 32


def test_chunking_needs_the_encoder_tokenizer():
    # the shared tokenizer adds no [CLS] / [SEP]: chunks cut with it would miss them
    with pytest.raises(ValueError, match="adds \\[CLS\\] / \\[SEP\\] itself"):
        chunk_documents(make_test_tokenizer(), ["좋아"], seq_len=32)


# --- masking --------------------------------------------------------------------------------------


def test_collate_pads_and_never_masks_specials_or_padding(tok):
    rows = [[tok.cls_token_id, *range(300, 340), tok.sep_token_id], [tok.cls_token_id, 301, 302, tok.sep_token_id]]
    batch = MaskingCollate(tok, mlm_probability=0.5, seed=0)(rows)

    assert batch["input_ids"].shape == (2, 42)
    assert batch["attention_mask"][1].tolist() == [1] * 4 + [0] * 38
    assert (batch["input_ids"][1, 4:] == tok.pad_token_id).all()
    assert (batch["labels"][0, [0, 41]] == IGNORE_INDEX).all()
    assert (batch["labels"][1, [0, 3]] == IGNORE_INDEX).all() and (batch["labels"][1, 4:] == IGNORE_INDEX).all()
    chosen = batch["labels"] != IGNORE_INDEX
    original = torch.full((2, 42), tok.pad_token_id)
    original[0], original[1, :4] = torch.tensor(rows[0]), torch.tensor(rows[1])
    assert chosen.any() and torch.equal(batch["labels"][chosen], original[chosen])  # labels: the original ids


def test_masks_are_fresh_every_batch_and_repeat_with_the_seed(tok):
    rows = [[tok.cls_token_id, *range(300, 360), tok.sep_token_id]] * 4
    first, second = MaskingCollate(tok, 0.15, seed=7), MaskingCollate(tok, 0.15, seed=7)
    a1, a2 = first(rows), first(rows)
    b1 = second(rows)

    assert not torch.equal(a1["labels"], a2["labels"])  # dynamic: a new draw per batch
    assert torch.equal(a1["labels"], b1["labels"]) and torch.equal(a1["input_ids"], b1["input_ids"])


# --- loss -----------------------------------------------------------------------------------------


def test_loss_is_log_vocab_for_uniform_logits_and_zero_without_chosen_positions():
    # uniform logits over V=50 at 3 chosen positions: cross-entropy = log 50 each
    assert masked_lm_loss(torch.zeros(3, 50), torch.tensor([1, 2, 3])).item() == pytest.approx(math.log(50))
    # a batch where nothing was chosen: 0, not NaN (which would stop the training loop)
    assert masked_lm_loss(torch.zeros(0, 50), torch.zeros(0, dtype=torch.long)).item() == 0.0


def test_head_runs_on_chosen_positions_only_and_matches_the_full_model(tok):
    torch.manual_seed(0)
    mlm = stage.build_encoder(len(tok), tok.pad_token_id, hidden_size=32, num_layers=1, num_heads=2,
                              intermediate_size=64, max_position_embeddings=64).eval()
    batch = MaskingCollate(tok, 0.3, seed=1)([[tok.cls_token_id, *range(300, 320), tok.sep_token_id]] * 2)

    logits, targets = ChosenPositionsMLM(mlm)(**batch)

    chosen = batch["labels"] != IGNORE_INDEX
    full = mlm(**{k: v for k, v in batch.items() if k != "labels"}).logits  # (B, T, V)
    assert logits.shape == (int(chosen.sum()), len(tok))
    torch.testing.assert_close(logits, full[chosen])
    assert torch.equal(targets, batch["labels"][chosen])


# --- the stage ------------------------------------------------------------------------------------


def test_stage_trains_the_encoder_and_saves_it(project, tok, monkeypatch):
    # given: the encoder the stage builds, with a copy of its initial weights
    initial, build = {}, stage.build_encoder

    def build_and_remember(*args, **kwargs):
        model = build(*args, **kwargs)
        initial.update({k: v.detach().clone() for k, v in model.state_dict().items()})
        return model

    monkeypatch.setattr(stage, "build_encoder", build_and_remember)
    run = FakeRun()

    # when the stage runs on the micro preset
    metrics = stage.body(micro_params(), project, run)

    # then: the metrics it reports, a logged eval every eval_steps, and a saved masked LM whose weights moved
    assert {"loss", "eval_loss", "eval_masked_accuracy", "tokens_per_sec", "n_params"} <= metrics.keys()
    assert all(math.isfinite(v) for v in metrics.values())
    assert 0 <= metrics["eval_masked_accuracy"] <= 1
    assert [step for step, row in run.steps if "eval_loss" in row] == [3, 6]
    out = project / "artifacts" / "mlm"
    for name in ("model.safetensors", "config.json", "tokenizer.json", "history.csv", "loss.png"):
        assert (out / name).is_file(), name
    saved = BertForMaskedLM.from_pretrained(out)
    assert saved.num_parameters() == metrics["n_params"]
    moved = [k for k, v in saved.state_dict().items() if k in initial and not torch.equal(v, initial[k])]
    assert "bert.encoder.layer.0.attention.self.query.weight" in moved
    assert "bert.embeddings.word_embeddings.weight" in moved

    # and its tokenizer frames inputs as pretraining did, cut at seq_len; the shared one (the decoder's) is untouched
    saved_tok = AutoTokenizer.from_pretrained(out)
    ids = saved_tok("좋아", add_special_tokens=False)["input_ids"]
    assert saved_tok("좋아")["input_ids"] == [saved_tok.cls_token_id, *ids, saved_tok.sep_token_id]
    assert saved_tok.model_max_length == 32
    shared = AutoTokenizer.from_pretrained(project / "artifacts" / "tokenizer")
    assert shared("좋아")["input_ids"] == ids


def test_seq_len_beyond_the_position_limit_fails_before_any_work(project):
    with pytest.raises(InstructflowError, match="mlm.seq_len = 256 exceeds mlm.model.max_position_embeddings = 128"):
        stage.body(micro_params(seq_len=256), project, FakeRun())
    assert not (project / "artifacts" / "mlm").exists()

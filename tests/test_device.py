"""Every pass that runs a model feeds it on the model's own device, wherever that is.

This machine has no GPU, so the model is put on PyTorch's "meta" device instead: tensors with shapes and no
data. A meta tensor meets a CPU tensor the way a CUDA tensor does (a device error), so a batch left on the CPU
fails the pass. Reading a meta result back as numbers (.tolist(), float(), `if tensor`) is impossible, so a pass
that keeps everything on the model's device runs up to its first read-back and stops with exactly that error:
every step before it ran on the model's device. (bench/device_check.py does the same checks on a real GPU.)
"""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace

import pytest
import torch
from helpers_tokenizer import make_test_tokenizer

from models.decoder import build_decoder, collate_lm, collate_pairs, lm_eval_loss, lm_step
from models.generate import generate, sequence_logprobs_of
from models.training import LoopSettings, for_inference, model_device, pick_device, to_device, train
from tasks.align import add_reference_logps
from tasks.evaluate import Judge, pair_outcomes
from tasks.reward import pairwise_eval

META = torch.device("meta")
# the two ways PyTorch refuses to read a meta tensor back: the pass got as far as turning results into numbers
READ_BACK = r"Cannot copy out of meta tensor|item\(\) cannot be called on meta tensors"


class MetaModel(torch.nn.Module):
    """A stand-in language model (or, with n_labels, a sequence classifier) whose one parameter is on meta.

    It records the device of every tensor it is called with, and computes its logits from them, so an input on
    another device raises a device error as it would on a GPU. Logits (B, T, V), or (B, n_labels) read at the
    last position.
    """

    def __init__(self, vocab: int = 16, n_labels: int | None = None):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(vocab, device=META))
        self.n_labels = n_labels
        self.seen: list[tuple[str, torch.device]] = []

    def forward(self, input_ids, attention_mask=None, **kwargs):
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, **kwargs}
        tensors = {name: t for name, t in inputs.items() if isinstance(t, torch.Tensor)}
        self.seen += [(name, t.device) for name, t in tensors.items()]
        hidden = input_ids.unsqueeze(-1).float() * self.weight  # (B, T, V)
        for t in tensors.values():
            hidden = hidden + t.unsqueeze(-1)  # (B, T, V): raises unless t is on the weight's device
        logits = hidden[:, -1, : self.n_labels] if self.n_labels else hidden  # (B, n_labels) or (B, T, V)
        return SimpleNamespace(logits=logits)


def runs_on_meta(model: MetaModel, run) -> set[str]:
    """Run a pass against a meta model: it must stop at its first read-back, having handed the model meta
    tensors only. Returns the names of the inputs the model got."""
    with pytest.raises((RuntimeError, NotImplementedError), match=READ_BACK):
        run()
    assert model.seen, "the model was never called"
    assert {device for _, device in model.seen} == {META}, model.seen
    return {name for name, _ in model.seen}


@pytest.fixture(scope="module")
def tok():
    return make_test_tokenizer()


def pairs():
    rows = [{"input_ids": [1, 5, 6, 2], "labels": [-100, -100, 6, 2]}, {"input_ids": [1, 5, 2], "labels": [-100, -100, 2]}]
    return [{"chosen": rows[0], "rejected": rows[1]}, {"chosen": rows[1], "rejected": rows[0]}]


# ------------------------------------------------------------------------------------------ the stand-in itself
def test_the_meta_model_refuses_a_batch_left_on_the_cpu():
    # the test's teeth: what every check below would hit if a pass forgot to move its batch
    model = MetaModel()
    cpu_ids = torch.tensor([[1, 5, 6]])

    with pytest.raises(RuntimeError, match="device"):
        model(input_ids=cpu_ids, attention_mask=torch.ones_like(cpu_ids))
    with pytest.raises(RuntimeError, match="device"):  # half moved is not moved
        model(input_ids=cpu_ids.to(META), attention_mask=torch.ones_like(cpu_ids))


# ------------------------------------------------------------------------------------------ placement helpers
def test_pick_device_is_the_gpu_when_there_is_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device() == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device() == torch.device("cpu")


def test_to_device_moves_tensors_to_the_model_or_a_device_and_leaves_other_values():
    ids = torch.tensor([[1, 2]])
    batch = {"input_ids": ids, "name": "row 0"}

    on_meta = to_device(batch, MetaModel())

    assert on_meta["input_ids"].device == META and on_meta["name"] == "row 0"
    assert to_device(batch, META)["input_ids"].device == META
    assert to_device(batch, torch.device("cpu"))["input_ids"] is ids  # already there: not copied


def test_for_inference_puts_a_model_on_the_picked_device_in_eval_mode():
    model = torch.nn.Linear(2, 2).train()

    placed = for_inference(model)

    assert model_device(placed) == pick_device() and not placed.training


def test_train_feeds_its_steps_on_the_picked_device(tok):
    torch.manual_seed(0)
    model = build_decoder(tok, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
                          max_position_embeddings=32)
    seen = []

    def step(model, batch):
        seen.append({(name, t.device) for name, t in batch.items()} | {("model", model_device(model))})
        return lm_step(model, batch)

    ids = [tok.bos_token_id, 5, 6, tok.eos_token_id]
    train(model, [{"input_ids": ids, "labels": ids}] * 4, partial(collate_lm, pad_id=tok.pad_token_id), step,
          LoopSettings(batch_size=2, max_steps=2, lr=1e-3, bf16=False))

    assert model_device(model) == pick_device()
    assert {device for row in seen for _, device in row} == {pick_device()}


# ------------------------------------------------------------------------------------------ evaluate's passes
def test_perplexity_pass_follows_the_model():
    model = MetaModel()
    batch = {"input_ids": torch.tensor([[1, 5, 6]]), "attention_mask": torch.ones(1, 3, dtype=torch.long),
             "labels": torch.tensor([[-100, 5, 6]])}

    assert runs_on_meta(model, lambda: lm_eval_loss(model, [batch])) == {"input_ids", "attention_mask"}


def test_generation_follows_the_model():
    # without the KV cache: a cache needs a real model's config (bench/device_check.py runs the cached path on a GPU)
    model = MetaModel()

    names = runs_on_meta(model, lambda: generate(model, [[1, 5, 6], [1, 7]], max_new_tokens=3, eos_token_id=2,
                                                 pad_token_id=0, use_cache=False))

    assert names == {"input_ids", "attention_mask", "position_ids"}


def test_kl_log_probs_follow_the_model():
    # the completion labels are built on the model's device too: a CPU label tensor would raise before read-back
    model = MetaModel()

    names = runs_on_meta(model, lambda: sequence_logprobs_of(model, [[1, 5], [1, 6, 7]], [[8, 9], [10]]))

    assert names == {"input_ids", "attention_mask", "position_ids"}


def test_judge_follows_the_reward_model(tok):
    model = MetaModel(vocab=len(tok), n_labels=1)
    judge = Judge(model, tok, max_length=32, batch_size=2)

    names = runs_on_meta(model, lambda: judge([[{"role": "user", "content": "The quick fox"}]], ["jumps"]))

    assert names == {"input_ids", "attention_mask"}


def test_reward_accuracy_follows_the_reward_model():
    model = MetaModel(n_labels=1)

    assert runs_on_meta(model, lambda: pair_outcomes(model, pairs(), pad_id=0, batch_size=2)) \
        == {"input_ids", "attention_mask"}


# ------------------------------------------------------------------------------------------ reward and align
def test_reward_stage_held_out_pass_follows_the_model():
    model = MetaModel(n_labels=1)
    batches = [collate_pairs(pairs(), pad_id=0)]

    assert runs_on_meta(model, lambda: pairwise_eval(model, batches)) == {"input_ids", "attention_mask"}


def test_frozen_reference_pass_follows_the_reference():
    model = MetaModel()

    names = runs_on_meta(model, lambda: add_reference_logps(model, pairs(), partial(collate_pairs, pad_id=0), 2))

    assert names == {"input_ids", "attention_mask"}

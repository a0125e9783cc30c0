"""models/training.py and models/decoder.py: the shared loop learns, schedules, checkpoints and resumes exactly."""

from __future__ import annotations

import json
import logging
import math
from functools import partial
from pathlib import Path

import pytest
import torch
from helpers_tokenizer import CORPUS, make_test_tokenizer

from instructflow.config import load_params
from instructflow.errors import InstructflowError, NonFiniteError
from models.decoder import (
    build_decoder,
    collate_lm,
    lm_eval_loss,
    lm_step,
    pack,
    pad_batch,
    pad_inputs,
    reward_scores,
)
from models.tokenizer import IGNORE_INDEX
from models.training import LoopSettings, train

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


@pytest.fixture(scope="module")
def tok():
    return make_test_tokenizer()


def micro_decoder(tok, seed: int = 0):
    torch.manual_seed(seed)
    return build_decoder(tok, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                         max_position_embeddings=64)


def repeated(tok, copies: int = 8) -> list[dict]:
    """One short sentence, <|bos|> ... <|eos|>, trained on in full: a set the model can memorise."""
    text = "The quick brown fox jumps over the lazy dog."
    ids = [tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"], tok.eos_token_id]
    return [{"input_ids": ids, "labels": ids}] * copies


def settings(**kwargs) -> LoopSettings:
    defaults = dict(batch_size=4, max_steps=30, lr=3e-3, bf16=False, logging_steps=1, warmup_ratio=0.1)
    return LoopSettings(**{**defaults, **kwargs})


def collate(tok):
    return partial(collate_lm, pad_id=tok.pad_token_id)


# ------------------------------------------------------------------------------------------ the loop learns
def test_train_changes_the_weights_and_lowers_the_loss(tok):
    model = micro_decoder(tok)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    history = train(model, repeated(tok), collate(tok), lm_step, settings())

    assert [row["step"] for row in history] == list(range(1, 31))
    first, last = history[0]["loss"], history[-1]["loss"]
    assert first > 5.0  # about ln(400) = 6.0 at random init
    assert last < 0.75 * first  # measured: 6.04 -> 3.76
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert "model.embed_tokens.weight" in changed
    assert any("layers.1.mlp" in k for k in changed)
    assert not model.training  # handed back in eval mode
    assert all(row["tokens_per_sec"] > 0 and math.isfinite(row["grad_norm"]) for row in history)


def test_learning_rate_warms_up_then_follows_a_cosine_to_zero(tok):
    # 10 steps, warmup_ratio 0.2: 2 warmup steps. The lr logged at step s is the one set after s steps:
    # s / 2 * peak while warming up, then peak * 0.5 * (1 + cos(pi * (s - 2) / 8))
    peak = 1e-2
    history = train(micro_decoder(tok), repeated(tok), collate(tok), lm_step,
                    settings(max_steps=10, lr=peak, warmup_ratio=0.2))

    lrs = [row["learning_rate"] for row in history]
    expected = [peak * s / 2 if s < 2 else peak * 0.5 * (1 + math.cos(math.pi * (s - 2) / 8)) for s in range(1, 11)]
    assert lrs == pytest.approx(expected, abs=1e-12)
    assert lrs[0] == pytest.approx(0.005) and lrs[1] == pytest.approx(peak)  # the peak after warmup
    assert lrs[5] == pytest.approx(peak * 0.5)  # halfway through the decay: half the peak
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)


def test_logging_steps_pick_the_rows_and_average_the_window(tok):
    every = [row["loss"] for row in train(micro_decoder(tok), repeated(tok), collate(tok), lm_step,
                                          settings(max_steps=7, logging_steps=1))]

    history = train(micro_decoder(tok), repeated(tok), collate(tok), lm_step,
                    settings(max_steps=7, logging_steps=3))

    assert [row["step"] for row in history] == [1, 3, 6, 7]  # the first, every 3rd, and the last
    # each row is the mean over the steps since the previous row (same seed: the same run)
    windows = [every[0:1], every[1:3], every[3:6], every[6:7]]
    assert [row["loss"] for row in history] == pytest.approx([sum(w) / len(w) for w in windows], rel=1e-6)


# ------------------------------------------------------------------------------------------ checkpoints
def crash_on_call(n: int):
    """A step_fn that dies on its n-th call, like a killed worker (after n - 1 completed steps)."""
    calls = {"n": 0}

    def step_fn(model, batch):
        calls["n"] += 1
        if calls["n"] == n:
            raise RuntimeError("worker killed")
        return lm_step(model, batch)

    return step_fn


def test_a_killed_run_resumes_from_its_last_checkpoint_and_ends_where_an_unbroken_run_ends(tok, tmp_path, caplog):
    # every batch is the same sentence, so data order cannot differ: an exact resume must give the same weights
    data, loop = repeated(tok), settings(max_steps=6, save_steps=2, warmup_ratio=0.2)
    unbroken = micro_decoder(tok)
    unbroken_history = train(unbroken, data, collate(tok), lm_step, loop)

    with pytest.raises(RuntimeError, match="worker killed"):
        train(micro_decoder(tok), data, collate(tok), crash_on_call(5), loop, checkpoint_dir=tmp_path, resume_key="a")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-2", "step-4"]
    meta = json.loads((tmp_path / "step-4" / "loop.json").read_text())
    assert (meta["step"], meta["key"], [row["step"] for row in meta["history"]]) == (4, "a", [1, 2, 3, 4])

    resumed = micro_decoder(tok)
    replayed = []
    with caplog.at_level(logging.INFO, logger="instructflow"):
        history = train(resumed, data, collate(tok), lm_step, loop, checkpoint_dir=tmp_path, resume_key="a",
                        on_log=lambda step, row: replayed.append(step))

    # the whole history, from step 1: the rows before the resume come from the checkpoint (and go to on_log again)
    assert [row["step"] for row in history] == replayed == [1, 2, 3, 4, 5, 6]
    assert [row["loss"] for row in history] == pytest.approx([row["loss"] for row in unbroken_history], abs=1e-6)
    assert any("resumed from" in r.getMessage() and "at step 4" in r.getMessage() for r in caplog.records)
    # weights, optimiser moments and lr schedule all restored (measured: bit-identical; a fresh optimiser state
    # would move the weights by about lr = 3e-3)
    for name, value in unbroken.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=0, atol=1e-6, msg=name)


def test_a_resumed_run_continues_the_data_stream(tok, tmp_path):
    data = [{"input_ids": ids, "labels": ids} for ids in
            ([tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"], tok.eos_token_id]
             for text in CORPUS[:8])]  # 8 different sentences: 2 batches of 4 per epoch, reshuffled every epoch
    loop = settings(max_steps=6, save_steps=2, warmup_ratio=0.2)

    def recording(seen: list, die_on: int | None = None):
        def step_fn(model, batch):
            seen.append(batch["input_ids"][:, 1].tolist())  # each row's first word: which rows the batch holds
            if len(seen) == die_on:
                raise RuntimeError("worker killed")
            return lm_step(model, batch)
        return step_fn

    unbroken, killed, resumed = [], [], []
    train(micro_decoder(tok), data, collate(tok), recording(unbroken), loop)
    with pytest.raises(RuntimeError):
        train(micro_decoder(tok), data, collate(tok), recording(killed, die_on=5), loop,
              checkpoint_dir=tmp_path, resume_key="a")
    train(micro_decoder(tok), data, collate(tok), recording(resumed), loop, checkpoint_dir=tmp_path, resume_key="a")

    assert killed[:4] == unbroken[:4]
    assert resumed == unbroken[4:]  # measured: resumed == unbroken[:2], the first epoch's batches again


def test_checkpoints_keep_the_last_two_and_skip_the_final_step(tok, tmp_path):
    train(micro_decoder(tok), repeated(tok), collate(tok), lm_step, settings(max_steps=7, save_steps=2),
          checkpoint_dir=tmp_path, resume_key="a")

    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-4", "step-6"]


def test_short_run_then_longer_run_resumes_at_the_checkpoint(tok, tmp_path):
    train(micro_decoder(tok), repeated(tok), collate(tok), lm_step, settings(max_steps=4, save_steps=2),
          checkpoint_dir=tmp_path, resume_key="a")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-2"]  # step 4 is the last: not saved

    history = train(micro_decoder(tok), repeated(tok), collate(tok), lm_step, settings(max_steps=6, save_steps=2),
                    checkpoint_dir=tmp_path, resume_key="a")

    assert [row["step"] for row in history] == [1, 2, 3, 4, 5, 6]  # steps 1-2 carried over from the checkpoint


def test_another_resume_key_starts_fresh(tok, tmp_path):
    train(micro_decoder(tok), repeated(tok), collate(tok), lm_step, settings(max_steps=4, save_steps=2),
          checkpoint_dir=tmp_path, resume_key="a")

    history = train(micro_decoder(tok), repeated(tok), collate(tok), lm_step, settings(max_steps=6, save_steps=2),
                    checkpoint_dir=tmp_path, resume_key="b")

    assert history[0]["step"] == 1 and history[-1]["step"] == 6


# ------------------------------------------------------------------------------------------ failures
def test_empty_dataset_raises(tok):
    with pytest.raises(ValueError, match="empty"):
        train(micro_decoder(tok), [], collate(tok), lm_step, settings())


def test_a_nan_loss_stops_training_with_the_step_the_value_and_the_knobs(tok):
    def nan_step(model, batch):
        loss, metrics, n = lm_step(model, batch)
        return loss * float("nan"), metrics, n

    with pytest.raises(NonFiniteError) as caught:
        train(micro_decoder(tok), repeated(tok), collate(tok), nan_step, settings())

    error = caught.value
    assert isinstance(error, InstructflowError)  # the stage runner exits 2 with the message, no traceback
    assert (error.step, error.name) == (1, "loss") and math.isnan(error.value)
    assert str(error) == ("step 1 of 30: the loss is nan (non-finite), so training stopped; it is fed by lr=0.003, "
                          "max_grad_norm=1: lower them (or look for extreme values in the data) and run again")


def test_a_non_finite_metric_or_grad_norm_names_itself_and_the_callers_knobs(tok):
    def step_after(n_ok, metric):
        calls = []

        def step(model, batch):
            loss, metrics, n = lm_step(model, batch)
            calls.append(1)
            return loss, {**metrics, "chosen_reward": metric if len(calls) > n_ok else 0.0}, n
        return step

    with pytest.raises(NonFiniteError, match=r"^step 3 of 30: the chosen_reward is -inf \(non-finite\), so training "
                                             r"stopped; it is fed by my.beta=2, my.lr=0.003: lower them"):
        train(micro_decoder(tok), repeated(tok), collate(tok), step_after(2, float("-inf")),
              settings(knobs="my.beta=2, my.lr=0.003"))

    def inf_grad_step(model, batch):  # a finite loss whose gradient is infinite: d sqrt(x) / dx at x = 0
        loss, metrics, n = lm_step(model, batch)
        weight = next(model.parameters())
        return loss + torch.sqrt(weight - weight.detach()).sum(), metrics, n

    with pytest.raises(NonFiniteError) as caught:
        train(micro_decoder(tok), repeated(tok), collate(tok), inf_grad_step, settings())
    assert caught.value.name == "grad norm" and str(caught.value).startswith("step 1 of 30: the grad norm is ")


def test_align_with_a_huge_beta_stops_naming_beta_not_a_traceback(tok):
    from models.decoder import collate_pairs
    from models.tokenizer import preference_example
    from tasks.align import loop_knobs, make_step

    cfg = load_params(PARAMS, preset="micro", overrides=["align.beta=1e39"]).align
    prompt = [{"role": "user", "content": "The quick brown fox?"}]
    pairs = [{**preference_example(tok, {"prompt": prompt, "chosen": "jumps over the lazy dog.", "rejected": "No."},
                                   64), "ref_chosen_logps": -1.0, "ref_rejected_logps": -2.0}] * 4
    loop = LoopSettings.from_config(cfg, 0, knobs=loop_knobs(cfg), batch_size=2, max_steps=3, bf16=False)

    with pytest.raises(NonFiniteError) as caught:
        train(micro_decoder(tok), pairs, partial(collate_pairs, pad_id=tok.pad_token_id), make_step(cfg), loop)

    assert caught.value.step == 1
    assert f"it is fed by align.beta=1e+39, align.loss_type=sigmoid, align.rpo_alpha=0, align.lr={cfg.lr:g}, align.max_grad_norm=" \
        in str(caught.value)


# ------------------------------------------------------------------------------------------ settings
def test_loop_settings_from_a_stage_config():
    params = load_params(PARAMS, preset="micro")

    pretrain = LoopSettings.from_config(params.pretrain, seed=7)
    sft = LoopSettings.from_config(params.sft, seed=7, max_steps=3)

    assert (pretrain.batch_size, pretrain.max_steps, pretrain.eval_steps) == (8, 12, 4)  # micro preset
    assert pretrain.lr == params.pretrain.lr and pretrain.warmup_ratio == params.pretrain.warmup_ratio
    assert pretrain.save_steps == params.pretrain.save_steps and pretrain.seed == 7
    assert sft.save_steps is None  # SFT has no checkpoints
    assert sft.max_steps == 3  # an explicit extra wins over the config
    assert sft.batch_size == 8 and sft.lr == params.sft.lr and sft.bf16 == params.sft.bf16


# ------------------------------------------------------------------------------------------ data shapes
def test_pack_wraps_documents_and_drops_the_tail():
    blocks = pack([[5, 6], [7, 8, 9], [10]], seq_len=4, bos_id=1, eos_id=2)

    # stream: 1 5 6 2 | 1 7 8 9 | 2 1 10 2 -> three full blocks, nothing left over
    assert blocks.dtype == torch.long
    assert blocks.tolist() == [[1, 5, 6, 2], [1, 7, 8, 9], [2, 1, 10, 2]]
    assert pack([[5, 6], [7]], seq_len=4, bos_id=1, eos_id=2).tolist() == [[1, 5, 6, 2]]  # tail '1 7 2' dropped
    assert pack([[5]], seq_len=4, bos_id=1, eos_id=2).shape == (0, 4)


def test_collate_lm_pads_right_and_masks_the_padding():
    rows = [{"input_ids": [1, 5, 6], "labels": [IGNORE_INDEX, 5, 6]}, {"input_ids": [1], "labels": [1]}]

    batch = collate_lm(rows, pad_id=0)

    assert batch["input_ids"].tolist() == [[1, 5, 6], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 5, 6], [1, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_pad_batch_pads_right_or_left_to_the_longest_row():
    rows = [[5, 6, 7], [8], []]

    assert pad_batch(rows, 0).tolist() == [[5, 6, 7], [8, 0, 0], [0, 0, 0]]
    assert pad_batch(rows, -1, side="left").tolist() == [[5, 6, 7], [-1, -1, 8], [-1, -1, -1]]
    assert pad_batch(rows, 0).dtype == torch.long
    assert pad_batch([[], []], 0).shape == (2, 0)  # all empty: no columns, still (B, T)
    with pytest.raises(ValueError, match="'right' or 'left', got 'middle'"):
        pad_batch(rows, 0, side="middle")


def test_pad_inputs_masks_the_pads_on_either_side():
    right = pad_inputs([[5, 6, 7], [8]], pad_id=0)
    left = pad_inputs([[5, 6, 7], [8]], pad_id=0, side="left", device="cpu")

    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_reward_scores_read_each_row_at_its_last_real_token_whatever_the_padding(tok):
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(0)
    config = micro_decoder(tok).config
    config.num_labels = 1
    model = LlamaForSequenceClassification(config).eval()
    rows = [[tok.bos_token_id, 40, 41, 42, tok.eos_token_id], [tok.bos_token_id, 50, tok.eos_token_id]]

    with torch.no_grad():
        alone = [float(model(input_ids=torch.tensor([r])).logits[0, 0]) for r in rows]  # no padding at all
        right = reward_scores(model, pad_inputs(rows, tok.pad_token_id))
        left = reward_scores(model, pad_inputs(rows, tok.pad_token_id, side="left"))

    assert right.shape == (2,) and right.dtype == torch.float32
    assert right.tolist() == pytest.approx(alone, abs=1e-5)
    assert left.tolist() == pytest.approx(alone, abs=1e-5)
    assert alone[0] != pytest.approx(alone[1], abs=1e-3)  # two different sequences: two different scores


def test_lm_step_counts_non_pad_tokens(tok):
    batch = collate_lm([{"input_ids": [1, 5, 6], "labels": [1, 5, 6]}, {"input_ids": [1], "labels": [1]}], pad_id=0)

    _, _, n_tokens = lm_step(micro_decoder(tok), batch)

    assert n_tokens == 4


class Bigram(torch.nn.Module):
    """Logits at t depend on token t only: after token a, p(a) = 3/4 and p(other) = 1/4 (vocabulary 2)."""

    def __init__(self):
        super().__init__()
        self.table = torch.nn.Parameter(torch.tensor([[math.log(3), 0.0], [0.0, math.log(3)]]))

    def forward(self, input_ids, attention_mask=None):
        return type("Out", (), {"logits": self.table[input_ids]})  # (B, T, V)


def test_lm_eval_loss_is_the_token_weighted_mean_of_next_token_losses():
    # batch 1: 0 0 1 1, all labelled: 0->0 (3/4), 0->1 (1/4), 1->1 (3/4)
    # batch 2: 1 0 <pad>, only position 1 labelled: 1->0 (1/4)
    # mean over the 4 predicted tokens: (2 ln(4/3) + 2 ln 4) / 4 = 0.8370 (a mean of batch means would be 1.020)
    batches = [collate_lm([{"input_ids": [0, 0, 1, 1], "labels": [0, 0, 1, 1]}], pad_id=0),
               collate_lm([{"input_ids": [1, 0], "labels": [IGNORE_INDEX, 0]}, {"input_ids": [1], "labels": [1]}],
                          pad_id=0)]

    loss = lm_eval_loss(Bigram(), batches)

    assert loss == pytest.approx((2 * math.log(4 / 3) + 2 * math.log(4)) / 4)
    assert loss == pytest.approx(0.8370, abs=1e-4)


def test_lm_eval_loss_matches_the_model_loss_on_one_batch(tok):
    model = micro_decoder(tok).eval()
    batch = collate_lm(repeated(tok, copies=2), pad_id=tok.pad_token_id)

    with torch.no_grad():
        expected = float(model(**batch).loss)

    assert lm_eval_loss(model, [batch]) == pytest.approx(expected, rel=1e-5)


def test_lm_eval_loss_without_labels_raises():
    batch = collate_lm([{"input_ids": [0, 1], "labels": [IGNORE_INDEX, IGNORE_INDEX]}], pad_id=0)

    with pytest.raises(ValueError, match="no held-out tokens"):
        lm_eval_loss(Bigram(), [batch])


def test_length_grouped_batches_cover_every_row_once_with_less_padding():
    from accelerate import Accelerator

    from models.training import epoch_batches

    accel = Accelerator(cpu=True)
    lengths = [(i * 37) % 97 + 3 for i in range(400)]  # 400 rows of lengths 3..99
    plain = epoch_batches(400, 8, seed=1, epoch=0, accel=accel)
    grouped = epoch_batches(400, 8, seed=1, epoch=0, accel=accel, lengths=lengths)

    assert sorted(i for b in grouped for i in b) == list(range(400))

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    assert padding(grouped) < padding(plain) / 5
    assert grouped == epoch_batches(400, 8, seed=1, epoch=0, accel=accel, lengths=lengths)  # rebuildable on resume
    assert grouped != epoch_batches(400, 8, seed=1, epoch=1, accel=accel, lengths=lengths)


def test_rows_trained_are_exactly_the_rows_the_loop_draws():
    """align computes reference log-probs only for these rows: the loop must draw no other."""
    from models.training import LoopSettings, rows_trained, train

    drawn: list[int] = []
    data = [{"x": torch.tensor([float(i)]), "i": i} for i in range(37)]

    def collate(rows):
        drawn.extend(r["i"] for r in rows)
        return {"x": torch.stack([r["x"] for r in rows])}

    def step(model, batch):
        return (model(batch["x"]) ** 2).mean(), {}, len(batch["x"])

    lengths = [i % 5 for i in range(37)]
    for max_steps, grad_accum in ((3, 1), (7, 2)):  # inside one epoch; over several (4 batches of 8 per epoch)
        drawn.clear()
        settings = LoopSettings(batch_size=8, max_steps=max_steps, lr=1e-3, grad_accum=grad_accum, seed=5,
                                bf16=False, logging_steps=100)
        train(torch.nn.Linear(1, 1), data, collate, step, settings, lengths=lengths)
        assert rows_trained(37, settings, lengths) == sorted(set(drawn))
        assert len(set(drawn)) < 37 or max_steps * grad_accum >= 4  # a short run leaves rows undrawn


def test_a_stop_signal_saves_a_checkpoint_after_the_step_and_the_rerun_resumes_there(tok, tmp_path, caplog):
    import os
    import signal

    from instructflow import signals

    def sigterm_on_call(n: int):
        calls = {"n": 0}

        def step_fn(model, batch):
            calls["n"] += 1
            if calls["n"] == n:
                os.kill(os.getpid(), signal.SIGTERM)  # a real signal, taken by the handler mid-step
            return lm_step(model, batch)
        return step_fn

    loop = settings(max_steps=6, save_steps=4)
    try:
        with signals.handling(), pytest.raises(signals.Interrupted) as stopped, \
                caplog.at_level(logging.INFO, logger="instructflow"):
            train(micro_decoder(tok), repeated(tok), collate(tok), sigterm_on_call(3), loop, checkpoint_dir=tmp_path,
                  resume_key="a")
    finally:
        signals.reset()  # this process goes on: forget the stop (and call off its escalation timer)
    assert stopped.value.exit_code == 143
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-3"]  # the step in flight was finished, then saved
    assert any("stopped by SIGTERM after step 3/6" in r.getMessage() for r in caplog.records)

    history = train(micro_decoder(tok), repeated(tok), collate(tok), lm_step, loop, checkpoint_dir=tmp_path,
                    resume_key="a")
    assert [row["step"] for row in history] == [1, 2, 3, 4, 5, 6]


def test_a_stage_resumes_only_on_the_same_params_and_input_bytes_and_drops_its_checkpoints_once_saved(tmp_path):
    from conftest import FakeRun

    from tasks.runtime import resumable, stage_output

    params = load_params(PARAMS, preset="micro")
    model_dir, data = tmp_path / "artifacts" / "sft", tmp_path / "data" / "prepared"
    model_dir.mkdir(parents=True), data.mkdir(parents=True)
    (model_dir / "model.safetensors").write_bytes(b"weights")
    (data / "preference_train.jsonl").write_text('{"a": 1}\n')
    first = resumable(tmp_path, "reward", params, model_dir, data)
    assert first["checkpoint_dir"] == tmp_path / "checkpoints" / "reward"
    assert resumable(tmp_path, "reward", params, model_dir, data) == first  # same inputs: resumes
    (data / "preference_train.jsonl").write_text('{"a": 2}\n')  # the data changed: a new key, no resume
    changed = resumable(tmp_path, "reward", params, model_dir, data)["resume_key"]
    assert changed != first["resume_key"]
    other = load_params(PARAMS, preset="micro", overrides=["reward.lr=0.5"])
    assert resumable(tmp_path, "reward", other, model_dir, data)["resume_key"] != changed  # other params

    (tmp_path / "checkpoints" / "reward" / "step-4").mkdir(parents=True)  # left by a stopped run
    (tmp_path / "checkpoints" / "align" / "step-2").mkdir(parents=True)
    with stage_output(tmp_path, "reward", FakeRun()) as out:
        (out / "config.json").write_text("{}")
    assert not (tmp_path / "checkpoints" / "reward").exists()  # the stage's output is in place: no resume
    assert (tmp_path / "checkpoints" / "align" / "step-2").is_dir()  # another stage's are its own


@pytest.mark.parametrize("reset", [False, True])
def test_the_escalation_of_a_stop_kills_its_children_unless_the_process_went_on(reset):
    # a stop's grace timer SIGKILLs the children still running when it fires; once the process has handled the stop
    # and goes on (signals.reset), the timer is called off: a child started later is not the stop's to kill
    import signal
    import subprocess
    import time

    from instructflow import signals

    signals._received = signal.SIGTERM  # as the handler records a stop
    signals._escalate_after(0.3)
    if reset:
        signals.reset()
    child = subprocess.Popen(["sleep", "10"], start_new_session=True)
    with signals._lock:
        signals._children[child.pid] = signal.SIGINT
    try:
        time.sleep(1.0)
        assert (child.poll() is None) is reset
    finally:
        with signals._lock:
            signals._children.pop(child.pid, None)
        signals.reset()
        child.kill()
        child.wait()

"""Losses against numbers worked by hand."""

import math

import pytest
import torch

from models.losses import bradley_terry_loss, dpo_loss, masked_mean, sequence_logprobs


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


# ---- sequence_logprobs -------------------------------------------------------------


def test_sequence_logprobs_uniform_logits_give_log_quarter_per_token():
    # given uniform logits over V=4: every token has log p = log(1/4) = -1.386294...
    # labels (B=2, T=4); position 0 is never scored (nothing predicts it); -100 is skipped
    logits = torch.zeros(2, 4, 4)
    labels = torch.tensor([[3, 1, 2, 0], [-100, -100, 2, -100]])
    # when
    sum_logps, n_tokens = sequence_logprobs(logits, labels)
    # then row 0 scores labels 1, 2, 0 -> 3 * log(1/4); row 1 scores label 2 only -> log(1/4)
    assert n_tokens.tolist() == [3, 1]
    assert sum_logps.tolist() == pytest.approx([3 * math.log(0.25), math.log(0.25)])


def test_sequence_logprobs_shift_logits_at_t_score_label_at_t_plus_1():
    # given V=2, T=3. logits[0, 0] = [0, log 3] -> p = [1/4, 3/4]; logits[0, 1] = [log 4, 0] -> p = [4/5, 1/5]
    # logits[0, 2] is the prediction after the last token and must be ignored (make it extreme)
    logits = torch.tensor([[[0.0, math.log(3)], [math.log(4), 0.0], [100.0, -100.0]]])
    labels = torch.tensor([[0, 1, 1]])
    # when
    sum_logps, n_tokens = sequence_logprobs(logits, labels)
    # then label[1] = 1 scored by logits[0] -> log 3/4; label[2] = 1 scored by logits[1] -> log 1/5
    assert n_tokens.item() == 2
    assert sum_logps.item() == pytest.approx(math.log(3 / 4) + math.log(1 / 5))


def test_sequence_logprobs_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"\(2, 5\)"):
        sequence_logprobs(torch.zeros(2, 4, 3), torch.zeros(2, 5, dtype=torch.long))


def test_masked_mean_ignores_masked_values():
    values = t(1.0, 2.0, 100.0)
    mask = torch.tensor([True, True, False])
    assert masked_mean(values, mask).item() == pytest.approx(1.5)
    # all-masked row gives 0 rather than NaN
    rows = torch.tensor([[1.0, 3.0], [5.0, 7.0]])
    assert masked_mean(rows, torch.tensor([[1, 1], [0, 0]]), dim=1).tolist() == [2.0, 0.0]


# ---- dpo_loss ----------------------------------------------------------------------

# policy chosen -1, rejected -3, ref chosen -2, ref rejected -2, beta 0.1:
# chosen log-ratio  = -1 - (-2) = 1
# rejected log-ratio = -3 - (-2) = -1
# h = 1 - (-1) = 2
PC, PR, RC, RR, BETA = -1.0, -3.0, -2.0, -2.0, 0.1


def test_dpo_sigmoid_hand_worked():
    loss, chosen_rewards, rejected_rewards = dpo_loss(t(PC), t(PR), t(RC), t(RR), beta=BETA)
    # -log sigmoid(0.1 * 2) = log(1 + e^-0.2) = log(1.818730753...) = 0.598138869...
    assert loss.item() == pytest.approx(0.5981388693, abs=1e-9)
    # rewards = beta * (policy - ref): 0.1 * 1 and 0.1 * -1
    assert chosen_rewards.tolist() == pytest.approx([0.1])
    assert rejected_rewards.tolist() == pytest.approx([-0.1])


def test_dpo_ipo_hand_worked():
    # (h - 1 / (2 * beta))^2 = (2 - 5)^2 = 9
    loss, chosen_rewards, _ = dpo_loss(t(PC), t(PR), t(RC), t(RR), beta=BETA, loss_type="ipo")
    assert loss.item() == pytest.approx(9.0)
    assert chosen_rewards.tolist() == pytest.approx([0.1])


def test_dpo_ipo_with_lengths_averages_log_ratios_per_token():
    # chosen has 2 tokens, rejected 4: per-token log-ratios 1/2 and -1/4
    # h = 0.5 - (-0.25) = 0.75; (0.75 - 5)^2 = 4.25^2 = 18.0625
    loss, chosen_rewards, rejected_rewards = dpo_loss(
        t(PC), t(PR), t(RC), t(RR), beta=BETA, loss_type="ipo", chosen_lengths=t(2.0), rejected_lengths=t(4.0)
    )
    assert loss.item() == pytest.approx(18.0625)
    # rewards stay on summed log-probs
    assert chosen_rewards.tolist() == pytest.approx([0.1])
    assert rejected_rewards.tolist() == pytest.approx([-0.1])


def test_dpo_sigmoid_batch_is_the_mean():
    # row 0 is the hand-worked pair (h = 2); row 1 has equal policy and ref (h = 0)
    # losses: log(1 + e^-0.2) = 0.598138869, log 2 = 0.693147181; mean = 0.645643025
    loss, chosen_rewards, rejected_rewards = dpo_loss(
        t(PC, -5.0), t(PR, -5.0), t(RC, -5.0), t(RR, -5.0), beta=BETA
    )
    assert loss.item() == pytest.approx((0.5981388693 + math.log(2)) / 2, abs=1e-9)
    assert chosen_rewards.tolist() == pytest.approx([0.1, 0.0])
    assert rejected_rewards.tolist() == pytest.approx([-0.1, 0.0])


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    # d loss / d pi_c = -beta * sigmoid(-beta h) < 0: raising the chosen log-prob lowers the loss
    pc = t(PC).requires_grad_()
    pr = t(PR).requires_grad_()
    loss, chosen_rewards, _ = dpo_loss(pc, pr, t(RC), t(RR), beta=BETA)
    loss.backward()
    expected = BETA * torch.sigmoid(torch.tensor(-0.2, dtype=torch.float64)).item()  # 0.1 * 0.450166 = 0.0450166
    assert pc.grad.item() == pytest.approx(-expected)
    assert pr.grad.item() == pytest.approx(expected)
    assert not chosen_rewards.requires_grad


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"loss_type": "hinge"}, "'hinge'"),
        ({"beta": 0.0}, "beta must be > 0, got 0.0"),
        ({"beta": -1}, "got -1"),
        ({"chosen_lengths": t(2.0), "rejected_lengths": t(2.0)}, "'ipo' only, got 'sigmoid'"),
        ({"loss_type": "ipo", "chosen_lengths": t(2.0)}, "both chosen_lengths and rejected_lengths"),
        ({"loss_type": "ipo", "chosen_lengths": t(0.0), "rejected_lengths": t(2.0)}, r"chosen_lengths must all be > 0"),
    ],
)
def test_dpo_bad_arguments_name_the_value(kwargs, message):
    args = {"beta": BETA, **kwargs}
    with pytest.raises(ValueError, match=message):
        dpo_loss(t(PC), t(PR), t(RC), t(RR), **args)


# ---- bradley_terry_loss ------------------------------------------------------------


def test_bradley_terry_hand_worked():
    # -log sigmoid(2 - 0) = log(1 + e^-2) = log(1.135335283) = 0.126928011
    assert bradley_terry_loss(t(2.0), t(0.0)).item() == pytest.approx(0.1269280110, abs=1e-9)


def test_bradley_terry_margin_and_mean():
    # margin 2 turns r_c - r_r = 2 into 0 -> log 2; second pair 0 - 2 - 0 = -2 -> log(1 + e^2) = 2.126928011
    loss = bradley_terry_loss(t(2.0, 0.0), t(0.0, 2.0), margin=t(2.0, 0.0))
    assert loss.item() == pytest.approx((math.log(2) + 2.1269280110) / 2, abs=1e-9)


def test_bradley_terry_gradient_pushes_rewards_apart():
    rc, rr = t(2.0).requires_grad_(), t(0.0).requires_grad_()
    bradley_terry_loss(rc, rr).backward()
    # d/d r_c = -sigmoid(-2) = -0.119202922
    assert rc.grad.item() == pytest.approx(-0.1192029220)
    assert rr.grad.item() == pytest.approx(0.1192029220)

"""Losses against numbers worked by hand."""

import math
import re

import pytest
import torch

from models.losses import (
    chosen_nll,
    bradley_terry_loss,
    cosent_loss,
    cosine_similarity_loss,
    dpo_loss,
    in_batch_negatives_loss,
    kto_loss,
    kto_reference_point,
    kwise_loss,
    masked_mean,
    sequence_logprobs,
)


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


# ---- kto_loss ----------------------------------------------------------------------

# Three rows, beta 0.5: policy [-1, -3, -2], ref [-2, -2, -2] -> log-ratios r = [1, -1, 0];
# labels [desirable, undesirable, desirable].
# KL pairs: policy [-4.0, -5.0, -6.0], ref [-4.5, -5.1, -6.3] -> diffs [0.5, 0.1, 0.3], z = mean = 0.3 (> 0, kept)
KTO_PI, KTO_REF = (-1.0, -3.0, -2.0), (-2.0, -2.0, -2.0)
KTO_PI_KL, KTO_REF_KL = (-4.0, -5.0, -6.0), (-4.5, -5.1, -6.3)
KTO_DESIRABLE = torch.tensor([True, False, True])
KTO_BETA = 0.5
# row 0 (desirable):   1 - sigmoid(0.5 * (1 - 0.3))    = 1 - sigmoid(0.35)  = 1 - 0.586617579 = 0.413382421
# row 1 (undesirable): 1 - sigmoid(0.5 * (0.3 - (-1))) = 1 - sigmoid(0.65)  = 1 - 0.657010463 = 0.342989537
# row 2 (desirable):   1 - sigmoid(0.5 * (0 - 0.3))    = 1 - sigmoid(-0.15) = 1 - 0.462570155 = 0.537429845
KTO_ROWS = (0.41338242108, 0.34298953733, 0.53742984534)


def kto(pi=KTO_PI, ref=KTO_REF, pi_kl=KTO_PI_KL, ref_kl=KTO_REF_KL, desirable=KTO_DESIRABLE, **kwargs):
    return kto_loss(t(*pi) if isinstance(pi, tuple) else pi, t(*ref), t(*pi_kl) if isinstance(pi_kl, tuple) else pi_kl,
                    t(*ref_kl), desirable, **{"beta": KTO_BETA, **kwargs})


def test_kto_hand_worked():
    loss, rewards = kto()
    # mean of the three rows: (0.413382421 + 0.342989537 + 0.537429845) / 3 = 0.431267268
    assert loss.item() == pytest.approx(sum(KTO_ROWS) / 3, abs=1e-9)
    assert loss.item() == pytest.approx(0.4312672679, abs=1e-9)
    # rewards = beta * (pi - ref) = 0.5 * [1, -1, 0], detached
    assert rewards.tolist() == pytest.approx([0.5, -0.5, 0.0])
    assert not rewards.requires_grad


def test_kto_weights_scale_each_kind_and_the_mean_is_over_all_rows():
    loss, _ = kto(desirable_weight=2.0, undesirable_weight=0.5)
    # (2 * 0.413382421 + 0.5 * 0.342989537 + 2 * 0.537429845) / 3 = (0.826764842 + 0.171494769 + 1.074859691) / 3
    #   = 0.691039767
    assert loss.item() == pytest.approx(0.6910397672, abs=1e-9)
    # an undesirable weight of 0: the undesirable row adds 0 but still counts in the mean
    loss, _ = kto(undesirable_weight=0.0)
    assert loss.item() == pytest.approx((KTO_ROWS[0] + KTO_ROWS[2]) / 3, abs=1e-9)


def test_kto_reference_point_is_clamped_at_zero():
    # KL diffs [0.5, 0.0, -1.7]: mean -0.4 -> z = max(0, -0.4) = 0
    ref_kl = (-4.5, -5.0, -4.3)
    assert kto_reference_point(t(*KTO_PI_KL), t(*ref_kl)).item() == 0.0
    loss, _ = kto(ref_kl=ref_kl)
    # z = 0: row 0 1 - sigmoid(0.5 * 1) = 0.377540669; row 1 1 - sigmoid(0.5 * (0 - (-1))) = 0.377540669;
    # row 2 1 - sigmoid(0) = 0.5; mean = 1.255081337 / 3 = 0.418360446 (with z = -0.4 unclamped it would be
    # 1 - sigmoid(0.7), 1 - sigmoid(0.3), 1 - sigmoid(0.2) = 0.331812228, 0.425557483, 0.450166003: mean 0.402511905)
    assert loss.item() == pytest.approx(0.4183604459, abs=1e-9)


def test_kto_reference_point_carries_no_gradient():
    for ref_kl in (KTO_REF_KL, (-4.5, -5.0, -4.3)):  # z = 0.3 (kept) and z clamped to 0
        pi = t(*KTO_PI).requires_grad_()
        pi_kl = t(*KTO_PI_KL).requires_grad_()
        loss, _ = kto(pi=pi, pi_kl=pi_kl, ref_kl=ref_kl)
        grad_pi, grad_kl = torch.autograd.grad(loss, (pi, pi_kl), allow_unused=True)
        assert grad_kl is None  # the KL pairs only set z, and z is detached
        assert grad_pi is not None
    assert not kto_reference_point(pi_kl, t(*KTO_REF_KL)).requires_grad


def test_kto_gradient_raises_desirable_and_lowers_undesirable():
    # d/dr (1 - sigmoid(beta (r - z))) / B = -beta s (1 - s) / B, s = sigmoid(beta (r - z)):
    #   row 0: -0.5 * 0.242497395 / 3 = -0.040416233; row 2: -0.5 * 0.248599007 / 3 = -0.041433168
    # d/dr (1 - sigmoid(beta (z - r))) / B = +beta s (1 - s) / B, s = sigmoid(0.65): +0.5 * 0.225347715 / 3 = 0.037557952
    pi = t(*KTO_PI).requires_grad_()
    loss, _ = kto(pi=pi)
    loss.backward()
    assert pi.grad.tolist() == pytest.approx([-0.0404162325, 0.0375579524, -0.0414331678], abs=1e-9)


@pytest.mark.parametrize("kind", [True, False])
def test_kto_a_batch_of_one_kind_only(kind):
    # all desirable: rows 0..2 as desirable with z = 0.3: 1 - sigmoid(0.5 * (r - 0.3)) for r = 1, -1, 0
    #   = 1 - sigmoid(0.35), 1 - sigmoid(-0.65), 1 - sigmoid(-0.15) = 0.413382421, 0.657010463, 0.537429845
    # all undesirable: 1 - sigmoid(0.5 * (0.3 - r)) = 1 - sigmoid(-0.35), 1 - sigmoid(0.65), 1 - sigmoid(0.15)
    #   = 0.586617579, 0.342989537, 0.462570155
    expected = (0.41338242108, 0.65701046267, 0.53742984534) if kind else (0.58661757892, 0.34298953733,
                                                                             0.46257015466)
    loss, rewards = kto(desirable=torch.tensor([kind] * 3), desirable_weight=1.0, undesirable_weight=1.0)
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(sum(expected) / 3, abs=1e-9)
    assert rewards.tolist() == pytest.approx([0.5, -0.5, 0.0])


def test_kto_policy_equal_to_reference_gives_one_half_per_row():
    # r = 0 and z = max(0, 0) = 0: every row 1 - sigmoid(0) = 0.5, whatever beta and the labels
    same = t(-3.0, -7.0)
    loss, rewards = kto_loss(same, same, t(-2.0, -9.0), t(-2.0, -9.0), torch.tensor([True, False]), beta=0.1)
    assert loss.item() == 0.5
    assert rewards.tolist() == [0.0, 0.0]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"beta": 0.0}, "beta must be > 0, got 0.0"),
        ({"beta": -1}, "got -1"),
        ({"desirable_weight": -0.5}, "desirable_weight=-0.5"),
        ({"undesirable_weight": -1.0}, "undesirable_weight=-1.0"),
        ({"ref": (-2.0, -2.0)}, r"\(3,\), \(2,\) and \(3,\)"),
        ({"desirable": torch.tensor([True, False])}, r"\(3,\), \(3,\) and \(2,\)"),
        ({"desirable": torch.tensor([1, 0, 1])}, "bool"),
        ({"ref_kl": (-4.5, -5.1)}, r"\(3,\) and \(2,\)"),
    ],
)
def test_kto_bad_arguments_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        kto(**kwargs)


def test_kto_needs_a_row_and_a_kl_pair():
    with pytest.raises(ValueError, match="non-empty"):
        kto_loss(t(), t(), t(1.0), t(1.0), torch.tensor([], dtype=torch.bool), beta=0.1)
    with pytest.raises(ValueError, match="non-empty"):
        kto_loss(t(1.0), t(1.0), t(), t(), torch.tensor([True]), beta=0.1)


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


# ---- kwise_loss ---------------------------------------------------------------------


def pairs_of(*pairs):
    return torch.tensor(pairs, dtype=torch.long).view(-1, 2)


def groups_of(*groups):
    return torch.tensor(groups, dtype=torch.long)


def test_kwise_one_ranking_of_three_is_the_mean_over_its_three_pairs():
    # scores [2, 1, 0], best first -> pairs (0,1), (0,2), (1,2) with margins 1, 2, 1
    # softplus(-1) = log(1 + e^-1) = log(1.367879441) = 0.313261688; softplus(-2) = 0.126928011
    # mean: (0.313261688 + 0.126928011 + 0.313261688) / 3 = 0.753451387 / 3 = 0.251150462
    loss = kwise_loss(t(2.0, 1.0, 0.0), pairs_of((0, 1), (0, 2), (1, 2)), groups_of(0, 0, 0))
    assert loss.item() == pytest.approx(0.2511504620, abs=1e-9)


def test_kwise_weights_each_ranking_once_not_each_pair():
    # group 0: the K = 3 ranking above, 0.251150462; group 1: K = 2, rows 3 and 4 both score 0 -> log 2 = 0.693147181
    # per group: (0.251150462 + 0.693147181) / 2 = 0.472148821 (per pair it would be 1.446598568 / 4 = 0.361649642)
    loss = kwise_loss(t(2.0, 1.0, 0.0, 0.0, 0.0), pairs_of((0, 1), (0, 2), (1, 2), (3, 4)), groups_of(0, 0, 0, 1))
    assert loss.item() == pytest.approx(0.4721488213, abs=1e-9)


def test_kwise_with_one_pair_per_group_is_bradley_terry():
    chosen, rejected = t(2.0, -1.0, 0.5), t(0.0, 1.0, 0.5)
    scores = torch.cat([chosen, rejected])  # rows 0..2 chosen, 3..5 rejected
    loss = kwise_loss(scores, pairs_of((0, 3), (1, 4), (2, 5)), groups_of(0, 1, 2))
    assert loss.item() == pytest.approx(bradley_terry_loss(chosen, rejected).item(), abs=1e-12)


def test_kwise_gradient_of_a_response_sums_over_its_pairs_weighted_per_group():
    # one group, scores [2, 1, 0]: d/ds0 = (-sigmoid(-1) - sigmoid(-2)) / 3 = (-0.268941421 - 0.119202922) / 3
    scores = t(2.0, 1.0, 0.0).requires_grad_()
    kwise_loss(scores, pairs_of((0, 1), (0, 2), (1, 2)), groups_of(0, 0, 0)).backward()
    assert scores.grad[0].item() == pytest.approx(-0.1293814477, abs=1e-9)
    # the middle response is worse in (0,1), better in (1,2), with equal margins: its gradient cancels
    assert scores.grad[1].item() == pytest.approx(0.0, abs=1e-12)
    assert scores.grad.sum().item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("pairs,groups,message", [
    (pairs_of((0, 1)), groups_of(1), "groups [0] have no pair"),
    (pairs_of((0, 1)), groups_of(0, 0), "pairs (P, 2) and group_of_pair (P,)"),
    (pairs_of(), groups_of(), "at least one pair"),
])
def test_kwise_bad_arguments_say_what_is_wrong(pairs, groups, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        kwise_loss(t(1.0, 0.0), pairs, groups)


# ---- sentence-embedding losses ---------------------------------------------------------------------


def test_cosine_similarity_loss_regresses_cosine_on_score_over_five():
    # pair 1: cosine 0.8, score 5 -> target 1.0, error 0.2; pair 2: cosine 0.2, score 0 -> target 0, error 0.2
    # mean of 0.2^2 and 0.2^2 = 0.04
    assert cosine_similarity_loss(t(0.8, 0.2), t(5.0, 0.0)).item() == pytest.approx(0.04)
    # on a 0-1 scale the same pairs need max_score 1
    assert cosine_similarity_loss(t(0.8, 0.2), t(1.0, 0.0), max_score=1.0).item() == pytest.approx(0.04)


def test_cosent_sums_every_pair_of_pairs_ranked_by_score():
    # scores 5 > 3 > 0, cosines 0.9, 0.5, 0.1 (right order), scale 1: the three ranked couples add
    # exp(0.5 - 0.9) + exp(0.1 - 0.9) + exp(0.1 - 0.5) = e^-0.4 + e^-0.8 + e^-0.4 inside log(1 + ...)
    expected = math.log(1 + 2 * math.exp(-0.4) + math.exp(-0.8))  # = 1.02604...
    assert cosent_loss(t(0.9, 0.5, 0.1), t(5.0, 3.0, 0.0), scale=1.0).item() == pytest.approx(expected)
    assert expected == pytest.approx(1.02604, abs=1e-5)
    # only the order of the scores counts
    assert cosent_loss(t(0.9, 0.5, 0.1), t(4.0, 1.0, 0.5), scale=1.0).item() == pytest.approx(expected)


def test_cosent_ignores_ties_and_punishes_a_wrong_order():
    # scores 5, 5, 0: the tied couple adds nothing; (0, 2) adds e^(0.1-0.9), (1, 2) adds e^(0.1-0.5)
    tied = cosent_loss(t(0.9, 0.5, 0.1), t(5.0, 5.0, 0.0), scale=1.0).item()
    assert tied == pytest.approx(math.log(1 + math.exp(-0.8) + math.exp(-0.4)))
    # the score-5 pair has the lower cosine: log(1 + e^(20 * 0.8)) = log(1 + e^16), about 16
    assert cosent_loss(t(0.1, 0.9), t(5.0, 0.0)).item() == pytest.approx(math.log1p(math.exp(16.0)))
    # all scores equal: nothing to rank, loss log(1) = 0
    assert cosent_loss(t(0.3, 0.7), t(2.0, 2.0)).item() == 0.0


def test_in_batch_negatives_is_cross_entropy_over_the_batch_cosines():
    # anchors (1, 0), (0, 2) and positives (3, 0), (1, 1): cosines [[1, 1/sqrt2], [0, 1/sqrt2]], scale 1
    # row 1 must pick column 1: -log(e^1 / (e^1 + e^0.7071)) = log(1 + e^(0.7071 - 1))
    # row 2 must pick column 2: -log(e^0.7071 / (e^0 + e^0.7071)) = log(1 + e^(-0.7071))
    r = 1 / math.sqrt(2)
    expected = (math.log1p(math.exp(r - 1)) + math.log1p(math.exp(-r))) / 2  # = (0.5574 + 0.4009) / 2 = 0.4791...
    loss = in_batch_negatives_loss(t(1.0, 0.0, 0.0, 2.0).view(2, 2), t(3.0, 0.0, 1.0, 1.0).view(2, 2), scale=1.0)
    assert loss.item() == pytest.approx(expected)
    assert expected == pytest.approx(0.47911, abs=1e-5)


def test_sentence_losses_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        cosine_similarity_loss(t(0.1, 0.2), t(1.0))
    with pytest.raises(ValueError, match=r"\(B,\)"):
        cosent_loss(t(0.1, 0.2), t(1.0))
    with pytest.raises(ValueError, match=r"\(B, H\)"):
        in_batch_negatives_loss(torch.zeros(2, 3), torch.zeros(3, 3))


# ---- chosen_nll (RPO's NLL term) -------------------------------------------------------

def test_chosen_nll_is_the_token_mean_over_the_batch_hand_worked():
    # two chosen responses: 1 token at log-prob -2, and 3 tokens summing to -4: (2 + 4) / (1 + 3) = 1.5
    assert float(chosen_nll(torch.tensor([-2.0, -4.0]), torch.tensor([1.0, 3.0]))) == pytest.approx(1.5)


def test_chosen_nll_needs_a_token():
    with pytest.raises(ValueError, match="at least one chosen token"):
        chosen_nll(torch.tensor([0.0]), torch.tensor([0.0]))


def test_align_step_with_rpo_alpha_adds_exactly_alpha_times_the_chosen_nll():
    from types import SimpleNamespace

    from tasks.align import make_step

    class Bigram(torch.nn.Module):  # logits from the current token alone: enough to give every label a log-prob
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.table = torch.nn.Embedding(7, 7)

        def forward(self, input_ids, attention_mask=None):
            return SimpleNamespace(logits=self.table(input_ids))

    ids = torch.tensor([[1, 2, 3, 4], [1, 2, 5, 0], [1, 2, 6, 4], [1, 2, 3, 0]])  # chosen x2, rejected x2
    labels = torch.tensor([[-100, -100, 3, 4], [-100, -100, 5, -100], [-100, -100, 6, 4], [-100, -100, 3, -100]])
    batch = {"input_ids": ids, "attention_mask": (labels != -100) | (ids != 0), "labels": labels,
             "ref_chosen_logps": torch.tensor([-3.0, -2.0]), "ref_rejected_logps": torch.tensor([-3.0, -2.0])}
    model = Bigram()
    cfg = dict(loss_type="sigmoid", beta=0.1)
    plain, metrics, _ = make_step(SimpleNamespace(rpo_alpha=0.0, **cfg))(model, batch)
    rpo, rpo_metrics, _ = make_step(SimpleNamespace(rpo_alpha=0.5, **cfg))(model, batch)
    logps, n = sequence_logprobs(model(ids).logits, labels)
    nll = -(logps[:2].sum() / n[:2].sum())  # the chosen rows' token mean: 3 tokens
    assert "chosen_nll" not in metrics and rpo_metrics["chosen_nll"] == pytest.approx(float(nll))
    assert float(rpo - plain) == pytest.approx(0.5 * float(nll))

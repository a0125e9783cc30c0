"""RLHF pieces (PPO, GRPO, RLOO) against numbers worked by hand."""

import math

import pytest
import torch

from models.rl import (
    AdaptiveKLController,
    FixedKLController,
    entropy_from_logits,
    explained_variance,
    gae,
    grpo_advantages,
    kl_penalty,
    masked_whiten,
    policy_loss,
    rloo_advantages,
    token_logprobs,
    token_rewards,
    value_loss,
)


def t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


# ---- token_logprobs, entropy -------------------------------------------------------------------------


def test_token_logprobs_by_hand_with_and_without_temperature():
    # given V=2: logits [0, log 3] -> p = [1/4, 3/4]; at temperature 0.5 the logits double to [0, log 9]
    # -> p = [1/10, 9/10]. Row (B=1, T=2) picks token 1 then token 0.
    logits = torch.tensor([[[0.0, math.log(3)], [0.0, math.log(3)]]])
    tokens = torch.tensor([[1, 0]])
    # then
    assert token_logprobs(logits, tokens).tolist()[0] == pytest.approx([math.log(3 / 4), math.log(1 / 4)])
    assert token_logprobs(logits, tokens, temperature=0.5).tolist()[0] == pytest.approx(
        [math.log(9 / 10), math.log(1 / 10)]
    )


def test_token_logprobs_equals_log_softmax_gather_at_every_position():
    # every position is scored (padding included: the caller masks), in float32, for half-precision logits too
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7, dtype=torch.bfloat16)
    tokens = torch.randint(0, 7, (2, 5))
    for temperature in (1.0, 0.7, 1.3):
        expected = torch.log_softmax(logits.float() / temperature, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        got = token_logprobs(logits, tokens, temperature)
        assert got.dtype == torch.float32 and got.shape == (2, 5)
        torch.testing.assert_close(got, expected)


def test_token_logprobs_rejects_bad_temperature_and_shapes():
    with pytest.raises(ValueError, match="temperature must be > 0, got 0"):
        token_logprobs(torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.long), temperature=0)
    with pytest.raises(ValueError, match=r"tokens \(B, T\).*\(1, 2, 3\) and \(1, 3\)"):
        token_logprobs(torch.zeros(1, 2, 3), torch.zeros(1, 3, dtype=torch.long))


def test_entropy_from_logits_by_hand():
    # uniform over V=4: H = log 4 = 1.386294
    # [0, log 3] -> p = [1/4, 3/4]: H = 1/4 log 4 + 3/4 log 4/3 = 0.346574 + 0.215762 = 0.562335
    # at temperature 0.5 -> p = [1/10, 9/10]: H = 0.1 log 10 + 0.9 log 10/9 = 0.230259 + 0.094825 = 0.325083
    uniform = torch.zeros(1, 1, 4)
    skewed = torch.tensor([[[0.0, math.log(3)]]])
    assert entropy_from_logits(uniform).item() == pytest.approx(1.386294, abs=1e-6)
    assert entropy_from_logits(skewed).item() == pytest.approx(0.562335, abs=1e-6)
    assert entropy_from_logits(skewed, temperature=0.5).item() == pytest.approx(0.325083, abs=1e-6)
    with pytest.raises(ValueError, match="temperature must be > 0, got -1"):
        entropy_from_logits(skewed, temperature=-1)


# ---- KL -----------------------------------------------------------------------------------------------


def test_kl_penalty_k1_and_k3_by_hand():
    # logp = [-1, -2], ref = [-1.5, -1]
    # k1 = logp - ref = [0.5, -1]
    # k3 with r = ref - logp = [-0.5, 1]: exp(-0.5) + 0.5 - 1 = 0.606531 - 0.5 = 0.106531; e - 1 - 1 = 0.718282
    logp, ref = t(-1.0, -2.0), t(-1.5, -1.0)
    assert kl_penalty(logp, ref).tolist() == pytest.approx([0.5, -1.0])
    assert kl_penalty(logp, ref, "k3").tolist() == pytest.approx([0.106531, 0.718282], abs=1e-6)


def test_kl_penalty_rejects_unknown_estimator_and_shapes():
    with pytest.raises(ValueError, match=r"estimator must be one of \('k1', 'k3'\), got 'k2'"):
        kl_penalty(t(0.0), t(0.0), "k2")
    with pytest.raises(ValueError, match=r"logprobs \(2,\), ref_logprobs \(3,\)"):
        kl_penalty(t(0.0, 0.0), t(0.0, 0.0, 0.0))


def test_fixed_kl_controller_never_moves():
    kl = FixedKLController(0.05)
    kl.update(current_kl=100.0, n_samples=64)
    assert kl.value == 0.05
    with pytest.raises(ValueError, match="kl_coef must be >= 0, got -0.1"):
        FixedKLController(-0.1)


@pytest.mark.parametrize(
    "current_kl, expected",
    [
        (9.0, 0.204),  # 9/6 - 1 = 0.5, clipped to 0.2: 0.2 * (1 + 0.2 * 1000/10000) = 0.2 * 1.02
        (3.0, 0.196),  # 3/6 - 1 = -0.5, clipped to -0.2: 0.2 * (1 - 0.02) = 0.2 * 0.98
        (6.6, 0.202),  # 6.6/6 - 1 = 0.1, not clipped: 0.2 * (1 + 0.1 * 0.1) = 0.2 * 1.01
        (5.4, 0.198),  # 5.4/6 - 1 = -0.1: 0.2 * 0.99
    ],
)
def test_adaptive_kl_controller_one_update(current_kl, expected):
    kl = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000)
    kl.update(current_kl, n_samples=1000)
    assert kl.value == pytest.approx(expected)


def test_adaptive_kl_controller_rejects_bad_arguments():
    with pytest.raises(ValueError, match="target must be > 0, got 0"):
        AdaptiveKLController(0.2, target=0, horizon=10)
    with pytest.raises(ValueError, match="horizon must be > 0, got 0"):
        AdaptiveKLController(0.2, target=6.0, horizon=0)
    with pytest.raises(ValueError, match="init_kl_coef must be > 0, got 0"):
        AdaptiveKLController(0, target=6.0, horizon=10)


# ---- rewards, whitening, GAE ----------------------------------------------------------------------------


def test_token_rewards_penalise_every_real_token_and_add_the_score_at_the_last():
    # kl_coef 0.5; row 0 has 3 real tokens, row 1 has 2 and a padding token (kl 9 there must not count)
    # row 0: [-0.05, -0.1, -0.15 + 1] = [-0.05, -0.1, 0.85]
    # row 1: [-0.2, -0.25 + 2, 0]     = [-0.2, 1.75, 0]
    scores = t(1.0, 2.0)
    kl = t([0.1, 0.2, 0.3], [0.4, 0.5, 9.0])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    rewards = token_rewards(scores, kl, 0.5, mask)
    assert rewards[0].tolist() == pytest.approx([-0.05, -0.1, 0.85])
    assert rewards[1].tolist() == pytest.approx([-0.2, 1.75, 0.0])


def test_token_rewards_one_token_row_and_0_1_mask():
    # the only real token is position 0: it gets -0.5 * 0.2 + 3 = 2.9
    rewards = token_rewards(t(3.0), t([0.2, 7.0]), 0.5, torch.tensor([[1, 0]]))
    assert rewards.tolist()[0] == pytest.approx([2.9, 0.0])


def test_token_rewards_rejects_empty_row_and_bad_scores():
    with pytest.raises(ValueError, match=r"rows \[1\] have none"):
        token_rewards(t(1.0, 2.0), t([0.0, 0.0], [0.0, 0.0]), 0.1, torch.tensor([[1, 0], [0, 0]]))
    with pytest.raises(ValueError, match=r"scores must be \(B,\) = \(2,\), got \(3,\)"):
        token_rewards(t(1.0, 2.0, 3.0), t([0.0, 0.0], [0.0, 0.0]), 0.1, torch.ones(2, 2))


def test_masked_whiten_by_hand():
    # [1, 2, 3, (pad 100)]: mean 2, variance (1 + 0 + 1) / 3 = 2/3, std 0.816497 -> [-1.224745, 0, 1.224745, 0]
    values = t([1.0, 2.0, 3.0, 100.0])
    mask = torch.tensor([[True, True, True, False]])
    assert masked_whiten(values, mask)[0].tolist() == pytest.approx([-1.224745, 0.0, 1.224745, 0.0], abs=1e-6)
    # shift_mean=False adds the mean 2 back: [0.775255, 2, 3.224745, 0]
    assert masked_whiten(values, mask, shift_mean=False)[0].tolist() == pytest.approx(
        [0.775255, 2.0, 3.224745, 0.0], abs=1e-6
    )
    with pytest.raises(ValueError, match="at least one entry where mask is true"):
        masked_whiten(values, torch.zeros(1, 4, dtype=torch.bool))


def test_gae_by_hand_on_a_full_and_a_padded_row():
    # gamma 0.9, lam 0.5 -> gamma * lam = 0.45
    # row 0, 3 tokens: r = [0, 0, 1], V = [0.5, 0.4, 0.6]
    #   t=2: delta = 1 + 0.9 * 0 - 0.6 = 0.4                 A2 = 0.4
    #   t=1: delta = 0 + 0.9 * 0.6 - 0.4 = 0.14              A1 = 0.14 + 0.45 * 0.4 = 0.32
    #   t=0: delta = 0 + 0.9 * 0.4 - 0.5 = -0.14             A0 = -0.14 + 0.45 * 0.32 = 0.004
    #   returns = A + V = [0.504, 0.72, 1.0]
    # row 1, 2 tokens + padding (r = 99, V = 7 there must be ignored): r = [0.5, 2], V = [1.0, 0.5]
    #   t=1: delta = 2 + 0.9 * 0 - 0.5 = 1.5                 A1 = 1.5
    #   t=0: delta = 0.5 + 0.9 * 0.5 - 1.0 = -0.05           A0 = -0.05 + 0.45 * 1.5 = 0.625
    #   returns = [1.625, 2.0, 0]
    rewards = t([0.0, 0.0, 1.0], [0.5, 2.0, 99.0])
    values = t([0.5, 0.4, 0.6], [1.0, 0.5, 7.0])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    assert advantages[0].tolist() == pytest.approx([0.004, 0.32, 0.4])
    assert advantages[1].tolist() == pytest.approx([0.625, 1.5, 0.0])
    assert returns[0].tolist() == pytest.approx([0.504, 0.72, 1.0])
    assert returns[1].tolist() == pytest.approx([1.625, 2.0, 0.0])


def test_gae_carries_no_gradient():
    values = t([0.5, 0.4]).requires_grad_()
    advantages, returns = gae(t([0.0, 1.0]), values, torch.ones(1, 2), gamma=1.0, lam=1.0)
    assert not advantages.requires_grad and not returns.requires_grad
    # gamma = lam = 1: A = sum of future rewards - V_t = [1 - 0.5, 1 - 0.4]
    assert advantages[0].tolist() == pytest.approx([0.5, 0.6])


def test_gae_rejects_bad_arguments():
    with pytest.raises(ValueError, match="right-padded mask"):
        gae(t([0.0, 0.0]), t([0.0, 0.0]), torch.tensor([[False, True]]), gamma=1.0, lam=1.0)
    with pytest.raises(ValueError, match="gamma and lam in \\[0, 1\\], got gamma=1.5, lam=0.9"):
        gae(t([0.0]), t([0.0]), torch.ones(1, 1), gamma=1.5, lam=0.9)
    with pytest.raises(ValueError, match=r"rewards \(1, 2\), values \(1, 3\), mask \(1, 2\)"):
        gae(t([0.0, 0.0]), t([0.0, 0.0, 0.0]), torch.ones(1, 2), gamma=1.0, lam=1.0)


# ---- GRPO, RLOO -------------------------------------------------------------------------------------------


def test_grpo_advantages_two_groups_of_2():
    # group [1, 3]: mean 2, unbiased std sqrt((1 + 1) / 1) = sqrt 2 -> [-1/sqrt2, 1/sqrt2] = [-0.707107, 0.707107]
    # group [4, 4]: std 0 -> 0 / (0 + eps) = [0, 0]
    got = grpo_advantages(t(1.0, 3.0, 4.0, 4.0), group_size=2)
    assert got.tolist() == pytest.approx([-0.707107, 0.707107, 0.0, 0.0], abs=1e-6)


def test_grpo_advantages_two_groups_of_3_scaled_and_centred_only():
    # group [0, 1, 5]: mean 2, deviations [-2, -1, 3], sum of squares 14, unbiased var 14/2 = 7, std 2.645751
    #   -> [-0.755929, -0.377964, 1.133893]
    # group [2, 2, 5]: mean 3, deviations [-1, -1, 2], sum of squares 6, var 3, std 1.732051
    #   -> [-0.577350, -0.577350, 1.154701]  (the eps 1e-6 added to the std moves these by ~1e-6: tolerance 1e-5)
    scores = t(0.0, 1.0, 5.0, 2.0, 2.0, 5.0)
    got = grpo_advantages(scores, group_size=3)
    assert got.tolist() == pytest.approx([-0.755929, -0.377964, 1.133893, -0.577350, -0.577350, 1.154701], abs=1e-5)
    # Dr. GRPO (scale=False): the deviations only
    assert grpo_advantages(scores, group_size=3, scale=False).tolist() == pytest.approx([-2, -1, 3, -1, -1, 2])


def test_rloo_advantages_by_hand():
    # group of 2 [1, 3]: 1 - 3 = -2, 3 - 1 = 2
    assert rloo_advantages(t(1.0, 3.0), group_size=2).tolist() == pytest.approx([-2.0, 2.0])
    # integer scores (pass/fail rewards) come back as float
    assert rloo_advantages(torch.tensor([1, 0]), group_size=2).tolist() == [1.0, -1.0]
    # group of 3 [0, 1, 5]: 0 - (1 + 5)/2 = -3, 1 - (0 + 5)/2 = -1.5, 5 - (0 + 1)/2 = 4.5
    # group of 3 [2, 2, 2]: all 0
    got = rloo_advantages(t(0.0, 1.0, 5.0, 2.0, 2.0, 2.0), group_size=3)
    assert got.tolist() == pytest.approx([-3.0, -1.5, 4.5, 0.0, 0.0, 0.0])


@pytest.mark.parametrize("fn", [grpo_advantages, rloo_advantages])
def test_group_advantages_reject_bad_groups(fn):
    with pytest.raises(ValueError, match="N a multiple of group_size: got N=5 scores, group_size=2"):
        fn(t(1.0, 2.0, 3.0, 4.0, 5.0), group_size=2)
    with pytest.raises(ValueError, match="group_size must be >= 2.*got 1"):
        fn(t(1.0, 2.0), group_size=1)
    with pytest.raises(ValueError, match=r"scores must be \(N,\), got \(2, 2\)"):
        fn(t([1.0, 2.0], [3.0, 4.0]), group_size=2)


# ---- PPO losses ---------------------------------------------------------------------------------------------


def ppo_batch():
    # clip_range 0.2 -> ratio kept in [0.8, 1.2]. B=2, T=3; the last token of row 1 is padding.
    #   a: ratio 1.5, A = +1: -A*r = -1.5, -A*clip = -1.2 -> max -1.2, clipped taken
    #   b: ratio 1.5, A = -1: -A*r =  1.5, -A*clip =  1.2 -> max  1.5, unclipped
    #   c: ratio 0.5, A = +1: -A*r = -0.5, -A*clip = -0.8 -> max -0.5, unclipped
    #   d: ratio 0.5, A = -1: -A*r =  0.5, -A*clip =  0.8 -> max  0.8, clipped taken
    #   e: ratio 1.1, A = +2: both -2.2, inside the clip     -> -2.2, unclipped
    #   pad: ratio 3, A = 5: ignored
    old = t([-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0])
    log_ratio = t([math.log(1.5), math.log(1.5), math.log(0.5)], [math.log(0.5), math.log(1.1), math.log(3.0)])
    advantages = t([1.0, -1.0, 1.0], [-1.0, 2.0, 5.0])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    return old + log_ratio, old, advantages, mask


def test_policy_loss_clip_by_hand():
    logprobs, old, advantages, mask = ppo_batch()
    loss, stats = policy_loss(logprobs, old, advantages, mask, clip_range=0.2)
    # mean of [-1.2, 1.5, -0.5, 0.8, -2.2] = -1.6 / 5 = -0.32
    assert loss.item() == pytest.approx(-0.32)
    # clipped taken on a and d: 2 of 5 real tokens
    assert stats["clip_fraction"] == pytest.approx(0.4)
    # 0.5 * (2 * log(1.5)^2 + 2 * log(0.5)^2 + log(1.1)^2) / 5
    #   = 0.5 * (2 * 0.164402 + 2 * 0.480453 + 0.009084) / 5 = 0.5 * 1.298794 / 5 = 0.129879
    assert stats["approx_kl"] == pytest.approx(0.129879, abs=1e-6)
    assert isinstance(stats["clip_fraction"], float) and isinstance(stats["approx_kl"], float)


def test_policy_loss_gradient_is_zero_on_clipped_tokens_and_padding():
    logprobs, old, advantages, mask = ppo_batch()
    logprobs.requires_grad_()
    loss, _ = policy_loss(logprobs, old, advantages, mask, clip_range=0.2)
    loss.backward()
    # unclipped tokens: d(-A * exp(logp - old)) / dlogp / 5 real tokens = -A * ratio / 5
    #   b: 1 * 1.5 / 5 = 0.3;  c: -1 * 0.5 / 5 = -0.1;  e: -2 * 1.1 / 5 = -0.44
    # a and d (clipped) and the padding token: 0
    assert logprobs.grad[0].tolist() == pytest.approx([0.0, 0.3, -0.1])
    assert logprobs.grad[1].tolist() == pytest.approx([0.0, -0.44, 0.0])


def test_policy_loss_broadcasts_one_advantage_per_row():
    # ratios row 0: [1.1, 1.1], row 1: [0.9, 0.9]; advantages [+1, -1] per row, clip 0.2 (nothing clipped)
    # terms: row 0 -1.1, -1.1; row 1 +0.9, +0.9 -> mean -0.4 / 4 = -0.1
    old = t([0.0, 0.0], [0.0, 0.0])
    logprobs = t([math.log(1.1)] * 2, [math.log(0.9)] * 2)
    mask = torch.ones(2, 2)
    for advantages in (t(1.0, -1.0), t([1.0], [-1.0]), t([1.0, 1.0], [-1.0, -1.0])):
        loss, stats = policy_loss(logprobs, old, advantages, mask, clip_range=0.2)
        assert loss.item() == pytest.approx(-0.1)
        assert stats["clip_fraction"] == 0.0


def test_policy_loss_rejects_bad_arguments():
    logprobs, old, advantages, mask = ppo_batch()
    with pytest.raises(ValueError, match="clip_range must be > 0, got 0"):
        policy_loss(logprobs, old, advantages, mask, clip_range=0)
    with pytest.raises(ValueError, match=r"advantages must be \(B, T\), \(B, 1\) or \(B,\).*got \(2, 2\)"):
        policy_loss(logprobs, old, advantages[:, :2], mask, clip_range=0.2)
    with pytest.raises(ValueError, match=r"old_logprobs \(2, 2\)"):
        policy_loss(logprobs, old[:, :2], advantages, mask, clip_range=0.2)


def test_value_loss_clip_by_hand():
    # clip 0.2; (v, old_v, R) per token:
    #   (1.0, 0.5, 1.0): unclipped 0,    v clipped to 0.7: (0.7 - 1)^2 = 0.09 -> 0.09, clipped larger
    #   (0.6, 0.5, 1.0): inside the clip: both (0.6 - 1)^2 = 0.16            -> 0.16
    #   (0.0, 0.5, 0.0): unclipped 0,    v clipped to 0.3: 0.09               -> 0.09, clipped larger
    #   (2.0, 0.5, 0.0): unclipped 4,    v clipped to 0.7: 0.49               -> 4, unclipped larger
    #   padding (9, 0, 0) ignored
    # loss = 0.5 * (0.09 + 0.16 + 0.09 + 4) / 4 = 0.5 * 1.085 = 0.5425; clip fraction 2/4
    values = t([1.0, 0.6, 0.0], [2.0, 9.0, 9.0])
    old = t([0.5, 0.5, 0.5], [0.5, 0.0, 0.0])
    returns = t([1.0, 1.0, 0.0], [0.0, 0.0, 0.0])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    loss, stats = value_loss(values, old, returns, mask, clip_range=0.2)
    assert loss.item() == pytest.approx(0.5425)
    assert stats["value_clip_fraction"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="clip_range must be > 0, got -0.2"):
        value_loss(values, old, returns, mask, clip_range=-0.2)
    with pytest.raises(ValueError, match=r"returns \(2, 2\)"):
        value_loss(values, old, returns[:, :2], mask, clip_range=0.2)


def test_explained_variance_by_hand():
    # target [1, 2, 3, (pad 100)], Var = 2/3
    target = t([1.0, 2.0, 3.0, 100.0])
    mask = torch.tensor([[True, True, True, False]])
    # perfect prediction: 1 - 0 = 1
    assert explained_variance(target.clone(), target, mask) == pytest.approx(1.0)
    # predicting the mean 2 everywhere: residual = target - 2, same variance -> 0
    assert explained_variance(t([2.0, 2.0, 2.0, 0.0]), target, mask) == pytest.approx(0.0)
    # predicted [1, 2, 2]: residual [0, 0, 1], mean 1/3, Var = 1/3 - 1/9 = 2/9 -> 1 - (2/9) / (2/3) = 2/3
    assert explained_variance(t([1.0, 2.0, 2.0, 0.0]), target, mask) == pytest.approx(2 / 3)
    # constant target: nothing to explain
    assert math.isnan(explained_variance(t([1.0, 2.0]), t([5.0, 5.0]), torch.ones(1, 2)))

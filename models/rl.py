"""Online RLHF pieces we own (PPO, GRPO, RLOO): small pure functions on tensors, each citing what it follows.

Shapes: B = rows (responses), T = response tokens (right-padded), V = vocabulary size, N = samples scored.
`mask` (B, T) is bool or 0/1 and marks the real response tokens; padding is never counted in a mean.
"""

from __future__ import annotations

import torch

from models.losses import masked_mean

KL_ESTIMATORS = ("k1", "k3")


def _same_shape(fn: str, **tensors: torch.Tensor) -> None:
    """Raise a ValueError naming every argument when the given tensors do not all have the same shape."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        raise ValueError(f"{fn} needs {', '.join(shapes)} of one shape (B, T), got {listed}")


def _check_groups(fn: str, scores: torch.Tensor, group_size: int) -> None:
    if scores.dim() != 1:
        raise ValueError(f"{fn} scores must be (N,), got {tuple(scores.shape)}")
    if group_size < 2:
        raise ValueError(f"{fn} group_size must be >= 2 (each sample needs others to compare with), got {group_size}")
    if len(scores) % group_size:
        raise ValueError(f"{fn} needs N a multiple of group_size: got N={len(scores)} scores, group_size={group_size}")


def _as_float(scores: torch.Tensor) -> torch.Tensor:
    """Scores as given if floating point (float64 stays float64), else float32 (integer or bool rewards)."""
    return scores if scores.is_floating_point() else scores.float()


# ---- log-probs, entropy, KL -------------------------------------------------------------------------


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature) at each token, (B, T), in float32.

    `logits` (B, T, V) are already aligned: logits[:, t] scores tokens[:, t] (slice off the prompt and the last
    position before calling). Every position is scored, padding too (it must hold a valid id, e.g. the pad id):
    the caller masks. Sampling temperature divides the logits as it did at generation, so the log-probs are of
    the policy that actually sampled (the "temperature" detail of Huang et al. 2024, "The N+ Implementation
    Details of RLHF with PPO"). As models.losses.sequence_logprobs: logit at the token minus logsumexp, without
    a (B, T, V) log-prob tensor.
    """
    if not temperature > 0:
        raise ValueError(f"token_logprobs temperature must be > 0, got {temperature}")
    if logits.dim() != 3 or logits.shape[:2] != tokens.shape:
        raise ValueError(
            "token_logprobs needs logits (B, T, V) and tokens (B, T) on the same (B, T): "
            f"got {tuple(logits.shape)} and {tuple(tokens.shape)}"
        )
    logits = logits.float() / temperature  # (B, T, V)
    token_logits = logits.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)  # (B, T)
    return token_logits - torch.logsumexp(logits, dim=-1)  # (B, T)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy (B, T) of softmax(logits / temperature), in float32, from logits (B, T, V).

    H = logsumexp(z) - sum_v p_v z_v with z = logits / temperature (the identity TRL's entropy_from_logits uses),
    so no log of a tiny probability is taken.
    """
    if not temperature > 0:
        raise ValueError(f"entropy_from_logits temperature must be > 0, got {temperature}")
    if logits.dim() != 3:
        raise ValueError(f"entropy_from_logits needs logits (B, T, V), got {tuple(logits.shape)}")
    z = logits.float() / temperature  # (B, T, V)
    p = torch.softmax(z, dim=-1)  # (B, T, V)
    return torch.logsumexp(z, dim=-1) - (p * z).sum(-1)  # (B, T)


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate (B, T) of KL(policy || reference) from the sampled tokens' log-probs, both (B, T).

    Schulman 2020, "Approximating KL Divergence" (joschu.net/blog/kl-approx.html), with r = ref - logp:
        k1 = -r = logp - ref            (unbiased, can be negative: the InstructGPT / Ziegler et al. penalty)
        k3 = exp(r) - r - 1             (unbiased, never negative, lower variance)
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_penalty estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")
    _same_shape("kl_penalty", logprobs=logprobs, ref_logprobs=ref_logprobs)
    if estimator == "k1":
        return logprobs - ref_logprobs  # (B, T)
    log_ratio = ref_logprobs - logprobs  # (B, T)
    return torch.exp(log_ratio) - log_ratio - 1  # (B, T)


class FixedKLController:
    """A KL coefficient that never moves (TRL's FixedKLController): `update` is a no-op."""

    def __init__(self, kl_coef: float):
        if not kl_coef >= 0:
            raise ValueError(f"FixedKLController kl_coef must be >= 0, got {kl_coef}")
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_samples: int) -> None:
        """Nothing to do: the coefficient is fixed."""


class AdaptiveKLController:
    """A KL coefficient steered toward a target KL.

    Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", section 2.2 (TRL's
    AdaptiveKLController): error = clip(KL / target - 1, -0.2, 0.2); value *= 1 + error * n_samples / horizon.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        if not init_kl_coef > 0:
            raise ValueError(f"AdaptiveKLController init_kl_coef must be > 0, got {init_kl_coef}")
        if not target > 0:
            raise ValueError(f"AdaptiveKLController target must be > 0, got {target}")
        if not horizon > 0:
            raise ValueError(f"AdaptiveKLController horizon must be > 0, got {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = horizon

    def update(self, current_kl: float, n_samples: int) -> None:
        """Move the coefficient after a batch of `n_samples` whose mean KL was `current_kl`."""
        error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_samples / self.horizon


# ---- rewards and advantages -------------------------------------------------------------------------


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, kl_coef: float, mask: torch.Tensor) -> torch.Tensor:
    """Per-token rewards (B, T): -kl_coef * kl on every real token, plus the row's score at its last real token.

    Ziegler et al. 2019, section 2.2, and Ouyang et al. 2022 (InstructGPT), section 3.5: R = r(x, y) - beta * KL;
    the reward model's score (B,) arrives at the end of the response, the KL penalty (B, T) on every token.
    Padding is 0.
    """
    _same_shape("token_rewards", kl=kl, mask=mask)
    if scores.shape != kl.shape[:1]:
        raise ValueError(f"token_rewards scores must be (B,) = {tuple(kl.shape[:1])}, got {tuple(scores.shape)}")
    real = mask.bool()  # (B, T)
    empty = (~real.any(-1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"token_rewards needs at least one real token per row; rows {empty} have none in mask")
    rewards = torch.where(real, -kl_coef * kl, torch.zeros_like(kl))  # (B, T)
    positions = torch.arange(1, real.shape[1] + 1, device=real.device)  # (T,)  1-based, so 0 means padding
    last = (positions * real).argmax(-1)  # (B,)  last real token of each row
    at_last = torch.nn.functional.one_hot(last, real.shape[1]).to(rewards.dtype)  # (B, T)
    return rewards + at_last * scores.to(rewards.dtype).unsqueeze(-1)  # (B, T)


def masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """(values - mean) / sqrt(var + eps) over the masked entries of `values`; padding comes back as 0.

    TRL's masked_whiten, with the population variance (unbiased=False) over the masked entries. shift_mean=False
    adds the mean back: only the scale changes, as TRL does for rewards.
    """
    _same_shape("masked_whiten", values=values, mask=mask)
    if not mask.bool().any():
        raise ValueError("masked_whiten needs at least one entry where mask is true, got none")
    mean = masked_mean(values, mask)  # ()
    var = masked_mean((values - mean) ** 2, mask)  # ()
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over right-padded rows, all (B, T): returns (advantages, returns).

    Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage Estimation", eq. 16:
        delta_t = r_t + gamma * V_{t+1} - V_t,   A_t = delta_t + gamma * lam * A_{t+1}
    with V and A after a row's last real token taken as 0 (the response ends: a terminal state).
    returns = advantages + values, the value head's regression target (TRL). Both are 0 on padding. The inputs
    are detached: advantages and returns are targets, not things to differentiate.
    """
    _same_shape("gae", rewards=rewards, values=values, mask=mask)
    if not (0 <= gamma <= 1 and 0 <= lam <= 1):
        raise ValueError(f"gae needs gamma and lam in [0, 1], got gamma={gamma}, lam={lam}")
    real = mask.bool()  # (B, T)
    if (real[:, 1:] & ~real[:, :-1]).any():
        raise ValueError("gae needs a right-padded mask: a real token follows padding in some row")
    rewards, values = rewards.detach(), values.detach()
    zeros = torch.zeros_like(values)
    rewards = torch.where(real, rewards, zeros)  # (B, T)
    values = torch.where(real, values, zeros)  # (B, T)  so V after the last real token is 0
    advantages = torch.zeros_like(values)  # (B, T)
    next_value = zeros[:, 0]  # (B,)
    next_advantage = zeros[:, 0]  # (B,)
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # (B,)
        advantages[:, t] = torch.where(real[:, t], delta + gamma * lam * next_advantage, zeros[:, 0])
        next_value, next_advantage = values[:, t], advantages[:, t]
    return advantages, advantages + values  # (B, T), (B, T)


def grpo_advantages(scores: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """Group-relative advantages (N,): (score - group mean) / (group std + eps), one value per sample.

    Shao et al. 2024, "DeepSeekMath", section 4.1.2 (outcome supervision). `scores` (N,) holds
    N = prompts * group_size, a prompt's group_size samples contiguous. std is torch.std (unbiased), as the GRPO
    implementations (TRL, DeepSeek's) take it. scale=False only centres: Liu et al. 2025, "Understanding R1-Zero-
    Like Training" (Dr. GRPO), which drops the std division as a difficulty bias.
    """
    _check_groups("grpo_advantages", scores, group_size)
    grouped = _as_float(scores).view(-1, group_size)  # (prompts, G)
    centred = grouped - grouped.mean(-1, keepdim=True)  # (prompts, G)
    if scale:
        centred = centred / (grouped.std(-1, keepdim=True) + eps)  # (prompts, G)
    return centred.flatten()  # (N,)


def rloo_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """Leave-one-out advantages (N,): each score minus the mean of the other group_size - 1 scores of its prompt.

    Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human
    Feedback in LLMs", eq. 6 (RLOO baseline). Same layout as grpo_advantages: a prompt's samples contiguous.
    """
    _check_groups("rloo_advantages", scores, group_size)
    grouped = _as_float(scores).view(-1, group_size)  # (prompts, G)
    others = (grouped.sum(-1, keepdim=True) - grouped) / (group_size - 1)  # (prompts, G)
    return (grouped - others).flatten()  # (N,)


# ---- PPO losses -------------------------------------------------------------------------------------


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO clipped surrogate, masked token mean: max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)).

    Schulman et al. 2017, "Proximal Policy Optimization Algorithms", eq. 7 (negated to a loss), ratio =
    exp(logprobs - old_logprobs), all (B, T). `advantages` is (B, T) (PPO with GAE) or (B, 1) / (B,), one per
    response broadcast over its tokens (GRPO, RLOO). old_logprobs and advantages are constants of the step and
    are detached. Stats (floats): clip_fraction, the share of real tokens where the clipped term was taken;
    approx_kl, the masked mean of 0.5 * (logprobs - old_logprobs)^2 (k2 of Schulman 2020, as TRL logs it).
    """
    if not clip_range > 0:
        raise ValueError(f"policy_loss clip_range must be > 0, got {clip_range}")
    _same_shape("policy_loss", logprobs=logprobs, old_logprobs=old_logprobs, mask=mask)
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)  # (B, 1)
    if advantages.shape not in (logprobs.shape, logprobs.shape[:1] + (1,)):
        raise ValueError(
            f"policy_loss advantages must be (B, T), (B, 1) or (B,) with (B, T) = {tuple(logprobs.shape)}, "
            f"got {tuple(advantages.shape)}"
        )
    advantages = advantages.detach()  # (B, T) or (B, 1)
    log_ratio = logprobs - old_logprobs.detach()  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T)
    unclipped = -advantages * ratio  # (B, T)
    clipped = -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)  # (B, T)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    stats = {
        "clip_fraction": masked_mean((clipped > unclipped).to(ratio.dtype), mask).item(),
        "approx_kl": masked_mean(0.5 * log_ratio.detach() ** 2, mask).item(),
    }
    return loss, stats


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped value loss, all (B, T): 0.5 * masked mean of max((v - R)^2, (old_v + clip(v - old_v, -c, c) - R)^2).

    OpenAI baselines' PPO2 value clipping, as TRL's PPO trainer (Huang et al. 2024, "The N+ Implementation
    Details of RLHF with PPO"). old_values and returns are targets and are detached. Stats: value_clip_fraction,
    the share of real tokens where the clipped term is the larger.
    """
    if not clip_range > 0:
        raise ValueError(f"value_loss clip_range must be > 0, got {clip_range}")
    _same_shape("value_loss", values=values, old_values=old_values, returns=returns, mask=mask)
    old_values, returns = old_values.detach(), returns.detach()
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range, clip_range)  # (B, T)
    unclipped = (values - returns) ** 2  # (B, T)
    clipped = (clipped_values - returns) ** 2  # (B, T)
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    stats = {"value_clip_fraction": masked_mean((clipped > unclipped).to(values.dtype), mask).item()}
    return loss, stats


def explained_variance(predicted: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var[target - predicted] / Var[target] over the masked entries (OpenAI baselines' explained_variance).

    1 is a perfect prediction, 0 no better than the target's mean, negative worse. NaN when Var[target] is 0
    (nothing to explain), rather than a division error.
    """
    _same_shape("explained_variance", predicted=predicted, target=target, mask=mask)
    predicted, target = predicted.detach().double(), target.detach().double()

    def var(x: torch.Tensor) -> float:
        return masked_mean((x - masked_mean(x, mask)) ** 2, mask).item()

    var_target = var(target)
    if var_target == 0:
        return float("nan")
    return 1 - var(target - predicted) / var_target

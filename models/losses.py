"""Losses we own: small pure functions on tensors, each citing the paper it implements.

Shapes: B = batch, T = sequence length, V = vocabulary size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DPO_LOSS_TYPES = ("sigmoid", "ipo")


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` where `mask` is true. An all-masked slice gives 0, not NaN."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def sequence_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sum of log p(label_t | tokens before t), over labels != ignore_index.

    `labels` are aligned with the model's input ids (the Hugging Face convention), so the
    logits at position t score the label at t + 1. Returns (sum_logps (B,), n_tokens (B,)).
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(
            f"logits (B, T, V) and labels (B, T) disagree on (B, T): got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    logits = logits[:, :-1, :].float()  # (B, T-1, V)  position t predicts token t+1
    labels = labels[:, 1:]  # (B, T-1)
    mask = labels != ignore_index  # (B, T-1)
    safe_labels = labels.masked_fill(~mask, 0)  # (B, T-1)  any valid index; masked out below
    # log softmax at the label only: logit[label] - logsumexp(logits), without a (B, T-1, V) log-prob tensor
    label_logits = logits.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    logps = label_logits - torch.logsumexp(logits, dim=-1)  # (B, T-1)
    logps = torch.where(mask, logps, torch.zeros_like(logps))  # (B, T-1)
    return logps.sum(-1), mask.sum(-1)  # (B,), (B,)


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct preference optimisation on summed sequence log-probs, all (B,).

    sigmoid: Rafailov et al. 2023, "Direct Preference Optimization", eq. 7:
        -log sigmoid(beta * h),  h = (pi_c - ref_c) - (pi_r - ref_r)
    ipo: Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from
    Human Preferences", sampled IPO loss: (h - 1 / (2 * beta))^2. With `*_lengths` (completion
    tokens per sequence) each log-ratio is a per-token mean first, as TRL does for IPO.

    Returns (mean loss, chosen_rewards (B,), rejected_rewards (B,)), the implicit rewards
    beta * (pi - ref) on summed log-probs, detached: they are for logging only.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"dpo loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")
    if not beta > 0:
        raise ValueError(f"dpo beta must be > 0, got {beta}")
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise ValueError("dpo needs both chosen_lengths and rejected_lengths, or neither")
    if chosen_lengths is not None and loss_type != "ipo":
        raise ValueError(f"chosen_lengths/rejected_lengths are used by loss_type 'ipo' only, got {loss_type!r}")

    chosen_logratios = policy_chosen_logps - ref_chosen_logps  # (B,)
    rejected_logratios = policy_rejected_logps - ref_rejected_logps  # (B,)
    if chosen_lengths is not None:
        for name, lengths in (("chosen_lengths", chosen_lengths), ("rejected_lengths", rejected_lengths)):
            if (lengths <= 0).any():
                raise ValueError(f"dpo {name} must all be > 0, got {lengths.tolist()}")
        chosen_logratios = chosen_logratios / chosen_lengths  # (B,)  per-token log-ratio
        rejected_logratios = rejected_logratios / rejected_lengths  # (B,)
    h = chosen_logratios - rejected_logratios  # (B,)

    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h)  # (B,)
    else:
        losses = (h - 1 / (2 * beta)) ** 2  # (B,)

    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()  # (B,)
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()  # (B,)
    return losses.mean(), chosen_rewards, rejected_rewards


def bradley_terry_loss(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, margin: torch.Tensor | float | None = None
) -> torch.Tensor:
    """Reward-model loss on scalar rewards (B,): -log sigmoid(r_c - r_r), batch mean.

    Ouyang et al. 2022, "Training language models to follow instructions with human
    feedback" (InstructGPT), eq. 1. The optional margin (B,) or scalar asks for
    r_c - r_r > margin, as in Touvron et al. 2023 (Llama 2), eq. 2.
    """
    diff = chosen_rewards - rejected_rewards  # (B,)
    if margin is not None:
        diff = diff - margin  # (B,)
    return -F.logsigmoid(diff).mean()

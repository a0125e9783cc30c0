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


def kto_reference_point(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z: the batch's KL(pi || ref) estimate, clamped at 0 and detached (a scalar).

    Ethayarajh et al. 2024, eq. 8 and section 4.2: z = max(0, mean(log pi(y'|x) - log ref(y'|x))) over mismatched
    pairs (x, y') of the batch (a prompt with another row's completion), as TRL's KTOTrainer computes it. No gradient
    flows through z: it only sets the point the log-ratios are compared with.
    """
    if policy_kl_logps.shape != ref_kl_logps.shape or policy_kl_logps.dim() != 1 or policy_kl_logps.numel() == 0:
        raise ValueError(f"kto needs policy_kl_logps and ref_kl_logps of the same non-empty (B',) shape, got "
                         f"{tuple(policy_kl_logps.shape)} and {tuple(ref_kl_logps.shape)}")
    return (policy_kl_logps - ref_kl_logps).mean().detach().clamp(min=0)


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    policy_kl_logps: torch.Tensor,
    ref_kl_logps: torch.Tensor,
    desirable: torch.Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kahneman-Tversky optimisation on unpaired completions: summed response log-probs, all (B,).

    Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", eq. 8, as TRL's KTOTrainer
    (loss_type "kto"): with r = pi - ref (the completion's log-ratio) and z = kto_reference_point(policy_kl_logps,
    ref_kl_logps) (its own (B',) mismatched pairs; detached, >= 0),
        desirable row   (label true):  desirable_weight   * (1 - sigmoid(beta * (r - z)))
        undesirable row (label false): undesirable_weight * (1 - sigmoid(beta * (z - r)))
    and the loss is the mean of these over all B rows (TRL concatenates the weighted desirable and undesirable
    losses and takes their mean), so a batch of one kind only is fine. `desirable` is a (B,) bool tensor.

    Returns (loss, rewards (B,)), the implicit rewards beta * (pi - ref), detached: they are for logging only.
    """
    if not beta > 0:
        raise ValueError(f"kto beta must be > 0, got {beta}")
    if desirable_weight < 0 or undesirable_weight < 0:
        raise ValueError(f"kto weights must be >= 0, got desirable_weight={desirable_weight}, "
                         f"undesirable_weight={undesirable_weight}")
    if policy_logps.dim() != 1 or policy_logps.numel() == 0 or not (
            policy_logps.shape == ref_logps.shape == desirable.shape):
        raise ValueError(f"kto needs policy_logps, ref_logps and desirable of the same non-empty (B,) shape, got "
                         f"{tuple(policy_logps.shape)}, {tuple(ref_logps.shape)} and {tuple(desirable.shape)}")
    if desirable.dtype != torch.bool:
        raise ValueError(f"kto desirable must be a bool tensor (the rows' labels), got {desirable.dtype}")
    z = kto_reference_point(policy_kl_logps, ref_kl_logps)  # ()
    logratios = policy_logps - ref_logps  # (B,)
    # 1 - sigmoid(x) = sigmoid(-x), written the second way (no cancellation when sigmoid(x) is near 1)
    desirable_losses = desirable_weight * torch.sigmoid(-beta * (logratios - z))  # (B,)
    undesirable_losses = undesirable_weight * torch.sigmoid(-beta * (z - logratios))  # (B,)
    losses = torch.where(desirable, desirable_losses, undesirable_losses)  # (B,)
    return losses.mean(), beta * logratios.detach()


def chosen_nll(chosen_logps: torch.Tensor, chosen_lengths: torch.Tensor) -> torch.Tensor:
    """Token-mean negative log-likelihood of the chosen responses of a batch: -sum(logps) / sum(tokens), both (B,).

    The NLL term of RPO (Pang et al. 2024, "Iterative Reasoning Preference Optimization"): added to the DPO loss
    with weight alpha it keeps the chosen response's likelihood from falling, which plain DPO lets happen (TRL's
    `rpo_alpha`).
    """
    total = chosen_lengths.sum()
    if not total > 0:
        raise ValueError(f"chosen_nll needs at least one chosen token, got lengths {chosen_lengths.tolist()}")
    return -chosen_logps.sum() / total


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


def kwise_loss(scores: torch.Tensor, pairs: torch.Tensor, group_of_pair: torch.Tensor) -> torch.Tensor:
    """InstructGPT's reward-model loss over rankings: the mean over groups of the mean over each group's pairs of
    -log sigmoid(r_better - r_worse).

    Ouyang et al. 2022 (InstructGPT), sec. 3.5 and eq. 1: the K(K-1)/2 comparisons of one prompt's K ranked
    responses are one batch element, each weighted 1 / (K(K-1)/2), so a ranking counts once however many pairs it
    makes, and each response is scored once, not once per pair. scores (N,) are the rewards of the batch's
    responses; pairs (P, 2) long holds (better, worse) row indices into scores; group_of_pair (P,) long numbers
    each pair's group 0..G-1, every group with at least one pair. With one pair per group (K = 2) it is
    bradley_terry_loss.
    """
    if scores.dim() != 1 or pairs.dim() != 2 or pairs.shape[1] != 2 or group_of_pair.shape != pairs.shape[:1]:
        raise ValueError(f"kwise_loss needs scores (N,), pairs (P, 2) and group_of_pair (P,), got "
                         f"{tuple(scores.shape)}, {tuple(pairs.shape)} and {tuple(group_of_pair.shape)}")
    if pairs.numel() == 0:
        raise ValueError("kwise_loss needs at least one pair")
    per_group = torch.bincount(group_of_pair)  # (G,)  pairs in each group
    if (per_group == 0).any():
        raise ValueError(f"kwise_loss: groups {(per_group == 0).nonzero().flatten().tolist()} have no pair; number "
                         f"the groups 0..G-1 with a pair in each")
    diff = scores[pairs[:, 0]] - scores[pairs[:, 1]]  # (P,)
    losses = -F.logsigmoid(diff)  # (P,)
    weights = 1.0 / per_group[group_of_pair].to(losses.dtype)  # (P,)  1 / (pairs in the pair's group)
    return (weights * losses).sum() / len(per_group)


# ---- sentence embeddings --------------------------------------------------------------------------
# H = embedding size. Each loss takes embeddings (or their cosines) and returns a scalar; none of them
# normalises inside a model, so the embeddings served are the very vectors these cosines are taken of.


def cosine_similarity_loss(cosines: torch.Tensor, scores: torch.Tensor, max_score: float = 5.0) -> torch.Tensor:
    """Mean squared error between the pairs' cosines (B,) and their gold scores (B,) scaled to [0, 1].

    Reimers & Gurevych 2019, "Sentence-BERT", section 3 (regression objective; sentence-transformers'
    CosineSimilarityLoss): (cos(u, v) - score / max_score)^2, batch mean.
    """
    if cosines.shape != scores.shape:
        raise ValueError(f"cosines {tuple(cosines.shape)} and scores {tuple(scores.shape)} must have the same shape")
    return ((cosines.float() - scores.float() / max_score) ** 2).mean()


def cosent_loss(cosines: torch.Tensor, scores: torch.Tensor, scale: float = 20.0) -> torch.Tensor:
    """CoSENT: a ranking loss over every two pairs of the batch whose gold scores differ.

    Su 2022, "CoSENT" (kexue.fm/archives/8847), as in sentence-transformers' CoSENTLoss:
        log(1 + sum over (i, j) with score_i > score_j of exp(scale * (cos_j - cos_i)))
    cosines and scores (B,); a pair ranked above another by the gold scores should have the larger cosine.
    Only the order of the scores matters, not their scale. Pairs with equal scores add nothing.
    """
    if cosines.shape != scores.shape or cosines.dim() != 1:
        raise ValueError(f"cosines {tuple(cosines.shape)} and scores {tuple(scores.shape)} must both be (B,)")
    cos = cosines.float()
    diff = scale * (cos.unsqueeze(0) - cos.unsqueeze(1))  # (B, B): [i, j] = scale * (cos_j - cos_i)
    ranked = scores.unsqueeze(1) > scores.unsqueeze(0)  # (B, B): pair i should score above pair j
    diff = diff.masked_fill(~ranked, float("-inf"))  # (B, B)
    return torch.logsumexp(torch.cat([diff.new_zeros(1), diff.flatten()]), dim=0)  # the 1 is exp(0)


def in_batch_negatives_loss(anchors: torch.Tensor, positives: torch.Tensor, scale: float = 20.0) -> torch.Tensor:
    """Each anchor must pick its own positive among every positive of the batch (the others are negatives).

    Henderson et al. 2017, "Efficient Natural Language Response Suggestion for Smart Reply", section 4.4;
    with cosines times `scale` (1 / temperature) as in sentence-transformers' MultipleNegativesRankingLoss,
    and as SimCSE (Gao et al. 2021, eq. 1, temperature 0.05 = scale 20) when the positive is the same
    sentence seen through another dropout mask. anchors and positives (B, H); cross-entropy of the (B, B)
    scaled cosine matrix against its diagonal, batch mean.
    """
    if anchors.shape != positives.shape or anchors.dim() != 2:
        raise ValueError(f"anchors {tuple(anchors.shape)} and positives {tuple(positives.shape)} must both be (B, H)")
    a = F.normalize(anchors.float(), dim=-1)  # (B, H)
    p = F.normalize(positives.float(), dim=-1)  # (B, H)
    logits = scale * a @ p.T  # (B, B): [i, j] = scale * cos(anchor_i, positive_j)
    return F.cross_entropy(logits, torch.arange(len(a), device=a.device))

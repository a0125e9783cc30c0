"""The online RL loop of PPO, GRPO and RLOO: rollouts, scores, advantages, update. One loop, three estimators.

Each update (one "step" of align.max_steps):
1. rollout: `batch_size` prompts, `samples` responses each, drawn from the current policy with our KV-cache
   `generate` at the sampling temperature (no top-k / top-p: the samples are the policy's own distribution);
2. score: a rewarder turns (prompt, response) into one scalar per response (and its parts, for the logs);
3. in one no-grad pass over the same layout the update uses: the policy's log-probs of the sampled tokens
   ("old" log-probs), the frozen SFT reference's, and (PPO) the value model's per-token values;
4. advantages, where the algorithms differ:
   - ppo: per-token rewards = -kl_coef * KL per token, plus the score at the last token; GAE over the values;
     whitened (Ouyang et al. 2022, InstructGPT; Schulman et al. 2017; Huang et al. 2024, "The N+
     Implementation Details of RLHF with PPO");
   - grpo: the score normalised within the prompt's group of samples, one advantage for every token; the KL
     to the reference (k3) is a loss term, not a reward (Shao et al. 2024, "DeepSeekMath", eq. 3-4);
   - rloo: the score minus the KL summed over the response (the sequence-level KL reward), minus the mean of
     the prompt's other samples (Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style
     Optimization for Learning from Human Feedback in LLMs");
5. `epochs` passes over the batch in `minibatches` optimiser steps: the clipped policy objective (all three), the
   clipped value loss (ppo), optionally the SFT data's LM loss (PPO-ptx, InstructGPT eq. 2).

Batch layout: the prompts left-padded, then the responses right-padded, (N, P + R), as `generate` lays them out:
every response starts at column P, so the logits at columns P-1 .. P+R-2 score the R response tokens, and
position ids count real tokens only. The same layout for rollout scoring and for the update, so the "old"
log-probs are the update's own at ratio 1 (tests/test_online.py checks this and that they equal the sampler's).

Dropout stays off (eval mode) in every forward: the ratio must compare the same function (Huang et al. 2024).
Single device; a stop signal is taken after an update, once a checkpoint of it is saved.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import get_cosine_schedule_with_warmup

from instructflow import signals
from models.decoder import pad_inputs
from models.generate import generate
from models.losses import masked_mean
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
from models.training import (
    _check_finite,
    _latest_checkpoint,
    param_groups,
    planned_batches,
    publish_checkpoint,
    to_device,
    use_bf16,
)

log = logging.getLogger("instructflow")

ALGORITHMS = ("ppo", "grpo", "rloo")

# (prompts of the batch, their responses) -> (total reward (N,), {source: (N,) scores}) on the CPU
Rewarder = Callable[[list[int], list[list[int]]], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass(frozen=True)
class OnlineSettings:
    algorithm: str
    prompts_per_update: int
    samples: int
    max_steps: int
    max_new_tokens: int
    temperature: float
    epochs: int
    minibatches: int
    clip_range: float
    kl_coef: float
    kl_estimator: str = "k1"
    kl_target: float | None = None
    kl_horizon: int = 10000
    gamma: float = 1.0
    lam: float = 0.95
    value_clip: float = 0.2
    vf_coef: float = 0.1
    whiten_advantages: bool = True
    scale_rewards: bool = True
    ptx_coef: float = 0.0
    lr: float = 1e-5
    value_lr: float = 1e-4
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    bf16: bool | str = "auto"
    logging_steps: int = 1
    eval_steps: int = 10
    seed: int = 0
    eos_token_id: int = 2
    pad_token_id: int = 0
    knobs: str = ""

    def __post_init__(self):
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"online algorithm must be one of {ALGORITHMS}, got {self.algorithm!r}")
        if self.algorithm in ("grpo", "rloo") and self.samples < 2:
            raise ValueError(f"{self.algorithm} needs at least 2 samples per prompt, got {self.samples}")
        if self.prompts_per_update * self.samples < self.minibatches:
            raise ValueError(f"{self.prompts_per_update} prompts x {self.samples} samples cannot be split into "
                             f"{self.minibatches} minibatches")

    @property
    def unit(self) -> str:
        """What a non-finite error counts in (models.training._check_finite): updates, not optimiser steps."""
        return "update"

    @property
    def optimizer_steps(self) -> int:
        return self.max_steps * self.epochs * self.minibatches


# ------------------------------------------------------------------------------------------------ layout
def layout(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int,
           device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Left-padded prompts then right-padded responses: input_ids, attention_mask, position_ids (N, P + R),
    response_ids and response_mask (N, R), and `start` = P, the column of every row's first response token."""
    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
    if any(len(r) == 0 for r in responses):
        raise ValueError("every response needs at least one token")
    left = pad_inputs(prompts, pad_id, "left", device)  # (N, P) each
    right = pad_inputs(responses, pad_id, "right", device)  # (N, R) each
    mask = torch.cat([left["attention_mask"], right["attention_mask"]], dim=1)  # (N, P+R)
    return {"input_ids": torch.cat([left["input_ids"], right["input_ids"]], dim=1),  # (N, P+R)
            "attention_mask": mask,
            "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),  # (N, P+R)  real tokens counted only
            "response_ids": right["input_ids"], "response_mask": right["attention_mask"].bool(),  # (N, R)
            "start": torch.tensor(left["input_ids"].shape[1])}


def _response_slice(t: torch.Tensor, batch: dict) -> torch.Tensor:
    """Columns P-1 .. P+R-2 of a (N, P+R, ...) tensor: those that score (or value the state before) each response
    token."""
    start, width = int(batch["start"]), batch["response_ids"].shape[1]
    return t[:, start - 1:start - 1 + width]


def response_logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """(N, R, V) logits that score each response token, from one forward over the layout."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], use_cache=False)
    return _response_slice(out.logits, batch)


def response_values(value_model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """(N, R) per-token values V(s_t) of a sequence-classification model (the reward model's architecture): its
    scalar head read at every position, not only the last, as PPO's value model (InstructGPT: initialised from
    the reward model)."""
    hidden = value_model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                    position_ids=batch["position_ids"], use_cache=False).last_hidden_state
    return _response_slice(value_model.score(hidden).squeeze(-1).float(), batch)  # (N, R)


def _rows(batch: dict, index: torch.Tensor) -> dict:
    """The rows `index` of every per-row tensor of a batch; the sequence columns are kept (same P, same R)."""
    return {k: v if k == "start" else v[index] for k, v in batch.items()}


# ------------------------------------------------------------------------------------------------- loop
@dataclass
class Models:
    policy: torch.nn.Module
    reference: torch.nn.Module
    value: torch.nn.Module | None = None  # PPO only
    lm_batches: Callable[[], dict] | None = None  # PPO-ptx: the next batch of SFT data (collate_lm)


@dataclass
class LoopState:
    update: int = 0
    history: list[dict] = field(default_factory=list)


def _optimizer(model: torch.nn.Module, settings: OnlineSettings, lr: float):
    opt = torch.optim.AdamW(param_groups(model, settings.weight_decay), lr=lr, betas=(0.9, 0.95))
    sched = get_cosine_schedule_with_warmup(opt, int(settings.warmup_ratio * settings.optimizer_steps),
                                            settings.optimizer_steps)
    return opt, sched


@torch.no_grad()
def rollout(models: Models, settings: OnlineSettings, prompts: list[list[int]], prompt_index: list[int],
            rewarder: Rewarder, update: int, kl_coef: float, autocast) -> tuple[dict, dict[str, float]]:
    """Samples, scores, old/reference log-probs, values and advantages of one update's prompts (see the module
    docstring); the experience batch and its metrics."""
    policy, K = models.policy, settings.samples
    device = next(policy.parameters()).device
    index = [i for i in prompt_index for _ in range(K)]  # the K samples of a prompt are contiguous
    rows = [prompts[i] for i in index]
    t0 = time.perf_counter()
    responses = generate(policy, rows, settings.max_new_tokens, settings.eos_token_id, settings.pad_token_id,
                         temperature=settings.temperature, seed=settings.seed * 1_000_003 + update)
    gen_s = time.perf_counter() - t0
    scores, parts = rewarder(index, responses)  # (N,), {source: (N,)}
    batch = layout(rows, responses, settings.pad_token_id, device)
    mask = batch["response_mask"]  # (N, R)
    with autocast():
        old = token_logprobs(response_logits(policy, batch), batch["response_ids"], settings.temperature)  # (N, R)
        ref = token_logprobs(response_logits(models.reference, batch), batch["response_ids"],
                             settings.temperature)  # (N, R)
        values = response_values(models.value, batch) if models.value is not None else None  # (N, R)
    scores = scores.to(device).float()
    kl = kl_penalty(old, ref, settings.kl_estimator) * mask  # (N, R)
    kl_sum = kl.sum(-1)  # (N,)  per response
    metrics: dict[str, float] = {}
    if settings.algorithm == "ppo":
        rewards = token_rewards(scores, kl, kl_coef, mask)  # (N, R)
        advantages, returns = gae(rewards, values, mask, settings.gamma, settings.lam)  # (N, R) each
        if settings.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
        batch.update(values=values, returns=returns)
        metrics["value_mean"] = float(masked_mean(values, mask))
    elif settings.algorithm == "grpo":
        advantages = grpo_advantages(scores, K, scale=settings.scale_rewards)[:, None].expand_as(old)  # (N, R)
    else:  # rloo: the KL as a sequence-level reward
        advantages = rloo_advantages(scores - kl_coef * kl_sum, K)[:, None].expand_as(old)  # (N, R)
    batch.update(old_logprobs=old, ref_logprobs=ref, advantages=advantages * mask)
    n_tokens = int(mask.sum())
    ended = torch.tensor([settings.eos_token_id in r for r in responses], dtype=torch.float)
    metrics.update({
        "reward_mean": float(scores.mean()), "reward_std": float(scores.std()) if len(scores) > 1 else 0.0,
        **{f"{name}_{stat}": float(v.mean() if stat == "mean" else v.std() if len(v) > 1 else 0.0)
           for name, v in parts.items() for stat in ("mean", "std")},
        "kl": float(kl_penalty(old, ref, "k1").mul(mask).sum(-1).mean()), "kl_coef": kl_coef,
        "response_length": n_tokens / len(responses), "eos_share": float(ended.mean()),
        "rollout_tokens_per_sec": n_tokens / max(gen_s, 1e-9), "rollout_seconds": gen_s})
    return batch, metrics


def update_step(models: Models, settings: OnlineSettings, batch: dict, optimizers: list, kl_coef: float,
                autocast, update: int) -> dict[str, float]:
    """`epochs` passes over the experience in `minibatches` optimiser steps; the mean of each metric.

    The minibatches are drawn with a generator seeded by (seed, update), as the rollout's samples are: a run
    resumed from a checkpoint makes the very updates the uninterrupted run would have made.
    """
    generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + update)
    policy, value_model = models.policy, models.value
    N = batch["response_ids"].shape[0]
    size = N // settings.minibatches
    sums: dict[str, float] = {}
    n = 0
    for _ in range(settings.epochs):
        order = torch.randperm(N, generator=generator)
        for k in range(settings.minibatches):
            mb = _rows(batch, order[k * size:(k + 1) * size].to(batch["response_ids"].device))
            mask = mb["response_mask"]
            with autocast():
                logits = response_logits(policy, mb)  # (n, R, V)
                logprobs = token_logprobs(logits, mb["response_ids"], settings.temperature)  # (n, R)
                loss, stats = policy_loss(logprobs, mb["old_logprobs"], mb["advantages"], mask, settings.clip_range)
                stats = {"policy_loss": float(loss.detach()), **stats}
                if settings.algorithm == "grpo":  # KL in the loss (DeepSeekMath eq. 3), k3 per token
                    kl = masked_mean(kl_penalty(logprobs, mb["ref_logprobs"], "k3"), mask)
                    loss = loss + kl_coef * kl
                    stats["kl_loss"] = float(kl.detach())
                if value_model is not None:
                    values = response_values(value_model, mb)  # (n, R)
                    v_loss, v_stats = value_loss(values, mb["values"], mb["returns"], mask, settings.value_clip)
                    loss = loss + settings.vf_coef * v_loss
                    stats.update(value_loss=float(v_loss.detach()), **v_stats,
                                 explained_variance=explained_variance(values.detach(), mb["returns"], mask))
                if models.lm_batches is not None and settings.ptx_coef > 0:
                    lm = to_device(models.lm_batches(), policy)
                    ptx = policy(input_ids=lm["input_ids"], attention_mask=lm["attention_mask"],
                                 labels=lm["labels"]).loss
                    loss = loss + settings.ptx_coef * ptx
                    stats["ptx_loss"] = float(ptx.detach())
            stats["entropy"] = float(masked_mean(entropy_from_logits(logits.detach().float(), settings.temperature),
                                                 mask))
            stats["loss"] = float(loss.detach())
            for opt, _, _ in optimizers:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            for opt, sched, model in optimizers:
                stats[f"grad_norm_{'value' if model is value_model else 'policy'}"] = float(
                    torch.nn.utils.clip_grad_norm_(model.parameters(), settings.max_grad_norm))
            # a non-finite loss, KL or gradient stops before the optimiser steps on it (explained variance is nan
            # by definition when the returns do not vary)
            _check_finite(settings, update, {k: v for k, v in stats.items() if k != "explained_variance"})
            for opt, sched, _ in optimizers:
                opt.step()
                sched.step()
            for key, value in stats.items():
                sums[key] = sums.get(key, 0.0) + value
            n += 1
    return {k: v / n for k, v in sums.items()}


def _save(folder: Path, key: str, state: LoopState, models: Models, optimizers: list, kl) -> None:
    publish_checkpoint(folder, state.update, key, state.history, lambda tmp: torch.save({
        "policy": models.policy.state_dict(),
        "value": models.value.state_dict() if models.value is not None else None,
        "optimizers": [(o.state_dict(), s.state_dict()) for o, s, _ in optimizers],
        "kl_coef": kl.value, "rng": torch.get_rng_state()}, tmp / "state.pt"))


def _resume(folder: Path, key: str, models: Models, optimizers: list, kl) -> LoopState | None:
    ckpt = _latest_checkpoint(folder, key)
    if ckpt is None:
        return None
    saved = torch.load(ckpt / "state.pt", weights_only=False)
    models.policy.load_state_dict(saved["policy"])
    if models.value is not None:
        models.value.load_state_dict(saved["value"])
    for (opt, sched, _), (o, s) in zip(optimizers, saved["optimizers"]):
        opt.load_state_dict(o)
        sched.load_state_dict(s)
    kl.value = saved["kl_coef"]
    torch.set_rng_state(saved["rng"])
    meta = json.loads((ckpt / "loop.json").read_text())
    log.info("resumed from %s at update %d; %d logged rows before it carried over", ckpt, meta["step"],
             len(meta["history"]))
    return LoopState(update=meta["step"], history=meta["history"])


@signals.deferred()  # a stop signal is taken after an update, once its checkpoint is saved
def train_online(models: Models, prompts: list[list[int]], rewarder: Rewarder, settings: OnlineSettings, *,
                 eval_fn: Callable[[torch.nn.Module], dict[str, float]] | None = None,
                 on_log: Callable[[int, dict], None] | None = None,
                 checkpoint_dir: Path | None = None, resume_key: str | None = None,
                 save_steps: int | None = None) -> list[dict]:
    """Run settings.max_steps updates; returns the logged history (one dict per logged update).

    `prompts` are token ids ready for the response (`encode_prompt`); the rewarder is handed the prompts'
    indices and the sampled responses. Checkpoints (policy, value model, optimisers, the KL coefficient) go to
    checkpoint_dir/step-N every save_steps and when a stop signal arrives; a rerun with the same resume_key
    resumes from the latest, its history carried over.
    """
    if not prompts:
        raise ValueError("no prompts to roll out")
    torch.manual_seed(settings.seed)
    device = next(models.policy.parameters()).device
    bf16 = use_bf16(settings.bf16)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    for m in (models.policy, models.reference, models.value):
        if m is not None:
            m.eval()  # dropout off everywhere: the ratio compares one function (gradients still flow)
    models.reference.requires_grad_(False)
    optimizers = [(*_optimizer(models.policy, settings, settings.lr), models.policy)]
    if models.value is not None:
        optimizers.append((*_optimizer(models.value, settings, settings.value_lr), models.value))
    kl = (AdaptiveKLController(settings.kl_coef, settings.kl_target, settings.kl_horizon)
          if settings.kl_target is not None else FixedKLController(settings.kl_coef))
    state = None
    if checkpoint_dir is not None and resume_key is not None:
        state = _resume(checkpoint_dir, resume_key, models, optimizers, kl)
        if state is not None and on_log is not None:
            for row in state.history:
                on_log(row["step"], row)
    state = state or LoopState()
    if eval_fn is not None and state.update == 0:  # the start (the SFT model), the baseline of every later eval
        with autocast():
            row = {f"eval_{k}": v for k, v in eval_fn(models.policy).items()}
        row["step"] = 0
        state.history.append(row)
        log.info("before update 1: %s", " ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "step"))
        if on_log is not None:
            on_log(0, row)
    per_epoch = len(planned_batches(len(prompts), settings.prompts_per_update, settings.seed, 0))
    window: dict[str, float] = {}
    n_window = 0
    while state.update < settings.max_steps:
        epoch, k = divmod(state.update, per_epoch)
        prompt_index = planned_batches(len(prompts), settings.prompts_per_update, settings.seed, epoch)[k]
        step = state.update + 1
        batch, metrics = rollout(models, settings, prompts, prompt_index, rewarder, step, kl.value, autocast)
        _check_finite(settings, step, metrics)  # a non-finite reward or KL
        t0 = time.perf_counter()
        stats = update_step(models, settings, batch, optimizers, kl.value, autocast, step)
        metrics.update(stats, update_seconds=time.perf_counter() - t0)
        kl.update(metrics["kl"], len(batch["response_ids"]))
        state.update = step
        for key, value in metrics.items():
            window[key] = window.get(key, 0.0) + value
        n_window += 1
        last = step == settings.max_steps
        if step % settings.logging_steps == 0 or last or step == 1:
            row = {k: v / n_window for k, v in window.items()}
            window, n_window = {}, 0
            if eval_fn is not None and (step % settings.eval_steps == 0 or last):
                with autocast():
                    row.update({f"eval_{k}": v for k, v in eval_fn(models.policy).items()})
            row["step"] = step
            state.history.append(row)
            log.info("update %d/%d %s", step, settings.max_steps,
                     " ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "step"))
            if on_log is not None:
                on_log(step, row)
        if checkpoint_dir is not None and save_steps and step % save_steps == 0 and not last:
            _save(checkpoint_dir, resume_key or "", state, models, optimizers, kl)
        if not last and signals.received() is not None:
            saved = ""
            if checkpoint_dir is not None and resume_key is not None:
                _save(checkpoint_dir, resume_key, state, models, optimizers, kl)
                saved = f"; checkpoint {checkpoint_dir / f'step-{step}'} saved, a rerun resumes from it"
            log.warning("stopped by %s after update %d/%d%s", signals.name(), step, settings.max_steps, saved)
            signals.check()
    models.policy.eval()
    return state.history

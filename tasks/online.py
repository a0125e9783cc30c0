"""Stage `align` with align.algorithm ppo | grpo | rloo: the SFT policy learns from its own samples, scored online.

What the loop does is in models/online.py; this module gives it what the project holds:
- prompts (align.online.prompts): the synthetic tasks of sft_train (their exact answer is known), the real SFT
  prompts, the real preference prompts; held-out ones (sft_eval's tasks, preference_eval's prompts) for the
  stage's own evaluation every eval_steps (greedy: exact answer rate and normalised reward-model score);
- the rewarder (align.online.rewards, weighted): the reward model's score, normalised to mean 0 and std 1 on
  the SFT model's own samples before training (Ziegler et al. 2019; Huang et al. 2024, "reward normalisation"),
  the exact-answer verifier of the synthetic tasks (1 right, 0 wrong; 0 for prompts without an answer), and a
  penalty for a response that never ends in EOS;
- the models: the policy and the frozen reference from artifacts/sft, PPO's value model from artifacts/reward
  (InstructGPT: "we initialize the value function from the RM"), the frozen reward model.

Bad input stops before any training: a reward model whose tokenizer differs from the policy's, no prompt left
after the length caps. A non-finite reward, KL or loss stops the stage with its update number (nothing is
saved, so nothing can be registered).
"""

from __future__ import annotations

import itertools
import logging
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from instructflow.config import Params
from instructflow.errors import InstructflowError
from instructflow.synthetic import exact_match
from models.decoder import collate_lm, pad_inputs, reward_scores
from models.online import Models, OnlineSettings, train_online
from models.tokenizer import chat_example, encode_prompt, load_tokenizer
from models.training import for_inference, pick_device
from tasks.runtime import final_metrics, read_prepared, resumable, stage_output
from tasks.tracking import StageRun

log = logging.getLogger("instructflow")

NORM_PROMPTS = 64  # prompts whose SFT samples set the reward model's normalisation (x samples_per_prompt)
EVAL_PROMPTS = 64  # held-out prompts per source scored at each evaluation


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    source: str  # synthetic | sft | preference
    answer: str | None = None  # synthetic tasks: the exact answer
    task: str | None = None


def _synthetic(row: dict) -> bool:
    return row.get("source") == "synthetic" and row.get("answer") is not None


def collect_prompts(tok, sft_rows: list[dict], preference_rows: list[dict], sources: list[str],
                    max_prompt_length: int, room: int, name: str) -> tuple[list[Prompt], Counter]:
    """The distinct prompts of the chosen sources that fit: at most max_prompt_length tokens, and room for the
    response within the model's positions (`room`); the rest counted by reason."""
    counts, seen, out = Counter(), set(), []
    candidates = []
    for row in sft_rows:
        messages = row["messages"][:-1]  # the conversation up to its last answer
        if _synthetic(row):
            candidates.append(("synthetic", messages, row["answer"], row.get("task")))
        else:
            candidates.append(("sft", messages, None, None))
    for row in preference_rows:
        if row.get("source") != "synthetic":  # a synthetic pair's prompt is a synthetic task already
            candidates.append(("preference", row["prompt"], None, None))
    for source, messages, answer, task in candidates:
        if source not in sources or not messages or messages[-1]["role"] != "user":
            continue
        ids = encode_prompt(tok, messages)
        if len(ids) > max_prompt_length or len(ids) > room:
            counts[f"{source}_too_long"] += 1
            continue
        if tuple(ids) in seen:
            continue
        seen.add(tuple(ids))
        out.append(Prompt(ids, source, answer, task))
    if counts:
        log.info("%s: prompts left out as too long (max_prompt_length %d, or no room for the response): %s", name,
                 max_prompt_length, dict(counts))
    return out, counts


class Rewarder:
    """Scores responses to prompts: the weighted sum of the chosen sources, minus the missing-EOS penalty."""

    def __init__(self, tok, prompts: list[Prompt], weights: dict[str, float], eos_penalty: float,
                 reward_model=None, max_length: int = 256, batch_size: int = 32):
        self.tok, self.prompts, self.weights, self.eos_penalty = tok, prompts, weights, eos_penalty
        self.reward_model, self.max_length, self.batch_size = reward_model, max_length, batch_size
        self.newline = tok.encode("\n", add_special_tokens=False)
        self.norm = (0.0, 1.0)  # the reward model's raw score mean and std on the SFT model's samples

    @torch.no_grad()
    def raw_scores(self, index: list[int], responses: list[list[int]]) -> torch.Tensor:
        """The reward model's scores (N,), on sequences laid out as it was trained: prompt, response, <|eos|>
        and the template's newline (a response cut before EOS has neither)."""
        rows = []
        for i, response in zip(index, responses):
            ids = self.prompts[i].ids + response + (self.newline if response[-1:] == [self.tok.eos_token_id] else [])
            rows.append(ids if len(ids) <= self.max_length else ids[:1] + ids[len(ids) - self.max_length + 1:])
        out = []
        for k in range(0, len(rows), self.batch_size):
            out.append(reward_scores(self.reward_model, pad_inputs(rows[k:k + self.batch_size],
                                                                   self.tok.pad_token_id)).cpu())
        return torch.cat(out)

    def text(self, response: list[int]) -> str:
        return self.tok.decode([t for t in response if t != self.tok.eos_token_id], skip_special_tokens=True)

    def __call__(self, index: list[int], responses: list[list[int]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        parts: dict[str, torch.Tensor] = {}
        if "reward_model" in self.weights:
            mean, std = self.norm
            parts["reward_model"] = (self.raw_scores(index, responses) - mean) / std
        if "exact_answer" in self.weights:
            parts["exact_answer"] = torch.tensor(
                [float(self.prompts[i].answer is not None and exact_match(self.text(r), self.prompts[i].answer))
                 for i, r in zip(index, responses)])
        ended = torch.tensor([float(r[-1:] == [self.tok.eos_token_id]) for r in responses])
        total = sum(self.weights[name] * scores for name, scores in parts.items())
        total = total - self.eos_penalty * (1 - ended)
        return total, parts


def settings_from(params: Params, tok) -> OnlineSettings:
    cfg, online = params.align, params.align.online
    knobs = (f"align.lr={cfg.lr:g}, align.online.kl_coef={online.kl_coef:g}, "
             f"align.online.clip_range={online.clip_range:g}, align.online.temperature={online.temperature:g}, "
             f"align.max_grad_norm={cfg.max_grad_norm:g}")
    return OnlineSettings(
        algorithm=cfg.algorithm, prompts_per_update=cfg.batch_size, samples=online.samples_per_prompt,
        max_steps=cfg.max_steps, max_new_tokens=online.max_new_tokens, temperature=online.temperature,
        epochs=online.epochs, minibatches=online.minibatches, clip_range=online.clip_range, kl_coef=online.kl_coef,
        kl_estimator=online.kl_estimator, kl_target=online.kl_target, kl_horizon=online.kl_horizon,
        gamma=online.gamma, lam=online.lam, value_clip=online.value_clip, vf_coef=online.vf_coef,
        whiten_advantages=online.whiten_advantages, scale_rewards=online.scale_rewards, ptx_coef=online.ptx_coef,
        lr=cfg.lr, value_lr=online.value_lr, warmup_ratio=cfg.warmup_ratio, weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm, bf16=cfg.bf16, logging_steps=cfg.logging_steps, eval_steps=cfg.eval_steps,
        seed=params.seed, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, knobs=knobs)


def check_same_tokenizer(tok, reward_tok, policy_dir: Path, reward_dir: Path) -> None:
    if tok.get_vocab() != reward_tok.get_vocab() or tok.all_special_tokens != reward_tok.all_special_tokens:
        raise InstructflowError(
            f"the reward model's tokenizer ({reward_dir}, {len(reward_tok)} tokens) differs from the policy's "
            f"({policy_dir}, {len(tok)} tokens): it would score other tokens than the policy samples; train the "
            "reward model from the same SFT model (dvc repro reward)")


def ptx_batches(tok, rows: list[dict], max_length: int, batch_size: int, seed: int):
    """PPO-ptx: an endless seeded stream of SFT batches (collate_lm), for the LM loss mixed into each update."""
    examples = [ex for row in rows if (ex := chat_example(tok, row["messages"], max_length)) is not None]
    if not examples:
        raise InstructflowError("align.online.ptx_coef > 0 needs SFT rows (data/prepared/sft_train.jsonl): none fit "
                                f"align.max_length {max_length}")
    rng = random.Random(seed)
    order = itertools.cycle(rng.sample(range(len(examples)), len(examples)))
    return lambda: collate_lm([examples[next(order)] for _ in range(batch_size)], tok.pad_token_id)


def body(params: Params, root: Path, run: StageRun) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from models.generate import generate_batched

    cfg, online = params.align, params.align.online
    policy_dir, reward_dir = root / "artifacts" / "sft", root / "artifacts" / "reward"
    tok = load_tokenizer(policy_dir)
    check_same_tokenizer(tok, load_tokenizer(reward_dir), policy_dir, reward_dir)
    positions = AutoConfig.from_pretrained(policy_dir).max_position_embeddings
    room = positions - online.max_new_tokens
    sft_train = read_prepared(root, "sft_train")
    train_prompts, cut = collect_prompts(tok, sft_train, read_prepared(root, "preference_train"), online.prompts,
                                         online.max_prompt_length, room, "train prompts")
    if not train_prompts:
        raise InstructflowError(
            f"align ({cfg.algorithm}): no prompt left from align.online.prompts {online.prompts} after the length "
            f"caps (align.online.max_prompt_length {online.max_prompt_length}, and {online.max_new_tokens} "
            f"response tokens within the model's {positions} positions); left out: {dict(cut)}")
    if "exact_answer" in online.rewards and not any(p.answer for p in train_prompts):
        log.warning("align: the exact_answer reward is chosen but no rollout prompt has a known answer (no synthetic "
                    "tasks among %s): it adds 0 to every reward", online.prompts)
    eval_prompts, _ = collect_prompts(tok, read_prepared(root, "sft_eval"), read_prepared(root, "preference_eval"),
                                      online.prompts, online.max_prompt_length, room, "held-out prompts")
    by_source: dict[str, list[Prompt]] = {}
    for p in eval_prompts:
        by_source.setdefault(p.source, []).append(p)
    eval_prompts = [p for group in by_source.values() for p in group[:EVAL_PROMPTS]]

    device = pick_device()
    policy = AutoModelForCausalLM.from_pretrained(policy_dir).to(device)
    reference = for_inference(AutoModelForCausalLM.from_pretrained(policy_dir))
    reward_model = None
    if "reward_model" in online.rewards:
        reward_model = for_inference(AutoModelForSequenceClassification.from_pretrained(reward_dir))
        reward_model.requires_grad_(False)
    value = None
    if cfg.algorithm == "ppo":
        value = AutoModelForSequenceClassification.from_pretrained(reward_dir).to(device)
    settings = settings_from(params, tok)
    rewarder = Rewarder(tok, train_prompts, dict(online.rewards), online.eos_penalty, reward_model,
                        params.reward.max_length)
    eval_rewarder = Rewarder(tok, eval_prompts, dict(online.rewards), online.eos_penalty, reward_model,
                             params.reward.max_length)

    if reward_model is not None:  # the normalisation, from the SFT model's own samples before training
        rng = random.Random(params.seed)
        picked = rng.sample(range(len(train_prompts)), min(NORM_PROMPTS, len(train_prompts)))
        index = [i for i in picked for _ in range(online.samples_per_prompt)]
        responses = generate_batched(reference, [train_prompts[i].ids for i in index], 64, seed=params.seed,
                                     max_new_tokens=online.max_new_tokens, eos_token_id=tok.eos_token_id,
                                     pad_token_id=tok.pad_token_id, temperature=online.temperature)
        raw = rewarder.raw_scores(index, responses)
        mean, std = float(raw.mean()), float(raw.std())
        if not std > 1e-6:
            raise InstructflowError(f"the reward model gives every SFT sample the same score ({mean:.4g}); it "
                                    "cannot rank the policy's responses: retrain the reward model")
        rewarder.norm = eval_rewarder.norm = (mean, std)
        log.info("reward model scores of %d SFT samples: mean %.4g, std %.4g (normalised to 0, 1)", len(raw), mean,
                 std)

    def evaluate(model) -> dict[str, float]:
        """Greedy responses to the held-out prompts: reward per source and the exact-answer rate."""
        responses = generate_batched(model, [p.ids for p in eval_prompts], 64, max_new_tokens=online.max_new_tokens,
                                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        total, parts = eval_rewarder(list(range(len(eval_prompts))), responses)
        out = {"reward_mean": float(total.mean())}
        if "reward_model" in parts:
            out["reward_model_mean"] = float(parts["reward_model"].mean())
        synthetic = [i for i, p in enumerate(eval_prompts) if p.answer is not None]
        if synthetic:
            out["exact_match"] = sum(exact_match(eval_rewarder.text(responses[i]), eval_prompts[i].answer)
                                     for i in synthetic) / len(synthetic)
        return out

    lm_batches = (ptx_batches(tok, sft_train, cfg.max_length, cfg.batch_size, params.seed)
                  if online.ptx_coef > 0 else None)
    log.info("%s: %d train prompts (%s), %d samples each, %d prompts per update, %d updates; %d held-out prompts",
             cfg.algorithm, len(train_prompts), dict(Counter(p.source for p in train_prompts)),
             online.samples_per_prompt, cfg.batch_size, cfg.max_steps, len(eval_prompts))
    history = train_online(Models(policy, reference, value, lm_batches), [p.ids for p in train_prompts], rewarder,
                           settings, eval_fn=evaluate if eval_prompts else None, on_log=run.log_step,
                           save_steps=None,
                           **resumable(root, "align", params, policy_dir, reward_dir, root / "data" / "prepared"))
    with stage_output(root, "align", run, model=policy, tokenizer=tok, history=history) as out:
        plot_rewards(history, out, cfg.algorithm)
        run.log_artifact(out / "reward_kl.png", "plots")
    metrics = final_metrics(history, ("reward_mean", "kl", "kl_coef", "entropy", "response_length", "eos_share",
                                      "clip_fraction", "approx_kl", "value_loss", "explained_variance",
                                      "eval_reward_mean", "eval_reward_model_mean", "eval_exact_match",
                                      "rollout_tokens_per_sec"))
    first = next((r for r in history if "eval_reward_mean" in r), None)  # step 0: the SFT start
    metrics.update(train_prompts=len(train_prompts), eval_prompts=len(eval_prompts),
                   reward_norm_mean=rewarder.norm[0], reward_norm_std=rewarder.norm[1],
                   **{f"prompts_cut_{k}": v for k, v in cut.items()})
    trained = [r for r in history if "reward_mean" in r]
    if trained:
        metrics["reward_mean_first"] = float(trained[0]["reward_mean"])
    if first is not None and first is not history[-1]:  # the held-out figures at the start, beside the last ones
        metrics.update({f"{k}_start": float(v) for k, v in first.items() if k.startswith("eval_")})
    return metrics


def plot_rewards(history: list[dict], out: Path, algorithm: str) -> None:
    """reward_kl.png: the rollout reward (and the held-out greedy reward) and the KL to the reference per update."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.5))
    left, right = fig.subplots(1, 2)
    for key, ax in (("reward_mean", left), ("eval_reward_mean", left), ("kl", right)):
        pts = [(r["step"], r[key]) for r in history if key in r]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if key.startswith("eval") else None,
                    label=key)
    left.set_title(f"{algorithm}: reward")
    right.set_title("KL to the SFT reference (per response)")
    for ax in (left, right):
        ax.set_xlabel("update")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "reward_kl.png", dpi=100, metadata={"Software": None})

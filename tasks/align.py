"""Stage `align`: preference optimisation of the SFT policy; the SFT model is the frozen reference.

`align.algorithm: dpo` (Rafailov et al. 2023) with loss_type sigmoid or ipo. The reference log-probs are
computed once before training (the reference never changes), so only the policy runs in the loop.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import torch

import instructflow  # noqa: F401
from instructflow.config import Params
from instructflow.stage import atomic_dir, final_metrics, read_prepared, run_stage, save_history, write_run_info
from instructflow.tracking import StageRun
from models.decoder import collate_pairs
from models.losses import dpo_loss, sequence_logprobs
from models.tokenizer import load_tokenizer
from models.training import LoopSettings, to_device, train
from tasks.reward import pair_lengths, preference_set

log = logging.getLogger("instructflow")


def pair_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed response log-probs and response lengths of a [chosen..., rejected...] batch."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (2B, T, V)
    logps, n_tokens = sequence_logprobs(logits, batch["labels"])  # (2B,), (2B,)
    chosen, rejected = logps.chunk(2)
    chosen_len, rejected_len = n_tokens.chunk(2)
    return chosen, rejected, chosen_len, rejected_len


@torch.no_grad()
def add_reference_logps(ref_model, pairs: list[dict], collate, batch_size: int) -> list[dict]:
    out = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        chosen, rejected, _, _ = pair_logps(ref_model, collate(chunk))
        out += [{**p, "ref_chosen_logps": float(c), "ref_rejected_logps": float(r)}
                for p, c, r in zip(chunk, chosen, rejected)]
    return out


def make_step(cfg):
    def dpo_step(model, batch: dict) -> tuple[torch.Tensor, dict, int]:
        chosen, rejected, chosen_len, rejected_len = pair_logps(model, batch)
        lengths = {"chosen_lengths": chosen_len.float(), "rejected_lengths": rejected_len.float()} \
            if cfg.loss_type == "ipo" else {}
        loss, r_chosen, r_rejected = dpo_loss(chosen, rejected, batch["ref_chosen_logps"],
                                              batch["ref_rejected_logps"], cfg.beta, cfg.loss_type, **lengths)
        metrics = {"reward_accuracy": float((r_chosen > r_rejected).float().mean()),
                   "reward_margin": float((r_chosen - r_rejected).mean()),
                   "chosen_reward": float(r_chosen.mean()), "rejected_reward": float(r_rejected.mean())}
        return loss, metrics, int(batch["attention_mask"].sum())
    return dpo_step


def body(params: Params, root: Path, run: StageRun) -> dict:
    from transformers import AutoModelForCausalLM

    cfg = params.align
    source = root / "artifacts" / "sft"
    tok = load_tokenizer(source)
    collate = partial(collate_pairs, pad_id=tok.pad_token_id)
    train_set = preference_set(tok, read_prepared(root, "preference_train"), cfg.max_length, "preference_train")
    eval_set = preference_set(tok, read_prepared(root, "preference_eval"), cfg.max_length, "preference_eval")
    reference = AutoModelForCausalLM.from_pretrained(source).eval()
    train_set = add_reference_logps(reference, train_set, collate, cfg.batch_size * 2)
    eval_set = add_reference_logps(reference, eval_set, collate, cfg.batch_size * 2)
    del reference
    policy = AutoModelForCausalLM.from_pretrained(source)
    log.info("%s (%s loss, beta %g): %d train / %d eval pairs", cfg.algorithm, cfg.loss_type, cfg.beta,
             len(train_set), len(eval_set))
    step = make_step(cfg)
    eval_batches = [collate(eval_set[i:i + cfg.batch_size]) for i in range(0, len(eval_set), cfg.batch_size)]

    def evaluate(model) -> dict[str, float]:
        rows = [step(model, to_device(batch, model))[:2] for batch in eval_batches]
        return {"loss": sum(float(r[0]) for r in rows) / len(rows),
                "reward_accuracy": sum(r[1]["reward_accuracy"] for r in rows) / len(rows),
                "reward_margin": sum(r[1]["reward_margin"] for r in rows) / len(rows)}

    history = train(policy, train_set, collate, step, LoopSettings.from_config(cfg, params.seed),
                    eval_fn=evaluate, on_log=run.log_step, lengths=pair_lengths(train_set))
    with atomic_dir(root / "artifacts" / "align") as out:
        policy.save_pretrained(out)
        tok.save_pretrained(out)
        save_history(history, "align", out, run)
        write_run_info(out, "align", run, params, algorithm=cfg.algorithm, loss_type=cfg.loss_type, beta=cfg.beta)
    metrics = final_metrics(history, ("loss", "reward_accuracy", "eval_loss", "eval_reward_accuracy",
                                      "eval_reward_margin", "tokens_per_sec"))
    metrics.update(train_pairs=len(train_set), eval_pairs=len(eval_set))
    return metrics


def main() -> None:
    run_stage("align", body)


if __name__ == "__main__":
    main()

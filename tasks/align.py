"""Stage `align`: preference optimisation of the SFT policy; the SFT model is the frozen reference.

`align.algorithm: dpo` (Rafailov et al. 2023) with loss_type sigmoid or ipo. The reference log-probs are
computed once before training (the reference never changes), so only the policy runs in the loop.
"""

from __future__ import annotations

import logging
from collections import Counter
from functools import partial
from pathlib import Path

import torch

from instructflow.config import Params
from models.decoder import collate_pairs
from models.losses import chosen_nll, dpo_loss, sequence_logprobs
from models.tokenizer import load_tokenizer
from models.training import LoopSettings, for_inference, rows_trained, to_device, train
from tasks.reward import cut_metrics, pair_lengths, preference_set
from tasks.runtime import final_metrics, read_prepared, resumable, run_stage, stage_output
from tasks.tracking import StageRun

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
    """The pairs with the frozen reference's summed response log-probs added, computed on the reference's device."""
    out = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        chosen, rejected, _, _ = pair_logps(ref_model, to_device(collate(chunk), ref_model))  # (b,), (b,)
        out += [{**p, "ref_chosen_logps": c, "ref_rejected_logps": r}
                for p, c, r in zip(chunk, chosen.tolist(), rejected.tolist())]  # one copy back per batch
    return out


def loop_knobs(cfg) -> str:
    """The knobs that feed the DPO loss and its rewards, named in a non-finite error (models.training)."""
    return (f"align.beta={cfg.beta:g}, align.loss_type={cfg.loss_type}, align.rpo_alpha={cfg.rpo_alpha:g}, "
            f"align.lr={cfg.lr:g}, align.max_grad_norm={cfg.max_grad_norm:g}")


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
        if cfg.rpo_alpha > 0:  # RPO: DPO plus the NLL of the chosen responses
            nll = chosen_nll(chosen, chosen_len.float())
            loss = loss + cfg.rpo_alpha * nll
            metrics["chosen_nll"] = float(nll.detach())
        return loss, metrics, int(batch["attention_mask"].sum())
    return dpo_step


def body(params: Params, root: Path, run: StageRun) -> dict:
    from transformers import AutoModelForCausalLM

    cfg = params.align
    source = root / "artifacts" / "sft"
    tok = load_tokenizer(source)
    collate = partial(collate_pairs, pad_id=tok.pad_token_id)
    cut = {"train": Counter(), "eval": Counter()}
    train_set = preference_set(tok, read_prepared(root, "preference_train"), cfg.max_length, "preference_train",
                               cut["train"])
    eval_set = preference_set(tok, read_prepared(root, "preference_eval"), cfg.max_length, "preference_eval",
                              cut["eval"])
    settings = LoopSettings.from_config(cfg, params.seed, knobs=loop_knobs(cfg))
    lengths = pair_lengths(train_set)
    # the frozen reference's log-probs, once, for the pairs training will draw in max_steps steps and for every
    # held-out pair; a pair never drawn keeps no reference value (its collate would fail loudly, not silently)
    used = rows_trained(len(train_set), settings, lengths)
    reference = for_inference(AutoModelForCausalLM.from_pretrained(source))  # where train() will put the policy
    for i, row in zip(used, add_reference_logps(reference, [train_set[i] for i in used], collate,
                                                 cfg.batch_size * 2)):
        train_set[i] = row
    eval_set = add_reference_logps(reference, eval_set, collate, cfg.batch_size * 2)
    del reference
    policy = AutoModelForCausalLM.from_pretrained(source)
    log.info("%s (%s loss, beta %g): %d train pairs, %d of them drawn in %d steps / %d eval pairs", cfg.algorithm,
             cfg.loss_type, cfg.beta, len(train_set), len(used), cfg.max_steps, len(eval_set))
    step = make_step(cfg)
    eval_batches = [collate(eval_set[i:i + cfg.batch_size]) for i in range(0, len(eval_set), cfg.batch_size)]

    def evaluate(model) -> dict[str, float]:
        rows = [step(model, to_device(batch, model))[:2] for batch in eval_batches]
        return {"loss": sum(float(r[0]) for r in rows) / len(rows),
                "reward_accuracy": sum(r[1]["reward_accuracy"] for r in rows) / len(rows),
                "reward_margin": sum(r[1]["reward_margin"] for r in rows) / len(rows)}

    history = train(policy, train_set, collate, step, settings, eval_fn=evaluate, on_log=run.log_step,
                    lengths=lengths,
                    **resumable(root, "align", params, root / "artifacts" / "sft", root / "data" / "prepared"))
    with stage_output(root, "align", run, model=policy, tokenizer=tok, history=history):
        pass
    metrics = final_metrics(history, ("loss", "reward_accuracy", "eval_loss", "eval_reward_accuracy",
                                      "eval_reward_margin", "tokens_per_sec"))
    metrics.update(train_pairs=len(train_set), pairs_drawn=len(used), eval_pairs=len(eval_set))
    metrics.update(cut_metrics(cut))
    return metrics


def main() -> None:
    run_stage("align", body)


if __name__ == "__main__":
    main()

"""Stage `pretrain`: a Llama-style causal LM from scratch on packed text, warmup + cosine, checkpoints."""

from __future__ import annotations

import logging
from pathlib import Path

from instructflow.config import Params
from instructflow.errors import InstructflowError
from tasks.runtime import final_metrics, read_prepared, resumable, run_stage, stage_output
from tasks.tracking import StageRun
from models.decoder import build_decoder, lm_eval_loss, lm_step, pack
from models.tokenizer import load_tokenizer
from models.training import LoopSettings, perplexity, train

log = logging.getLogger("instructflow")


def packed_blocks(tok, root: Path, name: str, seq_len: int):
    texts = [row["text"] for row in read_prepared(root, name)]
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    blocks = pack(ids, seq_len, tok.bos_token_id, tok.eos_token_id)  # (N, T)
    return [{"input_ids": b, "labels": b} for b in blocks]


def collate_blocks(rows: list[dict]) -> dict:
    import torch

    ids = torch.stack([r["input_ids"] for r in rows])  # (B, T), packed: no padding
    return {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}


def body(params: Params, root: Path, run: StageRun) -> dict:
    cfg = params.pretrain
    tok = load_tokenizer(root / "artifacts" / "tokenizer")
    train_set = packed_blocks(tok, root, "pretrain_train", cfg.seq_len)
    eval_set = packed_blocks(tok, root, "pretrain_eval", cfg.seq_len)
    if not eval_set:
        raise InstructflowError(f"held-out pretraining text is shorter than one block of {cfg.seq_len} tokens")
    model = build_decoder(tok, **cfg.model.model_dump())
    n_params = sum(p.numel() for p in model.parameters())
    log.info("decoder %.2fM parameters; %d training blocks of %d tokens (%d tokens), %d held-out blocks",
             n_params / 1e6, len(train_set), cfg.seq_len, len(train_set) * cfg.seq_len, len(eval_set))
    eval_batches = [collate_blocks(eval_set[i:i + cfg.batch_size]) for i in range(0, len(eval_set), cfg.batch_size)]
    settings = LoopSettings.from_config(cfg, params.seed)
    # a crashed or stopped run resumes on the same params, tokenizer and data (pretrain.resume: false starts over)
    checkpoints = resumable(root, "pretrain", params, root / "artifacts" / "tokenizer", root / "data" / "prepared")
    if not cfg.resume:
        checkpoints["resume_key"] = None
    history = train(model, train_set, collate_blocks, lm_step, settings,
                    eval_fn=lambda m: {"loss": lm_eval_loss(m, eval_batches)},
                    on_log=run.log_step, **checkpoints)
    with stage_output(root, "pretrain", run, model=model, tokenizer=tok, history=history):
        pass
    metrics = final_metrics(history, ("loss", "eval_loss", "tokens_per_sec"))
    metrics["eval_perplexity"] = perplexity(metrics["eval_loss"])
    metrics["n_params"] = n_params
    metrics["train_tokens"] = len(train_set) * cfg.seq_len
    return metrics


def main() -> None:
    run_stage("pretrain", body)


if __name__ == "__main__":
    main()

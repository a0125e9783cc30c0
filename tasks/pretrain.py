"""Stage `pretrain`: a Llama-style causal LM from scratch on packed text, warmup + cosine, checkpoints.

With `pretrain.base_model` set, no training: the base model's weights (its embeddings grown to the tokens the
tokenizer stage added) are saved with the fitted tokenizer, and their held-out loss is measured on the same
blocks a model trained here is scored on; the metrics say `trained: 0` and name the base.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from instructflow.config import Params
from instructflow.errors import ConfigError, InstructflowError
from instructflow.io import write_json_atomic
from tasks import base_model
from tasks.runtime import final_metrics, read_prepared, resumable, run_stage, stage_output
from tasks.tracking import StageRun
from models.base import load_base_decoder
from models.decoder import build_decoder, lm_eval_loss, lm_step, pack
from models.tokenizer import load_tokenizer
from models.training import LoopSettings, for_inference, inference_autocast, perplexity, train

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
    if cfg.base_model is not None:
        return from_base(params, root, run, tok)
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


def from_base(params: Params, root: Path, run: StageRun, tok) -> dict:
    """The base model saved as this stage's output, untrained here; its held-out loss measured."""
    cfg = params.pretrain
    base = base_model.source(root, params)
    model = load_base_decoder(base.model_dir, tok)
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions is not None and cfg.seq_len > max_positions:
        raise ConfigError(f"pretrain.seq_len = {cfg.seq_len} exceeds the base model's max_position_embeddings = "
                          f"{max_positions} ({cfg.base_model})")
    eval_set = packed_blocks(tok, root, "pretrain_eval", cfg.seq_len)
    if not eval_set:
        raise InstructflowError(f"held-out pretraining text is shorter than one block of {cfg.seq_len} tokens")
    eval_batches = [collate_blocks(eval_set[i:i + cfg.batch_size]) for i in range(0, len(eval_set), cfg.batch_size)]
    model = for_inference(model)
    with torch.no_grad(), inference_autocast(cfg.bf16):  # as train() scores a model trained here
        eval_loss = lm_eval_loss(model, eval_batches)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("base model %s: %.2fM parameters, not trained here; held-out loss %.4f on %d blocks",
             cfg.base_model, n_params / 1e6, eval_loss, len(eval_set))
    with stage_output(root, "pretrain", run, model=model, tokenizer=tok) as out:
        write_json_atomic(out / "base_model.json", base.record)
    return {"trained": 0, "base_params": n_params, "n_params": n_params, "eval_loss": eval_loss,
            "eval_perplexity": perplexity(eval_loss), "train_tokens": 0}


def main() -> None:
    run_stage("pretrain", body)


if __name__ == "__main__":
    main()

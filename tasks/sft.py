"""Stage `sft`: instruction tuning of the pretrained model; the loss covers only the responses and their EOS.

Multi-task records (data/prepared/multitask_train.jsonl) are composed here, under `sft.multitask`, and added to the
SFT rows: prepare stays strategy-agnostic, so comparing strategies reruns sft onward only.
"""

from __future__ import annotations

import logging
from collections import Counter
from functools import partial
from pathlib import Path

from instructflow import multitask
from instructflow.config import Params
from instructflow.errors import InstructflowError
from tasks.runtime import final_metrics, read_prepared, resumable, run_stage, stage_output
from tasks.tracking import StageRun
from models.decoder import collate_lm, lm_eval_loss, lm_step
from models.tokenizer import chat_example, load_tokenizer
from models.training import LoopSettings, perplexity, train

log = logging.getLogger("instructflow")


def sft_examples(tok, rows: list[dict], max_length: int, name: str = "sft",
                 counts: Counter | None = None) -> list[dict]:
    """Chat rows -> {input_ids, labels}, cut to max_length as chat_example says: the prompt is kept and the
    response truncated, or the row dropped when its prompt leaves no room; both counted in `counts` and logged."""
    counts = Counter() if counts is None else counts
    examples = [chat_example(tok, row["messages"], max_length, counts=counts) for row in rows]
    if counts["truncated"] or counts["dropped"]:
        log.warning("%s: %d of %d conversations are longer than sft.max_length %d: %d kept with the response "
                    "truncated, %d dropped (the prompt alone fills max_length)", name,
                    counts["truncated"] + counts["dropped"], len(rows), max_length, counts["truncated"],
                    counts["dropped"])
    return [e for e in examples if e is not None]


def multitask_rows(root: Path, strategy: str) -> list[dict]:
    """The multi-task records' SFT rows under the strategy (none when prepare wrote no multitask records)."""
    if not (root / "data" / "prepared" / "multitask_train.jsonl").is_file():
        return []
    return multitask.sft_rows(strategy, read_prepared(root, "multitask_train"))


def apply_lora(model, cfg):
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                      target_modules=list(cfg.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def body(params: Params, root: Path, run: StageRun) -> dict:
    from transformers import AutoModelForCausalLM

    cfg = params.sft
    source = root / "artifacts" / "pretrain"
    tok = load_tokenizer(source)
    model = AutoModelForCausalLM.from_pretrained(source)
    cut = {"train": Counter(), "eval": Counter()}
    train_set = sft_examples(tok, read_prepared(root, "sft_train"), cfg.max_length, "sft_train", cut["train"])
    eval_set = sft_examples(tok, read_prepared(root, "sft_eval"), cfg.max_length, "sft_eval", cut["eval"])
    mt_rows = multitask_rows(root, cfg.multitask)
    train_set += sft_examples(tok, mt_rows, cfg.max_length, f"multitask_train ({cfg.multitask})", cut["train"])
    if not train_set or not eval_set:
        raise InstructflowError(f"no SFT rows fit max_length {cfg.max_length}: raise sft.max_length")
    if cfg.method == "lora":
        model = apply_lora(model, cfg.lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("SFT (%s): %d train / %d eval conversations, %d trainable parameters",
             cfg.method, len(train_set), len(eval_set), trainable)
    collate = partial(collate_lm, pad_id=tok.pad_token_id)
    eval_batches = [collate(eval_set[i:i + cfg.batch_size]) for i in range(0, len(eval_set), cfg.batch_size)]
    settings = LoopSettings.from_config(cfg, params.seed, knobs=f"sft.lr={cfg.lr:g}, sft.max_grad_norm="
                                        f"{cfg.max_grad_norm:g}, sft.method={cfg.method}")
    # a run stopped by a signal leaves a checkpoint; a rerun on the same params, base model and data resumes it
    history = train(model, train_set, collate, lm_step, settings,
                    eval_fn=lambda m: {"loss": lm_eval_loss(m, eval_batches)}, on_log=run.log_step,
                    **resumable(root, "sft", params, root / "artifacts" / "pretrain", root / "data" / "prepared"))
    # not length-grouped (train(lengths=...)): measured on tiny, it halves the SFT time but exact match on the
    # held-out synthetic tasks fell from 0.135 to 0.04 (short synthetic rows then share batches only with each other)
    if cfg.method == "lora":
        model = model.merge_and_unload()  # a plain model: registered and loaded like a full fine-tune
    with stage_output(root, "sft", run, model=model, tokenizer=tok, history=history):
        pass
    metrics = final_metrics(history, ("loss", "eval_loss", "tokens_per_sec"))
    metrics["eval_perplexity"] = perplexity(metrics["eval_loss"])
    metrics["trainable_params"] = trainable
    metrics["train_rows"] = len(train_set)
    metrics["multitask_rows"] = len(mt_rows)
    metrics.update({f"{part}_rows_{what}": counter[what] for part, counter in cut.items()
                    for what in ("truncated", "dropped")})
    return metrics


def main() -> None:
    run_stage("sft", body)


if __name__ == "__main__":
    main()

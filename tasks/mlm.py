"""Stage `mlm`: a BERT-style encoder pretrained from scratch with dynamic masking (Devlin et al. 2019).

Each document of the pretraining text becomes `[CLS] chunk [SEP]` sequences of at most `seq_len`
tokens, framed by the encoder's own tokenizer (`models.encoder.encoder_tokenizer`), which is saved with
the model so that classify, `instructflow similarity` and a served encoder frame their inputs alike.
Every batch draws a fresh mask (15% of the tokens chosen, 80/10/10 [MASK]/random/kept) in the collate,
from a seeded generator, so a rerun sees the same masks. The held-out set is masked once
with its own seed, so its loss and masked-token accuracy compare across steps and runs.

The vocabulary head runs on the chosen positions only: with the tiny preset it is about as costly as
the encoder itself per position, and only ~15% of positions carry a loss.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from instructflow.config import Params
from instructflow.errors import InstructflowError
from models.encoder import (
    IGNORE_INDEX,
    build_encoder,
    encoder_tokenizer,
    frames_encoder_inputs,
    mask_tokens,
    masked_accuracy,
)
from models.tokenizer import load_tokenizer
from models.training import LoopSettings, to_device, train
from tasks.runtime import final_metrics, read_prepared, resumable, run_stage, stage_output
from tasks.tracking import StageRun

log = logging.getLogger("instructflow")


def chunk_documents(tok, texts: list[str], seq_len: int) -> list[list[int]]:
    """`[CLS] chunk [SEP]` id lists of at most seq_len tokens, in document order; long documents cut in equal chunks.

    Equal chunks (rather than full ones and a remainder) avoid one-token leftovers that carry no loss. `tok`
    is an encoder tokenizer: it adds [CLS] / [SEP] to each chunk itself (its truncation overflow), and the
    chunks are cut from the whole document's tokens, so they join back into exactly its ids.
    """
    if not frames_encoder_inputs(tok):
        raise ValueError("chunk_documents needs a tokenizer that adds [CLS] / [SEP] itself "
                         "(models.encoder.encoder_tokenizer)")
    n_specials = tok.num_special_tokens_to_add(pair=False)
    body = seq_len - n_specials
    if body < 1:
        raise ValueError(f"seq_len {seq_len} leaves no token of text beside the {n_specials} special tokens")
    by_size: dict[int, list[int]] = {}  # chunk size -> the documents cut into chunks of that size
    whole = tok(texts, add_special_tokens=False, verbose=False)["input_ids"]  # longer than seq_len: no warning
    for doc, ids in enumerate(whole):
        if ids:
            n_chunks = -(-len(ids) // body)
            by_size.setdefault(-(-len(ids) // n_chunks), []).append(doc)
    chunks: dict[int, list[list[int]]] = {}
    for size, docs in by_size.items():
        framed = tok([texts[doc] for doc in docs], truncation=True, max_length=size + n_specials,
                     return_overflowing_tokens=True, return_attention_mask=False)
        for ids, j in zip(framed["input_ids"], framed["overflow_to_sample_mapping"]):  # a document's chunks in order
            chunks.setdefault(docs[j], []).append(ids)
    return [ids for doc in sorted(chunks) for ids in chunks[doc]]


class MaskingCollate:
    """Pads a batch of id lists and masks it with BERT's 80/10/10 rule, from its own seeded generator."""

    def __init__(self, tok, mlm_probability: float, seed: int):
        self.pad_id, self.mask_id, self.vocab_size = tok.pad_token_id, tok.mask_token_id, len(tok)
        self.special_ids = torch.tensor(sorted(set(tok.all_special_ids)))
        self.mlm_probability = mlm_probability
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, rows: list[list[int]]) -> dict[str, torch.Tensor]:
        width = max(len(row) for row in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)  # (B, T)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
        attention_mask = (torch.arange(width) < torch.tensor([len(r) for r in rows]).unsqueeze(1)).long()  # (B, T)
        masked, labels = mask_tokens(ids, self.special_ids, self.mask_id, self.vocab_size,
                                     self.mlm_probability, generator=self.generator)
        return {"input_ids": masked, "attention_mask": attention_mask,
                "token_type_ids": torch.zeros_like(ids), "labels": labels}


class ChosenPositionsMLM(torch.nn.Module):
    """A BertForMaskedLM whose vocabulary head is applied at the chosen (labelled) positions only.

    One module, so Accelerate's autocast and DDP wrap the whole forward pass; `mlm` is what is saved.
    """

    def __init__(self, mlm: torch.nn.Module):
        super().__init__()
        self.mlm = mlm

    def forward(self, input_ids, attention_mask, token_type_ids, labels) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.mlm.bert(input_ids, attention_mask=attention_mask,
                               token_type_ids=token_type_ids).last_hidden_state  # (B, T, H)
        chosen = labels != IGNORE_INDEX  # (B, T)
        logits = self.mlm.cls(hidden[chosen])  # (N, V), N chosen positions in the batch
        return logits, labels[chosen]  # (N, V), (N,)


def masked_lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the chosen positions; 0 (not NaN) for a batch where none was chosen."""
    total = F.cross_entropy(logits.float(), targets, reduction="sum")  # logits (N, V), targets (N,)
    return total / max(targets.numel(), 1)


def mlm_step(model, batch: dict) -> tuple[torch.Tensor, dict, int]:
    logits, targets = model(**batch)
    correct, total = masked_accuracy(logits, targets)
    n_tokens = int(batch["attention_mask"].sum())
    return masked_lm_loss(logits, targets), {"masked_accuracy": correct / max(total, 1)}, n_tokens


@torch.no_grad()
def masked_eval(model, batches: list[dict]) -> dict[str, float]:
    """Held-out loss and masked-token accuracy over every chosen position of the (fixed) masked batches."""
    loss_sum, correct, total = 0.0, 0, 0
    for batch in batches:
        logits, targets = model(**to_device(batch, model))
        loss_sum += float(F.cross_entropy(logits.float(), targets, reduction="sum"))
        hits, n = masked_accuracy(logits, targets)
        correct, total = correct + hits, total + n
    if total == 0:
        raise InstructflowError("held-out masking chose no token at all: the held-out pretraining text is too short")
    return {"loss": loss_sum / total, "masked_accuracy": correct / total}


def body(params: Params, root: Path, run: StageRun) -> dict:
    cfg = params.mlm
    if cfg.seq_len > cfg.model.max_position_embeddings:
        raise InstructflowError(f"mlm.seq_len = {cfg.seq_len} exceeds mlm.model.max_position_embeddings = "
                                f"{cfg.model.max_position_embeddings}: lower the first or raise the second")
    shared = load_tokenizer(root / "artifacts" / "tokenizer")
    if None in (shared.cls_token_id, shared.sep_token_id, shared.mask_token_id, shared.pad_token_id):
        raise InstructflowError(f"{root / 'artifacts' / 'tokenizer'}: the tokenizer lacks [CLS], [SEP], [MASK] or "
                                "padding; rerun the tokenizer stage")
    # the encoder's copy adds [CLS] / [SEP] itself (the shared one, the decoder's, adds nothing); saved with the
    # model, it cuts served and embedded inputs to the length pretrained on
    tok = encoder_tokenizer(shared, cfg.seq_len)
    train_set = chunk_documents(tok, [r["text"] for r in read_prepared(root, "pretrain_train")], cfg.seq_len)
    eval_set = chunk_documents(tok, [r["text"] for r in read_prepared(root, "pretrain_eval")], cfg.seq_len)
    if not eval_set:
        raise InstructflowError("data/prepared/pretrain_eval.jsonl has no text to evaluate the masked LM on")

    mlm = build_encoder(len(tok), tok.pad_token_id, **cfg.model.model_dump())
    n_params = sum(p.numel() for p in mlm.parameters())
    train_tokens = sum(len(s) for s in train_set)
    log.info("encoder %.2fM parameters; %d training sequences (%d tokens) of up to %d tokens, %d held-out",
             n_params / 1e6, len(train_set), train_tokens, cfg.seq_len, len(eval_set))

    # the held-out set is masked once, with a seed of its own: every evaluation scores the same positions
    eval_collate = MaskingCollate(tok, cfg.mlm_probability, seed=params.seed + 1)
    eval_batches = [eval_collate(eval_set[i:i + cfg.batch_size]) for i in range(0, len(eval_set), cfg.batch_size)]
    model = ChosenPositionsMLM(mlm)
    history = train(model, train_set, MaskingCollate(tok, cfg.mlm_probability, seed=params.seed), mlm_step,
                    LoopSettings.from_config(cfg, params.seed),
                    eval_fn=lambda m: masked_eval(m, eval_batches), on_log=run.log_step,
                    **resumable(root, "mlm", params, root / "artifacts" / "tokenizer", root / "data" / "prepared"))

    with stage_output(root, "mlm", run, model=mlm, tokenizer=tok, history=history):
        pass
    metrics = final_metrics(history, ("loss", "masked_accuracy", "eval_loss", "eval_masked_accuracy", "tokens_per_sec"))
    metrics.update(n_params=n_params, train_tokens=train_tokens)
    return metrics


def main() -> None:
    run_stage("mlm", body)


if __name__ == "__main__":
    main()

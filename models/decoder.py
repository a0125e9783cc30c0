"""Llama-style causal LM built from config (random init), and the data shapes it trains on."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from models.tokenizer import IGNORE_INDEX, encode_chat
from models.training import to_device


def build_decoder(tok: PreTrainedTokenizerBase, hidden_size: int, num_layers: int, num_heads: int,
                  intermediate_size: int, max_position_embeddings: int, num_kv_heads: int | None = None,
                  rope_theta: float = 10000.0, tie_word_embeddings: bool = True) -> LlamaForCausalLM:
    """A Llama architecture (RMSNorm, RoPE, SwiGLU, GQA) sized by the preset; vocabulary from the tokenizer."""
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        rope_theta=rope_theta,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        attention_bias=False,
        initializer_range=0.02,
    )
    return LlamaForCausalLM(config)


def pack(documents: Iterable[Sequence[int]], seq_len: int, bos_id: int, eos_id: int) -> torch.Tensor:
    """Concatenate <|bos|> doc <|eos|> streams and cut them into (N, seq_len) blocks; the tail is dropped.

    Packing wastes no compute on padding; attention may cross a document boundary, as in GPT pretraining.
    """
    stream: list[int] = []
    for doc in documents:
        stream += [bos_id, *doc, eos_id]
    n = len(stream) // seq_len
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)  # (N, T)


def pad_batch(rows: Sequence[Sequence[int]], pad_value: int, side: str = "right",
              device: torch.device | str | None = None) -> torch.Tensor:
    """(B, T_max) long tensor of variable-length rows, padded right (training, scoring) or left (generation).

    One routine for both sides: training batches, the judge's batches and generation's prompts are padded here,
    on `device` (built in one piece, not row by row: a GPU gets one copy per batch).
    """
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    width = max(len(r) for r in rows)
    fill = [[pad_value] * (width - len(r)) for r in rows]
    padded = [[*r, *f] if side == "right" else [*f, *r] for r, f in zip(rows, fill)]
    return torch.tensor(padded, dtype=torch.long, device=device).view(len(rows), width)  # (B, T)


def pad_inputs(rows: Sequence[Sequence[int]], pad_id: int, side: str = "right",
               device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """{input_ids, attention_mask}, each (B, T_max): the rows padded on `side`, the mask 1 on real tokens."""
    return {"input_ids": pad_batch(rows, pad_id, side, device),  # (B, T)
            "attention_mask": pad_batch([[1] * len(r) for r in rows], 0, side, device)}  # (B, T)


def collate_lm(rows: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows of {input_ids, labels} -> right-padded batch; padding is masked out of attention and loss."""
    inputs = pad_inputs([r["input_ids"] for r in rows], pad_id)  # (B, T) each
    return {**inputs, "labels": pad_batch([r["labels"] for r in rows], IGNORE_INDEX)}  # labels (B, T)


def collate_pairs(rows: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows of {chosen: {input_ids, labels}, rejected: {...}} -> one batch [chosen..., rejected...] of 2B rows."""
    flat = [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
    batch = collate_lm(flat, pad_id)
    extra = {k: torch.tensor([r[k] for r in rows], dtype=torch.float32)
             for k in ("ref_chosen_logps", "ref_rejected_logps") if k in rows[0]}
    return {**batch, **extra}


def collate_groups(rows: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows of {responses: [{input_ids, labels}, ...], pairs: [(better, worse), ...]} (one ranked list each) -> one
    batch of every row's responses, each once (N rows), with pairs (P, 2) indexing that batch and group_of_pair (P,)
    numbering each pair's row 0..B-1: what models.losses.kwise_loss takes."""
    flat, pairs, group_of_pair = [], [], []
    for g, row in enumerate(rows):
        pairs += [(len(flat) + better, len(flat) + worse) for better, worse in row["pairs"]]
        group_of_pair += [g] * len(row["pairs"])
        flat += row["responses"]
    return {**collate_lm(flat, pad_id),  # input_ids, attention_mask, labels (N, T)
            "pairs": torch.tensor(pairs, dtype=torch.long).view(-1, 2),  # (P, 2)
            "group_of_pair": torch.tensor(group_of_pair, dtype=torch.long)}  # (P,)


def reward_scores(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Scalar rewards (B,) of a padded batch {input_ids, attention_mask}, in float32, on the model's device.

    The one reward-scoring function (reward training and evaluation, evaluate's judge and pairwise accuracy).
    A sequence-classification head (AutoModelForSequenceClassification, num_labels=1, pad_token_id set) reads
    its score at each row's last non-pad token, so right and left padding score alike. The batch is moved to
    the model's device first.
    """
    batch = to_device(batch, model)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, 1)
    return logits.squeeze(-1).float()  # (B,)


def lm_step(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict, int]:
    """Teacher forcing under the causal mask: mean cross-entropy of each next token where labels != -100."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=batch["labels"])
    n_tokens = int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
    return out.loss, {}, n_tokens


@torch.no_grad()
def lm_eval_loss(model: torch.nn.Module, batches: Iterable[dict]) -> float:
    """Token-weighted mean next-token loss over held-out batches (exp of it is the perplexity)."""
    total, count = 0.0, 0
    for batch in batches:
        batch = to_device(batch, model)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
        labels = batch["labels"][:, 1:]  # (B, T-1): token t+1 is predicted at t
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.size(-1)), labels.reshape(-1),
            ignore_index=IGNORE_INDEX, reduction="sum")
        total += float(loss)
        count += int((labels != IGNORE_INDEX).sum())
    if count == 0:
        raise ValueError("no held-out tokens to evaluate")
    return total / count


def fit_prompt(ids: list[int], limit: int) -> list[int]:
    """Keep <|bos|> and the last tokens of a prompt so prompt + answer fit the model's positions."""
    return ids if len(ids) <= limit else ids[:1] + ids[len(ids) - limit + 1:]


class Judge:
    """Scores (prompt, response) pairs with the reward model, on the reward model's device, laid out as the reward
    stage trained it (the chat template; a long prompt keeps <|bos|> and its end)."""

    def __init__(self, model, tok, max_length: int, batch_size: int):
        self.model, self.tok, self.max_length, self.batch_size = model, tok, max_length, batch_size

    @torch.no_grad()
    def __call__(self, prompts: list[list[dict]], responses: list[str]) -> list[float]:
        rows = []
        for messages, response in zip(prompts, responses):
            ids, _ = encode_chat(self.tok, [*messages, {"role": "assistant", "content": response}])
            rows.append(fit_prompt(ids, self.max_length))
        scores = []
        for i in range(0, len(rows), self.batch_size):
            batch = pad_inputs(rows[i:i + self.batch_size], self.tok.pad_token_id)  # (b, T) each
            scores += reward_scores(self.model, batch).tolist()
        return scores

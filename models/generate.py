"""Autoregressive generation on token ids for a Hugging Face causal LM.

Knows nothing about tokenization: prompts in, new token ids out. Prompts of different
lengths share a batch with LEFT padding, so every row's next token sits in the last
column; the attention mask hides the pads and position_ids count real tokens only, so a
padded row computes what it would compute alone.

transformers 5.x names the KV cache argument `cache` (`past_key_values` is a deprecated
alias) and takes no `cache_position`: the mask offsets come from the cache's own length,
and position_ids only feed the rotary embedding.

Every tensor is made on the model's device (`model_device`), so generation and scoring run
wherever the model was put: on a GPU nothing is built on the CPU but the final id lists.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache

from models.decoder import pad_batch, pad_inputs
from models.losses import sequence_logprobs
from models.tokenizer import IGNORE_INDEX
from models.training import model_device


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    """ValueError unless temperature >= 0, top_k >= 0 and 0 < top_p <= 1 (what `sample_next` takes)."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token per row from next-token logits (B, V) -> (B,).

    temperature 0 is greedy (argmax). Otherwise: divide by temperature, keep the top_k
    logits (0 = all; ties with the k-th are kept), keep the smallest set of most likely
    tokens whose probability reaches top_p (Holtzman et al. 2019, nucleus sampling; the
    most likely token always stays), then draw from what is left.
    """
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)  # (B,)

    logits = logits.float() / temperature  # (B, V)
    if top_k > 0:
        k = min(top_k, logits.size(-1))
        kth = torch.topk(logits, k, dim=-1).values[:, -1:]  # (B, 1)  the k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))  # (B, V)
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True)  # (B, V), (B, V)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)  # (B, V)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # (B, V)  mass of the tokens ranked above
        # drop a token once the tokens above it already reach top_p; the first has mass_before 0 < top_p
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))  # (B, V)
        logits = torch.full_like(logits, float("-inf")).scatter(-1, sorted_idx, sorted_logits)  # (B, V)
    probs = torch.softmax(logits, dim=-1)  # (B, V)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)  # (B,)


def _as_lists(input_ids: Sequence[Sequence[int]] | torch.Tensor) -> list[list[int]]:
    """Prompts as lists of ids; a (B, T) tensor is B unpadded prompts of length T."""
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids tensor must be (B, T), got shape {tuple(input_ids.shape)}")
        input_ids = input_ids.tolist()
    prompts = [list(map(int, p)) for p in input_ids]
    if not prompts:
        raise ValueError("got no prompts")
    empty = [i for i, p in enumerate(prompts) if not p]
    if empty:
        raise ValueError(f"prompts must have at least one token, prompts {empty} are empty")
    return prompts


def _left_padded(rows: list[list[int]], pad_token_id: int,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, position_ids), each (B, T) on `device`: `pad_inputs` on the left, plus positions."""
    batch = pad_inputs(rows, pad_token_id, "left", device)
    mask = batch["attention_mask"]  # (B, T)
    # position of a real token = how many real tokens precede it; pads get 0 (masked anyway)
    positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)  # (B, T)
    return batch["input_ids"], mask, positions


def generate(
    model: torch.nn.Module,
    input_ids: Sequence[Sequence[int]] | torch.Tensor,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    use_cache: bool = True,
    return_logprobs: bool = False,
) -> list[list[int]] | tuple[list[list[int]], list[list[float]]]:
    """New tokens for each prompt, up to and including the first eos, without padding.

    return_logprobs=True also returns each new token's log-prob under the sampling distribution before top-k /
    top-p: log softmax(logits / temperature) (plain log softmax when greedy), what an online RL loop's "old"
    log-probs are (models/online.py recomputes them in its training layout; tests check the two agree).

    use_cache=True runs the prompt once, then feeds one token per step against the KV
    cache. use_cache=False recomputes the whole sequence every step: slow, but the
    reference the cached path is tested against. With the same seed both draw the same
    samples. The model's train/eval mode is restored afterwards.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    prompts = _as_lists(input_ids)
    if max_new_tokens == 0:
        return ([[] for _ in prompts], [[] for _ in prompts]) if return_logprobs else [[] for _ in prompts]
    device = model_device(model)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ids, mask, positions = _left_padded(prompts, pad_token_id, device)  # (B, T) each
            B = ids.size(0)
            cache = DynamicCache(config=model.config) if use_cache else None
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=use_cache)
            logits = out.logits[:, -1, :]  # (B, V)
            finished = torch.zeros(B, dtype=torch.bool, device=device)  # (B,)
            new_tokens, new_logprobs = [], []
            for step in range(max_new_tokens):
                next_token = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
                next_token = next_token.masked_fill(finished, pad_token_id)  # finished rows emit pad
                new_tokens.append(next_token)
                if return_logprobs:
                    scaled = logits.float() / (temperature if temperature > 0 else 1.0)  # (B, V)
                    new_logprobs.append(scaled.gather(-1, next_token[:, None]).squeeze(-1)
                                        - torch.logsumexp(scaled, dim=-1))  # (B,)
                finished |= next_token == eos_token_id
                if finished.all() or step == max_new_tokens - 1:
                    break
                next_position = positions[:, -1:] + 1  # (B, 1)
                ids = torch.cat([ids, next_token[:, None]], dim=1)  # (B, T+1)
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)  # (B, T+1)
                positions = torch.cat([positions, next_position], dim=1)  # (B, T+1)
                if use_cache:
                    # the mask covers cached + new tokens; ids and positions cover the new token only
                    out = model(
                        input_ids=next_token[:, None], attention_mask=mask, position_ids=next_position,
                        cache=cache, use_cache=True,
                    )  # fmt: skip
                else:
                    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
                logits = out.logits[:, -1, :]  # (B, V)
    finally:
        model.train(was_training)

    rows = torch.stack(new_tokens, dim=1).tolist()  # (B, steps)
    results = []
    for row in rows:
        if eos_token_id in row:
            row = row[: row.index(eos_token_id) + 1]
        results.append(row)
    if return_logprobs:
        logprobs = torch.stack(new_logprobs, dim=1).tolist()  # (B, steps)
        return results, [lp[: len(row)] for lp, row in zip(logprobs, results)]
    return results


def generate_batched(model, prompts: list[list[int]], batch_size: int, seed: int | None = None,
                     **sampling) -> list[list[int]]:
    """`generate` over the prompts batch_size at a time; the batch starting at row i draws with seed + i."""
    outs = []
    for i in range(0, len(prompts), batch_size):
        outs += generate(model, prompts[i:i + batch_size], seed=None if seed is None else seed + i, **sampling)
    return outs


def sequence_logprobs_of(
    model: torch.nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    batch_size: int = 16,
) -> list[float]:
    """Sum of log p(completion | prompt) per pair, for KL estimates and reward comparisons.

    Batches pairs with left padding, like `generate`, so a score does not depend on what
    else is in the batch beyond float rounding.
    """
    prompts = _as_lists(prompt_ids)
    completions = [list(map(int, c)) for c in completion_ids]
    if len(prompts) != len(completions):
        raise ValueError(f"got {len(prompts)} prompts but {len(completions)} completions")
    device = model_device(model)

    was_training = model.training
    model.eval()
    scores: list[float] = []
    try:
        with torch.no_grad():
            for start in range(0, len(prompts), batch_size):
                pairs = list(zip(prompts[start : start + batch_size], completions[start : start + batch_size]))
                ids, mask, positions = _left_padded([p + c for p, c in pairs], 0, device)  # (b, T) each
                # score only the completion: label = id on completion tokens, -100 on pads and prompt
                labels = pad_batch(
                    [[IGNORE_INDEX] * len(p) + c for p, c in pairs], IGNORE_INDEX, "left", device
                )  # (b, T)  aligned with ids: both are left-padded to the same width
                logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
                sum_logps, _ = sequence_logprobs(logits, labels)  # (b,)
                scores.extend(sum_logps.tolist())
    finally:
        model.train(was_training)
    return scores

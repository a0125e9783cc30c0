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

Beyond temperature / top-k / top-p: a repetition penalty (CTRL, Keskar et al. 2019, as Hugging Face applies
it) and a per-row `should_stop(new_ids)` callback that ends a row early (tasks/generation.py checks stop
strings with it; this module stays free of tokenizers). A seed is one generator for the whole batch, or one
seed per row: then each row draws from its own generator and its samples do not depend on what else is in
the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

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


def check_repetition_penalty(penalty: float) -> None:
    """ValueError unless penalty > 0 (1 = off)."""
    if not penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {penalty}")


def seen_tokens(ids: torch.Tensor, mask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(B, V) bool: which token ids occur among each row's real tokens (pads, mask 0, do not count)."""
    # pads are sent to an extra column V, dropped afterwards, so they cannot mark a real id as seen
    idx = ids.masked_fill(mask == 0, vocab_size)  # (B, T)
    seen = torch.zeros(ids.size(0), vocab_size + 1, dtype=torch.bool, device=ids.device)  # (B, V+1)
    return seen.scatter_(1, idx, True)[:, :vocab_size]  # (B, V)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty as Hugging Face applies it: for every id already seen in the row (prompt or
    generated), logit / penalty where the logit is positive, logit * penalty where it is not; others unchanged.

    logits (B, V), seen (B, V) bool -> (B, V). penalty 1 is off; above 1 discourages repeats, below 1 favours them.
    """
    check_repetition_penalty(penalty)
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)  # (B, V)
    return torch.where(seen, penalised, logits)  # (B, V)


def _draw(probs: torch.Tensor, generator: torch.Generator | Sequence[torch.Generator] | None) -> torch.Tensor:
    """One id per row of probs (B, V) -> (B,): from one generator for the batch, or from each row's own."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)  # (B,)
    if len(generator) != probs.size(0):
        raise ValueError(f"got {len(generator)} generators for {probs.size(0)} rows; expected one per row")
    # inverse CDF on one uniform per row from the row's generator: a row's draw depends on its own state only
    u = torch.cat([torch.rand(1, generator=g, device=probs.device) for g in generator])  # (B,)
    cdf = probs.cumsum(dim=-1)  # (B, V)
    # right=True: the first id whose cdf exceeds u; an id of probability 0 has cdf equal to the one before it
    picked = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(-1)  # (B,)
    return picked.clamp(max=probs.size(-1) - 1)


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """Pick one token per row from next-token logits (B, V) -> (B,).

    temperature 0 is greedy (argmax). Otherwise: divide by temperature, keep the top_k
    logits (0 = all; ties with the k-th are kept), keep the smallest set of most likely
    tokens whose probability reaches top_p (Holtzman et al. 2019, nucleus sampling; the
    most likely token always stays), then draw from what is left: with `generator`, one
    torch.Generator for the batch, or a list of one per row (each row then draws from its own).
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
    return _draw(probs, generator)  # (B,)


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
    seed: int | Sequence[int] | None = None,
    use_cache: bool = True,
    return_logprobs: bool = False,
    repetition_penalty: float = 1.0,
    should_stop: Callable[[list[int]], bool] | None = None,
) -> list[list[int]] | tuple[list[list[int]], list[list[float]]]:
    """New tokens for each prompt, up to and including the first eos, without padding.

    return_logprobs=True also returns each new token's log-prob under the sampling distribution before top-k /
    top-p: log softmax(logits / temperature) (plain log softmax when greedy), what an online RL loop's "old"
    log-probs are (models/online.py recomputes them in its training layout; tests check the two agree). They
    are the model's own: the repetition penalty, which changes what is drawn, is not in them.

    use_cache=True runs the prompt once, then feeds one token per step against the KV
    cache. use_cache=False recomputes the whole sequence every step: slow, but the
    reference the cached path is tested against. With the same seed both draw the same
    samples. The model's train/eval mode is restored afterwards.

    seed: an int seeds one generator for the batch; a list of ints (one per prompt) gives each row its own
    generator, so a row's samples are the same whatever batch it is in. repetition_penalty (1 = off) is
    applied to the logits before temperature (`apply_repetition_penalty`). should_stop(new_ids) is asked
    after every step about each unfinished row's new tokens so far; True ends the row there, the token that
    made it true included (a caller checking stop strings cuts the text itself).
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    check_repetition_penalty(repetition_penalty)
    prompts = _as_lists(input_ids)
    if max_new_tokens == 0:
        return ([[] for _ in prompts], [[] for _ in prompts]) if return_logprobs else [[] for _ in prompts]
    device = model_device(model)
    generator = _generators(seed, len(prompts), device)

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ids, mask, positions = _left_padded(prompts, pad_token_id, device)  # (B, T) each
            B = ids.size(0)
            cache = DynamicCache(config=model.config) if use_cache else None
            # logits_to_keep=1: only the last position's logits are needed, not a (B, T, V) tensor
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=use_cache,
                        logits_to_keep=1)
            logits = out.logits[:, -1, :]  # (B, V)
            seen = seen_tokens(ids, mask, logits.size(-1)) if repetition_penalty != 1.0 else None  # (B, V)
            finished = torch.zeros(B, dtype=torch.bool, device=device)  # (B,)
            lengths = [max_new_tokens] * B  # where should_stop ended a row
            so_far: list[list[int]] = [[] for _ in range(B)]  # new ids per row, for should_stop
            new_tokens, new_logprobs = [], []
            for step in range(max_new_tokens):
                scores = logits if seen is None else apply_repetition_penalty(logits, seen, repetition_penalty)
                next_token = sample_next(scores, temperature, top_k, top_p, generator)  # (B,)
                next_token = next_token.masked_fill(finished, pad_token_id)  # finished rows emit pad
                new_tokens.append(next_token)
                if return_logprobs:
                    scaled = logits.float() / (temperature if temperature > 0 else 1.0)  # (B, V)
                    new_logprobs.append(scaled.gather(-1, next_token[:, None]).squeeze(-1)
                                        - torch.logsumexp(scaled, dim=-1))  # (B,)
                if seen is not None:
                    seen.scatter_(1, next_token[:, None], True)  # (B, V)
                finished |= next_token == eos_token_id
                if should_stop is not None:
                    finished |= _asked_to_stop(should_stop, next_token, finished, so_far, lengths, step)
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
                    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                                logits_to_keep=1)
                logits = out.logits[:, -1, :]  # (B, V)
    finally:
        model.train(was_training)

    rows = torch.stack(new_tokens, dim=1).tolist()  # (B, steps)
    results = []
    for row, length in zip(rows, lengths):
        row = row[:length]
        if eos_token_id in row:
            row = row[: row.index(eos_token_id) + 1]
        results.append(row)
    if return_logprobs:
        logprobs = torch.stack(new_logprobs, dim=1).tolist()  # (B, steps)
        return results, [lp[: len(row)] for lp, row in zip(logprobs, results)]
    return results


def _generators(seed: int | Sequence[int] | None, rows: int,
                device: torch.device) -> torch.Generator | list[torch.Generator] | None:
    """None, one generator seeded with `seed`, or one per row from a list of seeds."""
    if seed is None:
        return None
    if isinstance(seed, int):
        return torch.Generator(device=device).manual_seed(seed)
    if len(seed) != rows:
        raise ValueError(f"got {len(seed)} seeds for {rows} prompts; expected one int, or one seed per prompt")
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seed]


def _asked_to_stop(should_stop: Callable[[list[int]], bool], next_token: torch.Tensor, finished: torch.Tensor,
                   so_far: list[list[int]], lengths: list[int], step: int) -> torch.Tensor:
    """(B,) bool: the rows still running whose new ids, this step's included, should_stop ends; their lengths set."""
    done = finished.tolist()
    stop = [False] * len(done)
    for row, token in enumerate(next_token.tolist()):
        if done[row]:  # ended by eos (this step or before) or by an earlier stop
            continue
        so_far[row].append(token)
        if should_stop(so_far[row]):
            stop[row], lengths[row] = True, step + 1
    return torch.tensor(stop, device=finished.device)


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

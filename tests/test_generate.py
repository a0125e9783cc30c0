"""Sampling rules on hand-made logits; generation on a tiny random Llama."""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from models.generate import generate, sample_next, sequence_logprobs_of

PAD, EOS = 0, 2
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]  # different lengths: the second is left-padded by 4


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=PAD, bos_token_id=1, eos_token_id=EOS,
        # init std 0.5 rather than 0.02 spreads the logits, so greedy choices are not decided by float rounding
        initializer_range=0.5,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def gen(model, prompts, **kwargs):
    args = {"max_new_tokens": 10, "eos_token_id": EOS, "pad_token_id": PAD, **kwargs}
    return generate(model, prompts, **args)


# ---- sample_next -------------------------------------------------------------------


def random_logits(rows=8, vocab=16, seed=0):
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3  # (rows, vocab), no ties


def test_greedy_picks_argmax():
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.9], [5.0, 0.0, 0.0, 0.0]])
    assert sample_next(logits, temperature=0.0).tolist() == [1, 0]


@pytest.mark.parametrize("temperature", [0.5, 1.0, 10.0])
def test_top_k_1_and_tiny_top_p_are_greedy_at_any_temperature(temperature):
    logits = random_logits()
    greedy = logits.argmax(-1)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        assert torch.equal(sample_next(logits, temperature, top_k=1, generator=g), greedy)
        assert torch.equal(sample_next(logits, temperature, top_p=1e-6, generator=g), greedy)


def test_top_k_2_never_leaves_the_top_2():
    logits = torch.tensor([[0.0, 3.0, -2.0, 2.5, 1.0]]).expand(4000, 5)  # top 2 are ids 1 and 3
    # temperature 10 flattens the distribution, so without the filter ids 0, 2, 4 would be common
    draws = sample_next(logits, temperature=10.0, top_k=2, generator=torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {1, 3}


def test_top_p_keeps_the_smallest_set_reaching_p():
    # probs 0.5, 0.3, 0.15, 0.05; top_p 0.7: id 0 (mass before 0), id 1 (mass before 0.5 < 0.7) stay;
    # id 2 has mass 0.8 >= 0.7 above it and goes. Renormalised: p(0) = 0.5 / 0.8 = 0.625
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().expand(4000, 4)
    draws = sample_next(logits, temperature=1.0, top_p=0.7, generator=torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {0, 1}
    # binomial sd = sqrt(0.625 * 0.375 / 4000) = 0.0077; allow 4 sd
    assert (draws == 0).float().mean().item() == pytest.approx(0.625, abs=0.031)


def test_sampling_is_reproducible_with_a_seeded_generator():
    logits = random_logits()
    a = [sample_next(logits, 1.0, generator=g) for g in [torch.Generator().manual_seed(7)] for _ in range(5)]
    b = [sample_next(logits, 1.0, generator=g) for g in [torch.Generator().manual_seed(7)] for _ in range(5)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize(
    "kwargs, message",
    [({"temperature": -1.0}, "got -1.0"), ({"temperature": 1.0, "top_p": 0.0}, r"\(0, 1\], got 0.0"),
     ({"temperature": 1.0, "top_k": -2}, "got -2")],
)  # fmt: skip
def test_sample_next_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sample_next(random_logits(), **kwargs)


# ---- generate ----------------------------------------------------------------------


def test_cached_greedy_matches_recomputing_the_whole_sequence(model):
    with_cache = gen(model, PROMPTS, eos_token_id=-1, use_cache=True)
    without_cache = gen(model, PROMPTS, eos_token_id=-1, use_cache=False)
    assert with_cache == without_cache
    assert [len(r) for r in with_cache] == [10, 10]


def test_left_padded_batch_matches_each_prompt_alone(model):
    batched = gen(model, PROMPTS, eos_token_id=-1)
    alone = [gen(model, [p], eos_token_id=-1)[0] for p in PROMPTS]
    assert batched == alone
    assert batched[0] != batched[1]


def test_stops_at_eos_and_drops_padding(model):
    # given the free-running greedy output of prompt 0, call its token at step 3 the eos
    free = gen(model, PROMPTS, eos_token_id=-1)
    eos = free[0][3]
    first = free[0].index(eos)  # the first time that token appears, at step 3 or earlier
    # when
    out = gen(model, PROMPTS, eos_token_id=eos)
    # then row 0 ends at that eos, inclusive, with no pads after it
    assert out[0] == free[0][: first + 1]
    # and row 1 runs on, unchanged by row 0 finishing, up to its own first eos if any
    expected_1 = free[1][: free[1].index(eos) + 1] if eos in free[1] else free[1]
    assert out[1] == expected_1


def test_sampling_is_reproducible_with_seed_and_the_same_with_or_without_cache(model):
    kwargs = {"temperature": 1.0, "top_k": 20, "top_p": 0.95, "eos_token_id": -1}
    a = gen(model, PROMPTS, seed=123, **kwargs)
    assert a == gen(model, PROMPTS, seed=123, **kwargs)
    assert a == gen(model, PROMPTS, seed=123, use_cache=False, **kwargs)


def test_generate_takes_a_tensor_and_restores_train_mode(model):
    model.train()
    try:
        out = gen(model, torch.tensor([PROMPTS[0]]), eos_token_id=-1, max_new_tokens=4)
        assert model.training
    finally:
        model.eval()
    assert out == [gen(model, [PROMPTS[0]], eos_token_id=-1)[0][:4]]
    assert gen(model, PROMPTS, max_new_tokens=0) == [[], []]


def test_generate_rejects_an_empty_prompt(model):
    with pytest.raises(ValueError, match=r"prompts \[1\] are empty"):
        gen(model, [[5], []])


# ---- sequence_logprobs_of ----------------------------------------------------------


def test_sequence_logprobs_of_matches_a_hand_sum_and_ignores_batch_padding(model):
    completions = [[20, 21], [30, 31, 32, 33]]
    # by hand, one unpadded sequence at a time: sum over completion tokens of log_softmax(logits[t-1])[token t]
    expected = []
    for prompt, completion in zip(PROMPTS, completions):
        ids = torch.tensor([prompt + completion])
        with torch.no_grad():
            logps = torch.log_softmax(model(ids).logits[0], dim=-1)  # (T, V)
        expected.append(sum(logps[len(prompt) - 1 + i, tok].item() for i, tok in enumerate(completion)))
    batched = sequence_logprobs_of(model, PROMPTS, completions)
    assert batched == pytest.approx(expected, abs=1e-4)
    # log-probs of real tokens: negative and finite; an empty completion scores 0
    assert all(x < 0 for x in batched) and not any(math.isnan(x) for x in batched)
    assert sequence_logprobs_of(model, PROMPTS, [[], [30]])[0] == 0.0


# ---- batched generation, as evaluate runs it -----------------------------------------


def test_generate_batched_seeds_the_batch_at_row_i_with_seed_plus_i(model):
    from models.generate import generate_batched

    prompts = [*PROMPTS, [15, 16]]
    kwargs = {"max_new_tokens": 5, "eos_token_id": -1, "pad_token_id": PAD}
    # sampled: batches [0, 1] and [2], drawn with seeds 10 + 0 and 10 + 2
    sampled = generate_batched(model, prompts, batch_size=2, seed=10, temperature=1.0, **kwargs)
    assert sampled == (generate(model, prompts[:2], seed=10, temperature=1.0, **kwargs)
                       + generate(model, prompts[2:], seed=12, temperature=1.0, **kwargs))
    # greedy: a row's output does not depend on its batch, so batching changes nothing
    assert generate_batched(model, prompts, batch_size=2, **kwargs) == generate(model, prompts, **kwargs)

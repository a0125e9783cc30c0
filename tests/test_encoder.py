"""models/encoder.py: the encoder tokenizer and input building, BERT masking, the [CLS] classifier and embeddings."""

from __future__ import annotations

import math

import pytest
import torch
from helpers_tokenizer import make_test_tokenizer
from transformers import AutoTokenizer

from models.encoder import (
    build_classifier,
    build_encoder,
    cosine_similarity,
    embed,
    encode,
    encoder_tokenizer,
    frames_encoder_inputs,
    mask_tokens,
    masked_accuracy,
    similarity,
)

MICRO = dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_position_embeddings=64)


@pytest.fixture(scope="module")
def tokenizer():
    """The encoder's tokenizer, as the mlm stage saves it: the shared one, framing its inputs with [CLS] / [SEP]."""
    return encoder_tokenizer(make_test_tokenizer(), max_length=64)


def plain_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def micro_encoder(tokenizer, seed: int = 0):
    torch.manual_seed(seed)
    return build_encoder(len(tokenizer), tokenizer.pad_token_id, **MICRO)


# --- the encoder tokenizer ---------------------------------------------------------------------


def test_encoder_tokenizer_adds_exactly_cls_and_sep_and_the_pair_form():
    # given the shared tokenizer, which adds nothing by itself, and the encoder's copy of it
    shared = make_test_tokenizer()
    tok = encoder_tokenizer(shared, max_length=64)
    a, b = plain_ids(shared, "이 영화 정말 좋아요"), plain_ids(shared, "The quick brown fox")
    cls, sep = shared.cls_token_id, shared.sep_token_id

    # then a text becomes [CLS] a [SEP], a pair [CLS] a [SEP] b [SEP] with segment ids 0 then 1
    single = tok("이 영화 정말 좋아요")
    assert single["input_ids"] == [cls, *a, sep]
    assert single["token_type_ids"] == [0] * (len(a) + 2)
    pair = tok("이 영화 정말 좋아요", "The quick brown fox")
    assert pair["input_ids"] == [cls, *a, sep, *b, sep]
    assert pair["token_type_ids"] == [0] * (len(a) + 2) + [1] * (len(b) + 1)
    assert frames_encoder_inputs(tok) and not frames_encoder_inputs(shared)


def test_encoder_tokenizer_leaves_the_shared_tokenizer_as_it_was():
    shared = make_test_tokenizer()
    before = shared("hello", "there")["input_ids"], shared.model_max_length, list(shared.model_input_names)

    encoder_tokenizer(shared, max_length=64)

    assert (shared("hello", "there")["input_ids"], shared.model_max_length, shared.model_input_names) == before
    assert shared("hello")["input_ids"] == plain_ids(shared, "hello")  # still no specials: the decoder's view


def test_encoder_tokenizer_survives_save_and_auto_load_as_a_pipeline_loads_it(tmp_path):
    tok = encoder_tokenizer(make_test_tokenizer(), max_length=16)
    tok.save_pretrained(tmp_path)

    loaded = AutoTokenizer.from_pretrained(tmp_path)  # what tasks.registry logs and MLflow's pipeline uses

    long_text = "The quick brown fox jumps over the lazy dog. " * 3
    assert loaded("좋아", "싫어") == tok("좋아", "싫어")  # token_type_ids included
    assert loaded.model_max_length == 16
    cut = loaded(long_text, truncation=True)["input_ids"]  # truncation=True cuts to the saved length, specials kept
    assert len(cut) == 16 and cut[0] == tok.cls_token_id and cut[-1] == tok.sep_token_id
    assert encoder_tokenizer(loaded, 16)("좋아", "싫어") == tok("좋아", "싫어")  # applying it again changes nothing


def test_encoder_tokenizer_needs_cls_sep_pad_and_room_for_text():
    bare = make_test_tokenizer()
    bare.cls_token = None
    with pytest.raises(ValueError, match="needs cls, sep and pad tokens; got ids cls=None"):
        encoder_tokenizer(bare, 64)
    with pytest.raises(ValueError, match="max_length 2 leaves no token of text"):
        encoder_tokenizer(make_test_tokenizer(), 2)


# --- encode -------------------------------------------------------------------------------------


def test_encode_single_adds_cls_sep_and_right_pads(tokenizer):
    # given two texts of different lengths
    texts = ["좋아 정말 좋아요", "hi"]
    ids = [plain_ids(tokenizer, t) for t in texts]

    # when encoded
    batch = encode(tokenizer, texts, max_length=64)

    # then each row is [CLS] text [SEP] then padding, all in segment 0
    cls, sep, pad = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id
    width = len(ids[0]) + 2
    assert batch["input_ids"].shape == (2, width)
    assert batch["input_ids"][0].tolist() == [cls, *ids[0], sep]
    assert batch["input_ids"][1].tolist() == [cls, *ids[1], sep] + [pad] * (width - len(ids[1]) - 2)
    assert batch["attention_mask"][1].tolist() == [1] * (len(ids[1]) + 2) + [0] * (width - len(ids[1]) - 2)
    assert batch["token_type_ids"].sum() == 0
    assert all(value.dtype == torch.long for value in batch.values())


def test_encode_is_what_the_tokenizer_gives_one_text_at_a_time(tokenizer):
    # the batch rows are the tokenizer's own framing (as a pipeline sees one input), padding aside
    texts, pairs = ["좋아 정말 좋아요", "hi"], ["싫어", "The quick brown fox"]
    batch = encode(tokenizer, texts, pairs, max_length=64)
    for i, (a, b) in enumerate(zip(texts, pairs)):
        alone = tokenizer(a, b)
        n = len(alone["input_ids"])
        assert batch["input_ids"][i, :n].tolist() == alone["input_ids"]
        assert batch["token_type_ids"][i, :n].tolist() == alone["token_type_ids"]
        assert batch["attention_mask"][i].sum() == n


def test_encode_single_truncates_the_text_not_the_specials(tokenizer):
    a = "The quick brown fox jumps over the lazy dog. " * 3
    batch = encode(tokenizer, [a], max_length=12)
    assert batch["input_ids"][0].tolist() == [tokenizer.cls_token_id, *plain_ids(tokenizer, a)[:10], tokenizer.sep_token_id]


@pytest.mark.parametrize(("b", "kept_a", "kept_b"), [("이 영화 정말 좋아요", 5, 4), ("좋아요", 6, 3)])
def test_encode_pair_truncates_texts_longest_first_not_specials(tokenizer, b, kept_a, kept_b):
    # given a 60-token text A and a text B of 8 or 3 tokens
    a = "The quick brown fox jumps over the lazy dog. " * 3
    ids_a, ids_b = (plain_ids(tokenizer, t) for t in (a, b))
    assert (len(ids_a), len(ids_b)) == (60, 8 if len(b) > 3 else 3)

    # when encoded into 12 positions (9 for text after [CLS] [SEP] [SEP])
    batch = encode(tokenizer, [a], [b], max_length=12)

    # then the longer text gives way: to the 6 positions B leaves it, or, when both must shrink, to an
    # even share of the 9 (the longer text taking the odd one); both [SEP]s stay
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    assert batch["input_ids"][0].tolist() == [cls, *ids_a[:kept_a], sep, *ids_b[:kept_b], sep]
    assert batch["token_type_ids"][0].tolist() == [0] * (kept_a + 2) + [1] * (kept_b + 1)
    assert batch["attention_mask"].all()


def test_encode_rejects_max_length_below_specials(tokenizer):
    with pytest.raises(ValueError, match="max_length 2"):
        encode(tokenizer, ["a"], ["b"], max_length=2)


def test_encode_rejects_a_tokenizer_that_does_not_frame_its_inputs():
    # the shared (decoder) tokenizer adds no [CLS] / [SEP]: encoding with it would train on unframed inputs
    with pytest.raises(ValueError, match="does not add \\[CLS\\] / \\[SEP\\] itself.*encoder_tokenizer"):
        encode(make_test_tokenizer(), ["좋아"], max_length=16)


# --- mask_tokens (BERT 80/10/10) -----------------------------------------------------------------


def within(count: int, n: int, p: float, sigmas: float = 4.0) -> bool:
    """count of n Bernoulli(p) draws lies within `sigmas` binomial standard deviations of n * p."""
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


def test_mask_tokens_proportions_and_specials(tokenizer):
    # given 200 rows of 64: [CLS] a [SEP] b [SEP] then padding, a chat special inside, ragged lengths
    vocab, specials = len(tokenizer), tokenizer.all_special_ids
    cls, sep, pad, mask = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id, tokenizer.mask_token_id
    user = tokenizer.convert_tokens_to_ids("<|user|>")
    normal = torch.tensor([i for i in range(vocab) if i not in specials])
    g = torch.Generator().manual_seed(0)
    input_ids = normal[torch.randint(len(normal), (200, 64), generator=g)]  # (200, 64)
    lengths = torch.randint(32, 65, (200,), generator=g)
    for i, n in enumerate(lengths.tolist()):
        input_ids[i, 0], input_ids[i, n // 2], input_ids[i, n - 1], input_ids[i, 5] = cls, sep, sep, user
        input_ids[i, n:] = pad
    special = torch.isin(input_ids, torch.tensor(specials))
    eligible = int((~special).sum())

    # when masked with a fixed seed
    masked, labels = mask_tokens(input_ids, specials, mask, vocab, 0.15, torch.Generator().manual_seed(1234))

    # then about 15% of eligible positions are chosen, never a special one
    chosen = labels != -100
    assert not (chosen & special).any()
    assert torch.equal(masked[special], input_ids[special])
    assert torch.equal(labels[chosen], input_ids[chosen])
    assert torch.equal(masked[~chosen], input_ids[~chosen])
    n = int(chosen.sum())
    assert within(n, eligible, 0.15), f"{n} of {eligible} chosen"

    # and of those about 80% are [MASK], 10% a random non-special token, 10% unchanged
    # (a random draw equal to the original counts as unchanged: probability 1 / len(normal))
    as_mask = chosen & (masked == mask)
    as_random = chosen & (masked != mask) & (masked != input_ids)
    unchanged = chosen & (masked == input_ids)
    p_same = 0.1 / len(normal)
    assert within(int(as_mask.sum()), n, 0.8)
    assert within(int(as_random.sum()), n, 0.1 - p_same)
    assert within(int(unchanged.sum()), n, 0.1 + p_same)
    assert not torch.isin(masked[as_random], torch.tensor(specials)).any()


def test_mask_tokens_is_reproducible_per_seed(tokenizer):
    ids = torch.randint(20, len(tokenizer), (8, 32), generator=torch.Generator().manual_seed(0))
    args = (ids, tokenizer.all_special_ids, tokenizer.mask_token_id, len(tokenizer))
    first = mask_tokens(*args, generator=torch.Generator().manual_seed(7))
    again = mask_tokens(*args, generator=torch.Generator().manual_seed(7))
    other = mask_tokens(*args, generator=torch.Generator().manual_seed(8))
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    assert not torch.equal(first[1], other[1])


def test_masked_accuracy_by_hand():
    # positions 1 and 2 are scored; argmax is 2 (right) and 0 (wrong, label 1); position 0 is ignored
    logits = torch.tensor([[[9.0, 0, 0], [0, 0, 9.0], [9.0, 0, 0]]])  # (1, 3, 3)
    labels = torch.tensor([[-100, 2, 1]])
    assert masked_accuracy(logits, labels) == (1, 2)


def test_mlm_loss_on_masked_batch_is_finite(tokenizer):
    model = micro_encoder(tokenizer)
    batch = encode(tokenizer, ["이 영화 정말 좋아요", "The quick brown fox"], max_length=32)
    masked, labels = mask_tokens(batch["input_ids"], tokenizer.all_special_ids, tokenizer.mask_token_id,
                                 len(tokenizer), mlm_probability=0.5, generator=torch.Generator().manual_seed(0))
    out = model(**{**batch, "input_ids": masked}, labels=labels)
    assert out.logits.shape == (*masked.shape, len(tokenizer))
    assert torch.isfinite(out.loss)


# --- the [CLS] classifier ------------------------------------------------------------------------


def test_classifier_head_shape_and_encoder_weights(tokenizer, tmp_path):
    # given a masked LM
    encoder = micro_encoder(tokenizer)

    # when a 3-way classifier is built from it, in memory and from its saved folder
    labels = {0: "neg", 1: "neu", 2: "pos"}
    built = build_classifier(encoder, 3, labels, {v: k for k, v in labels.items()})
    encoder.save_pretrained(tmp_path)
    loaded = build_classifier(tmp_path, 3, labels, {v: k for k, v in labels.items()})

    # then logits are (B, num_labels) and the encoder starts as an exact copy (not an alias)
    batch = encode(tokenizer, ["좋아", "싫어", "hello there"], max_length=16)
    assert built(**batch).logits.shape == (3, 3)
    source = encoder.bert.state_dict()
    for classifier in (built, loaded):
        target = classifier.bert.state_dict()
        assert set(source) == {k for k in target if not k.startswith("pooler.")}
        for name, weight in source.items():
            assert torch.equal(target[name], weight), name
    copied, original = built.bert.embeddings.word_embeddings.weight, encoder.bert.embeddings.word_embeddings.weight
    assert copied.data_ptr() != original.data_ptr()
    assert built.config.id2label == labels


TOY = [
    ("영화 정말 좋아", 1), ("이 노래 좋아", 1), ("날씨가 좋아", 1), ("음식 좋아요", 1), ("너무 좋아", 1), ("배우가 좋아", 1),
    ("영화 정말 싫어", 0), ("이 노래 싫어", 0), ("날씨가 싫어", 0), ("음식 싫어요", 0), ("너무 싫어", 0), ("배우가 싫어", 0),
]


def test_classifier_fine_tunes_to_perfect_accuracy_on_toy_set(tokenizer):
    # given a micro classifier on a set separated by one word
    torch.manual_seed(0)
    model = build_classifier(micro_encoder(tokenizer), 2, {0: "neg", 1: "pos"}, {"neg": 0, "pos": 1})
    texts, targets = [t for t, _ in TOY], torch.tensor([y for _, y in TOY])
    batch = encode(tokenizer, texts, max_length=16)
    before = model.classifier.weight.detach().clone()

    # when trained for a few dozen full-batch AdamW steps
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(40):
        loss = model(**batch, labels=targets).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    # then it classifies every example right, and its weights moved
    model.eval()
    with torch.no_grad():
        predictions = model(**batch).logits.argmax(-1)  # (B,)
    assert predictions.tolist() == targets.tolist()
    assert not torch.equal(before, model.classifier.weight)


# --- embeddings ----------------------------------------------------------------------------------


def test_embed_shapes_and_padding_does_not_leak(tokenizer):
    model = micro_encoder(tokenizer)
    texts = ["좋아", "The quick brown fox jumps over the lazy dog.", "싫어 싫어"]
    for pooling in ("mean", "cls"):
        vectors = embed(model, tokenizer, texts, pooling=pooling, batch_size=2)
        assert vectors.shape == (3, 32)
        # a short text padded in a batch with a long one embeds as it does alone
        alone = embed(model, tokenizer, texts[:1], pooling=pooling)
        padded = embed(model, tokenizer, texts[:2], pooling=pooling)
        torch.testing.assert_close(padded[0], alone[0], atol=1e-5, rtol=1e-5)


def test_embed_from_saved_classifier_folder(tokenizer, tmp_path):
    classifier = build_classifier(micro_encoder(tokenizer), 2)
    classifier.save_pretrained(tmp_path)
    from_folder = embed(tmp_path, tokenizer, ["좋아", "싫어"])
    in_memory = embed(classifier, tokenizer, ["좋아", "싫어"])
    torch.testing.assert_close(from_folder, in_memory)


def test_similarity(tokenizer):
    model = micro_encoder(tokenizer)
    for pooling in ("mean", "cls"):
        assert similarity(model, tokenizer, "이 영화 정말 좋아요", "이 영화 정말 좋아요", pooling) == pytest.approx(1.0, abs=1e-5)
    # ([CLS] vectors of an untrained encoder are nearly parallel, so compare different texts by mean)
    assert similarity(model, tokenizer, "좋아", "The quick brown fox") < 0.999
    assert cosine_similarity(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])) == pytest.approx(1 / math.sqrt(2))

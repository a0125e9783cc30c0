"""The encoder track: a BERT-style masked LM, its [CLS] classifier, and sentence embeddings.

Pretraining masks tokens dynamically (a fresh draw every batch) as in BERT, Devlin et al. 2019,
"BERT: Pre-training of Deep Bidirectional Transformers for Language Understanding", section 3.1.
Fine-tuning puts a classification head on the pooled [CLS] representation, initialised from the
masked LM's encoder weights.

The project tokenizer (artifacts/tokenizer) is shared with the decoder track and adds no special token
by itself. `encoder_tokenizer` makes the encoder's copy, which frames every input as `[CLS] a [SEP]` or
`[CLS] a [SEP] b [SEP]` itself; the encoder stages save that copy beside their models, so training,
`instructflow similarity` / `embed` and a model served through MLflow's transformers pipeline all
tokenize alike (no train/serve skew).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from tokenizers import processors
from transformers import (
    AutoModel,
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertModel,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

IGNORE_INDEX = -100  # label value that cross-entropy (and masked_accuracy) skips

# what a model is given: BERT needs the segment ids (0 for `[CLS] a [SEP]`, 1 for `b [SEP]`) to tell a pair apart
ENCODER_INPUT_NAMES = ["input_ids", "token_type_ids", "attention_mask"]


def encoder_tokenizer(tokenizer: PreTrainedTokenizerBase, max_length: int) -> PreTrainedTokenizerBase:
    """A copy of the project tokenizer that frames encoder inputs itself: `[CLS] a [SEP]` / `[CLS] a [SEP] b [SEP]`.

    The shared tokenizer stays as it is: the decoder track places <|bos|> / <|eos|> through the chat
    code and must never see [CLS] / [SEP]. The copy also returns token_type_ids (0 for `[CLS] a [SEP]`,
    1 for `b [SEP]`), pads and truncates on the right, and has model_max_length = max_length, the
    tokens per input (specials included) that `truncation=True` keeps, in `encode` as in a pipeline.
    Applying it again to its own result changes nothing but max_length.
    """
    cls, sep = tokenizer.cls_token, tokenizer.sep_token
    cls_id, sep_id, pad_id = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id
    if None in (cls_id, sep_id, pad_id):
        raise ValueError(f"tokenizer needs cls, sep and pad tokens; got ids cls={cls_id} sep={sep_id} pad={pad_id}")
    if max_length < 3:
        raise ValueError(f"max_length {max_length} leaves no token of text between [CLS] and [SEP]")
    framed = copy.deepcopy(tokenizer)  # the caller's tokenizer (the decoder's) keeps its behaviour
    framed.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{cls}:0 $A:0 {sep}:0",
        pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
        special_tokens=[(cls, cls_id), (sep, sep_id)],
    )
    framed.model_input_names = list(ENCODER_INPUT_NAMES)
    framed.init_kwargs["model_input_names"] = list(ENCODER_INPUT_NAMES)  # saved in tokenizer_config.json
    framed.padding_side = framed.truncation_side = "right"
    framed.model_max_length = max_length
    return framed


def frames_encoder_inputs(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer adds exactly [CLS] / [SEP] around a text and a pair by itself (see encoder_tokenizer)."""
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    if None in (cls_id, sep_id):
        return False
    a, b = (tokenizer(text, add_special_tokens=False)["input_ids"] for text in ("a", "b"))
    return (tokenizer("a")["input_ids"] == [cls_id, *a, sep_id]
            and tokenizer("a", "b")["input_ids"] == [cls_id, *a, sep_id, *b, sep_id])


def build_encoder(
    vocab_size: int,
    pad_token_id: int,
    hidden_size: int = 256,
    num_layers: int = 4,
    num_heads: int = 4,
    intermediate_size: int = 1024,
    max_position_embeddings: int = 512,
) -> BertForMaskedLM:
    """A randomly initialised BERT masked LM (output embeddings tied to the input ones)."""
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    config = BertConfig(
        vocab_size=vocab_size,
        pad_token_id=pad_token_id,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        type_vocab_size=2,  # segment A / segment B
    )
    return BertForMaskedLM(config)


def encode(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    text_pairs: Sequence[str] | None = None,
    max_length: int = 128,
) -> dict[str, torch.Tensor]:
    """Tokenise into `[CLS] a [SEP]` or `[CLS] a [SEP] b [SEP]`, right-padded to the longest row.

    The tokenizer must be an `encoder_tokenizer`: it adds the specials itself, exactly as it does when
    the model is served through a transformers pipeline. The texts are truncated, never the specials
    (max_length counts them): a text alone keeps its first tokens; a pair gives way longest first, the
    longer text shrinking to the shorter one's length, then the two sharing what is left (the longer
    text taking an odd token). Returns input_ids, token_type_ids (0 for [CLS] a [SEP], 1 for b [SEP])
    and attention_mask, each a long tensor of shape (B, T) with T <= max_length.
    """
    if tokenizer.pad_token_id is None:
        raise ValueError("tokenizer needs a pad token to batch texts of different lengths")
    if not frames_encoder_inputs(tokenizer):
        raise ValueError(f"tokenizer does not add [CLS] / [SEP] itself (it gives {tokenizer('a', 'b')['input_ids']} "
                         "for the pair 'a', 'b'); make it with models.encoder.encoder_tokenizer")
    if text_pairs is not None and len(text_pairs) != len(texts):
        raise ValueError(f"got {len(texts)} texts but {len(text_pairs)} text_pairs")
    n_specials = 2 if text_pairs is None else 3
    if max_length < n_specials:
        raise ValueError(f"max_length {max_length} is shorter than the {n_specials} special tokens it must hold")
    batch = tokenizer(
        list(texts),
        list(text_pairs) if text_pairs is not None else None,
        truncation="longest_first",
        max_length=max_length,
        padding="longest",
        return_token_type_ids=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    return {key: batch[key].long() for key in ENCODER_INPUT_NAMES}  # (B, T) each


def mask_tokens(
    input_ids: torch.Tensor,
    special_ids: Sequence[int] | torch.Tensor,
    mask_token_id: int,
    vocab_size: int,
    mlm_probability: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's dynamic masking (Devlin et al. 2019, section 3.1 and appendix C.2).

    Each position whose id is not in `special_ids` ([CLS], [SEP], padding, ...) is chosen with
    probability `mlm_probability`. A chosen token becomes [MASK] 80% of the time, a random
    non-special token 10%, and stays unchanged 10% (so the model cannot learn that only [MASK]
    positions matter). Labels hold the original id at chosen positions and -100 elsewhere.
    The generator must live on the same device as `input_ids`.
    """
    device = input_ids.device
    special = torch.as_tensor(list(special_ids) if not torch.is_tensor(special_ids) else special_ids, device=device)
    eligible = ~torch.isin(input_ids, special)  # (B, T) bool

    draw = torch.rand(input_ids.shape, generator=generator, device=device)  # (B, T)
    chosen = eligible & (draw < mlm_probability)  # (B, T)
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))  # (B, T)

    action = torch.rand(input_ids.shape, generator=generator, device=device)  # (B, T)
    to_mask = chosen & (action < 0.8)  # (B, T)
    to_random = chosen & (action >= 0.8) & (action < 0.9)  # (B, T); the last 10% stay as they are

    allowed = torch.arange(vocab_size, device=device)
    allowed = allowed[~torch.isin(allowed, special)]  # (V - n_special,) non-special ids
    if allowed.numel() == 0:
        raise ValueError(f"every id in a vocabulary of {vocab_size} is special; nothing to draw random tokens from")
    picks = torch.randint(allowed.numel(), input_ids.shape, generator=generator, device=device)  # (B, T)
    random_ids = allowed[picks]  # (B, T)

    masked = input_ids.clone()
    masked[to_mask] = mask_token_id
    masked[to_random] = random_ids[to_random]
    return masked, labels


def masked_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """(correct, total) over the positions with a label: logits (B, T, V), labels (B, T)."""
    scored = labels != IGNORE_INDEX  # (B, T)
    correct = (logits.argmax(dim=-1) == labels) & scored  # (B, T)
    return int(correct.sum()), int(scored.sum())


def build_classifier(
    encoder: str | Path | PreTrainedModel,
    num_labels: int,
    id2label: Mapping[int, str] | None = None,
    label2id: Mapping[str, int] | None = None,
) -> BertForSequenceClassification:
    """A [CLS] classifier whose encoder starts as a copy of a pretrained masked LM's.

    `encoder` is a BertForMaskedLM (or any BERT model) or the folder it was saved to. The head is
    BERT's: a tanh pooler over the [CLS] hidden state, dropout, then a linear layer to num_labels.
    The masked LM has no pooler, so the pooler and the linear layer start from random weights.
    """
    if isinstance(encoder, (str, Path)):
        encoder = BertForMaskedLM.from_pretrained(encoder)
    if id2label is not None and len(id2label) != num_labels:
        raise ValueError(f"num_labels is {num_labels} but id2label has {len(id2label)} entries")
    settings = encoder.config.to_dict()
    for key in ("architectures", "id2label", "label2id"):  # those of the masked LM do not apply
        settings.pop(key, None)
    settings.update(num_labels=num_labels)
    if id2label is not None:
        settings.update(id2label={int(k): str(v) for k, v in id2label.items()})
    if label2id is not None:
        settings.update(label2id={str(k): int(v) for k, v in label2id.items()})
    config = BertConfig.from_dict(settings)

    classifier = BertForSequenceClassification(config)
    result = classifier.bert.load_state_dict(encoder.base_model.state_dict(), strict=False)
    unexpected = list(result.unexpected_keys)
    missing = [key for key in result.missing_keys if not key.startswith("pooler.")]
    if unexpected or missing:
        raise ValueError(f"encoder weights do not fit a BERT classifier: missing {missing}, unexpected {unexpected}")
    return classifier


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str = "mean") -> torch.Tensor:
    """Sentence vectors (B, H) from last hidden states (B, T, H).

    "mean": the average over the positions the attention mask keeps ([CLS] and [SEP] included, padding
    not); "cls": the [CLS] hidden state as it is (no pooler).
    """
    if pooling == "cls":
        return hidden[:, 0]  # (B, H)
    if pooling != "mean":
        raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
    keep = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    return (hidden * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1)  # (B, H)


def sentence_vectors(encoder: PreTrainedModel, batch: Mapping[str, torch.Tensor], pooling: str = "mean") -> torch.Tensor:
    """Pooled sentence vectors (B, H) of an `encode` batch: what `embed` returns, with gradients when training."""
    hidden = encoder(**{k: batch[k] for k in ENCODER_INPUT_NAMES}).last_hidden_state  # (B, T, H)
    return pool(hidden, batch["attention_mask"], pooling)


def build_embedder(encoder: str | Path | PreTrainedModel) -> BertModel:
    """A sentence encoder (a BertModel without pooler) starting as a copy of a pretrained masked LM's encoder.

    `encoder` is a BertForMaskedLM (or any BERT model) or the folder it was saved to. Its sentence vector is
    `pool` over the last hidden states, so it needs no head; it is saved as a plain BertModel, the
    `feature-extraction` model that `embed`, `instructflow similarity` and MLflow serve.
    """
    if isinstance(encoder, (str, Path)):
        encoder = BertForMaskedLM.from_pretrained(encoder)
    settings = encoder.config.to_dict()
    for key in ("architectures", "id2label", "label2id"):
        settings.pop(key, None)
    embedder = BertModel(BertConfig.from_dict(settings), add_pooling_layer=False)
    result = embedder.load_state_dict(encoder.base_model.state_dict(), strict=False)
    unexpected = list(result.unexpected_keys)
    missing = [key for key in result.missing_keys if not key.startswith("pooler.")]
    if unexpected or missing:
        raise ValueError(f"encoder weights do not fit a BERT encoder: missing {missing}, unexpected {unexpected}")
    return embedder


@torch.no_grad()
def embed(
    model: str | Path | PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    pooling: str = "mean",
    batch_size: int = 32,
    max_length: int = 128,
) -> torch.Tensor:
    """Sentence vectors (N, H) from the encoder part of a BERT model (or the folder it was saved in).

    pooling="mean" averages the last hidden states over non-pad positions ([CLS] and [SEP]
    included); pooling="cls" takes the [CLS] hidden state as it is (no pooler). See `pool`.
    """
    if pooling not in ("mean", "cls"):
        raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
    if isinstance(model, (str, Path)):
        model = AutoModel.from_pretrained(model, add_pooling_layer=False)  # the pooler is not used here
    encoder = model.base_model  # the BertModel inside a masked LM or a classifier; itself for a BertModel
    was_training = encoder.training
    encoder.eval()
    device = next(encoder.parameters()).device
    vectors = []
    for start in range(0, len(texts), batch_size):
        batch = encode(tokenizer, texts[start : start + batch_size], max_length=max_length)
        batch = {key: value.to(device) for key, value in batch.items()}
        vectors.append(sentence_vectors(encoder, batch, pooling))  # (B, H)
    encoder.train(was_training)
    return torch.cat(vectors).float().cpu()  # (N, H)


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine of the angle between two vectors of shape (H,)."""
    return float(torch.nn.functional.cosine_similarity(a.flatten().float(), b.flatten().float(), dim=0))


def similarity(
    model: str | Path | PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    s1: str,
    s2: str,
    pooling: str = "mean",
    max_length: int = 128,
) -> float:
    """Cosine similarity of the embeddings of two sentences."""
    vectors = embed(model, tokenizer, [s1, s2], pooling=pooling, max_length=max_length)  # (2, H)
    return cosine_similarity(vectors[0], vectors[1])

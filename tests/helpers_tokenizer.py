"""A stand-in for the project tokenizer, small enough to train inside a test.

It has the same shape as the one `models/tokenizer.py` builds: byte-level BPE, the chat specials
and, for encoders, [CLS] / [SEP] / [MASK], with no post-processor (the encoder stages add one through
`models.encoder.encoder_tokenizer`). Vocabulary about 400: the 256 byte symbols, the specials and ~130 merges.
"""

from __future__ import annotations

from functools import lru_cache

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
CHAT = ["<|system|>", "<|user|>", "<|assistant|>"]
CLS, SEP, MASK = "[CLS]", "[SEP]", "[MASK]"
SPECIALS = [PAD, BOS, EOS, *CHAT, CLS, SEP, MASK]

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A small model trained on a laptop, step by step.",
    "I really liked this movie, the actors were great.",
    "This film was boring and far too long.",
    "이 영화 정말 좋아요. 배우들 연기가 최고였어요.",
    "너무 지루하고 재미없어요. 시간이 아까웠어요.",
    "좋아 좋아 정말 좋아",
    "싫어 싫어 진짜 싫어",
    "오늘 날씨가 맑고 기분이 좋다.",
    "음식이 맛있어서 또 가고 싶어요.",
]


@lru_cache(maxsize=1)
def _trained(vocab_size: int) -> str:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS * 4, trainer=trainer)
    return tokenizer.to_str()  # cached as JSON so every caller gets its own object


def make_test_tokenizer(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A fresh PreTrainedTokenizerFast with the project's special tokens set as attributes."""
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained(vocab_size)),
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        cls_token=CLS,
        sep_token=SEP,
        mask_token=MASK,
        additional_special_tokens=CHAT,
    )

"""A base model instead of one trained here: its tokenizer fitted to the project's chat format, its weights loaded.

`pretrain.base_model` names a Hugging Face folder (or a registry version, tasks/base_model.py finds its folder).
The stages after `pretrain` train and serve in the project's chat format (models/tokenizer.py): <|bos|>, the
role tokens, <|eos|> after each answer, and a pad token for batches. `fit_tokenizer` adds to the base's
tokenizer what that format needs and the base lacks, and says what it added; `load_base_decoder` loads the
weights with the embeddings grown to the fitted vocabulary (new rows only: the base's rows stay as they were).

A base whose own chat template differs from the project's gets the project's: training tokenizes
conversations segment by segment (`encode_chat`) and serving renders them with the template, so the two must
agree. `check_chat_format` proves that they do on this tokenizer before any stage trains on it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from instructflow.errors import ConfigError
from models.tokenizer import BOS, CHAT_TEMPLATE, CLS, EOS, MASK, PAD, ROLE_TOKENS, SEP, encode_chat

# the special tokens the stages need, by attribute: the decoder's chat format, then the encoder track's
NEEDED = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "cls_token": CLS, "sep_token": SEP, "mask_token": MASK}
PROBE = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Translate to English: 사과"},
         {"role": "assistant", "content": "apple"}, {"role": "user", "content": "And 배?"},
         {"role": "assistant", "content": "pear 2"}]


def _single_token(tok: PreTrainedTokenizerBase, text: str) -> bool:
    return len(tok(text, add_special_tokens=False)["input_ids"]) == 1


def fit_tokenizer(tok: PreTrainedTokenizerBase) -> dict:
    """Add to `tok`, in place, what the project's chat format and encoder track need; what was added.

    A special token the base already has (GPT-2's <|endoftext|> as both bos and eos, say) is kept; a missing
    one gets the project's (<|bos|>, <|eos|>, <|pad|>: never eos as pad, the SFT labels keep eos). Role tokens
    that do not encode as one token are added as special tokens, so nothing merges across a segment boundary.
    """
    added: dict = {"tokens": [], "chat_template": "kept"}
    missing = {attr: token for attr, token in NEEDED.items() if getattr(tok, attr) is None}
    if missing:
        tok.add_special_tokens(missing)
        added["tokens"] += list(missing.values())
    roles = [token for token in ROLE_TOKENS.values() if not _single_token(tok, token)]
    if roles:
        tok.add_special_tokens({"extra_special_tokens": roles}, replace_extra_special_tokens=False)
        added["tokens"] += roles
    if tok.chat_template != CHAT_TEMPLATE:
        added["chat_template"] = "added" if tok.chat_template is None else "replaced"
        tok.chat_template = CHAT_TEMPLATE
    check_chat_format(tok)
    return added


def check_chat_format(tok: PreTrainedTokenizerBase) -> None:
    """Refuse a tokenizer on which training's segment-wise ids differ from the rendered template's ids.

    A tokenizer that normalises each call (a SentencePiece prefix space, say) would train on ids that serving
    never produces.
    """
    trained, _ = encode_chat(tok, PROBE)
    rendered = tok(tok.apply_chat_template(PROBE, tokenize=False), add_special_tokens=False)["input_ids"]
    if trained != rendered:
        first = next((i for i, (a, b) in enumerate(zip(trained, rendered)) if a != b), min(len(trained), len(rendered)))
        raise ConfigError(
            "the base tokenizer encodes the chat format differently segment by segment than "
            f"the whole rendered conversation (first difference at token {first}: "
            f"{tok.convert_ids_to_tokens(trained[first:first + 3])} vs {tok.convert_ids_to_tokens(rendered[first:first + 3])}); "
            "expected a byte-level BPE tokenizer (GPT-2, Llama 3, Qwen, SmolLM) that adds nothing per call")


def load_base_decoder(model_dir: Path, tok: PreTrainedTokenizerBase) -> PreTrainedModel:
    """The base's causal LM in float32 (the training loop's master weights), its vocabulary grown to `tok`'s.

    Rows for added tokens are new (transformers' mean-resizing: the mean of the base's rows plus noise drawn from
    the seeded generator); every base row keeps its values. Token ids are set from the fitted tokenizer.
    """
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, trust_remote_code=False)
    if len(tok) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tok))
    for config in (model.config, model.generation_config):
        if config is not None:
            config.bos_token_id, config.eos_token_id, config.pad_token_id = \
                tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    return model

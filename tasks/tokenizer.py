"""Stage `tokenizer`: byte-level BPE trained on the pretraining text, saved as a Hugging Face folder.

With `pretrain.base_model` set, the base model's tokenizer instead, with what the project's chat format and
encoder track need added when it lacks them (models/base.py `fit_tokenizer`); the stage logs what it added,
counts it in its metrics and writes it to base_model.json beside the tokenizer.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from instructflow.config import Params
from instructflow.errors import ConfigError, InstructflowError
from instructflow.io import write_json_atomic
from tasks import base_model
from tasks.runtime import read_prepared, run_stage, stage_output
from tasks.tracking import StageRun
from models.base import fit_tokenizer
from models.tokenizer import EOS, PAD, train_tokenizer

log = logging.getLogger("instructflow")
HANGUL = re.compile(r"[\uac00-\ud7a3]")


def body(params: Params, root: Path, run: StageRun) -> dict:
    if params.pretrain.base_model is not None:
        return from_base(params, root, run)
    train, held_out = ([row["text"] for row in read_prepared(root, name)] for name in ("pretrain_train", "pretrain_eval"))
    tok = train_tokenizer(train, params.tokenizer.vocab_size, params.tokenizer.min_frequency)
    log.info("trained BPE: %d tokens (asked for %d) on %d documents", len(tok), params.tokenizer.vocab_size, len(train))

    # every held-out document must decode back to itself, byte for byte (Hangul included)
    bad = not_round_tripped(tok, held_out)
    if bad:
        raise InstructflowError(f"tokenizer does not round-trip {len(bad)} held-out documents, e.g. {bad[0][:80]!r}")
    with stage_output(root, "tokenizer", run, tokenizer=tok):
        pass
    return {"vocab_size": len(tok), "eval_docs_round_trip": len(held_out), **chars_per_token(tok, held_out)}


def not_round_tripped(tok, texts: list[str]) -> list[str]:
    return [t for t in texts if tok.decode(tok(t, add_special_tokens=False)["input_ids"]) != t]


def chars_per_token(tok, held_out: list[str]) -> dict[str, float]:
    """Characters per token on the held-out English and Korean documents (higher: a more compact tokenizer)."""
    def ratio(texts: list[str]) -> float:
        n_tok = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)
        return sum(len(t) for t in texts) / max(n_tok, 1)

    return {"chars_per_token_en": round(ratio([t for t in held_out if not HANGUL.search(t)]), 4),
            "chars_per_token_ko": round(ratio([t for t in held_out if HANGUL.search(t)]), 4)}


def from_base(params: Params, root: Path, run: StageRun) -> dict:
    """The base model's tokenizer, fitted to the chat format; nothing trained. A document that does not
    round-trip (a tokenizer that normalises text) is counted and logged, not refused: the base was trained so."""
    from transformers import AutoTokenizer

    base = base_model.source(root, params)
    if not any((base.tokenizer_dir / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        raise ConfigError(f"pretrain.base_model = {params.pretrain.base_model}: no tokenizer in {base.tokenizer_dir} "
                          "(tokenizer.json or tokenizer_config.json expected)")
    tok = AutoTokenizer.from_pretrained(base.tokenizer_dir, trust_remote_code=False)
    if not tok.is_fast:
        raise ConfigError(f"pretrain.base_model = {params.pretrain.base_model}: its tokenizer ({type(tok).__name__}) is "
                          "not a fast (Rust) tokenizer; expected a tokenizer.json")
    base_vocab = len(tok)
    try:
        added = fit_tokenizer(tok)
    except ConfigError as exc:
        raise ConfigError(f"pretrain.base_model = {params.pretrain.base_model}: {exc}") from exc
    log.info("base model %s: tokenizer of %d tokens; added %s; chat template %s", params.pretrain.base_model,
             base_vocab, ", ".join(added["tokens"]) or "no token", added["chat_template"])
    held_out = [row["text"] for row in read_prepared(root, "pretrain_eval")]
    bad = not_round_tripped(tok, held_out)
    if bad:
        log.warning("the base tokenizer does not round-trip %d of %d held-out documents, e.g. %r", len(bad),
                    len(held_out), bad[0][:80])
    with stage_output(root, "tokenizer", run, tokenizer=tok) as out:
        write_json_atomic(out / "base_model.json", {"base_model": params.pretrain.base_model, "base_vocab_size": base_vocab,
                                                    "added_tokens": added["tokens"], "chat_template": added["chat_template"]})
    return {"vocab_size": len(tok), "base_vocab_size": base_vocab, "added_tokens": len(added["tokens"]),
            "added_chat_template": int(added["chat_template"] == "added"),
            "replaced_chat_template": int(added["chat_template"] == "replaced"),
            "added_pad_token": int(PAD in added["tokens"]), "added_eos_token": int(EOS in added["tokens"]),
            "eval_docs_round_trip": len(held_out) - len(bad), **chars_per_token(tok, held_out)}


def main() -> None:
    run_stage("tokenizer", body)


if __name__ == "__main__":
    main()

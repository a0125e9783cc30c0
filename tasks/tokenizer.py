"""Stage `tokenizer`: byte-level BPE trained on the pretraining text, saved as a Hugging Face folder."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from instructflow.config import Params
from instructflow.errors import InstructflowError
from tasks.runtime import read_prepared, run_stage, stage_output
from tasks.tracking import StageRun
from models.tokenizer import train_tokenizer

log = logging.getLogger("instructflow")
HANGUL = re.compile(r"[\uac00-\ud7a3]")


def body(params: Params, root: Path, run: StageRun) -> dict:
    train, held_out = ([row["text"] for row in read_prepared(root, name)] for name in ("pretrain_train", "pretrain_eval"))
    tok = train_tokenizer(train, params.tokenizer.vocab_size, params.tokenizer.min_frequency)
    log.info("trained BPE: %d tokens (asked for %d) on %d documents", len(tok), params.tokenizer.vocab_size, len(train))

    # every held-out document must decode back to itself, byte for byte (Hangul included)
    bad = [t for t in held_out if tok.decode(tok(t, add_special_tokens=False)["input_ids"]) != t]
    if bad:
        raise InstructflowError(f"tokenizer does not round-trip {len(bad)} held-out documents, e.g. {bad[0][:80]!r}")
    korean = [t for t in held_out if HANGUL.search(t)]
    english = [t for t in held_out if not HANGUL.search(t)]

    def chars_per_token(texts: list[str]) -> float:
        n_tok = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)
        return sum(len(t) for t in texts) / max(n_tok, 1)

    with stage_output(root, "tokenizer", run, tokenizer=tok):
        pass
    return {"vocab_size": len(tok), "eval_docs_round_trip": len(held_out),
            "chars_per_token_en": round(chars_per_token(english), 4),
            "chars_per_token_ko": round(chars_per_token(korean), 4)}


def main() -> None:
    run_stage("tokenizer", body)


if __name__ == "__main__":
    main()

"""Sentence similarity and embeddings from a trained encoder: a folder or a registered MLflow model.

    >>> sentence_similarity("영화 정말 재밌어요", "이 영화 최고예요")  # the registered sentence embedder
    >>> embed_file("reviews.txt", "reviews.jsonl", source="artifacts/similarity")

The default source is the champion of `instructflow-embedder`, the encoder the `similarity` stage trained so
that cosines follow meaning (KorSTS). A source is a Hugging Face folder (artifacts/similarity; artifacts/mlm or
artifacts/classify: the encoder part of either, whose mean-pooled vectors carry little meaning), an
MLflow model folder, or an MLflow URI (`models:/<name>@<alias>`, `models:/<name>/<version>`,
`runs:/<run>/model`). Load it once with `load_encoder` and pass the result as `source` to avoid
reloading it on every call.

The tokenizer saved with the encoder adds [CLS] / [SEP] itself (`models.encoder.encoder_tokenizer`), so a
sentence is embedded here as the encoder was trained on it and as MLflow's pipeline serves it; a source
whose tokenizer does not (saved before it did) is refused rather than embedded differently.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from instructflow.data import BAD_BYTE, iter_csv, iter_jsonl, read_text
from instructflow.errors import DataError, InstructflowError
from instructflow.io import atomic_file, write_jsonl

DEFAULT_SOURCE = "models:/instructflow-embedder@champion"
POOLINGS = ("mean", "cls")
INPUT_SUFFIXES = (".txt", ".csv", ".tsv", ".jsonl")
OUTPUT_SUFFIXES = (".jsonl", ".npy")


@dataclass(frozen=True)
class Encoder:
    """A loaded encoder: the BERT model (any head; only its encoder is used), its tokenizer, where it came from."""

    model: object  # transformers PreTrainedModel
    tokenizer: object  # transformers PreTrainedTokenizerBase
    source: str

    @property
    def max_length(self) -> int:
        """Tokens per sentence, [CLS] and [SEP] included: the length the tokenizer was saved with (what the
        encoder was trained on, and what a served pipeline truncates to), within the encoder's position limit."""
        return int(min(self.tokenizer.model_max_length, self.model.config.max_position_embeddings))


def _is_uri(source: str) -> bool:
    return ":/" in source and not Path(source).exists()


def _from_folder(folder: Path):
    import transformers

    from models.tokenizer import load_tokenizer

    # loaded as the architecture it was saved as (a masked LM, a classifier), so every weight finds its place and
    # transformers prints no report of unused ones; only its encoder (`base_model`) is used
    architectures = transformers.AutoConfig.from_pretrained(folder).architectures or []
    model_class = (getattr(transformers, architectures[0], None) if architectures else None) or transformers.AutoModel
    # a plain encoder (the similarity stage's BertModel) was saved without a pooler; don't add a random one
    extra = {"add_pooling_layer": False} if model_class is transformers.BertModel else {}
    return model_class.from_pretrained(folder, **extra), load_tokenizer(folder)


def _from_mlflow(uri: str):
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        components = mlflow.transformers.load_model(uri, return_type="components")
    except (MlflowException, OSError) as error:
        raise InstructflowError(f"cannot load an encoder from {uri!r}: {error}. Register one (the `register` "
                                "stage with tracks.encoder on) or pass a model folder such as artifacts/similarity") from error
    return components["model"], components["tokenizer"]


def load_encoder(source: str | Path | Encoder = DEFAULT_SOURCE) -> Encoder:
    """The encoder at `source`: a Hugging Face folder, an MLflow model folder, or an MLflow model URI."""
    if isinstance(source, Encoder):
        return source
    import torch

    from models.encoder import frames_encoder_inputs

    text = str(source)
    folder = Path(source)
    if _is_uri(text):
        model, tokenizer = _from_mlflow(text)
    elif (folder / "MLmodel").is_file():
        model, tokenizer = _from_mlflow(str(folder))
    elif (folder / "config.json").is_file():
        model, tokenizer = _from_folder(folder)
    elif folder.exists():
        raise InstructflowError(f"{folder}: neither a Hugging Face model folder (no config.json) nor an MLflow "
                                "model (no MLmodel)")
    else:
        raise InstructflowError(f"{folder}: no such folder, and not an MLflow URI such as {DEFAULT_SOURCE}")
    missing = [name for name in ("cls_token_id", "sep_token_id", "pad_token_id") if getattr(tokenizer, name) is None]
    if missing:
        raise InstructflowError(f"{text}: the tokenizer has no {', '.join(missing)}; expected the encoder track's "
                                "tokenizer with [CLS], [SEP] and padding")
    if not frames_encoder_inputs(tokenizer):
        raise InstructflowError(f"{text}: the tokenizer does not add [CLS] / [SEP] itself, so it would not embed "
                                "sentences as the encoder was trained on them (saved by an older mlm stage?); "
                                "rerun the mlm stage (and register it again)")
    model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    return Encoder(model, tokenizer, text)


def _check_pooling(pooling: str) -> None:
    if pooling not in POOLINGS:
        raise InstructflowError(f"pooling = {pooling!r}: expected one of {', '.join(POOLINGS)}")


def embed_texts(texts: Sequence[str], source: str | Path | Encoder = DEFAULT_SOURCE, pooling: str = "mean",
                batch_size: int = 32) -> np.ndarray:
    """Sentence embeddings, float32 of shape (N, H); pooling "mean" (over tokens) or "cls" ([CLS] state)."""
    from models.encoder import embed

    _check_pooling(pooling)
    encoder = load_encoder(source)
    vectors = embed(encoder.model, encoder.tokenizer, list(texts), pooling=pooling, batch_size=batch_size,
                    max_length=encoder.max_length)  # (N, H)
    return vectors.numpy().astype(np.float32)


def sentence_similarity(s1: str, s2: str, source: str | Path | Encoder = DEFAULT_SOURCE,
                        pooling: str = "mean") -> float:
    """Cosine similarity, in [-1, 1], of the two sentences' embeddings."""
    import torch

    from models.encoder import cosine_similarity

    for name, sentence in (("first", s1), ("second", s2)):
        if not isinstance(sentence, str) or not sentence.strip():
            raise InstructflowError(f"the {name} sentence is empty")
    vectors = embed_texts([s1, s2], source, pooling)  # (2, H)
    cosine = cosine_similarity(torch.from_numpy(vectors[0]), torch.from_numpy(vectors[1]))
    return min(1.0, max(-1.0, cosine))  # float rounding can step just outside [-1, 1]


# ------------------------------------------------------------------------------------------------ files
def read_sentences(path: str | Path, text_column: str | None = None) -> list[str]:
    """The sentences of a file: .txt one per line; .csv / .tsv / .jsonl from `text_column` (default "text").

    An empty sentence, a missing column or a value that is not text is a DataError naming the line and column.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in INPUT_SUFFIXES:
        raise DataError(path, f"unknown extension {suffix!r}; expected one of {', '.join(INPUT_SUFFIXES)}")
    if not path.is_file():
        raise DataError(path, "file not found")
    text = read_text(path)
    sentences: list[str] = []
    if suffix == ".txt":
        if text_column is not None:
            raise DataError(path, f"a .txt file holds one sentence per line and no columns; got text_column "
                                  f"{text_column!r} (use .csv, .tsv or .jsonl for named columns)")
        lines = text.split("\n")
        while lines and not lines[-1].strip():  # trailing blank lines are the end of the file, not sentences
            lines.pop()
        for number, line in enumerate(lines, 1):
            line = line.removesuffix("\r")
            if BAD_BYTE.search(line):
                raise DataError(path, "not valid UTF-8; save the file as UTF-8", line=number)
            if not line.strip():
                raise DataError(path, "empty line: expected one sentence per line", line=number)
            sentences.append(line)
    else:
        column = text_column or "text"
        rows = iter_jsonl(path, text) if suffix == ".jsonl" else iter_csv(path, text, "\t" if suffix == ".tsv" else ",")
        for number, row in rows:
            if column not in row:
                raise DataError(path, f"no column '{column}'; columns found: {list(row)}", line=number, field=column)
            value = row[column]
            if not isinstance(value, str):
                raise DataError(path, f"expected text, found {json.dumps(value, ensure_ascii=False)}",
                                line=number, field=column)
            if not value.strip():
                raise DataError(path, "text is empty", line=number, field=column)
            sentences.append(value)
    if not sentences:
        raise DataError(path, "no sentences to embed")
    return sentences


def embed_file(input_path: str | Path, output_path: str | Path, source: str | Path | Encoder = DEFAULT_SOURCE,
               pooling: str = "mean", text_column: str | None = None) -> int:
    """Embed every sentence of input_path into output_path; returns how many.

    Output by extension: .jsonl, one {"text", "embedding"} per line in input order; .npy, a float32
    array (N, H) in input order. The input is checked whole before the model is loaded, and the output
    is written atomically, so bad input writes nothing.
    """
    output_path = Path(output_path)
    if output_path.suffix.lower() not in OUTPUT_SUFFIXES:
        raise InstructflowError(f"{output_path}: unknown output extension {output_path.suffix!r}; "
                                f"expected one of {', '.join(OUTPUT_SUFFIXES)}")
    _check_pooling(pooling)
    sentences = read_sentences(input_path, text_column)
    vectors = embed_texts(sentences, source, pooling)  # (N, H)

    if output_path.suffix.lower() == ".npy":
        with atomic_file(output_path) as fh:
            np.save(fh, vectors)
    else:  # the float32 values, exactly
        write_jsonl(output_path, ({"text": s, "embedding": v.tolist()} for s, v in zip(sentences, vectors)))
    return len(sentences)

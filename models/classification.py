"""Text classification data, labels, the TF-IDF baseline and the metrics reported for both.

Rows come from CSV / TSV (chosen by extension, header on line 1) or JSONL. Every row is checked
before any training; the first bad one raises DataError with the file, the 1-based line and the
column. Labels are kept as strings (a JSONL 1 and a CSV "1" are the same label) and numbered by
a LabelMap built from the training file, saved with the model as id2label / label2id.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.sparse import vstack
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score
from sklearn.pipeline import make_pipeline

from instructflow.data import iter_csv, iter_jsonl, read_text
from instructflow.errors import DataError

DELIMITERS = {".csv": ",", ".tsv": "\t"}
JSONL_SUFFIXES = (".jsonl", ".ndjson")


def _label_order(label: str) -> tuple:
    """Integers in numeric order ("2" before "10"), then everything else alphabetically."""
    try:
        return (0, int(label), "")
    except ValueError:
        return (1, 0, label)


@dataclass(frozen=True)
class LabelMap:
    """Label names in id order: id i names labels[i]."""

    labels: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels repeat: {list(self.labels)}")

    @classmethod
    def from_labels(cls, labels: Iterable[str | int]) -> LabelMap:
        """The distinct labels seen, sorted so the same file always gives the same ids."""
        return cls(tuple(sorted({str(label) for label in labels}, key=_label_order)))

    @classmethod
    def from_id2label(cls, id2label: Mapping[int | str, str]) -> LabelMap:
        """From a model config's id2label (keys may be strings after a JSON round trip)."""
        by_id = {int(i): str(label) for i, label in id2label.items()}
        if sorted(by_id) != list(range(len(by_id))):
            raise ValueError(f"id2label ids must be 0..{len(by_id) - 1}, got {sorted(by_id)}")
        return cls(tuple(by_id[i] for i in range(len(by_id))))

    def __len__(self) -> int:
        return len(self.labels)

    def __contains__(self, label: object) -> bool:
        return str(label) in self.labels

    def to_id(self, label: str | int) -> int:
        try:
            return self.labels.index(str(label))
        except ValueError:
            raise KeyError(f"unknown label {label!r}; known labels: {list(self.labels)}") from None

    def to_label(self, index: int) -> str:
        if not 0 <= index < len(self.labels):
            raise KeyError(f"label id {index} is out of range 0..{len(self.labels) - 1}")
        return self.labels[index]

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.labels))

    @property
    def label2id(self) -> dict[str, int]:
        return {label: i for i, label in enumerate(self.labels)}

    def to_json(self) -> str:
        return json.dumps({"labels": list(self.labels)}, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> LabelMap:
        return cls(tuple(json.loads(text)["labels"]))


def _rows(path: Path, text: str, suffix: str, required: list[str]) -> Iterator[tuple[int, dict, list[str]]]:
    """(line, row, columns) of each data row, through the prepare stage's readers (one parser per format:
    TSV cells unquoted, as in NSMC; non-UTF-8 bytes named by line). A CSV/TSV header must name `required`."""
    if suffix in JSONL_SUFFIXES:
        for line, row in iter_jsonl(path, text):
            yield line, row, list(row)
        return
    for n, (line, row) in enumerate(iter_csv(path, text, DELIMITERS[suffix])):
        columns = list(row)
        if n == 0:
            for column in required:
                if column not in columns:
                    raise DataError(path, f"no column '{column}'; columns found: {columns}", line=1, field=column)
        yield line, row, columns


def read_classification(
    path: str | Path,
    text_column: str,
    label_column: str,
    text_pair_column: str | None = None,
    labels: LabelMap | None = None,
) -> list[dict]:
    """Rows {"text", "text_pair" (None without a pair column), "label" (a string)} from CSV / TSV / JSONL.

    With `labels`, a label outside it is an error (e.g. a test-set label never seen in training).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in DELIMITERS and suffix not in JSONL_SUFFIXES:
        raise DataError(path, f"unknown extension {suffix!r}; expected one of .csv, .tsv, .jsonl")
    text = read_text(path)
    if not text.strip():
        raise DataError(path, "file is empty")
    text_columns = [text_column] + ([text_pair_column] if text_pair_column else [])
    required = [*text_columns, label_column]
    rows = _rows(path, text, suffix, required)

    records = []
    for line, row, columns in rows:
        for column in required:  # a JSONL row names its own keys
            if column not in row:
                raise DataError(path, f"no column '{column}'; columns found: {columns}", line=line, field=column)
        for column in text_columns:
            value = row[column]
            if not isinstance(value, str):
                raise DataError(path, f"expected a string, found {json.dumps(value)}", line=line, field=column)
            if not value.strip():
                raise DataError(path, "text is empty", line=line, field=column)
        label = row[label_column]
        if label is None or (isinstance(label, str) and not label.strip()):
            raise DataError(path, "label is missing", line=line, field=label_column)
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            message = f"label must be a string or an integer, found {json.dumps(label)}"
            raise DataError(path, message, line=line, field=label_column)
        label = str(label).strip()
        if labels is not None and label not in labels:
            message = f"label {label!r} is not one of the known labels {list(labels.labels)}"
            raise DataError(path, message, line=line, field=label_column)
        pair = row[text_pair_column] if text_pair_column else None
        records.append({"text": row[text_column], "text_pair": pair, "label": label})
    if not records:
        raise DataError(path, "no data rows", line=1)
    return records


def tfidf_baseline(
    train_texts: Sequence[str],
    train_labels: Sequence[str | int],
    test_texts: Sequence[str],
    seed: int = 0,
    max_features: int = 100_000,
) -> list:
    """Predictions of character n-gram TF-IDF + logistic regression: the bar a transformer must clear.

    Character n-grams within word boundaries (char_wb, 1-3) suit Korean, where a word carries its
    particles and endings, without a morphological analyser.
    """
    model = make_pipeline(
        TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 3), sublinear_tf=True, max_features=max_features),
        LogisticRegression(max_iter=1000, random_state=seed),
    )
    model.fit(list(train_texts), list(train_labels))
    return model.predict(list(test_texts)).tolist()


def tfidf_pairwise_baseline(
    train_pairs: Sequence[tuple[str, str]],
    test_pairs: Sequence[tuple[str, str]],
    seed: int = 0,
    max_features: int = 100_000,
) -> list[float]:
    """Per held-out (chosen, rejected) pair: 1.0 where a TF-IDF preference model ranks chosen first, 0.5 on a tie, else 0.

    The bar a reward model must clear. Each text is the prompt followed by one response (the caller joins them).
    Logistic regression without intercept on the difference of the two TF-IDF vectors, trained on every training
    pair in both orders (chosen - rejected labelled 1, rejected - chosen labelled 0), so its score is antisymmetric:
    swapping the two responses flips the sign, and two responses with the same features tie exactly. Character
    n-grams within word boundaries (char_wb, 1-3), as `tfidf_baseline`, for Korean and English alike.
    """
    if not train_pairs or not test_pairs:
        raise ValueError(f"tfidf_pairwise_baseline needs training and test pairs, got {len(train_pairs)} and "
                         f"{len(test_pairs)}")
    vectorizer = TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 3), sublinear_tf=True, max_features=max_features)
    vectorizer.fit([text for pair in train_pairs for text in pair])

    def differences(pairs: Sequence[tuple[str, str]]):
        return vectorizer.transform([a for a, _ in pairs]) - vectorizer.transform([b for _, b in pairs])  # (N, V)

    diff = differences(train_pairs)
    model = LogisticRegression(fit_intercept=False, max_iter=1000, random_state=seed)
    model.fit(vstack([diff, -diff]), np.r_[np.ones(diff.shape[0]), np.zeros(diff.shape[0])])
    scores = model.decision_function(differences(test_pairs))  # (M,) > 0: the first text is preferred
    return [1.0 if s > 0 else 0.5 if s == 0 else 0.0 for s in scores.tolist()]


def length_baseline(pairs: Sequence[tuple[str, str]]) -> list[float]:
    """Per (chosen, rejected) pair: 1.0 where the chosen response is the longer (in characters), 0.5 on equal
    lengths, else 0.0. The mean is the accuracy of "longer is better", the length bias a reward model may learn."""
    return [1.0 if len(a) > len(b) else 0.5 if len(a) == len(b) else 0.0 for a, b in pairs]


def classification_metrics(y_true: Sequence, y_pred: Sequence, labels: Sequence) -> dict:
    """Accuracy, macro F1 and the confusion matrix (rows: true label, columns: predicted, in `labels` order)."""
    labels = list(labels)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "labels": [str(label) for label in labels],
    }


def plot_confusion(matrix: Sequence[Sequence[int]], labels: Sequence, path: str | Path) -> Path:
    """Write the confusion matrix as a PNG heat map with counts in the cells."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg directly: no pyplot, no global backend
    from matplotlib.figure import Figure

    counts = np.asarray(matrix)
    names = [str(label) for label in labels]
    size = 1.5 + 0.6 * len(names)
    figure = Figure(figsize=(size + 1, size))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(counts, cmap="Blues")
    figure.colorbar(image, ax=axes)
    axes.set_xticks(range(len(names)), names, rotation=45, ha="right")
    axes.set_yticks(range(len(names)), names)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    threshold = counts.max() / 2 if counts.size else 0
    for i in range(counts.shape[0]):
        for j in range(counts.shape[1]):
            color = "white" if counts[i, j] > threshold else "black"
            axes.text(j, i, str(counts[i, j]), ha="center", va="center", color=color)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=100)
    return path

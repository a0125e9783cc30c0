"""Files, written so that a reader never sees half of one: JSON lines, JSON, and whole output folders.

One atomic writer (`atomic_file`) and one atomic folder (`atomic_dir`) serve every stage and command.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO


@contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A binary file handle whose content replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    """JSON with sorted keys (byte-identical for equal data), written atomically."""
    with atomic_file(path) as fh:
        fh.write((json.dumps(data, indent=2, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8"))


def write_jsonl(path: Path, records: Iterable[dict]) -> int:
    """Write records as UTF-8 JSON lines (Korean stays readable), atomically; returns the count."""
    count = 0
    with atomic_file(path) as fh:
        for record in records:
            fh.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
            count += 1
    return count


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON lines file this project wrote (user files go through instructflow.data)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@contextmanager
def atomic_dir(out_dir: Path) -> Iterator[Path]:
    """A temporary folder next to out_dir that replaces it only if the block succeeds.

    Readers never see a half-written out_dir: on any error the temporary folder is removed and
    out_dir is left as it was.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def inputs_key(*parts: str | Path) -> str:
    """A resume key: a hash of strings (e.g. the params digest) and of the bytes of files and folders (the input
    model, the data), so a checkpoint is resumed only by a run on exactly the same inputs."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, Path):
            files = sorted(p for p in part.rglob("*") if p.is_file()) if part.is_dir() else [part]
            for path in files:
                digest.update(f"{path.relative_to(part) if part.is_dir() else path.name}\0".encode())
                digest.update(path.read_bytes())
        else:
            digest.update(f"{part}\0".encode())
    return digest.hexdigest()[:16]

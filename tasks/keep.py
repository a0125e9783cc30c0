"""A stage that fails keeps its last good outputs.

DVC removes a stage's outputs before it starts the stage's command (unless they are `persist`). When the
command then fails (bad data, a bad value in params.yaml, a crash), the stage puts back, from DVC's cache,
the outputs that dvc.lock records for it: its output folder and its metrics/<stage>.json, which DVC's
run-cache keeps in the cache beside the cached outputs. What comes back is exactly what dvc.lock names, so
`dvc status` says what it said before the failed run.

Why not `persist: true` on every output (DVC would then leave them in place and the stage, which writes
atomically, would replace them only when complete)? DVC does not run-cache a stage with a persistent
output, so changing a param back would retrain instead of checking the outputs out (README, "When a stage
fails"). Only the register stage, whose outputs are not cached and never were run-cached, uses `persist`.

Only outputs that are missing are restored: one present is either the previous output (not removed, as
under `python -m tasks.<stage>` without DVC) or a complete new one (written atomically).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import yaml

from instructflow.io import atomic_dir, atomic_file

log = logging.getLogger("instructflow")


def locked_outs(root: Path, stage: str) -> list[dict]:
    """The stage's outputs as dvc.lock records them (path, md5 and hash kind); empty if it never completed."""
    path = root / "dvc.lock"
    if not path.is_file():
        return []
    entry = ((yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("stages") or {}).get(stage) or {}
    return [out for out in entry.get("outs", []) if out.get("md5")]


def _cache_dirs(root: Path) -> tuple[Path, Path]:
    """DVC's object folders: (files/md5 for `hash: md5` entries, the legacy 2.x folder for the others)."""
    try:
        from dvc.repo import Repo

        repo = Repo(str(root), uninitialized=False)
        try:
            return Path(repo.cache.local.path), Path(repo.cache.legacy.path)
        finally:
            repo.close()
    except Exception:  # no DVC repo or an unreadable config: the default place
        legacy = root / ".dvc" / "cache"
        return legacy / "files" / "md5", legacy


def _object(base: Path, md5: str) -> Path:
    return base / md5[:2] / md5[2:]


def _restore_one(root: Path, out: dict, base: Path) -> bool:
    """Put one locked output back from the cache; False (and nothing written) if an object is missing."""
    target = root / out["path"]
    md5 = out["md5"]
    if not md5.endswith(".dir"):
        obj = _object(base, md5)
        if not obj.is_file():
            return False
        with atomic_file(target) as fh, obj.open("rb") as src:
            shutil.copyfileobj(src, fh)
        return True
    manifest = _object(base, md5)
    if not manifest.is_file():
        return False
    entries = json.loads(manifest.read_text(encoding="utf-8"))
    if not all(_object(base, e["md5"]).is_file() for e in entries):
        return False
    with atomic_dir(target) as tmp:
        for entry in entries:
            dest = tmp / entry["relpath"]
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(_object(base, entry["md5"]), dest)  # a plain writable copy, as DVC's `copy` link type
    return True


def restore_outputs(root: Path, stage: str) -> list[str]:
    """After a failed run: put back each output dvc.lock records for the stage that is missing; the paths put back."""
    try:
        missing = [out for out in locked_outs(root, stage) if not (root / out["path"]).exists()]
        if not missing:
            return []
        current, legacy = _cache_dirs(root)
        restored, lost = [], []
        for out in missing:
            base = current if out.get("hash") == "md5" else legacy
            (restored if _restore_one(root, out, base) else lost).append(out["path"])
    except Exception as exc:  # keeping outputs must never hide the stage's own error
        log.warning("stage %s: could not restore its previous outputs: %s", stage, exc)
        return []
    if restored:
        log.info("stage %s failed: its previous outputs are back as dvc.lock records them: %s", stage,
                 ", ".join(restored))
    if lost:
        log.warning("stage %s failed: %s not in DVC's cache, not restored (`dvc pull %s` fetches them from the "
                    "remote)", stage, ", ".join(lost), stage)
    return restored

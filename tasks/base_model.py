"""`pretrain.base_model`: the base model's files, checked, and what DVC and the lineage record of it.

A local folder is a DVC dep of `tokenizer` and `pretrain` (instructflow/stages.py `base_model_deps`): its
content hash is in dvc.lock, so editing the folder reruns both. A registry URI (models:/<name>@<alias>) is
resolved to a version before DVC runs (`instructflow run`, `stage`, `compare` and `dvc-yaml` call
`prepare_base_model`) and the resolution goes to base/base_model.json (name, version, run, weights hash), the
DVC dep in its place: an alias that moved changes the file, both stages rerun and dvc.lock records the new
version. A plain `dvc repro` takes the version the file records (the stage resolves again only when the file
names another URI), so it reproduces what was run. The version's files are downloaded once into
.cache/base_models/<name>/<version> (a folder per version: a registry version never changes).

Refused, naming the folder or URI and why: a folder without config.json or weight files, one that needs
`trust_remote_code` (an `auto_map` in its config, custom *.py files: instructflow runs no code from a model
folder), an architecture AutoModelForCausalLM does not load, a URI that does not resolve (what the model has
is named).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from instructflow.config import Params
from instructflow.errors import ConfigError, InstructflowError
from instructflow.io import atomic_dir, write_json_atomic
from instructflow.stages import BASE_RESOLUTION
from tasks import registry

log = logging.getLogger("instructflow")
CACHE = Path(".cache") / "base_models"
REGISTRY = "models:/"


@dataclass(frozen=True)
class BaseSource:
    model_dir: Path
    tokenizer_dir: Path
    record: dict
    """what the lineage says of it: base_model (as params.yaml has it), weights_sha256, and for a registry version
    its name, version and run_id"""


def is_registry_uri(value: str | None) -> bool:
    return bool(value) and value.startswith(REGISTRY)


def check_folder(path: Path, base_model: str) -> None:
    """Refuse a folder that is not a causal LM transformers loads without running the folder's own code."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    where = f"pretrain.base_model = {base_model}" + ("" if str(path) == base_model else f" ({path})")
    if not path.is_dir():
        raise ConfigError(f"{where}: no such folder; expected a Hugging Face model folder")
    if not (path / "config.json").is_file():
        raise ConfigError(f"{where}: no config.json; expected a Hugging Face model folder (save_pretrained, or "
                          "hf download <repo> --local-dir <folder>)")
    if not any(p.is_file() and p.name.endswith(registry.WEIGHT_SUFFIXES) for p in path.iterdir()):
        raise ConfigError(f"{where}: no weight files; expected files ending in {', '.join(registry.WEIGHT_SUFFIXES)}")
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: config.json is not valid JSON: {exc}") from exc
    remote = [f"auto_map in {name}" for name in ("config.json", "tokenizer_config.json")
              if (path / name).is_file() and "auto_map" in json.loads((path / name).read_text(encoding="utf-8"))]
    remote += [f"custom code file {p.name}" for p in sorted(path.glob("*.py"))]
    if remote:
        raise ConfigError(f"{where}: needs trust_remote_code ({'; '.join(remote)}); instructflow runs no code from a "
                          "model folder: choose a model whose architecture transformers itself provides")
    if config.get("model_type") not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ConfigError(f"{where}: model_type {config.get('model_type')!r} in config.json does not load with "
                          "AutoModelForCausalLM; expected a causal (decoder) language model such as llama, qwen2, gpt2")


# ------------------------------------------------------------------------------------------ the registry
def _parse(uri: str) -> tuple[str, str | None, str | None]:
    """(name, alias, version) of models:/<name>@<alias> or models:/<name>/<version> (config.py checked the form)."""
    rest = uri[len(REGISTRY):]
    if "@" in rest:
        name, alias = rest.split("@", 1)
        return name, alias, None
    name, version = rest.rsplit("/", 1)
    return name, None, version


def resolve(uri: str) -> dict:
    """The registry version a URI names now: {uri, name, version, run_id, weights_sha256}; ConfigError if none."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    name, alias, version = _parse(uri)
    model = registry._registered_model(client, name)
    if model is None:
        names = sorted(m.name for m in client.search_registered_models())
        raise ConfigError(f"pretrain.base_model = {uri}: no registered model named {name!r} in "
                          f"{mlflow.get_tracking_uri()}; registered: {', '.join(names) or 'none'}")
    try:
        found = registry.with_retries(client.get_model_version_by_alias, name, alias) if alias else \
            registry.with_retries(client.get_model_version, name, version)
    except MlflowException as exc:
        versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
        aliases = ", ".join(f"@{a} -> {v}" for a, v in sorted(model.aliases.items())) or "none"
        raise ConfigError(f"pretrain.base_model = {uri}: {name} has no {'alias ' + repr(alias) if alias else 'version ' + version}"
                          f"; its aliases: {aliases}; its versions: {', '.join(map(str, versions)) or 'none'}") from exc
    return {"uri": uri, "name": name, "version": int(found.version), "run_id": found.run_id,
            "weights_sha256": found.tags.get(registry.WEIGHTS_TAG, "")}


def record_resolution(root: Path, uri: str) -> dict:
    """Resolve `uri` now and write base/base_model.json, only when it changed (its DVC hash moves with the version)."""
    record = resolve(uri)
    path = root / BASE_RESOLUTION
    if not path.is_file() or json.loads(path.read_text()) != record:
        write_json_atomic(path, record)
        log.info("pretrain.base_model %s resolves to %s version %d: recorded in %s", uri, record["name"],
                 record["version"], BASE_RESOLUTION)
    return record


def prepare_base_model(root: Path, params: Params) -> None:
    """Before DVC runs: a folder is checked, a registry URI resolved and recorded (DVC then sees a moved alias)."""
    value = params.pretrain.base_model
    if value is None:
        return
    if is_registry_uri(value):
        record_resolution(root, value)
    else:
        check_folder(folder(root, value), value)


def folder(root: Path, value: str) -> Path:
    path = Path(value)
    return path if path.is_absolute() else root / path


def _download(root: Path, record: dict) -> Path:
    """The version's files (model/, components/tokenizer/), downloaded once into the cache."""
    import mlflow

    cache = root / CACHE / record["name"] / str(record["version"])
    if not cache.is_dir():
        log.info("downloading %s version %d into %s", record["name"], record["version"], cache)
        with atomic_dir(cache) as tmp:
            mlflow.artifacts.download_artifacts(artifact_uri=f"{REGISTRY}{record['name']}/{record['version']}",
                                                dst_path=str(tmp))
    return cache


def source(root: Path, params: Params) -> BaseSource:
    """Where the stages find the base model's weights and tokenizer, checked; its record for the lineage."""
    value = params.pretrain.base_model
    if not is_registry_uri(value):
        path = folder(root, value)
        check_folder(path, value)
        return BaseSource(path, path, {"base_model": value, "weights_sha256": registry.weights_sha256(path)})
    path = root / BASE_RESOLUTION
    record = json.loads(path.read_text()) if path.is_file() else {}
    if record.get("uri") != value:  # a plain `dvc repro` after params.yaml changed: resolve here
        record = record_resolution(root, value)
    cache = _download(root, record)
    model_dir = cache / "model"
    check_folder(model_dir, value)
    sha = registry.weights_sha256(model_dir)
    if record["weights_sha256"] and sha != record["weights_sha256"]:
        raise InstructflowError(f"{model_dir}: its weights (sha256 {sha[:12]}) are not those of {record['name']} version "
                                f"{record['version']} ({record['weights_sha256'][:12]}); delete {cache} to download it again")
    return BaseSource(model_dir, cache / "components" / "tokenizer",
                      {"base_model": value, "weights_sha256": sha,
                       **{k: record[k] for k in ("name", "version", "run_id")}})


def lineage_tags(record: dict) -> dict[str, str]:
    """Registry version tags naming the base a model was fine-tuned from (none for a model trained here)."""
    return {f"base_model{'' if key == 'base_model' else '.' + key}": str(value) for key, value in sorted(record.items())}

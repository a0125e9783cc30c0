"""The model registry: log a Hugging Face folder as an MLflow model, tag it with its lineage, and
move the `champion` / `challenger` aliases through a promotion gate.

The gate (`decide`) is a pure function; everything that touches MLflow lives in the functions
around it. A version carries, as tags, what made it (`git_commit`, `params_hash`,
`data.<file>.md5`, `run.<stage>`) and how it scored (`metric.<key>`, `metric.<key>.ci_low`,
`metric.<key>.ci_high`), so the gate and the CLI read everything from the registry itself.

Every version also carries `weights_sha256`, a content hash of its weight files. `register` registers
a folder only when its weights differ from the version it would replace (`register_unless_same`): a rerun
that trains byte-identical weights adds no version.

`registry_transaction` makes a registration step all-or-nothing: if anything inside it fails (an error,
Ctrl-C, SIGTERM), the aliases go back to where they were and the versions made inside are deleted. With a
journal file it survives SIGKILL too: the journal, written before the first change and removed after the
last, holds what the registry looked like before and, once every version is made and every decision
taken, the aliases the transaction is about to set. The next run (`recover_transaction`) finds it and
completes the alias moves (when the journal has them) or undoes everything (when it does not).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

import mlflow
from mlflow.entities.model_registry import ModelVersion, RegisteredModel
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from instructflow import signals
from instructflow.errors import InstructflowError
from instructflow.io import write_json_atomic

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
WEIGHTS_TAG = "weights_sha256"

# The files of a Hugging Face folder that hold its weights (save_pretrained: safetensors, or pickled
# shards, and the index of a sharded save). Config, tokenizer and a stage's by-products are not weights.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")

# Pinned into the logged model's requirements: without an explicit list MLflow infers one that asks
# for torchvision (DESIGN, "Facts about the stack").
SERVING_PACKAGES = ("torch", "transformers", "tokenizers", "safetensors", "accelerate")

# task -> name of the transformers Auto class that loads a folder saved for it
TASK_AUTO_CLASS = {
    "text-generation": "AutoModelForCausalLM",
    "text-classification": "AutoModelForSequenceClassification",
    "feature-extraction": "AutoModel",
    "fill-mask": "AutoModelForMaskedLM",
}

# MLflow error codes that mean "try again": a locked sqlite file surfaces as TEMPORARILY_UNAVAILABLE,
# a tracking server under load as the others.
TRANSIENT_ERROR_CODES = frozenset(
    {"TEMPORARILY_UNAVAILABLE", "DEADLINE_EXCEEDED", "REQUEST_LIMIT_EXCEEDED", "RESOURCE_EXHAUSTED"}
)


class RollbackError(InstructflowError):
    """A registry transaction failed and could not restore the registry; raised from the original error."""


# --------------------------------------------------------------------------------------------------
# The gate: pure


@dataclass(frozen=True)
class MetricValue:
    """A metric's point estimate and, optionally, its confidence interval."""

    value: float
    ci_low: float | None = None
    ci_high: float | None = None

    def __post_init__(self) -> None:
        if (self.ci_low is None) != (self.ci_high is None):
            raise ValueError(f"a confidence interval needs both bounds, got ci_low={self.ci_low}, ci_high={self.ci_high}")
        if self.ci_low is not None and not self.ci_low <= self.ci_high:
            raise ValueError(f"ci_low must not exceed ci_high, got [{self.ci_low}, {self.ci_high}]")

    @property
    def has_ci(self) -> bool:
        return self.ci_low is not None

    def __str__(self) -> str:
        ci = f" [{self.ci_low:.4g}, {self.ci_high:.4g}]" if self.has_ci else ""
        return f"{self.value:.4g}{ci}"


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


def decide(
    challenger: MetricValue,
    champion: MetricValue | None,
    greater_is_better: bool = True,
    use_ci: bool = True,
    metric: str = "metric",
) -> Decision:
    """Whether the challenger replaces the champion.

    No champion: promote. With `use_ci` and a challenger CI: promote only if the whole CI lies
    strictly beyond the champion's value (a win the evaluation noise cannot explain). Otherwise:
    promote only if the value is strictly better. A NaN challenger never wins; a NaN champion
    always loses to a real number.
    """
    head = f"challenger {metric} {challenger}"
    if math.isnan(challenger.value):
        return Decision(False, f"{head}: kept champion (challenger value is not a number)")
    if champion is None:
        return Decision(True, f"{head}, no champion yet: promoted")
    head += f" vs champion {champion.value:.4g}"
    if math.isnan(champion.value):
        return Decision(True, f"{head}: promoted (champion value is not a number)")

    if use_ci and challenger.has_ci:
        bound, word = (challenger.ci_low, "above") if greater_is_better else (challenger.ci_high, "below")
        beyond = bound > champion.value if greater_is_better else bound < champion.value
        why = f"CI lies {word} the champion" if beyond else f"CI does not lie {word} {champion.value:.4g}"
    else:
        word = "above" if greater_is_better else "below"
        beyond = challenger.value > champion.value if greater_is_better else challenger.value < champion.value
        why = f"{challenger.value:.4g} is {'' if beyond else 'not '}{word} {champion.value:.4g}"
    return Decision(beyond, f"{head}: {'promoted' if beyond else 'kept champion'} ({why})")


# --------------------------------------------------------------------------------------------------
# Retries: transient I/O only

T = TypeVar("T")


def is_transient(error: BaseException) -> bool:
    """A registry error worth retrying: a busy store, a timeout, a dropped connection."""
    if not isinstance(error, MlflowException):
        return False
    if error.error_code in TRANSIENT_ERROR_CODES:
        return True
    import requests  # MLflow's REST client wraps requests errors without keeping their type

    cause = error.__cause__ or error.__context__
    return isinstance(cause, requests.exceptions.ConnectionError | requests.exceptions.Timeout)


def with_retries(call: Callable[..., T], *args, tries: int = 3, backoff_s: float = 0.5, **kwargs) -> T:
    """`call(*args, **kwargs)`, retried on transient registry errors; any other error raises at once."""
    for attempt in range(1, tries + 1):
        try:
            return call(*args, **kwargs)
        except MlflowException as error:
            if attempt == tries or not is_transient(error):
                raise
            log.warning("registry call %s failed (%s), try %d of %d", getattr(call, "__name__", call), error, attempt, tries)
            time.sleep(backoff_s * 2 ** (attempt - 1))
    raise AssertionError("unreachable")


def _registered_model(client: MlflowClient, name: str) -> RegisteredModel | None:
    try:
        return with_retries(client.get_registered_model, name)
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


# --------------------------------------------------------------------------------------------------
# Logging and registering


def serving_requirements() -> list[str]:
    """Exact pins of the packages the model needs to load, without local labels (`2.13.0+cpu` ->
    `2.13.0`) so a GPU worker installs its CUDA build of the same release."""
    return [f"{package}=={importlib.metadata.version(package).split('+')[0]}" for package in SERVING_PACKAGES]


def version_tags(lineage: dict[str, str], metrics: dict[str, float]) -> dict[str, str]:
    """Lineage keys as they are; metrics as `metric.<key>`, their `<key>_ci_low` / `<key>_ci_high`
    companions as `metric.<key>.ci_low` / `metric.<key>.ci_high`."""
    tags = {key: str(value) for key, value in lineage.items()}
    for key, value in metrics.items():
        for suffix in ("ci_low", "ci_high"):
            base = key.removesuffix(f"_{suffix}")
            if base != key and base in metrics:
                tags[f"metric.{base}.{suffix}"] = repr(float(value))
                break
        else:
            tags[f"metric.{key}"] = repr(float(value))
    return tags


def _load_components(model_dir: Path, task: str) -> dict:
    import transformers

    if task not in TASK_AUTO_CLASS:
        raise InstructflowError(f"task '{task}' is not one the registry logs; expected one of {sorted(TASK_AUTO_CLASS)}")
    if not (model_dir / "config.json").is_file():
        raise InstructflowError(f"{model_dir}: not a Hugging Face model folder (no config.json)")
    auto_class = getattr(transformers, TASK_AUTO_CLASS[task])
    # an encoder for embeddings needs no pooler (the masked LM never trained one): don't add a random one
    extra = {"add_pooling_layer": False} if task == "feature-extraction" else {}
    return {
        "model": auto_class.from_pretrained(model_dir, **extra),
        "tokenizer": transformers.AutoTokenizer.from_pretrained(model_dir),
    }


def weights_sha256(model_dir: Path) -> str:
    """A sha256 over the weight files of a model folder: each file's name, size and bytes, in name order.

    Two folders holding the same weights hash the same wherever and whenever they were written; the
    config, the tokenizer and what a stage writes beside the model (history.csv, loss.png) do not count.
    """
    model_dir = Path(model_dir)
    files = sorted(p for p in model_dir.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)) \
        if model_dir.is_dir() else []
    if not files:
        raise InstructflowError(f"{model_dir}: no weight files; expected files ending in {', '.join(WEIGHT_SUFFIXES)}")
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.name}\0{path.stat().st_size}\0".encode())
        with path.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def _model_card(model_name: str, task: str, tags: dict[str, str]):
    """A card written from the lineage, so MLflow does not look one up on the Hub."""
    from huggingface_hub import ModelCard

    lines = "\n".join(f"- `{key}`: {value}" for key, value in sorted(tags.items()))
    return ModelCard(f"---\npipeline_tag: {task}\n---\n# {model_name}\n\nTrained by instructflow.\n\n{lines}\n")


def log_and_register(
    model_name: str,
    model_dir: Path,
    task: str,
    lineage: dict[str, str],
    metrics: dict[str, float],
    run_id: str | None = None,
    weights_sha: str | None = None,
) -> ModelVersion:
    """Log the model + tokenizer saved in `model_dir` under `run_id` (or the active run) and register
    it as a new version of `model_name`, tagged with its lineage, its metrics and `weights_sha256`
    (`weights_sha`, when the caller has already hashed the folder).

    The version is created with its tags in one call, so no version exists without its lineage. It
    loads with `mlflow.transformers.load_model("models:/<name>/<version>")`, serves with
    `mlflow models serve`, and its artifacts hold plain transformers folders (`model/`,
    `components/tokenizer/`). A `text-generation` model (the policy) is served as a chat model
    (tasks/serving.py: messages and sampling params in, greedy by default); the others as MLflow's
    transformers flavor serves them.
    """
    model_dir = Path(model_dir)
    run_id = run_id or (run.info.run_id if (run := mlflow.active_run()) else None)
    if run_id is None:
        raise InstructflowError(f"registering '{model_name}' needs an MLflow run: pass run_id or start a run first")
    components = _load_components(model_dir, task)
    tags = {**version_tags(lineage, metrics), WEIGHTS_TAG: weights_sha or weights_sha256(model_dir)}
    log_model = mlflow.transformers.log_model
    if task == "text-generation":
        from tasks import serving  # torch and the generation code: only when a policy is logged

        log_model = functools.partial(serving.log_chat_model, served_name=model_name)
    info = log_model(
        transformers_model=components,
        name="model",
        task=task,
        pip_requirements=serving_requirements(),
        registered_model_name=model_name,
        tags=tags,  # on the LoggedModel and, through registration, on the new version
        model_card=_model_card(model_name, task, tags),
        # a served encoder cuts inputs at the tokenizer's saved model_max_length, as training did
        model_config={"truncation": True} if task in {"text-classification", "feature-extraction"} else None,
        run_id=run_id,
    )
    version = with_retries(MlflowClient().get_model_version, model_name, str(info.registered_model_version))
    log.info("registered %s version %s from %s (run %s)", model_name, version.version, model_dir, run_id)
    return version


@dataclass(frozen=True)
class Registration:
    """The version `register_unless_same` settled on: new, or an existing one with the same weights."""

    version: ModelVersion
    weights_sha256: str
    skipped: str | None = None
    """why no new version was made (the version with the same weights, and its alias); None when one was"""


def replaced_versions(model_name: str) -> list[tuple[str, ModelVersion]]:
    """The versions a new registration of `model_name` would replace, each with the aliases it holds
    ('challenger', 'champion', 'challenger and champion', or 'latest').

    A new version takes `challenger` and may take `champion`, so those are the versions it would replace;
    a model with neither alias (moved by hand) has its latest version instead. A model not registered
    yet has none.
    """
    client = MlflowClient()
    model = _registered_model(client, model_name)
    if model is None:
        return []
    held: dict[int, list[str]] = {}  # version -> the aliases among challenger and champion it holds
    for alias in (CHALLENGER, CHAMPION):
        if alias in model.aliases:
            held.setdefault(int(model.aliases[alias]), []).append(alias)
    found = {number: " and ".join(names) for number, names in held.items()}
    if not found:
        versions = with_retries(client.search_model_versions, f"name = '{model_name}'")
        found = {max(int(v.version) for v in versions): "latest"} if versions else {}
    return [(label, with_retries(client.get_model_version, model_name, str(number))) for number, label in found.items()]


def register_unless_same(
    model_name: str,
    model_dir: Path,
    task: str,
    lineage: dict[str, str],
    metrics: dict[str, float],
    run_id: str | None = None,
) -> Registration:
    """Register `model_dir` as a new version of `model_name` (`log_and_register`) unless its weights are
    byte-identical to a version it would replace (`replaced_versions`): then no version is made and that
    version is returned, with the reason.

    A rerun on the same inputs trains the same weights; registering them again would only add a copy
    that differs from the last one in its number. The match is by `weights_sha256` tag: versions
    registered before the tag existed never match, so the first run after it registers once more.
    """
    sha = weights_sha256(model_dir)
    for alias, version in replaced_versions(model_name):
        if version.tags.get(WEIGHTS_TAG) == sha:
            reason = f"weights identical to version {version.version} ({alias}), weights_sha256 {sha[:12]}"
            log.info("%s: registration of %s skipped: %s", model_name, model_dir, reason)
            return Registration(version, sha, reason)
    return Registration(log_and_register(model_name, model_dir, task, lineage, metrics, run_id, weights_sha=sha), sha)


# --------------------------------------------------------------------------------------------------
# Aliases and promotion


def aliases(model_name: str) -> dict[str, int]:
    """Alias -> version of a registered model; empty when the model is not registered yet."""
    model = _registered_model(MlflowClient(), model_name)
    return {alias: int(version) for alias, version in (model.aliases if model else {}).items()}


def metric_value(version: ModelVersion, metric_key: str) -> MetricValue:
    """The `metric.<key>` tags of a version as a MetricValue."""
    tags = version.tags
    if f"metric.{metric_key}" not in tags:
        found = sorted(key for key in tags if key.startswith("metric."))
        raise InstructflowError(f"{version.name} version {version.version} has no tag 'metric.{metric_key}'; it has {found}")

    def number(key: str) -> float | None:
        return float(tags[key]) if key in tags else None

    return MetricValue(
        number(f"metric.{metric_key}"),
        number(f"metric.{metric_key}.ci_low"),
        number(f"metric.{metric_key}.ci_high"),
    )


def promote(model_name: str, version: int | str, metric_key: str, greater_is_better: bool = True, use_ci: bool = True) -> Decision:
    """Point `challenger` at `version`, compare it with the `champion` through `decide`, and move
    `champion` to it when it wins. Wrap in `registry_transaction` to undo the moves if a later step fails."""
    decision = gate(model_name, version, metric_key, greater_is_better, use_ci)
    move_aliases(model_name, version, decision)
    return decision


def gate(model_name: str, version: int | str, metric_key: str, greater_is_better: bool = True, use_ci: bool = True) -> Decision:
    """`promote`'s decision, without moving anything: whether `version` should become the champion."""
    client = MlflowClient()
    version = str(version)
    # read and check both metrics before moving anything, so a bad tag leaves the aliases alone
    challenger = metric_value(with_retries(client.get_model_version, model_name, version), metric_key)
    champion_version = aliases(model_name).get(CHAMPION)
    if champion_version == int(version):
        decision = Decision(True, f"{model_name} version {version} is already the champion")
    else:
        champion = None
        if champion_version is not None:
            champion = metric_value(with_retries(client.get_model_version, model_name, str(champion_version)), metric_key)
        decision = decide(challenger, champion, greater_is_better, use_ci, metric=metric_key)
    return decision


def move_aliases(model_name: str, version: int | str, decision: Decision) -> None:
    """`challenger` to `version`, and `champion` too when the decision promotes it."""
    client = MlflowClient()
    version = str(version)
    with_retries(client.set_registered_model_alias, model_name, CHALLENGER, version)
    if decision.promote and aliases(model_name).get(CHAMPION) != int(version):
        with_retries(client.set_registered_model_alias, model_name, CHAMPION, version)
    log.info("%s version %s: %s", model_name, version, decision.reason)


@dataclass(frozen=True)
class _Snapshot:
    exists: bool
    aliases: dict[str, int]
    last_version: int  # versions above this were made inside the transaction (numbers are never reused)


def _snapshot(client: MlflowClient, name: str) -> _Snapshot:
    if _registered_model(client, name) is None:
        return _Snapshot(False, {}, 0)
    versions = with_retries(client.search_model_versions, f"name = '{name}'")
    return _Snapshot(True, aliases(name), max((int(v.version) for v in versions), default=0))


def _restore(client: MlflowClient, name: str, before: _Snapshot) -> None:
    if not before.exists:
        if _registered_model(client, name) is not None:
            with_retries(client.delete_registered_model, name)  # made inside: its versions and aliases go with it
        return
    now = aliases(name)
    for alias, version in before.aliases.items():
        if now.get(alias) != version:
            with_retries(client.set_registered_model_alias, name, alias, str(version))
    for alias in now.keys() - before.aliases.keys():
        with_retries(client.delete_registered_model_alias, name, alias)
    for version in with_retries(client.search_model_versions, f"name = '{name}'"):
        if int(version.version) > before.last_version:
            with_retries(client.delete_model_version, name, version.version)


class Transaction:
    """The open transaction `registry_transaction` yields: `commit` records the alias moves about to be made."""

    def __init__(self, journal: Path | None, record: dict):
        self.journal, self.record = journal, record

    def commit(self, targets: dict[str, tuple[int | str, bool]]) -> None:
        """Before the alias moves: model -> (its version, whether it becomes champion). After a SIGKILL from
        here on, the next run completes these moves instead of undoing the transaction."""
        self.record["targets"] = {name: {CHALLENGER: int(version), CHAMPION: int(version) if promoted else None}
                                  for name, (version, promoted) in targets.items()}
        if self.journal is not None:
            write_json_atomic(self.journal, self.record)


def _rollback(client: MlflowClient, before: dict[str, _Snapshot]) -> dict[str, Exception]:
    failed = {}
    for name, snapshot in before.items():
        try:
            _restore(client, name, snapshot)
        except Exception as restore_error:  # noqa: BLE001  (reported by the caller)
            failed[name] = restore_error
    return failed


@contextmanager
def registry_transaction(model_names: list[str], journal: Path | None = None,
                         owner: dict[str, str] | None = None) -> Iterator[Transaction]:
    """All-or-nothing registry changes for `model_names`.

    On an exception inside the block (Ctrl-C and SIGTERM included) every alias goes back to the version
    it pointed at on entry, aliases added inside are deleted, versions registered inside are deleted
    (a model first registered inside is deleted whole), and the exception is re-raised. If the
    restore itself fails, RollbackError is raised from the original exception, naming the models
    left changed. Runs and logged models stay in tracking: they record what was tried.

    With `journal` (a file path), the state on entry is written there before anything changes and the
    file is removed once the transaction is over (committed or rolled back): a file left behind means a
    process died inside; `recover_transaction` settles it. `owner` (tags naming the process and its run)
    goes into the journal.
    """
    client = MlflowClient()
    before = {name: _snapshot(client, name) for name in model_names}
    record = {"owner": owner or {}, "pid": os.getpid(), "before": {name: asdict(s) for name, s in before.items()},
              "targets": None}
    if journal is not None:
        write_json_atomic(journal, record)
    try:
        yield Transaction(journal, record)
    except BaseException as error:
        with signals.deferred():  # a second signal must not cut the rollback short
            if journal is not None and record["targets"] is not None:  # from here on, a next run undoes too
                record["targets"] = None
                write_json_atomic(journal, record)
            failed = _rollback(client, before)
            if failed:
                details = "; ".join(f"{name}: {problem}" for name, problem in failed.items())
                raise RollbackError(f"registry rollback incomplete after {type(error).__name__}: {details}"
                                    + (f"; the next run retries it ({journal})" if journal else "")) from error
            if journal is not None:
                journal.unlink(missing_ok=True)
        log.warning("registry changes to %s rolled back after %s: %s", model_names, type(error).__name__, error)
        raise
    if journal is not None:
        journal.unlink(missing_ok=True)


def recover_transaction(journal: Path) -> str | None:
    """Settle a transaction a killed process left half-done (its journal file); what was done, None if none.

    Versions made and decisions taken (the journal has the alias targets): the alias moves are completed.
    Otherwise everything is undone, as the transaction's own rollback would have done. A journal whose
    process is still alive belongs to a register running now: left alone.
    """
    if not journal.is_file():
        return None
    from tasks.tracking import process_gone

    record = json.loads(journal.read_text())
    owner = record.get("owner", {})
    if owner and not process_gone(owner):
        log.warning("%s: a registry transaction of a live process (pid %s) is open; left alone", journal,
                    owner.get("instructflow.pid"))
        return None
    client = MlflowClient()
    who = f"pid {record.get('pid')}" + (f", MLflow run {owner['run_id']}" if owner.get("run_id") else "")
    with signals.deferred():
        targets = record.get("targets")
        if targets:
            for name, moves in targets.items():
                with_retries(client.set_registered_model_alias, name, CHALLENGER, str(moves[CHALLENGER]))
                if moves[CHAMPION] is not None:
                    with_retries(client.set_registered_model_alias, name, CHAMPION, str(moves[CHAMPION]))
            done = ("completed it: " + "; ".join(
                f"{name} challenger -> v{m[CHALLENGER]}" + (f", champion -> v{m[CHAMPION]}" if m[CHAMPION] else "")
                for name, m in targets.items()))
        else:
            before = {name: _Snapshot(**s) for name, s in record["before"].items()}
            failed = _rollback(client, before)
            if failed:
                raise RollbackError(f"{journal}: undoing the half-done registry transaction ({who}) failed: "
                                    + "; ".join(f"{name}: {problem}" for name, problem in failed.items()))
            done = "rolled it back: " + "; ".join(
                (f"{name} back to aliases {s.aliases or 'none'}, versions after v{s.last_version} deleted" if s.exists
                 else f"{name} deleted (first registered inside)") for name, s in before.items())
        journal.unlink()
    message = f"registry transaction left half-done by a killed register ({who}): {done}"
    log.warning(message)
    return message


# --------------------------------------------------------------------------------------------------
# Summary for the CLI


def describe(model_names: list[str]) -> list[dict]:
    """One row per aliased version: name, version, aliases, metrics (from `metric.*` tags), git
    commit and run. Models not registered yet have no rows."""
    client = MlflowClient()
    rows = []
    for name in model_names:
        by_version: dict[int, list[str]] = {}
        for alias, version in aliases(name).items():
            by_version.setdefault(version, []).append(alias)
        for version in sorted(by_version, reverse=True):
            mv = with_retries(client.get_model_version, name, str(version))
            metrics = {key.removeprefix("metric."): float(value) for key, value in mv.tags.items() if key.startswith("metric.")}
            rows.append(
                {
                    "name": name,
                    "version": version,
                    "aliases": sorted(by_version[version]),
                    "metrics": dict(sorted(metrics.items())),
                    "git_commit": mv.tags.get("git_commit"),
                    "run_id": mv.run_id,
                }
            )
    return rows

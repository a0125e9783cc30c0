"""Sampling from any decoder the project made: a stage output, a folder, or a registered version.

`instructflow generate` runs this; so can a stage or a flow that needs samples (the feedback loop ranks K
samples per prompt: `generate_rows` with `n=K`). Layers:

- `SamplingParams`: the knobs, checked before any model loads (`sampling_params` turns a bad value into a
  ConfigError naming it and what it takes);
- `load_model(ref, root)`: `sft` / `align` / `pretrain` (artifacts/<stage>), a Hugging Face folder, an MLflow
  model folder, or a registry URI `models:/<name>@<alias>` / `models:/<name>/<version>`; with a `model_version`
  string stamped on every row (`models:/instructflow-policy/3`, `artifacts/sft@<weights sha256, 12 chars>`);
- `read_prompts(path)`: JSON lines with `prompt` (a string, or messages ending with a user turn) or `messages`,
  or a text file with one prompt a line; a bad row is a DataError naming the file, the line and the field;
- `generate_rows(...)`: the chat template (ready for the assistant's turn), batches, N samples per prompt, stop
  strings, a progress bar; rows {prompt_index, prompt, sample, response, finish_reason, new_tokens, seed,
  model_version, sampling}; `write_rows` writes them as JSON lines, atomically.

Seeds: sample s of prompt p draws from its own generator, seeded with `sample_seed(seed, p, s)` (the first 8
bytes of sha256("{seed}/{p}/{s}")), the row's `seed` field. Its draws do not depend on the batch it lands in,
so the same seed and params give the same rows at any batch size, and one row is reproduced alone with
`models.generate.generate(model, [prompt_ids], ..., seed=[row["seed"]])`.

Stop strings: generation of a row ends once its decoded text contains one (`generate`'s should_stop), and the
response is cut right before the first occurrence of any of them (finish_reason "stop"); otherwise the row
ends at EOS ("eos", the EOS not in the text) or after max_new_tokens or the model's last position ("length").
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from instructflow.data import BAD_BYTE, _At, _prompt, iter_jsonl, read_text
from instructflow.errors import ConfigError, DataError, InstructflowError
from instructflow.io import write_jsonl

STAGE_MODELS = ("pretrain", "sft", "align")  # the stages whose output is a causal LM (artifacts/<stage>)
REGISTRY_SCHEME = "models:/"


# --------------------------------------------------------------------------------------------------
# Sampling params: checked before anything loads


class SamplingParams(BaseModel):
    """How to sample; the defaults are greedy, one sample per prompt, the KV cache on."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float = Field(0.0, description="0 = greedy; else logits / temperature (>= 0)")
    top_k: int = Field(0, description="keep the k most likely tokens (0 = off)")
    top_p: float = Field(1.0, description="keep the smallest set of tokens reaching this probability, in (0, 1]")
    repetition_penalty: float = Field(1.0, gt=0, description="CTRL's penalty on ids already seen (1 = off)")
    max_new_tokens: int = Field(128, ge=1, description="new tokens per sample at most (and the model's positions)")
    n: int = Field(1, ge=1, description="samples per prompt")
    stop: list[str] = Field([], description="end a sample where its text first contains one of these")
    seed: int = Field(0, description="with the prompt and sample index, seeds each sample's draws")
    use_cache: bool = Field(True, description="the KV cache (off: recompute the whole sequence every step)")

    @field_validator("stop")
    @classmethod
    def _stop_strings_not_empty(cls, stop: list[str]) -> list[str]:
        if any(not s for s in stop):
            raise ValueError(f"stop strings must be non-empty, got {stop!r}")
        return stop

    @model_validator(mode="after")
    def _sampling_in_range(self) -> SamplingParams:
        from models.generate import check_sampling

        check_sampling(self.temperature, self.top_k, self.top_p)  # the messages sample_next itself gives
        return self


def sampling_params(**values: Any) -> SamplingParams:
    """SamplingParams from keyword values; ConfigError listing every bad one: `name = value: what it takes`."""
    try:
        return SamplingParams(**values)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            message = err["msg"].removeprefix("Value error, ")
            if err["loc"]:
                key = ".".join(str(part) for part in err["loc"][:1])
                message = f"{key} = {values.get(key)!r}: {message}"
            problems.append(message)
        raise ConfigError("invalid sampling params:\n  " + "\n  ".join(problems)) from None


def sample_seed(seed: int, prompt_index: int, sample: int) -> int:
    """The seed of sample `sample` of prompt `prompt_index` in a run seeded `seed` (63 bits)."""
    digest = hashlib.sha256(f"{seed}/{prompt_index}/{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


# --------------------------------------------------------------------------------------------------
# Models: a stage output, a folder, or the registry


@dataclass
class Loaded:
    """A causal LM on its device in eval mode, its tokenizer (with the chat template), and what to call it."""

    model: Any  # transformers PreTrainedModel
    tokenizer: Any  # transformers PreTrainedTokenizerFast
    model_version: str


def _from_folder(folder: Path, tokenizer_folder: Path, model_version: str) -> Loaded:
    from transformers import AutoModelForCausalLM

    from models.tokenizer import load_tokenizer
    from models.training import for_inference

    model = for_inference(AutoModelForCausalLM.from_pretrained(folder))
    tokenizer = load_tokenizer(tokenizer_folder)
    missing = [name for name in ("eos_token_id", "pad_token_id") if getattr(tokenizer, name) is None]
    if missing:
        raise InstructflowError(f"{tokenizer_folder}: the tokenizer has no {', '.join(missing)}; expected the "
                                "project's tokenizer (bos/eos/pad and the chat template)")
    return Loaded(model, tokenizer, model_version)


def _registry_listing(client, name: str) -> str:
    """What the registry holds, for an error: the model's versions and aliases, or the registered models."""
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException:
        names = sorted(m.name for m in client.search_registered_models())
        return f"registered models: {', '.join(names) if names else 'none'}"
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
    aliases = ", ".join(f"@{alias} -> {version}" for alias, version in sorted(model.aliases.items()))
    return f"'{name}' has versions {', '.join(map(str, versions)) or 'none'}; aliases {aliases or 'none'}"


def resolve_registry_uri(uri: str) -> tuple[str, str]:
    """(name, version) of `models:/<name>@<alias>` or `models:/<name>/<version>`; InstructflowError naming the
    URI and what the registry holds when it does not resolve."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    rest = uri.removeprefix(REGISTRY_SCHEME)
    if "@" in rest:
        name, _, alias = rest.partition("@")
        version = None
    else:
        name, _, version = rest.partition("/")
        alias = None
    if not name or not (alias or version) or "/" in (alias or "") or (version is not None and not version.isdigit()):
        raise InstructflowError(f"{uri!r}: expected models:/<name>@<alias> or models:/<name>/<version>")
    from tasks.registry import with_retries

    client = MlflowClient()
    try:
        found = (with_retries(client.get_model_version_by_alias, name, alias) if alias
                 else with_retries(client.get_model_version, name, version))
    except MlflowException as error:
        if error.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        raise InstructflowError(f"{uri!r} does not resolve in the registry ({mlflow.get_registry_uri()}): "
                                f"{_registry_listing(client, name)}") from None
    return name, str(found.version)


def load_model(ref: str | Path, root: Path) -> Loaded:
    """The causal LM `ref` names: a stage (`sft`, `align`, `pretrain` -> root/artifacts/<stage>), a Hugging Face
    folder, an MLflow model folder (MLmodel, model/, components/tokenizer/), or a registry URI."""
    from tasks.registry import weights_sha256

    text = str(ref)
    if text.startswith(REGISTRY_SCHEME):
        import mlflow

        name, version = resolve_registry_uri(text)
        with tempfile.TemporaryDirectory(prefix="generate-") as tmp:  # weights are in memory once loaded
            local = Path(mlflow.artifacts.download_artifacts(f"{REGISTRY_SCHEME}{name}/{version}", dst_path=tmp))
            return _from_folder(local / "model", local / "components" / "tokenizer",
                                f"{REGISTRY_SCHEME}{name}/{version}")
    folder = root / "artifacts" / text if text in STAGE_MODELS else Path(text)
    if not folder.is_absolute() and not folder.exists() and (root / folder).exists():
        folder = root / folder
    if (folder / "MLmodel").is_file():
        return _from_folder(folder / "model", folder / "components" / "tokenizer",
                            f"{text}@{weights_sha256(folder / 'model')[:12]}")
    if not (folder / "config.json").is_file():
        hint = f"; run `instructflow stage {text}` first" if text in STAGE_MODELS else ""
        raise InstructflowError(f"{folder}: no model there (no config.json){hint}; expected a stage "
                                f"({', '.join(STAGE_MODELS)}), a model folder or a registry URI such as "
                                f"{REGISTRY_SCHEME}instructflow-policy@champion")
    shown = f"artifacts/{text}" if text in STAGE_MODELS else text
    return _from_folder(folder, folder, f"{shown}@{weights_sha256(folder)[:12]}")


# --------------------------------------------------------------------------------------------------
# Prompts


@dataclass(frozen=True)
class Prompt:
    """One prompt: as it was given (a string or messages), the messages the template renders, and its line."""

    given: str | list[dict[str, str]]
    messages: list[dict[str, str]]
    line: int | None = None


def single_prompt(text: str) -> Prompt:
    """A prompt given on the command line: one user turn."""
    if not text.strip():
        raise InstructflowError("--prompt is empty; expected the text of a user turn")
    return Prompt(text, [{"role": "user", "content": text}])


def read_prompts(path: Path) -> list[Prompt]:
    """The prompts of a file: .jsonl / .json rows with `prompt` or `messages`, else one prompt per non-blank line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "no such file; expected JSON lines with 'prompt' or 'messages', or text, a prompt a line")
    text = read_text(path)
    if path.suffix.lower() in (".jsonl", ".json"):
        prompts = [_json_prompt(_At(path, line), row) for line, row in iter_jsonl(path, text)]
    else:
        prompts = []
        for number, line in enumerate(text.split("\n"), 1):
            line = line.removesuffix("\r")
            if BAD_BYTE.search(line):
                raise DataError(path, "not valid UTF-8; save the file as UTF-8", line=number)
            if line.strip():
                prompts.append(Prompt(line.strip(), [{"role": "user", "content": line.strip()}], number))
    if not prompts:
        raise DataError(path, "has no prompts; expected JSON lines with 'prompt' or 'messages', or a prompt a line")
    return prompts


def _json_prompt(at: _At, row: dict) -> Prompt:
    keys = [key for key in ("prompt", "messages") if row.get(key) is not None]
    if len(keys) != 1:
        have = ", ".join(sorted(row)) or "none"
        raise at.error("prompt", ("has both 'prompt' and 'messages'; expected one" if keys else
                                  f"missing; expected 'prompt' (a string) or 'messages' (a list ending with a user "
                                  f"turn); the row's keys: {have}"))
    messages = _prompt(at, row, keys[0])  # a string is one user turn; messages must end with one
    given = row[keys[0]].strip() if isinstance(row[keys[0]], str) else messages
    return Prompt(given, messages, at.line)


# --------------------------------------------------------------------------------------------------
# Generation


def _stopper(tokenizer, stop: list[str]):
    """should_stop for `generate`: whether a row's decoded new ids contain a stop string (None without any)."""
    if not stop:
        return None
    return lambda ids: any(s in tokenizer.decode(ids, skip_special_tokens=True) for s in stop)


def finish(tokenizer, new_ids: list[int], stop: list[str]) -> tuple[str, str]:
    """(response text, finish_reason) of a row's new ids: cut right before the first stop string if any."""
    ended = bool(new_ids) and new_ids[-1] == tokenizer.eos_token_id
    text = tokenizer.decode(new_ids[:-1] if ended else new_ids, skip_special_tokens=True)
    cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
    if cuts:
        return text[: min(cuts)], "stop"
    return text, "eos" if ended else "length"


def generate_rows(loaded: Loaded, prompts: list[Prompt], params: SamplingParams, batch_size: int = 8,
                  progress: bool = True) -> Iterator[dict]:
    """Rows of `n` samples per prompt, prompt by prompt, `batch_size` samples a forward pass.

    Each sample is capped at max_new_tokens and at the positions the model has left after its prompt; a prompt
    that leaves none is an error naming it (its line in the file). The progress bar (tqdm, on stderr, off
    when `progress` is False) counts samples.
    """
    from tqdm import tqdm

    from models.generate import generate
    from models.tokenizer import encode_prompt

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    tok, model = loaded.tokenizer, loaded.model
    positions = int(model.config.max_position_embeddings)
    encoded = [encode_prompt(tok, p.messages) for p in prompts]
    for index, (prompt, ids) in enumerate(zip(prompts, encoded)):
        if len(ids) >= positions:
            where = f"line {prompt.line}" if prompt.line is not None else "the prompt"
            raise InstructflowError(f"prompt {index} ({where}) is {len(ids)} tokens; the model reads at most "
                                    f"{positions}, answer included")
    items = [(p, s) for p in range(len(prompts)) for s in range(params.n)]  # prompt-major
    sampling = params.model_dump()
    knobs = {key: sampling[key] for key in ("temperature", "top_k", "top_p", "repetition_penalty", "use_cache")}
    with tqdm(total=len(items), desc="generate", unit="sample", disable=not progress) as bar:
        for start in range(0, len(items), batch_size):
            batch = items[start:start + batch_size]
            limits = [min(params.max_new_tokens, positions - len(encoded[p])) for p, _ in batch]
            seeds = [sample_seed(params.seed, p, s) for p, s in batch]
            # one length for the batch; a row with less room is cut to its own limit after (rows are independent)
            outs = generate(model, [encoded[p] for p, _ in batch], max(limits), tok.eos_token_id, tok.pad_token_id,
                            seed=seeds, should_stop=_stopper(tok, params.stop), **knobs)
            for (p, s), new, limit, seed in zip(batch, outs, limits, seeds):
                new = new[:limit]
                response, reason = finish(tok, new, params.stop)
                yield {"prompt_index": p, "prompt": prompts[p].given, "sample": s, "response": response,
                       "finish_reason": reason, "new_tokens": len(new), "seed": seed,
                       "model_version": loaded.model_version, "sampling": sampling}
            bar.update(len(batch))


def write_rows(path: Path, rows: Iterable[dict]) -> int:
    """Rows as JSON lines at `path`, atomically (a failure part way leaves the old file, or none); the count."""
    return write_jsonl(Path(path), rows)


@dataclass
class Summary:
    rows: int
    new_tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


def counted(rows: Iterable[dict], summary: Summary) -> Iterator[dict]:
    """The rows, passed through, counted into `summary` (rows, new tokens, wall seconds from the first call)."""
    started = time.perf_counter()
    for row in rows:
        summary.rows += 1
        summary.new_tokens += row["new_tokens"]
        summary.seconds = time.perf_counter() - started
        yield row

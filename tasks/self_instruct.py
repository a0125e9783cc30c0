"""Stage `self_instruct` (optional, off by default): new instructions written by a model, Self-Instruct's filters.

The chosen model (`self_instruct.model`: a stage such as `sft`, a folder or a registry URI) continues numbered lists of
instructions in raw completion mode, without the chat template, as the paper prompted a base LM; the loop and
its filters are `instructflow/self_instruct.py`. The kept instructions go to data/self_instruct/instructions.jsonl
(instruction, source, round, max_rouge_l), the filter statistics to data/self_instruct/stats.json and to the
stage's metrics. A tiny model writes few usable instructions: the stage needs a capable base model to be useful.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from pathlib import Path

from instructflow.config import Params
from instructflow.errors import ConfigError, InstructflowError
from instructflow.io import atomic_dir, write_json_atomic, write_jsonl
from instructflow.self_instruct import STOP, bootstrap, load_seeds
from tasks.generation import finish, load_model
from tasks.runtime import run_stage
from tasks.tracking import StageRun

log = logging.getLogger("instructflow")
OUT = Path("data/self_instruct")


def project_path(root: Path, value: str) -> Path:
    path = Path(value)
    return path if path.is_absolute() else root / path


def model_completer(params: Params, root: Path) -> Callable[[list[str]], list[str]]:
    """`complete(prompts) -> texts` for `bootstrap`: the model's raw continuations, sampled as params say.

    The model is loaded as `instructflow generate` loads one (a stage, a folder or a registry URI). A row stops
    at STOP (a blank line, the reference's stop sequence) or EOS, and its text then ends with STOP; a row cut by
    the token budget does not, so its last item is dropped as truncated. Every call draws with its own seeds
    (params.seed + the prompts drawn before), so the same params give the same texts.
    """
    from models.generate import check_sampling, generate_batched

    cfg = params.self_instruct
    check_sampling(cfg.temperature, cfg.top_k, cfg.top_p)
    try:
        loaded = load_model(cfg.model, root)
    except InstructflowError as exc:
        raise ConfigError(f"self_instruct.model = {cfg.model!r}: {exc}") from None
    tok, model = loaded.tokenizer, loaded.model
    positions = int(model.config.max_position_embeddings)
    drawn = 0

    def complete(prompts: list[str]) -> list[str]:
        nonlocal drawn
        bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
        ids = [bos + tok(p, add_special_tokens=False)["input_ids"] for p in prompts]  # raw text, no chat template
        longest = max(len(i) for i in ids)
        if longest >= positions:
            raise ConfigError(f"a Self-Instruct prompt is {longest} tokens, but {loaded.model_version} reads at most "
                              f"{positions}: lower self_instruct.n_human / n_machine or use a model with more "
                              "positions")
        outs = generate_batched(model, ids, cfg.batch_size, seed=params.seed + drawn,
                                max_new_tokens=min(cfg.max_new_tokens, positions - longest),
                                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                                should_stop=lambda new: STOP in tok.decode(new, skip_special_tokens=True))
        drawn += len(prompts)
        return [completion_text(tok, out) for out in outs]

    return complete


def completion_text(tok, ids: list[int]) -> str:
    """A completion's text, cut at STOP; STOP appended when the model finished (STOP or EOS), none when cut."""
    text, reason = finish(tok, ids, [STOP])
    return text if reason == "length" else text + STOP


def _write(root: Path, rows: list[dict], stats: dict) -> None:
    with atomic_dir(root / OUT) as out:
        write_jsonl(out / "instructions.jsonl", rows)
        write_json_atomic(out / "stats.json", stats)


def body(params: Params, root: Path, run: StageRun,
         complete: Callable[[list[str]], list[str]] | None = None) -> dict:
    """`complete` stands in for the model (tests); None: the model `self_instruct.model` names."""
    cfg = params.self_instruct
    if not cfg.enabled:
        _write(root, [], {"enabled": 0, "reason": "self_instruct.enabled is false in params.yaml"})
        log.info("stage self_instruct: self_instruct.enabled is false; wrote an empty data set")
        return {"enabled": 0}
    seed_path = project_path(root, cfg.seed_path)
    seeds = load_seeds(seed_path)
    if len(seeds) < cfg.n_human + cfg.n_machine:
        raise ConfigError(f"self_instruct.n_human + n_machine = {cfg.n_human + cfg.n_machine} instructions per "
                          f"prompt, but {seed_path} has {len(seeds)} seed tasks")
    result = bootstrap(seeds, complete or model_completer(params, root), cfg.n_instructions,
                       prompts_per_round=cfg.prompts_per_round, max_rounds=cfg.max_rounds,
                       rng=random.Random(params.seed), n_human=cfg.n_human, n_machine=cfg.n_machine,
                       threshold=cfg.rouge_threshold, keep_korean=cfg.keep_korean)
    metrics = {"enabled": 1, **result.metrics()}
    _write(root, result.kept, {**metrics, "seeds": len(seeds)})
    run.log_json(metrics, "self_instruct_stats.json")
    log.info("self_instruct: kept %d of %d candidates in %d rounds (%s)", len(result.kept), result.generated,
             result.rounds, ", ".join(f"{k} {v}" for k, v in result.dropped.items() if v))
    if len(result.kept) < cfg.n_instructions:
        log.warning("self_instruct: %d of the %d instructions asked for after %d rounds; the model writes few usable "
                    "ones (a capable base model is needed) or max_rounds is too low", len(result.kept),
                    cfg.n_instructions, result.rounds)
    return metrics


def main() -> None:
    run_stage("self_instruct", body)


if __name__ == "__main__":
    main()

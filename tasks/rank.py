"""Stage `rank` (the feedback loop, loop.enabled): each prompt's K responses from `generate`, ordered best first.

rank.method:
- verifier: the synthetic tasks' exact answers (instructflow.synthetic.exact_match): right before wrong, then the
  shorter response first; responses alike on both stay tied;
- reward_model: the scores of rank.reward_model (`reward`: this pipeline's reward stage; a folder; or a registry
  URI, resolved here and named in every row), highest first;
- human: the labels file `instructflow label --export` wrote for this very generation (its hash is checked). Where
  several people ranked a prompt, the responses are ordered by their mean position (a tie spans the positions it
  covers), equal means tied; a prompt nobody ranked is left out (counted).

A response that appears more than once in a prompt's K (a confident model samples the same answer) is kept once:
two equal texts cannot be ordered. A prompt left with fewer than two distinct responses, or with all of them tied,
has no pair to learn from and is left out (counted).

Rows in data/ranked/ranked.jsonl, one per prompt: {prompt, responses (distinct, best first), tiers (indices into
responses, best first: [[0], [1, 2], [3]] ties 1 and 2), ranked_by, prompt_index, round, generation (the sha256 of
the samples file), and task/answer where generate had them}. The `rounds` flow adds each round's file to
loop.feedback_dir, where the reward stage reads it.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from instructflow.config import Params
from instructflow.errors import ConfigError, InstructflowError
from instructflow.io import read_jsonl, write_jsonl
from instructflow.synthetic import exact_match
from tasks.runtime import run_stage, stage_output
from tasks.tracking import StageRun

log = logging.getLogger("instructflow")
RANKED_FILE = "ranked.jsonl"
Tiers = list[list[int]]


def tiers_by_key(keys: Sequence) -> Tiers:
    """Indices grouped into tiers by ascending key (the best first); equal keys share a tier."""
    order = sorted(range(len(keys)), key=lambda i: (keys[i], i))
    tiers: Tiers = []
    for i in order:
        if tiers and keys[tiers[-1][0]] == keys[i]:
            tiers[-1].append(i)
        else:
            tiers.append([i])
    return tiers


def verifier_tiers(responses: Sequence[str], answer: str) -> Tiers:
    """Right answers first, then wrong ones; within each, the shorter response first (ties broken by length)."""
    return tiers_by_key([(not exact_match(r, answer), len(r)) for r in responses])


def score_tiers(scores: Sequence[float]) -> Tiers:
    """Highest score first; equal scores tied."""
    return tiers_by_key([-s for s in scores])


def mean_positions(rankings: Sequence[Sequence[Sequence[int]]], k: int) -> list[float]:
    """Each response's mean position (0 = best) over several rankings in tiers; a tier spanning positions p..q
    gives each of its members (p + q) / 2."""
    totals = [0.0] * k
    for tiers in rankings:
        start = 0
        for tier in tiers:
            for i in tier:
                totals[i] += start + (len(tier) - 1) / 2
            start += len(tier)
    return [t / len(rankings) for t in totals]


def distinct(responses: Sequence[str]) -> tuple[list[str], list[int]]:
    """The distinct responses in first-seen order, and for each original response the index of its text."""
    texts: list[str] = []
    where: list[int] = []
    for r in responses:
        if r not in texts:
            texts.append(r)
        where.append(texts.index(r))
    return texts, where


def ranked_row(prompt, responses: Sequence[str], tiers: Tiers, **extra) -> dict | None:
    """The output row of one prompt from tiers over its K responses: duplicates merged (a text keeps the best tier
    any copy had), responses reordered best first; None when no pair is left to learn from."""
    texts, where = distinct(responses)
    best: dict[int, int] = {}
    for rank, tier in enumerate(tiers):
        for i in tier:
            best[where[i]] = min(best.get(where[i], rank), rank)
    levels = sorted(set(best.values()))
    if len(texts) < 2 or len(levels) < 2:
        return None
    order = sorted(range(len(texts)), key=lambda t: (best[t], t))
    new_tiers, position = [], {t: n for n, t in enumerate(order)}
    for level in levels:
        new_tiers.append([position[t] for t in order if best[t] == level])
    return {"prompt": prompt, "responses": [texts[t] for t in order], "tiers": new_tiers, **extra}


def pair_count(tiers: Tiers) -> int:
    """(better, worse) pairs a ranking in tiers makes: every two responses in different tiers."""
    n = sum(len(t) for t in tiers)
    return (n * (n - 1) - sum(len(t) * (len(t) - 1) for t in tiers)) // 2


# ------------------------------------------------------------------------------------------ the rankers
def _reward_model_ranker(params: Params, root: Path) -> tuple[Callable, str]:
    """A function (prompts, responses) -> scores with rank.reward_model, and its name for the rows."""
    from transformers import AutoModelForSequenceClassification

    from models.decoder import Judge
    from models.tokenizer import load_tokenizer
    from models.training import for_inference
    from tasks.registry import weights_sha256

    ref = params.rank.reward_model
    if ref.startswith("models:/"):
        import tempfile

        import mlflow

        from tasks.generation import resolve_registry_uri

        name, version = resolve_registry_uri(ref)
        tmp = Path(tempfile.mkdtemp(prefix="rank-"))
        local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version}", dst_path=str(tmp)))
        folder, tok_folder, shown = local / "model", local / "components" / "tokenizer", f"models:/{name}/{version}"
        if not (folder / "config.json").is_file():
            folder = tok_folder = local
    else:
        folder = root / "artifacts" / "reward" if ref == "reward" else Path(ref)
        if not folder.is_absolute() and not folder.exists():
            folder = root / folder
        if not (folder / "config.json").is_file():
            raise ConfigError(f"rank.reward_model = {ref}: no model in {folder} (no config.json); expected `reward`, a "
                              "folder with a sequence-classification model, or models:/<name>@<alias>")
        tok_folder = folder
        shown = f"{'artifacts/reward' if ref == 'reward' else ref}@{weights_sha256(folder)[:12]}"
    tok = load_tokenizer(tok_folder)
    model = for_inference(AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1,
                                                                             pad_token_id=tok.pad_token_id))
    return Judge(model, tok, params.reward.max_length, params.rank.batch_size), f"reward_model:{shown}"


def _messages(prompt) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def body(params: Params, root: Path, run: StageRun) -> dict:
    from instructflow.feedback import read_generation

    cfg = params.rank
    samples = root / "data" / "generated" / "samples.jsonl"
    generation = read_generation(samples)
    raw = {row["prompt_index"]: row for row in read_jsonl(samples)}  # task/answer/round that generate added
    counts: Counter = Counter()
    rows: list[dict] = []

    def emit(group, tiers: Tiers, ranked_by: str, **more) -> None:
        first = raw[group.prompt_index]
        extra = {k: first[k] for k in ("task", "answer") if first.get(k) is not None}
        row = ranked_row(group.prompt, group.responses, tiers, ranked_by=ranked_by, prompt_index=group.prompt_index,
                         round=first.get("round", params.loop.round), generation=generation.hash, **extra, **more)
        if row is None:
            counts["no_pair"] += 1
        else:
            rows.append(row)

    if cfg.method == "verifier":
        for group in generation.groups:
            answer = raw[group.prompt_index].get("answer")
            if answer is None:
                raise InstructflowError(f"{samples}: prompt_index {group.prompt_index} has no 'answer'; rank.method "
                                        "verifier needs generate.prompts: synthetic")
            tiers = verifier_tiers(group.responses, answer)
            counts["top_correct"] += exact_match(group.responses[tiers[0][0]], answer)
            emit(group, tiers, "verifier")
    elif cfg.method == "reward_model":
        judge, name = _reward_model_ranker(params, root)
        for group in generation.groups:
            scores = judge([_messages(group.prompt)] * len(group.responses), list(group.responses))
            emit(group, score_tiers(scores), name, scores=[round(s, 4) for s in scores])
    else:
        from instructflow.feedback import read_labels

        path = Path(cfg.labels) if Path(cfg.labels).is_absolute() else root / cfg.labels
        if not path.is_file():
            raise InstructflowError(f"rank.labels = {cfg.labels}: not found; write it with `instructflow label "
                                    f"{samples.relative_to(root)} --export {cfg.labels}`")
        labels = read_labels(path, generation)
        for group in generation.groups:
            given = labels.get(group.prompt_index, [])
            if not given:
                counts["unlabelled"] += 1
                continue
            k = len(group.responses)
            tiers = tiers_by_key(mean_positions([label.ranking for label in given], k))
            flagged = sorted({i for label in given for i in label.unacceptable})
            emit(group, tiers, f"human:{','.join(sorted({label.annotator for label in given}))}",
                 annotators=len(given), unacceptable=[group.responses[i] for i in flagged])
    if not rows:
        raise InstructflowError(f"rank ({cfg.method}): no prompt of {samples} has two responses to order "
                                f"({dict(counts)}); sample at a higher generate.temperature or more generate.samples")
    with stage_output(root, "rank", run) as out:
        write_jsonl(out / RANKED_FILE, rows)
    pairs = sum(pair_count(r["tiers"]) for r in rows)
    log.info("rank (%s): %d of %d prompts ranked, %d pairs; left out: %s", cfg.method, len(rows),
             len(generation.groups), pairs, dict(counts))
    metrics = {"groups": len(rows), "pairs": pairs, "prompts": len(generation.groups),
               "left_out_no_pair": counts["no_pair"], "left_out_unlabelled": counts["unlabelled"],
               "mean_responses": sum(len(r["responses"]) for r in rows) / len(rows)}
    if cfg.method == "verifier":
        metrics["top_correct"] = counts["top_correct"] / len(generation.groups)  # best-of-K accuracy
    return metrics


def main() -> None:
    run_stage("rank", body)


if __name__ == "__main__":
    main()

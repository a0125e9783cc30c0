"""`instructflow rounds`: InstructGPT's data loop, R rounds of generate -> rank -> reward -> align, as a Prefect flow.

A round r is one flow run (`feedback_round`) on the pipeline's machinery (flows/stage_task.py), with the loop on
(`loop.enabled=true`, `loop.round=r` written into params.yaml, as `run --set` does):

1. the stages up to `align` (DVC skips what is up to date: the first round trains what was never trained), then
   `generate` (K samples per prompt of the round from the policy) and `rank` (rank.method);
2. with `rank.method: human`, before `rank`: the flow starts `instructflow label` on the samples and pauses
   (Prefect's pause_flow_run) with the page's address in its log; the page exports the labels file and resumes the
   flow run once every prompt has its rankings (or a person resumes it in the Prefect UI);
3. the round's rankings join the feedback: data/ranked/ranked.jsonl is copied to loop.feedback_dir/round_<r>.jsonl
   and the folder is tracked with `dvc add` (feedback_dir.dvc: one version per round, in DVC's cache);
4. `reward` and `align` (they now read the feedback: every earlier round and this one; dpo and kto train on it,
   ppo/grpo/rloo through the reward model), `evaluate` and `register`
   rerun; each stage's MLflow run is tagged `instructflow.round`, each registered version `loop.round`.

Rounds continue the project's numbering: a second `instructflow rounds` starts after the last round in the
feedback folder. After the last round, params.yaml keeps the loop on and the last round's number, so dvc.lock,
params.yaml and the workspace agree: `dvc status` shows only `generate` out of date, as the last round retrained
the policy it sampled from (its samples are the next round's).

The round-by-round table (reward-model accuracy on the fixed held-out pairs, win-rate and KL against SFT, exact
match, with the verifier's best-of-K and the feedback size) goes to rounds/rounds.md and rounds/rounds.json, and
to an MLflow run `rounds` whose metrics are logged per round (step = round), with each round's pipeline run
nested under it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path

import mlflow
from prefect import flow, get_run_logger

from flows.stage_task import StageFailed, pipeline_run, run_stage
from instructflow.config import load_params
from instructflow.errors import InstructflowError
from instructflow.io import atomic_file, read_jsonl
from instructflow.stages import sync_dvc_yaml
from tasks import zygote
from tasks.tracking import experiment_id, owner_tags

OUT_DIR = "rounds"
BEFORE = ("prepare", "tokenizer", "pretrain", "sft", "reward", "align", "generate")  # a round's first half
AFTER = ("reward", "align", "evaluate", "register")  # once the round's rankings are in the feedback
ROUND_FILE = re.compile(r"round_(\d+)\.jsonl$")
PAGE_START_TIMEOUT_S = 120  # the labelling page must print its address within this


def done_rounds(root: Path, feedback_dir: str) -> list[int]:
    """The rounds whose rankings the project's feedback folder holds, in order."""
    folder = root / feedback_dir
    found = [int(m.group(1)) for p in folder.glob("round_*.jsonl") if (m := ROUND_FILE.search(p.name))] \
        if folder.is_dir() else []
    return sorted(found)


def ingest(root: Path, feedback_dir: str, round_: int) -> dict:
    """data/ranked/ranked.jsonl -> <feedback_dir>/round_<r>.jsonl, then `dvc add` the folder (its version in DVC)."""
    source = root / "data" / "ranked" / "ranked.jsonl"
    rows = read_jsonl(source)
    folder = root / feedback_dir
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_file(folder / f"round_{round_}.jsonl") as fh:
        fh.write(source.read_bytes())
    proc = subprocess.run([sys.executable, "-m", "dvc", "add", "-q", feedback_dir], cwd=root, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise InstructflowError(f"`dvc add {feedback_dir}` failed (exit {proc.returncode}): "
                                f"{(proc.stderr or proc.stdout).strip()[-800:]}")
    return {"groups": len(rows), "pairs": sum(_pairs(r["tiers"]) for r in rows)}


def _pairs(tiers: list[list[int]]) -> int:
    from tasks.rank import pair_count

    return pair_count(tiers)


def _metrics(root: Path, stage: str) -> dict:
    path = root / "metrics" / f"{stage}.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _registered(root: Path) -> str:
    """`name v<version> (<aliases>)` of the policy version register made or kept in this round."""
    path = root / "registry" / "register.json"
    if not path.is_file():
        return ""
    for name, model in json.loads(path.read_text()).get("models", {}).items():
        if "policy" in name and isinstance(model, dict):
            aliases = ",".join(a for a, v in (model.get("aliases") or {}).items() if v == model.get("version"))
            return f"v{model.get('version')}" + (f" ({aliases})" if aliases else "")
    return ""


def evaluate_figures(ev: dict) -> dict:
    """What evaluate measured of a round: reward accuracy on the fixed held-out pairs, win-rate and KL against SFT,
    exact match, each with its interval where it has one."""
    out = {}
    for key in ("reward_accuracy", "win_rate", "kl_to_reference", "exact_match"):
        out[key] = ev.get(key)
        out.update({f"{key}_{side}": ev[f"{key}_{side}"] for side in ("ci_low", "ci_high") if f"{key}_{side}" in ev})
    return out


def round_row(root: Path, round_: int, feedback: dict, total: dict) -> dict:
    """The figures of one round, from the stages' metrics."""
    ev, rw, rk, gen = (_metrics(root, s) for s in ("evaluate", "reward", "rank", "generate"))
    row = {"round": round_, "feedback_groups": total["groups"], "feedback_pairs": total["pairs"],
           "new_groups": feedback.get("groups", 0), "top_correct": rk.get("top_correct"),
           "distinct_share": gen.get("distinct_share"), "reward_eval_accuracy": rw.get("eval_accuracy"),
           "registered": _registered(root)}
    return {**row, **evaluate_figures(ev)}


def start_row(root: Path) -> dict | None:
    """Round 0: the policy and reward model the rounds start from, where evaluate has measured them."""
    ev = _metrics(root, "evaluate")
    if not ev or "exact_match" not in ev:
        return None
    row = {"round": 0, "feedback_groups": 0, "feedback_pairs": 0, "new_groups": 0, "top_correct": None,
           "distinct_share": None, "reward_eval_accuracy": _metrics(root, "reward").get("eval_accuracy"),
           "registered": _registered(root)}
    return {**row, **evaluate_figures(ev)}


def _cell(row: dict, key: str) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    if isinstance(value, float):
        text = f"{value:.3f}"
        if f"{key}_ci_low" in row:
            text += f" [{row[f'{key}_ci_low']:.3f}, {row[f'{key}_ci_high']:.3f}]"
        return text
    return str(value)


COLUMNS = (("round", "round"), ("feedback_groups", "feedback prompts"), ("feedback_pairs", "feedback pairs"),
           ("top_correct", "best-of-K correct"), ("reward_eval_accuracy", "reward eval acc"),
           ("reward_accuracy", "reward acc (held-out)"), ("win_rate", "win-rate vs SFT"),
           ("kl_to_reference", "KL to SFT"), ("exact_match", "exact match"), ("registered", "policy version"))


def render(rows: list[dict], method: str) -> str:
    lines = [f"# Feedback rounds (rank.method: {method})", "",
             "Round 0 is where the rounds started. Reward accuracy is on the fixed held-out pairs "
             "(data/prepared/preference_eval); win-rate and KL are the policy against its SFT start; intervals are 95% "
             "bootstrap.", "",
             "| " + " | ".join(title for _, title in COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(r, key) for key, _ in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_report(root: Path, rows: list[dict], method: str) -> Path:
    out = root / OUT_DIR
    out.mkdir(exist_ok=True)
    with atomic_file(out / "rounds.md") as fh:
        fh.write(render(rows, method).encode())
    with atomic_file(out / "rounds.json") as fh:
        fh.write(json.dumps({"method": method, "rounds": rows}, indent=2).encode())
    return out / "rounds.md"


# ------------------------------------------------------------------------------------------ people
def wait_for_people(root: Path, params, round_: int, logger) -> None:
    """rank.method human: serve the samples on the labelling page and pause the flow run until they are ranked.

    The page exports rank.labels and resumes this flow run the first time every prompt has its rankings; a person
    can also resume it from the Prefect UI (the labels file must then be there). A labels file already complete for
    this generation (the page was run by hand) skips the pause.
    """
    from prefect.context import get_run_context
    from prefect.flow_runs import pause_flow_run

    from instructflow.feedback import read_generation, read_labels

    samples = root / "data" / "generated" / "samples.jsonl"
    labels = root / params.rank.labels
    generation = read_generation(samples)

    def complete() -> bool:
        if not labels.is_file():
            return False
        try:
            got = read_labels(labels, generation)
        except InstructflowError:
            return False
        need = params.label.min_rankings
        return all(len(got.get(g.prompt_index, [])) >= need for g in generation.groups)

    if complete():
        return
    from prefect.client.orchestration import get_client
    from prefect.exceptions import NotPausedError
    from prefect.flow_runs import resume_flow_run

    from apps.label import announced_url

    flow_run_id = get_run_context().flow_run.id
    with get_client(sync_client=True) as client:  # this run's API (the temporary server's when none is set)
        api_url = str(client.api_url).rstrip("/")
    # --root: this project's params (label.port ...) whatever INSTRUCTFLOW_ROOT says; the API: this run's
    cmd = [sys.executable, "-m", "apps.cli", "label", str(samples), "--export-on-complete", str(labels),
           "--resume-flow-run", str(flow_run_id), "--root", str(root)]
    server = subprocess.Popen(cmd, cwd=root, env={**os.environ, "COLUMNS": "200", "PREFECT_API_URL": api_url},
                              start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              bufsize=1)
    announced = threading.Event()
    url: list[str] = []
    tail: deque[str] = deque(maxlen=20)  # the page's last lines, for an error
    stopping = threading.Event()
    exited: list[int] = []

    def read_page() -> None:  # the page's output goes to the flow's log; its announcement gives its URL
        for line in server.stdout:
            tail.append(line.rstrip())
            logger.info("label: %s", line.rstrip())
            if not url and (found := announced_url(line)):
                url.append(found)
                announced.set()
        announced.set()

    def watch_page() -> None:
        """Once the page has stopped (done, or died), the paused run must go on: resume it until the pause ends
        (the page's own resume may have come first, or the run may not be paused yet)."""
        code = server.wait()
        if stopping.is_set():
            return
        exited.append(code)
        while not stopping.wait(1):
            try:
                resume_flow_run(flow_run_id)
            except NotPausedError:
                continue
            except Exception as exc:  # noqa: BLE001 - the run then waits for a person or its timeout
                logger.warning("round %d: could not resume the paused run after the page stopped: %s", round_, exc)
                return

    threading.Thread(target=read_page, daemon=True).start()
    try:
        if not announced.wait(PAGE_START_TIMEOUT_S) or not url:
            raise InstructflowError(f"round {round_}: the labelling page did not start within {PAGE_START_TIMEOUT_S}"
                                    f" s (exit {server.poll()}): {' '.join(cmd)}\n" + "\n".join(tail))
        threading.Thread(target=watch_page, daemon=True).start()
        logger.info("round %d: %d prompts wait for people: rank them at %s (the flow resumes once they are done)",
                    round_, len(generation.groups), url[0])
        pause_flow_run(timeout=params.loop.human_timeout_s, poll_interval=2, key=f"round-{round_}-labels")
    finally:
        stopping.set()
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
    if not complete():
        if exited:
            raise InstructflowError(f"round {round_}: the labelling page stopped (exit {exited[0]}) before every "
                                    f"prompt of {samples} was ranked: {' '.join(cmd)}\n" + "\n".join(tail))
        raise InstructflowError(f"round {round_}: the flow was resumed but {labels} does not rank every prompt of "
                                f"{samples} ({params.label.min_rankings} ranking(s) each)")


# ------------------------------------------------------------------------------------------ the flow
@flow(name="instructflow-round", log_prints=True)
def feedback_round(round_: int, overrides: list[str], preset: str | None = None, root: str | None = None) -> dict:
    """One round: the stages up to generate, (people), rank, the rankings into the feedback, reward..register."""
    logger = get_run_logger()
    results: list[dict] = []
    with pipeline_run(preset, [*overrides, "loop.enabled=true", f"loop.round={round_}"], root) as ctx:
        mlflow.set_tag("instructflow.round", str(round_))

        def stages(names) -> None:
            for name in names:
                result = run_stage.with_options(name=name, task_run_name=f"{name}-r{round_}").submit(name, ctx).result()
                results.append(result)
                mlflow.set_tag(f"stage.{name}", result["status"])

        stages(BEFORE)
        if ctx.params.rank.method == "human":
            wait_for_people(ctx.root, ctx.params, round_, logger)
        stages(("rank",))
        feedback = ingest(ctx.root, ctx.params.loop.feedback_dir, round_)
        logger.info("round %d: %d ranked prompts (%d pairs) added to %s", round_, feedback["groups"],
                    feedback["pairs"], ctx.params.loop.feedback_dir)
        if sync_dvc_yaml(ctx.root):
            logger.info("dvc.yaml: the reward stage now reads %s", ctx.params.loop.feedback_dir)
        stages(AFTER)
        return {"feedback": feedback, "stages": results, "run_id": ctx.parent_run_id}


def run_rounds(project: Path, n_rounds: int | None, preset: str | None, overrides: list[str],
               emit: Callable[[str], None]) -> tuple[list[dict], Path | None]:
    """R rounds after the project's last one; the table of the start and of every round this call ran. The caller
    holds the run lock and handles signals; a failed round ends the rounds (the table keeps the rounds done)."""
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    params = load_params(project / "params.yaml", overrides, preset)
    rounds = n_rounds or params.loop.rounds
    first = (done_rounds(project, params.loop.feedback_dir) or [0])[-1] + 1
    rows = [row] if (row := start_row(project)) is not None else []
    client = mlflow.MlflowClient()
    parent = client.create_run(experiment_id(params.experiment, project), run_name="rounds",
                               tags={"instructflow.stage": "rounds", "instructflow.preset": params.preset,
                                     **owner_tags()}).info.run_id
    for key, value in {"rounds": rounds, "first_round": first, "rank.method": params.rank.method,
                       "generate.samples": params.generate.samples, "generate.n_prompts": params.generate.n_prompts,
                       "overrides": " ".join(overrides)[:500] or "-"}.items():
        client.log_param(parent, key, value)
    total = {"groups": 0, "pairs": 0}
    for r in done_rounds(project, params.loop.feedback_dir):  # the feedback earlier calls gathered
        for row in read_jsonl(project / params.loop.feedback_dir / f"round_{r}.jsonl"):
            total = {"groups": total["groups"] + 1, "pairs": total["pairs"] + _pairs(row["tiers"])}
    status, path = "FAILED", None
    try:
        with zygote.serving(project):  # one zygote serves every round's stages
            for round_ in range(first, first + rounds):
                emit(f"round {round_} ({round_ - first + 1} of {rounds})")
                result = feedback_round.with_options(flow_run_name=f"round {round_}")(round_, overrides, preset,
                                                                                      str(project))
                client.set_tag(result["run_id"], "mlflow.parentRunId", parent)
                client.set_tag(result["run_id"], "mlflow.runName", f"round {round_}")
                total = {k: total[k] + result["feedback"][k] for k in total}
                row = round_row(project, round_, result["feedback"], total)
                rows.append(row)
                for key, value in row.items():
                    if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "round":
                        client.log_metric(parent, key, float(value), step=round_)
                path = write_report(project, rows, params.rank.method)
                emit(f"round {round_}: exact match {_cell(row, 'exact_match')}, win-rate {_cell(row, 'win_rate')}, "
                     f"reward accuracy {_cell(row, 'reward_accuracy')}")
        status = "FINISHED"
    finally:
        if rows:
            path = write_report(project, rows, params.rank.method)
            client.log_artifact(parent, str(path))
            client.log_artifact(parent, str(project / OUT_DIR / "rounds.json"))
        client.set_terminated(parent, status)
    return rows, path


__all__ = ["StageFailed", "feedback_round", "run_rounds"]

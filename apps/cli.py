"""The `instructflow` command: run the pipeline, run one stage, show status, serve on a schedule."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, chdir, contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from flows.guard import preflight, run_lock, upstream_closure
from instructflow import env, signals
from instructflow.config import load_params
from instructflow.errors import InstructflowError
from instructflow.stages import BY_NAME, NAMES, stage as stage_named, sync_dvc_yaml
from models.stats import Gain, baseline_flags, gains_from_metrics

app = typer.Typer(help="InstructGPT-style training pipeline: Prefect runs it, DVC versions it, MLflow tracks it.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
console = Console()

# the figures the summary table shows for each stage: its key metrics (stage table) and its throughput
KEY_METRICS = {name: (*s.key_metrics, *(("tokens_per_sec",) if s.plots else ())) for name, s in BY_NAME.items()}

Root = Annotated[Optional[Path], typer.Option(help="project folder (default: the one holding dvc.yaml)")]


def _root(root: Path | None) -> Path:
    """The project folder; its embedded services (MLflow store, Prefect home) become this process's."""
    return env.setup(root.resolve() if root else None)


def prepare_base_model(project: Path, params) -> None:
    """`pretrain.base_model` before DVC runs: a folder checked, a registry URI resolved (tasks/base_model.py)."""
    if params.pretrain.base_model is not None:  # MLflow is imported only for a project that names a base
        from tasks.base_model import prepare_base_model as prepare

        prepare(project, params)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


def _fail(exc: Exception) -> None:
    console.print(f"[bold red]error:[/] {exc}")
    raise typer.Exit(2)


def _stopped(signum: int) -> None:
    console.print(f"[bold red]stopped by {signals.name(signum)}:[/] every stage process has stopped (a training "
                  "stage saved a checkpoint it resumes from), its MLflow run is KILLED, dvc.lock is as it was")
    raise typer.Exit(128 + signum)


@contextmanager
def _one_run(project: Path) -> Iterator[None]:
    """One run per checkout (flows/guard.py): a second is refused here, naming the first, before it writes anything."""
    with ExitStack() as held:
        try:
            held.enter_context(run_lock(project))
        except InstructflowError as exc:
            _fail(exc)
        yield


def stage_figures(root: Path, name: str) -> dict:
    """A stage's metrics (metrics/<name>.json) with the throughput of the run that made them (lineage/)."""
    figures = {}
    for path in (root / "metrics" / f"{name}.json", root / "lineage" / f"{name}.json"):
        if path.is_file():
            figures = {**json.loads(path.read_text()), **figures}
    return figures


def stage_gains(metrics_files: list[dict]) -> dict[str, list[Gain]]:
    """Every gain recorded in the stages' metrics (`gain.*` keys, models/stats.py), by the stage it judges: the
    evaluate stage's metrics judge sft, reward and align; classify's judge mlm and classify."""
    by_stage: dict[str, list[Gain]] = {}
    for metrics in metrics_files:
        for g in gains_from_metrics(metrics):
            by_stage.setdefault(g.stage, []).append(g)
    return by_stage


def baseline_cell(gains: list[Gain]) -> str:
    """The summary's `vs baseline` cell: how many of the stage's baselines it beats, red when not all."""
    if not gains:
        return ""
    beaten = sum(g.beats for g in gains)
    return (f"[green]beats {beaten}/{len(gains)}[/]" if beaten == len(gains)
            else f"[bold red]beats {beaten}/{len(gains)}[/]")


def print_baseline_flags(by_stage: dict[str, list[Gain]]) -> None:
    """Under a table: a red line per stage that does not beat one of its baselines (or that all of them do)."""
    flags = baseline_flags([g for gains in by_stage.values() for g in gains])
    for line in flags:
        console.print(f"[bold red]{escape(line)}[/]", highlight=False, soft_wrap=True)
    if by_stage and not flags:
        console.print(f"[green]every stage measured beats its baselines[/] ({', '.join(by_stage)})")


def registry_table(params) -> Table | None:
    from tasks import registry

    names = [params.register.policy_name, params.register.reward_name]
    if params.tracks.encoder:
        names += [params.register.encoder_name, params.register.classifier_name, params.register.embedder_name]
    rows = registry.describe(names)
    if not rows:
        return None
    table = Table(title="Model registry (MLflow)")
    for col in ("model", "version", "aliases", "gate metric"):
        table.add_column(col)
    for row in rows:
        metrics = row.get("metrics", {})
        shown = {k: v for k, v in metrics.items() if k in ("exact_match", "reward_accuracy", "macro_f1", "masked_accuracy", "spearman")}
        table.add_row(row["name"], str(row["version"]), ", ".join(row["aliases"]),
                      " ".join(f"{k}={v:.3f}" for k, v in shown.items()))
    return table


def print_summary(results: list[dict], params, root: Path, wall: float) -> None:
    table = Table(title=f"instructflow pipeline ({params.preset} preset) in {wall:.0f}s")
    for col in ("stage", "status", "wall", "key metrics", "vs baseline"):
        table.add_column(col)
    colour = {"ran": "green", "skipped": "dim", "restored": "cyan", "off": "dim"}
    by_stage = stage_gains([r["metrics"] for r in results])
    for r in results:
        figures = " ".join(f"{k}={_fmt(r['metrics'][k])}" for k in KEY_METRICS.get(r["stage"], ())
                           if k in r["metrics"])
        where = f" on {escape(r['worker'])}" if r.get("worker") else ""  # routed to a worker (flows/routing.py)
        table.add_row(r["stage"], f"[{colour.get(r['status'], 'red')}]{r['status']}[/]{where}", f"{r['wall_s']:.1f}s", figures,
                      baseline_cell(by_stage.get(r["stage"], [])))
    console.print(table)
    print_baseline_flags(by_stage)
    reg = registry_table(params)
    if reg is not None:
        console.print(reg)
    console.print("\n[bold]Look at it[/]\n"
                  f"  MLflow UI:   {ui_hint('MLFLOW_TRACKING_URI', 'make mlflow-ui    (http://127.0.0.1:5000)')}\n"
                  f"  Prefect UI:  {ui_hint('PREFECT_API_URL', 'make prefect-ui   (http://127.0.0.1:4200)')}\n"
                  "  DVC:         dvc status; dvc metrics show; dvc plots show\n"
                  f"  Report:      {root / 'reports' / 'evaluation.md'}")


def ui_hint(variable: str, local: str) -> str:
    """Where a server's UI is: the shared server the environment names (its address, no credentials), else how
    to start the local one on the project's own store."""
    from urllib.parse import urlsplit

    parts = urlsplit(os.environ.get(variable, ""))
    if parts.scheme not in ("http", "https"):
        return local
    host = parts.hostname + (f":{parts.port}" if parts.port else "")
    path = parts.path.removesuffix("/api") if variable == "PREFECT_API_URL" else parts.path
    return f"{parts.scheme}://{host}{path.rstrip('/')}  ({variable})"


def nothing_to_do(project: Path) -> bool:
    """DVC's verdict on the whole pipeline, in this process: no stage's code, data or params changed."""
    from dvc.repo import Repo

    if sync_dvc_yaml(project) or not (project / "dvc.lock").is_file():
        return False
    from dvc.lock import LockError

    try:  # in the project folder: DVC resolves the stages' paths against the cwd, not the repo it is given
        with chdir(project), Repo(str(project)) as repo:
            return not repo.status()
    except LockError:  # a plain `dvc` command is running here: let the flow's stages wait for it (their retries)
        return False


@app.command()
def run(
    preset: Annotated[Optional[str], typer.Option(help="micro | tiny | small (written to params.yaml)")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override section.key=value (repeatable)")] = None,
    root: Root = None,
) -> None:
    """Run the whole pipeline as a Prefect flow; DVC skips every stage that is up to date."""
    project = _root(root)
    with _one_run(project), signals.handling():  # SIGTERM as Ctrl-C: stop the stages, then Prefect's temporary server (atexit)
        try:
            _run(project, preset, set_)
        except KeyboardInterrupt as exc:  # signals.Interrupted, or Prefect's crash after it
            _stopped(signals.received() or getattr(exc, "signum", 2))
        except BaseException as exc:  # Prefect's TerminationSignal when SIGTERM came before our handler took over
            if signals.received() is None or isinstance(exc, (typer.Exit, SystemExit)):
                raise
            _stopped(signals.received())


def _run(project: Path, preset: str | None, set_: list[str] | None) -> None:
    # a register killed mid-transaction left its journal (tasks.register.journal_path): settle it before anything
    if (project / "checkpoints" / "register" / "transaction.json").is_file():
        from tasks.register import recover

        try:
            console.print(f"[yellow]{escape(recover(project) or '')}[/]")
        except InstructflowError as exc:  # the undo failed (tasks.registry.RollbackError): the journal stays
            _fail(exc)
    try:
        params = load_params(project / "params.yaml", set_ or [], preset)  # fail before Prefect starts
        prepare_base_model(project, params)  # a base folder checked, a registry alias resolved: DVC sees it move
    except InstructflowError as exc:
        _fail(exc)
    started = time.perf_counter()
    # overrides that params.yaml already holds change nothing (the same resolved params): still a no-op
    if params.digest() == load_params(project / "params.yaml").digest() and nothing_to_do(project):
        # every stage is up to date: say so from DVC's records, without starting Prefect's server for a no-op
        results = [{"stage": name, "status": "off" if not params.chosen(name) else "skipped", "wall_s": 0.0,
                    "metrics": stage_figures(project, name)} for name in NAMES]
        console.print("Nothing changed since the last run: DVC finds every stage up to date (no flow run started).")
        print_summary(results, params, project, time.perf_counter() - started)
        return
    try:  # every listed source and every input, before DVC removes any output
        preflight(project, params, params.stages())
    except InstructflowError as exc:
        _fail(exc)
    from flows.pipeline import pipeline
    from flows.serve import start_temporary_server

    start_temporary_server()  # in its own session: a terminal's Ctrl-C reaches us, and we stop it last

    try:
        results = pipeline(preset=preset, overrides=set_ or [], root=str(project))
    except InstructflowError as exc:
        _fail(exc)
    params = load_params(project / "params.yaml")
    print_summary(results, params, project, time.perf_counter() - started)


ROUNDS_HELP = "\n\n".join((
    "Run InstructGPT's data loop R times: generate -> rank -> reward -> align, then evaluate and register.",
    "Each round is a Prefect flow run on the pipeline's stages, with the loop on (loop.enabled, loop.round written "
    "into params.yaml): the policy writes generate.samples responses to each of the round's generate.n_prompts "
    "prompts, `rank` orders them (rank.method: verifier, reward_model or human), the rankings are added to "
    "data/feedback (tracked with `dvc add`), and the reward model, the policy, evaluate and register rerun on them. "
    "With rank.method human the round pauses with the labelling page's address in its log and resumes when every "
    "prompt is ranked.",
    "Rounds continue the project's numbering. The round-by-round table (reward accuracy on the fixed held-out "
    "pairs, win-rate and KL against SFT, exact match) goes to rounds/rounds.md and MLflow run `rounds` (metrics per "
    "round). Holds the checkout's run lock, as `run` does.",
))


@app.command(help=ROUNDS_HELP)
def rounds(
    n: Annotated[Optional[int], typer.Option("--rounds", "-r", min=1, help="rounds to run (default loop.rounds)")] = None,
    preset: Annotated[Optional[str], typer.Option(help="micro | tiny | small (written to params.yaml)")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override section.key=value (repeatable)")] = None,
    root: Root = None,
) -> None:
    """ROUNDS_HELP: R rounds of the feedback loop (flows/rounds.py)."""
    project = _root(root)
    with _one_run(project), signals.handling():
        try:
            _rounds(project, n, preset, set_ or [])
        except KeyboardInterrupt as exc:
            _stopped(signals.received() or getattr(exc, "signum", 2))


def _rounds(project: Path, n: int | None, preset: str | None, set_: list[str]) -> None:
    try:
        params = load_params(project / "params.yaml", [*set_, "loop.enabled=true"], preset)  # fail before Prefect
        preflight(project, params, [s for s in params.stages() if s not in ("rank",)])
    except InstructflowError as exc:
        _fail(exc)
    from flows.rounds import COLUMNS, _cell, run_rounds
    from flows.serve import start_temporary_server

    start_temporary_server()
    try:
        rows, path = run_rounds(project, n, preset, set_, lambda line: console.print(escape(line), highlight=False))
    except InstructflowError as exc:
        _fail(exc)
    table = Table(title=f"feedback rounds (rank.method {params.rank.method})")
    for _, title in COLUMNS:
        table.add_column(title)
    for row in rows:
        table.add_row(*(escape(_cell(row, key)) for key, _ in COLUMNS))
    console.print(table)
    console.print(f"Table: {path}; MLflow: run `rounds` (metrics per round), a nested run per round")


COMPARE_HELP = "\n\n".join((
    "Compare the values of one param side by side: each value runs the pipeline up to evaluate, never register.",
    "Every value is checked first, as `run` checks its --set: a bad value stops everything, naming the key, the "
    "value and what is allowed. Then, one value after another, it is written into params.yaml and the stages up "
    "to evaluate run as `run` runs them: DVC reruns only what the value changes, so comparing align values trains "
    "the SFT and reward models at most once. Nothing is registered.",
    "The table (reward gain over SFT, win-rate against SFT, KL to SFT, exact match, each with its interval, and "
    "the wall time of the stages that ran) goes to comparisons/compare.md and comparisons/compare.json, and to "
    "MLflow as a run named `compare` with each value's pipeline run nested under it.",
    "A value whose stage fails is a row marked failed with its error, and the other values still run (exit code "
    "1). Ctrl-C or SIGTERM stops the comparison: the value running stops at a safe point, the rest are marked not "
    "run (exit code 130 or 143). Either way params.yaml is put back byte for byte and the outputs of the stages "
    "that were up to date come back from DVC's run-cache, so `dvc status` says what it said before. Holds the "
    "checkout's run lock, as `run` does.",
))


@app.command(help=COMPARE_HELP)
def compare(
    spec: Annotated[str, typer.Argument(metavar="KEY=V1,V2,...",
                                        help="one param and its values, e.g. align.algorithm=dpo,kto or "
                                             "align.beta=0.1,0.5 (each value parsed as YAML, as --set parses it)")],
    preset: Annotated[Optional[str], typer.Option(help="micro | tiny | small, for every value")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="a fixed override section.key=value for "
                                                                    "every value (repeatable)")] = None,
    root: Root = None,
) -> None:
    """COMPARE_HELP: the values of one param side by side, up to evaluate (flows/compare.py)."""
    project = _root(root)
    with _one_run(project), signals.handling():
        try:
            _compare(project, spec, preset, set_)
        except KeyboardInterrupt as exc:  # a stop before the comparison started
            _stopped(signals.received() or getattr(exc, "signum", 2))


def _compare(project: Path, spec: str, preset: str | None, set_: list[str] | None) -> None:
    from flows.compare import OUT_DIR, STAGES, compare as run_comparison, plan, reading, table

    try:
        planned = plan(project, spec, set_, preset)  # every value checked before anything runs
    except InstructflowError as exc:
        _fail(exc)
    console.print(f"Comparing {planned.key} = {', '.join(v.label for v in planned.variants)} "
                  f"(preset {planned.variants[0].params.preset}): {' -> '.join(STAGES)} for each value, never register")
    from flows.serve import start_temporary_server

    start_temporary_server()
    restore, stopped = run_comparison(project, planned, lambda line: console.print(escape(line), highlight=False))
    header, rows = table(planned)  # a row per value in compare.md; here a column per value, to fit a terminal
    out = Table(title=f"compare {planned.key} ({planned.variants[0].params.preset} preset)")
    out.add_column(header[0])
    colour = {"ok": "green", "not run": "dim"}
    for v, row in zip(planned.variants, rows):
        out.add_column(f"[{colour.get(v.status, 'bold red')}]{escape(row[0])}[/]")
    for i, name in enumerate(header[1:], start=1):
        out.add_row(escape(name), *(escape(row[i]) for row in rows))
    console.print(out)
    console.print(escape(reading(planned)), highlight=False)
    back = ", ".join(f"{s} {st}" for s, st in restore.get("stages", {}).items() if st != "skipped")
    console.print(f"params.yaml put back as it was{f'; outputs back from the run-cache: {back}' if back else ''} "
                  f"({restore.get('seconds', 0):.1f}s)")
    if restore.get("not_back") or restore.get("problems"):
        console.print(f"[bold red]not put back:[/] {escape(', '.join(restore.get('not_back', [])))} "
                      f"{escape(' '.join(restore.get('problems', [])))}: run `instructflow stage evaluate`")
    console.print(f"Table: {project / OUT_DIR / 'compare.md'} (and compare.json); MLflow: run `compare`")
    if stopped is not None:
        console.print(f"[bold red]stopped by {signals.name(stopped)}:[/] the value running stopped at a safe point, "
                      "the others did not run")
        raise typer.Exit(128 + stopped)
    if any(v.status != "ok" for v in planned.variants):
        raise typer.Exit(1)


@app.command()
def stage(name: Annotated[str, typer.Argument(help="stage name, e.g. pretrain")], root: Root = None) -> None:
    """Run one stage through DVC (and any stage before it that is out of date)."""
    project = _root(root)
    try:
        stage_named(name)
    except InstructflowError as exc:
        _fail(exc)
    with _one_run(project):
        _stage(project, name)


def _stage(project: Path, name: str) -> None:
    try:  # params, sources and inputs of the stage and those before it, before DVC removes any output
        stage_named(name)
        params = load_params(project / "params.yaml")
        preflight(project, params, upstream_closure(name))
        prepare_base_model(project, params)
        from tasks.tracking import experiment_id

        experiment_id(params.experiment, project)  # an MLflow store shared with another clone: refused here too
        sync_dvc_yaml(project)
    except InstructflowError as exc:
        _fail(exc)
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    with signals.handling(), signals.deferred():  # DVC (own process group) gets the stop; we wait for it
        code = signals.wait(signals.spawn([sys.executable, "-m", "dvc", "repro", name], cwd=project,
                                          env={**os.environ, "PATH": path}))
    if signals.received() is not None:
        _stopped(signals.received())
    raise typer.Exit(code)


@app.command("dvc-yaml")
def dvc_yaml_command(root: Root = None) -> None:
    """Render dvc.yaml from the stage table (instructflow/stages.py) and prepare.sources in params.yaml."""
    project = _root(root)
    try:
        prepare_base_model(project, load_params(project / "params.yaml"))  # base/base_model.json, a dep it names
        changed = sync_dvc_yaml(project)
    except InstructflowError as exc:
        _fail(exc)
    console.print(f"{project / 'dvc.yaml'}: {'rewritten' if changed else 'already current'}")


@app.command()
def status(root: Root = None) -> None:
    """Which stages are up to date, their latest metrics, and the registered models with their aliases."""
    project = _root(root)
    try:
        params = load_params(project / "params.yaml")
    except InstructflowError as exc:
        _fail(exc)
    out = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=project, capture_output=True, text=True)
    if out.returncode != 0:
        _fail(InstructflowError(f"dvc status failed: {out.stderr.strip()}"))
    changed = json.loads(out.stdout or "{}")
    table = Table(title=f"instructflow status ({params.preset} preset, tracks: {', '.join(t for t, on in params.tracks if on)})")
    for col in ("stage", "state", "key metrics"):
        table.add_column(col)
    for name in NAMES:
        metrics = stage_figures(project, name)
        state = "[yellow]changed[/]" if name in changed else ("[green]up to date[/]" if metrics else "[dim]never run[/]")
        if not params.chosen(name):
            state += " [dim](track off)[/]"
        figures = " ".join(f"{k}={_fmt(metrics[k])}" for k in KEY_METRICS.get(name, ()) if k in metrics)
        table.add_row(name, state, figures)
    console.print(table)
    print_baseline_flags(stage_gains([stage_figures(project, name) for name in NAMES]))
    reg = registry_table(params)
    console.print(reg if reg is not None else "No registered models yet: run `instructflow run`.")


@app.command()
def serve(
    cron: Annotated[Optional[str], typer.Option(help="cron schedule (default: schedule.cron in params.yaml)")] = None,
    port: Annotated[int, typer.Option(help="Prefect server port")] = 4200,
    root: Root = None,
) -> None:
    """Start a local Prefect server and serve the pipeline as a scheduled deployment (Ctrl-C stops both)."""
    from flows.serve import serve_pipeline

    try:
        serve_pipeline(_root(root), cron=cron, port=port)
    except InstructflowError as exc:
        _fail(exc)


@app.command()
def pools(
    gpu: Annotated[str, typer.Option(help="the gpu pool's type: kubernetes | docker (one GPU box) | process")] = "kubernetes",
    gpu_limit: Annotated[int, typer.Option(help="stages at a time on the gpu pool (its concurrency limit)")] = 1,
) -> None:
    """Create (or update) the `cpu` and `gpu` work pools on the Prefect server PREFECT_API_URL names (flows/pools.py);
    then `prefect deploy --all` and start the workers (README, "Beyond one machine")."""
    from flows.pools import create_pools

    try:
        made = create_pools(gpu, gpu_limit)
    except InstructflowError as exc:
        _fail(exc)
    for pool in made:
        limit = pool.concurrency_limit if pool.concurrency_limit is not None else "none"
        console.print(f"work pool {pool.name}: type {pool.type}, concurrency limit {limit}")


Pooling = Annotated[str, typer.Option(help="mean (over the tokens) or cls (the [CLS] vector)")]
Source = Annotated[str, typer.Option(help="encoder: an MLflow model URI or a folder such as artifacts/similarity")]
DEFAULT_SOURCE = "models:/instructflow-embedder@champion"  # = apps.similarity.DEFAULT_SOURCE (a test checks)


@app.command()
def similarity(
    first: Annotated[str, typer.Argument(help="a sentence")],
    second: Annotated[str, typer.Argument(help="another sentence")],
    pooling: Pooling = "mean",
    source: Source = DEFAULT_SOURCE,
    root: Root = None,
) -> None:
    """Cosine similarity of two sentences' embeddings from the registered sentence embedder (encoder track)."""
    _root(root)
    from apps.similarity import sentence_similarity

    try:
        console.print(f"{sentence_similarity(first, second, source=source, pooling=pooling):.4f}")
    except InstructflowError as exc:
        _fail(exc)


@app.command()
def embed(
    input_path: Annotated[Path, typer.Argument(help=".txt (a sentence a line), .csv, .tsv or .jsonl")],
    output_path: Annotated[Path, typer.Argument(help=".jsonl ({text, embedding} a line) or .npy (N x H)")],
    text_column: Annotated[Optional[str], typer.Option(help="the text column of a CSV/TSV/JSONL file")] = None,
    pooling: Pooling = "mean",
    source: Source = DEFAULT_SOURCE,
    root: Root = None,
) -> None:
    """Write sentence embeddings for a file, from the registered sentence embedder (encoder track)."""
    _root(root)
    from apps.similarity import embed_file

    try:
        n = embed_file(input_path, output_path, source=source, pooling=pooling, text_column=text_column)
    except InstructflowError as exc:
        _fail(exc)
    console.print(f"wrote {n} embeddings to {output_path}")


@app.command()
def generate(
    model: Annotated[str, typer.Argument(help="sft | align | pretrain (artifacts/<stage>), a model folder, or "
                                              "models:/<name>@<alias> | models:/<name>/<version>")],
    prompt: Annotated[Optional[str], typer.Option(help="one prompt (a user turn)")] = None,
    prompts: Annotated[Optional[Path], typer.Option(help=".jsonl with 'prompt' or 'messages', or text, a prompt "
                                                         "a line")] = None,
    out: Annotated[Optional[Path], typer.Option(help="write the rows here as JSON lines (default: print them)")] = None,
    temperature: Annotated[float, typer.Option(help="0 = greedy")] = 0.0,
    top_k: Annotated[int, typer.Option(help="0 = off")] = 0,
    top_p: Annotated[float, typer.Option(help="in (0, 1]; 1 = off")] = 1.0,
    repetition_penalty: Annotated[float, typer.Option(help="> 0; 1 = off")] = 1.0,
    max_new_tokens: Annotated[int, typer.Option(help="per sample, within the model's positions")] = 128,
    n: Annotated[int, typer.Option(help="samples per prompt")] = 1,
    stop: Annotated[Optional[list[str]], typer.Option(help="end a sample before this text (repeatable)")] = None,
    seed: Annotated[int, typer.Option(help="the same seed and params give the same rows")] = 0,
    cache: Annotated[bool, typer.Option(help="the KV cache (--no-cache: recompute every step)")] = True,
    batch_size: Annotated[int, typer.Option(min=1, help="samples per forward pass")] = 8,
    root: Root = None,
) -> None:
    """Sample from a model: rows {prompt, sample, response, finish_reason, new_tokens, seed, model_version,
    sampling} as JSON lines, then how many rows and tokens/s (tasks/generation.py)."""
    project = _root(root)
    from tasks import generation

    summary = generation.Summary(0, 0, 0.0)
    try:
        params = generation.sampling_params(
            temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
            max_new_tokens=max_new_tokens, n=n, stop=stop or [], seed=seed, use_cache=cache)
        if (prompt is None) == (prompts is None):
            raise InstructflowError("give --prompt or --prompts, not both" if prompt is not None
                                    else "give --prompt TEXT or --prompts FILE")
        asked = [generation.single_prompt(prompt)] if prompt is not None else generation.read_prompts(prompts)
        loaded = generation.load_model(model, project)
        rows = generation.counted(generation.generate_rows(loaded, asked, params, batch_size), summary)
        if out is not None:
            generation.write_rows(out, rows)
        else:
            for row in rows:
                typer.echo(json.dumps(row, ensure_ascii=False))
    except InstructflowError as exc:
        _fail(exc)
    Console(stderr=True).print(f"{summary.rows} rows from {loaded.model_version}, {summary.new_tokens} new tokens, "
                               f"{summary.tokens_per_second:,.0f} tokens/s" + (f"; wrote {out}" if out else ""),
                               highlight=False)


LABEL_HELP = "\n\n".join((
    "Rank the K responses a model wrote to each prompt on a local web page (InstructGPT's labelling step). FILE is "
    "what `instructflow generate --n K --out FILE` writes.",
    "Each ranking is saved in SQLite the moment it is submitted (default FILE.labels.sqlite; --db), so a reload or "
    "a killed server loses nothing; people working at once are each served prompts that are not yet complete "
    "(--min-rankings) and that they have not ranked. /stats shows the agreement between people (Kendall's tau).",
    "--export OUT writes the labels file (JSON lines: generation, prompt_index, annotator, ranking, unacceptable, "
    "time) and exits. Defaults come from params.yaml's label: section. Binding anything but 127.0.0.1 needs a token "
    "(--token or INSTRUCTFLOW_LABEL_TOKEN) that every request must carry.",
))


@app.command(help=LABEL_HELP)
def label(
    file: Annotated[Path, typer.Argument(help="the JSON lines of `instructflow generate --n K` (K >= 2)")],
    export: Annotated[Optional[Path], typer.Option(help="write the labels file here and exit")] = None,
    host: Annotated[Optional[str], typer.Option(help="address to bind (default label.host: 127.0.0.1)")] = None,
    port: Annotated[Optional[int], typer.Option(help="port (default label.port; 0: any free port)")] = None,
    token: Annotated[Optional[str], typer.Option(help="every request must carry it (default: "
                                                      "$INSTRUCTFLOW_LABEL_TOKEN); needed off loopback")] = None,
    min_rankings: Annotated[Optional[int], typer.Option(help="rankings by different people per prompt "
                                                             "(default label.min_rankings)")] = None,
    ties: Annotated[Optional[bool], typer.Option("--ties/--no-ties", help="allow tied responses (default "
                                                                          "label.allow_ties)")] = None,
    db: Annotated[Optional[Path], typer.Option(help="the SQLite store (default label.db, else "
                                                    "FILE.labels.sqlite)")] = None,
    export_on_complete: Annotated[Optional[Path], typer.Option(help="once every prompt is complete: write the "
                                                                    "labels file here and stop serving")] = None,
    resume_flow_run: Annotated[Optional[str], typer.Option(help="once every prompt is complete: resume this "
                                                                "paused Prefect flow run (`instructflow rounds` "
                                                                "with rank.method human)")] = None,
    root: Root = None,
) -> None:
    """LABEL_HELP: the ranking page (apps/label.py)."""
    project = _root(root)
    from apps.label import ANNOUNCE, LabelSettings, export_labels, serve as serve_page
    from instructflow.config import LabelConfig
    from instructflow.feedback import read_generation

    try:
        config = load_params(project / "params.yaml").label if (project / "params.yaml").is_file() else LabelConfig()
        settings = LabelSettings.resolve(config, host=host, port=port, token=token, min_rankings=min_rankings,
                                         allow_ties=ties, db=db)
        generation = read_generation(file)
        store_path = settings.db_path(generation.path)
        if export is not None:
            labels = export_labels(store_path, generation, export)
            console.print(f"wrote {len(labels)} rankings of {len({x.prompt_index for x in labels})} of "
                          f"{len(generation)} prompts to {export} (generation {generation.hash[:12]})",
                          highlight=False)
            return
        console.print(f"{len(generation)} prompts from {escape(str(file))}; rankings kept in "
                      f"{escape(str(store_path))}", highlight=False, soft_wrap=True)

        def announce(url: str) -> None:
            console.print(f"{ANNOUNCE} {escape(url)}  (agreement: {escape(url.split('?')[0])}stats; Ctrl-C "
                          "stops)", highlight=False, soft_wrap=True)
            sys.stdout.flush()  # a script waiting for the URL on a pipe

        def completed() -> None:  # in the server: the export first, then the paused flow may go on
            if export_on_complete is not None:
                export_labels(store_path, generation, export_on_complete)
                console.print(f"every prompt is ranked: labels written to {escape(str(export_on_complete))}")
            if resume_flow_run is not None:
                import threading
                from uuid import UUID

                from prefect.flow_runs import resume_flow_run as resume

                # a thread of its own: Prefect's sync call must not run inside the server's event loop
                threading.Thread(target=resume, args=(UUID(resume_flow_run),), daemon=False).start()

        serve_page(generation, settings, on_complete=completed if (export_on_complete or resume_flow_run) else None,
                   announce=announce, stop_when_complete=export_on_complete is not None)
    except InstructflowError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        console.print("stopped; every submitted ranking is kept")


if __name__ == "__main__":
    app()

"""The stage table: the one list of the pipeline's stages, and the dvc.yaml made from it.

Each stage has one name used everywhere: `tasks/<name>.py` (run as `python -m tasks.<name>`, the DVC
command), its section of params.yaml, its DVC stage, its Prefect task and its MLflow run. The table says,
for each stage, its track, what it reads (data and earlier stages' outputs), what it writes, its key
metrics and whether it wants a GPU. The code it depends on is not listed by hand: `code_deps` follows the
imports of its task module through the project, so a change to any function a stage can reach makes
`dvc status` name that stage. `dvc.yaml` is rendered from this table (`instructflow dvc-yaml`); a test
checks that the committed file is current.

Adding a stage: write `tasks/<name>.py` with a `body(params, root, run)` and a `main()`, add one `Stage`
below, run `instructflow dvc-yaml`. The flow, the CLI and DVC follow from the table.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

PROJECT_PACKAGES = ("instructflow", "models", "tasks", "flows", "apps")
ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Stage:
    name: str
    reads: tuple[str, ...]
    """data files and folders it reads, earlier stages' outputs included (DVC deps besides code)"""
    outs: tuple[str, ...]
    """folders it writes, cached by DVC; they depend on the stage's inputs alone (no run ids, no timings)"""
    key_metrics: tuple[str, ...]
    """the figures the CLI's tables show (from metrics/<name>.json)"""
    track: str | None = None
    """decoder or encoder: the stage does nothing when its track is off (tracks in params.yaml)"""
    gpu: bool = False
    """wants a GPU when there is one (training and evaluation); the rest runs anywhere"""
    multi_process: bool = False
    """trains with models/training.py's loop: with several GPUs it runs as one process per GPU (tasks/launch.py)"""
    params: tuple[str, ...] = ()
    """params.yaml keys it reads besides preset, seed, its track and its own section"""
    preset_params: tuple[str, ...] = ()
    """presets.yaml sections it reads besides its own"""
    plots: tuple[str, ...] = ()
    """columns of <out>/history.csv plotted against step"""
    cache_outs: bool = True
    switch: str | None = None
    """an optional stage's on-switch, a boolean params.yaml key: off (like a track that is off) while it is false"""

    @property
    def metrics(self) -> str:
        return f"metrics/{self.name}.json"

    @property
    def output(self) -> str:
        return self.outs[0]

    @property
    def upstream(self) -> tuple[str, ...]:
        """The stages whose outputs this stage reads: the edges of the pipeline graph."""
        made_by = {out: s.name for s in STAGES for out in (*s.outs, s.metrics)}
        return tuple(dict.fromkeys(made_by[r] for r in self.reads if r in made_by))


LOSS = ("loss", "eval_loss")
STAGES: tuple[Stage, ...] = (
    Stage("prepare", reads=("data/raw",), outs=("data/prepared",),
          key_metrics=("sft_train", "preference_train", "pretrain_train")),
    Stage("tokenizer", reads=("data/prepared",), outs=("artifacts/tokenizer",), params=("pretrain.base_model",),
          key_metrics=("vocab_size", "chars_per_token_en", "chars_per_token_ko")),
    Stage("pretrain", reads=("artifacts/tokenizer", "data/prepared"), outs=("artifacts/pretrain",),
          track="decoder", gpu=True, multi_process=True, plots=LOSS, key_metrics=("eval_loss", "eval_perplexity")),
    Stage("sft", reads=("artifacts/pretrain", "data/prepared"), outs=("artifacts/sft",),
          track="decoder", gpu=True, multi_process=True, plots=LOSS, key_metrics=("eval_loss", "eval_perplexity")),
    Stage("reward", reads=("artifacts/sft", "data/prepared"), outs=("artifacts/reward",),
          track="decoder", gpu=True, multi_process=True, plots=LOSS, key_metrics=("eval_accuracy", "eval_loss")),
    Stage("align", reads=("artifacts/sft", "artifacts/reward", "data/prepared"), outs=("artifacts/align",),
          track="decoder", gpu=True, multi_process=True, plots=LOSS, key_metrics=("eval_loss", "eval_reward_accuracy")),
    Stage("evaluate", reads=("artifacts/align", "artifacts/sft", "artifacts/reward", "artifacts/pretrain",
                             "data/prepared"),
          outs=("reports",), track="decoder", gpu=True, params=("reward", "sft.multitask"), preset_params=("reward",),
          key_metrics=("exact_match", "win_rate", "reward_accuracy", "kl_to_reference")),
    Stage("generate", reads=("artifacts/sft", "artifacts/align", "data/prepared"), outs=("data/generated",),
          track="decoder", gpu=True, switch="loop.enabled", params=("loop.enabled", "loop.round"),
          key_metrics=("prompts", "samples_per_prompt", "distinct_share")),
    Stage("rank", reads=("data/generated",), outs=("data/ranked",), track="decoder", gpu=True,
          switch="loop.enabled", params=("loop.enabled", "loop.round"),
          key_metrics=("groups", "pairs", "top_correct")),
    Stage("self_instruct", reads=("artifacts/sft", "${self_instruct.seed_path}"), outs=("data/self_instruct",),
          track="decoder", gpu=True, switch="self_instruct.enabled", key_metrics=("enabled", "kept", "keep_rate")),
    Stage("mlm", reads=("artifacts/tokenizer", "data/prepared"), outs=("artifacts/mlm",),
          track="encoder", gpu=True, multi_process=True, plots=LOSS, key_metrics=("eval_loss", "eval_masked_accuracy")),
    Stage("classify", reads=("artifacts/mlm", "${classify.train_path}", "${classify.test_path}"),
          outs=("artifacts/classify",), track="encoder", gpu=True, multi_process=True, plots=LOSS,
          key_metrics=("accuracy", "macro_f1", "baseline_macro_f1")),
    Stage("similarity", reads=("artifacts/mlm", "${similarity.train_path}", "${similarity.dev_path}"),
          outs=("artifacts/similarity",), track="encoder", gpu=True, multi_process=True,
          plots=("loss", "eval_spearman"),
          key_metrics=("spearman", "mlm_spearman", "tfidf_spearman", "beats_tfidf")),
    Stage("register", reads=("artifacts/align", "artifacts/reward", "metrics/evaluate.json", "artifacts/mlm",
                             "artifacts/classify", "metrics/classify.json", "artifacts/similarity",
                             "metrics/similarity.json"),
          outs=("registry",), params=("tracks", "loop.enabled", "loop.round", "loop.feedback_dir"), cache_outs=False,
          key_metrics=()),
)
BY_NAME = {s.name: s for s in STAGES}
BASE_STAGES = ("tokenizer", "pretrain")
"""the stages that take `pretrain.base_model` instead of training (tasks/base_model.py)"""
BASE_RESOLUTION = "base/base_model.json"
"""where a registry base model's resolution (name, version, run, weights hash) is recorded: their DVC dep"""
NAMES = tuple(s.name for s in STAGES)


def stage(name: str) -> Stage:
    from instructflow.errors import InstructflowError

    if name not in BY_NAME:
        raise InstructflowError(f"unknown stage {name!r}: expected one of {', '.join(NAMES)}")
    return BY_NAME[name]


# ------------------------------------------------------------------------------------------ code deps
def module_file(module: str, root: Path = ROOT) -> Path | None:
    """The project file of a dotted module name (a package's __init__.py), or None outside the project."""
    if module.split(".")[0] not in PROJECT_PACKAGES:
        return None
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported(path: Path, root: Path) -> set[str]:
    """Dotted project modules that a file imports anywhere in it (function-level imports included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from pkg import module`
    # importing a.b.c runs a/__init__.py and a/b/__init__.py first
    with_parents = {".".join(m.split(".")[:i]) for m in found for i in range(1, m.count(".") + 2)}
    return {m for m in with_parents if module_file(m, root) is not None}


def code_deps(module: str, root: Path = ROOT) -> list[str]:
    """Every project file that `python -m <module>` can import, transitively, relative to root."""
    todo, seen = [module, *(".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1))], set()
    while todo:
        name = todo.pop()
        if name in seen or module_file(name, root) is None:
            continue
        seen.add(name)
        todo.extend(_imported(module_file(name, root), root))
    return sorted(str(module_file(m, root).relative_to(root)) for m in seen)


# ------------------------------------------------------------------------------------------ dvc.yaml
HEADER = """\
# The stage graph, rendered from the stage table in instructflow/stages.py: edit that table, then run
# `instructflow dvc-yaml` (a test fails while this file is not current). Do not edit by hand.
#
# deps: every project file the stage's command can import (followed through the imports), and the data
# it reads. params: its section of params.yaml plus its preset's sizes in instructflow/presets.yaml, so a
# change reruns only that stage and the stages after it. A stage whose track is off does nothing.
"""


def _in_presets(root: Path, section: str) -> bool:
    """Whether the presets give this section its sizes: all of them must, or none (DVC needs the key)."""
    import yaml

    from instructflow.config import PRESETS_FILE

    path = root / "instructflow" / "presets.yaml"
    presets = yaml.safe_load((path if path.is_file() else PRESETS_FILE).read_text())
    have = [name for name, sizes in presets.items() if section in (sizes or {})]
    if have and len(have) != len(presets):
        raise ValueError(f"instructflow/presets.yaml: section '{section}' is in presets {have} but not in all of "
                         f"{list(presets)}; DVC needs it in every preset")
    return bool(have)


def stage_entry(s: Stage, root: Path = ROOT, sources: list[str] | None = None, base: list[str] | None = None,
                loop: dict[str, list[str]] | None = None) -> dict:
    params: list = ["preset", "seed"]
    if s.track:
        params.append(f"tracks.{s.track}")
    params += [*s.params, s.name]
    sized = [p for p in (s.name, *s.preset_params) if _in_presets(root, p)]
    if sized:
        params.append({"instructflow/presets.yaml": [f"${{preset}}.{p}" for p in sized]})
    reads = list(s.reads) + (sources or [] if s.name == "prepare" else []) + (base or [] if s.name in BASE_STAGES else [])
    reads += (loop or {}).get(s.name, [])
    return {
        "cmd": f"python -m tasks.{s.name}",
        "deps": code_deps(f"tasks.{s.name}", root) + reads,
        "params": params,
        # uncached outputs stay in place while the stage runs (persist) and are replaced atomically: DVC's cache
        # cannot give them back after a failed run (tasks/keep.py), and such a stage is never run-cached anyway
        "outs": [out if s.cache_outs else {out: {"cache": False, "persist": True}} for out in s.outs],
        "metrics": [{s.metrics: {"cache": False, **({} if s.cache_outs else {"persist": True})}}],
    }


def dvc_yaml(root: Path = ROOT, sources: list[str] | None = None, base: list[str] | None = None,
             loop: dict[str, list[str]] | None = None) -> str:
    """dvc.yaml's text: the stages in pipeline order, then the plots read from their output folders.

    `sources` are the data files listed in `prepare.sources` (params.yaml): prepare depends on them and on
    data/raw, not on every file that happens to sit in data/user. `base` is what `base_model_deps` gives for
    `pretrain.base_model`: a dep of the stages that take the base model.
    """
    import yaml

    stages = {s.name: stage_entry(s, root, sources, base, loop) for s in STAGES}
    plots = [{f"{s.name}_loss": {"x": "step", "y": {f"{s.output}/history.csv": list(s.plots)}}}
             for s in STAGES if s.plots]
    plots.append({"evaluate_rewards": {"template": "scatter", "x": "policy_reward",
                                       "y": {"reports/rewards.csv": "sft_reward"}}})
    body = yaml.safe_dump({"stages": stages}, sort_keys=False, width=120)
    return HEADER + body + "\n" + yaml.safe_dump({"plots": plots}, sort_keys=False, width=120)


def source_paths(params) -> list[str]:
    """The files listed in prepare.sources, and the task-definition files of its `tasks` sources, as DVC deps
    (relative to the project root where they can be), so editing either reruns prepare."""
    paths = [src.path for src in params.prepare.sources]
    paths += [src.tasks for src in params.prepare.sources if isinstance(src.tasks, str)]
    if isinstance(params.prepare.tasks, str):
        paths.append(params.prepare.tasks)
    return list(dict.fromkeys(paths))


def base_model_deps(base_model: str | None) -> list[str]:
    """DVC deps for `pretrain.base_model`: the folder itself (its content hash in dvc.lock), or for a registry URI
    the file its resolution is recorded in (tasks/base_model.py writes it before DVC runs); none without one."""
    if base_model is None:
        return []
    return [BASE_RESOLUTION if base_model.startswith("models:/") else base_model]


def feedback_present(root: Path, feedback_dir: str) -> bool:
    """Whether the project holds loop feedback (the folder, or its .dvc file before `dvc pull`)."""
    return (root / feedback_dir).is_dir() or (root / f"{feedback_dir}.dvc").is_file()


def loop_deps(root: Path, params) -> dict[str, list[str]]:
    """DVC deps of the feedback loop that params and the project decide: the reward and align stages read
    loop.feedback_dir once the project holds rounds of feedback (so turning the loop on retrains nothing until a
    round adds data; reward trains on every ranked pair, dpo/kto on them too, ppo/grpo/rloo through the reward model);
    `rank` reads its labels file (method human) or its reward model when that is a folder (a registry URI is
    resolved by the stage and recorded in its rows; `reward` is this pipeline's reward stage)."""
    deps: dict[str, list[str]] = {}
    if feedback_present(root, params.loop.feedback_dir):
        deps["reward"] = [params.loop.feedback_dir]
        deps["align"] = [params.loop.feedback_dir]
    if params.loop.enabled:
        rank = params.rank
        if rank.method == "human":
            deps["rank"] = [rank.labels]
        elif rank.method == "reward_model":
            model = rank.reward_model
            deps["rank"] = ["artifacts/reward"] if model == "reward" else [] if model.startswith("models:/") else [model]
    return deps


def sync_dvc_yaml(root: Path) -> bool:
    """Render dvc.yaml for this project's stage table and params (prepare.sources); True if it changed."""
    from instructflow.config import load_params
    from instructflow.io import atomic_file

    params = load_params(root / "params.yaml")
    text = dvc_yaml(root, source_paths(params), base_model_deps(params.pretrain.base_model), loop_deps(root, params))
    path = root / "dvc.yaml"
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return False
    with atomic_file(path) as fh:
        fh.write(text.encode("utf-8"))
    return True

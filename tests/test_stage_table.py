"""The stage table is the one list of stages: dvc.yaml, the flow and the CLI agree with it, and every
stage's DVC deps cover the project code it can import, so a code change makes DVC rerun the stage."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from instructflow.stages import NAMES, STAGES, ROOT, code_deps, dvc_yaml

DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def test_committed_dvc_yaml_is_rendered_from_the_stage_table():
    # when this fails: run `instructflow dvc-yaml` and commit dvc.yaml
    assert (ROOT / "dvc.yaml").read_text() == dvc_yaml(ROOT, [])


def test_dvc_yaml_has_the_stages_of_the_table_in_order():
    assert list(DVC) == list(NAMES)
    for s in STAGES:
        assert DVC[s.name]["cmd"] == f"python -m tasks.{s.name}"
        assert s.outs[0] in [o if isinstance(o, str) else next(iter(o)) for o in DVC[s.name]["outs"]]


# Imports each stage module in a child forked from an interpreter that has imported only third-party libraries (the
# slow part: torch, transformers, MLflow), and prints the project modules each child then held, as JSON by stage. A
# project module the parent had imported would show in every child: asserted absent, so a child's list is exactly
# what its stage module loads, as a fresh interpreter would (one interpreter per stage took ~6 s each).
IMPORT_PROBE = """
import importlib, json, os, sys
root = sys.argv[1]
def project_modules():
    return sorted(m.__file__[len(root) + 1:] for m in list(sys.modules.values())
                  if getattr(m, '__file__', None) and m.__file__.startswith(root + '/') and '.venv' not in m.__file__)
for lib in ("numpy", "scipy", "sklearn", "torch", "transformers", "accelerate", "tokenizers", "safetensors", "mlflow",
            "pydantic", "yaml", "jinja2"):
    importlib.import_module(lib)
preloaded = project_modules()
found = {}
for name in sys.argv[2:]:
    read, write = os.pipe()
    if (pid := os.fork()) == 0:
        os.close(read)
        importlib.import_module("tasks." + name)
        os.write(write, json.dumps(project_modules()).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as fh:
        found[name] = json.loads(fh.read() or b"null")
    os.waitpid(pid, 0)
print(json.dumps({"preloaded": preloaded, "stages": found}))
"""


@pytest.fixture(scope="module")
def stage_imports() -> dict:
    out = subprocess.run([sys.executable, "-c", IMPORT_PROBE, str(ROOT), *NAMES], cwd=ROOT, capture_output=True,
                         text=True, check=True)
    probed = json.loads(out.stdout.strip().splitlines()[-1])
    assert probed["preloaded"] == [], "the probe's third-party imports loaded project modules: it would over-report"
    return probed["stages"]


@pytest.mark.parametrize("name", NAMES)
def test_every_module_a_stage_imports_at_run_time_is_among_its_deps(name, stage_imports):
    """What the stage module loads from the project (IMPORT_PROBE) against the deps dvc.yaml lists for it."""
    loaded = set(stage_imports[name] or ())
    deps = set(DVC[name]["deps"])
    assert loaded, "the probe found no project module: it checks nothing"
    assert loaded <= deps, f"stage {name} imports {sorted(loaded - deps)} but dvc.yaml does not list them"


def test_code_deps_follow_function_level_and_package_imports(tmp_path):
    # given a tiny project where a stage imports a helper inside a function, and the helper imports a core module
    for rel, text in {
        "tasks/__init__.py": "",
        "tasks/demo.py": "def main():\n    from tasks import helper\n",
        "tasks/helper.py": "from instructflow.core_bit import x\n",
        "tasks/unused.py": "",
        "instructflow/__init__.py": "",
        "instructflow/core_bit.py": "x = 1\n",
    }.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    assert code_deps("tasks.demo", tmp_path) == ["instructflow/__init__.py", "instructflow/core_bit.py",
                                                 "tasks/__init__.py", "tasks/demo.py", "tasks/helper.py"]


def test_the_flow_states_the_graph_of_the_stage_table():
    """flows/pipeline.py names each stage with the stages it waits for; they must be the ones it reads from."""
    tree = ast.parse((ROOT / "flows" / "pipeline.py").read_text())
    waits: dict[str, set[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and \
                getattr(node.value.func, "id", None) == "stage":
            name = node.value.args[0].value
            assert node.targets[0].id == name, "each stage's future is named after the stage"
            waits[name] = {arg.id for arg in node.value.args[1:]}
    assert list(waits) == list(NAMES)
    for s in STAGES:
        # a stage waits for each stage it reads from, or for one that already waits for it
        def reached(start: str) -> set[str]:
            seen, todo = set(), list(waits[start])
            while todo:
                n = todo.pop()
                if n not in seen:
                    seen.add(n)
                    todo.extend(waits[n])
            return seen
        assert set(s.upstream) <= reached(s.name), s.name
        assert waits[s.name] <= set(s.upstream), f"{s.name} waits for a stage it does not read from"


def test_prepare_depends_on_the_listed_sources_not_on_the_user_folder():
    entry = yaml.safe_load(dvc_yaml(ROOT, ["data/user/chats.jsonl"]))["stages"]["prepare"]
    assert "data/user/chats.jsonl" in entry["deps"] and "data/raw" in entry["deps"]
    assert "data/user" not in entry["deps"]


def test_task_definition_files_are_deps_of_prepare():
    from instructflow.config import Params
    from instructflow.stages import source_paths

    params = Params.model_validate({"prepare": {
        "tasks": "data/user/tasks.yaml",
        "sources": [{"path": "data/user/records.jsonl", "role": "tasks"},
                    {"path": "data/user/other.csv", "role": "tasks", "tasks": "data/user/other_tasks.yaml"}]}})
    assert source_paths(params) == ["data/user/records.jsonl", "data/user/other.csv", "data/user/tasks.yaml",
                                    "data/user/other_tasks.yaml"]


def test_core_and_models_import_no_upper_layer():
    """Layers: the core imports nothing of the project above it; models/ only the core."""
    allowed = {"instructflow": {"instructflow"}, "models": {"instructflow", "models"}}
    for package, ok in allowed.items():
        for path in (ROOT / package).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else []
                for name in names:
                    top = name.split(".")[0]
                    if top in {"instructflow", "models", "tasks", "flows", "apps"}:
                        assert top in ok, f"{path.relative_to(ROOT)} imports {name}"
                    if package == "models":
                        assert top not in {"mlflow", "prefect"}, f"{path.relative_to(ROOT)} imports {name}"


def test_importing_the_core_changes_no_environment_variable():
    probe = "import os, json; before = dict(os.environ); import instructflow, instructflow.config, " \
            "instructflow.stages, instructflow.env; print(json.dumps(dict(os.environ) == before))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "true"


def test_the_makefile_sets_up_the_environment_the_readme_promises():
    clean = {"PATH": "/usr/bin:/bin", "HOME": str(Path.home())}  # nothing inherited from this test process
    out = subprocess.run(["make", "-s", "env"], cwd=ROOT, capture_output=True, text=True, check=True, env=clean)
    seen = json.loads(out.stdout)
    for key, value in {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
                       "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DVC_NO_ANALYTICS": "1", "DO_NOT_TRACK": "1",
                       "PREFECT_HOME": str(ROOT / ".prefect")}.items():
        assert seen[key] == value, key
    assert Path(seen["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///")) == ROOT / "mlflow.db"

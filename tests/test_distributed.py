"""Several processes in one stage (tasks/launch.py, models/training.py): batches sharded with no row lost or
repeated, and a real two-process run (CPU, gloo, under `accelerate launch`) that trains as one process does
and leaves one set of outputs and one MLflow run."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import copy_project
from helpers_tokenizer import CORPUS, make_test_tokenizer

from instructflow.config import load_params
from instructflow.errors import ConfigError
from models.training import _share_weight, epoch_batches, planned_batches, shard
from tasks import launch

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------- sharding
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_the_shares_of_a_batch_cover_it_once_and_the_first_processes_take_the_remainder(world):
    for n in range(world, 13):
        batch = list(range(100, 100 + n))
        shares = [shard(batch, rank, world) for rank in range(world)]
        assert [i for share in shares for i in share] == batch  # every row once, in order: none lost or repeated
        sizes = [len(share) for share in shares]
        assert sizes == [n // world + (rank < n % world) for rank in range(world)]  # e.g. 7 over 2: 4 and 3


def test_a_batch_smaller_than_the_processes_is_refused():
    with pytest.raises(ValueError, match="a batch of 2 rows cannot be shared by 3 processes"):
        shard([0, 1], 0, 3)


@pytest.mark.parametrize("world", [2, 3])
def test_the_processes_together_train_the_one_process_epoch(world):
    # given 23 rows in global batches of 5 (the last 3 rows dropped, as one process drops them), length-grouped
    lengths = [(i * 7) % 11 for i in range(23)]
    one = planned_batches(23, 5, seed=3, epoch=1, lengths=lengths)
    per_process = [epoch_batches(23, 5, seed=3, epoch=1, lengths=lengths,
                                 accel=SimpleNamespace(process_index=rank, num_processes=world))
                   for rank in range(world)]
    # then step k of every process is its share of the one-process batch k
    for k, batch in enumerate(one):
        assert sorted(i for rows in per_process for i in rows[k]) == sorted(batch)
    trained = [i for rows in per_process for batch in rows for i in batch]
    assert len(trained) == len(set(trained)) == 20  # no row twice in the epoch; the remainder (3) waits


def test_weighted_shares_average_to_the_whole_batch_gradient_even_when_uneven():
    # loss = mean over rows of (w x - y)^2; a batch of 5 rows split 3 + 2, as DDP averages the two gradients
    w = torch.tensor(0.5, requires_grad=True)
    x, y = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]), torch.tensor([1.0, 0.0, 2.0, 1.0, 3.0])

    def grad(rows, weight=1.0):
        (g,) = torch.autograd.grad(weight * ((w * x[rows] - y[rows]) ** 2).mean(), w)
        return float(g)

    # residuals w x - y = (-0.5, 1, -0.5, 1, -0.5); d/dw = mean(2 (w x - y) x)
    whole = grad([0, 1, 2, 3, 4])
    assert whole == pytest.approx(2 * (-0.5 + 2 - 1.5 + 4 - 2.5) / 5)  # 0.6
    assert (grad([0, 1, 2]), grad([3, 4])) == pytest.approx((0.0, 1.5))  # each share's own mean
    weighted = (grad([0, 1, 2], _share_weight(3, 5, 2)) + grad([3, 4], _share_weight(2, 5, 2))) / 2
    assert weighted == pytest.approx(whole)  # (0 * 6/5 + 1.5 * 4/5) / 2
    unweighted = (grad([0, 1, 2]) + grad([3, 4])) / 2  # plain DDP: 2 rows would count as much as 3
    assert unweighted == pytest.approx(0.75)


# ------------------------------------------------------------------------------------------- the launcher
def params_with(tmp_path, text: str = ""):
    path = tmp_path / "params.yaml"
    path.write_text("preset: micro\n" + text)
    return load_params(path)


def test_the_launcher_renders_ddp_and_fsdp_as_accelerate_reads_them(tmp_path):
    from accelerate.commands.launch import launch_command_parser

    ddp = launch.launch_args("sft", 4, params_with(tmp_path))
    parsed = launch_command_parser().parse_args(ddp)
    assert (parsed.multi_gpu, parsed.use_fsdp, parsed.num_processes, parsed.module) == (True, False, 4, True)
    assert (parsed.training_script, parsed.main_process_port) == ("tasks.sft", 0)  # a free port: runs side by side

    fsdp = launch.launch_args("sft", 4, params_with(tmp_path, "distributed: {strategy: fsdp, fsdp_sharding: "
                                                              "SHARD_GRAD_OP}\n"))
    parsed = launch_command_parser().parse_args(fsdp)
    assert (parsed.multi_gpu, parsed.use_fsdp, parsed.fsdp_sharding_strategy) == (False, True, "SHARD_GRAD_OP")
    assert (parsed.fsdp_state_dict_type, parsed.fsdp_auto_wrap_policy) == ("FULL_STATE_DICT", "TRANSFORMER_BASED_WRAP")


def test_the_launcher_refuses_what_cannot_run_naming_the_key(tmp_path, monkeypatch):
    params = params_with(tmp_path, "sft: {batch_size: 3}\n")
    with pytest.raises(ConfigError, match=r"sft.batch_size = 3 is the global batch, shared by the 4 processes"):
        launch.check("sft", params, 4, gpus=0)
    with pytest.raises(ConfigError, match="INSTRUCTFLOW_NPROC=2 processes, but 1 GPU"):
        launch.check("sft", params, 2, gpus=1)
    with pytest.raises(ConfigError, match="distributed.strategy = fsdp shards the model over GPUs"):
        launch.check("sft", params_with(tmp_path, "distributed: {strategy: fsdp}\n"), 2, gpus=0)
    monkeypatch.setenv(launch.NPROC_ENV, "two")
    with pytest.raises(ConfigError, match="INSTRUCTFLOW_NPROC='two': expected a whole number of processes >= 1"):
        launch.processes("sft", params)


def test_only_stages_that_train_with_the_shared_loop_are_launched(tmp_path, monkeypatch):
    monkeypatch.setenv(launch.NPROC_ENV, "2")
    params = params_with(tmp_path)
    assert launch.processes("sft", params) == 2
    assert launch.processes("evaluate", params) == 1  # no training: nothing to share
    assert launch.processes("align", params_with(tmp_path, "align: {algorithm: grpo}\n")) == 1  # one-device loop
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launch.processes("sft", params) == 1  # already one of the launched processes


# ------------------------------------------------------------------------------------------- two real processes
def run_stage(root, stage: str, **env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", "INSTRUCTFLOW_ROOT": str(root),
           "OMP_NUM_THREADS": "1", **env}
    result = subprocess.run([sys.executable, "-m", f"tasks.{stage}"], cwd=root, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def history(folder) -> list[dict]:
    with (folder / "history.csv").open() as fh:
        return list(csv.DictReader(fh))


def test_two_processes_train_the_stage_as_one_and_record_it_once(tmp_path):
    from mlflow.tracking import MlflowClient
    from safetensors.torch import load_file

    # given a micro project with pretraining text and a tokenizer (the test's: quicker than stages prepare and
    # tokenizer), pretraining on global batches of 7 packed blocks (4 + 3 per process: an uneven remainder), a
    # checkpoint every 4 steps, in fp32
    root = copy_project(tmp_path / "project", "micro")
    params = (root / "params.yaml").read_text()
    (root / "params.yaml").write_text(params.replace("pretrain:\n", "pretrain:\n  batch_size: 7\n  save_steps: 4\n"
                                                                    "  bf16: false\n", 1))
    make_test_tokenizer().save_pretrained(root / "artifacts" / "tokenizer")
    prepared = root / "data" / "prepared"
    prepared.mkdir(parents=True)
    for name, rows in (("pretrain_train", 40), ("pretrain_eval", 6)):
        texts = ["\n".join(CORPUS[(i + k) % len(CORPUS)] for k in range(6)) for i in range(rows)]
        (prepared / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out = root / "artifacts" / "pretrain"
    run_stage(root, "pretrain")
    one = shutil.copytree(out, tmp_path / "one-process")

    # when the same stage command runs as two processes
    two = run_stage(root, "pretrain", INSTRUCTFLOW_NPROC="2")

    assert "stage pretrain: 2 processes (ddp, CPU, gloo)" in two.stdout
    # then the loss curve is the one-process curve: the same rows reach the same gradient, summed in another
    # order (float32: measured differences of about 1e-8 relative in the loss, 3e-7 in the weights). 1e-5 is far
    # above that and far below what a wrong share shows: without split_batches the schedule stepped twice a step
    # and the loss of step 5 moved by 3e-4 relative; an unweighted 4 + 3 split moves the gradient by ~1/14
    curve_one, curve_two = history(one), history(out)
    assert [r["step"] for r in curve_two] == [r["step"] for r in curve_one] == ["1", "5", "10", "12"]
    for a, b in zip(curve_one, curve_two):
        assert float(b["learning_rate"]) == float(a["learning_rate"])  # one scheduler step per optimiser step
        for key in ("loss", "grad_norm", *(("eval_loss",) if a["eval_loss"] else ())):
            assert float(b[key]) == pytest.approx(float(a[key]), rel=1e-5), (a["step"], key)
    weights_one, weights_two = load_file(one / "model.safetensors"), load_file(out / "model.safetensors")
    for name, tensor in weights_one.items():
        torch.testing.assert_close(weights_two[name], tensor, rtol=0, atol=1e-5)

    # one set of outputs: the same files, nothing left of the second process or of the checkpoints
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in one.iterdir())
    assert sorted(p.name for p in (root / "artifacts").iterdir()) == ["pretrain", "tokenizer"]
    assert not (root / "checkpoints" / "pretrain").exists()

    # one MLflow run for the two-process command, each step logged once, named in the lineage
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("instructflow").experiment_id],
                              "attributes.run_name = 'pretrain'", order_by=["attributes.start_time ASC"])
    assert len(runs) == 2  # one per command
    run = runs[1]
    assert run.info.status == "FINISHED"
    assert run.data.tags["instructflow.processes"] == "2" and run.data.tags["instructflow.strategy"] == "ddp"
    assert "instructflow.processes" not in runs[0].data.tags
    logged = [[m.step for m in client.get_metric_history(r.info.run_id, "loss")] for r in runs]
    assert logged[1] == logged[0] == [1, 5, 10, 12, 0]  # each logged step once (0: the stage's final figure)
    assert json.loads((root / "lineage" / "pretrain.json").read_text())["mlflow_run_id"] == run.info.run_id
    assert json.loads((root / "metrics" / "pretrain.json").read_text())["eval_loss"] == pytest.approx(
        float(curve_one[-1]["eval_loss"]), rel=1e-5)

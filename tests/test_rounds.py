"""The feedback loop: ranking K responses (verifier, scores, people), the rank stage, the rounds flow.

The stages that need a model (generate from the SFT policy, rank by the reward model) are tested on the micro
project of tests/test_stage_bodies.py; the loop end to end (`instructflow rounds`) on a copied micro project.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import FakeRun, free_port

import tasks.rank
from instructflow.config import load_params
from instructflow.errors import ConfigError, InstructflowError
from tasks.generate import candidate_prompts, round_slice
from tasks.rank import (
    mean_positions,
    pair_count,
    ranked_row,
    score_tiers,
    tiers_by_key,
    verifier_tiers,
)

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ rankers
def test_verifier_puts_right_answers_first_then_the_shorter():
    responses = ["7", "The answer is 7", "8", "It is 12", "7"]
    # right (exact match, not containment): 0 and 4, alike in length -> tied; wrong: 2 (1 char), 3 (8), 1 (15)
    assert verifier_tiers(responses, "7") == [[0, 4], [2], [3], [1]]


def test_verifier_answer_match_is_the_synthetic_exact_match():
    # instructflow.synthetic.exact_match normalises case, spaces and a final full stop
    assert verifier_tiers(["bonjour.", "Salut"], "Bonjour")[0] == [0]


def test_scores_rank_highest_first_and_equal_scores_tie():
    assert score_tiers([0.5, 2.0, -1.0, 2.0]) == [[1, 3], [0], [2]]


def test_tiers_by_key_groups_equal_keys_in_order():
    assert tiers_by_key([3, 1, 2, 1]) == [[1, 3], [2], [0]]


def test_mean_positions_hand_worked():
    # annotator A: 0 > 1 > 2 (positions 0, 1, 2); B: 1 > {0, 2} tied (1: 0; 0 and 2 span positions 1..2 -> 1.5)
    assert mean_positions([[[0], [1], [2]], [[1], [0, 2]]], 3) == [0.75, 0.5, 1.75]


@pytest.mark.parametrize("tiers, pairs", [([[0], [1]], 1), ([[0], [1], [2], [3]], 6), ([[0], [1, 2], [3]], 5),
                                          ([[0, 1, 2]], 0), ([[i] for i in range(9)], 36)])
def test_pair_count_is_every_two_responses_in_different_tiers(tiers, pairs):
    assert pair_count(tiers) == pairs


def test_ranked_row_merges_duplicates_and_orders_best_first():
    row = ranked_row("p", ["b", "a", "b", "c"], [[1], [0, 2], [3]], ranked_by="x")
    assert row["responses"] == ["a", "b", "c"]
    assert row["tiers"] == [[0], [1], [2]]
    # a text keeps the best tier any of its copies had
    row = ranked_row("p", ["b", "a", "b"], [[2], [1], [0]], ranked_by="x")
    assert row["responses"] == ["b", "a"] and row["tiers"] == [[0], [1]]


def test_ranked_row_without_a_pair_is_none():
    assert ranked_row("p", ["a", "a", "a"], [[0], [1], [2]]) is None  # one distinct text
    assert ranked_row("p", ["a", "b"], [[0, 1]]) is None  # all tied


# ------------------------------------------------------------------------------------------ prompts of a round
def test_rounds_take_disjoint_prompts_and_say_when_they_run_out():
    candidates = list(range(10))
    first, second = round_slice(candidates, 4, 1, 7, "synthetic"), round_slice(candidates, 4, 2, 7, "synthetic")
    assert len(first) == len(second) == 4 and not set(first) & set(second)
    assert round_slice(candidates, 4, 0, 7, "synthetic") == first  # round 0 (the loop never ran) counts as 1
    assert len(round_slice(candidates, 4, 3, 7, "synthetic")) == 2
    with pytest.raises(InstructflowError, match=r"round 4 needs prompts 13..16 of generate.prompts 'synthetic', "
                                                r"which has 10"):
        round_slice(candidates, 4, 4, 7, "synthetic")


def test_candidate_prompts_keep_synthetic_answers_apart_from_real_prompts():
    q = [{"role": "user", "content": "2+2?"}]
    sft = [{"messages": [*q, {"role": "assistant", "content": "4"}], "source": "synthetic", "answer": "4",
            "task": "arithmetic"},
           {"messages": [*q, {"role": "assistant", "content": "4"}], "source": "synthetic", "answer": "4",
            "task": "arithmetic"},  # the same prompt twice: kept once
           {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
            "source": "dolly"}]
    assert candidate_prompts("synthetic", sft, []) == [{"messages": q, "task": "arithmetic", "answer": "4"}]
    assert [c["messages"][0]["content"] for c in candidate_prompts("sft", sft, [])] == ["hi"]


def test_verifier_needs_prompts_with_answers():
    with pytest.raises(ConfigError, match="rank.method verifier ranks by the synthetic tasks' exact answers, but "
                                          "generate.prompts is 'sft'"):
        load_params(ROOT / "params.yaml", ["loop.enabled=true", "generate.prompts=sft"])
    load_params(ROOT / "params.yaml", ["loop.enabled=true", "generate.prompts=sft", "rank.method=reward_model"])


# ------------------------------------------------------------------------------------------ the rank stage
def write_samples(root: Path, groups: list[tuple[str, list[str], str | None]]) -> Path:
    """A generate output: K rows per prompt, as tasks/generate.py writes them."""
    path = root / "data" / "generated" / "samples.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        for p, (prompt, responses, answer) in enumerate(groups):
            for s, response in enumerate(responses):
                row = {"prompt_index": p, "prompt": [{"role": "user", "content": prompt}], "sample": s,
                       "response": response, "finish_reason": "eos", "new_tokens": len(response), "seed": s,
                       "model_version": "artifacts/align@test", "sampling": {}, "round": 2, "source": "synthetic",
                       **({"answer": answer, "task": "arithmetic"} if answer is not None else {})}
                fh.write(json.dumps(row) + "\n")
    return path


def loop_params(*overrides: str):
    return load_params(ROOT / "params.yaml", ["loop.enabled=true", "loop.round=2", *overrides])


def test_rank_stage_verifier_writes_ranked_rows(tmp_path):
    write_samples(tmp_path, [("1+1?", ["2", "3", "two is it", "2"], "2"),  # right first, duplicates merged
                             ("2+2?", ["5", "5", "5", "5"], "4"),  # one distinct text: no pair, left out
                             ("3+3?", ["7", "6", "66", "6"], "6")])
    metrics = tasks.rank.body(loop_params(), tmp_path, FakeRun())
    rows = [json.loads(line) for line in (tmp_path / "data" / "ranked" / "ranked.jsonl").read_text().splitlines()]
    assert [r["prompt_index"] for r in rows] == [0, 2]
    assert rows[0]["responses"] == ["2", "3", "two is it"] and rows[0]["tiers"] == [[0], [1], [2]]
    assert rows[1]["responses"] == ["6", "7", "66"]
    assert rows[0]["ranked_by"] == "verifier" and rows[0]["round"] == 2 and rows[0]["answer"] == "2"
    assert len(rows[0]["generation"]) == 64
    assert metrics == {"groups": 2, "pairs": 6, "prompts": 3, "left_out_no_pair": 1, "left_out_unlabelled": 0,
                       "mean_responses": 3.0, "top_correct": pytest.approx(2 / 3)}


def test_rank_stage_verifier_refuses_prompts_without_answers(tmp_path):
    write_samples(tmp_path, [("hi", ["a", "b"], None)])
    with pytest.raises(InstructflowError, match="prompt_index 0 has no 'answer'; rank.method verifier needs "
                                                "generate.prompts: synthetic"):
        tasks.rank.body(loop_params(), tmp_path, FakeRun())
    assert not (tmp_path / "data" / "ranked").exists()


def test_rank_stage_with_nothing_to_order_writes_nothing(tmp_path):
    write_samples(tmp_path, [("2+2?", ["5", "5"], "4")])
    with pytest.raises(InstructflowError, match="no prompt of .* has two responses to order"):
        tasks.rank.body(loop_params(), tmp_path, FakeRun())
    assert not (tmp_path / "data" / "ranked").exists()


def test_rank_stage_reward_model_must_exist(tmp_path):
    write_samples(tmp_path, [("1+1?", ["2", "3"], "2")])
    with pytest.raises(ConfigError, match="rank.reward_model = /nowhere: no model in /nowhere"):
        tasks.rank.body(loop_params("rank.method=reward_model", "rank.reward_model=/nowhere"), tmp_path, FakeRun())


# ------------------------------------------------------------------------------------------ the loop, end to end
@pytest.fixture(scope="module")
def two_rounds(micro_pipeline):
    """`instructflow rounds --rounds 2` (the verifier) on the trained micro project (it runs last on it)."""
    from conftest import cli

    root = micro_pipeline
    result = cli(root, "rounds", "--rounds", "2", "--set", "generate.n_prompts=8", "--set",
                 "generate.max_new_tokens=8", timeout=1500)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    return root, result


def mlflow_client(root: Path):
    import mlflow

    return mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")


def metrics_by_round(root: Path, stage: str) -> dict[str, dict]:
    """The metrics of the stage's MLflow runs that the rounds made, by their `instructflow.round` tag."""
    client = mlflow_client(root)
    runs = client.search_runs([client.get_experiment_by_name("instructflow").experiment_id],
                              f"tags.`instructflow.stage` = '{stage}' and tags.`instructflow.round` != ''")
    return {r.data.tags["instructflow.round"]: r.data.metrics for r in runs}


@pytest.mark.e2e
def test_each_round_adds_its_rankings_to_the_feedback_tracked_by_dvc(two_rounds):
    root, _ = two_rounds
    feedback = root / "data" / "feedback"
    assert sorted(p.name for p in feedback.iterdir()) == ["round_1.jsonl", "round_2.jsonl"]
    assert (root / "data" / "feedback.dvc").is_file()
    for r in (1, 2):
        rows = [json.loads(line) for line in (feedback / f"round_{r}.jsonl").read_text().splitlines()]
        assert rows and all(row["round"] == r and row["ranked_by"] == "verifier" for row in rows)
    first = {json.dumps(json.loads(line)["prompt"]) for line in (feedback / "round_1.jsonl").read_text().splitlines()}
    second = {json.dumps(json.loads(line)["prompt"]) for line in (feedback / "round_2.jsonl").read_text().splitlines()}
    assert not first & second  # each round asks new prompts


@pytest.mark.e2e
def test_the_second_rounds_reward_model_has_seen_more_data(two_rounds):
    root, _ = two_rounds
    by_round = metrics_by_round(root, "reward")
    assert set(by_round) == {"1", "2"}
    assert by_round["1"]["feedback_rounds"] == 1 and by_round["2"]["feedback_rounds"] == 2
    assert by_round["2"]["feedback_pairs"] > by_round["1"]["feedback_pairs"] > 0
    assert by_round["2"]["train_pairs"] > by_round["1"]["train_pairs"]
    by_round = metrics_by_round(root, "align")
    assert by_round["1"]["feedback_rounds"] == 1 and by_round["2"]["feedback_rounds"] == 2  # the policy trains on it
    assert by_round["2"]["train_pairs"] > by_round["1"]["train_pairs"]


@pytest.mark.e2e
def test_the_table_compares_round_against_round(two_rounds):
    root, result = two_rounds
    data = json.loads((root / "rounds" / "rounds.json").read_text())
    assert data["method"] == "verifier" and [r["round"] for r in data["rounds"]] == [0, 1, 2]
    start, one, two = data["rounds"]
    assert start["feedback_pairs"] == 0 < one["feedback_pairs"] < two["feedback_pairs"]
    for row in (one, two):
        for key in ("reward_accuracy", "win_rate", "kl_to_reference", "exact_match"):
            assert row[key] is not None, key
        assert row["win_rate_ci_low"] <= row["win_rate"] <= row["win_rate_ci_high"]
        assert 0 <= row["top_correct"] <= 1
    assert "| 2 |" in (root / "rounds" / "rounds.md").read_text() and "feedback rounds" in result.stdout


@pytest.mark.e2e
def test_each_round_is_tagged_in_mlflow_and_in_the_registry(two_rounds):
    root, _ = two_rounds
    client = mlflow_client(root)
    exp = client.get_experiment_by_name("instructflow").experiment_id
    [parent] = client.search_runs([exp], "attributes.run_name = 'rounds'")
    assert parent.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(parent.info.run_id, "exact_match")] == [1, 2]
    children = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(r.info.run_name for r in children) == ["round 1", "round 2"]
    rounds = {v.tags.get("loop.round") for v in client.search_model_versions("name='instructflow-policy'")}
    assert {"1", "2"} <= rounds


@pytest.mark.e2e
def test_after_the_rounds_dvc_and_params_agree(two_rounds):
    import subprocess
    import sys

    from conftest import scratch_env

    root, _ = two_rounds
    params = load_params(root / "params.yaml")
    assert params.loop.enabled and params.loop.round == 2
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=root, env=scratch_env(root),
                            capture_output=True, text=True, check=True)
    # everything the rounds made is up to date; only `generate` is not: the policy it sampled from was retrained by
    # the last round, so its samples are the next round's work (rank, downstream of it, waits on them)
    assert json.loads(status.stdout or "{}") == {"generate": [{"changed deps": {"artifacts/align": "modified"}}]}


# ------------------------------------------------------------------------------------------ people, in a flow
def test_rank_method_human_pauses_the_flow_until_the_page_has_every_ranking(tmp_path, monkeypatch):
    """wait_for_people in a real Prefect flow run: the flow pauses, the page (a subprocess) takes the rankings over
    HTTP, writes the labels file and resumes the paused run, which then finds the labels complete. The page serves
    this project's label.port even when the process's INSTRUCTFLOW_ROOT names another project (as it did in CI,
    where an in-process pipeline run had set it and the page then listened where nobody posted)."""
    import threading
    import time
    import urllib.request

    import yaml
    from prefect import flow, get_run_logger
    from prefect.client.orchestration import get_client

    from flows.rounds import wait_for_people
    from instructflow.feedback import read_generation, read_labels

    monkeypatch.setenv("INSTRUCTFLOW_ROOT", str(ROOT))  # another project: its label.port is not this one's
    port = free_port()
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["label"]["port"] = port
    raw["rank"]["method"] = "human"
    raw["loop"]["human_timeout_s"] = 60  # a missed resume fails the test in a minute (the default waits a day)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    samples = write_samples(tmp_path, [("1+1?", ["2", "3", "4"], "2"), ("2+2?", ["4", "5"], "4")])
    params = load_params(tmp_path / "params.yaml", ["loop.enabled=true", "loop.round=1"])
    posted: list[int] = []

    def people() -> None:  # wait for the page, then rank both prompts as one person would
        base = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                urllib.request.urlopen(f"{base}/api/config", timeout=2).read()
                break
            except OSError:
                time.sleep(0.2)
        for index, ranking in ((0, [[1], [0], [2]]), (1, [[0], [1]])):
            body = json.dumps({"annotator": "ana", "prompt_index": index, "ranking": ranking}).encode()
            request = urllib.request.Request(f"{base}/api/rank", body, {"Content-Type": "application/json"})
            posted.append(urllib.request.urlopen(request, timeout=10).status)

    @flow(name="wait-for-people-test")
    def waiting() -> str:
        from prefect.context import get_run_context

        wait_for_people(tmp_path, params, 1, get_run_logger())
        return str(get_run_context().flow_run.id)

    threading.Thread(target=people, daemon=True).start()
    flow_run_id = waiting()
    assert posted == [200, 200]
    labels = read_labels(tmp_path / params.rank.labels, read_generation(samples))
    assert {i: [x.ranking for x in got] for i, got in labels.items()} == {0: [((1,), (0,), (2,))], 1: [((0,), (1,))]}

    async def states():
        async with get_client() as client:
            return [s.type.value for s in await client.read_flow_run_states(flow_run_id)]

    import asyncio

    history = asyncio.run(states())
    assert "PAUSED" in history and history[-1] == "COMPLETED"  # it did pause, and went on once resumed

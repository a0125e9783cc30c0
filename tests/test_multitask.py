"""Multi-task records: task definitions and rendering, the three strategies' rows and inference, the joint format,
the built-in example, and the prepare / sft / evaluate wiring."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from helpers_tokenizer import make_test_tokenizer
from instructflow import multitask, synthetic
from instructflow.config import validate
from tasks.prepare import user_source
from instructflow.data import Source, load_source
from instructflow.errors import ConfigError, DataError
from instructflow.io import read_jsonl
from instructflow.multitask import TaskDef, format_joint, parse_joint, run_strategy, score, strategy_rows
from models.tokenizer import IGNORE_INDEX, chat_example

TASKS = (
    TaskDef("translate", "Translate the word.", "'{{ word }}' into {{ to }}", "translation"),
    TaskDef("rename", "Replace the name.", "{{ old }} -> {{ new }}: {{ sentence }}", "sentence | replace(old, new)"),
    TaskDef("sum", "Add.", "{{ a }} + {{ b }}", "a + b"),
)
FIELDS = {"word": "cat", "to": "Korean", "translation": "고양이", "sentence": "Bob ran.", "old": "Bob", "new": "Ann",
          "a": 2, "b": 3}
PIECES = [
    {"name": "translate", "instruction": "Translate the word.", "input": "'cat' into Korean", "answer": "고양이"},
    {"name": "rename", "instruction": "Replace the name.", "input": "Bob -> Ann: Bob ran.", "answer": "Ann ran."},
    {"name": "sum", "instruction": "Add.", "input": "2 + 3", "answer": "5"},
]
RECORD = {"id": "r.jsonl:1", "fields": FIELDS, "tasks": PIECES, "source": "r.jsonl"}
NAMES = ["translate", "rename", "sum"]


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


# ------------------------------------------------------------------------------------------ rendering
def test_render_record_fills_templates_and_evaluates_answer_expressions():
    assert multitask.render_record(FIELDS, TASKS, "r.jsonl", 1) == PIECES


def write(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_a_tasks_source_reads_records_and_names_the_line_and_field_of_a_missing_one(tmp_path):
    good = write(tmp_path / "r.jsonl", [FIELDS, {**FIELDS, "a": 7}])
    loaded = load_source(Source(good, "tasks", render_tasks=multitask.renderer(TASKS)))
    assert loaded.records[0] == RECORD
    assert loaded.records[1]["id"] == "r.jsonl:2" and loaded.records[1]["tasks"][2]["answer"] == "10"

    no_word = {k: v for k, v in FIELDS.items() if k != "word"}
    bad = write(tmp_path / "bad.jsonl", [FIELDS, no_word])
    with pytest.raises(DataError) as err:  # a template names a field the record lacks
        load_source(Source(bad, "tasks", render_tasks=multitask.renderer(TASKS)))
    assert (err.value.path, err.value.line, err.value.field) == (str(bad), 2, "word")
    assert "missing: task 'translate' reads it" in str(err.value)

    no_answer = {**FIELDS, "translation": None}
    bad = write(tmp_path / "bad2.jsonl", [no_answer])
    with pytest.raises(DataError, match=r"bad2.jsonl, line 1, field 'translation': null: task 'translate'"):
        load_source(Source(bad, "tasks", render_tasks=multitask.renderer(TASKS)))


def test_a_csv_tasks_source_names_its_line_and_a_multiline_answer_is_refused(tmp_path):
    csv = tmp_path / "r.csv"
    csv.write_text('word,to,translation\ncat,Korean,고양이\ndog,Korean,"개\n강아지"\n', encoding="utf-8")
    tasks = (TASKS[0],)
    with pytest.raises(DataError) as err:
        load_source(Source(csv, "tasks", render_tasks=multitask.renderer(tasks)))
    assert (err.value.line, err.value.field) == (3, "translation")
    assert "must be one non-empty line" in str(err.value)
    skipped = load_source(Source(csv, "tasks", render_tasks=multitask.renderer(tasks), skip_invalid=True))
    assert [r["tasks"][0]["answer"] for r in skipped.records] == ["고양이"] and len(skipped.skipped) == 1


def test_an_expression_that_fails_on_a_record_names_the_task():
    with pytest.raises(DataError, match=r"r.jsonl, line 4, field 'sum': task 'sum' cannot be rendered"):
        multitask.render_record({**FIELDS, "a": "2"}, TASKS, "r.jsonl", 4)  # str + int


def test_task_definitions_are_checked_and_errors_name_the_key(tmp_path):
    spec = [{"name": "t", "instruction": "Do.", "template": "{{ x }}", "answer": "y"}]
    assert multitask.task_defs(spec) == [TaskDef("t", "Do.", "{{ x }}", "y")]
    cases = [
        ([{**spec[0], "template": "{{ x "}], r"prepare.tasks\[0\].template = '\{\{ x ': not valid Jinja"),
        ([{**spec[0], "answer": "y +"}], r"prepare.tasks\[0\].answer = 'y \+': not valid Jinja"),
        ([{"name": "t", "template": "x", "answer": "y"}], r"prepare.tasks\[0\]: missing instruction"),
        ([{**spec[0], "extra": "1"}], r"prepare.tasks\[0\]: unknown key extra"),
        ([{**spec[0], "name": "a: b"}], r"prepare.tasks\[0\].name = 'a: b'"),
        ([spec[0], spec[0]], r"task name 't' appears 2 times"),
        ([], r"expected a non-empty list"),
    ]
    for specs, message in cases:
        with pytest.raises(ValueError, match=message):
            multitask.task_defs(specs)
    path = tmp_path / "tasks.yaml"
    path.write_text("- {name: t, instruction: Do., template: '{{ x }}'}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"tasks.yaml: tasks\[0\]: missing answer"):
        multitask.load_task_defs("tasks.yaml", tmp_path)
    with pytest.raises(ConfigError, match=r"params.yaml: prepare: tasks = 'nope.yaml': file not found"):
        multitask.load_task_defs("nope.yaml", tmp_path)


def test_the_config_refuses_unknown_strategies_and_tasks_sources_without_definitions():
    assert validate({}).sft.multitask == "sequential"
    assert validate({"sft": {"multitask": "joint"}}).sft.multitask == "joint"
    with pytest.raises(ConfigError, match=r"sft.multitask = 'both': Input should be 'joint', 'sequential' or "
                                          r"'cumulative'"):
        validate({"sft": {"multitask": "both"}})
    with pytest.raises(ConfigError, match=r"sources\[0\] has role tasks but no task definitions"):
        validate({"prepare": {"sources": [{"path": "r.jsonl", "role": "tasks"}]}})
    spec = [{"name": "t", "instruction": "Do.", "template": "{{ x }}", "answer": "y"}]
    sources = [{"path": "r.jsonl", "role": "tasks"}, {"path": "s.jsonl", "role": "tasks", "tasks": "mine.yaml"},
               {"path": "c.jsonl", "role": "sft"}]
    prepare = validate({"prepare": {"tasks": spec, "sources": sources}}).prepare
    assert [s.tasks for s in prepare.sources] == [spec, "mine.yaml", None]  # prepare.tasks unless its own
    bad = {"name": "t", "instruction": "Do.", "template": "{% if %}", "answer": "y"}
    assert validate({"prepare": {"tasks": [bad]}}).prepare.tasks == [bad]  # prepare checks the definitions:
    with pytest.raises(ConfigError, match=r"params.yaml: prepare.sources \(r.jsonl\): tasks\[0\].template .*not "
                                          r"valid Jinja"):
        user_source(SimpleNamespace(path="r.jsonl", role="tasks", tasks=[bad]), Path("."))


# ------------------------------------------------------------------------------------- strategy rows
JOINT_PROMPT = ("translate: Translate the word. 'cat' into Korean\n"
                "rename: Replace the name. Bob -> Ann: Bob ran.\n"
                "sum: Add. 2 + 3")
JOINT_REPLY = "translate: 고양이\nrename: Ann ran.\nsum: 5"
ASKS = ["Translate the word.\n'cat' into Korean", "Replace the name.\nBob -> Ann: Bob ran.", "Add.\n2 + 3"]


def test_each_strategy_builds_exactly_its_rows_for_a_three_task_record():
    tags = {"source": "r.jsonl", "record": "r.jsonl:1"}
    assert strategy_rows("joint", RECORD) == [
        {"messages": [user(JOINT_PROMPT), assistant(JOINT_REPLY)], "task": None, "answer": None,
         "strategy": "joint", "tasks": NAMES, **tags}]
    assert strategy_rows("sequential", RECORD) == [
        {"messages": [user(ask), assistant(piece["answer"])], "task": piece["name"], "answer": piece["answer"],
         "strategy": "sequential", "tasks": [piece["name"]], **tags} for ask, piece in zip(ASKS, PIECES)]
    assert strategy_rows("cumulative", RECORD) == [
        {"messages": [user(ASKS[0]), assistant("고양이"), user(ASKS[1]), assistant("Ann ran."), user(ASKS[2]),
                      assistant("5")], "task": None, "answer": None, "strategy": "cumulative", "tasks": NAMES, **tags}]
    with pytest.raises(ValueError, match="unknown multitask strategy 'both'"):
        strategy_rows("both", RECORD)


def trained_spans(tok, messages) -> list[list[int]]:
    """The runs of consecutive trained label ids of a row under chat_example (the loss mask's islands)."""
    example = chat_example(tok, messages, max_length=1000)
    spans, current = [], []
    for label in example["labels"]:
        if label == IGNORE_INDEX:
            if current:
                spans.append(current)
            current = []
        else:
            current.append(label)
    return spans + ([current] if current else [])


def test_the_loss_mask_of_each_strategy_covers_exactly_the_answers_and_their_eos():
    tok = make_test_tokenizer()

    def ids(text):
        return tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]

    expected = {"joint": [[ids(JOINT_REPLY)]],
                "sequential": [[ids("고양이")], [ids("Ann ran.")], [ids("5")]],
                "cumulative": [[ids("고양이"), ids("Ann ran."), ids("5")]]}
    for strategy, spans in expected.items():
        assert [trained_spans(tok, row["messages"]) for row in strategy_rows(strategy, RECORD)] == spans, strategy


# ------------------------------------------------------------------------------------------ joint format
def test_parse_joint_accepts_exactly_the_joint_format():
    assert format_joint(NAMES, ["고양이", "Ann ran.", "5"]) == JOINT_REPLY
    assert parse_joint(JOINT_REPLY, NAMES) == ["고양이", "Ann ran.", "5"]
    assert parse_joint(f"  {JOINT_REPLY}\n", NAMES) == ["고양이", "Ann ran.", "5"]  # the reply's outer whitespace
    refused = {
        "reordered": "rename: Ann ran.\ntranslate: 고양이\nsum: 5",
        "missing": "translate: 고양이\nrename: Ann ran.",
        "duplicate": "translate: 고양이\ntranslate: 고양이\nsum: 5",
        "extra line": JOINT_REPLY + "\nsum: 5",
        "text before": "Sure!\n" + JOINT_REPLY,
        "text after": JOINT_REPLY + "\nDone.",
        "blank line": "translate: 고양이\n\nrename: Ann ran.\nsum: 5",
        "no space": "translate:고양이\nrename: Ann ran.\nsum: 5",
        "other name": "translation: 고양이\nrename: Ann ran.\nsum: 5",
        "prose": "고양이, Ann ran., 5",
    }
    for why, text in refused.items():
        assert parse_joint(text, NAMES) is None, why
    with pytest.raises(ValueError, match="spans lines"):
        format_joint(["a"], ["x\ny"])


# ------------------------------------------------------------------------------------------- inference
class Scripted:
    """A `complete` that answers from a script keyed by the last user turn, and records every prompt it gets."""

    def __init__(self, replies: dict[str, str]):
        self.replies, self.calls = replies, []

    def __call__(self, prompts):
        self.calls.append(prompts)
        return [(self.replies[p[-1]["content"]], len(self.replies[p[-1]["content"]])) for p in prompts]


def test_cumulative_inference_feeds_the_models_own_earlier_answers():
    complete = Scripted({ASKS[0]: "개", ASKS[1]: "Ann ran.", ASKS[2]: " 5 "})  # task 1 wrong
    [result] = run_strategy("cumulative", [RECORD], complete)
    assert complete.calls == [
        [[user(ASKS[0])]],
        [[user(ASKS[0]), assistant("개"), user(ASKS[1])]],  # its own answer, not the gold 고양이
        [[user(ASKS[0]), assistant("개"), user(ASKS[1]), assistant("Ann ran."), user(ASKS[2])]],
    ]
    assert result == {"id": "r.jsonl:1", "predictions": ["개", "Ann ran.", "5"], "calls": 3, "tokens": 1 + 8 + 3}


def test_sequential_asks_each_task_alone_and_joint_once_with_a_parse_failure_all_wrong():
    complete = Scripted({ASKS[0]: "고양이", ASKS[1]: "Ann ran", ASKS[2]: "6"})
    [result] = run_strategy("sequential", [RECORD], complete)
    assert complete.calls == [[[user(a)] for a in ASKS]]  # one round: the three prompts batched, none sees another
    assert result["predictions"] == ["고양이", "Ann ran", "6"] and result["calls"] == 3

    good = Scripted({JOINT_PROMPT: JOINT_REPLY})
    [result] = run_strategy("joint", [RECORD], good)
    assert good.calls == [[[user(JOINT_PROMPT)]]]
    assert result == {"id": "r.jsonl:1", "predictions": ["고양이", "Ann ran.", "5"], "calls": 1,
                      "tokens": len(JOINT_REPLY), "parsed": True}
    bad = Scripted({JOINT_PROMPT: "sum: 5\ntranslate: 고양이\nrename: Ann ran."})
    [result] = run_strategy("joint", [RECORD], bad)
    assert result["predictions"] == [None, None, None] and result["parsed"] is False
    assert score([RECORD], [result])["all_correct"] == [0.0]


def test_score_per_task_exact_match_and_all_correct_on_hand_made_predictions():
    second = {**RECORD, "id": "r.jsonl:2"}
    two_tasks = {**RECORD, "id": "r.jsonl:3", "tasks": PIECES[:2]}
    results = [
        {"predictions": ["고양이", "ann ran", "5."], "calls": 3, "tokens": 10},  # all right up to case and stop
        {"predictions": ["고양이", "Bob ran.", "5"], "calls": 3, "tokens": 14},  # rename wrong
        {"predictions": [None, "Ann ran."], "calls": 1, "tokens": 6},  # translate unanswered
    ]
    scored = score([RECORD, second, two_tasks], results)
    assert scored == {"per_task": {"translate": [1.0, 1.0, 0.0], "rename": [1.0, 0.0, 1.0], "sum": [1.0, 1.0]},
                      "all_correct": [1.0, 0.0, 0.0], "calls": [3.0, 3.0, 1.0], "tokens": [10.0, 14.0, 6.0]}
    from tasks.multitask_eval import metrics_of

    metrics = metrics_of(scored, validate({"preset": "micro"}))
    assert metrics["multitask_exact_match_translate"] == pytest.approx(2 / 3)
    assert metrics["multitask_exact_match_sum"] == 1.0 == metrics["multitask_exact_match_sum_ci_low"]
    assert metrics["multitask_all_correct"] == pytest.approx(1 / 3)
    assert 0 <= metrics["multitask_all_correct_ci_low"] <= 1 / 3 <= metrics["multitask_all_correct_ci_high"] <= 1
    assert metrics["multitask_calls_per_record"] == pytest.approx(7 / 3)
    assert metrics["multitask_tokens_per_record"] == pytest.approx(10.0)


# ---------------------------------------------------------------------------------- built-in example
def test_the_built_in_records_hold_no_held_out_synthetic_task_and_their_answers_are_the_synthetic_ones():
    splits = synthetic.generate(60, 30, seed=5)
    train, held = multitask.demo_records(40, 20, splits.eval, seed=5)
    assert (len(train), len(held)) == (40, 20)
    records = [multitask.render_record(f, multitask.DEMO_TASKS, "demo", i) for i, f in enumerate(train + held)]
    held_out = {multitask._held_out_keys(t) for t in splits.eval}
    for fields, pieces in zip(train + held, records):
        assert ("translate", fields["word"], fields["translation"]) not in held_out
        assert ("arithmetic", fields["a"], fields["op"], fields["b"]) not in held_out
        renamed = pieces[1]["answer"]
        assert ("rename", fields["sentence"], renamed) not in held_out
        assert renamed == fields["sentence"].replace(fields["old"], fields["new"]) != fields["sentence"]
        a, op, b = fields["a"], fields["op"], fields["b"]
        assert pieces[2]["answer"] == str({"+": a + b, "-": a - b, "*": a * b}[op])
    # no rename or arithmetic item in two records, so none in both train and eval
    assert len({(f["sentence"], f["new"]) for f in train + held}) == 60
    assert len({(f["a"], f["op"], f["b"]) for f in train + held}) == 60
    assert multitask.demo_records(40, 20, splits.eval, seed=5) == (train, held)  # deterministic
    with pytest.raises(ConfigError, match="multitask records but the built-in tasks make only"):
        multitask.demo_records(10**6, 1, splits.eval, seed=5)


# ------------------------------------------------------------------------------------------- the stages
def prepare_config(tmp_path, demo_counts=(0, 0), **kw):
    return SimpleNamespace(demo=False, eval_fraction=0.25, max_pretrain_chars=None, max_sft_rows=None,
                           max_preference_rows=None, max_prompt_rows=None, max_chars=None,
                           synthetic=SimpleNamespace(n_train=6, n_eval=3, kinds=["translate", "rename", "arithmetic"],
                                                     multitask_train=demo_counts[0], multitask_eval=demo_counts[1]),
                           **kw)


def test_prepare_writes_rendered_records_and_sft_composes_them_under_the_strategy(tmp_path, monkeypatch):
    from tasks.prepare import build
    from tasks.sft import multitask_rows

    (tmp_path / "data" / "raw").mkdir(parents=True)
    rows = [{**FIELDS, "a": i, "b": 1} for i in range(8)] + [{**FIELDS, "a": 0, "b": 1}]  # the last a duplicate
    write(tmp_path / "data" / "r.jsonl", rows)
    specs = [{"name": t.name, "instruction": t.instruction, "template": t.template, "answer": t.answer} for t in TASKS]
    sources = [SimpleNamespace(path="data/r.jsonl", role="tasks", tasks=specs)]
    out = tmp_path / "data" / "prepared"
    stats = build(prepare_config(tmp_path, sources=sources), 0, tmp_path / "data" / "raw", out)
    train, held = read_jsonl(out / "multitask_train.jsonl"), read_jsonl(out / "multitask_eval.jsonl")
    assert len(train) + len(held) == 8 and train and held
    assert stats["sources"]["tasks"]["r.jsonl"] == {"rows": 9, "records": 9, "invalid_skipped": 0, "train": len(train),
                                                   "eval": len(held), "duplicates_dropped": 1, "capped": 0}
    assert sorted(int(r["tasks"][2]["answer"]) for r in train + held) == list(range(1, 9))
    assert json.loads((out / "multitask_tasks.json").read_text()) == {"r.jsonl": specs}

    for strategy, per_record in (("joint", 1), ("sequential", 3), ("cumulative", 1)):
        composed = multitask_rows(tmp_path, strategy)
        assert len(composed) == per_record * len(train) and {r["strategy"] for r in composed} == {strategy}
    assert multitask_rows(tmp_path / "elsewhere", "joint") == []  # no multitask records: nothing added

    with pytest.raises(DataError, match=r"r.jsonl, line 2, field 'word': missing"):
        write(tmp_path / "data" / "r.jsonl", [FIELDS, {k: v for k, v in FIELDS.items() if k != "word"}])
        build(prepare_config(tmp_path, sources=sources), 0, tmp_path / "data" / "raw", out)
    assert read_jsonl(out / "multitask_train.jsonl") == train  # nothing partial written


def test_prepare_adds_the_built_in_example_with_demo(tmp_path):
    from tasks.prepare import multitask_outputs

    cfg = prepare_config(tmp_path, demo_counts=(5, 4))
    cfg.demo = True
    outputs, dropped = {}, {}
    splits = synthetic.generate(6, 3, seed=0)
    definitions = multitask_outputs(cfg, 0, [], splits, outputs, dropped)
    assert [len(outputs[n]) for n in ("multitask_train.jsonl", "multitask_eval.jsonl")] == [5, 4]
    assert [t["name"] for t in outputs["multitask_eval.jsonl"][0]["tasks"]] == ["word", "rename", "math"]
    assert list(definitions) == [multitask.DEMO_SOURCE]


def test_evaluate_multitask_asks_a_real_model_the_strategys_way(tmp_path):
    from tasks.multitask_eval import evaluate_multitask

    tok = make_test_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=256))
    (tmp_path / "data" / "prepared").mkdir(parents=True)
    write(tmp_path / "data" / "prepared" / "multitask_eval.jsonl", [RECORD, {**RECORD, "id": "r.jsonl:2"}])
    for strategy, calls in (("joint", 1), ("sequential", 3), ("cumulative", 3)):
        params = validate({"preset": "micro", "sft": {"multitask": strategy}, "evaluate": {"max_new_tokens": 4}})
        metrics, report = evaluate_multitask(model, tok, params, tmp_path)
        assert metrics["multitask_calls_per_record"] == calls and metrics["n_multitask_records"] == 2
        # greedy tokens stop at EOS or at max_new_tokens (per task for joint's one reply)
        assert 0 < metrics["multitask_tokens_per_record"] <= calls * 4 * (3 if strategy == "joint" else 1)
        assert {f"multitask_exact_match_{n}" for n in NAMES} | {"multitask_all_correct"} <= set(metrics)
        assert report[0] == "## Multi-task records" and f"`sft.multitask: {strategy}`" in report[2]
        assert "multitask_seconds" in metrics and "seconds" not in "\n".join(report)
    assert evaluate_multitask(model, tok, params, tmp_path / "none") == ({}, [])


def test_compare_shows_the_multitask_columns_when_evaluate_recorded_them():
    from flows.compare import Plan, Variant, table
    from instructflow.config import Params

    def variant(label: str, translate: float, calls: float, **extra) -> Variant:
        ev = {"win_rate": 0.5, "multitask_exact_match_translate": translate,
              "multitask_exact_match_translate_ci_low": translate - 0.1,
              "multitask_exact_match_translate_ci_high": translate + 0.1, "multitask_all_correct": 0.25,
              "multitask_all_correct_ci_low": 0.125, "multitask_all_correct_ci_high": 0.375,
              "multitask_calls_per_record": calls, "multitask_tokens_per_record": 12.25, **extra}
        return Variant(label, label, [f"sft.multitask={label}"], Params(), status="ok", evaluate=ev)

    plan = Plan("sft.multitask", [variant("joint", 0.5, 1.0), variant("cumulative", 0.75, 3.0,
                                                                       multitask_seconds=4.25)], [], None)
    header, body = table(plan)
    rows = [dict(zip(header, row)) for row in body]
    assert rows[0]["multitask: translate [CI]"] == "0.500 [0.400, 0.600]"
    assert rows[1]["multitask: translate [CI]"] == "0.750 [0.650, 0.850]"
    assert rows[0]["multitask: all correct [CI]"] == "0.250 [0.125, 0.375]"
    assert [r["calls / record"] for r in rows] == ["1.00", "3.00"]
    assert rows[0]["tokens / record"] == "12.2" and [r["multitask s"] for r in rows] == ["–", "4.2"]
    plain = Plan("align.beta", [Variant("0.1", 0.1, [], Params(), status="ok", evaluate={"win_rate": 0.5})], [], None)
    assert not any(h.startswith("multitask") for h in table(plain)[0])  # no multitask records: no columns


def test_a_validated_tasks_source_reads_as_preflight_reads_it(tmp_path):
    """`run` and `compare` check every source with user_source(source, root) alone: a tasks source carries its tasks."""
    specs = [{"name": t.name, "instruction": t.instruction, "template": t.template, "answer": t.answer} for t in TASKS]
    write(tmp_path / "r.jsonl", [FIELDS, {k: v for k, v in FIELDS.items() if k != "b"}])
    params = validate({"prepare": {"tasks": specs, "sources": [{"path": "r.jsonl", "role": "tasks"}]}})
    [source] = params.prepare.sources
    with pytest.raises(DataError, match=r"r.jsonl, line 2, field 'b': missing: task 'sum' reads it"):
        load_source(user_source(source, tmp_path))

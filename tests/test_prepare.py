"""Stage `prepare`: builds every canonical file from user sources and the demo, or writes nothing at all."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from instructflow.io import read_jsonl
from instructflow.errors import DataError
from tasks.prepare import build, demo_sources, user_source

DEMO_RAW = Path(__file__).resolve().parents[1] / "data" / "raw"
HANGUL = re.compile(r"[\uac00-\ud7a3]")
OUTPUTS = sorted([f"{role}_{part}.jsonl" for role in ("pretrain", "sft", "preference", "unpaired")
                  for part in ("train", "eval")] + ["prompts_eval.jsonl", "stats.json"])


def config(sources=(), demo=False, n_train=12, n_eval=6, **caps) -> SimpleNamespace:
    limits = {"max_pretrain_chars": None, "max_sft_rows": None, "max_preference_rows": None, "max_prompt_rows": None}
    return SimpleNamespace(demo=demo, eval_fraction=0.25, **{**limits, **caps}, sources=list(sources),
                           synthetic=SimpleNamespace(n_train=n_train, n_eval=n_eval,
                                                     kinds=["translate", "rename", "arithmetic"]))


def source(path: str, role: str, **kwargs) -> SimpleNamespace:
    return SimpleNamespace(path=path, role=role, format=kwargs.pop("format", "auto"), columns=kwargs.pop("columns", {}))


@pytest.fixture
def project(tmp_path) -> Path:
    """A project folder whose data/user holds one small file per role (paths in params are root-relative)."""
    user = tmp_path / "data" / "user"
    user.mkdir(parents=True)
    (tmp_path / "data" / "raw").mkdir()
    english = [f"Paragraph {i} of the story, in English, long enough to need a few documents. " * 3 for i in range(20)]
    korean = [f"한국어 문단 {i}입니다. 여러 문서로 나뉠 만큼 깁니다. " * 5 for i in range(20)]
    (user / "story.txt").write_text("\n\n".join(english + korean), encoding="utf-8")  # ~7,900 chars: 5 documents
    chat = "질문,답\n" + "".join(f"질문 {i},답 {i}\n" for i in range(10)) + "질문 0,답 0\n"  # one duplicate
    (user / "chat.csv").write_text(chat, encoding="utf-8")
    (user / "prefs.jsonl").write_text("".join(json.dumps({"prompt": f"Q{i}", "responses": ["good", "ok", "bad"]}) + "\n"
                                              for i in range(8)), encoding="utf-8")
    (user / "kto.jsonl").write_text("".join(json.dumps({"prompt": f"Q{i}", "completion": "A", "label": i % 2}) + "\n"
                                            for i in range(6)), encoding="utf-8")
    return tmp_path


def user_sources() -> list[SimpleNamespace]:
    return [source("data/user/story.txt", "pretrain"),
            source("data/user/chat.csv", "sft", columns={"prompt": "질문", "completion": "답"}),
            source("data/user/prefs.jsonl", "preference"),
            source("data/user/kto.jsonl", "unpaired")]


def test_build_writes_every_file_with_sources_and_synthetic_rows(project):
    out = project / "data" / "prepared"
    stats = build(config(user_sources()), seed=0, raw_dir=project / "data" / "raw", out_dir=out)
    assert sorted(p.name for p in out.iterdir()) == OUTPUTS
    assert json.loads((out / "stats.json").read_text(encoding="utf-8")) == stats
    rows = {name: read_jsonl(out / name) for name in OUTPUTS if name.endswith(".jsonl")}
    assert stats["files"] == {name: len(r) for name, r in rows.items()}

    assert stats["duplicates_dropped"]["sft"] == 1  # the repeated 질문 0 / 답 0 row
    assert stats["files"]["preference_train.jsonl"] + stats["files"]["preference_eval.jsonl"] == 8 * 3 + 12 + 6
    assert stats["files"]["unpaired_train.jsonl"] + stats["files"]["unpaired_eval.jsonl"] == 6 + 2 * (12 + 6)
    assert stats["files"]["prompts_eval.jsonl"] == 0
    for role in ("pretrain", "sft", "preference", "unpaired"):
        assert rows[f"{role}_train.jsonl"] and rows[f"{role}_eval.jsonl"], role

    synthetic_eval = [r for r in rows["sft_eval.jsonl"] if r["source"] == "synthetic"]
    assert len(synthetic_eval) == 6 and all(r["answer"] == r["messages"][-1]["content"] and r["task"]
                                            for r in synthetic_eval)
    train_prompts = {r["messages"][0]["content"] for r in rows["sft_train.jsonl"]}
    assert not train_prompts & {r["messages"][0]["content"] for r in rows["sft_eval.jsonl"]}
    assert {r["source"] for r in rows["sft_train.jsonl"]} == {"chat.csv", "synthetic"}
    assert any(HANGUL.search(r["text"]) for r in rows["pretrain_train.jsonl"] + rows["pretrain_eval.jsonl"])


def test_build_is_deterministic_for_a_seed(project):
    raw = project / "data" / "raw"
    build(config(user_sources()), seed=3, raw_dir=raw, out_dir=project / "a")
    build(config(user_sources()), seed=3, raw_dir=raw, out_dir=project / "b")
    build(config(user_sources()), seed=4, raw_dir=raw, out_dir=project / "c")
    files = ("sft_train.jsonl", "sft_eval.jsonl", "preference_eval.jsonl", "stats.json")
    assert all((project / "a" / f).read_bytes() == (project / "b" / f).read_bytes() for f in files)
    assert any((project / "a" / f).read_bytes() != (project / "c" / f).read_bytes() for f in files)


def test_a_bad_source_writes_nothing(project):
    (project / "data" / "user" / "bad.jsonl").write_text('{"prompt": "Q", "chosen": "A", "rejected": "B"}\n'
                                                         '{"prompt": "Q", "chosen": "A"}\n', encoding="utf-8")
    bad = [*user_sources(), source("data/user/bad.jsonl", "preference")]
    out = project / "data" / "prepared"
    with pytest.raises(DataError, match=r"bad\.jsonl, line 2, field 'rejected': missing"):
        build(config(bad), seed=0, raw_dir=project / "data" / "raw", out_dir=out)
    assert not out.exists()

    build(config(user_sources()), seed=0, raw_dir=project / "data" / "raw", out_dir=out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(DataError):
        build(config(bad), seed=1, raw_dir=project / "data" / "raw", out_dir=out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["prepared", "raw", "user"]  # no temp folder left


def test_a_ranked_lists_pairs_share_a_group_on_one_side_even_when_capped(project):
    out = project / "data" / "prepared"
    for cap in (None, 10):  # 8 lists of 3 pairs, capped to 10 rows: 3 whole lists (9 rows), never a part of one
        build(config(user_sources(), max_preference_rows=cap), seed=0, raw_dir=project / "data" / "raw", out_dir=out)
        train, held_out = (read_jsonl(out / f"preference_{part}.jsonl") for part in ("train", "eval"))
        ranked = [r for r in train + held_out if r["source"] == "prefs.jsonl"]
        groups = {r["group"] for r in ranked}
        assert len(ranked) == 3 * len(groups) == (24 if cap is None else 9)
        assert all(g.startswith("prefs.jsonl:") for g in groups)
        assert not {r["group"] for r in train if "group" in r} & {r["group"] for r in held_out if "group" in r}
        assert all("group" not in r for r in train + held_out if r["source"] == "synthetic")


def test_build_on_the_demo_data_with_small_caps(tmp_path):
    cfg = config(demo=True, n_train=30, n_eval=9, max_pretrain_chars=30_000, max_sft_rows=60,
                 max_preference_rows=40, max_prompt_rows=10)
    stats = build(cfg, seed=0, raw_dir=DEMO_RAW, out_dir=tmp_path / "prepared")
    assert all(n > 0 for n in stats["files"].values()), stats["files"]
    assert sum(stats["pretrain_chars"].values()) <= 30_000
    pretrain = stats["sources"]["pretrain"]
    assert all(pretrain[name].get("train", 0) + pretrain[name].get("eval", 0) > 0
               for name in ("tinyshakespeare.txt", "nsmc_train.tsv", "ko_chatbot_qa.csv"))
    sft = stats["files"]["sft_train.jsonl"] + stats["files"]["sft_eval.jsonl"]
    assert sft == 60 + 30 + 9
    assert stats["files"]["preference_train.jsonl"] + stats["files"]["preference_eval.jsonl"] == 40 + 30 + 9
    assert stats["files"]["prompts_eval.jsonl"] == 10
    assert stats["sources"]["preference"]["hh_rlhf_harmless_pairs.jsonl"]["invalid_skipped"] == 7

    text = (tmp_path / "prepared" / "pretrain_train.jsonl").read_text(encoding="utf-8")
    assert HANGUL.search(text) and "\\u" not in text  # Korean written as itself, not as escapes
    sft_rows = read_jsonl(tmp_path / "prepared" / "sft_train.jsonl")
    assert any(HANGUL.search(r["messages"][0]["content"]) for r in sft_rows if r["source"] == "ko_chatbot_qa.csv")
    prompts = read_jsonl(tmp_path / "prepared" / "prompts_eval.jsonl")
    assert all(len(p["messages"]) == 1 and p["messages"][0]["role"] == "user" and p["reference"] for p in prompts)


def test_build_reads_an_alpaca_array_and_a_folder_of_files(project):
    user = project / "data" / "user"
    alpaca = [{"instruction": f"Instruction {i}", "input": "" if i % 2 else f"input {i}", "output": f"Output {i}"}
              for i in range(6)]
    (user / "alpaca_data.json").write_text(json.dumps(alpaca, indent=4), encoding="utf-8")
    folder = user / "more"
    folder.mkdir()
    (folder / "1.jsonl").write_text("".join(json.dumps({"prompt": f"P{i}", "completion": f"C{i}"}) + "\n"
                                            for i in range(3)), encoding="utf-8")
    (folder / "2.csv").write_text("prompt,completion\nP9,C9\n", encoding="utf-8")
    sources = [*user_sources(), source("data/user/alpaca_data.json", "sft"), source("data/user/more", "sft")]

    stats = build(config(sources), seed=0, raw_dir=project / "data" / "raw", out_dir=project / "data" / "prepared")

    assert stats["sources"]["sft"]["alpaca_data.json"]["records"] == 6
    assert stats["sources"]["sft"]["more"]["rows"] == 4 and stats["sources"]["sft"]["more"]["records"] == 4
    rows = read_jsonl(project / "data" / "prepared" / "sft_train.jsonl") + \
        read_jsonl(project / "data" / "prepared" / "sft_eval.jsonl")
    assert {"P0", "P1", "P2", "P9"} <= {r["messages"][0]["content"] for r in rows if r["source"] == "more"}


def test_max_chars_refuses_a_long_user_row_and_writes_nothing(project):
    long_row = {"prompt": "Summarise this.", "completion": "word " * 20_000}  # 100,000 characters
    (project / "data" / "user" / "huge.jsonl").write_text(
        json.dumps({"prompt": "Q", "completion": "A"}) + "\n" + json.dumps(long_row) + "\n", encoding="utf-8")
    sources = [*user_sources(), source("data/user/huge.jsonl", "sft")]
    out = project / "data" / "prepared"
    build(config(user_sources()), seed=0, raw_dir=project / "data" / "raw", out_dir=out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    with pytest.raises(DataError) as caught:
        build(config(sources, max_chars=10_000), seed=0, raw_dir=project / "data" / "raw", out_dir=out)

    assert str(caught.value) == (f"{project}/data/user/huge.jsonl, line 2, field 'completion': the row has 100,015 "
                                 f"characters (100,000 in this field), more than prepare.max_chars = 10,000; shorten "
                                 f"or split it, or raise the bound")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the last good outputs are untouched
    stats = build(config(sources), seed=0, raw_dir=project / "data" / "raw", out_dir=out)  # no bound: read
    assert stats["sources"]["sft"]["huge.jsonl"]["records"] == 2


def test_max_chars_bounds_user_files_not_the_pinned_demo_data(tmp_path):
    raw = tmp_path / "data" / "raw"
    user = SimpleNamespace(path=str(tmp_path / "x.jsonl"), role="sft")
    assert user_source(user, tmp_path, 500).max_chars == 500
    assert all(s.max_chars is None for s in demo_sources(raw))

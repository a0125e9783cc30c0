"""instructflow/config.py: params.yaml is validated before any work, and a bad value is named precisely."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from instructflow.config import load_params, write_overrides
from instructflow.stages import NAMES as STAGES
from instructflow.errors import ConfigError

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def error_of(path: Path, **kwargs) -> str:
    with pytest.raises(ConfigError) as caught:
        load_params(path, **kwargs)
    return str(caught.value)


# ------------------------------------------------------------------------------- errors a user can act on
def test_unknown_key_names_file_line_key_and_the_keys_allowed(tmp_path):
    path = write(tmp_path, "preset: micro\nalign:\n  beta: 0.1\n  betaa: 0.2\n")

    message = error_of(path)

    assert f"{path}, line 4: unknown key 'align.betaa'" in message
    allowed = message.split("allowed:")[1]
    assert "beta" in allowed and "loss_type" in allowed and "betaa" not in allowed


def test_unknown_top_level_section_is_rejected(tmp_path):
    path = write(tmp_path, "preset: micro\nsftt:\n  lr: 0.1\n")

    assert f"{path}, line 2: unknown key 'sftt'" in error_of(path)


def test_bad_type_names_the_key_and_the_value(tmp_path):
    path = write(tmp_path, "preset: micro\nalign:\n  beta: abc\n")

    message = error_of(path)

    assert f"{path}, line 3: align.beta = 'abc'" in message
    assert "valid number" in message


def test_bad_literal_lists_what_is_allowed(tmp_path):
    path = write(tmp_path, "sft:\n  method: qlora\n")

    message = error_of(path)

    assert f"{path}, line 2: sft.method = 'qlora'" in message
    assert "Input should be 'full' or 'lora'" in message


def test_out_of_range_value_says_the_bound(tmp_path):
    path = write(tmp_path, "sft:\n  lr: 0\n")

    assert "sft.lr = 0: Input should be greater than 0" in error_of(path)


def test_prepare_max_chars_is_null_or_a_positive_bound(tmp_path):
    assert load_params(PARAMS).prepare.max_chars is None  # no bound unless asked
    assert load_params(PARAMS, overrides=["prepare.max_chars=20000"]).prepare.max_chars == 20_000
    assert "prepare.max_chars = 0: Input should be greater than or equal to 1" in error_of(
        write(tmp_path, "prepare:\n  max_chars: 0\n"))


def test_bad_preset_lists_the_presets(tmp_path):
    path = write(tmp_path, "seed: 1\npreset: huge\n")

    assert error_of(path) == f"{path}, line 2: preset = 'huge': expected one of micro, tiny, small"


def test_hidden_size_must_divide_by_heads(tmp_path):
    path = write(tmp_path, "pretrain:\n  model:\n    hidden_size: 30\n    num_heads: 4\n")

    message = error_of(path)

    assert "pretrain.model" in message
    assert "hidden_size 30 is not divisible by num_heads 4" in message


def test_both_tracks_off_is_rejected(tmp_path):
    path = write(tmp_path, "tracks:\n  decoder: false\n  encoder: false\n")

    message = error_of(path)

    assert f"{path}, line 1: tracks" in message
    assert "choose at least one track" in message


def test_every_problem_is_reported_at_once(tmp_path):
    path = write(tmp_path, "sft:\n  method: qlora\nalign:\n  beta: abc\n")

    message = error_of(path)

    assert "sft.method = 'qlora'" in message and "align.beta = 'abc'" in message


def test_missing_file_says_so(tmp_path):
    assert "file not found" in error_of(tmp_path / "nope.yaml")


# ------------------------------------------------------------------------------- presets and precedence
def test_preset_fills_sizes_and_params_yaml_wins(tmp_path):
    path = write(tmp_path, "preset: micro\nsft:\n  max_steps: 3\npretrain:\n  model:\n    hidden_size: 48\n")

    params = load_params(path)

    # from presets.yaml micro
    assert params.pretrain.model.num_layers == 2 and params.pretrain.model.num_heads == 2
    assert params.tokenizer.vocab_size == 400
    assert params.sft.batch_size == 8 and params.sft.max_length == 96
    # params.yaml wins, and only the key it names (the preset's siblings stay)
    assert params.sft.max_steps == 3
    assert params.pretrain.model.hidden_size == 48 and params.pretrain.model.intermediate_size == 64
    # neither sets it: the field default
    assert params.sft.lr == 5e-4


def test_tiny_and_micro_presets_differ_in_sizes(tmp_path):
    path = write(tmp_path, "seed: 7\n")  # no preset: tiny

    tiny = load_params(path)
    micro = load_params(path, preset="micro")

    assert tiny.preset == "tiny" and tiny.pretrain.model.hidden_size == 128 and tiny.sft.max_steps == 2400
    assert micro.preset == "micro" and micro.pretrain.model.hidden_size == 32 and micro.sft.max_steps == 10


def test_overrides_win_over_the_file_and_are_checked():
    params = load_params(PARAMS, overrides=["align.beta=0.2", "sft.method=lora"])

    assert params.align.beta == 0.2
    assert params.sft.method == "lora"
    assert params.align.lr == 5e-5  # untouched keys keep the file's value
    assert "align.betaa" in error_of(PARAMS, overrides=["align.betaa=0.2"])
    assert "expected section.key=value" in error_of(PARAMS, overrides=["align.beta"])


def test_the_project_params_yaml_is_valid():
    params = load_params(PARAMS)

    assert params.preset in ("micro", "tiny", "small")


# ------------------------------------------------------------------------------- writing overrides back
def test_write_overrides_changes_only_the_named_key_and_keeps_comments(tmp_path):
    path = tmp_path / "params.yaml"
    shutil.copy(PARAMS, path)
    before = path.read_text(encoding="utf-8").splitlines()

    changed = write_overrides(path, ["align.beta=0.2"])

    after = path.read_text(encoding="utf-8").splitlines()
    assert changed is True
    assert len(after) == len(before)
    diff = [(old, new) for old, new in zip(before, after) if old != new]
    assert len(diff) == 1
    old, new = diff[0]
    assert old.split("#")[0].strip() == "beta: 0.1" and new.split("#")[0].strip() == "beta: 0.2"
    assert new.split("#")[1] == old.split("#")[1]  # the comment on the line stays
    assert load_params(path).align.beta == 0.2


def test_write_overrides_twice_changes_nothing_the_second_time(tmp_path):
    path = tmp_path / "params.yaml"
    shutil.copy(PARAMS, path)
    write_overrides(path, ["align.beta=0.2"], preset="micro")
    first = path.read_text(encoding="utf-8")

    changed = write_overrides(path, ["align.beta=0.2"], preset="micro")

    assert changed is False
    assert path.read_text(encoding="utf-8") == first
    assert load_params(path).preset == "micro"


# ------------------------------------------------------------------------------- digest and stages
def test_digest_is_stable_and_changes_with_any_value(tmp_path):
    path = write(tmp_path, "preset: micro\n")

    base = load_params(path)

    assert base.digest() == load_params(path).digest()
    assert len(base.digest()) == 16
    assert load_params(path, overrides=["align.beta=0.2"]).digest() != base.digest()
    assert load_params(path, overrides=["seed=1"]).digest() != base.digest()
    assert load_params(path, preset="tiny").digest() != base.digest()


def test_stages_follow_the_chosen_tracks(tmp_path):
    path = write(tmp_path, "preset: micro\n")

    decoder = load_params(path).stages()  # default: decoder on, encoder off
    encoder = load_params(path, overrides=["tracks.decoder=false", "tracks.encoder=true"]).stages()
    both = load_params(path, overrides=["tracks.encoder=true"]).stages()

    assert decoder == ["prepare", "tokenizer", "pretrain", "sft", "reward", "align", "evaluate", "register"]
    assert encoder == ["prepare", "tokenizer", "mlm", "classify", "similarity", "register"]
    # an optional stage runs only when switched on
    assert both == [s for s in STAGES if s not in ("self_instruct", "generate", "rank")]
    assert {"generate", "rank"} <= set(load_params(path, overrides=["loop.enabled=true"]).stages())
    assert "self_instruct" in load_params(path, overrides=["self_instruct.enabled=true"]).stages()
    assert "self_instruct" not in load_params(path, overrides=["self_instruct.enabled=true",
                                                               "tracks.decoder=false", "tracks.encoder=true"]).stages()

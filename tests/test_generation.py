"""`instructflow generate`: the sampling rules on fixed distributions, the repetition penalty on hand-worked
logits, seeds, stop strings on a model whose answer is scripted, prompt files, the registry, and the CLI on a
micro model folder."""

from __future__ import annotations

import json

import mlflow
import pytest
import torch
from conftest import sqlite_store
from helpers_tokenizer import make_test_tokenizer
from mlflow.tracking import MlflowClient
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_outputs import CausalLMOutput

from instructflow.errors import ConfigError, DataError, InstructflowError
from models.generate import apply_repetition_penalty, generate, sample_next, seen_tokens
from models.tokenizer import CHAT_TEMPLATE, encode_prompt
from tasks.generation import (
    Loaded,
    generate_rows,
    load_model,
    read_prompts,
    sample_seed,
    sampling_params,
    single_prompt,
)
from tasks.registry import log_and_register, weights_sha256

POSITIONS = 64


@pytest.fixture(scope="module")
def tok():
    tokenizer = make_test_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def micro_config(tok) -> LlamaConfig:
    # init std 0.5 spreads the logits, so greedy choices are not decided by float rounding
    return LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=POSITIONS,
                       initializer_range=0.5, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tok):
    """A micro random Llama and the test tokenizer, saved as a stage saves them."""
    out = tmp_path_factory.mktemp("generation") / "policy"
    torch.manual_seed(0)
    LlamaForCausalLM(micro_config(tok)).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def loaded(folder):
    return load_model(str(folder), folder.parent)


PROMPTS = [single_prompt("The quick brown fox"), single_prompt("이 영화 정말 좋아요.")]


def rows_of(loaded, prompts=PROMPTS, batch_size=8, **params):
    return list(generate_rows(loaded, prompts, sampling_params(**params), batch_size=batch_size, progress=False))


# ---- the sampling rules, on fixed distributions ---------------------------------------------------------

# probs 0.4, 0.25, 0.15, 0.1, 0.06, 0.04 over ids 0..5
FIXED = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04]).log()


@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("top_k, top_p, allowed", [
    (3, 1.0, {0, 1, 2}),
    # mass above each id: 0, 0.4, 0.65, 0.8, 0.9, 0.96; top_p 0.75 keeps ids whose mass above is < 0.75
    (0, 0.75, {0, 1, 2}),
    (0, 0.41, {0, 1}),
    (0, 0.95, {0, 1, 2, 3, 4}),
    (4, 0.95, {0, 1, 2, 3}),  # top_p alone keeps ids 0..4 (mass above id 4: 0.9 < 0.95); top_k 4 drops id 4
])  # fmt: skip
def test_top_k_and_top_p_only_ever_draw_from_the_allowed_set(top_k, top_p, allowed, per_row):
    # without the filters ids 3..5 (probability 0.2 together) would come some 600 times in 3000 draws
    logits = FIXED.expand(3000, 6)  # (3000, 6)
    generator = [torch.Generator().manual_seed(i) for i in range(3000)] if per_row else torch.Generator().manual_seed(0)
    draws = sample_next(logits, temperature=1.0, top_k=top_k, top_p=top_p, generator=generator)
    assert set(draws.tolist()) == allowed  # every allowed id is drawn, nothing else ever is


def test_per_row_generators_draw_in_proportion_to_the_probabilities():
    # one draw each from 8000 generators: p(id 0) = 0.4, binomial sd sqrt(0.4 * 0.6 / 8000) = 0.0055; 4 sd
    draws = sample_next(FIXED.expand(8000, 6), 1.0, generator=[torch.Generator().manual_seed(i) for i in range(8000)])
    shares = torch.bincount(draws, minlength=6).float() / 8000
    assert shares.tolist() == pytest.approx([0.4, 0.25, 0.15, 0.1, 0.06, 0.04], abs=0.022)


def test_repetition_penalty_on_hand_worked_logits():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0]])  # (2, 5)
    # row 0 has seen ids 0, 1, 4 (id 3 only as padding, which does not count); row 1 has seen id 2
    ids = torch.tensor([[0, 1, 0, 3], [3, 3, 2, 2]])
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 1, 1]])
    seen = seen_tokens(ids, mask, 5)
    seen[0, 4] = True
    assert seen.tolist() == [[True, True, False, False, True], [False, False, True, False, False]]
    # penalty 2: a seen positive logit is halved, a seen negative one doubled, zero stays zero
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -2.0, 0.5, -3.0, 0.0],
                                                                     [1.0, 1.0, 0.5, 1.0, 1.0]]
    assert torch.equal(apply_repetition_penalty(logits, seen, 1.0), logits)
    with pytest.raises(ValueError, match="repetition_penalty must be > 0 \\(1 = off\\), got 0"):
        apply_repetition_penalty(logits, seen, 0)


def test_a_strong_repetition_penalty_stops_greedy_from_repeating(loaded, tok):
    prompt = encode_prompt(tok, PROMPTS[0].messages)
    free = generate(loaded.model, [prompt], 30, -1, tok.pad_token_id)[0]
    assert len(set(free)) < len(free)  # the micro model repeats itself greedily
    penalised = generate(loaded.model, [prompt], 30, -1, tok.pad_token_id, repetition_penalty=1e6)[0]
    # a seen id's logit is divided (or multiplied) by 1e6, so an unseen id always wins: no id comes twice,
    # and none that the prompt holds
    assert len(set(penalised)) == len(penalised) and not set(penalised) & set(prompt)


# ---- seeds and the KV cache ------------------------------------------------------------------------------


def test_the_same_seed_gives_the_same_rows_at_any_batch_size_and_another_seed_differs(loaded):
    params = {"temperature": 1.0, "top_k": 50, "n": 3, "max_new_tokens": 12, "seed": 7}
    rows = rows_of(loaded, **params)
    assert rows == rows_of(loaded, **params)
    assert rows == rows_of(loaded, batch_size=1, **params)  # a sample's draws are its own
    assert [r["seed"] for r in rows] == [sample_seed(7, p, s) for p in range(2) for s in range(3)]
    other = rows_of(loaded, **{**params, "seed": 8})
    assert [r["response"] for r in other] != [r["response"] for r in rows]
    # the samples of one prompt differ from each other
    assert len({r["response"] for r in rows[:3]}) == 3


def test_a_row_is_reproduced_alone_from_its_seed(loaded, tok):
    rows = rows_of(loaded, temperature=1.0, n=2, max_new_tokens=10, seed=3)
    row = rows[3]  # prompt 1, sample 1
    prompt = encode_prompt(tok, PROMPTS[1].messages)
    new = generate(loaded.model, [prompt], 10, tok.eos_token_id, tok.pad_token_id, temperature=1.0, seed=[row["seed"]])[0]
    assert tok.decode(new, skip_special_tokens=True) == row["response"]


def test_cache_on_and_off_give_the_same_greedy_and_sampled_rows(loaded):
    for params in ({"max_new_tokens": 20}, {"temperature": 0.8, "top_p": 0.9, "n": 2, "max_new_tokens": 12}):
        with_cache = rows_of(loaded, **params)
        without = rows_of(loaded, use_cache=False, **params)
        assert [r["response"] for r in with_cache] == [r["response"] for r in without]
        assert [r["sampling"]["use_cache"] for r in without] == [False] * len(without)


def test_a_sample_stops_at_the_models_last_position(loaded, tok):
    long = single_prompt("The quick brown fox jumps over the lazy dog. " * 2)
    room = POSITIONS - len(encode_prompt(tok, long.messages))
    rows = rows_of(loaded, [long, PROMPTS[0]], max_new_tokens=200)
    assert rows[0]["new_tokens"] == room and rows[0]["finish_reason"] == "length"
    assert rows[1]["new_tokens"] == POSITIONS - len(encode_prompt(tok, PROMPTS[0].messages))
    too_long = single_prompt("The quick brown fox jumps over the lazy dog. " * 8)
    with pytest.raises(InstructflowError, match=r"prompt 1 \(the prompt\) is \d+ tokens; the model reads at most 64"):
        rows_of(loaded, [PROMPTS[0], too_long])


def test_should_stop_ends_only_the_row_it_is_true_for(loaded, tok):
    prompts = [encode_prompt(tok, p.messages) for p in PROMPTS]
    free = generate(loaded.model, prompts, 12, -1, tok.pad_token_id)
    token = free[0][2]  # row 0 stops at its first `token`, at step 3 or before
    for use_cache in (True, False):
        out = generate(loaded.model, prompts, 12, -1, tok.pad_token_id, use_cache=use_cache,
                       should_stop=lambda ids: token in ids)
        assert out[0] == free[0][: free[0].index(token) + 1]
        assert out[1] == (free[1][: free[1].index(token) + 1] if token in free[1] else free[1])


# ---- stop strings, on a model that says what it is told ---------------------------------------------------

ANSWER = "Hello world. The dog is lazy"


class Scripted(torch.nn.Module):
    """A causal LM that answers any prompt of `prompt_len` tokens with `script`, then EOS, whatever it samples:
    the next token after n real tokens is script[n - prompt_len] (a logit of 50, the rest 0)."""

    def __init__(self, config: LlamaConfig, script: list[int], prompt_len: int):
        super().__init__()
        self.config, self.script, self.prompt_len = config, script, prompt_len
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the module a device

    def forward(self, input_ids, attention_mask, **kwargs):
        said = (attention_mask.sum(-1) - self.prompt_len).tolist()  # (B,) tokens answered so far
        nxt = [self.script[k] if k < len(self.script) else self.config.eos_token_id for k in said]
        logits = torch.zeros(input_ids.size(0), input_ids.size(1), self.config.vocab_size)  # (B, T, V)
        logits[torch.arange(len(nxt)), -1, torch.tensor(nxt)] = 50.0
        return CausalLMOutput(logits=logits)


@pytest.fixture(scope="module")
def scripted(tok):
    script = tok(ANSWER, add_special_tokens=False)["input_ids"]
    model = Scripted(micro_config(tok), script, len(encode_prompt(tok, PROMPTS[0].messages)))
    return Loaded(model, tok, "scripted"), script


@pytest.mark.parametrize("stop, response", [
    (["."], "Hello world"),
    (["world. The"], "Hello "),  # a stop string across tokens
    (["lazy", " dog"], "Hello world. The"),  # the first occurrence of any of them
    (["o"], "Hell"),  # inside a token
])  # fmt: skip
def test_stop_strings_cut_the_text_right_before_the_first_one(scripted, tok, stop, response):
    loaded, script = scripted
    [row] = rows_of(loaded, PROMPTS[:1], stop=stop, temperature=1.0)
    assert row["response"] == response and row["finish_reason"] == "stop"
    # generation ended with the token that completed a stop string, well before the end of the answer
    expected = next(k for k in range(1, len(script) + 1) if any(s in tok.decode(script[:k]) for s in stop))
    assert row["new_tokens"] == expected < len(script)


def test_without_a_stop_string_the_answer_ends_at_eos_or_at_the_length(scripted):
    loaded, script = scripted
    [row] = rows_of(loaded, PROMPTS[:1], stop=["never said"])
    assert (row["response"], row["finish_reason"], row["new_tokens"]) == (ANSWER, "eos", len(script) + 1)
    [row] = rows_of(loaded, PROMPTS[:1], max_new_tokens=3)
    assert row["finish_reason"] == "length" and row["new_tokens"] == 3 and ANSWER.startswith(row["response"])


# ---- bad input -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("values, message", [
    ({"temperature": -0.5}, "temperature must be >= 0 (0 = greedy), got -0.5"),
    ({"top_p": 0.0}, "top_p must be in (0, 1], got 0.0"),
    ({"top_p": 1.5}, "top_p must be in (0, 1], got 1.5"),
    ({"top_k": -1}, "top_k must be >= 0 (0 = off), got -1"),
    ({"n": 0}, "n = 0: Input should be greater than or equal to 1"),
    ({"max_new_tokens": 0}, "max_new_tokens = 0: Input should be greater than or equal to 1"),
    ({"repetition_penalty": 0}, "repetition_penalty = 0: Input should be greater than 0"),
    ({"stop": ["ok", ""]}, "stop = ['ok', '']: stop strings must be non-empty, got ['ok', '']"),
    ({"tempreature": 1}, "tempreature = 1: Extra inputs are not permitted"),
])  # fmt: skip
def test_bad_sampling_values_are_refused_by_name(values, message):
    with pytest.raises(ConfigError) as error:
        sampling_params(**values)
    assert message in str(error.value)


@pytest.mark.parametrize("name, content, expected", [
    ("p.jsonl", '{"prompt": "fine"}\n{"prompt": 3}\n', "p.jsonl, line 2, field 'prompt': expected a list of messages, got a number"),
    ("p.jsonl", '{"prompt": "a"}\n\n{"text": "b"}\n',
     ("p.jsonl, line 3, field 'prompt': missing; expected 'prompt' (a string) or 'messages' (a list ending with a "
      "user turn); the row's keys: text")),
    ("p.jsonl", '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n',
     "p.jsonl, line 1, field 'messages': must end with a user turn; the last role is 'assistant'"),
    ("p.jsonl", '{"messages": [{"role": "robot", "content": "hi"}]}\n',
     "p.jsonl, line 1, field 'messages[0].role': unknown role 'robot'"),
    ("p.jsonl", '{"prompt": "a", "messages": []}\n', "p.jsonl, line 1, field 'prompt': has both 'prompt' and 'messages'"),
    ("p.jsonl", '{"prompt": "a"}\n{"prompt": "b"\n', "p.jsonl, line 2: malformed JSON"),
    ("p.txt", "\n\n", "p.txt: has no prompts"),
])  # fmt: skip
def test_prompt_file_errors_name_the_file_line_and_field(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError) as error:
        read_prompts(path)
    assert str(error.value).startswith(str(tmp_path / expected.split(",")[0].split(":")[0]))
    assert expected in str(error.value)


def test_prompt_files_give_strings_and_messages(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    system = {"role": "system", "content": "Be brief."}
    jsonl.write_text(json.dumps({"prompt": " Hi "}) + "\n\n"
                     + json.dumps({"messages": [system, {"role": "user", "content": "Sum 2 and 3"}]}) + "\n")
    first, second = read_prompts(jsonl)
    assert (first.given, first.messages, first.line) == ("Hi", [{"role": "user", "content": "Hi"}], 1)
    assert second.messages == [system, {"role": "user", "content": "Sum 2 and 3"}] and second.line == 3
    text = tmp_path / "p.txt"
    text.write_text("one\n\n  two  \n")
    assert [(p.given, p.line) for p in read_prompts(text)] == [("one", 1), ("two", 3)]


# ---- models: folders, stages, the registry ----------------------------------------------------------------


def test_a_folder_and_a_stage_output_are_named_by_their_weights(folder, tmp_path):
    sha = weights_sha256(folder)[:12]
    assert load_model(str(folder), tmp_path).model_version == f"{folder}@{sha}"
    (tmp_path / "artifacts").mkdir()
    (tmp_path / "artifacts" / "sft").symlink_to(folder)
    assert load_model("sft", tmp_path).model_version == f"artifacts/sft@{sha}"
    with pytest.raises(InstructflowError, match=r"artifacts/align: no model there \(no config.json\); run "
                                                r"`instructflow stage align` first"):
        load_model("align", tmp_path)


def test_a_registered_policy_loads_by_alias_and_a_uri_that_does_not_resolve_is_named(folder, loaded, tmp_path):
    with sqlite_store(tmp_path, "generation-tests") as (_, experiment):
        with mlflow.start_run(experiment_id=experiment) as run:
            version = log_and_register("test-policy", folder, "text-generation", {"params_hash": "x"}, {},
                                       run_id=run.info.run_id)
        MlflowClient().set_registered_model_alias("test-policy", "champion", version.version)

        registered = load_model("models:/test-policy@champion", tmp_path)
        assert registered.model_version == "models:/test-policy/1"
        assert rows_of(registered, max_new_tokens=8)[0]["response"] == rows_of(loaded, max_new_tokens=8)[0]["response"]
        # the MLflow model folder itself (MLmodel, model/, components/tokenizer/) loads too
        local = mlflow.artifacts.download_artifacts("models:/test-policy/1", dst_path=str(tmp_path / "mlflow-model"))
        assert load_model(local, tmp_path).model_version == f"{local}@{weights_sha256(folder)[:12]}"
        with pytest.raises(InstructflowError, match=r"'models:/test-policy@nobody' does not resolve in the registry "
                                                    r".*'test-policy' has versions 1; aliases @champion -> 1"):
            load_model("models:/test-policy@nobody", tmp_path)
        with pytest.raises(InstructflowError, match=r"'models:/other/2' does not resolve .*registered models: "
                                                    r"test-policy"):
            load_model("models:/other/2", tmp_path)
        with pytest.raises(InstructflowError, match="expected models:/<name>@<alias> or models:/<name>/<version>"):
            load_model("models:/test-policy", tmp_path)
        # the CLI says the same and exits 2
        from typer.testing import CliRunner

        from apps.cli import app

        result = CliRunner().invoke(app, ["generate", "models:/absent@champion", "--prompt", "hi", "--root",
                                          str(tmp_path)])
        assert result.exit_code == 2 and "'models:/absent@champion' does not resolve" in result.output
        assert "registered models: test-policy" in result.output


# ---- the CLI ---------------------------------------------------------------------------------------------


def test_the_cli_writes_rows_with_model_version_sampling_and_seed(folder, tmp_path):
    from typer.testing import CliRunner

    from apps.cli import app

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The quick brown fox\n이 영화 정말 좋아요.\n")
    out = tmp_path / "out" / "rows.jsonl"
    args = ["generate", str(folder), "--prompts", str(prompts), "--out", str(out), "--n", "2", "--temperature", "0.9",
            "--top-k", "40", "--top-p", "0.95", "--repetition-penalty", "1.2", "--max-new-tokens", "6", "--stop",
            "xyz", "--stop", "\n\n", "--seed", "11", "--no-cache", "--root", str(tmp_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    expected_sampling = {"temperature": 0.9, "top_k": 40, "top_p": 0.95, "repetition_penalty": 1.2,
                         "max_new_tokens": 6, "n": 2, "stop": ["xyz", "\n\n"], "seed": 11, "use_cache": False}
    assert [(r["prompt_index"], r["prompt"], r["sample"]) for r in rows] == [
        (0, "The quick brown fox", 0), (0, "The quick brown fox", 1), (1, "이 영화 정말 좋아요.", 0),
        (1, "이 영화 정말 좋아요.", 1)]
    for row in rows:
        assert row["model_version"] == f"{folder}@{weights_sha256(folder)[:12]}"
        assert row["sampling"] == expected_sampling
        assert row["seed"] == sample_seed(11, row["prompt_index"], row["sample"])
        assert 1 <= row["new_tokens"] <= 6 and row["finish_reason"] in ("eos", "stop", "length")
    assert "4 rows" in result.output and "tokens/s" in result.output
    # the same command again writes the same bytes
    first = out.read_bytes()
    assert CliRunner().invoke(app, args).exit_code == 0 and out.read_bytes() == first


def test_the_cli_refuses_bad_values_and_writes_nothing(folder, tmp_path):
    from typer.testing import CliRunner

    from apps.cli import app

    out = tmp_path / "rows.jsonl"
    base = ["generate", str(folder), "--prompt", "hi", "--out", str(out), "--root", str(tmp_path)]
    for extra, message in ((["--top-p", "0"], "top_p must be in (0, 1], got 0.0"), (["--n", "0"], "n = 0"),
                           (["--prompts", str(tmp_path / "none.jsonl")], "give --prompt or --prompts, not both")):
        result = CliRunner().invoke(app, base + extra)
        assert result.exit_code == 2 and message in result.output, result.output
    assert not out.exists()

"""Serving the policy: the chat pyfunc by hand, then a micro policy registered by the real code path and served
by a real `mlflow models serve`, asked as people ask (chat messages, sampling params), answered as our generate
answers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import mlflow
import pytest
import requests
import torch
from conftest import free_port, sqlite_store
from helpers_tokenizer import make_test_tokenizer
from mlflow.exceptions import MlflowException
from transformers import LlamaConfig, LlamaForCausalLM

from models.generate import generate
from models.tokenizer import CHAT_TEMPLATE, encode_prompt, load_tokenizer
from tasks.registry import log_and_register
from tasks.serving import (
    DEFAULT_MAX_NEW_TOKENS,
    ChatPolicy,
    check_messages,
    sampling_params,
)

NAME = "test-policy"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "I really liked this movie."}]
POSITIONS = 64  # the micro policy's max_position_embeddings: prompt + answer must fit


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    """A micro random Llama and the test tokenizer with the project's chat template, saved as a stage saves them."""
    folder = tmp_path_factory.mktemp("serving") / "policy"
    tok = make_test_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=POSITIONS,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def ours(policy_dir):
    """The same model and tokenizer loaded here: what our own generate answers."""
    return LlamaForCausalLM.from_pretrained(policy_dir).eval(), load_tokenizer(policy_dir)


def our_answer(ours, messages=MESSAGES, max_new_tokens=DEFAULT_MAX_NEW_TOKENS, **sampling) -> dict:
    """What the served model must answer, from models.generate on the project's own prompt encoding."""
    model, tok = ours
    prompt = encode_prompt(tok, messages)
    new = generate(model, [prompt], min(max_new_tokens, POSITIONS - len(prompt)), tok.eos_token_id,
                   tok.pad_token_id, **sampling)[0]
    stopped = bool(new) and new[-1] == tok.eos_token_id
    return {"content": tok.decode(new[:-1] if stopped else new, skip_special_tokens=True),
            "finish_reason": "stop" if stopped else "length",
            "usage": {"prompt_tokens": len(prompt), "completion_tokens": len(new), "total_tokens": len(prompt) + len(new)}}


def answered(body: dict) -> dict:
    """The parts of a chat completion that must match `our_answer` (not its id or time)."""
    assert body["object"] == "chat.completion" and body["model"] == NAME
    [choice] = body["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    return {"content": choice["message"]["content"], "finish_reason": choice["finish_reason"], "usage": body["usage"]}


# ---------------------------------------------------------------------------------------------------
# Requests, checked by hand


def test_sampling_params_default_to_greedy_and_take_either_budget_name():
    assert sampling_params(None) == {"max_new_tokens": DEFAULT_MAX_NEW_TOKENS, "temperature": 0.0, "top_k": 0,
                                     "top_p": 1.0, "seed": None}
    # what MLflow hands over for a request that sent only max_tokens: the schema's defaults filled in
    assert sampling_params({"max_tokens": 7, "max_new_tokens": None, "temperature": 0.0, "seed": None,
                            "n": None, "stream": None, "stop": []})["max_new_tokens"] == 7
    assert sampling_params({"max_new_tokens": 5, "max_tokens": 5, "temperature": 0.5, "seed": 3}) == {
        "max_new_tokens": 5, "temperature": 0.5, "top_k": 0, "top_p": 1.0, "seed": 3}


@pytest.mark.parametrize("params, message", [
    ({"max_tokens": 4, "max_new_tokens": 5}, "max_tokens = 4 and max_new_tokens = 5 disagree"),
    ({"max_tokens": 0}, r"max_tokens = 0: expected an integer >= 1"),
    ({"temperature": -0.5}, r"temperature must be >= 0 \(0 = greedy\), got -0.5"),
    ({"top_k": -1}, r"top_k must be >= 0"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\], got 0.0"),
    ({"n": 2}, "n = 2: not supported by this model; send 1 or leave it out"),
    ({"stream": True}, "stream = True: not supported"),
    ({"stop": ["\n"]}, r"stop = \['\\n'\]: not supported"),
])
def test_bad_sampling_params_name_the_param(params, message):
    with pytest.raises(ValueError, match=message):
        sampling_params(params)


@pytest.mark.parametrize("messages, message", [
    ([], r"messages: expected a non-empty list"),
    ("hello", r"messages: expected a non-empty list"),
    ([{"role": "robot", "content": "hi"}], r"messages\[0\].role = 'robot': expected one of system, user, assistant"),
    ([{"role": "user", "content": "hi"}, {"role": "user", "content": 3}], r"messages\[1\].content: expected a string"),
    (["hi"], r"messages\[0\]: expected an object with 'role' and 'content'"),
])
def test_bad_messages_name_the_message(messages, message):
    with pytest.raises(ValueError, match=message):
        check_messages(messages)


def test_predict_is_our_greedy_generate_on_the_chat_template(ours):
    policy = ChatPolicy(*ours, name=NAME)
    # the tokenizer's Jinja template and the project's segment-by-segment encoding give the same prompt
    assert policy.prompt_ids(MESSAGES) == encode_prompt(ours[1], MESSAGES)

    assert answered(policy.predict({"messages": MESSAGES}, {"max_tokens": 9})) == our_answer(ours, max_new_tokens=9)
    # no params: greedy, up to the default budget cut to the positions left
    first = answered(policy.predict({"messages": MESSAGES}))
    assert first == our_answer(ours) and first["usage"]["total_tokens"] <= POSITIONS
    # sampled with a seed: the same draw as generate's with that seed
    sampled = answered(policy.predict({"messages": MESSAGES}, {"temperature": 1.0, "top_k": 50, "seed": 7}))
    assert sampled == our_answer(ours, temperature=1.0, top_k=50, seed=7)


def test_an_answer_ending_in_eos_stops_without_it(policy_dir):
    # given: the policy with the output rows of its first greedy token and of <|eos|> swapped, so greedy says eos first
    model, tok = LlamaForCausalLM.from_pretrained(policy_dir).eval(), load_tokenizer(policy_dir)
    first = generate(model, [encode_prompt(tok, MESSAGES)], 1, tok.eos_token_id, tok.pad_token_id)[0][0]
    rows = model.lm_head.weight.data
    rows[[first, tok.eos_token_id]] = rows[[tok.eos_token_id, first]]

    body = ChatPolicy(model, tok, name=NAME).predict({"messages": MESSAGES}, {"max_tokens": 5})
    assert answered(body) == {"content": "", "finish_reason": "stop",
                              "usage": {"prompt_tokens": 28, "completion_tokens": 1, "total_tokens": 29}}


def test_predict_answers_a_table_of_conversations_with_a_list(ours):
    import pandas as pd

    policy = ChatPolicy(*ours, name=NAME)
    other = [{"role": "user", "content": "This film was boring."}]
    answers = policy.predict(pd.DataFrame({"messages": [MESSAGES, other]}), {"max_new_tokens": 4})
    assert [answered(a) for a in answers] == [our_answer(ours, max_new_tokens=4), our_answer(ours, other, 4)]


def test_predict_refuses_bad_input_with_an_mlflow_400(ours):
    policy = ChatPolicy(*ours, name=NAME)
    with pytest.raises(MlflowException, match="temperature must be >= 0") as caught:
        policy.predict({"messages": MESSAGES}, {"temperature": -1.0})
    assert caught.value.get_http_status_code() == 400
    too_long = [{"role": "user", "content": "The quick brown fox jumps over the lazy dog. " * 6}]
    with pytest.raises(MlflowException, match=r"messages: the prompt is \d+ tokens; the model reads at most 64"):
        policy.predict({"messages": too_long})


# ---------------------------------------------------------------------------------------------------
# The registered policy, served by `mlflow models serve`


@pytest.fixture(scope="module")
def registered(policy_dir, tmp_path_factory):
    """The micro policy registered by `log_and_register` into a throwaway sqlite store; (tracking URI, version)."""
    with sqlite_store(tmp_path_factory.mktemp("serving-store"), "serving-tests") as (uri, experiment_id):
        with mlflow.start_run(experiment_id=experiment_id) as run:
            version = log_and_register(NAME, policy_dir, "text-generation", {"git_commit": "0123abcd"},
                                       {"exact_match": 0.5}, run_id=run.info.run_id)
        yield uri, version.version


@pytest.fixture(scope="module")
def server(registered, tmp_path_factory):
    """`mlflow models serve` on models:/test-policy/<version>, up until /ping answers; stopped afterwards."""
    uri, version = registered
    port = free_port()
    log_path = tmp_path_factory.mktemp("serving-log") / "serve.log"
    bin_dir = os.path.dirname(sys.executable)  # the venv's: `mlflow models serve` execs its `uvicorn` from PATH
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    command = [os.path.join(bin_dir, "mlflow"), "models", "serve", "-m",
               f"models:/{NAME}/{version}", "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1"]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if process.poll() is not None:
                pytest.fail(f"mlflow models serve exited {process.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow models serve did not answer /ping in 90 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        stop(process)


def stop(process: subprocess.Popen) -> None:
    """SIGTERM to the server's own process group (the server and its workers), SIGKILL after 30 s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:  # the group is gone already
            break
        try:
            process.wait(timeout=30)
            break
        except subprocess.TimeoutExpired:
            continue
    process.wait()


def ask(server: str, payload: dict) -> requests.Response:
    return requests.post(f"{server}/invocations", json=payload, timeout=60)


def test_served_chat_is_our_greedy_generate(server, ours):
    response = ask(server, {"messages": MESSAGES, "max_tokens": 10})
    assert response.status_code == 200, response.text
    assert answered(response.json()) == our_answer(ours, max_new_tokens=10)


def test_three_identical_requests_get_one_answer(server, ours):
    bodies = [ask(server, {"messages": MESSAGES}).json() for _ in range(3)]
    assert [answered(body) for body in bodies] == [our_answer(ours)] * 3  # greedy by default
    sampled = [ask(server, {"messages": MESSAGES, "temperature": 1.0, "seed": 11, "max_tokens": 8}).json()
               for _ in range(2)]
    assert [answered(body) for body in sampled] == [our_answer(ours, max_new_tokens=8, temperature=1.0, seed=11)] * 2


def test_served_max_new_tokens_is_respected_in_mlflows_own_format(server, ours):
    response = ask(server, {"inputs": {"messages": MESSAGES}, "params": {"max_new_tokens": 3}})
    assert response.status_code == 200, response.text
    answer = answered(response.json()["predictions"])
    assert answer == our_answer(ours, max_new_tokens=3) and answer["usage"]["completion_tokens"] <= 3


@pytest.mark.parametrize("payload, message", [
    ({"messages": MESSAGES, "temperature": -1}, "temperature must be >= 0 (0 = greedy), got -1.0"),
    ({"messages": MESSAGES, "temperature": "hot"}, "temperature"),
    ({"messages": MESSAGES, "n": 3}, "n = 3: not supported by this model"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role = 'robot': expected one of"),
    ({"messages": [{"role": "user"}]}, "Missing required properties: {'content'}"),
])
def test_served_bad_input_is_a_400_with_its_reason(server, payload, message):
    response = ask(server, payload)
    assert response.status_code == 400, response.text
    assert message in response.json()["message"]
    assert requests.get(f"{server}/ping", timeout=5).status_code == 200  # and the server is still up

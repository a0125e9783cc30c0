"""The policy as `mlflow models serve` serves it: chat messages in, our chat template and our generate, greedy
unless asked otherwise, an OpenAI-style chat completion out.

MLflow's own options fall short: the transformers flavor's `text-generation` pyfunc takes a raw string, no
params schema and no chat template, and samples as the saved generation_config says; its `llm/v1/chat` task
applies the template but generates through the Hugging Face pipeline (greedy only while generation_config
says so, `temperature` ignored unless `do_sample` is sent too, no seed); `ChatModel` defaults temperature to
1.0. So the policy is logged with two flavors (`log_chat_model`):

- `transformers`, exactly as `mlflow.transformers.log_model` writes it: `mlflow.transformers.load_model`, the
  `model/` and `components/tokenizer/` folders and the pinned requirements stay as they were;
- `python_function`, pointing at this file, shipped with the model as the top-level module `serving` beside
  copies of `models/` and `instructflow/` (what `models.generate` imports), with a signature whose input is
  `messages` and whose params schema holds the sampling knobs (`SIGNATURE`).

Served requests (`POST /invocations`, JSON):

    {"messages": [{"role": "user", "content": "..."}], "max_tokens": 32, "temperature": 0.7, "seed": 1}
    {"inputs": {"messages": [...]}, "params": {"max_new_tokens": 32}}

`max_tokens` (OpenAI's name) or `max_new_tokens` (default 128, cut to the model's positions left), `temperature`
(default 0: greedy, token for token what `models.generate.generate` gives), `top_k` (0: off), `top_p` (1: off),
`seed` (a sampled answer repeats with the same seed). A bad value answers 400 naming the param and what it
takes. The answer: `{"object": "chat.completion", "choices": [{"message": {"role": "assistant", "content":
...}, "finish_reason": "stop" | "length"}], "usage": {...}, ...}` (a list of them for a `dataframe_records`
batch of conversations).

This module imports nothing from `tasks` (it runs alone in the server) and MLflow only here, not in `models/`.
"""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.types.llm import CHAT_MODEL_OUTPUT_SCHEMA
from mlflow.types.schema import Array, ColSpec, DataType, Object, ParamSchema, ParamSpec, Property, Schema

from models.generate import check_sampling, generate
from models.tokenizer import ROLES, load_tokenizer

DEFAULT_MAX_NEW_TOKENS = 128
UNSUPPORTED = {"n": 1, "stream": False, "stop": []}  # OpenAI params taken only at these values

SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec(Array(Object([Property("role", DataType.string), Property("content", DataType.string)])),
                           name="messages")]),
    outputs=CHAT_MODEL_OUTPUT_SCHEMA,
    params=ParamSchema([
        ParamSpec("max_tokens", DataType.long, None),
        ParamSpec("max_new_tokens", DataType.long, None),
        ParamSpec("temperature", DataType.double, 0.0),
        ParamSpec("top_k", DataType.long, 0),
        ParamSpec("top_p", DataType.double, 1.0),
        ParamSpec("seed", DataType.long, None),
        # OpenAI's names for what this model does not do: refused with a message, not silently ignored
        ParamSpec("n", DataType.long, None),
        ParamSpec("stream", DataType.boolean, None),
        ParamSpec("stop", DataType.string, [], shape=(-1,)),
    ]),
)

# shipped with the model: this file as the module `serving`, and the packages `models.generate` imports
_PROJECT = Path(__file__).resolve().parents[1]
CODE_PATHS = (str(Path(__file__).resolve()), str(_PROJECT / "models"), str(_PROJECT / "instructflow"))
LOADER_MODULE = Path(__file__).stem


# --------------------------------------------------------------------------------------------------
# Requests: checked before anything runs


def sampling_params(params: dict[str, Any] | None) -> dict[str, Any]:
    """The knobs of `generate` from a request's params; ValueError naming the param and what it takes.

    Missing or None params take their defaults (greedy, DEFAULT_MAX_NEW_TOKENS). `max_tokens` and
    `max_new_tokens` are one knob under two names: given both, they must agree.
    """
    params = {key: value for key, value in (params or {}).items() if value is not None}
    for key, allowed in UNSUPPORTED.items():
        if key in params and params[key] != allowed:
            raise ValueError(f"{key} = {params[key]!r}: not supported by this model; send {allowed!r} or leave it out")
    budgets = {params[key] for key in ("max_tokens", "max_new_tokens") if key in params}
    if len(budgets) > 1:
        raise ValueError(f"max_tokens = {params['max_tokens']} and max_new_tokens = {params['max_new_tokens']} "
                         "disagree; send one of them")
    max_new_tokens = budgets.pop() if budgets else DEFAULT_MAX_NEW_TOKENS
    if not max_new_tokens >= 1:
        raise ValueError(f"max_tokens = {max_new_tokens}: expected an integer >= 1")
    sampling = {"max_new_tokens": int(max_new_tokens), "temperature": float(params.get("temperature", 0.0)),
                "top_k": int(params.get("top_k", 0)), "top_p": float(params.get("top_p", 1.0)),
                "seed": None if params.get("seed") is None else int(params["seed"])}
    check_sampling(sampling["temperature"], sampling["top_k"], sampling["top_p"])  # before any generation
    return sampling


def check_messages(messages: Any, where: str = "messages") -> list[dict[str, str]]:
    """A conversation as a list of {role, content}; ValueError naming the message and the field."""
    if isinstance(messages, str | dict) or not isinstance(messages, Iterable) or not (messages := list(messages)):
        raise ValueError(f"{where}: expected a non-empty list of {{'role', 'content'}} objects, got {messages!r:.80}")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"{where}[{i}]: expected an object with 'role' and 'content', got {message!r:.80}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ValueError(f"{where}[{i}].role = {role!r}: expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ValueError(f"{where}[{i}].content: expected a string, got {content!r:.80}")
        checked.append({"role": role, "content": content})
    return checked


# --------------------------------------------------------------------------------------------------
# The served model


class ChatPolicy:
    """A causal LM and its tokenizer answering chat conversations; `predict` is what the server calls."""

    def __init__(self, model: torch.nn.Module, tokenizer, name: str = "instructflow-policy"):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.max_positions = int(model.config.max_position_embeddings)

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """The conversation through the tokenizer's chat template, ready for the assistant's answer."""
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def complete(self, messages: list[dict[str, str]], max_new_tokens: int, **sampling) -> dict[str, Any]:
        """One chat completion: greedy or sampled as `sampling` says, at most max_new_tokens new tokens."""
        ids = self.prompt_ids(messages)
        room = self.max_positions - len(ids)
        if room < 1:
            raise ValueError(f"messages: the prompt is {len(ids)} tokens; the model reads at most "
                             f"{self.max_positions}, answer included")
        tok = self.tokenizer
        new = generate(self.model, [ids], min(max_new_tokens, room), tok.eos_token_id, tok.pad_token_id,
                       **sampling)[0]
        stopped = bool(new) and new[-1] == tok.eos_token_id
        text = tok.decode(new[:-1] if stopped else new, skip_special_tokens=True)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "stop" if stopped else "length"}],
            "usage": {"prompt_tokens": len(ids), "completion_tokens": len(new), "total_tokens": len(ids) + len(new)},
        }

    def predict(self, data: Any, params: dict[str, Any] | None = None) -> dict | list[dict]:
        """The completion of one conversation, or a list of completions for several (a table of `messages`).

        `data` is what MLflow hands over after checking it against SIGNATURE: a DataFrame with a `messages`
        column (a request's one conversation is a one-row table), or a dict {"messages": [...]} when called
        directly. Bad input raises MlflowException INVALID_PARAMETER_VALUE: the server answers 400 with its message.
        """
        try:
            sampling = sampling_params(params)
            conversations = [data.get("messages")] if isinstance(data, dict) else list(data["messages"])
            where = "messages" if len(conversations) == 1 else "row {}: messages"
            answers = [self.complete(check_messages(messages, where.format(i)), **sampling)
                       for i, messages in enumerate(conversations)]
        except (ValueError, KeyError, TypeError) as error:
            raise MlflowException.invalid_parameter_value(str(error)) from error
        return answers[0] if len(answers) == 1 else answers


def _load_pyfunc(path: str, model_config: dict | None = None) -> ChatPolicy:
    """MLflow's entry point (`loader_module`): the model folder the transformers flavor wrote under `path`."""
    from transformers import AutoModelForCausalLM

    root = Path(path)
    model = AutoModelForCausalLM.from_pretrained(root / "model")
    if torch.cuda.is_available():
        model = model.to("cuda")
    name = (model_config or {}).get("name", "instructflow-policy")
    return ChatPolicy(model, load_tokenizer(root / "components" / "tokenizer"), name)


# --------------------------------------------------------------------------------------------------
# Logging: the transformers flavor, then our pyfunc flavor over it


def save_model(path: str, mlflow_model: Model, served_name: str, **kwargs) -> None:
    """`mlflow.transformers.save_model`, then the python_function flavor and the signature replaced by ours;
    `served_name` is the `model` field of the answers."""
    import mlflow.transformers
    from mlflow import pyfunc

    mlflow.transformers.save_model(path=path, mlflow_model=mlflow_model, code_paths=list(CODE_PATHS), **kwargs)
    conf = mlflow_model.flavors[pyfunc.FLAVOR_NAME]
    conf[pyfunc.MAIN] = LOADER_MODULE
    conf.pop(pyfunc.DATA, None)  # `_load_pyfunc` gets the model's root folder
    conf[pyfunc.MODEL_CONFIG] = {"name": served_name}
    mlflow_model.signature = SIGNATURE
    mlflow_model.save(str(Path(path) / "MLmodel"))


def log_chat_model(served_name: str, **kwargs):
    """`mlflow.transformers.log_model`'s arguments, logged with `save_model` (the chat pyfunc flavor)."""
    return Model.log(artifact_path=None, flavor=sys.modules[__name__], flavor_name="transformers",
                     served_name=served_name, **kwargs)

"""`pretrain.base_model`: tokenizer and pretrain take a base model instead of training one.

One micro project is prepared, tokenized and pretrained once (its artifacts/pretrain is the base folder "an
earlier pretrain run produced"); forks of it that link its prepared data run the tokenizer and pretrain bodies
with a base: a folder, a foreign tokenizer that lacks the chat format, and a registry alias in a throwaway
sqlite MLflow store. Checked: no training step, the base's weights kept, what the tokenizer gained, the
refusals and their reasons, dvc.yaml's deps and the lineage tags.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest
import torch
import yaml
from conftest import FakeRun, copy_project, sqlite_store
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import tasks.prepare
import tasks.pretrain
import tasks.sft
import tasks.tokenizer
from instructflow import stages
from instructflow.config import load_params
from instructflow.errors import ConfigError
from instructflow.stages import BASE_RESOLUTION, BY_NAME, ROOT, base_model_deps, stage_entry
from models.base import fit_tokenizer
from models.encoder import encoder_tokenizer
from models.tokenizer import CHAT_TEMPLATE, encode_chat, load_tokenizer
from tasks import base_model, registry
from tasks.register import lineage
from tasks.runtime import seed_everything

NAME = "base-policy"


pytestmark = pytest.mark.usefixtures("one_thread")


def run_body(stage, params, root: Path) -> dict:
    seed_everything(params.seed)
    return stage.body(params, root, FakeRun())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """prepare -> tokenizer -> pretrain (trained here) on micro: its artifacts/pretrain is the base folder."""
    root = copy_project(tmp_path_factory.mktemp("trained"), "micro")
    params = load_params(root / "params.yaml")
    metrics = {name: run_body(stage, params, root)
               for name, stage in (("prepare", tasks.prepare), ("tokenizer", tasks.tokenizer), ("pretrain", tasks.pretrain))}
    return SimpleNamespace(root=root, params=params, metrics=metrics, base=root / "artifacts" / "pretrain")


def fork(trained, dest: Path, base: str) -> SimpleNamespace:
    """A project that links the trained one's prepared data, with pretrain.base_model = base."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(trained.root / "params.yaml", dest / "params.yaml")
    (dest / "data").mkdir()
    (dest / "data" / "prepared").symlink_to(trained.root / "data" / "prepared", target_is_directory=True)
    return SimpleNamespace(root=dest, params=load_params(dest / "params.yaml", [f"pretrain.base_model={base}"]))


def untrainable(monkeypatch):
    """Any training step fails the test: the base-model path must not train."""
    def refuse(*args, **kwargs):
        raise AssertionError("pretrain trained although pretrain.base_model is set")
    monkeypatch.setattr(tasks.pretrain, "train", refuse)


def state(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


# --- a folder an earlier pretrain run produced ----------------------------------------------------


@pytest.fixture(scope="module")
def from_folder(trained, tmp_path_factory):
    project = fork(trained, tmp_path_factory.mktemp("from-folder"), str(trained.base))
    with pytest.MonkeyPatch.context() as mp:
        untrainable(mp)
        project.metrics = {name: run_body(stage, project.params, project.root)
                           for name, stage in (("tokenizer", tasks.tokenizer), ("pretrain", tasks.pretrain))}
    return project


def test_a_base_folder_is_taken_as_it_is_without_training(trained, from_folder):
    out = from_folder.root / "artifacts"
    tok_metrics, metrics = from_folder.metrics["tokenizer"], from_folder.metrics["pretrain"]
    # the tokenizer of a model made here has the whole chat format: nothing added, its template kept
    assert load_tokenizer(out / "tokenizer").get_vocab() == load_tokenizer(trained.base).get_vocab()
    assert (tok_metrics["added_tokens"], tok_metrics["added_chat_template"], tok_metrics["replaced_chat_template"]) == (0, 0, 0)
    assert json.loads((out / "tokenizer" / "base_model.json").read_text()) == {
        "base_model": str(trained.base), "base_vocab_size": 400, "added_tokens": [], "chat_template": "kept"}
    # the weights are the base's, bit for bit; the held-out loss is the one the trained run measured
    before, after = state(trained.base), state(out / "pretrain")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert metrics["trained"] == 0 and metrics["train_tokens"] == 0
    assert metrics["base_params"] == metrics["n_params"] == trained.metrics["pretrain"]["n_params"]
    assert metrics["eval_loss"] == pytest.approx(trained.metrics["pretrain"]["eval_loss"], abs=1e-5)
    assert not (out / "pretrain" / "history.csv").exists()
    assert json.loads((out / "pretrain" / "base_model.json").read_text()) == {
        "base_model": str(trained.base), "weights_sha256": registry.weights_sha256(trained.base)}


def test_lora_sft_runs_on_the_base_and_the_lineage_names_it(trained, from_folder):
    root = from_folder.root
    params = load_params(root / "params.yaml", [f"pretrain.base_model={trained.base}", "sft.method=lora",
                                                "sft.max_steps=2"])
    metrics = run_body(tasks.sft, params, root)
    assert 0 < metrics["trainable_params"] and (root / "artifacts" / "sft" / "model.safetensors").is_file()

    (root / "dvc.lock").write_text(yaml.safe_dump({"stages": {
        "prepare": {"outs": [{"path": "data/prepared", "md5": "d0.dir"}]},
        "pretrain": {"deps": [{"path": str(trained.base), "md5": "b1.dir"}, {"path": "data/prepared", "md5": "d0.dir"}]}}}))
    tags = lineage(params, root, ["prepare", "tokenizer", "pretrain", "sft"])
    assert tags["base_model"] == str(trained.base)
    assert tags["base_model.weights_sha256"] == registry.weights_sha256(trained.base)
    assert tags["base_model.dvc_md5"] == "b1.dir"
    assert "base_model" not in lineage(params, root, ["prepare", "tokenizer"])  # no pretrain behind it: no base


def test_dvc_yaml_makes_the_base_a_dep_of_tokenizer_and_pretrain_only(monkeypatch):
    monkeypatch.setattr(stages, "code_deps", lambda module, root=ROOT: [])  # the data deps alone

    def deps(name: str, base: str | None) -> list[str]:
        return stage_entry(BY_NAME[name], ROOT, [], base_model_deps(base))["deps"]

    for base, dep in (("models/my-base", "models/my-base"), ("models:/instructflow-policy@champion", BASE_RESOLUTION),
                      ("/abs/base", "/abs/base")):
        assert deps("tokenizer", base) == ["data/prepared", dep]
        assert deps("pretrain", base) == ["artifacts/tokenizer", "data/prepared", dep]
        assert deps("sft", base) == ["artifacts/pretrain", "data/prepared"]
        assert deps("prepare", base) == ["data/raw"]
    assert deps("tokenizer", None) == ["data/prepared"] and deps("pretrain", None) == ["artifacts/tokenizer", "data/prepared"]
    assert "pretrain.base_model" in stage_entry(BY_NAME["tokenizer"], ROOT)["params"]  # setting it reruns the tokenizer


# --- a base whose tokenizer lacks the chat format ---------------------------------------------------


def gpt2_like(folder: Path) -> Path:
    """A byte-level BPE with only <|endoftext|> (bos = eos, no pad, no template) and a tiny Llama over it."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(["Translate to English: 사과 apple, 배 pear.", "The quick brown fox."] * 5,
                             trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                                 initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                  clean_up_tokenization_spaces=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=32, max_position_embeddings=256, tie_word_embeddings=False))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_a_foreign_tokenizer_gets_the_chat_format_and_the_model_its_rows(trained, tmp_path, monkeypatch):
    base = gpt2_like(tmp_path / "gpt2-like")
    project = fork(trained, tmp_path / "project", str(base))
    untrainable(monkeypatch)
    metrics = run_body(tasks.tokenizer, project.params, project.root)
    added = ["<|pad|>", "[CLS]", "[SEP]", "[MASK]", "<|system|>", "<|user|>", "<|assistant|>"]
    assert json.loads((project.root / "artifacts" / "tokenizer" / "base_model.json").read_text())["added_tokens"] == added
    assert (metrics["added_tokens"], metrics["added_pad_token"], metrics["added_eos_token"],
            metrics["added_chat_template"]) == (7, 1, 0, 1)
    assert metrics["vocab_size"] == metrics["base_vocab_size"] + 7

    tok = load_tokenizer(project.root / "artifacts" / "tokenizer")
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|endoftext|>", "<|endoftext|>", "<|pad|>")
    messages = [{"role": "user", "content": "Translate to English: 사과"}, {"role": "assistant", "content": "apple"}]
    ids, _ = encode_chat(tok, messages)
    assert ids == tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids[:2]) == ["<|endoftext|>", "<|user|>"]
    framed = encoder_tokenizer(tok, 16)  # the encoder track (mlm) frames its inputs with the added [CLS] / [SEP]
    framed_ids = framed("apple")["input_ids"]
    assert framed.convert_ids_to_tokens([framed_ids[0], framed_ids[-1]]) == ["[CLS]", "[SEP]"]

    pretrain = run_body(tasks.pretrain, project.params, project.root)
    before, after = state(base), state(project.root / "artifacts" / "pretrain")
    n = metrics["base_vocab_size"]
    for key in ("model.embed_tokens.weight", "lm_head.weight"):  # the base's rows kept, one new row per added token
        assert after[key].shape[0] == n + 7 and torch.equal(after[key][:n], before[key])
    assert all(torch.equal(before[k], after[k]) for k in before if k not in ("model.embed_tokens.weight", "lm_head.weight"))
    assert pretrain["trained"] == 0 and pretrain["n_params"] == sum(v.numel() for v in after.values())


def test_a_different_chat_template_is_replaced_and_said_so(trained):
    tok = load_tokenizer(trained.base)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert fit_tokenizer(tok) == {"tokens": [], "chat_template": "replaced"}
    assert tok.chat_template == CHAT_TEMPLATE


def test_a_tokenizer_that_encodes_each_segment_apart_is_refused():
    """SentencePiece-style Metaspace adds '▁' at the start of every call: training's ids would not be served."""
    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
    core.decoder = decoders.Metaspace(prepend_scheme="always")
    core.train_from_iterator(["Translate to English: 사과 apple, 배 pear. Answer briefly. And"] * 5,
                             trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    with pytest.raises(ConfigError, match=r"encodes the chat format differently segment by segment than the whole "
                                          r"rendered conversation \(first difference at token 22: \['▁ap', 'p', 'l'\] vs "
                                          r"\['ap', 'p', 'l'\]\); expected a byte-level BPE tokenizer"):
        fit_tokenizer(tok)


# --- refusals -----------------------------------------------------------------------------------------


def _no_config(d: Path) -> None:
    (d / "config.json").unlink()


def _no_weights(d: Path) -> None:
    (d / "model.safetensors").unlink()


def _auto_map(d: Path) -> None:
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}}))


def _custom_code(d: Path) -> None:
    (d / "modeling_x.py").write_text("raise SystemExit('never run')\n")


def _seq2seq(d: Path) -> None:
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "model_type": "t5"}))


@pytest.mark.parametrize("spoil, reason", [
    (_no_config, "no config.json; expected a Hugging Face model folder"),
    (_no_weights, "no weight files; expected files ending in .safetensors, .bin"),
    (_auto_map, "needs trust_remote_code (auto_map in config.json); instructflow runs no code from a model folder"),
    (_custom_code, "needs trust_remote_code (custom code file modeling_x.py)"),
    (_seq2seq, "model_type 't5' in config.json does not load with AutoModelForCausalLM"),
])
def test_a_bad_base_folder_is_refused_with_its_reason(trained, tmp_path, spoil, reason):
    base = tmp_path / "base"
    shutil.copytree(trained.base, base)
    spoil(base)
    project = fork(trained, tmp_path / "project", str(base))
    with pytest.raises(ConfigError) as exc:
        run_body(tasks.tokenizer, project.params, project.root)
    assert str(exc.value).startswith(f"pretrain.base_model = {base}: {reason}")
    assert not (project.root / "artifacts").exists()  # nothing written


def test_a_missing_folder_and_a_hub_name_are_refused(trained, tmp_path):
    with pytest.raises(ConfigError, match=r"pretrain.base_model = nowhere \(.*nowhere\): no such folder"):
        base_model.prepare_base_model(tmp_path, load_params(trained.root / "params.yaml", ["pretrain.base_model=nowhere"]))
    with pytest.raises(ConfigError, match="download a hub model first"):
        load_params(trained.root / "params.yaml", ["pretrain.base_model=hf://HuggingFaceTB/SmolLM2-135M"])
    with pytest.raises(ConfigError, match="expected models:/<name>@<alias> or models:/<name>/<version>"):
        load_params(trained.root / "params.yaml", ["pretrain.base_model=models:/instructflow-policy"])


# --- a registry alias -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(trained, tmp_path_factory):
    """The trained micro model registered as base-policy v1 @champion in a throwaway sqlite store."""
    with sqlite_store(tmp_path_factory.mktemp("store"), "base-tests") as (uri, experiment):
        with mlflow.start_run(experiment_id=experiment) as run:
            version = registry.log_and_register(NAME, trained.base, "text-generation", {}, {}, run_id=run.info.run_id)
        mlflow.MlflowClient().set_registered_model_alias(NAME, "champion", version.version)
        yield SimpleNamespace(uri=uri, experiment=experiment, run_id=run.info.run_id)


def test_a_registry_alias_resolves_to_its_version_and_the_lineage_names_it(trained, store, tmp_path, monkeypatch):
    project = fork(trained, tmp_path, f"models:/{NAME}@champion")
    base_model.prepare_base_model(project.root, project.params)  # what `instructflow run` does before DVC
    record = json.loads((project.root / BASE_RESOLUTION).read_text())
    assert record == {"uri": f"models:/{NAME}@champion", "name": NAME, "version": 1, "run_id": store.run_id,
                      "weights_sha256": registry.weights_sha256(trained.base)}
    untrainable(monkeypatch)
    run_body(tasks.tokenizer, project.params, project.root)
    metrics = run_body(tasks.pretrain, project.params, project.root)
    assert metrics["trained"] == 0
    assert (project.root / ".cache" / "base_models" / NAME / "1" / "model" / "model.safetensors").is_file()
    before, after = state(trained.base), state(project.root / "artifacts" / "pretrain")
    assert all(torch.equal(before[k], after[k]) for k in before)

    (project.root / "dvc.lock").write_text(yaml.safe_dump({"stages": {
        "prepare": {"outs": [{"path": "data/prepared", "md5": "d0.dir"}]}}}))
    tags = lineage(project.params, project.root, ["prepare", "tokenizer", "pretrain"])
    assert {k: v for k, v in tags.items() if k.startswith("base_model")} == {
        "base_model": f"models:/{NAME}@champion", "base_model.name": NAME, "base_model.version": "1",
        "base_model.run_id": store.run_id, "base_model.weights_sha256": record["weights_sha256"]}


def test_a_moved_alias_changes_the_recorded_version(trained, store, tmp_path):
    project = fork(trained, tmp_path, f"models:/{NAME}@moving")
    client = mlflow.MlflowClient()
    client.set_registered_model_alias(NAME, "moving", "1")
    base_model.prepare_base_model(project.root, project.params)
    first = (project.root / BASE_RESOLUTION).read_bytes()
    base_model.prepare_base_model(project.root, project.params)  # nothing moved: the file (its DVC hash) stays
    assert (project.root / BASE_RESOLUTION).read_bytes() == first
    with mlflow.start_run(experiment_id=store.experiment) as run:  # v2: the same weights, another version
        client.create_model_version(NAME, f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    client.set_registered_model_alias(NAME, "moving", "2")
    base_model.prepare_base_model(project.root, project.params)
    assert json.loads((project.root / BASE_RESOLUTION).read_text())["version"] == 2


@pytest.mark.parametrize("uri, message", [
    (f"models:/{NAME}@nope", f"pretrain.base_model = models:/{NAME}@nope: {NAME} has no alias 'nope'; its aliases: @champion -> 1"),
    (f"models:/{NAME}/9", f"pretrain.base_model = models:/{NAME}/9: {NAME} has no version 9; its aliases: @champion -> 1"),
    ("models:/missing@champion", "pretrain.base_model = models:/missing@champion: no registered model named 'missing'"),
])
def test_a_registry_uri_that_does_not_resolve_is_refused(trained, store, tmp_path, uri, message):
    project = fork(trained, tmp_path, uri)
    with pytest.raises(ConfigError) as exc:
        base_model.prepare_base_model(project.root, project.params)
    assert str(exc.value).startswith(message)
    assert f"registered: {NAME}" in str(exc.value) if "missing" in uri else "its versions: 1" in str(exc.value)
    assert not (project.root / BASE_RESOLUTION).exists()

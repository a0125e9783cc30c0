"""Device placement check: every pass that runs a model runs it where train() would, with its inputs there.

Builds a tiny Llama decoder and a reward model (the same architecture with a scalar head) on the CPU, as
`from_pretrained` hands them over, then runs what the stages run: evaluate's passes (perplexity, greedy and
sampled generation with and without the KV cache, the KL log-probs, the Judge, pairwise reward accuracy),
align's frozen-reference log-probs, reward's held-out pass, and one training step of each model through
`models.training.train`. Forward hooks record the device of every tensor each model is called with and of the
logits it returns; every one, and every model, must be on `pick_device()`: cuda on a GPU worker. Without a GPU
it says so and checks the same placement on the CPU.

    .venv/bin/python bench/device_check.py

It prints one line per check and stops with an AssertionError at the first tensor found elsewhere. About ten
seconds on a CPU; tests/test_device.py checks the same passes without a GPU on the "meta" device.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import LlamaForSequenceClassification  # noqa: E402

from models.decoder import build_decoder, collate_lm, collate_pairs, lm_eval_loss, lm_step  # noqa: E402
from models.generate import generate, sequence_logprobs_of  # noqa: E402
from models.tokenizer import chat_example, encode_prompt, preference_example, train_tokenizer  # noqa: E402
from models.training import LoopSettings, for_inference, model_device, pick_device, train  # noqa: E402
from tasks.align import add_reference_logps  # noqa: E402
from tasks.evaluate import Judge, pair_outcomes  # noqa: E402
from tasks.reward import pairwise_eval, reward_step  # noqa: E402

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A small model trained on a laptop, step by step.",
    "What is two plus two? Two plus two is four.",
    "Name a colour of the sky. The sky is blue.",
]
CHATS = [[{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "Four."}],
         [{"role": "user", "content": "Name a colour of the sky."}, {"role": "assistant", "content": "Blue."}]]
PAIRS = [{"prompt": chat[:1], "chosen": chat[1]["content"], "rejected": "I do not know."} for chat in CHATS]


class Watch:
    """Forward hooks on a model: the device of every tensor it is called with and of every logits tensor it returns."""

    def __init__(self, model: torch.nn.Module):
        self.seen: list[str] = []  # "input_ids@cuda:0", ...
        model.register_forward_pre_hook(self._inputs, with_kwargs=True)
        model.register_forward_hook(self._outputs)

    def _inputs(self, module, args, kwargs):
        self.seen += [f"arg{i}@{t.device}" for i, t in enumerate(args) if isinstance(t, torch.Tensor)]
        self.seen += [f"{k}@{t.device}" for k, t in kwargs.items() if isinstance(t, torch.Tensor)]

    def _outputs(self, module, args, output):
        self.seen.append(f"logits@{output.logits.device}")


def check(name: str, model: torch.nn.Module, watch: Watch, run, want: torch.device) -> None:
    """Run one pass; the model and everything its hooks saw must be on `want` (the device type: cuda:0 is cuda)."""
    watch.seen.clear()
    run()
    where = model_device(model)
    assert where.type == want.type, f"{name}: the model is on {where}, not {want}"
    assert watch.seen, f"{name}: the model was never called"
    elsewhere = [s for s in watch.seen if s.split("@")[1].split(":")[0] != want.type]
    assert not elsewhere, f"{name}: {len(elsewhere)} tensors not on {want}: {sorted(set(elsewhere))}"
    names = sorted({s.split("@")[0] for s in watch.seen})
    print(f"ok  {name:<50} model on {where}; {len(watch.seen)} tensors ({', '.join(names)}) on {want.type}")


def main() -> None:
    want = pick_device()
    if want.type == "cuda":
        print(f"GPU present ({torch.cuda.get_device_name()}): every model and tensor must be on cuda")
    else:
        print("no GPU present: checking that every model and tensor is on the CPU, where pick_device() puts them")

    tok = train_tokenizer(CORPUS * 4, vocab_size=320)
    sizes = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64, "max_position_embeddings": 128}

    def decoder() -> torch.nn.Module:
        torch.manual_seed(0)
        return build_decoder(tok, **sizes)  # on the CPU, as from_pretrained loads it

    def reward_model() -> torch.nn.Module:
        config = decoder().config
        config.num_labels = 1
        return LlamaForSequenceClassification(config)

    examples = [chat_example(tok, chat, 64) for chat in CHATS]
    pairs = [preference_example(tok, row, 64) for row in PAIRS]
    prompts = [encode_prompt(tok, chat[:1]) for chat in CHATS]
    limits = {"max_new_tokens": 6, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}

    # evaluate: the models as the stage loads them, then each of its passes
    policy, judge_model = for_inference(decoder()), for_inference(reward_model())
    watch, judge_watch = Watch(policy), Watch(judge_model)
    lm_batches = [collate_lm(examples, tok.pad_token_id)]
    check("evaluate: perplexity (lm_eval_loss)", policy, watch, lambda: lm_eval_loss(policy, lm_batches), want)
    for use_cache in (True, False):
        check(f"evaluate: greedy generation, use_cache={use_cache}", policy, watch,
              partial(generate, policy, prompts, use_cache=use_cache, **limits), want)
        check(f"evaluate: sampled generation, use_cache={use_cache}", policy, watch,
              partial(generate, policy, prompts, temperature=1.0, top_k=20, top_p=0.9, seed=1, use_cache=use_cache,
                      **limits), want)
    completions = generate(policy, prompts, temperature=1.0, seed=2, **limits)
    check("evaluate: KL log-probs (sequence_logprobs_of)", policy, watch,
          lambda: sequence_logprobs_of(policy, prompts, completions), want)
    judge = Judge(judge_model, tok, max_length=64, batch_size=2)
    check("evaluate: Judge", judge_model, judge_watch,
          lambda: judge([chat[:1] for chat in CHATS], ["Four.", "Blue."]), want)
    check("evaluate: reward accuracy (pair_outcomes)", judge_model, judge_watch,
          lambda: pair_outcomes(judge_model, pairs, tok.pad_token_id, batch_size=2), want)
    check("reward: held-out pass (pairwise_eval)", judge_model, judge_watch,
          lambda: pairwise_eval(judge_model, [collate_pairs(pairs, tok.pad_token_id)]), want)

    # align: the frozen reference
    reference = for_inference(decoder())
    reference_watch = Watch(reference)
    check("align: reference log-probs (add_reference_logps)", reference, reference_watch,
          lambda: add_reference_logps(reference, pairs, partial(collate_pairs, pad_id=tok.pad_token_id), 2), want)

    # one optimiser step of each model through the shared loop, starting from a model on the CPU
    one_step = LoopSettings(batch_size=2, max_steps=1, lr=1e-3, bf16="auto")
    for name, model, data, collate, step in (
            ("train: one SFT step (lm_step)", decoder(), examples, collate_lm, lm_step),
            ("train: one reward step (reward_step)", reward_model(), pairs, collate_pairs, reward_step)):
        check(name, model, Watch(model), partial(train, model, data, partial(collate, pad_id=tok.pad_token_id), step,
                                                  one_step), want)

    print(f"all placement checks passed on {want.type}")


if __name__ == "__main__":
    main()

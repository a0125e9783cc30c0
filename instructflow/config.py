"""params.yaml, validated: one pydantic model per stage section, strict and frozen.

Resolution order (later wins): field defaults < the preset's sizes (presets.yaml) < params.yaml.
Unknown keys and bad values fail before any work, naming the file, line, key, value and what is allowed.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import io
import json
import re
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from instructflow.errors import ConfigError

PRESETS_FILE = Path(__file__).with_name("presets.yaml")
PRESET_NAMES = ("micro", "tiny", "small")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


# ---------------------------------------------------------------------------------------------- prepare
class SyntheticConfig(Section):
    n_train: int = Field(2000, ge=0, description="synthetic tasks for training (SFT rows, preference pairs)")
    n_eval: int = Field(200, ge=1, description="held-out synthetic tasks: exact-match accuracy is measured on them")
    kinds: list[Literal["translate", "rename", "arithmetic"]] = Field(
        ["translate", "rename", "arithmetic"], min_length=1, description="task kinds to generate")
    multitask_train: int = Field(200, ge=0, description="built-in multi-task records (one translate, rename and "
                                 "arithmetic item each, none a held-out task's) for training (with prepare.demo)")
    multitask_eval: int = Field(100, ge=0, description="held-out built-in multi-task records (evaluate: per-task "
                                "exact match and all-N-correct under sft.multitask)")


class SourceConfig(Section):
    path: str = Field(description="data file or folder (its supported files), relative to the project root")
    role: Literal["pretrain", "sft", "preference", "unpaired", "tasks"] = Field(
        description="what the rows are for; tasks: records of key-value fields that prepare.tasks renders into "
                    "prompts and answers (instructflow/multitask.py)")
    format: Literal["auto", "text", "jsonl", "json", "csv", "tsv"] = Field(
        "auto", description="file format; auto: by extension (json: an array of records, or JSON lines)")
    columns: dict[str, str] = Field({}, description="canonical field -> column name, for CSV/TSV/JSONL with other names")
    group_rows: int = Field(1, ge=1, description="pretrain: join this many short rows into one document")
    skip_invalid: bool = Field(False, description="skip (and count) invalid rows instead of failing the stage")
    tasks: list[dict[str, str]] | str | None = Field(
        None, description="role tasks: this source's task definitions, a list or a YAML file of them (default: "
                          "prepare.tasks)")


class PrepareConfig(Section):
    demo: bool = Field(True, description="include the demo data in data/raw")
    eval_fraction: float = Field(0.1, gt=0, lt=0.5, description="held-out share of every data set")
    max_pretrain_chars: int | None = Field(None, ge=1000, description="cap on pretraining characters (null: all)")
    max_sft_rows: int | None = Field(None, ge=1, description="cap on non-synthetic SFT rows")
    max_preference_rows: int | None = Field(None, ge=1, description="cap on non-synthetic preference pairs")
    max_prompt_rows: int | None = Field(None, ge=1, description="cap on real prompts sampled at evaluation")
    max_chars: int | None = Field(None, ge=1, description="refuse any row (a plain-text line) longer than this many "
                                                          "characters, naming its file and line (null: no bound)")
    synthetic: SyntheticConfig = SyntheticConfig()
    sources: list[SourceConfig] = Field([], description="user data files added to the demo data")
    tasks: list[dict[str, str]] | str = Field(
        [], description="task definitions of the `tasks` sources: a list of {name, instruction, template, answer} "
                        "(template: Jinja over a record's fields; answer: a field or a Jinja expression), or a YAML "
                        "file holding that list; checked by prepare (instructflow/multitask.py), which every "
                        "stage would otherwise depend on")

    @model_validator(mode="before")
    @classmethod
    def _default_tasks(cls, data: Any) -> Any:
        """A `tasks` source without its own definitions takes prepare.tasks (so a source alone says how to read it)."""
        if isinstance(data, dict) and data.get("tasks") and isinstance(data.get("sources"), list):
            data = {**data, "sources": [{**s, "tasks": data["tasks"]} if isinstance(s, dict) and s.get("role") == "tasks"
                                        and s.get("tasks") is None else s for s in data["sources"]]}
        return data

    @model_validator(mode="after")
    def _tasks_sources(self) -> "PrepareConfig":
        bare = [i for i, s in enumerate(self.sources) if s.role == "tasks" and not s.tasks]
        if bare:
            raise ValueError(f"sources[{bare[0]}] has role tasks but no task definitions: set prepare.tasks (or the "
                             f"source's own tasks) to a list of {{name, instruction, template, answer}} or a YAML file")
        return self


# --------------------------------------------------------------------------------------------- training
class TrainConfig(Section):
    """Knobs every training stage shares."""

    batch_size: int = Field(16, ge=1, description="sequences per micro-batch (grad_accum of them a step), over "
                            "all processes: on N GPUs each trains its share (README, Beyond one machine)")
    grad_accum: int = Field(1, ge=1, description="micro-batches per step: larger trades time for memory")
    max_steps: int = Field(100, ge=1, description="optimiser steps")
    lr: float = Field(3e-4, gt=0, le=1, description="peak learning rate")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="linear warmup share of the steps, then cosine decay")
    weight_decay: float = Field(0.01, ge=0, le=1)
    max_grad_norm: float = Field(1.0, gt=0)
    bf16: Literal["auto", True, False] = Field(
        "auto", description="bf16 autocast; auto: on where supported (about 1.7x faster on this CPU); never fp16 on CPU")
    logging_steps: int = Field(5, ge=1)
    eval_steps: int = Field(50, ge=1, description="held-out evaluation every N steps")


class DecoderModelConfig(Section):
    hidden_size: int = Field(128, ge=8)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int | None = Field(None, ge=1, description="grouped-query attention; null: = num_heads")
    intermediate_size: int = Field(384, ge=8)
    max_position_embeddings: int = Field(256, ge=16)
    rope_theta: float = Field(10000.0, gt=0)
    tie_word_embeddings: bool = True

    @model_validator(mode="after")
    def _heads_divide(self) -> "DecoderModelConfig":
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        return self


class TokenizerConfig(Section):
    vocab_size: int = Field(4096, ge=300, le=262144, description="BPE vocabulary incl. 256 bytes and specials")
    min_frequency: int = Field(2, ge=1)


class PretrainConfig(TrainConfig):
    model: DecoderModelConfig = DecoderModelConfig()
    seq_len: int = Field(128, ge=8, description="packed sequence length (tokens)")
    lr: float = Field(1e-3, gt=0, le=1)
    save_steps: int = Field(200, ge=1, description="checkpoint every N steps into checkpoints/pretrain (resumable)")
    resume: bool = Field(True, description="resume from the latest checkpoint made with the same params, tokenizer and data")
    base_model: str | None = Field(
        None, description="start from this model instead of training one: a local Hugging Face folder (relative to the "
                          "project root, or absolute) or a registry URI models:/<name>@<alias> or models:/<name>/<version>; "
                          "the tokenizer and pretrain stages then take its tokenizer and weights (tasks/base_model.py)")

    @field_validator("base_model")
    @classmethod
    def _base_model(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.strip():
            raise ValueError("expected a model folder or models:/<name>@<alias>, got an empty string (null: no base model)")
        if value.startswith("models:/"):
            if not re.fullmatch(r"models:/[^/@]+(@[A-Za-z0-9_-]+|/[0-9]+)", value):
                raise ValueError(f"registry URI {value!r}: expected models:/<name>@<alias> or models:/<name>/<version>")
        elif re.match(r"^[a-z][a-z0-9+.-]*://", value):
            raise ValueError(f"{value!r}: expected a local folder or a models:/ registry URI; download a hub model "
                             "first (hf download <repo> --local-dir <folder>) and name the folder")
        return value


class LoraConfig(Section):
    r: int = Field(16, ge=1, description="rank: higher fits more, costs more memory")
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class SFTConfig(TrainConfig):
    method: Literal["full", "lora"] = Field("full", description="full fine-tuning or LoRA adapters (merged before saving)")
    lora: LoraConfig = LoraConfig()
    max_length: int = Field(256, ge=16, description="prompt + response tokens; a longer row keeps its prompt and "
                                                    "loses the response's end (dropped when the prompt fills it)")
    lr: float = Field(5e-4, gt=0, le=1)
    multitask: Literal["joint", "sequential", "cumulative"] = Field(
        "sequential", description="how multi-task records (data/prepared/multitask_*.jsonl) are trained and asked: "
        "joint (one prompt, one `name: answer` line per task), sequential (one prompt per task: the shape of the "
        "synthetic rows, hence the default) or cumulative (one conversation, each task after the earlier answers, "
        "the model's own at inference)")


class RewardConfig(TrainConfig):
    max_length: int = Field(256, ge=16)
    lr: float = Field(3e-4, gt=0, le=1)
    kwise: bool = Field(
        True, description="InstructGPT's K-wise loss (Ouyang et al. 2022, sec. 3.5): the pairs of one ranked list "
        "(prepare's `group`) are one batch element, the loss the mean over elements of the mean over their pairs, "
        "each response scored once; batch_size counts lists (K sequences each). false: every pair on its own, "
        "shuffled apart. Pair-only data (one pair a list) trains the same either way. On ranked lists (bench/kwise.py, "
        "tiny, 2 seeds) K-wise reached 0.585 held-out pairwise accuracy against 0.562 flattened in about the same "
        "time (as many sequences a step), and was 1.65x faster at as many pairs a step (0.539)")


class KTOConfig(Section):
    """KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization"), eq. 8 and sec. 4.

    The weights make lambda_D * n_desirable / (lambda_U * n_undesirable) land in [1, 4/3] when the two kinds are
    unbalanced (the paper's advice); the demo data is balanced, so 1 and 1 (the paper's and TRL's default).
    """

    desirable_weight: float = Field(1.0, gt=0, description="lambda_D: weight of the desirable (label true) rows")
    undesirable_weight: float = Field(1.0, gt=0, description="lambda_U: weight of the undesirable (label false) rows")


class OnlineConfig(Section):
    """Rollouts, rewards and the KL penalty that PPO, GRPO and RLOO share (align.algorithm ppo | grpo | rloo).

    align.batch_size is the prompts per update, align.max_steps the updates, align.lr the policy's peak rate.
    """

    prompts: list[Literal["synthetic", "sft", "preference"]] = Field(
        ["synthetic", "preference"], min_length=1,
        description="where rollout prompts come from: synthetic tasks (their exact answer is known), the real SFT "
        "prompts, the preference prompts; the exact_answer reward scores synthetic prompts only")
    samples_per_prompt: int = Field(4, ge=1, le=64, description="K responses per prompt: GRPO and RLOO need >= 2 "
                                    "(their baseline is the other samples); more lowers the baseline's variance")
    max_new_tokens: int = Field(24, ge=1, description="response-length cap: a response cut here never ends in EOS")
    max_prompt_length: int = Field(128, ge=4, description="prompts longer than this (tokens) are left out, counted")
    temperature: float = Field(1.0, gt=0, le=2, description="rollout sampling temperature; log-probs are taken of "
                               "logits / temperature too (Huang et al. 2024, detail 'temperature'); 1: the policy")
    rewards: dict[Literal["reward_model", "exact_answer"], float] = Field(
        {"reward_model": 1.0, "exact_answer": 1.0}, min_length=1,
        description="reward sources and their weights: reward_model = the reward model's score normalised to mean "
        "0, std 1 on the SFT model's samples (Ziegler et al. 2019); exact_answer = 1 when a synthetic task's "
        "response is its exact answer, else 0 (a verifier)")
    eos_penalty: float = Field(1.0, ge=0, description="subtracted from the reward of a response that never ends "
                               "in EOS within max_new_tokens (Huang et al. 2024, 'missing EOS penalty')")
    kl_coef: float = Field(0.05, ge=0, description="beta of the per-token KL penalty to the frozen SFT reference; "
                           "the start value when kl_target is set (InstructGPT: 0.02)")
    kl_estimator: Literal["k1", "k3"] = Field("k1", description="k1 = log p - log q (unbiased, can be negative per "
                                              "token); k3 = exp(q - p) - (q - p) - 1 (>= 0, lower variance; GRPO)")
    kl_target: float | None = Field(None, gt=0, description="adaptive KL (Ziegler et al. 2019): kl_coef is moved "
                                    "so the summed KL per response tracks this; null: fixed kl_coef")
    kl_horizon: int = Field(10000, ge=1, description="the adaptive controller's horizon in samples (Ziegler: 10000)")
    epochs: int = Field(2, ge=1, le=16, description="passes over each rollout batch (PPO epochs); more reuses "
                        "samples, and the clip keeps the policy near the one that drew them")
    minibatches: int = Field(2, ge=1, description="optimiser steps per epoch; each takes 1/minibatches of the batch")
    clip_range: float = Field(0.2, gt=0, lt=1, description="PPO's epsilon: the policy ratio is clipped to 1 +- this "
                              "(Schulman et al. 2017)")
    gamma: float = Field(1.0, gt=0, le=1, description="PPO's discount; 1 for one-shot responses (InstructGPT)")
    lam: float = Field(0.95, ge=0, le=1, description="PPO's GAE lambda (Schulman et al. 2016)")
    value_clip: float = Field(0.2, gt=0, description="PPO's value-loss clip around the rollout's values")
    vf_coef: float = Field(0.1, ge=0, description="PPO's weight of the value loss (TRL's PPO: 0.1)")
    value_lr: float = Field(1e-4, gt=0, le=1, description="PPO's value model's peak learning rate")
    whiten_advantages: bool = Field(True, description="PPO: advantages to mean 0, std 1 per batch (detail 'whiten')")
    scale_rewards: bool = Field(True, description="GRPO: divide each group's centred rewards by its std "
                                "(Shao et al. 2024); false: centre only (Dr. GRPO, Liu et al. 2025)")
    ptx_coef: float = Field(0.0, ge=0, description="PPO-ptx (InstructGPT eq. 2): weight of the SFT data's LM loss "
                            "mixed into each update; 0: off")

    @model_validator(mode="after")
    def _weights(self) -> "OnlineConfig":
        if not any(w > 0 for w in self.rewards.values()):
            raise ValueError(f"rewards: at least one weight must be > 0, got {self.rewards}")
        return self


class AlignConfig(TrainConfig):
    algorithm: Literal["dpo", "kto", "ppo", "grpo", "rloo"] = Field(
        "dpo", description="dpo and kto learn offline from the preference / unpaired data; ppo, grpo and rloo "
        "learn online from the policy's own samples, scored by align.online.rewards")
    loss_type: Literal["sigmoid", "ipo"] = Field("sigmoid", description="DPO loss: sigmoid (Rafailov 2023) or ipo (Azar 2023)")
    beta: float = Field(0.1, gt=0, description="KL strength of DPO and KTO: higher keeps the policy closer to the "
                        "SFT reference")
    rpo_alpha: float = Field(0.0, ge=0, description="weight of the chosen responses' token-mean NLL added to the "
                             "loss (RPO, Pang et al. 2024); 0: the plain DPO/IPO loss")
    max_length: int = Field(256, ge=16)
    lr: float = Field(5e-5, gt=0, le=1)
    kto: KTOConfig = KTOConfig()
    online: OnlineConfig = OnlineConfig()

    @model_validator(mode="after")
    def _online_groups(self) -> "AlignConfig":
        if self.algorithm in ("grpo", "rloo") and self.online.samples_per_prompt < 2:
            raise ValueError(f"algorithm {self.algorithm} needs online.samples_per_prompt >= 2 (its baseline is "
                             f"the other samples of the prompt), got {self.online.samples_per_prompt}")
        return self


class EvaluateConfig(Section):
    max_new_tokens: int = Field(32, ge=1)
    temperature: float = Field(0.8, ge=0, description="sampling temperature for the sampled generations (greedy is also run)")
    top_k: int = Field(50, ge=0, description="0: off")
    top_p: float = Field(0.95, gt=0, le=1)
    n_samples: int = Field(4, ge=1, description="sampled responses per prompt for reward and KL estimates")
    bootstrap_resamples: int = Field(1000, ge=100)
    confidence: float = Field(0.95, gt=0.5, lt=1)
    max_eval_rows: int = Field(200, ge=1, description="cap on held-out rows per metric")
    reward_prompts: int = Field(64, ge=2, description="prompts whose sampled responses the reward model judges")
    batch_size: int = Field(16, ge=1)


class RegisterConfig(Section):
    policy_name: str = "instructflow-policy"
    reward_name: str = "instructflow-reward"
    encoder_name: str = "instructflow-encoder"
    classifier_name: str = "instructflow-classifier"
    metric: str = Field("exact_match", description="evaluation metric the promotion gate compares")
    greater_is_better: bool = True
    use_ci: bool = Field(True, description="promote only when the challenger's confidence interval clears the champion")
    classifier_metric: str = Field("macro_f1", description="metric of the encoder track's gate")
    embedder_name: str = "instructflow-embedder"
    embedder_metric: str = Field("spearman", description="metric of the sentence embedder's gate (KorSTS dev)")


class EncoderModelConfig(Section):
    hidden_size: int = Field(128, ge=8)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    intermediate_size: int = Field(384, ge=8)
    max_position_embeddings: int = Field(256, ge=16)


class MLMConfig(TrainConfig):
    model: EncoderModelConfig = EncoderModelConfig()
    seq_len: int = Field(128, ge=8)
    mlm_probability: float = Field(0.15, gt=0, lt=1, description="share of tokens chosen per batch (80/10/10 rule)")
    lr: float = Field(1e-3, gt=0, le=1)


class ClassifyConfig(TrainConfig):
    train_path: str = Field("data/raw/nsmc_train.tsv", description="CSV, TSV or JSONL with a text and a label column")
    test_path: str = Field("data/raw/nsmc_test.tsv")
    text_column: str = "document"
    text_pair_column: str | None = Field(None, description="second sentence column, for sentence-pair tasks")
    label_column: str = "label"
    max_length: int = Field(128, ge=8)
    max_train_rows: int | None = Field(None, ge=10)
    max_test_rows: int | None = Field(None, ge=10)
    lr: float = Field(5e-4, gt=0, le=1, description="measured on tiny NSMC: 5e-4 gives +12 points over 1e-4")


class SimilarityConfig(TrainConfig):
    """Sentence embeddings: the mlm encoder fine-tuned so that the cosine of two sentences' mean-pooled
    vectors tracks how alike people judged their meaning (KorSTS), scored on the dev pairs."""

    train_path: str = Field("data/raw/korsts_train.tsv",
                            description="STS pairs to train on: TSV / CSV / JSONL with sentence1, sentence2, score")
    dev_path: str = Field("data/raw/korsts_dev.tsv", description="STS pairs the embeddings are scored on (Spearman)")
    max_score: float = Field(5.0, gt=0, description="the top of the gold score scale (KorSTS: 0 to 5)")
    objective: Literal["cosent", "cosine", "in_batch_negatives", "simcse"] = Field(
        "cosine", description="cosine: regress the cosine on score / max_score (Sentence-BERT; measured on tiny: "
        "KorSTS dev Spearman 0.668, cosent 0.658, and cosines that read as similarities); cosent: rank the pairs by "
        "score (Su 2022); in_batch_negatives: pairs scored >= positive_score, the batch's other "
        "sentences as negatives; simcse: each train sentence against itself under another dropout mask, no scores")
    scale: float = Field(20.0, gt=0, le=100,
                         description="cosine multiplier of cosent, in_batch_negatives and simcse (1 / temperature)")
    positive_score: float = Field(4.0, ge=0, description="in_batch_negatives: a pair scored at least this is a positive")
    max_length: int = Field(64, ge=8, description="tokens per sentence, [CLS] and [SEP] included")
    max_train_pairs: int | None = Field(None, ge=10, description="a seeded sample of the train pairs (null: all)")
    max_dev_pairs: int | None = Field(None, ge=10, description="a seeded sample of the dev pairs (null: all)")
    bootstrap_resamples: int = Field(1000, ge=100, description="resamples of the dev pairs behind each interval")
    confidence: float = Field(0.95, gt=0.5, lt=1, description="level of the bootstrap intervals")
    lr: float = Field(5e-4, gt=0, le=1, description="peak learning rate")

    @model_validator(mode="after")
    def _positive_within_scale(self) -> "SimilarityConfig":
        if self.positive_score > self.max_score:
            raise ValueError(f"positive_score {self.positive_score} is above max_score {self.max_score}")
        return self


class SelfInstructConfig(Section):
    """Self-Instruct (Wang et al. 2022): instructions sampled from a model, filtered (instructflow/self_instruct.py).

    Sampling follows the reference implementation (temperature 0.7, top_p 0.5); it needs a capable base model: a
    tiny one writes few usable instructions.
    """

    enabled: bool = Field(False, description="run the self_instruct stage; off: it writes an empty data set")
    model: str = Field("sft", description="the model that writes the instructions, as `instructflow generate` takes "
                       "one: a stage (sft -> artifacts/sft), a folder with a causal LM and its tokenizer, or "
                       "models:/<name>@<alias>")
    seed_path: str = Field("data/raw/self_instruct_seed_tasks.jsonl",
                           description="human seed tasks: JSON lines with an 'instruction' each (yizhongw/self-instruct)")
    n_instructions: int = Field(100, ge=1, description="stop once this many instructions are kept")
    max_rounds: int = Field(20, ge=1, description="rounds of prompts at most (each asks prompts_per_round prompts)")
    prompts_per_round: int = Field(8, ge=1, description="prompts per round; the pool grows between rounds")
    batch_size: int = Field(8, ge=1, description="prompts per generate call")
    max_new_tokens: int = Field(256, ge=8, description="tokens per completion; a completion cut here loses its "
                                "last item (dropped as truncated)")
    temperature: float = Field(0.7, gt=0, le=2)
    top_k: int = Field(0, ge=0, description="0: off")
    top_p: float = Field(0.5, gt=0, le=1)
    n_human: int = Field(6, ge=1, description="seed instructions per prompt")
    n_machine: int = Field(2, ge=0, description="machine instructions per prompt once the pool has them "
                           "(seeds fill in before)")
    rouge_threshold: float = Field(0.7, gt=0, le=1, description="drop a candidate whose ROUGE-L F-measure with any "
                                   "pooled instruction reaches this")
    keep_korean: bool = Field(True, description="keep instructions that start with Hangul (the reference drops "
                              "every non-ASCII start)")


class GenerateConfig(Section):
    """Stage `generate` of the feedback loop (loop.enabled): K responses per prompt from the current policy, for `rank`.

    InstructGPT (Ouyang et al. 2022, sec. 3.5) had labelers rank K = 4 to 9 responses per prompt, sampled from the
    models of the time; here the policy this pipeline made (or the SFT model) samples them at temperature 1, so the
    K differ. Each round (loop.round) takes the next n_prompts prompts of a seeded order: no prompt twice.
    """

    model: Literal["sft", "align"] = Field("align", description="the stage whose model samples: align (the policy "
                                           "this pipeline made, the challenger or champion) or sft")
    prompts: Literal["synthetic", "sft", "preference"] = Field(
        "synthetic", description="where the prompts come from: the synthetic tasks of sft_train (their exact answer "
        "is known, so `rank.method: verifier` can rank them), the real SFT prompts, the real preference prompts "
        "(never the held-out ones evaluate scores)")
    n_prompts: int = Field(64, ge=1, description="prompts per round")
    samples: int = Field(4, ge=2, le=16, description="K: responses per prompt (InstructGPT: 4 to 9)")
    temperature: float = Field(1.0, gt=0, le=2, description="> 0: the K responses must differ to be ranked")
    top_k: int = Field(0, ge=0, description="0: off")
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(32, ge=1)
    max_prompt_length: int = Field(192, ge=8, description="longer prompts are left out (counted)")
    batch_size: int = Field(16, ge=1, description="prompts per generate call")


class RankConfig(Section):
    """Stage `rank`: orders each prompt's K responses, best first (its rows feed the next round's reward model)."""

    method: Literal["verifier", "reward_model", "human"] = Field(
        "verifier", description="verifier: the synthetic tasks' exact answers (right before wrong), ties broken by "
        "length (shorter first); reward_model: the scores of rank.reward_model; human: rank.labels, the file "
        "`instructflow label --export` wrote for this generation")
    reward_model: str = Field("reward", description="method reward_model: `reward` (this pipeline's reward stage), a "
                              "Hugging Face folder with a sequence-classification head, or models:/<name>@<alias>")
    labels: str = Field("labels/labels.jsonl", description="method human: the labels file (its generation hash must "
                        "match data/generated)")
    batch_size: int = Field(32, ge=1, description="sequences per reward-model call")


class LoopConfig(Section):
    """The feedback loop (`instructflow rounds`): generate -> rank -> reward -> align, repeated.

    Each round's rankings are added to `feedback_dir` (a DVC-tracked folder) and the reward stage trains on them
    with the prepared pairs; the `rounds` flow sets `round` and turns the loop on.
    """

    enabled: bool = Field(False, description="run the stages generate and rank, and train the reward model on "
                          "feedback_dir too; off: both stages write an empty output")
    rounds: int = Field(2, ge=1, description="rounds `instructflow rounds` runs by default")
    round: int = Field(0, ge=0, description="the round in progress (set by the rounds flow): picks the round's "
                       "prompts and tags its runs and registered versions")
    feedback_dir: str = Field("data/feedback", description="ranked rows of the earlier rounds, one file a round "
                              "(round_<r>.jsonl), tracked by DVC (feedback_dir.dvc)")
    human_timeout_s: int = Field(86400, ge=60, description="rank.method human: how long a round's flow run waits "
                                 "paused for people before it fails")


class LabelConfig(Section):
    """`instructflow label FILE`: the local page where people rank a prompt's K sampled responses (apps/label.py).

    Read as defaults; the command's flags override them. The access token is never kept here (a versioned file):
    give it with --token or INSTRUCTFLOW_LABEL_TOKEN.
    """

    min_rankings: int = Field(1, ge=1, description="rankings (by different people) a prompt needs to be complete; "
                              "a person is served only incomplete prompts they have not ranked")
    allow_ties: bool = Field(False, description="let a person put responses in one tier (equally good)")
    host: str = Field("127.0.0.1", min_length=1, description="address to bind; anything but loopback needs a token")
    port: int = Field(8765, ge=0, le=65535, description="port to bind (0: any free port)")
    db: str | None = Field(None, description="the SQLite store of the rankings (null: FILE + '.labels.sqlite', next "
                           "to the generation file)")
    lease_seconds: int = Field(600, ge=10, description="a prompt served to one person is held from the others this "
                               "long (or until they submit), so two people do not rank the same prompt by accident")


class ScheduleConfig(Section):
    cron: str = Field("0 2 * * *", description="when `instructflow serve` runs the pipeline (nightly at 02:00)")
    timezone: str = "UTC"
    deployment: str = "nightly"

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        if len(value.split()) != 5:
            raise ValueError(f"expected 5 cron fields (minute hour day month weekday), got {value!r}")
        return value


class WorkersConfig(Section):
    """Per-stage routing (flows/routing.py, README "Beyond one machine"): the stages below run on the workers of a
    GPU work pool, the rest where the pipeline flow runs. Off by default: one machine runs every stage. Not part of
    the params hash: where a stage runs does not change what it makes."""

    enabled: bool = Field(False, description="dispatch the stages below to `deployment` (needs a Prefect server, an "
                          "MLflow tracking server and a DVC remote shared with the workers, and a pushed commit)")
    stages: list[str] | None = Field(None, description="the stages that run on a worker (null: the stage table's GPU "
                                     "stages, instructflow/stages.py gpu=True); a stage whose track is off runs here")
    deployment: str = Field("instructflow-stage/gpu", min_length=3, description="flow/deployment of the stage flow "
                            "(flows/worker.py), deployed to the GPU pool (prefect.yaml: deployment gpu)")
    retries: int = Field(1, ge=0, le=5, description="dispatches again after a worker died holding the stage (its flow "
                         "run crashed or its heartbeats stopped); a stage that fails on a worker is not retried")
    start_timeout_s: int = Field(1800, ge=10, description="a dispatched stage that no worker starts within this long "
                                 "fails, naming the pool (the pool's concurrency limit may hold it back meanwhile)")

    @field_validator("stages")
    @classmethod
    def _routable(cls, value: list[str] | None) -> list[str] | None:
        from instructflow.stages import BY_NAME, NAMES

        for name in value or []:
            if name not in BY_NAME:
                raise ValueError(f"unknown stage {name!r}: expected some of {', '.join(NAMES)}")
            if not BY_NAME[name].cache_outs:  # nothing to restore from DVC's run-cache
                raise ValueError(f"stage {name!r} cannot run on a worker: DVC does not cache its outputs, so they "
                                 "cannot come back through the run-cache (it writes where the flow runs)")
        return value


# pydantic warns that the field `register` shadows ABCMeta.register; the stage name wins (DESIGN: one name per stage)
warnings.filterwarnings("ignore", message='Field name "register"', category=UserWarning)


class TracksConfig(Section):
    decoder: bool = Field(True, description="InstructGPT track: pretrain, sft, reward, align, evaluate")
    encoder: bool = Field(False, description="encoder track: mlm, classify, similarity")

    @model_validator(mode="after")
    def _one(self) -> "TracksConfig":
        if not (self.decoder or self.encoder):
            raise ValueError("choose at least one track: decoder: true and/or encoder: true")
        return self


class DistributedConfig(Section):
    """How a training stage runs when it runs as several processes (one per visible GPU, or INSTRUCTFLOW_NPROC;
    tasks/launch.py). Not part of the params hash: like the device, it does not say what is trained."""

    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="ddp: a whole model per process, gradients averaged; fsdp: parameters, gradients and "
        "optimiser state sharded over the GPUs (models too large for one GPU; GPUs only)")
    fsdp_sharding: Literal["FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD"] = Field(
        "FULL_SHARD", description="fsdp: FULL_SHARD saves the most memory; SHARD_GRAD_OP keeps whole parameters "
        "between forward and backward (faster, more memory)")
    fsdp_offload_params: bool = Field(False, description="fsdp: parameters wait on the CPU between uses: less GPU "
                                      "memory, slower steps")


class Params(Section):
    preset: Literal["micro", "tiny", "small"] = Field("tiny", description="model and data sizes (presets.yaml)")
    seed: int = 1234
    tracks: TracksConfig = TracksConfig()
    workers: WorkersConfig = WorkersConfig()
    experiment: str = Field("instructflow", description="MLflow experiment name")
    prepare: PrepareConfig = PrepareConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    pretrain: PretrainConfig = PretrainConfig()
    sft: SFTConfig = SFTConfig()
    reward: RewardConfig = RewardConfig()
    align: AlignConfig = AlignConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    register: RegisterConfig = RegisterConfig()
    mlm: MLMConfig = MLMConfig()
    classify: ClassifyConfig = ClassifyConfig()
    similarity: SimilarityConfig = SimilarityConfig()
    self_instruct: SelfInstructConfig = SelfInstructConfig()
    generate: GenerateConfig = GenerateConfig()
    rank: RankConfig = RankConfig()
    loop: LoopConfig = LoopConfig()
    label: LabelConfig = LabelConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    distributed: DistributedConfig = DistributedConfig()

    @model_validator(mode="after")
    def _verifier_needs_answers(self) -> "Params":
        if self.loop.enabled and self.rank.method == "verifier" and self.generate.prompts != "synthetic":
            raise ValueError(f"rank.method verifier ranks by the synthetic tasks' exact answers, but generate.prompts "
                             f"is {self.generate.prompts!r} (prompts without answers); use generate.prompts: synthetic, "
                             "or rank.method reward_model or human")
        return self

    def chosen(self, stage: str) -> bool:
        """Whether a stage's track is chosen (prepare, tokenizer and register serve every track) and, for an
        optional stage, its switch is on."""
        from instructflow.stages import stage as stage_named

        s = stage_named(stage)
        if s.switch is not None and not functools.reduce(getattr, s.switch.split("."), self):
            return False
        return s.track is None or getattr(self.tracks, s.track)

    def stages(self) -> list[str]:
        """The stages of the chosen tracks, in pipeline order."""
        from instructflow.stages import NAMES

        return [s for s in NAMES if self.chosen(s)]

    def digest(self) -> str:
        """A short hash of the resolved params: the lineage tag of everything made with them."""
        blob = json.dumps(self.model_dump(mode="json", exclude={"distributed", "workers"}), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# ------------------------------------------------------------------------------------------- loading
def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _read_yaml(path: Path) -> tuple[dict, Any]:
    """The plain data and the ruamel tree (for line numbers) of a YAML file."""
    from ruamel.yaml import YAML

    if not path.is_file():
        raise ConfigError(f"{path}: file not found (expected the pipeline's params.yaml)")
    text = path.read_text(encoding="utf-8")
    try:
        tree = YAML(typ="rt").load(text)
        data = yaml.safe_load(text)
    except Exception as exc:  # ruamel / PyYAML parse errors carry the line already
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if data is None:
        data, tree = {}, {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(data).__name__}")
    return data, tree


def _line_of(tree: Any, loc: tuple) -> int | None:
    """1-based line of the deepest key of loc present in the ruamel tree."""
    line, node = None, tree
    for key in loc:
        lc = getattr(node, "lc", None)
        try:
            if isinstance(key, int):
                line = lc.item(key)[0] + 1 if lc is not None else line
            else:
                line = lc.key(key)[0] + 1 if lc is not None else line
            node = node[key]
        except Exception:
            break
    return line


def _value_at(data: Any, loc: tuple) -> Any:
    for key in loc:
        try:
            data = data[key]
        except Exception:
            return "<missing>"
    return data


def validate(data: dict, source: str = "params.yaml", tree: Any = None) -> Params:
    preset = data.get("preset", "tiny")
    if preset not in PRESET_NAMES:
        line = _line_of(tree, ("preset",))
        where = f"{source}" + (f", line {line}" if line else "")
        raise ConfigError(f"{where}: preset = {preset!r}: expected one of {', '.join(PRESET_NAMES)}")
    presets = yaml.safe_load(PRESETS_FILE.read_text(encoding="utf-8"))
    merged = deep_merge(presets[preset], data)
    try:
        return Params.model_validate(merged)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            # drop pydantic's union/literal branch tags (e.g. 'literal[...]', 'bool') from the path
            loc = tuple(k for k in loc if not (isinstance(k, str) and ("[" in k or k in {"bool", "int", "str"})))
            key = ".".join(str(k) for k in loc)
            line = _line_of(tree, loc) if tree is not None else None
            where = source + (f", line {line}" if line else "")
            if err["type"] == "extra_forbidden":
                parent = Params
                for part in loc[:-1]:
                    field = parent.model_fields.get(str(part)) if isinstance(part, str) else None
                    ann = getattr(field, "annotation", None)
                    parent = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else parent
                allowed = ", ".join(parent.model_fields) if parent is not Params or len(loc) == 1 else ""
                problems.append(f"{where}: unknown key '{key}'" + (f" (allowed: {allowed})" if allowed else ""))
            else:
                value = _value_at(merged, loc)
                problems.append(f"{where}: {key} = {value!r}: {err['msg']}")
        raise ConfigError("invalid params:\n  " + "\n  ".join(problems)) from None


def parse_override(item: str) -> tuple[list[str], Any]:
    """'section.key=value' -> (['section', 'key'], value parsed as YAML)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value (e.g. align.beta=0.2)")
    key, raw = item.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {item!r}: value is not valid YAML: {exc}") from None
    return parts, value


def _set_overrides(tree: Any, overrides: list[str], preset: str | None) -> Any:
    """Write each section.key=value into a mapping (plain dict or ruamel's, which keeps comments) in place."""
    if preset is not None:
        tree["preset"] = preset
    for item in overrides:
        parts, value = parse_override(item)
        node = tree
        for part in parts[:-1]:
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                raise ConfigError(f"--set {item!r}: '{part}' is a value, not a section")
            node = node[part]
        node[parts[-1]] = value
    return tree


def apply_overrides(data: dict, overrides: list[str], preset: str | None = None) -> dict:
    return _set_overrides(copy.deepcopy(data), overrides, preset)


def load_params(path: str | Path = "params.yaml", overrides: list[str] | None = None,
                preset: str | None = None) -> Params:
    path = Path(path)
    data, tree = _read_yaml(path)
    if overrides or preset:
        data = apply_overrides(data, overrides or [], preset)
        return validate(data, f"{path} with --set {' '.join(overrides or [])}".rstrip(), tree)
    return validate(data, str(path), tree)


def write_overrides(path: str | Path, overrides: list[str], preset: str | None = None) -> bool:
    """Write the (already validated) overrides into params.yaml, keeping its comments, as `dvc exp run -S` does.

    DVC decides what reruns from params.yaml, so what ran must be written there. Returns True if the file changed.
    """
    from ruamel.yaml import YAML

    path = Path(path)
    ryaml = YAML(typ="rt")
    ryaml.preserve_quotes = True
    before = path.read_text(encoding="utf-8")
    tree = _set_overrides(ryaml.load(before) or {}, overrides, preset)
    buf = io.StringIO()
    ryaml.dump(tree, buf)
    after = buf.getvalue()
    if after != before:
        tmp = path.with_suffix(".yaml.tmp")
        tmp.write_text(after, encoding="utf-8")
        tmp.replace(path)
        return True
    return False

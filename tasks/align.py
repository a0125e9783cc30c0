"""Stage `align`: preference optimisation of the SFT policy; the SFT model is the frozen reference.

Offline, from prepared data:

- `align.algorithm: dpo` (Rafailov et al. 2023) with loss_type sigmoid or ipo, on the preference pairs
  (data/prepared/preference_{train,eval}.jsonl).
- `align.algorithm: kto` (Ethayarajh et al. 2024, models.losses.kto_loss) on the unpaired rows
  (data/prepared/unpaired_{train,eval}.jsonl: a prompt, one completion, a desirable/undesirable label), weighted by
  align.kto.desirable_weight / undesirable_weight. KTO's reference point is a KL estimate on mismatched pairs: each
  row's prompt with the completion of a partner row, fixed per row by a seeded order (TRL pairs a row with its
  neighbour in the batch instead; a fixed partner lets the reference's log-probs of the pair be computed once too).

With the feedback loop's rounds in the project (loop.feedback_dir/round_<r>.jsonl, see flows/rounds.py), dpo also
trains on every ranked pair of them and kto on each ranked list's best (desirable) and worst (undesirable) response;
the online algorithms take them through the reward model, which trains on them. Held-out figures stay on the
prepared eval rows, so rounds compare on one fixed set.

The reference log-probs are computed once before training (the reference never changes), for the rows training
will draw and for the held-out rows, so only the policy runs in the loop.

Online, from the policy's own samples (tasks/online.py, models/online.py): `ppo`, `grpo` and `rloo`, scored by the
reward model and the synthetic tasks' exact-answer verifier (align.online).
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from functools import partial
from pathlib import Path

import torch

from instructflow.config import Params
from instructflow.errors import InstructflowError
from models.decoder import collate_lm, collate_pairs
from models.losses import (
    chosen_nll,
    dpo_loss,
    kto_loss,
    kto_reference_point,
    sequence_logprobs,
)
from models.tokenizer import chat_example, load_tokenizer
from models.training import LoopSettings, for_inference, rows_trained, to_device, train
from tasks.reward import (
    cut_metrics,
    feedback_rows,
    pair_lengths,
    preference_groups,
    preference_set,
)
from tasks.runtime import (
    final_metrics,
    read_prepared,
    resumable,
    run_stage,
    stage_output,
)
from tasks.tracking import StageRun

log = logging.getLogger("instructflow")


def pair_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed response log-probs and response lengths of a [chosen..., rejected...] batch."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (2B, T, V)
    logps, n_tokens = sequence_logprobs(logits, batch["labels"])  # (2B,), (2B,)
    chosen, rejected = logps.chunk(2)
    chosen_len, rejected_len = n_tokens.chunk(2)
    return chosen, rejected, chosen_len, rejected_len


@torch.no_grad()
def add_reference(ref_model, rows: list[dict], collate, batch_size: int, score, keys: tuple[str, str]) -> list[dict]:
    """The rows with the frozen reference's two summed log-probs per row added under `keys`, computed on the
    reference's device: `score(model, batch)` gives them as two (b,) tensors; one copy back per batch."""
    out = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        first, second = score(ref_model, to_device(collate(chunk), ref_model))  # (b,), (b,)
        out += [{**r, keys[0]: a, keys[1]: b} for r, a, b in zip(chunk, first.tolist(), second.tolist())]
    return out


def add_reference_logps(ref_model, pairs: list[dict], collate, batch_size: int) -> list[dict]:
    """The pairs with the frozen reference's summed chosen and rejected response log-probs added (DPO)."""
    return add_reference(ref_model, pairs, collate, batch_size, lambda m, b: pair_logps(m, b)[:2],
                         ("ref_chosen_logps", "ref_rejected_logps"))


def with_reference(source: Path, train_set: list[dict], used: list[int], eval_set: list[dict], add,
                   batch_size: int) -> list[dict]:
    """The frozen reference's log-probs, once, for the train rows training will draw (`used`, filled in place) and
    for every held-out row (returned); a row never drawn keeps no reference value (its collate would fail loudly,
    not silently). The reference is loaded where train() will put the policy and dropped afterwards."""
    from transformers import AutoModelForCausalLM

    reference = for_inference(AutoModelForCausalLM.from_pretrained(source))
    for i, row in zip(used, add(reference, [train_set[i] for i in used], batch_size=batch_size)):
        train_set[i] = row
    return add(reference, eval_set, batch_size=batch_size)


def loop_knobs(cfg) -> str:
    """The knobs that feed the DPO loss and its rewards, named in a non-finite error (models.training)."""
    return (f"align.beta={cfg.beta:g}, align.loss_type={cfg.loss_type}, align.rpo_alpha={cfg.rpo_alpha:g}, "
            f"align.lr={cfg.lr:g}, align.max_grad_norm={cfg.max_grad_norm:g}")


def make_step(cfg):
    def dpo_step(model, batch: dict) -> tuple[torch.Tensor, dict, int]:
        chosen, rejected, chosen_len, rejected_len = pair_logps(model, batch)
        lengths = {"chosen_lengths": chosen_len.float(), "rejected_lengths": rejected_len.float()} \
            if cfg.loss_type == "ipo" else {}
        loss, r_chosen, r_rejected = dpo_loss(chosen, rejected, batch["ref_chosen_logps"],
                                              batch["ref_rejected_logps"], cfg.beta, cfg.loss_type, **lengths)
        metrics = {"reward_accuracy": float((r_chosen > r_rejected).float().mean()),
                   "reward_margin": float((r_chosen - r_rejected).mean()),
                   "chosen_reward": float(r_chosen.mean()), "rejected_reward": float(r_rejected.mean())}
        if cfg.rpo_alpha > 0:  # RPO: DPO plus the NLL of the chosen responses
            nll = chosen_nll(chosen, chosen_len.float())
            loss = loss + cfg.rpo_alpha * nll
            metrics["chosen_nll"] = float(nll.detach())
        return loss, metrics, int(batch["attention_mask"].sum())
    return dpo_step


def body(params: Params, root: Path, run: StageRun) -> dict:
    """The stage: the algorithm align.algorithm names."""
    if params.align.algorithm == "kto":
        return kto_body(params, root, run)
    if params.align.algorithm in ("ppo", "grpo", "rloo"):  # online: the policy's own samples, scored
        from tasks.online import body as online_body

        return online_body(params, root, run)
    return dpo_body(params, root, run)


def dpo_body(params: Params, root: Path, run: StageRun) -> dict:
    from transformers import AutoModelForCausalLM

    cfg = params.align
    source = root / "artifacts" / "sft"
    tok = load_tokenizer(source)
    collate = partial(collate_pairs, pad_id=tok.pad_token_id)
    cut = {"train": Counter(), "eval": Counter()}
    feedback, feedback_files = feedback_rows(root, params)  # the rounds' rankings: every ranked pair trains
    train_set = preference_set(tok, read_prepared(root, "preference_train") + feedback, cfg.max_length,
                               "preference_train", cut["train"])
    eval_set = preference_set(tok, read_prepared(root, "preference_eval"), cfg.max_length, "preference_eval",
                              cut["eval"])
    settings = LoopSettings.from_config(cfg, params.seed, knobs=loop_knobs(cfg))
    lengths = pair_lengths(train_set)
    used = rows_trained(len(train_set), settings, lengths)
    eval_set = with_reference(source, train_set, used, eval_set, partial(add_reference_logps, collate=collate),
                              cfg.batch_size * 2)
    policy = AutoModelForCausalLM.from_pretrained(source)
    log.info("%s (%s loss, beta %g): %d train pairs, %d of them drawn in %d steps / %d eval pairs", cfg.algorithm,
             cfg.loss_type, cfg.beta, len(train_set), len(used), cfg.max_steps, len(eval_set))
    step = make_step(cfg)
    eval_batches = [collate(eval_set[i:i + cfg.batch_size]) for i in range(0, len(eval_set), cfg.batch_size)]

    def evaluate(model) -> dict[str, float]:
        rows = [step(model, to_device(batch, model))[:2] for batch in eval_batches]
        return {"loss": sum(float(r[0]) for r in rows) / len(rows),
                "reward_accuracy": sum(r[1]["reward_accuracy"] for r in rows) / len(rows),
                "reward_margin": sum(r[1]["reward_margin"] for r in rows) / len(rows)}

    history = train(policy, train_set, collate, step, settings, eval_fn=evaluate, on_log=run.log_step,
                    lengths=lengths,
                    **resumable(root, "align", params, root / "artifacts" / "sft", root / "data" / "prepared",
                                *feedback_files))
    with stage_output(root, "align", run, model=policy, tokenizer=tok, history=history):
        pass
    metrics = final_metrics(history, ("loss", "reward_accuracy", "eval_loss", "eval_reward_accuracy",
                                      "eval_reward_margin", "tokens_per_sec"))
    metrics.update(train_pairs=len(train_set), pairs_drawn=len(used), eval_pairs=len(eval_set))
    if feedback_files:
        metrics.update(feedback_rounds=len(feedback_files), feedback_pairs=len(feedback))
    metrics.update(cut_metrics(cut))
    return metrics


# ---- KTO ------------------------------------------------------------------------------------------


def read_unpaired(root: Path, name: str) -> list[dict]:
    """The rows of data/prepared/<name>.jsonl, or an error saying what KTO needs when there are none."""
    path = root / "data" / "prepared" / f"{name}.jsonl"
    rows = read_prepared(root, name) if path.is_file() else None
    if not rows:
        found = "does not exist (prepared before prepare wrote unpaired rows? rerun prepare)" if rows is None \
            else "has no rows"
        raise InstructflowError(
            f"{path.relative_to(root)} {found}: align.algorithm: kto trains on `unpaired` rows (a prompt, one "
            f"completion and a label: true = desirable, false = undesirable). prepare makes them from the synthetic "
            f"tasks (prepare.synthetic.n_train / n_eval) and from prepare.sources entries with `role: unpaired`; add "
            f"such a source, or use align.algorithm: dpo on preference pairs")
    return rows


def kl_partners(prompts: list, seed: int) -> list[int]:
    """For each row, the row whose completion makes its mismatched (prompt, completion) pair for KTO's KL estimate.

    The rows in a seeded order; a row's partner is the next one in that order (cyclic) whose prompt differs from
    its own (the synthetic tasks give each prompt a desirable and an undesirable completion), or simply the next
    one when every row has the same prompt. Deterministic, so the reference's log-probs of the pair can be
    precomputed; a single row is its own partner.
    """
    keys = [json.dumps(p, sort_keys=True, ensure_ascii=False) for p in prompts]
    order = list(range(len(keys)))
    random.Random(seed).shuffle(order)
    partners = [0] * len(order)
    if len(set(keys)) == 1:  # one prompt: every pair is the prompt with another row's completion
        for k, i in enumerate(order):
            partners[i] = order[(k + 1) % len(order)]
        return partners
    for k, i in enumerate(order):
        after = (order[(k + j) % len(order)] for j in range(1, len(order)))
        partners[i] = next(j for j in after if keys[j] != keys[i])
    return partners


def unpaired_example(tok, prompt: list[dict], completion: str, max_length: int, counts: Counter | None = None):
    """{input_ids, labels}: the prompt then the completion, labels on the completion and its <|eos|> only; cut as
    chat_example cuts (the prompt kept, the completion truncated; None when the prompt alone fills max_length)."""
    return chat_example(tok, [*prompt, {"role": "assistant", "content": completion}], max_length,
                        train_on="last_assistant", counts=counts)


def unpaired_set(tok, rows: list[dict], max_length: int, name: str, seed: int,
                 counts: Counter | None = None) -> list[dict]:
    """Unpaired rows as {completion, kl, desirable}: the row's example, its mismatched KL pair (its prompt with its
    kl_partners row's completion, cut alike) and its label. Rows whose prompt fills max_length are dropped, and
    rows cut or dropped are counted in `counts` and logged, as preference_set does for pairs."""
    counts = Counter() if counts is None else counts
    examples = [unpaired_example(tok, row["prompt"], row["completion"], max_length, counts) for row in rows]
    if counts["truncated"] or counts["dropped"]:
        log.warning("%s: %d of %d rows are longer than max_length %d: %d kept with the completion truncated, "
                    "%d dropped (the prompt alone fills max_length)", name, counts["truncated"] + counts["dropped"],
                    len(rows), max_length, counts["truncated"], counts["dropped"])
    kept = [(row, ex) for row, ex in zip(rows, examples) if ex is not None]
    if not kept:
        raise InstructflowError(f"{name}: no unpaired row fits max_length {max_length} (align.max_length)")
    partners = kl_partners([row["prompt"] for row, _ in kept], seed)
    out = []
    for (row, ex), j in zip(kept, partners):
        # the prompt fits (the row was kept), so the pair keeps at least one completion token too
        kl = unpaired_example(tok, row["prompt"], kept[j][0]["completion"], max_length)
        out.append({"completion": ex, "kl": kl, "desirable": bool(row["label"])})
    return out


def feedback_unpaired(rows: list[dict]) -> list[dict]:
    """Ranked preference rows (feedback_rows) as KTO's unpaired rows: in each ranked list, a response that loses
    no pair is desirable and one that wins no pair is undesirable (tied tops or bottoms all count); the middle of
    a list of K > 2 gives no label."""
    out = []
    for group in preference_groups(rows):
        better = {b for b, _ in group.pairs}
        worse = {w for _, w in group.pairs}
        for i, response in enumerate(group.responses):
            if (i in better) != (i in worse):  # at the top (only wins) or at the bottom (only losses)
                out.append({"prompt": group.prompt, "completion": response, "label": i in better})
    return out


def unpaired_lengths(rows: list[dict]) -> list[int]:
    """A row's padded length in a batch: the longer of its example and its KL pair (for length-grouped batches)."""
    return [max(len(r["completion"]["input_ids"]), len(r["kl"]["input_ids"])) for r in rows]


def collate_unpaired(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows of unpaired_set -> one batch [completion..., kl pair...] of 2B sequences, with `desirable` (B,) bool
    and, once added, the reference's `ref_logps` and `ref_kl_logps` (B,)."""
    batch = collate_lm([r["completion"] for r in rows] + [r["kl"] for r in rows], pad_id)  # (2B, T) each
    batch["desirable"] = torch.tensor([r["desirable"] for r in rows], dtype=torch.bool)  # (B,)
    batch.update({k: torch.tensor([r[k] for r in rows], dtype=torch.float32)
                  for k in ("ref_logps", "ref_kl_logps") if k in rows[0]})
    return batch


def unpaired_logps(model, batch: dict, rows: slice = slice(None)) -> torch.Tensor:
    """Summed completion log-probs of the batch's sequences `rows` ((n,); all 2B by default)."""
    logits = model(input_ids=batch["input_ids"][rows], attention_mask=batch["attention_mask"][rows]).logits
    return sequence_logprobs(logits, batch["labels"][rows])[0]  # (n,)


def add_reference_kto_logps(ref_model, rows: list[dict], collate, batch_size: int) -> list[dict]:
    """The rows with the frozen reference's summed log-probs of the completion and of the KL pair added (KTO)."""
    return add_reference(ref_model, rows, collate, batch_size, lambda m, b: unpaired_logps(m, b).chunk(2),
                         ("ref_logps", "ref_kl_logps"))


def kto_knobs(cfg) -> str:
    """The knobs that feed the KTO loss and its rewards, named in a non-finite error (models.training)."""
    return (f"align.beta={cfg.beta:g}, align.kto.desirable_weight={cfg.kto.desirable_weight:g}, "
            f"align.kto.undesirable_weight={cfg.kto.undesirable_weight:g}, align.lr={cfg.lr:g}, "
            f"align.max_grad_norm={cfg.max_grad_norm:g}")


def kto_forward(cfg, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, rewards (B,), z) of a collate_unpaired batch. The policy's KL-pair log-probs only set the detached
    reference point z, so they are computed without a graph (as TRL does)."""
    desirable = batch["desirable"]  # (B,)
    n = desirable.numel()
    logps = unpaired_logps(model, batch, slice(0, n))  # (B,)
    with torch.no_grad():
        kl_logps = unpaired_logps(model, batch, slice(n, None))  # (B,)
    loss, rewards = kto_loss(logps, batch["ref_logps"], kl_logps, batch["ref_kl_logps"], desirable, cfg.beta,
                             cfg.kto.desirable_weight, cfg.kto.undesirable_weight)
    return loss, rewards, kto_reference_point(kl_logps, batch["ref_kl_logps"])


def kto_tallies(cfg, rewards: torch.Tensor, z: torch.Tensor, desirable: torch.Tensor) -> Counter:
    """Per-kind sums of a batch, to be added over batches: rows, rewards, and rows on their side of the reference
    point (a desirable row's reward above beta * z, an undesirable row's below it)."""
    rewards, desirable = rewards.float().cpu(), desirable.cpu()
    point = cfg.beta * float(z)
    return Counter({"desirable": int(desirable.sum()), "undesirable": int((~desirable).sum()),
                    "desirable_reward": float(rewards[desirable].sum()),
                    "undesirable_reward": float(rewards[~desirable].sum()),
                    "desirable_above_z": int((rewards[desirable] > point).sum()),
                    "undesirable_below_z": int((rewards[~desirable] < point).sum())})


def kto_metrics(tally: Counter) -> dict[str, float]:
    """Means per kind of summed tallies. A kind with no rows gives 0 for its mean and for the margin."""
    n_d, n_u = tally["desirable"], tally["undesirable"]
    metrics = {"desirable_reward": tally["desirable_reward"] / n_d if n_d else 0.0,
               "undesirable_reward": tally["undesirable_reward"] / n_u if n_u else 0.0,
               "desirable_above_z": tally["desirable_above_z"] / n_d if n_d else 0.0,
               "undesirable_below_z": tally["undesirable_below_z"] / n_u if n_u else 0.0,
               # the share of all rows on their side of the reference point: KTO's counterpart of DPO's pair accuracy
               "reward_accuracy": (tally["desirable_above_z"] + tally["undesirable_below_z"]) / max(n_d + n_u, 1)}
    metrics["reward_margin"] = metrics["desirable_reward"] - metrics["undesirable_reward"] if n_d and n_u else 0.0
    return metrics


def make_kto_step(cfg):
    def kto_step(model, batch: dict) -> tuple[torch.Tensor, dict, int]:
        """The KTO loss and, for the log: kl = z, the rewards beta * (pi - ref) per kind, their margin, the shares
        of rows on their side of beta * z. A batch may hold one kind only (the loss is fine): that kind's means
        are then 0 in this step's metrics (the held-out metrics are exact: tallied over all rows)."""
        loss, rewards, z = kto_forward(cfg, model, batch)
        metrics = {"kl": float(z), **kto_metrics(kto_tallies(cfg, rewards, z, batch["desirable"]))}
        return loss, metrics, int(batch["attention_mask"].sum())
    return kto_step


def kto_body(params: Params, root: Path, run: StageRun) -> dict:
    from transformers import AutoModelForCausalLM

    cfg = params.align
    source = root / "artifacts" / "sft"
    tok = load_tokenizer(source)
    collate = partial(collate_unpaired, pad_id=tok.pad_token_id)
    cut = {"train": Counter(), "eval": Counter()}
    ranked, feedback_files = feedback_rows(root, params)
    feedback = feedback_unpaired(ranked)  # the rounds' rankings: each list's best desirable, its worst not
    train_set = unpaired_set(tok, read_unpaired(root, "unpaired_train") + feedback, cfg.max_length, "unpaired_train",
                             params.seed, cut["train"])
    eval_set = unpaired_set(tok, read_unpaired(root, "unpaired_eval"), cfg.max_length, "unpaired_eval",
                            params.seed, cut["eval"])
    n_desirable = sum(r["desirable"] for r in train_set)
    n_undesirable = len(train_set) - n_desirable
    if not n_desirable or not n_undesirable:
        log.warning("unpaired_train has %s rows only (none %s): KTO learns from one kind alone",
                    *(("desirable", "undesirable") if n_desirable else ("undesirable", "desirable")))
    else:  # the paper's advice (sec. 4.2): lambda_D n_D / (lambda_U n_U) in [1, 4/3]
        ratio = cfg.kto.desirable_weight * n_desirable / (cfg.kto.undesirable_weight * n_undesirable)
        if not 1 <= ratio <= 4 / 3 + 1e-9:
            log.warning("kto: desirable_weight * %d desirable / (undesirable_weight * %d undesirable) = %.3g; KTO's "
                        "authors advise [1, 4/3] (align.kto.desirable_weight / undesirable_weight)", n_desirable,
                        n_undesirable, ratio)
    settings = LoopSettings.from_config(cfg, params.seed, knobs=kto_knobs(cfg))
    lengths = unpaired_lengths(train_set)
    used = rows_trained(len(train_set), settings, lengths)  # completion and KL pair, as with_reference says
    eval_set = with_reference(source, train_set, used, eval_set, partial(add_reference_kto_logps, collate=collate),
                              cfg.batch_size * 2)
    policy = AutoModelForCausalLM.from_pretrained(source)
    log.info("kto (beta %g, weights %g / %g): %d train rows (%d desirable, %d undesirable), %d of them drawn in %d "
             "steps / %d eval rows", cfg.beta, cfg.kto.desirable_weight, cfg.kto.undesirable_weight, len(train_set),
             n_desirable, n_undesirable, len(used), cfg.max_steps, len(eval_set))
    step = make_kto_step(cfg)
    eval_batches = [collate(eval_set[i:i + cfg.batch_size]) for i in range(0, len(eval_set), cfg.batch_size)]

    def evaluate(model) -> dict[str, float]:
        """Loss and z averaged over the rows (each batch's z is its own reference point, as in training); the per-kind
        metrics tallied over every held-out row."""
        loss_sum, kl_sum, tally = 0.0, 0.0, Counter()
        for batch in eval_batches:
            batch = to_device(batch, model)
            loss, rewards, z = kto_forward(cfg, model, batch)
            n = batch["desirable"].numel()
            loss_sum, kl_sum = loss_sum + float(loss) * n, kl_sum + float(z) * n
            tally.update(kto_tallies(cfg, rewards, z, batch["desirable"]))
        return {"loss": loss_sum / len(eval_set), "kl": kl_sum / len(eval_set), **kto_metrics(tally)}

    history = train(policy, train_set, collate, step, settings, eval_fn=evaluate, on_log=run.log_step,
                    lengths=lengths,
                    **resumable(root, "align", params, root / "artifacts" / "sft", root / "data" / "prepared",
                                *feedback_files))
    with stage_output(root, "align", run, model=policy, tokenizer=tok, history=history):
        pass
    metrics = final_metrics(history, ("loss", "reward_accuracy", "kl", "eval_loss", "eval_reward_accuracy",
                                      "eval_reward_margin", "eval_kl", "eval_desirable_reward",
                                      "eval_undesirable_reward", "eval_desirable_above_z",
                                      "eval_undesirable_below_z", "tokens_per_sec"))
    metrics.update(train_rows=len(train_set), rows_drawn=len(used), eval_rows=len(eval_set),
                   train_desirable=n_desirable, train_undesirable=n_undesirable)
    metrics.update({f"{part}_rows_{what}": counter[what] for part, counter in cut.items()
                    for what in ("truncated", "dropped")})
    return metrics


def main() -> None:
    run_stage("align", body)


if __name__ == "__main__":
    main()

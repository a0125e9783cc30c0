"""Self-Instruct: ROUGE-L on hand-worked LCS numbers, each filter on hand-made cases, the parsing of numbered lists,
the bootstrap loop with scripted completions (exact kept set and drop counts), and the stage body."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest
import torch
from conftest import FakeRun

from instructflow.config import validate
from instructflow.errors import ConfigError, DataError
from instructflow.self_instruct import (
    REASONS,
    STOP,
    Candidate,
    bootstrap,
    encode_prompt,
    keyword_reason,
    language_reason,
    lcs_length,
    length_reason,
    load_seeds,
    malformed_reason,
    parse_completion,
    program_reason,
    punctuation_reason,
    rouge_l,
    rouge_tokens,
    text_reason,
)

SEEDS = ["Give me a recipe for pancakes.", "Explain photosynthesis to a child.", "Suggest a name for a pet turtle.",
         "Summarize the plot of Hamlet.", "What is the capital of Peru?", "Rewrite the sentence in passive voice.",
         "Recommend three books about history.", "Convert 10 miles to kilometers."]
KOREAN = "영화 리뷰를 긍정 또는 부정으로 분류하세요."
# round 1: two completions of "...\n9."; round 2: two more. Each candidate's fate is in the comment after it.
SCRIPT = [
    [(" Translate the sentence into French.\n"            # kept (ROUGE-L 4/11 with "Rewrite the sentence ...")
      "10. Describe the image in detail please.\n"        # keyword
      "11. Write a program that prints primes.\n"         # program
      "12. Sort these numbers ascending.\n"               # kept (no word in common with the pool)
      "13. - Bullet list of chores.\n\n"                  # punctuation
      "14. After the stop: never parsed."),
     (" translate the  sentence into french.\n"           # duplicate (case and spaces aside)
      "10. Translate this sentence into French.\n"        # similar: LCS 4 of 5 and 5 tokens, F = 0.8
      f"11. {KOREAN}\n"                                   # kept: a Hangul start passes while keep_korean
      "12. Find the")],                                   # truncated: no STOP, the token budget cut it
    ["\n\n",                                              # malformed: item 9 is empty
     (" Hi.\n"                                            # length: 1 word
      "10. ¿Qué hora es ahora mismo?\n"                   # language ('¿' is not ASCII, so not punctuation)
      "11. List five animals that live in the ocean.\n"   # kept: the 4th, n_target reached
      "12. Name a famous painter from Spain.\n\n")],      # never looked at
]


def scripted(script=SCRIPT):
    calls: list[list[str]] = []

    def complete(prompts):
        calls.append(prompts)
        return script[len(calls) - 1] if len(calls) <= len(script) else ["\n\n"] * len(prompts)

    return complete, calls


# ---------------------------------------------------------------------------------------------- ROUGE-L
def test_lcs_of_the_textbook_pair():
    assert lcs_length(list("ABCBDAB"), list("BDCABA")) == 4  # BCBA (Cormen et al.)
    assert lcs_length(list("BDCABA"), list("ABCBDAB")) == 4
    assert lcs_length([], list("AB")) == 0


def test_rouge_tokens_are_lowercase_alphanumeric_runs_plus_hangul():
    assert rouge_tokens("Hello, WORLD! it's 2-in-1") == ["hello", "world", "it", "s", "2", "in", "1"]
    assert rouge_tokens("Café 영화 리뷰를!") == ["caf", "영화", "리뷰를"]  # é is no a-z: split, as rouge_score does


@pytest.mark.parametrize("a, b, expected", [
    ("the cat sat on the mat", "the cat lay on a mat", 2 / 3),            # LCS the cat on mat: 2*4/(6+6)
    ("Sort the list of numbers.", "Sort the numbers.", 0.75),             # LCS 3: P 3/3, R 3/5, F 2*3/8
    ("a b c d", "d c b a", 0.25),                                         # LCS 1 of 4 and 4
    ("Hello, WORLD!", "hello world", 1.0),                                # case and punctuation aside
    ("a b c d e f g h i j", "a b c d e f g x y z", 0.7),                  # LCS 7 of 10 and 10: exactly 0.7
    ("영화 리뷰를 요약하세요", "영화 리뷰를 분류하세요", 2 / 3),                  # Hangul runs are tokens
    ("!!!", "anything at all", 0.0),                                      # no tokens: 0, not a division by 0
])
def test_rouge_l_on_hand_worked_lcs(a, b, expected):
    assert rouge_l(a, b) == pytest.approx(expected, abs=1e-12)
    assert rouge_l(b, a) == pytest.approx(expected, abs=1e-12)


def test_rouge_l_of_exactly_the_threshold_is_not_below_it():
    assert rouge_l("a b c d e f g h i j", "a b c d e f g x y z") >= 0.7


# ---------------------------------------------------------------------------------------------- filters
@pytest.mark.parametrize("text, reason", [
    ("Sort three numbers", "length"), ("Sort these three numbers", None),
    (" ".join(["word"] * 150), None), (" ".join(["word"] * 151), "length"), ("", "length"),
])
def test_length_keeps_4_to_150_words(text, reason):
    assert length_reason(text) == reason


@pytest.mark.parametrize("text, reason", [
    ("Describe the images below in words.", "keyword"), ("Update my profile PICTURE for me.", "keyword"),
    ("Go to the store and buy milk.", "keyword"), ("Plot twist ideas for a novel.", "keyword"),
    ("Write a profile of a poet.", None),        # "file" inside a word is no banned word
    ("Describe a mapping between two sets.", None), ("Tell me where to go tomorrow.", None),
])
def test_banned_keywords_match_whole_words_any_case(text, reason):
    assert keyword_reason(text) == reason


def test_program_punctuation_and_language_filters():
    assert program_reason("Write a program to sort a list.") == "program"
    assert program_reason("write a Program that adds numbers.") == "program"
    assert program_reason("Write a poem about programs.") is None
    assert punctuation_reason("- List three fruits please.") == "punctuation"
    assert punctuation_reason('"Quote" this sentence now.') == "punctuation"
    assert punctuation_reason("List three fruits please.") is None
    assert language_reason("Écris un poème sur la mer.") == "language"
    assert language_reason("日本語の文を翻訳してください ok") == "language"
    assert language_reason(KOREAN) is None
    assert language_reason(KOREAN, keep_korean=False) == "language"
    assert language_reason("Name a Korean dish: 비빔밥.") is None


@pytest.mark.parametrize("text, reason", [
    ("세요\ufffd\ufffdou Nrea: mm6 R er n.", "malformed"),  # what a micro model decoded byte by byte
    ("Sort the list \x1b[0m now please.", "malformed"), ("Sort the list\u0016 now please.", "malformed"),
    ("Sort the list of numbers now.", None), ("Ordne die Zahlen der Größe nach.", None),
])
def test_undecodable_bytes_and_control_characters_are_malformed(text, reason):
    assert malformed_reason(text) == reason
    assert text_reason(text) == reason


def test_a_candidate_is_dropped_by_the_first_filter_it_fails():
    assert text_reason("Write a program to draw a map.") == "keyword"  # keyword comes before program
    assert text_reason("- Draw.") == "length"
    assert text_reason("¿Qué hora es ahora mismo?") == "language"
    assert text_reason("Name three primary colors please.") is None


# ---------------------------------------------------------------------------------------------- parsing
def test_the_prompt_numbers_the_instructions_and_ends_with_the_next_number():
    assert encode_prompt(["Sort  the\nlist:", "Name a colour."]) == (
        "Come up with a series of tasks:\n1. Sort the list\n2. Name a colour.\n3.")


def test_a_well_formed_list_parses_up_to_the_stop():
    text = " Classify the sentiment of a tweet.\n10. Name three\nprimary colors.\n11. Add 3.5 and 2.\n\n12. Late."
    assert parse_completion(text, 9) == [Candidate("Classify the sentiment of a tweet."),
                                         Candidate("Name three primary colors."), Candidate("Add 3.5 and 2.")]


def test_malformed_items_empty_or_out_of_sequence():
    text = " Do the first task now.\n10.\n11. A third task here.\n13. Skipped twelve.\n1. A new list.\n\n"
    assert parse_completion(text, 9) == [
        Candidate("Do the first task now."), Candidate("", "malformed"), Candidate("A third task here."),
        Candidate("Skipped twelve.", "malformed"), Candidate("A new list.", "malformed")]
    assert parse_completion("\n\n", 9) == [Candidate("", "malformed")]
    assert parse_completion(" 1. Restarts the list.\n\n", 9) == [Candidate("", "malformed"),
                                                                   Candidate("Restarts the list.", "malformed")]


def test_the_last_item_of_a_completion_without_stop_is_truncated():
    assert parse_completion(" Name a fruit that is red.\n10. Explain why the sky", 9) == [
        Candidate("Name a fruit that is red."), Candidate("Explain why the sky", "truncated")]
    assert parse_completion(" Explain why the", 9) == [Candidate("Explain why the", "truncated")]
    assert parse_completion(" 3.5 apples and\n2 pears.\n\n", 9) == [Candidate("3.5 apples and 2 pears.")]


# ------------------------------------------------------------------------------------------------ loop
def test_bootstrap_keeps_exactly_the_candidates_that_pass_and_counts_every_drop():
    complete, calls = scripted()
    result = bootstrap(SEEDS, complete, n_target=4, prompts_per_round=2, rng=random.Random(0))
    assert result.kept == [
        {"instruction": "Translate the sentence into French.", "source": "model", "round": 1, "max_rouge_l": 0.3636},
        {"instruction": "Sort these numbers ascending.", "source": "model", "round": 1, "max_rouge_l": 0.0},
        {"instruction": KOREAN, "source": "model", "round": 1, "max_rouge_l": 0.0},
        {"instruction": "List five animals that live in the ocean.", "source": "model", "round": 2,
         "max_rouge_l": 0.1538},  # "the" with Hamlet's and French's 5 tokens: 2/13
    ]
    assert result.dropped == {"truncated": 1, "malformed": 1, "length": 1, "keyword": 1, "program": 1,
                              "punctuation": 1, "language": 1, "duplicate": 1, "similar": 1}
    assert (result.generated, result.rounds, result.prompts) == (13, 2, 4)
    assert result.metrics()["keep_rate"] == round(4 / 13, 4)
    # round 1: the 8 seeds, shuffled; round 2: 2 of the 3 kept so far and 6 seeds; each ends with "9."
    for prompt in calls[0] + calls[1]:
        assert prompt.startswith("Come up with a series of tasks:\n1. ") and prompt.endswith("\n9.")
    listed = [[line.split(". ", 1)[1] for line in p.split("\n")[1:9]] for p in calls[0] + calls[1]]
    assert all(sorted(items) == sorted(SEEDS) for items in listed[:2])
    kept_1 = {"Translate the sentence into French.", "Sort these numbers ascending.", KOREAN}
    assert [len(set(items) & kept_1) for items in listed[2:]] == [2, 2]
    assert all(len(set(items) & set(SEEDS)) == 6 for items in listed[2:])


@pytest.mark.parametrize("threshold, kept", [(0.7, 0), (0.71, 1)])
def test_a_candidate_at_the_rouge_threshold_is_dropped_as_similar(threshold, kept):
    seeds = ["a b c d e f g h i j", *SEEDS[1:]]
    complete, _ = scripted(script=[[" a b c d e f g x y z\n\n"]])  # LCS 7 of 10 and 10 with the first seed: 0.7
    result = bootstrap(seeds, complete, n_target=1, prompts_per_round=1, max_rounds=1, threshold=threshold)
    assert (len(result.kept), result.dropped["similar"]) == (kept, 1 - kept)


def test_bootstrap_stops_after_max_rounds_when_nothing_passes():
    complete, _ = scripted(script=[])
    result = bootstrap(SEEDS, complete, n_target=5, prompts_per_round=3, max_rounds=2)
    assert (result.kept, result.rounds, result.prompts, result.generated) == ([], 2, 6, 6)
    assert result.dropped == {**dict.fromkeys(REASONS, 0), "malformed": 6}
    assert result.metrics()["keep_rate"] == 0.0


def test_bootstrap_refuses_a_wrong_number_of_completions_and_too_few_seeds():
    with pytest.raises(ValueError, match="complete\\(\\) returned 1 texts for 2 prompts"):
        bootstrap(SEEDS, lambda prompts: ["x"], n_target=1, prompts_per_round=2)
    with pytest.raises(ValueError, match="a prompt takes 8 instructions, but there are only 7 seeds"):
        bootstrap(SEEDS[:7], lambda prompts: prompts, n_target=1)


# ----------------------------------------------------------------------------------------------- seeds
def write_seeds(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_the_shipped_seed_tasks_load():
    from conftest import ROOT

    seeds = load_seeds(ROOT / "data" / "raw" / "self_instruct_seed_tasks.jsonl")
    assert len(seeds) == 175 and seeds[1] == "What is the relation between the given pairs?"


@pytest.mark.parametrize("row, message", [
    ({"name": "x"}, "seeds.jsonl, line 2, field 'instruction': missing; expected a non-empty string"),
    ({"instruction": 5}, "seeds.jsonl, line 2, field 'instruction': got 5; expected a non-empty string"),
    ({"instruction": "  "}, "seeds.jsonl, line 2, field 'instruction': got '  '; expected a non-empty string"),
])
def test_a_malformed_seed_row_names_the_file_line_and_field(tmp_path, row, message):
    path = write_seeds(tmp_path / "seeds.jsonl", [{"instruction": "Fine."}, row])
    with pytest.raises(DataError) as err:
        load_seeds(path)
    assert str(err.value).endswith(message) and str(path) in str(err.value)


# ----------------------------------------------------------------------------------------------- stage
def stage_params(**section):
    return validate({"preset": "micro", "self_instruct": {"seed_path": "data/raw/seeds.jsonl", **section}})


def test_the_stage_is_off_by_default_and_writes_an_empty_data_set(tmp_path):
    from tasks.self_instruct import body

    assert body(validate({"preset": "micro"}), tmp_path, FakeRun()) == {"enabled": 0}
    assert (tmp_path / "data/self_instruct/instructions.jsonl").read_text() == ""
    assert json.loads((tmp_path / "data/self_instruct/stats.json").read_text()) == {
        "enabled": 0, "reason": "self_instruct.enabled is false in params.yaml"}


def test_the_stage_writes_the_kept_instructions_and_the_filter_statistics(tmp_path):
    from tasks.self_instruct import body

    write_seeds(tmp_path / "data/raw/seeds.jsonl", [{"instruction": s} for s in SEEDS])
    complete, _ = scripted()
    params = stage_params(enabled=True, n_instructions=4, prompts_per_round=2)
    metrics = body(params, tmp_path, FakeRun(), complete=complete)
    assert metrics == {"enabled": 1, "generated": 13, "kept": 4, "rounds": 2, "prompts": 4,
                       "keep_rate": 0.3077, **{f"dropped_{r}": 1 for r in REASONS}}
    rows = [json.loads(line) for line in (tmp_path / "data/self_instruct/instructions.jsonl").read_text().splitlines()]
    assert [(r["instruction"], r["source"], r["round"]) for r in rows] == [
        ("Translate the sentence into French.", "model", 1), ("Sort these numbers ascending.", "model", 1),
        (KOREAN, "model", 1), ("List five animals that live in the ocean.", "model", 2)]
    assert json.loads((tmp_path / "data/self_instruct/stats.json").read_text()) == {**metrics, "seeds": 8}


def test_the_stage_keeps_its_last_output_when_it_fails(tmp_path):
    from tasks.self_instruct import body

    write_seeds(tmp_path / "data/raw/seeds.jsonl", [{"instruction": s} for s in SEEDS])
    body(stage_params(enabled=True, n_instructions=4, prompts_per_round=2), tmp_path, FakeRun(),
         complete=scripted()[0])
    before = (tmp_path / "data/self_instruct/instructions.jsonl").read_bytes()

    def failing(prompts):
        raise RuntimeError("the model fell over")

    with pytest.raises(RuntimeError):
        body(stage_params(enabled=True), tmp_path, FakeRun(), complete=failing)
    with pytest.raises(ConfigError, match="n_human \\+ n_machine = 12 instructions per prompt, but .*seeds.jsonl "
                                          "has 8 seed tasks"):
        body(stage_params(enabled=True, n_human=10), tmp_path, FakeRun(), complete=failing)
    assert (tmp_path / "data/self_instruct/instructions.jsonl").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["raw", "self_instruct"]  # no temporary left


@pytest.fixture(scope="module")
def tiny_project(tmp_path_factory):
    """A project folder with a tiny random Llama and the test tokenizer saved as the sft stage saves them."""
    import torch
    from helpers_tokenizer import make_test_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("project")
    tok = make_test_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(root / "artifacts/sft")
    tok.save_pretrained(root / "artifacts/sft")
    write_seeds(root / "data/raw/seeds.jsonl", [{"instruction": s} for s in SEEDS])
    return root


def test_the_stage_samples_the_chosen_model_reproducibly(tiny_project):
    from tasks.self_instruct import body

    params = stage_params(enabled=True, model="sft", n_instructions=50, max_rounds=2, prompts_per_round=3,
                          batch_size=2, max_new_tokens=12, n_human=2, n_machine=1, temperature=1.0, top_p=1.0)
    out = tiny_project / "data/self_instruct/instructions.jsonl"
    metrics = body(params, tiny_project, FakeRun())
    first = out.read_bytes()
    assert (metrics["rounds"], metrics["prompts"]) == (2, 6)
    assert metrics["generated"] == metrics["kept"] + sum(metrics[f"dropped_{r}"] for r in REASONS) >= 6
    assert len(first.splitlines()) == metrics["kept"]
    assert body(params, tiny_project, FakeRun()) == metrics and out.read_bytes() == first  # same seed, same bytes


def test_a_completion_ending_in_eos_is_finished(tiny_project):
    from models.tokenizer import load_tokenizer
    from tasks.self_instruct import completion_text

    tok = load_tokenizer(tiny_project / "artifacts/sft")
    ids = tok("Write a poem.\n10. Sort it.", add_special_tokens=False)["input_ids"]
    assert completion_text(tok, ids + [tok.eos_token_id]) == "Write a poem.\n10. Sort it." + STOP
    assert completion_text(tok, ids) == "Write a poem.\n10. Sort it."


def test_a_model_that_is_not_there_is_named(tiny_project):
    from tasks.self_instruct import body

    with pytest.raises(ConfigError, match="self_instruct.model = 'align': .*artifacts/align: no model there"):
        body(stage_params(enabled=True, model="align"), tiny_project, FakeRun())
    with pytest.raises(ConfigError, match="self_instruct.model = 'models/none': models/none: no model there"):
        body(stage_params(enabled=True, model="models/none"), tiny_project, FakeRun())


class ScriptedLM(torch.nn.Module):
    """A causal LM whose outputs are known: after any prompt it writes `script` token by token (greedy or sampled:
    each step's logits put all the mass on the next scripted token), then EOS. It reads position_ids only, so
    it works with generate's KV-cache calls and left padding."""

    def __init__(self, script: list[int], config):
        super().__init__()
        self.script, self.config = script, config
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # where generate puts its tensors
        self.start: torch.Tensor | None = None

    def forward(self, input_ids, attention_mask=None, position_ids=None, **_):
        nxt = position_ids[:, -1] + 1  # (B,)  the position of the token to predict
        if input_ids.size(1) > 1 or self.start is None:  # a new batch of prompts
            self.start = nxt
        step = (nxt - self.start).tolist()  # (B,)
        self.furthest = max([getattr(self, "furthest", 0), *step])
        ids = [self.script[k] if k < len(self.script) else self.config.eos_token_id for k in step]
        logits = torch.full((input_ids.size(0), input_ids.size(1), self.config.vocab_size), -1e4)  # (B, T, V)
        logits[torch.arange(len(ids)), -1, torch.tensor(ids)] = 0.0
        return SimpleNamespace(logits=logits)


@pytest.mark.parametrize("ending", ["eos", "stop", "budget"])
def test_the_stage_on_a_model_whose_outputs_are_known(tiny_project, monkeypatch, ending):
    """Tokenize the prompts, sample, decode, stop, filter: the whole path on a scripted LM. It ends its list with
    EOS, or with a blank line (generation stops there: what follows is never written), or is cut by a budget 3
    tokens short of its list, so every completion loses its last item (truncated)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from models.tokenizer import load_tokenizer
    from tasks.self_instruct import body

    folder = tiny_project / "artifacts/sft"
    tok = load_tokenizer(folder)
    # the prompts list 3 instructions (n_human 2 + n_machine 1) and end with "4.": the model goes on from there
    text = (" Translate the sentence into French.\n5. Describe the image in detail please.\n"
            "6. Sort these numbers please.")
    script = tok(text, add_special_tokens=False)["input_ids"]
    budget = len(script) - 3 if ending == "budget" else 200
    if ending == "stop":
        script += tok("\n\n7. Never written at all.", add_special_tokens=False)["input_ids"]
    model = ScriptedLM(script, AutoConfig.from_pretrained(folder))
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda path: model)
    params = stage_params(enabled=True, model="sft", n_instructions=10, max_rounds=1, prompts_per_round=3,
                          batch_size=2, max_new_tokens=budget, n_human=2, n_machine=1)
    metrics = body(params, tiny_project, FakeRun())
    rows = [json.loads(r) for r in (tiny_project / "data/self_instruct/instructions.jsonl").read_text().splitlines()]
    dropped = {r: metrics[f"dropped_{r}"] for r in REASONS if metrics[f"dropped_{r}"]}
    if ending == "budget":
        assert [r["instruction"] for r in rows] == ["Translate the sentence into French."]
        assert dropped == {"keyword": 3, "duplicate": 2, "truncated": 3}
    else:  # the first completion gives 2 kept and 1 keyword; the other two repeat them
        assert [r["instruction"] for r in rows] == ["Translate the sentence into French.", "Sort these numbers please."]
        assert dropped == {"keyword": 3, "duplicate": 4}
    assert (metrics["generated"], metrics["prompts"]) == (9, 3)
    if ending == "stop":  # the rows stopped at the blank line: the tokens after it were never asked for
        assert model.furthest < len(script) - 5


def test_self_instruct_params_are_off_by_default_and_bad_values_are_named():
    assert validate({}).self_instruct.enabled is False
    with pytest.raises(ConfigError, match="self_instruct.top_p = 0: Input should be greater than 0"):
        validate({"self_instruct": {"top_p": 0}})
    with pytest.raises(ConfigError, match="unknown key 'self_instruct.n_seeds'"):
        validate({"self_instruct": {"n_seeds": 6}})

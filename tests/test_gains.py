"""Per-stage gains: the paired gain and its interval, their round trip through a metrics file, the gain table,
and the simple baselines (TF-IDF pairwise, length) on hand-made pairs whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

from models.classification import length_baseline, tfidf_pairwise_baseline
from models.stats import Gain, baseline_flags, gain_metrics, gain_table, gains_from_metrics, paired_gain

# --- the paired gain ---------------------------------------------------------------------------------


def test_gain_is_the_mean_paired_difference():
    # model hits 3 of 4, baseline 1 of 4 (item 2 both): 0.75 - 0.25 = 0.5 = mean of the differences [1, 0, 1, 0]
    g = paired_gain("sft", "exact_match", "base", [1, 1, 1, 0], [0, 1, 0, 0])
    assert (g.model_value, g.baseline_value, g.gain, g.n) == (0.75, 0.25, 0.5, 4)
    assert g.id == "sft.exact_match.all.base" and g.where == "exact_match"


def test_two_items_interval_by_hand_contains_zero():
    # differences [1, 0]: a resample's mean is 0 (both picks item 2, p = 1/4), 0.5 (p = 1/2) or 1 (p = 1/4), so the
    # 2.5% and 97.5% quantiles are 0 and 1: the interval [0, 1] touches 0 and the stage does not beat its baseline
    g = paired_gain("reward", "accuracy", "length", [1.0, 1.0], [0.0, 1.0], n_resamples=2000, seed=3)
    assert g.gain == 0.5 and (g.ci_low, g.ci_high) == (0.0, 1.0)
    assert not g.beats


def test_no_difference_on_average_gives_an_interval_around_zero():
    model = [1.0, 0.0] * 20
    baseline = [0.0, 1.0] * 20  # wins and losses balance: gain 0
    g = paired_gain("align", "exact_match", "sft", model, baseline)
    assert g.gain == 0 and g.ci_low < 0 < g.ci_high and not g.beats


def test_a_clear_gain_has_an_interval_above_zero():
    # 40 items, the model hits all, the baseline 10: gain 0.75, half-width about 1.96 * sqrt(.75 * .25 / 40) = 0.134
    g = paired_gain("sft", "exact_match", "base", [1.0] * 40, [1.0] * 10 + [0.0] * 30)
    assert g.gain == 0.75 and g.beats
    assert 0.55 < g.ci_low < 0.7 and 0.8 < g.ci_high <= 1.0


def test_a_loss_is_flagged():
    g = paired_gain("reward", "accuracy", "tfidf", [0.0] * 30 + [1.0] * 10, [1.0] * 40)
    assert g.gain == -0.75 and g.ci_high < 0 and not g.beats


def test_pairing_cancels_what_the_items_share():
    # item difficulty varies enormously, but the model is exactly 1 better on every item: the paired interval is the
    # point 1 (every resample's difference is 1), where two independent intervals would overlap widely
    baseline = np.linspace(0, 100, 50)
    g = paired_gain("x", "score", "y", baseline + 1, baseline)
    assert (g.gain, g.ci_low, g.ci_high) == pytest.approx((1.0, 1.0, 1.0))
    assert g.beats


def test_a_statistic_over_rows_such_as_spearman():
    # the similarity stage's case: items are rows [prediction, gold]; the model ranks like gold (rho 1), the baseline
    # in reverse (rho -1): gain 2 on every resample (ties in a resample are tied in both columns alike)
    gold = np.arange(20.0)

    def rho(rows: np.ndarray) -> float:
        return spearmanr(rows[:, 0], rows[:, 1]).statistic

    g = paired_gain("similarity", "spearman", "tfidf_cosine", np.c_[gold * 2, gold], np.c_[-gold, gold],
                    n_resamples=200, statistic=rho)
    assert (g.model_value, g.baseline_value, g.gain) == pytest.approx((1.0, -1.0, 2.0))
    assert (g.ci_low, g.ci_high) == pytest.approx((2.0, 2.0)) and g.beats


def test_paired_gain_is_seeded():
    a, b = [1, 0, 1, 1, 0, 1], [0, 0, 1, 0, 1, 0]
    assert paired_gain("s", "m", "b", a, b, seed=7) == paired_gain("s", "m", "b", a, b, seed=7)


@pytest.mark.parametrize("model, baseline, message", [([], [], "at least one item"),
                                                      ([1, 0], [1], "2 for the model and 1 for the baseline")])
def test_paired_gain_needs_paired_items(model, baseline, message):
    with pytest.raises(ValueError, match=message):
        paired_gain("s", "m", "b", model, baseline)


@pytest.mark.parametrize("field, value", [("stage", "a.b"), ("baseline", "tfidf_n"), ("metric", "")])
def test_names_must_be_slugs_the_metrics_keys_can_carry(field, value):
    names = {"stage": "s", "metric": "m", "subset": "all", "baseline": "b", field: value}
    with pytest.raises(ValueError, match=f"gain {field} must be a non-empty slug"):
        Gain(**names, model_value=1, baseline_value=0, gain=1, ci_low=0.5, ci_high=1, n=3)


# --- through the metrics files -----------------------------------------------------------------------


def test_gains_round_trip_through_flat_numeric_metrics():
    gains = [paired_gain("sft", "exact_match", "base", [1] * 10, [0] * 10, subset="translate"),
             paired_gain("reward", "accuracy", "tfidf", [1, 0, 1, 0], [1, 1, 1, 0], subset="real")]
    flat = gain_metrics(gains)
    assert flat["gain.sft.exact_match.translate.base"] == 1.0 and flat["beats.sft.exact_match.translate.base"] == 1.0
    assert flat["gain.reward.accuracy.real.tfidf"] == -0.25 and flat["beats.reward.accuracy.real.tfidf"] == 0.0
    assert flat["gain.reward.accuracy.real.tfidf_model"] == 0.5
    assert flat["gain.reward.accuracy.real.tfidf_baseline"] == 0.75 and flat["gain.reward.accuracy.real.tfidf_n"] == 4
    assert all(isinstance(v, (int, float)) for v in flat.values())  # DVC and MLflow take numbers only
    # other metrics in the same file (a `<key>_ci_low` convention included) are not gains
    assert gains_from_metrics({"exact_match": 0.5, "exact_match_ci_low": 0.1, **flat, "gain.odd": 1.0}) == gains
    with pytest.raises(ValueError, match="appears twice"):
        gain_metrics(gains + gains[:1])


def test_gain_table_rows_and_verdicts():
    gains = [Gain("sft", "exact_match", "all", "base", 0.5, 0.0, 0.5, 0.25, 0.75, 16),
             Gain("reward", "accuracy", "real", "tfidf", 0.55, 0.61, -0.06, -0.12, 0.01, 40)]
    lines = gain_table(gains, 0.95)
    assert lines[0] == "| stage | metric | model | baseline | gain [95% CI] | n | verdict |"
    assert lines[2] == "| sft | exact_match | 0.5000 | base model 0.0000 | +0.5000 [+0.2500, +0.7500] | 16 | beats baseline |"
    assert lines[3] == ("| reward | accuracy (real) | 0.5500 | TF-IDF 0.6100 | -0.0600 [-0.1200, +0.0100] | 40 | "
                        "**does not beat its baseline** |")
    assert gains[1].describe() == "accuracy (real): 0.55 vs TF-IDF 0.61, gain -0.060 [-0.120, +0.010]"


# --- the baselines -----------------------------------------------------------------------------------


def test_length_baseline_longer_wins_ties_half():
    pairs = [("a long and detailed answer", "short"), ("no", "a longer rejected answer"), ("같은", "길이")]
    assert length_baseline(pairs) == [1.0, 0.0, 0.5]
    assert np.mean(length_baseline(pairs)) == 0.5


PROMPTS = ["How do I bake bread?", "What is the capital of France?", "Can you help me with my homework?",
           "Tell me about the weather.", "How do I fix a flat tyre?", "빵은 어떻게 굽나요?", "숙제 좀 도와줄래요?"]


def test_tfidf_pairwise_learns_what_chosen_responses_share():
    # training: polite helpful answers are chosen over rude refusals
    train = [(f"{p}\nSure, happy to help: here is how.", f"{p}\nNo. Go away.") for p in PROMPTS]
    test = [("Where is the station?\nSure, happy to help: it is here.", "Where is the station?\nNo, go away."),
            ("Explain gravity.\nGo away, no.", "Explain gravity.\nSure, happy to help with this.")]  # chosen is rude
    outcomes = tfidf_pairwise_baseline(train, test)
    assert outcomes == [1.0, 0.0]
    # antisymmetric: swapping the responses flips every outcome; two equal responses tie exactly
    assert tfidf_pairwise_baseline(train, [(b, a) for a, b in test]) == [0.0, 1.0]
    assert tfidf_pairwise_baseline(train, [("same text", "same text")]) == [0.5]


def test_tfidf_pairwise_is_not_fooled_by_length_alone():
    # chosen answers are the SHORT ones here: length gets every test pair wrong, TF-IDF gets them right
    train = [(f"{p}\nYes, correct.", f"{p}\nWell, let me ramble about something unrelated for quite a while.")
             for p in PROMPTS]
    test = [("Q?\nYes, correct.", "Q?\nWell, let me ramble about unrelated things for quite a long while.")] * 3
    assert tfidf_pairwise_baseline(train, test) == [1.0] * 3
    assert length_baseline([(a.split("\n")[1], b.split("\n")[1]) for a, b in test]) == [0.0] * 3


def test_tfidf_pairwise_needs_pairs():
    with pytest.raises(ValueError, match="needs training and test pairs, got 0 and 1"):
        tfidf_pairwise_baseline([], [("a", "b")])


def test_flags_name_each_failing_comparison_grouped_by_stage():
    gains = [Gain("reward", "accuracy", "synthetic", "tfidf", 0.9, 0.6, 0.3, 0.2, 0.4, 100),
             Gain("reward", "accuracy", "real", "tfidf", 0.55, 0.61, -0.06, -0.12, 0.01, 100),
             Gain("reward", "accuracy", "real", "length", 0.55, 0.5, 0.05, 0.0, 0.1, 100),  # touches 0: flagged
             Gain("sft", "exact_match", "all", "base", 0.5, 0.0, 0.5, 0.3, 0.7, 200)]
    assert baseline_flags(gains) == [
        "does not beat its baseline: reward (accuracy (real): 0.55 vs TF-IDF 0.61, gain -0.060 [-0.120, +0.010]; "
        "accuracy (real): 0.55 vs length 0.5, gain +0.050 [+0.000, +0.100])"]
    assert baseline_flags(gains[:1] + gains[3:]) == []


def test_judged_prompts_take_half_synthetic_half_real_and_give_a_short_subsets_room_away():
    from tasks.evaluate import judged_prompts

    real = [{"messages": [{"role": "user", "content": f"real {i}"}]} for i in range(2)]
    pref = ([{"prompt": [{"role": "user", "content": f"task {i}"}], "source": "synthetic"} for i in range(5)]
            + [{"prompt": [{"role": "user", "content": f"hh {i}"}], "source": "hh.jsonl"} for i in range(3)])
    texts = lambda judged: [(m[0]["content"], s) for m, s in judged]
    assert texts(judged_prompts(real, pref, 6)) == [("task 0", "synthetic"), ("task 1", "synthetic"),
                                                    ("task 2", "synthetic"), ("real 0", "real"), ("real 1", "real"),
                                                    ("hh 0", "real")]
    # 5 real prompts in all: the synthetic side takes the rest of 12
    assert [s for _, s in judged_prompts(real, pref, 12)].count("synthetic") == 5
    assert [s for _, s in judged_prompts(real, pref, 12)].count("real") == 5
    assert [s for _, s in judged_prompts(real, pref[5:], 4)] == ["real"] * 4  # no synthetic prompts

"""Paired two-level bootstrap (llava_contrastive.evaluation.stats) against hand-computed and exact cases."""
from __future__ import annotations

import numpy as np
import pytest

from llava_contrastive.evaluation.stats import AVERAGE, BenchmarkUnits, compare, metric_value


def mean_units(values, prefix="q"):
    return BenchmarkUnits("mean", [f"{prefix}{i:04d}" for i in range(len(values))], np.asarray(values, float)[:, None])


def test_hand_computed_point_estimates():
    # bench "x" (mean): A = 50, 75 -> 62.5; B = 75, 100 -> 87.5; difference 25
    # bench "pope" (f1): A seed 0 tp2 fp1 fn1 -> 2*2/(4+1+1) = 66.667; seed 1 tp2 fp0 fn0 -> 100; mean 83.333
    #                    B both seeds tp2 fp0 fn0 -> 100; difference 16.667
    pope_a0 = BenchmarkUnits("f1", ["a", "b", "c", "d"], [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0]])
    pope_a1 = BenchmarkUnits("f1", ["a", "b", "c", "d"], [[1, 0, 0], [0, 0, 0], [0, 0, 0], [1, 0, 0]])
    pope_b = BenchmarkUnits("f1", ["a", "b", "c", "d"], [[1, 0, 0], [0, 0, 0], [0, 0, 0], [1, 0, 0]])
    res = {
        "ntp": {0: {"x": mean_units([1, 0, 1, 0]), "pope": pope_a0}, 1: {"x": mean_units([1, 1, 1, 0]), "pope": pope_a1}},
        "joint": {0: {"x": mean_units([1, 1, 1, 0]), "pope": pope_b}, 1: {"x": mean_units([1, 1, 1, 1]), "pope": pope_b}},
    }
    c = compare(res, "ntp", "joint", draws=200, seed=1)
    assert c.benchmarks == ["pope", "x"] and c.seeds == [0, 1]
    assert c.per_seed_a["x"] == [50.0, 75.0] and c.per_seed_b["x"] == [75.0, 100.0]
    assert c.score_a["x"].estimate == pytest.approx(62.5)
    assert c.diff["x"].estimate == pytest.approx(25.0)
    assert c.per_seed_a["pope"] == pytest.approx([200 / 3, 100.0])
    assert c.diff["pope"].estimate == pytest.approx(100 - (200 / 3 + 100) / 2)
    assert c.score_a[AVERAGE].estimate == pytest.approx((62.5 + (200 / 3 + 100) / 2) / 2)
    assert c.diff[AVERAGE].estimate == pytest.approx((25.0 + 100 - (200 / 3 + 100) / 2) / 2)
    for iv in c.diff.values():
        assert iv.low <= iv.high


def test_question_level_bootstrap_matches_exact_distribution():
    # one seed, two questions; A wrong on both, B right on q0 only. A resample holds q0 k = 0, 1, 2
    # times with probability 1/4, 1/2, 1/4, so the difference is 0, 50, 100 with those probabilities.
    res = {"a": {0: {"x": mean_units([0, 0])}}, "b": {0: {"x": mean_units([1, 0])}}}
    c = compare(res, "a", "b", draws=4000, seed=3)
    assert c.diff["x"].estimate == 50.0
    assert (c.diff["x"].low, c.diff["x"].high) == (0.0, 100.0)
    c80 = compare(res, "a", "b", draws=4000, seed=3, level=0.4)  # 30th..70th percentile: both 50
    assert (c80.diff["x"].low, c80.diff["x"].high) == (50.0, 50.0)


def test_seed_level_bootstrap_matches_exact_distribution():
    # questions are all alike within a seed, so only the seed resampling varies: per-seed differences
    # 0 and 100; the mean of two seeds drawn with replacement is 0, 50, 100 w.p. 1/4, 1/2, 1/4.
    res = {"a": {0: {"x": mean_units([0, 0, 0])}, 7: {"x": mean_units([0, 0, 0])}},
           "b": {0: {"x": mean_units([0, 0, 0])}, 7: {"x": mean_units([1, 1, 1])}}}
    c = compare(res, "a", "b", draws=4000, seed=0)
    assert c.diff["x"].estimate == 50.0
    assert (c.diff["x"].low, c.diff["x"].high) == (0.0, 100.0)
    c40 = compare(res, "a", "b", draws=4000, seed=0, level=0.4)
    assert (c40.diff["x"].low, c40.diff["x"].high) == (50.0, 50.0)


def test_identical_arms_give_exactly_zero_with_degenerate_interval():
    rng = np.random.default_rng(0)
    seeds = {s: {"x": mean_units(rng.integers(0, 2, 300)),
                 "pope": BenchmarkUnits("f1", [str(i) for i in range(50)], rng.integers(0, 2, (50, 3)))}
             for s in range(3)}
    c = compare({"a": seeds, "b": seeds}, "a", "b", draws=300, seed=5)
    for b in ["x", "pope", AVERAGE]:
        assert (c.diff[b].estimate, c.diff[b].low, c.diff[b].high) == (0.0, 0.0, 0.0)
        assert c.score_a[b].low < c.score_a[b].high  # the scores themselves do vary


def synthetic(rng, p_a, p_b, seeds=5, n=1000):
    return ({s: {"x": mean_units(rng.random(n) < p_a)} for s in range(seeds)},
            {s: {"x": mean_units(rng.random(n) < p_b)} for s in range(seeds)})


def test_known_true_difference_is_covered():
    # B answers right with probability 0.6, A with 0.5: the true difference is 10 points.
    rng = np.random.default_rng(42)
    covered, widths = 0, []
    for _ in range(20):
        a, b = synthetic(rng, 0.5, 0.6)
        c = compare({"a": a, "b": b}, "a", "b", draws=400, seed=0)
        covered += c.diff["x"].low <= 10.0 <= c.diff["x"].high
        widths.append(c.diff["x"].high - c.diff["x"].low)
    # sd of the 5-seed mean difference: 100 * sqrt((.25 + .24) / 1000 / 5) = 0.99 points; the two-level
    # bootstrap counts the question noise at both levels, so its 95% width is about 1.4 * 3.9 points
    assert covered >= 18
    assert 2.5 < float(np.mean(widths)) < 8.0


def test_deterministic_given_seed():
    rng = np.random.default_rng(1)
    a, b = synthetic(rng, 0.5, 0.55, seeds=3, n=200)
    c1 = compare({"a": a, "b": b}, "a", "b", draws=300, seed=9).as_dict()
    c2 = compare({"a": a, "b": b}, "a", "b", draws=300, seed=9).as_dict()
    c3 = compare({"a": a, "b": b}, "a", "b", draws=300, seed=10).as_dict()
    assert c1 == c2
    assert c1["diff"]["x"] != c3["diff"]["x"]


def test_pairs_only_shared_seeds_and_refuses_other_questions():
    rng = np.random.default_rng(2)
    a, b = synthetic(rng, 0.5, 0.5, seeds=3, n=20)
    del b[2]
    assert compare({"a": a, "b": b}, "a", "b", draws=10).seeds == [0, 1]
    b[1]["x"] = mean_units(np.ones(20), prefix="other")
    with pytest.raises(ValueError, match="other questions"):  # seeds of one arm disagree
        compare({"a": a, "b": b}, "a", "b", draws=10)
    b[0]["x"] = mean_units(np.ones(20), prefix="other")
    with pytest.raises(ValueError, match="different questions"):  # arms disagree
        compare({"a": a, "b": b}, "a", "b", draws=10)
    with pytest.raises(ValueError, match="no results"):
        compare({"a": a}, "a", "b")


def test_metric_value_f1_zero_denominator_and_unknown_metric():
    assert metric_value("f1", np.array([0.0, 0.0, 0.0]), 3) == 0.0
    with pytest.raises(ValueError):
        BenchmarkUnits("median", ["a"], [[1.0]])


def test_categories_macro_average_and_stratified_resampling():
    # category "a": [1, 0] -> 50; "b": [1, 1, 1, 0] -> 75; macro 62.5 (the pooled mean would be 66.7)
    u = BenchmarkUnits("mean", ["a1", "a2", "b1", "b2", "b3", "b4"], np.array([1, 0, 1, 1, 1, 0.0])[:, None],
                       categories=["a", "a", "b", "b", "b", "b"])
    assert u.score() == pytest.approx(62.5)
    # one unit per category: resampling within categories cannot change anything -> degenerate interval,
    # while a pooled resample of the same two units would vary
    one = lambda v, cats: BenchmarkUnits("mean", ["x", "y"], np.array(v, float)[:, None], categories=cats)  # noqa: E731
    c = compare({"a": {0: {"q": one([0, 0], ["p", "q"])}}, "b": {0: {"q": one([1, 0], ["p", "q"])}}}, "a", "b", draws=300)
    assert (c.diff["q"].estimate, c.diff["q"].low, c.diff["q"].high) == (50.0, 50.0, 50.0)
    c = compare({"a": {0: {"q": one([0, 0], None)}}, "b": {0: {"q": one([1, 0], None)}}}, "a", "b", draws=300)
    assert (c.diff["q"].low, c.diff["q"].high) == (0.0, 100.0)


def test_macro_f1_over_categories_hand_computed():
    # POPE-like: category r tp2 fp1 fn1 -> F1 2*2/(4+1+1) = 66.667; category p tp1 fp0 fn0 (and a tn)
    # -> 100; macro (66.667 + 100) / 2
    rows = [[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0], [0, 0, 0]]
    u = BenchmarkUnits("f1", list("abcdef"), rows, categories=["r", "r", "r", "r", "p", "p"])
    assert u.score() == pytest.approx((200 / 3 + 100) / 2)


def test_t_interval_against_a_hand_computed_case():
    from llava_contrastive.evaluation.stats import t_interval, t_quantile_975

    # values 1, 2, 6: mean 3, sd sqrt(7) = 2.6458, half width 4.303 * 2.6458 / sqrt(3) = 6.5727
    mean, lo, hi = t_interval([1.0, 2.0, 6.0])
    assert mean == 3.0 and abs(lo - (3 - 6.5727)) < 1e-3 and abs(hi - (3 + 6.5727)) < 1e-3
    assert t_quantile_975(11) == t_quantile_975(10) == 2.228  # between table entries: the lower df
    m, lo1, hi1 = t_interval([0.5])
    assert m == 0.5 and lo1 != lo1 and hi1 != hi1  # nan

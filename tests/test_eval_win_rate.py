"""Win-rate, ties, bootstrap CI and length-controlled win-rate on hand-checked cases."""
from __future__ import annotations

import math

import numpy as np
import pytest

from definemed.eval.stats import bootstrap_ci, mean_ci
from definemed.eval.win_rate import (PairResult, combine_orders, fit_logistic, length_controlled_win_rate,
                                     length_feature, position_consistency, summarize, win_rate)


def test_combine_orders_agreement_disagreement_and_unparsed():
    # candidate first (position A) then second (position B)
    assert combine_orders("A", "B") == ("win", True)
    assert combine_orders("B", "A") == ("loss", True)
    assert combine_orders("tie", "tie") == ("tie", True)
    # a judge that always prefers position A: disagreement -> tie, inconsistent
    assert combine_orders("A", "A") == ("tie", False)
    assert combine_orders("B", "B") == ("tie", False)
    assert combine_orders("A", "tie") == ("tie", False)
    assert combine_orders("unparsed", "B") == ("unparsed", None)
    assert combine_orders("A", "unparsed") == ("unparsed", None)


def test_win_rate_hand_checked():
    # 3 wins, 1 tie, 1 loss, 2 unparsed: (3 + 0.5) / 5, unparsed left out of n
    est = win_rate(["win", "win", "win", "tie", "loss", "unparsed", "unparsed"])
    assert est.value == pytest.approx(0.7)
    assert est.n == 5
    assert est.lo <= 0.7 <= est.hi
    assert 0.0 <= est.lo < est.hi <= 1.0
    # all ties are exactly 0.5 with a degenerate CI
    est = win_rate(["tie"] * 6)
    assert (est.value, est.lo, est.hi) == (0.5, 0.5, 0.5)
    assert math.isnan(win_rate(["unparsed"]).value)


def test_bootstrap_ci_matches_normal_approximation_and_is_seeded():
    rng = np.random.default_rng(1)
    x = rng.binomial(1, 0.3, size=400).astype(float)
    est = mean_ci(x, n_boot=4000, seed=3)
    se = x.std() / math.sqrt(len(x))
    assert est.lo == pytest.approx(x.mean() - 1.96 * se, abs=0.012)
    assert est.hi == pytest.approx(x.mean() + 1.96 * se, abs=0.012)
    assert mean_ci(x, seed=3) == mean_ci(x, seed=3)
    # the generic path agrees with the vectorised one
    gen = bootstrap_ci(x, stat=lambda a: float(a.mean()), n_boot=1000, seed=3)
    assert gen.value == pytest.approx(est.value)
    assert gen.lo == pytest.approx(est.lo, abs=0.02) and gen.hi == pytest.approx(est.hi, abs=0.02)


def test_position_consistency():
    est = position_consistency([True, True, False, None, True])
    assert est.value == pytest.approx(0.75) and est.n == 4


def test_lc_equals_raw_when_lengths_equal():
    outcomes = ["win"] * 6 + ["tie"] * 2 + ["loss"] * 2  # raw 0.7
    est = length_controlled_win_rate(outcomes, [100] * 10, [100] * 10, n_boot=50)
    assert est.value == pytest.approx(0.7, abs=1e-4)


def test_lc_two_groups_closed_form():
    # Candidate longer in 30 pairs (wins 24 = 0.8), shorter in 10 pairs (wins 5 = 0.5).
    # Two groups at x=+t and x=-t: the fit is saturated, so logit p(+)=b0+b1 t and logit p(-)=b0-b1 t, hence
    # b0 = (logit .8 + logit .5)/2 = ln 2 and LC = sigmoid(ln 2) = 2/3, below the raw (24+5)/40 = 0.725.
    outcomes = ["win"] * 24 + ["loss"] * 6 + ["win"] * 5 + ["loss"] * 5
    len_c = [300] * 30 + [100] * 10
    len_o = [200] * 40
    est = length_controlled_win_rate(outcomes, len_c, len_o, n_boot=100)
    assert win_rate(outcomes).value == pytest.approx(0.725)
    assert est.value == pytest.approx(2 / 3, abs=2e-3)
    assert est.lo < est.value < est.hi


def test_lc_recovers_intercept_from_simulated_length_bias():
    # The candidate is no better at equal length (b0 = 0) but wins when longer (b1 = 2): raw is inflated,
    # LC is about 0.5.
    rng = np.random.default_rng(0)
    d = rng.normal(80, 100, size=4000)  # candidate mostly longer
    x = length_feature(d)
    p = 1 / (1 + np.exp(-(0.0 + 2.0 * x)))
    y = rng.random(4000) < p
    outcomes = ["win" if w else "loss" for w in y]
    raw = win_rate(outcomes).value
    lc = length_controlled_win_rate(outcomes, d, np.zeros_like(d), n_boot=20).value
    assert raw > 0.6
    assert lc == pytest.approx(0.5, abs=0.04)
    b = fit_logistic(x, y.astype(float))
    assert b[1] == pytest.approx(2.0, abs=0.25)


def test_lc_all_wins_saturates_without_crashing():
    est = length_controlled_win_rate(["win"] * 5, [10, 20, 30, 40, 50], [15] * 5, n_boot=20)
    assert est.value > 0.99


def test_summarize_counts():
    rs = [PairResult("p1", "m", "o", "win", True, 10, 5), PairResult("p2", "m", "o", "tie", False, 5, 5),
          PairResult("p3", "m", "o", "unparsed", None, 5, 5), PairResult("p4", "m", "o", "loss", True, 1, 5)]
    s = summarize(rs, n_boot=100)
    assert (s["n"], s["win"], s["tie"], s["loss"], s["unparsed"]) == (3, 1, 1, 1, 1)
    assert s["win_rate"]["value"] == pytest.approx(0.5)
    assert s["position_consistency"]["value"] == pytest.approx(2 / 3)

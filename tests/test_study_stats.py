"""benchmarks/study/stats.py: the verdict rules (noise, directional test, TOST equivalence, Holm)."""

import math
import sys
from pathlib import Path

import pytest
from scipy import stats as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from study import stats  # noqa: E402


def test_pooled_sd_weights_groups_by_degrees_of_freedom():
    p = stats.pooled_sd([[0.30, 0.31], [0.40, 0.42, 0.44], [0.5]])  # the single value adds nothing
    expected = math.sqrt((1 * 0.00005 + 2 * 0.0004) / 3)
    assert p.df == 3 and p.sd == pytest.approx(expected)
    assert stats.pooled_sd([[0.3], [0.4]]) == stats.Pooled(None, 0)


def test_difference_noise_takes_the_larger_source_and_needs_a_seed_estimate():
    pooled = stats.Pooled(0.01, 4)
    n = stats.difference_noise(2, pooled, 0.5, 10_000)
    assert n.source == "seeds" and n.df == 4 and n.se == pytest.approx(math.sqrt(2) * 0.01 / math.sqrt(2))
    tiny = stats.Pooled(1e-5, 4)  # seeds agree to 0.001 points: the test set's sampling noise dominates
    n = stats.difference_noise(2, tiny, 0.5, 10_000)
    assert n.source == "test set" and math.isinf(n.df)
    assert n.se == pytest.approx(math.sqrt(2 * 0.25 / 10_000) / math.sqrt(2))
    assert stats.difference_noise(3, stats.Pooled(0.01, 1), 0.5, 10_000) is None  # df < 2: no verdict
    assert stats.difference_noise(3, stats.Pooled(None, 0), 0.5, 10_000) is None


def test_directional_test_is_a_two_sided_t_test_with_a_direction():
    noise = stats.Noise(0.01, 4.0, "seeds")
    t = stats.directional_test(0.03, noise)
    assert t.outcome == "holds" and t.p == pytest.approx(2 * st.t.sf(3.0, 4))
    t = stats.directional_test(-0.03, noise)
    assert t.outcome == "does not hold" and t.p == pytest.approx(2 * st.t.sf(3.0, 4))
    assert stats.directional_test(0.0, noise).p == pytest.approx(1.0)
    normal = stats.directional_test(0.02, stats.Noise(0.01, math.inf, "test set"))
    assert normal.p == pytest.approx(2 * st.norm.sf(2.0))


def test_equivalence_is_tost_and_beyond_the_margin_does_not_hold():
    noise = stats.Noise(0.002, 6.0, "seeds")
    eq = stats.equivalence_test(0.001, 0.01, noise)  # well inside +-1 point
    assert eq.outcome == "holds"
    assert eq.p == pytest.approx(max(st.t.sf((0.001 + 0.01) / 0.002, 6), st.t.sf((0.01 - 0.001) / 0.002, 6)))
    far = stats.equivalence_test(-0.03, 0.01, noise)  # 3 points apart: shown outside the margin
    assert far.outcome == "does not hold" and far.p == pytest.approx(st.t.sf((0.03 - 0.01) / 0.002, 6))
    weak = stats.equivalence_test(0.0, 0.01, stats.Noise(0.02, 2.0, "seeds"))  # too noisy to show either
    assert weak.p > 0.05 and stats.verdict(weak, weak.p <= 0.05) == "inconclusive"


def test_holm_step_down():
    # m = 4: thresholds 0.0125, 0.0167, 0.025, 0.05; stops at the first p above its threshold
    p = {"a": 0.001, "b": 0.015, "c": 0.03, "d": 0.04}
    assert stats.holm(p) == {"a", "b"}
    assert stats.holm({"a": 0.001, "b": 0.015, "c": 0.024, "d": 0.04}) == {"a", "b", "c", "d"}
    assert stats.holm({"a": 0.2}) == set() and stats.holm({}) == set()
    assert stats.verdict(None, False).startswith("pending")
    assert stats.verdict(stats.Test(0.001, "does not hold"), True) == "does not hold"

"""The study's statistics: noise of a difference, directional tests, equivalence (TOST), Holm's correction.

Pure functions of numbers (no files, no torch), unit-tested in tests/test_study_stats.py. The rules they
implement are written out in the report (docs/RESULTS.md, "Verdict rules"); change both together.

Noise model of a paired difference ``d = mean over seeds of (A_s - B_s)`` with ``n`` seeds: the standard error
is the larger of

* test-set sampling noise, ``sqrt(2 p (1 - p) / n_test) / sqrt(n)`` (``p`` the accuracy level; a normal
  approximation, treated as known: infinite degrees of freedom), and
* seed noise, ``sqrt(2) * s_pooled / sqrt(n)``, with ``s_pooled`` the seed standard deviation pooled over every
  main run that has >= 2 seeds (``df`` = the pooled degrees of freedom; Student's t).

A verdict needs a seed-noise estimate (pooled ``df >= 2``): with fewer seeds the row is "pending".
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from scipy import stats as _st

ALPHA = 0.05  #: family-wise error rate (Holm) and the TOST level
MIN_POOLED_DF = 2  #: seed-noise degrees of freedom a verdict needs


@dataclass(frozen=True)
class Pooled:
    """Seed standard deviation pooled over groups (one variant's runs on several seeds, one encoder per run)."""

    sd: float | None
    df: int


def pooled_sd(groups: list[list[float]]) -> Pooled:
    """``sqrt(sum (n_i - 1) s_i^2 / sum (n_i - 1))`` over the groups with >= 2 values."""
    num, df = 0.0, 0
    for g in groups:
        if len(g) >= 2:
            num += (len(g) - 1) * statistics.variance(g)
            df += len(g) - 1
    return Pooled(math.sqrt(num / df) if df else None, df)


@dataclass(frozen=True)
class Noise:
    se: float   #: standard error of the mean paired difference
    df: float   #: degrees of freedom of ``se`` (math.inf: normal)
    source: str  #: "seeds" or "test set"


def difference_noise(n_seeds: int, pooled: Pooled, level: float | None, n_test: int | None) -> Noise | None:
    """The standard error of a mean paired difference over ``n_seeds`` seeds (module docstring); None when
    there is no seed-noise estimate with at least :data:`MIN_POOLED_DF` degrees of freedom."""
    if pooled.sd is None or pooled.df < MIN_POOLED_DF or n_seeds < 1:
        return None
    seed_se = math.sqrt(2) * pooled.sd / math.sqrt(n_seeds)
    test_se = 0.0
    if level is not None and n_test:
        p = min(max(level, 0.01), 0.99)
        test_se = math.sqrt(2 * p * (1 - p) / n_test) / math.sqrt(n_seeds)
    if max(test_se, seed_se) == 0.0:  # identical values everywhere: no usable estimate
        return None
    if test_se > seed_se:
        return Noise(test_se, math.inf, "test set")
    return Noise(seed_se, float(pooled.df), "seeds")


def sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with ``df`` degrees of freedom (normal when infinite)."""
    return float(_st.norm.sf(t)) if math.isinf(df) else float(_st.t.sf(t, df))


@dataclass(frozen=True)
class Test:
    """One row's test: the smaller of two one-sided p-values and what rejecting it would mean."""

    p: float
    outcome: str  #: "holds" or "does not hold" if the test rejects


def directional_test(gain: float, noise: Noise) -> Test:
    """"A better than B" with ``gain`` = how much A is better (positive: in the claimed direction).

    Two one-sided tests, reported as one two-sided test: p = 2 min(P(T > g/se), P(T < g/se)); rejecting it
    says "holds" when the gain is positive, "does not hold" when it is negative."""
    t = gain / noise.se
    p_for, p_against = sf(t, noise.df), sf(-t, noise.df)
    return Test(min(1.0, 2 * min(p_for, p_against)), "holds" if p_for <= p_against else "does not hold")


def equivalence_test(d: float, margin: float, noise: Noise) -> Test:
    """"A equals B within +-margin": TOST (two one-sided tests) for "holds", and the one-sided test that
    |d| exceeds the margin for "does not hold"; the row keeps the smaller p with its outcome."""
    p_tost = max(sf((d + margin) / noise.se, noise.df), sf((margin - d) / noise.se, noise.df))
    p_outside = sf((abs(d) - margin) / noise.se, noise.df)
    return Test(p_tost, "holds") if p_tost <= p_outside else Test(p_outside, "does not hold")


def holm(pvalues: dict, alpha: float = ALPHA) -> set:
    """Keys whose hypotheses Holm's step-down procedure rejects at family-wise level ``alpha``."""
    ordered = sorted(pvalues.items(), key=lambda kv: kv[1])
    m, rejected = len(ordered), set()
    for i, (key, p) in enumerate(ordered):
        if p > alpha / (m - i):
            break
        rejected.add(key)
    return rejected


def verdict(test: Test | None, rejected: bool) -> str:
    if test is None:
        return "pending: no seed-noise estimate yet"
    return test.outcome if rejected else "inconclusive"


__all__ = ["ALPHA", "MIN_POOLED_DF", "Noise", "Pooled", "Test", "difference_noise", "directional_test",
           "equivalence_test", "holm", "pooled_sd", "sf", "verdict"]

"""The trends rc-mae.txt states for Fig. 2, turned into verdicts computed from measurements.

Both the linear model and the ViT record, for every probe, three paired measurements — one per
sequence type of Table 1 — of ``||grad L_c||_F``, ``||grad L_r||_F`` and ``cos(grad L_r, grad L_c)``:

* ``same``: the second input is the first input again (cos(x^, x~) = 1, case 1 of Prop. 4.1);
* ``similar``: another point of the same cluster / another image of the same class (case 3);
* ``different``: a point of another cluster / an image of another class (closest to case 2).

The paper's claims (Sec. 4 "Expected Outcome" and the caption of Fig. 2):

1. ``lc_norm_order``: ||grad L_c||_F is largest for same, then similar, then different (Fig. 2a/d).
2. ``lr_norm_reversed``: the reconstruction gradient does not follow that order; it is larger for
   different than for same inputs (Fig. 2b/e and "the reconstruction loss produces a significantly larger
   gradient when the second gradient step is on different inputs").
3. ``cos_same_most_negative``: cos(grad L_r, grad L_c) is negative and most negative for same (Fig. 2c/f).
4. ``cos_different_near_zero``: for different inputs the two gradients are close to orthogonal,
   ``|mean cos| <= near_zero`` (a threshold we choose, 0.1 by default; the paper gives none).
5. ``cos_similar_between``: similar falls in between: cos(same) <= cos(similar) <= cos(different).

Each verdict is decided on the means over all probes; ``fraction`` additionally reports for how many
individual (paired) probes the same inequality holds, next to ``chance_fraction``, what that share would be
if the three types were exchangeable (1/6 for a strict three-way order, 1/2 for a pairwise one; None where
no such baseline applies), and the ratios in ``values`` show how large the mean differences are — so a
verdict carried by a negligible difference is visible as such.
"""

from __future__ import annotations

import math

import numpy as np

SEQUENCE_TYPES = ("same", "similar", "different")
QUANTITIES = ("lc_norm", "lr_norm", "cos")


def _as_rows(values) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    return arr.reshape(-1, len(SEQUENCE_TYPES))


def _order(means: np.ndarray) -> str:
    """``"same > similar > different"`` style description of the order of three means (largest first)."""
    idx = np.argsort(-means, kind="stable")
    return " > ".join(SEQUENCE_TYPES[i] for i in idx)


def _ratio(a: float, b: float) -> float | None:
    return float(a / b) if b != 0 else None


def type_statistics(values) -> dict[str, dict[str, float]]:
    """Mean, standard deviation and median per sequence type of ``(..., 3)`` paired samples."""
    rows = _as_rows(values)
    return {
        t: {"mean": float(rows[:, i].mean()), "std": float(rows[:, i].std()), "median": float(np.median(rows[:, i]))}
        for i, t in enumerate(SEQUENCE_TYPES)
    }


def trend_verdicts(lc_norm, lr_norm, cos, near_zero: float = 0.1) -> dict[str, dict]:
    """Verdicts for the paper's Fig. 2 trends from paired measurements.

    Args:
        lc_norm, lr_norm, cos: arrays of shape ``(..., 3)``; the last axis is (same, similar, different)
            and every leading index is one paired probe (e.g. one run x iteration, or one image pair).
        near_zero: threshold on ``|mean cos(different)|`` for "near zero".

    Returns:
        ``{name: {"claim", "holds", "fraction", "values"}}``; ``holds`` is decided on the means,
        ``fraction`` is the share of probes for which the same inequality holds individually.
    """
    lc, lr, cs = _as_rows(lc_norm), _as_rows(lr_norm), _as_rows(cos)
    S, M, D = 0, 1, 2
    lc_m, lr_m, cs_m = lc.mean(0), lr.mean(0), cs.mean(0)

    def frac(mask: np.ndarray) -> float:
        return float(mask.mean()) if mask.size else math.nan

    def vals(means: np.ndarray) -> dict[str, float]:
        return {t: float(means[i]) for i, t in enumerate(SEQUENCE_TYPES)}

    out: dict[str, dict] = {}
    out["lc_norm_order"] = {
        "claim": "||grad L_c||_F: same > similar > different (Fig. 2a/d)",
        "holds": bool(lc_m[S] > lc_m[M] > lc_m[D]),
        "fraction": frac((lc[:, S] > lc[:, M]) & (lc[:, M] > lc[:, D])),
        "chance_fraction": 1 / 6,
        "values": {**vals(lc_m), "observed_order": _order(lc_m), "same_over_different": _ratio(lc_m[S], lc_m[D])},
    }
    out["lr_norm_reversed"] = {
        "claim": "||grad L_r||_F does not follow the L_c order: different > same (Fig. 2b/e)",
        "holds": bool(lr_m[D] > lr_m[S] and _order(lr_m) != _order(lc_m)),
        "fraction": frac(lr[:, D] > lr[:, S]),
        "chance_fraction": 1 / 2,
        "values": {**vals(lr_m), "observed_order": _order(lr_m), "lc_order": _order(lc_m),
                   "different_over_same": _ratio(lr_m[D], lr_m[S])},
    }
    out["cos_same_most_negative"] = {
        "claim": "cos(grad L_r, grad L_c) is negative and most negative for same (Fig. 2c/f)",
        "holds": bool(cs_m[S] < 0 and cs_m[S] < cs_m[M] and cs_m[S] < cs_m[D]),
        "fraction": frac((cs[:, S] < 0) & (cs[:, S] < cs[:, M]) & (cs[:, S] < cs[:, D])),
        "chance_fraction": None,
        "values": vals(cs_m),
    }
    out["cos_different_near_zero"] = {
        "claim": f"cos(grad L_r, grad L_c) near zero for different: |mean| <= {near_zero:g} (Fig. 2c/f)",
        "holds": bool(abs(cs_m[D]) <= near_zero),
        "fraction": frac(np.abs(cs[:, D]) <= near_zero),
        "chance_fraction": None,
        "values": {"different": float(cs_m[D]), "threshold": float(near_zero)},
    }
    out["cos_similar_between"] = {
        "claim": "cos for similar lies between same and different (Sec. 4, case 3)",
        "holds": bool(cs_m[S] <= cs_m[M] <= cs_m[D]),
        "fraction": frac((cs[:, S] <= cs[:, M]) & (cs[:, M] <= cs[:, D])),
        "chance_fraction": 1 / 6,
        "values": vals(cs_m),
    }
    return out


def verdict_lines(verdicts: dict[str, dict]) -> list[str]:
    """One printable line per verdict."""
    lines = []
    for name, v in verdicts.items():
        mark = "holds " if v["holds"] else "FAILS "
        chance = v.get("chance_fraction")
        extra = f", chance {chance:.2f}" if chance is not None else ""
        lines.append(f"  [{mark}] {name}: {v['claim']} (per-probe fraction {v['fraction']:.2f}{extra})")
    return lines

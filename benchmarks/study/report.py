"""docs/RESULTS.md from the finished tasks: regime table, sanity gates, verdict rules, one table per claim.

Every number is read from the run folders (missing = not run yet); the report can be rewritten at any time and
only says "holds" / "does not hold" where the design could test the claim.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
from dataclasses import dataclass
from pathlib import Path

from study import stats
from study.claims import CLAIMS, Claim, Row, metric_name
from study.profiles import (HORIZON_LIMIT, INIT_SHARE_LIMIT, MAIN, VARIANTS, default_which, encoders_of,
                            method_of, regime)
from study.tasks import ROOT, Study

SANITY_GAIN = 0.10       #: MAE's final linear probe must beat the encoder at initialisation by 10 points
COST_TOLERANCE = 0.03    #: step-time ratios within 3 % of 1 count as equal
ACCURACY_KINDS = ("knn", "linprobe", "curve_knn", "curve_linprobe", "rel_ce", "mce", "finetune")


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class Results:
    """Every number the report needs, read from the run folders."""

    def __init__(self, study: Study):
        self.s = study

    def frozen(self, v: str, seed: int, which: str, epoch: int | None = None) -> dict | None:
        return _read(self.s.frozen_file(v, seed, epoch or self.s.profile["epochs"], which))

    def summary(self, v: str, seed: int) -> dict | None:
        return _read(self.s.run_dir(v, seed) / "summary.json")

    @staticmethod
    def _pooled(r: dict, kind: str, pool: str) -> float | None:
        if "pools" in r:
            return r["pools"].get(pool, {}).get(f"{kind}_top1")
        return r.get(f"{kind}_top1") if pool == r.get("pool", "mean") else None  # first study: mean pool only

    def value(self, v: str, which: str, metric: str, seed: int) -> float | None:
        which = default_which(v) if which == "default" else which
        kind, _, pool = metric.partition("@")
        if kind in ("knn", "linprobe"):
            r = self.frozen(v, seed, which)
            return None if r is None else self._pooled(r, kind, pool)
        if kind in ("curve_knn", "curve_linprobe"):
            vals = [self.frozen(v, seed, which, e) for e in self.s.curve_epochs(v)]
            if any(x is None for x in vals):
                return None
            got = [self._pooled(x, kind.split("_")[1], pool) for x in vals]
            return None if any(g is None for g in got) else statistics.fmean(got)
        if kind in ("rel_ce", "mce"):
            r = self.frozen(v, seed, which)
            rob = None if r is None else r.get("robustness")
            if rob is None:
                return None
            return rob["relative_corruption_error"] if kind == "rel_ce" else rob["mean_corruption_error"]
        if kind == "finetune":
            r = _read(self.s.ft_dir(v, seed, which) / "eval_finetune.json")
            return None if r is None else r["top1"]
        if kind == "step":
            r = _read(self.s.cost_file())
            return None if r is None or seed != self.s.seeds[0] else r["step_s"].get(v)
        raise KeyError(metric)

    def planned_seeds(self, v: str, metric: str) -> list[int]:
        return self.s.seeds[:1] if metric == "step" else self.s.seeds_of(v)

    def values(self, v: str, which: str, metric: str) -> dict[int, float]:
        out = {}
        for s in self.planned_seeds(v, metric):
            x = self.value(v, which, metric, s)
            if x is not None:
                out[s] = x
        return out

    def n_test(self, metric: str) -> int:
        return self.s.profile["robust_images"] if metric.startswith(("rel_ce", "mce")) else 10_000


# ----------------------------------------------------------------------------------------------- verdicts
@dataclass
class Outcome:
    va: dict
    vb: dict
    d: float | None = None
    noise: stats.Noise | None = None
    test: stats.Test | None = None
    verdict: str = "not run yet"
    suffix: str = ""  #: "(k of n seeds so far)"


class Verdicts:
    """Gates, noise and tests of every row; Holm's correction over the primary rows that have a test."""

    def __init__(self, res: Results):
        self.res = res
        self.study = res.s
        self.pooled: dict[str, stats.Pooled] = {}
        self.regimes = {v: regime(self.study.args.profile, v) for v in self.study.variants()}
        self.sanity = self._sanity()
        self.outcomes: dict[tuple[str, int], Outcome] = {}
        family: dict[tuple[str, int], float] = {}
        for claim in self.claims():
            for i, row in enumerate(claim.rows):
                out = self._row(row)
                self.outcomes[(claim.cid, i)] = out
                if out.test is not None and row.primary:
                    family[(claim.cid, i)] = out.test.p
        self.family_size = len(family)
        rejected = stats.holm(family)
        for (cid, i), out in self.outcomes.items():
            if out.test is not None:
                row = self._claim(cid).rows[i]
                if row.primary:
                    out.verdict = stats.verdict(out.test, (cid, i) in rejected) + out.suffix
                else:
                    out.verdict = f"{stats.verdict(out.test, out.test.p <= stats.ALPHA)} (uncorrected){out.suffix}"

    # which claims this profile can speak to: every arm's variant is run
    def claims(self) -> list[Claim]:
        run = set(self.study.variants())
        out = []
        for c in CLAIMS:
            rows = tuple(r for r in c.rows if {r.a[0], r.b[0]} <= run
                         and (not r.metric.startswith("finetune") or self.study.profile.get("finetune_epochs")))
            if rows:
                out.append(Claim(c.cid, c.title, c.source, rows))
        return out

    def _claim(self, cid: str) -> Claim:
        return next(c for c in self.claims() if c.cid == cid)

    def pooled_for(self, metric: str) -> stats.Pooled:
        if metric not in self.pooled:
            # one group per run: a teacher method's two encoders come from the same training run (at the end of
            # an RC-MAE run they differ by a tenth of a point), so counting both would add degrees of freedom
            # that are not independent replicates; the run's own encoder (the one its paper reports) stands for it
            groups = [list(self.res.values(v, "default", metric).values()) for v in MAIN
                      if v in self.study.variants()]
            self.pooled[metric] = stats.pooled_sd(groups)
        return self.pooled[metric]

    def _sanity(self) -> dict:
        """MAE's final mean-pooled linear probe (mean over seeds) against the encoder at initialisation."""
        init = _read(self.study.init_file())
        mae = self.res.values("mae", "default", "linprobe@mean") if "mae" in self.study.variants() else {}
        if init is None or not mae:
            return {"state": "pending", "init": init and Results._pooled(init, "linprobe", "mean"),
                    "mae": statistics.fmean(mae.values()) if mae else None}
        i = Results._pooled(init, "linprobe", "mean")
        m = statistics.fmean(mae.values())
        return {"state": "passed" if m - i >= SANITY_GAIN else "failed", "init": i, "mae": m, "gain": m - i}

    def _gate(self, row: Row) -> str | None:
        kind = row.metric.split("@")[0]
        if kind == "step":
            return None
        for v in (row.a[0], row.b[0]):
            r = self.regimes.get(v)
            if r is not None and not r[2]:
                return "not tested: teacher outside its regime"
        if kind in ACCURACY_KINDS and self.sanity["state"] == "failed":
            return "not tested: representation not learned"
        return None

    def _row(self, row: Row) -> Outcome:
        va = self.res.values(*row.a, row.metric)
        vb = self.res.values(*row.b, row.metric)
        common = sorted(set(va) & set(vb))
        out = Outcome(va, vb)
        gate = self._gate(row)
        if gate is not None:
            out.verdict = gate
            return out
        if not common:
            return out
        va, vb = {s: va[s] for s in common}, {s: vb[s] for s in common}
        out.va, out.vb = va, vb
        if row.metric == "step":  # lower is better: A better (">") means a ratio below 1
            ratio = statistics.fmean(va[s] / vb[s] for s in common)
            out.d = ratio
            cheaper, dearer = ratio < 1 - COST_TOLERANCE, ratio > 1 + COST_TOLERANCE
            ok = {">": cheaper, "<": dearer, "=": not cheaper and not dearer}[row.rel]
            out.verdict = "holds" if ok else "does not hold"
            return out
        diffs = [va[s] - vb[s] for s in common]
        out.d = statistics.fmean(diffs)
        level = statistics.fmean([*va.values(), *vb.values()])
        out.noise = stats.difference_noise(len(common), self.pooled_for(row.metric),
                                           None if row.metric.startswith("rel_ce") else level,
                                           self.res.n_test(row.metric))
        if out.noise is None:
            df = self.pooled_for(row.metric).df
            out.verdict = (f"pending: the seed noise has {df} of the {stats.MIN_POOLED_DF} degrees of freedom a verdict "
                           "needs (each extra seed of a main variant adds one)")
            return out
        gain = out.d if row.better == "high" else -out.d
        if row.rel == "=":
            margin = self.study.profile["margins"][row.metric.split("@")[0].replace("curve_", "")]
            out.test = stats.equivalence_test(out.d, margin, out.noise)
        else:
            out.test = stats.directional_test(gain if row.rel == ">" else -gain, out.noise)
        planned = set(self.res.planned_seeds(row.a[0], row.metric)) & set(self.res.planned_seeds(row.b[0], row.metric))
        out.suffix = f" ({len(common)} of {len(planned)} seeds so far)" if len(common) < len(planned) else ""
        return out


# ----------------------------------------------------------------------------------------------- formatting
def _fmt(x: float | None, scale: float = 100, digits: int = 1) -> str:
    return "—" if x is None else f"{scale * x:.{digits}f}"


def _spread(vals: list[float], scale: float = 100) -> str:
    return "" if len(vals) < 2 else f" ± {scale * (max(vals) - min(vals)) / 2:.1f}"


def _arm(arm: tuple[str, str]) -> str:
    v, w = arm
    w = default_which(v) if w == "default" else w
    return VARIANTS[v].label if method_of(v) in ("mae", "rc-mae-free") else f"{VARIANTS[v].label} ({w})"


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def regime_table(study: Study, ver: Verdicts) -> list[str]:
    L = ["| variant | EMA updates | horizon (steps) | horizon / run | limit | initial weights left | in regime |",
         "|---|---|---|---|---|---|---|"]
    for v in study.variants():
        r = ver.regimes.get(v)
        if r is None:
            L.append(f"| {VARIANTS[v].label} | no teacher | — | — | — | — | — |")
            continue
        reg, limit, ok = r
        L.append(f"| {VARIANTS[v].label} | {reg.updates:,} | {reg.horizon_steps:,.0f} | "
                 f"{100 * reg.horizon_fraction:.2f} % | {100 * limit:.1f} % | {100 * reg.init_share:.3g} % | "
                 f"{'yes' if ok else '**no**'} |")
    return L


def claim_table(claim: Claim, ver: Verdicts) -> list[str]:
    L = ["| metric | A | B | paper A | paper B | ours A | ours B | A − B | SE (df) | p | verdict |",
         "|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, row in enumerate(claim.rows):
        out = ver.outcomes[(claim.cid, i)]
        step = row.metric == "step"
        k = 1000 if step else 100
        ours_a = (_fmt(statistics.fmean(out.va.values()), k, 1) if out.va else "—") + _spread(list(out.va.values()), k)
        ours_b = (_fmt(statistics.fmean(out.vb.values()), k, 1) if out.vb else "—") + _spread(list(out.vb.values()), k)
        if step:
            d = "—" if out.d is None else f"x {out.d:.3f}"
            se = f"± {100 * COST_TOLERANCE:.0f} %"
            pa = "—" if row.paper_a is None else f"{row.paper_a:g}" + (
                f" (x {row.paper_a / row.paper_b:.3f})" if row.paper_b else "")
        else:
            d = "—" if out.d is None else f"{100 * out.d:+.1f}"
            se = "—" if out.noise is None else (
                f"{100 * out.noise.se:.2f} ({'∞' if math.isinf(out.noise.df) else int(out.noise.df)})")
            pa = "—" if row.paper_a is None else f"{row.paper_a:g}"
        pb = "—" if row.paper_b is None else f"{row.paper_b:g}"
        p = "—" if out.test is None else f"{out.test.p:.3g}"
        rel = {">": "", "=": " (A = B?)", "<": " (A worse?)"}[row.rel]
        name = metric_name(row.metric) + ("" if row.primary else " ·")
        L.append(f"| {name}{rel} | {_arm(row.a)} | {_arm(row.b)} | {pa} | {pb} | {ours_a} | {ours_b} | {d} | {se} "
                 f"| {p} | {out.verdict} |")
    return L


def runs_table(study: Study, res: Results) -> list[str]:
    L = ["| run | seed | wall (min) | imgs/s | final loss | kNN teacher | kNN student | probe teacher | "
         "probe student | rel. corruption error |", "|---|---|---|---|---|---|---|---|---|---|"]
    for v, s in study.runs():
        summ = res.summary(v, s)
        cells = [VARIANTS[v].label, str(s), f"{summ['wall_time_s'] / 60:.0f}" if summ else "not run yet",
                 f"{summ['imgs_per_s_median']:.0f}" if summ and summ.get("imgs_per_s_median") else "—",
                 f"{summ['final_loss']:.4f}" if summ and summ.get("final_loss") is not None else "—"]
        for kind in ("knn@mean", "linprobe@mean"):
            for w in ("teacher", "student"):
                cells.append("—" if w not in encoders_of(v) else _fmt(res.value(v, w, kind, s)))
        cells.append(_fmt(res.value(v, default_which(v), "rel_ce", s)))
        L.append("| " + " | ".join(cells) + " |")
    return L


def figures(study: Study, res: Results, folder: Path, out_dir: Path) -> dict[str, str]:
    """Convergence curves (kNN and probe, mean pool) as PNGs beside the report; name -> path relative to it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {
        "convergence": [("mae", "student", "MAE", "C0"), ("rc-mae-s", "teacher", "RC-MAE-S teacher", "C3"),
                        ("rc-mae-s", "student", "RC-MAE-S student", "C1"),
                        ("rc-mae-free", "student", "RC-MAE-free", "C5")],
    }
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, str] = {}
    for name, lines in panels.items():
        fig, axes = plt.subplots(1, 2, figsize=(8.0, 3.0), dpi=110)
        drawn = False
        for ax, kind in zip(axes, ("knn", "linprobe")):
            for v, w, label, color in lines:
                if v not in study.variants():
                    continue
                for i, s in enumerate(study.seeds_of(v)):
                    pts = [(e, res.frozen(v, s, w, e)) for e in study.curve_epochs(v)]
                    pts = [(e, Results._pooled(r, kind, "mean")) for e, r in pts if r is not None]
                    pts = [(e, y) for e, y in pts if y is not None]
                    if pts:
                        ax.plot([e for e, _ in pts], [100 * y for _, y in pts], "o-", color=color,
                                alpha=1.0 if i == 0 else 0.45, ms=3, lw=1.2, label=label if i == 0 else None)
                        drawn = True
            ax.set_xlabel("pre-training epoch")
            ax.set_ylabel(f"{'kNN' if kind == 'knn' else 'linear probe'} top-1 (%)")
            ax.grid(alpha=0.3)
        if not drawn:
            plt.close(fig)
            continue
        axes[0].legend(fontsize=7)
        fig.suptitle("CIFAR-10, frozen mean-pooled features (pale: other seeds)", fontsize=8)
        fig.tight_layout()
        path = folder / f"{name}.png"
        fig.savefig(path)
        plt.close(fig)
        out[name] = os.path.relpath(path, out_dir)
    return out


def write_report(study: Study, out: Path, figure_dir: Path, command: str) -> None:
    res = Results(study)
    ver = Verdicts(res)
    prof = study.profile
    figs = figures(study, res, figure_dir, out.parent)
    cost = _read(study.cost_file()) or {}
    n_img = prof["train_images"]
    steps = prof["epochs"] * (n_img // prof["batch"])
    san = ver.sanity
    L = ["# CIFAR-10 reproduction study: do the papers' claims hold at small scale?", "",
         "Written by `benchmarks/cifar10_study.py` from the runs it finished; re-running the script continues the "
         "study and rewrites this page. Every verdict below was computed by the rules stated on this page, which "
         "were fixed (with the seeds, margins and gates) before the runs finished.", "",
         f"**This is a small-scale reproduction.** The papers pre-train ViT-B/L on ImageNet-1k (1.28 M images, 224 px, "
         f"100-1600 epochs on 8+ GPUs). Here each run sees {prof['epochs'] * n_img:,} images ({prof['epochs']} epochs "
         f"of {n_img:,} CIFAR-10 images at 32 px, {steps:,} optimiser steps) on one CPU core. The verdicts say whether "
         "the *direction* of each claim shows up at this scale, within measured noise; they cannot confirm or refute "
         "the ImageNet numbers.", "",
         "## Setup", "",
         f"- Profile `{study.args.profile}`: {prof['about']}. AdamW (0.9, 0.95), wd 0.05, blr 1.5e-3 (linear scaling "
         f"with the batch), 1 warm-up epoch then cosine, RandomResizedCrop(0.2-1) + flip, mask 0.75, norm_pix targets "
         "— identical for every method; only the `method.*` keys (and SdAE's own recipe keys) differ.",
         "- Methods at their papers' recipes: RC-MAE EMA 0.996 per step, gamma 1; SdAE multifold (3 folds), drop path "
         "0.25 on the encoder, EMA momentum cosine 0.96 -> 0.99 over ~300 updates (the supplement's 300 epochs, one "
         "update per epoch, here one update every K optimiser steps: `method.ema_every_steps`); RC-MAE-free: MAE plus "
         "the teacher-free consistency correction (issue 15), same momentum and gamma as RC-MAE.",
         "- Seeds (the seed sets initialisation, data order, crops and masks; every method of a seed sees the same "
         "data order): " + ", ".join(f"{VARIANTS[v].label} {len(study.seeds_of(v))}" for v in study.variants()) + ".",
         "- Frozen evaluations at epochs " + ", ".join(map(str, prof["curve_epochs"])) + " (MAE, RC-MAE-S, "
         "RC-MAE-free; the others at the end), both encoders of teacher methods: weighted kNN (k 20, T 0.07) and the "
         "cached-feature linear probe (LARS, 90 epochs, BatchNorm head) on " + (
             f"a fixed {prof['eval_train_images']:,} of the training images (the same for every run)"
             if prof.get("eval_train_images") else "the run's training images") + ", each with "
         "**mean-pooled** patch tokens (primary: the cls token gets no direct signal from the MAE loss) and with the "
         "**cls token** (secondary). Scores on the full 10,000-image test split.",
         f"- Robustness: the frozen encoder with its mean-pooled probe head, on a fixed {prof['robust_images']:,} test "
         "images x 15 corruptions x 5 severities; the primary number is the **relative corruption error** (mean "
         "corrupted error minus clean error), the mean corruption error is shown beside it.",
         "- " + ("No fine-tuning in this profile: the first study's 3-epoch CPU fine-tune ended 12.8 points *below* "
                 "the same encoder's linear probe (35.6 vs 48.4 %), i.e. it measured nothing, and a fine-tune that "
                 "could beat the probe costs more CPU than the whole comparison. No fine-tuning verdict is reported."
                 if not prof.get("finetune_epochs") else
                 f"Fine-tuning: `finetune-cifar10` shortened to {prof['finetune_epochs']} epochs."), "",
         "## Teacher regime", "",
         "An EMA teacher is an average of the student only once the run is long against its averaging window. For "
         "every variant with a teacher (RC-MAE-free: its correction buffer, which decays like RC-MAE's teacher): the "
         "number of EMA updates, the horizon `every / (1 - m_last)` in optimiser steps and as a share of the run, and "
         "the share of the initial weights left in the final teacher (the product of all momenta). **Rule:** a claim "
         "that involves a teacher is \"not tested: teacher outside its regime\" when its horizon exceeds "
         f"{100 * HORIZON_LIMIT:.1f} % of the run — or its paper's own share, where that is larger (SdAE's per-epoch "
         "teacher spans ~33 % of the supplement's 300-epoch run by design) — or when more than "
         f"{100 * INIT_SHARE_LIMIT:.0f} % of its initial weights are left. Computed from the configuration, so it "
         "holds for every seed.", "", *regime_table(study, ver), "",
         "## Sanity gates", "",
         f"- Representation learned: MAE's final linear probe (mean pool, mean over seeds) must beat the encoder at "
         f"initialisation by >= {100 * SANITY_GAIN:.0f} points, or every accuracy verdict is \"not tested: "
         f"representation not learned\". MAE {_fmt(san.get('mae'))} vs initialisation {_fmt(san.get('init'))}: "
         f"**{san['state']}**" + (f" ({100 * san['gain']:+.1f} points)." if "gain" in san else "."),
         "- Fine-tuning: " + ("not in this profile (see Setup)." if not prof.get("finetune_epochs") else
                              "a fine-tune verdict counts only if the fine-tuned MAE beats its own linear probe and "
                              "the from-scratch baseline."), "",
         "## Verdict rules", "",
         "- Paired seeds: d = mean over the seeds both arms have of (A - B).",
         "- Noise: the standard error of d is the larger of test-set sampling noise, sqrt(2 p (1 - p) / n) / "
         "sqrt(seeds), and seed noise, sqrt(2) x the seed standard deviation pooled over every main variant with 2+ "
         "seeds (per metric; one encoder per run, the one its paper reports: RC-MAE's teacher, SdAE's student) / "
         "sqrt(seeds), with the pooled degrees of freedom (Student's t). No verdict without a pooled "
         f"seed-noise estimate of >= {stats.MIN_POOLED_DF} degrees of freedom (\"pending\").",
         "- \"A better than B\": a two-sided t test of d; rejected in the claimed direction = **holds**, in the other "
         "= **does not hold**, otherwise **inconclusive**.",
         "- \"A matches B\": two one-sided tests (TOST) against the margin declared in the profile ("
         + ", ".join(f"{k} ±{100 * m:.0f} point" for k, m in prof["margins"].items()) + "): equivalence shown = "
         "**holds**; |d| shown beyond the margin = **does not hold**; otherwise **inconclusive**.",
         f"- Multiplicity: the primary rows (mean pooling; both RC-MAE encoders) with a test form one family under "
         f"Holm's step-down correction at a family-wise {stats.ALPHA}; this family has **{ver.family_size} rows** now. "
         "Secondary rows (marked ·: cls pooling, SdAE's teacher, mCE) are tested at 0.05 each and labelled "
         "\"uncorrected\".",
         f"- Costs: the ratio A / B of median step times measured interleaved in one process "
         f"({cost.get('threads', 1)} thread, batch {cost.get('batch', prof['batch'])}); within "
         f"±{100 * COST_TOLERANCE:.0f} % counts as equal. No Holm correction (one measurement, not a sample of seeds).",
         "- Gates first: a row whose arms include a teacher outside its regime, or an accuracy row when the sanity gate "
         "failed, is \"not tested\" whatever its numbers.", "",
         "## Claims", "",
         "\"ours\": mean over seeds ± half their range (%, or ms for step times). Paper columns only where the paper "
         "reports the same metric (its linear probe, its costs), in its own units (ImageNet top-1, GPU hours, "
         "s per epoch): compare directions and ratios, not values.", ""]
    summary = []
    for claim in ver.claims():
        L += [f"### {claim.title}", "", f"Source: {claim.source}.", "", *claim_table(claim, ver), ""]
        if claim.cid == "conv" and "convergence" in figs:
            L += [f"![frozen metrics during pre-training]({figs['convergence']})", ""]
        for i, row in enumerate(claim.rows):
            if row.primary or row.metric == "step":
                summary.append((claim.title, f"{metric_name(row.metric)}: {_arm(row.a)} vs {_arm(row.b)}",
                                ver.outcomes[(claim.cid, i)].verdict))
    untested = [c.title for c in CLAIMS if c.cid not in {x.cid for x in ver.claims()}]
    if untested:
        L += ["Not in this profile (their variants are not run): " + "; ".join(untested) + ".", ""]
    init = _read(study.init_file())
    L += ["## All runs", "",
          "Mean-pooled frozen metrics at the end of each run (%); wall time of the run on one core (it depends on "
          "what shared the machine).", "", *runs_table(study, res), "",
          "Encoder at initialisation (the runs' shape, random weights, seed " + str(study.seeds[0]) + "): " + (
              f"kNN {_fmt(Results._pooled(init, 'knn', 'mean'))}, linear probe "
              f"{_fmt(Results._pooled(init, 'linprobe', 'mean'))} (mean pool); kNN "
              f"{_fmt(Results._pooled(init, 'knn', 'cls'))}, probe {_fmt(Results._pooled(init, 'linprobe', 'cls'))} "
              "(cls)." if init else "not run yet."), ""]
    L += ["## Summary of the primary verdicts", "", "| claim | row | verdict |", "|---|---|---|",
          *[f"| {t} | {r} | {v} |" for t, r, v in summary], ""]
    notes = out.parent / "RESULTS_NOTES.md"
    if notes.exists():
        L += ["## Reading the results (written by hand, not computed)", "",
              f"From [{notes.name}]({notes.name}); written for the runs listed here, it may lag a re-run.", "",
              notes.read_text().strip(), ""]
    L += ["## What cannot be concluded from this study", "",
          "- Absolute accuracies: far below any CIFAR-10 number in the literature (minutes of CPU per run); only "
          "differences between methods under identical budgets, beyond the noise, are meaningful.",
          "- Long-schedule claims beyond this run length, ImageNet numbers, dense prediction (COCO, ADE20K) and "
          "ImageNet-A/-R/-Sketch. Robustness is a CIFAR-scale ImageNet-C analogue (docs/EVALUATION.md) of frozen "
          "features, not of fine-tuned models.",
          "- Costs are CPU step times of a small ViT; the papers' are GPU hours of ViT-B/L. Only directions compare.", "",
          "## Reproduce", "", "```bash", command, "```", "",
          f"Machine: {platform.machine()} CPU, {os.cpu_count()} cores, Python {platform.python_version()}. "
          f"Run folders: `{_shown(study.root)}` (logs in `logs/`, one per task).", ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text("\n".join(L))
    os.replace(tmp, out)

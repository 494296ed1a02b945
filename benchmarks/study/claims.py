"""The papers' claims the study tests, as rows of (metric, arm A, arm B, relation), declared before the runs.

A metric is ``"<kind>@<pool>"`` for frozen evaluations (``knn``, ``linprobe``; ``curve_knn`` / ``curve_linprobe``
= the mean over the profile's curve epochs, the area under the curve) with pool ``mean`` or ``cls``;
``rel_ce`` (relative corruption error of the mean-pooled probe classifier: corrupted minus clean error),
``mce`` (its mean corruption error), ``finetune`` (top-1 after fine-tuning) and ``step`` (interleaved step time).

An arm is ``(variant, which)``, ``which`` = ``teacher`` | ``student`` | ``default`` (the encoder the variant's
paper evaluates). Relation ``>``: A better than B, ``=``: A matches B within the profile's margin, ``<``: A worse.
``better`` = ``high`` (accuracies) or ``low`` (errors, costs). Primary rows form the family that Holm's correction
controls; secondary rows (cls pooling, second encoders of non-RC-MAE methods) are reported uncorrected.
Paper numbers appear only on rows whose metric the paper reports (its linear probe, its step cost); the papers'
fine-tuning and ImageNet-C numbers are not put beside our kNN, probe or relative corruption error.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Row:
    metric: str
    a: tuple[str, str]
    b: tuple[str, str]
    rel: str
    paper_a: float | None = None
    paper_b: float | None = None
    better: str = "high"
    primary: bool = True


@dataclass(frozen=True)
class Claim:
    cid: str
    title: str
    source: str
    rows: tuple[Row, ...]


def frozen(a: tuple[str, str], b: tuple[str, str], rel: str, probe_paper: tuple = (None, None),
           curve: bool = False, primary: bool = True) -> list[Row]:
    """kNN and linear probe rows of one comparison: mean pooling (primary) and cls pooling (secondary)."""
    k, lp = ("curve_knn", "curve_linprobe") if curve else ("knn", "linprobe")
    return [Row(f"{lp}@mean", a, b, rel, *probe_paper, primary=primary),
            Row(f"{k}@mean", a, b, rel, primary=primary),
            Row(f"{lp}@cls", a, b, rel, *probe_paper, primary=False),
            Row(f"{k}@cls", a, b, rel, primary=False)]


def _both(variant: str) -> list[tuple[str, str]]:
    return [(variant, "teacher"), (variant, "student")]


MAE = ("mae", "default")
RC_TABLE2 = {"rc-mae-s": (68.4, 67.3), "rc-mae-d": (68.7, 67.3)}  # rc-mae.txt Table 2, linear probe (ViT-B)

CLAIMS: list[Claim] = [
    *[Claim(f"{v}-mae", f"{label} beats MAE", "rc-mae.txt Table 2 (ViT-B, 1600 ep, linear probe)",
            tuple(r for arm in _both(v) for r in frozen(arm, MAE, ">", RC_TABLE2[v] if arm[1] == "teacher"
                                                         else (None, None))))
      for v, label in (("rc-mae-s", "RC-MAE-S"), ("rc-mae-d", "RC-MAE-D"))],
    Claim("conv", "RC-MAE-S converges faster than MAE (mean of the frozen metric over the run's 4 checkpoints)",
          "rc-mae.txt Fig. 1(c) shows fine-tuning accuracy over epochs; it has no kNN or probe curve, so no paper "
          "column", tuple(r for arm in _both("rc-mae-s") for r in frozen(arm, MAE, ">", curve=True))),
    Claim("rc-ts", "RC-MAE-S: the teacher is slightly better than the student", "rc-mae.txt Table 12 (linear probe)",
          tuple(frozen(("rc-mae-s", "teacher"), ("rc-mae-s", "student"), ">", (68.41, 68.38)))),
    Claim("sdae-mae", "SdAE beats MAE at the same number of epochs", "sdae.txt Table 2 (ViT-B, 100 ep, linear probe)",
          tuple([*frozen(("sdae", "student"), MAE, ">", (60.3, 54.8)),
                 *frozen(("sdae", "teacher"), MAE, ">", primary=False)])),
    Claim("sdae-ts", "SdAE: teacher and student perform alike", "sdae.txt Fig. 4(c) (no table)",
          tuple(frozen(("sdae", "teacher"), ("sdae", "student"), "="))),
    Claim("free-eq", "RC-MAE-free matches RC-MAE-S (no teacher: the consistency gradient from the optimiser's "
          "update history)", "issue 15; rc-mae.txt Sec. 7 asks whether this is possible (no paper number)",
          tuple(r for arm in _both("rc-mae-s") for r in frozen(("rc-mae-free", "student"), arm, "="))),
    Claim("free-mae", "RC-MAE-free beats MAE", "issue 15 (no paper number)",
          tuple(frozen(("rc-mae-free", "student"), MAE, ">"))),
    Claim("robust", "RC-MAE is more robust to corruptions than MAE (frozen encoder + linear probe; relative "
          "corruption error = corrupted minus clean error)",
          "rc-mae.txt Table 7 reports ImageNet-C mCE of fine-tuned ViT-B (49.9 RC-MAE vs 51.7 MAE): another metric, "
          "so no paper column", tuple([
              *[Row("rel_ce", arm, MAE, ">", better="low") for arm in _both("rc-mae-s")],
              Row("rel_ce", ("rc-mae-d", "teacher"), MAE, ">", better="low"),
              Row("rel_ce", ("sdae", "student"), MAE, ">", better="low", primary=False),
              Row("rel_ce", ("rc-mae-free", "student"), MAE, ">", better="low", primary=False),
              *[Row("mce", arm, MAE, ">", better="low", primary=False) for arm in _both("rc-mae-s")]])),
    Claim("cost", "Costs per training step (interleaved measurement)",
          "rc-mae.txt Table 3 (GPU hours, 800 ep); sdae.txt Table 1 (s per epoch); issue 15 target <= 1.08 x MAE", (
              Row("step", ("rc-mae-s", "default"), MAE, "<", 166.6, 125.5, "low"),
              Row("step", ("rc-mae-d", "default"), MAE, "<", None, None, "low"),
              Row("step", ("sdae", "default"), MAE, "<", 706, 551, "low"),
              Row("step", ("rc-mae-free", "default"), ("rc-mae-s", "default"), ">", None, None, "low"),
              Row("step", ("rc-mae-free", "default"), MAE, "=", None, None, "low"))),
    # ablations: tested only by profiles that run these variants
    Claim("mask80", "RC-MAE with mask 0.80 matches mask 0.75", "rc-mae.txt Table 3 (800 ep)", (
        *frozen(("rc-mae-s-m80", "default"), ("rc-mae-s", "default"), "="),
        Row("step", ("rc-mae-s-m80", "default"), ("rc-mae-s", "default"), ">", 142.6, 166.6, "low"))),
    Claim("mask85", "RC-MAE with mask 0.85 is slightly worse than 0.75", "rc-mae.txt Table 3 (800 ep)", (
        *frozen(("rc-mae-s-m85", "default"), ("rc-mae-s", "default"), "<"),
        Row("step", ("rc-mae-s-m85", "default"), ("rc-mae-s", "default"), ">", 136.4, 166.6, "low"))),
    Claim("sdae-input", "SdAE teacher input: multifold beats only-masked and full image", "sdae.txt Table 5 (100 ep)", (
        *frozen(("sdae", "default"), ("sdae-masked", "default"), ">"),
        *frozen(("sdae", "default"), ("sdae-full", "default"), ">"),
        Row("step", ("sdae", "default"), ("sdae-full", "default"), ">", 706, 826, "low"),
        Row("step", ("sdae", "default"), ("sdae-masked", "default"), ">", 706, 761, "low"))),
    Claim("sdae-ema", "SdAE: EMA once per epoch works better than per step", "sdae.txt Fig. 4(a) (no table)",
          tuple(frozen(("sdae", "default"), ("sdae-ema-step", "default"), ">"))),
]

METRIC_NAMES = {
    "knn": "kNN top-1 (%)", "linprobe": "linear probe top-1 (%)", "curve_knn": "mean kNN over the run (%)",
    "curve_linprobe": "mean probe over the run (%)", "rel_ce": "relative corruption error (points)",
    "mce": "mean corruption error (%)", "finetune": "fine-tune top-1 (%)", "step": "step time (ms, interleaved)",
}


def metric_name(metric: str) -> str:
    kind, _, pool = metric.partition("@")
    return METRIC_NAMES[kind] + (f", {pool} pool" if pool else "")

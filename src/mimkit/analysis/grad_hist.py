"""Fig. 3(b): histograms of cos(grad L_r, grad L_c) logged by RC-MAE training runs, side by side.

Reads the ``grad_cos`` values that the gradient-alignment monitor (``method.grad_align_every=K``) wrote to
each run's ``metrics.jsonl`` (with :func:`mimkit.methods.rc_mae._read_grad_cos`, the reader behind the
single-run ``grad_alignment.png``), labels each run from its ``config.yaml`` (RC-MAE-S / RC-MAE-D) and
draws one histogram per run with its mean.

The training loop averages every metric over its logging window, so with ``train.log_every`` larger than
``grad_align_every`` each value is a window mean (a narrower histogram than per-step cosines). Train with
``train.log_every`` equal to ``method.grad_align_every`` for per-step values.

The paper's claims (Sec. 6.1, App. C): RC-MAE-D has a positive bias; RC-MAE-S is centred near zero.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from mimkit.errors import MimkitError
from mimkit.methods.rc_mae import _read_grad_cos


def _run_files(run: str | Path) -> tuple[Path, Path | None]:
    """(metrics.jsonl, config.yaml or None) for a run folder or a metrics.jsonl path."""
    run = Path(run)
    if run.is_dir():
        metrics = run / "metrics.jsonl"
    elif run.is_file():
        metrics, run = run, run.parent
    else:
        raise MimkitError(f"run {str(run)!r} does not exist; pass a training run folder or its metrics.jsonl")
    if not metrics.is_file():
        raise MimkitError(f"{str(run)!r} has no metrics.jsonl; pass a training run folder or its metrics.jsonl")
    config = run / "config.yaml"
    return metrics, config if config.is_file() else None


def run_label(run: str | Path) -> dict:
    """``{"label", "method", "mask_mode", "grad_align_every", "log_every"}`` from the run's config.yaml."""
    import yaml

    metrics, config = _run_files(run)
    info = {"label": metrics.parent.name, "method": None, "mask_mode": None, "grad_align_every": None,
            "log_every": None}
    if config is None:
        return info
    try:
        cfg = yaml.safe_load(config.read_text()) or {}
    except yaml.YAMLError:
        return info
    method = (cfg.get("method") or {}) if isinstance(cfg, dict) else {}
    train = (cfg.get("train") or {}) if isinstance(cfg, dict) else {}
    name, mode = method.get("name"), method.get("mask_mode")
    info.update(method=name, mask_mode=mode, grad_align_every=method.get("grad_align_every"),
                log_every=train.get("log_every"))
    if name == "rc-mae" and mode in ("same", "different"):
        info["label"] = f"RC-MAE-{'S' if mode == 'same' else 'D'} ({metrics.parent.name})"
    elif name:
        info["label"] = f"{name} ({metrics.parent.name})"
    return info


def run_statistics(values: list[float]) -> dict:
    n = len(values)
    arr = np.asarray(values, dtype=np.float64)
    return {"n": n, "mean": float(arr.mean()), "std": float(arr.std()), "median": float(np.median(arr)),
            "frac_negative": float((arr < 0).mean())}


def grad_histograms(runs: list[str | Path], out_png: Path, near_zero: float = 0.1) -> dict:
    """Draw the side-by-side histograms to ``out_png`` and return the summary (also written next to it as
    ``<stem>.json``)."""
    if not runs:
        raise MimkitError("grad-hist needs at least one run folder")
    out_png = Path(out_png)
    if out_png.suffix.lower() != ".png":
        raise MimkitError(f"--out must be a .png file, got {str(out_png)!r}")
    entries = []
    for run in runs:
        metrics, _ = _run_files(run)
        values = _read_grad_cos(metrics)
        if not values:
            raise MimkitError(f"{str(run)!r} logged no grad_cos values; train it with --set method.grad_align_every=K "
                              "(an RC-MAE run)")
        info = run_label(run)
        entries.append({"run": str(run), **info, **run_statistics(values), "_values": values})

    from mimkit.analysis.plots import _figure, _save

    fig = _figure(4.6 * len(entries), 3.6)
    axes = fig.subplots(1, len(entries), squeeze=False)[0]
    for ax, e in zip(axes, entries):
        n = e["n"]
        ax.hist(e["_values"], bins=min(50, max(10, n // 5)), range=(-1.0, 1.0), color="tab:blue", alpha=0.8)
        ax.axvline(0.0, color="black", linewidth=0.8)
        ax.axvline(e["mean"], color="tab:red", linestyle="--", linewidth=1.2, label=f"mean {e['mean']:.3f}")
        ax.set_xlabel(r"cos($\nabla L_r$, $\nabla L_c$)")
        ax.set_ylabel("logged steps")
        ax.set_title(f"{e['label']}\nn={n}, {100 * e['frac_negative']:.0f}% negative", fontsize=9)
        ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    _save(fig, out_png, dpi=90)

    runs_out = [{k: v for k, v in e.items() if k != "_values"} for e in entries]
    summary = {"figure": str(out_png), "paper": "rc-mae.txt Sec. 6.1, App. C, Fig. 3(b)", "runs": runs_out,
               "verdicts": _verdicts(runs_out, near_zero)}
    out_png.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _verdicts(runs: list[dict], near_zero: float) -> dict:
    """Fig. 3(b) claims, for the first RC-MAE-S and first RC-MAE-D run among ``runs`` (when present)."""
    s = next((r for r in runs if r["method"] == "rc-mae" and r["mask_mode"] == "same"), None)
    d = next((r for r in runs if r["method"] == "rc-mae" and r["mask_mode"] == "different"), None)
    out = {}
    if s is not None:
        out["s_centred_near_zero"] = {"claim": f"RC-MAE-S is centred near zero: |mean| <= {near_zero:g}",
                                      "holds": bool(abs(s["mean"]) <= near_zero), "values": {"mean_s": s["mean"]}}
    if d is not None:
        out["d_positive_bias"] = {"claim": "RC-MAE-D has a positive bias: mean > 0",
                                  "holds": bool(d["mean"] > 0), "values": {"mean_d": d["mean"]}}
    if s is not None and d is not None:
        out["d_above_s"] = {"claim": "mean cos of RC-MAE-D > mean cos of RC-MAE-S",
                            "holds": bool(d["mean"] > s["mean"]),
                            "values": {"mean_s": s["mean"], "mean_d": d["mean"],
                                       "difference": d["mean"] - s["mean"]}}
    for v in out.values():
        v["values"] = {k: (x if math.isfinite(x) else None) for k, x in v["values"].items()}
    return out

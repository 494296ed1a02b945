"""Figures of the analyses (matplotlib Agg canvas, no pyplot state)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mimkit.analysis.trends import SEQUENCE_TYPES

COLORS = {"same": "tab:red", "similar": "tab:orange", "different": "tab:blue"}
PANELS = (
    ("lc_norm", r"$\|\nabla_S L_c\|_F$"),
    ("lr_norm", r"$\|\nabla_S L_r\|_F$"),
    ("cos", r"cos($\nabla_S L_r$, $\nabla_S L_c$)"),
)


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _save(fig, out_png: Path, dpi: int = 90) -> Path:
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=dpi)
    return out_png


def save_curves_figure(curves: dict[str, np.ndarray], out_png: Path, title: str, letters: str = "abc",
                       overlay: dict[str, np.ndarray] | None = None) -> Path:
    """Fig. 2 (a-c) style: one panel per quantity, value vs training iteration.

    ``curves[q]`` has shape (runs, iterations, 3): the per-iteration mean over the probe points of each
    run. Lines are the mean over runs, bands +- one standard deviation over runs (none with one run).
    ``overlay`` (same shapes, e.g. the teacher-free arm) is drawn over them as dashed black lines.
    """
    fig = _figure(13.0, 3.6)
    axes = fig.subplots(1, 3)
    for ax, letter, (key, label) in zip(axes, letters, PANELS):
        arr = np.asarray(curves[key], dtype=np.float64)
        x = np.arange(1, arr.shape[1] + 1)
        for i, t in enumerate(SEQUENCE_TYPES):
            mean = arr[:, :, i].mean(0)
            ax.plot(x, mean, color=COLORS[t], linewidth=1.0, label=t)
            if arr.shape[0] > 1:
                std = arr[:, :, i].std(0)
                ax.fill_between(x, mean - std, mean + std, color=COLORS[t], alpha=0.2, linewidth=0)
            if overlay is not None:
                ax.plot(x, np.asarray(overlay[key], dtype=np.float64)[:, :, i].mean(0), color="black",
                        linewidth=0.8, linestyle=(0, (3, 3)), label="teacher-free (rc-mae-free)" if i == 0 else None)
        if key == "cos":
            ax.axhline(0.0, color="black", linewidth=0.6)
        ax.set_xlabel("training iteration")
        ax.set_title(f"({letter}) {label}", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="best", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, out_png)


def save_distribution_figure(samples: dict[str, np.ndarray], out_png: Path, title: str, letters: str = "def") -> Path:
    """Fig. 2 (d-f) style for one checkpoint: per-probe distributions (histograms) per sequence type.

    ``samples[q]`` has shape (pairs, 3). Dashed vertical lines mark the means.
    """
    fig = _figure(13.0, 3.6)
    axes = fig.subplots(1, 3)
    for ax, letter, (key, label) in zip(axes, letters, PANELS):
        arr = np.asarray(samples[key], dtype=np.float64).reshape(-1, len(SEQUENCE_TYPES))
        lo, hi = float(arr.min()), float(arr.max())
        if key == "cos":
            lo, hi = min(lo, -0.05), max(hi, 0.05)
        if hi <= lo:
            hi = lo + 1e-12
        bins = np.linspace(lo, hi, max(10, min(40, arr.shape[0] // 5)) + 1)
        for i, t in enumerate(SEQUENCE_TYPES):
            mean = float(arr[:, i].mean())
            ax.hist(arr[:, i], bins=bins, histtype="step", color=COLORS[t], linewidth=1.2,
                    label=f"{t} (mean {mean:.3g})")
            ax.axvline(mean, color=COLORS[t], linestyle="--", linewidth=1.0)
        if key == "cos":
            ax.axvline(0.0, color="black", linewidth=0.6)
        ax.set_xlabel(label)
        ax.set_ylabel("pairs")
        ax.set_title(f"({letter}) {label}", fontsize=10)
        ax.legend(loc="best", fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, out_png)

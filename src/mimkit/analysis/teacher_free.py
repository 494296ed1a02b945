"""Fidelity of rc-mae-free's correction on a ViT: ``mimkit analyze teacher-free --checkpoint CKPT ...``.

At a checkpoint of a real RC-MAE run the exact teacher is known, so ``D = S - T``; at an rc-mae-free checkpoint
(with its ``method_state``) the implied teacher is ``T = S - D``. For training-like batches (same mask for both,
RC-MAE-S) this computes

* the true consistency gradient ``gamma * grad_S L_c`` (rc-mae Eq. 3, the student against the teacher's
  predictions, the teacher's forward included), and
* rc-mae-free's correction ``gamma * D A`` from the student's own forward/backward (methods/rc_mae_free.py),

and reports, per layer group (patch embedding, each block's attention / MLP, the decoder, the prediction head,
the uncorrected norms and tokens), the cosine and the norm ratio ``||correction|| / ||true||`` (per batch, then
averaged), plus ``||grad L_c|| / ||grad L_r||`` for scale.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mimkit.errors import MimkitError
from mimkit.losses import masked_mse
from mimkit.methods.base import StepRandom


@dataclass(frozen=True)
class FidelitySettings:
    batches: int = 4
    batch_size: int = 64
    seed: int = 0

    def validate(self) -> FidelitySettings:
        for name in ("batches", "batch_size"):
            v = getattr(self, name)
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
                raise MimkitError(f"teacher-free --{name.replace('_', '-')} must be an integer >= 1, got {v!r}")
        return self


def layer_group(name: str) -> str:
    """The table's group of a student parameter name (``encoder.blocks.3.attn.qkv.weight`` -> ``enc 3 attn``)."""
    parts = name.split(".")
    if name.startswith("encoder.patch_embed"):
        return "patch embed"
    if parts[-2].startswith("norm") or parts[-1] in ("cls_token", "mask_token") or parts[1] == "norm":
        return "norms + tokens (no correction)"
    if parts[0] == "encoder" and parts[1] == "blocks":
        return f"enc {parts[2]} {parts[3]}"
    if name.startswith("decoder.pred"):
        return "head (decoder.pred)"
    if parts[0] == "decoder":
        return "decoder (embed + blocks)"
    return "other"


def _teacher_free_twin(method, cfg, D: dict[str, Tensor]):
    """An rc-mae-free method with ``method``'s student and difference buffers ``D`` (``student.``-prefixed)."""
    from mimkit.methods import build_method

    c = copy.deepcopy(cfg)
    c.method.name, c.method.mask_mode = "rc-mae-free", "same"
    free = build_method(c, method.student.encoder.spec.in_chans).to(next(method.student.parameters()).device)
    free.student.load_state_dict(method.student.state_dict())
    free.load_method_state_dict({"D": {k: D[k] for k in free.corrected_parameters()}})
    return free


def build_pair(loaded) -> tuple:
    """(rc-mae method with its teacher, rc-mae-free twin) for an rc-mae or rc-mae-free checkpoint."""
    from mimkit.config import config_from_dict
    from mimkit.methods import build_method

    method, cfg = loaded.method, loaded.config
    if method.name == "rc-mae":
        S, T = method.student.state_dict(), method.teacher.module.state_dict()
        D = {f"student.{k}": (S[k] - T[k]).float() for k in S}
        return method, _teacher_free_twin(method, cfg, D)
    if method.name == "rc-mae-free":
        state = (loaded.raw.get("method_state") or {})
        if "D" not in state:
            raise MimkitError(f"{loaded.path} holds no rc-mae-free difference buffers (method_state.D); "
                              "accepted: an rc-mae checkpoint, or an rc-mae-free one written with its method state")
        c = config_from_dict(loaded.saved_config)
        c.method.name = "rc-mae"
        rc = build_method(c, loaded.in_chans).to(loaded.device)
        rc.student.load_state_dict(method.student.state_dict())
        S = rc.student.state_dict()
        T = {k: S[k] - state["D"][f"student.{k}"].to(S[k]) if f"student.{k}" in state["D"] else S[k] for k in S}
        rc.teacher.module.load_state_dict(T)
        method.load_method_state_dict(state)
        return rc, method
    raise MimkitError(f"teacher-free fidelity needs an rc-mae or rc-mae-free checkpoint; {loaded.path} holds "
                      f"method {method.name!r}")


def compare_batch(rc, free, images: Tensor, seed: int) -> dict[str, dict[str, float]]:
    """Per group: dot, squared norms of the true consistency gradient, the correction and grad L_r."""
    named = [(n, p) for n, p in rc.student.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    rc.train()
    torch.manual_seed(seed)
    rc.step_random = StepRandom(seed)
    mask = rc.sample_mask(images)
    pred = rc.student(images, mask.ids_keep, mask.ids_restore)
    t_pred = rc.teacher(images, mask.ids_keep, mask.ids_restore)
    g_c = torch.autograd.grad(rc.gamma * masked_mse(pred, t_pred.to(pred.dtype), mask.mask), params,
                              retain_graph=True, allow_unused=True)
    g_r = torch.autograd.grad(masked_mse(pred, rc.targets(images), mask.mask), params, allow_unused=True)

    free.train()
    free.gamma = rc.gamma
    torch.manual_seed(seed)
    free.step_random = StepRandom(seed)
    free.student.zero_grad(set_to_none=True)
    free.reset_curvature()
    free(images).loss.backward()
    corr = free.correction()
    free.reset_curvature()
    free.student.zero_grad(set_to_none=True)

    out: dict[str, dict[str, float]] = {}
    for (n, p), gc, gr in zip(named, g_c, g_r):
        gc = torch.zeros_like(p) if gc is None else gc
        gr = torch.zeros_like(p) if gr is None else gr
        c = corr.get(f"student.{n}", torch.zeros_like(p))
        for key in (layer_group(n), "whole model"):
            acc = out.setdefault(key, {"dot": 0.0, "true2": 0.0, "corr2": 0.0, "rec2": 0.0, "params": 0})
            acc["dot"] += float((gc.double() * c.double()).sum())
            acc["true2"] += float(gc.double().pow(2).sum())
            acc["corr2"] += float(c.double().pow(2).sum())
            acc["rec2"] += float(gr.double().pow(2).sum())
            acc["params"] += p.numel()
    return out


def fidelity(loaded, images: Tensor, settings: FidelitySettings) -> dict[str, dict[str, float]]:
    """Per group over ``settings.batches`` batches: mean cosine, mean norm ratio, mean ||g_c|| / ||g_r||."""
    rc, free = build_pair(loaded)
    per_batch: list[dict] = []
    b = settings.batch_size
    for i in range(settings.batches):
        x = images[(i * b) % images.shape[0]:][:b]
        per_batch.append(compare_batch(rc, free, x, settings.seed + i))
    rows = {}
    for g in per_batch[0]:
        cos = [r[g]["dot"] / max((r[g]["true2"] * r[g]["corr2"]) ** 0.5, 1e-300) for r in per_batch]
        ratio = [(r[g]["corr2"] / max(r[g]["true2"], 1e-300)) ** 0.5 for r in per_batch]
        cr = [(r[g]["true2"] / max(r[g]["rec2"], 1e-300)) ** 0.5 for r in per_batch]
        rows[g] = {"cos": float(np.mean(cos)), "cos_std": float(np.std(cos)), "norm_ratio": float(np.mean(ratio)),
                   "cons_over_rec": float(np.mean(cr)), "params": per_batch[0][g]["params"]}
    return rows


def _order(groups) -> list[str]:
    def key(g: str):
        if g == "whole model":
            return (9, 0, "")
        if g.startswith("enc "):
            _, i, kind = g.split(" ")
            return (1, int(i), kind)
        first = {"patch embed": 0, "decoder (embed + blocks)": 2, "head (decoder.pred)": 3}
        return (first.get(g, 4), 0, g)
    return sorted(groups, key=key)


def table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """Markdown: one row per group, cos and norm ratio per checkpoint."""
    names = list(results)
    groups = _order(results[names[0]])
    head = "| group | params | " + " | ".join(f"{n}: cos / norm ratio" for n in names) + " |"
    lines = [head, "|" + "---|" * (2 + len(names))]
    for g in groups:
        cells = [f"{results[n][g]['cos']:+.3f} / {results[n][g]['norm_ratio']:.2f}" for n in names]
        lines.append(f"| {g} | {results[names[0]][g]['params']:,} | " + " | ".join(cells) + " |")
    cells = [f"{results[n]['whole model']['cons_over_rec']:.3f}" for n in names]
    lines.append("| ‖∇L_c‖ / ‖∇L_r‖ (whole model) | | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def save_figure(results: dict[str, dict[str, dict[str, float]]], out_png: Path) -> Path:
    from mimkit.analysis.plots import _figure, _save

    names = list(results)
    groups = _order(results[names[0]])
    fig = _figure(max(8.0, 0.45 * len(groups) + 3), 6.0)
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    x = np.arange(len(groups))
    width = 0.8 / len(names)
    for j, n in enumerate(names):
        ax1.bar(x + j * width, [results[n][g]["cos"] for g in groups], width, label=n)
        ax2.bar(x + j * width, [results[n][g]["norm_ratio"] for g in groups], width, label=n)
    ax1.axhline(0.0, color="black", linewidth=0.6)
    ax1.axhline(1.0, color="grey", linewidth=0.6, linestyle=":")
    ax2.axhline(1.0, color="grey", linewidth=0.6, linestyle=":")
    ax1.set_ylabel("cos(true ∇L_c, D A)")
    ax2.set_ylabel("‖D A‖ / ‖true ∇L_c‖")
    ax2.set_yscale("log")
    ax2.set_xticks(x + 0.4 - width / 2, groups, rotation=60, ha="right", fontsize=7)
    ax1.legend(fontsize=7, loc="best")
    ax1.set_title("rc-mae-free correction vs the true consistency gradient of RC-MAE, per layer group", fontsize=10)
    fig.tight_layout()
    return _save(fig, out_png)


def write_outputs(out_dir: Path, results: dict, meta: dict) -> tuple[Path, Path, str]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = table(results)
    js = out_dir / "summary.json"
    js.write_text(json.dumps({**meta, "results": results}, indent=2) + "\n")
    (out_dir / "table.md").write_text(md + "\n")
    return save_figure(results, out_dir / "teacher_free.png"), js, md

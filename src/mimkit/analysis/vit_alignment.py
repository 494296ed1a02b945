"""The three-sequence protocol of rc-mae.txt Sec. 4 on a trained RC-MAE ViT (Fig. 2, bottom row).

For every probe pair, starting from the checkpoint's student ``S`` and EMA teacher ``T``:

1. one plain SGD step (``lr``, no momentum, no weight decay) on the first image with the RC-MAE loss
   ``L_r + gamma L_c`` of the checkpoint (its mask ratio, norm-pix targets, mask mode and gamma), then one
   EMA teacher update ``T <- m T + (1 - m) S`` with the checkpoint's ``method.momentum`` — on a working copy
   (``copy.deepcopy`` of the method) whose weights are reset to the checkpoint's before every pair;
2. ``grad_S L_r`` and ``grad_S L_c`` on the second image, w.r.t. all trainable student parameters
   (encoder + decoder, flattened), giving ``||grad L_c||``, ``||grad L_r||`` and their cosine.

Sequence types (Table 1), each pair sharing the same first image:

* ``same``: the first image again;
* ``similar``: another image of the same class (a different index in the pool; an augmented view of the
  same image would be the other reading of the paper — we use class membership, the ViT analogue of the
  linear model's "another point of the same cluster");
* ``different``: a uniformly chosen image of another class.

Masks: one student mask per pair, used for both inputs (so ``same`` is exactly the same masked input, as in
the linear model); for RC-MAE-D checkpoints the teacher gets its own mask, also shared by both inputs.
The model is in eval mode (no drop path), so the probe is deterministic given ``seed``.

Images come from the first ``pool`` images of ``split`` (``train`` by default, the images the model was
trained on), normalised as in training, without augmentation. On data sets stored class by class the first
images may cover few classes: raise ``pool`` (at least two classes are needed).
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from mimkit.analysis.trends import SEQUENCE_TYPES, trend_verdicts, type_statistics
from mimkit.errors import MimkitError
from mimkit.losses import masked_mse
from mimkit.masking import PatchMask, mask_from_noise
from mimkit.models.vit import patchify

SPLITS = ("train", "test")


@dataclass(frozen=True)
class AlignmentSettings:
    pairs: int = 200
    lr: float = 0.01
    teacher_momentum: float | None = None   # None: the checkpoint's method.momentum
    split: str = "train"
    pool: int = 2000
    seed: int = 0
    near_zero: float = 0.1

    def validate(self) -> AlignmentSettings:
        for name, low in (("pairs", 1), ("pool", 2), ("seed", 0)):
            v = getattr(self, name)
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= low):
                raise MimkitError(f"grad-alignment {name} must be an integer >= {low}, got {v!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise MimkitError(f"grad-alignment lr must be a finite number > 0, got {self.lr!r}")
        m = self.teacher_momentum
        if m is not None and not (isinstance(m, (int, float)) and 0.0 <= m <= 1.0):
            raise MimkitError(f"grad-alignment teacher momentum must be a number in [0, 1], got {m!r}")
        if not (isinstance(self.near_zero, (int, float)) and 0.0 <= self.near_zero <= 1.0):
            raise MimkitError(f"grad-alignment near_zero must be a number in [0, 1], got {self.near_zero!r}")
        if self.split not in SPLITS:
            raise MimkitError(f"unknown split {self.split!r}; accepted: {', '.join(SPLITS)}")
        return self


def check_rc_mae(method, checkpoint) -> None:
    if getattr(method, "name", None) != "rc-mae" or not hasattr(method, "teacher"):
        raise MimkitError(f"grad-alignment needs an RC-MAE checkpoint (it probes the EMA teacher); {checkpoint} "
                          f"holds method {getattr(method, 'name', '?')!r}; accepted: rc-mae")


def collect_pool(data, split: str, pool: int, batch_size: int, device) -> tuple[Tensor, Tensor]:
    """The first ``pool`` (normalised) images of ``split`` and their labels."""
    images, labels, n = [], [], 0
    for x, y in data.eval_batches(split, batch_size, device):
        take = min(pool - n, x.shape[0])
        images.append(x[:take])
        labels.append(y[:take].to("cpu", torch.long))
        n += take
        if n >= pool:
            break
    if n == 0:
        raise MimkitError(f"the {split} split has no images")
    return torch.cat(images), torch.cat(labels)


def sample_pairs(labels: Tensor, pairs: int, generator: torch.Generator) -> Tensor:
    """(pairs, 4) indices into the pool: first, same (= first), similar (same label), different (other label)."""
    labels = labels.to("cpu", torch.long)
    classes, counts = labels.unique(return_counts=True)
    if classes.numel() < 2:
        raise MimkitError(f"the image pool holds one class only ({int(classes[0])}); "
                          "--pool must be large enough to include at least two classes")
    eligible_classes = set(classes[counts >= 2].tolist())
    eligible = torch.tensor([i for i, c in enumerate(labels.tolist()) if c in eligible_classes], dtype=torch.long)
    if eligible.numel() == 0:
        raise MimkitError("no class has two images in the pool; raise --pool")
    out = torch.empty(pairs, 4, dtype=torch.long)
    for p in range(pairs):
        i = int(eligible[torch.randint(0, eligible.numel(), (1,), generator=generator)])
        same_cls = torch.nonzero((labels == labels[i]) & (torch.arange(labels.numel()) != i)).flatten()
        other_cls = torch.nonzero(labels != labels[i]).flatten()
        j = int(same_cls[torch.randint(0, same_cls.numel(), (1,), generator=generator)])
        k = int(other_cls[torch.randint(0, other_cls.numel(), (1,), generator=generator)])
        out[p] = torch.tensor([i, i, j, k])
    return out


def _losses(method, images: Tensor, smask: PatchMask, tmask: PatchMask) -> tuple[Tensor, Tensor]:
    """RC-MAE ``(L_r, L_c)`` (Eq. 1 and 3) with explicit student / teacher masks."""
    pred = method.student(images, smask.ids_keep, smask.ids_restore)
    loss_r = masked_mse(pred, method.targets(images), smask.mask)
    t_pred = method.teacher(images, tmask.ids_keep, tmask.ids_restore)
    loss_c = masked_mse(pred, t_pred.to(pred.dtype), smask.mask)
    return loss_r, loss_c


def _flat(grads, params) -> Tensor:
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)]).double()


def _visible_cos(a: Tensor, b: Tensor, mask: Tensor, patch_size: int) -> float:
    """cos of two images' visible pixels (the masked inputs x~ of the linear model)."""
    keep = (1 - mask).unsqueeze(-1)
    u = (patchify(a, patch_size) * keep).flatten().double()
    v = (patchify(b, patch_size) * keep).flatten().double()
    denom = float(u.norm() * v.norm())
    return float(u @ v) / denom if denom > 0 else 0.0


def probe_pairs(method, images: Tensor, labels: Tensor, settings: AlignmentSettings, momentum: float,
                progress: Callable[[int, int], None] | None = None) -> dict[str, np.ndarray]:
    """Run the protocol; returns (pairs, 3) arrays ``lc_norm``, ``lr_norm``, ``cos``, ``input_cos``,
    (pairs,) ``first_step_loss_ratio`` (loss on the first image after / before the step: < 1 means the step
    descended) and ``indices`` (pairs, 4) into the pool, ``labels`` (pairs, 4).

    On CPU the passes (batch size 1) run single-threaded: on a busy 2-core machine thread hand-offs cost
    several times the work itself.
    """
    if images.device.type != "cpu":
        return _probe_pairs(method, images, labels, settings, momentum, progress)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _probe_pairs(method, images, labels, settings, momentum, progress)
    finally:
        torch.set_num_threads(threads)


def _probe_pairs(method, images, labels, settings, momentum, progress) -> dict[str, np.ndarray]:
    g = torch.Generator().manual_seed(int(settings.seed))
    index = sample_pairs(labels, settings.pairs, g)
    work = copy.deepcopy(method)
    work.eval()
    s0 = {k: v.detach().clone() for k, v in method.student.state_dict().items()}
    t0 = {k: v.detach().clone() for k, v in method.teacher.module.state_dict().items()}
    params = [p for p in work.student.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=settings.lr, momentum=0.0, weight_decay=0.0)
    num_patches, device = work.num_patches, images.device
    out = {k: np.zeros((settings.pairs, len(SEQUENCE_TYPES))) for k in ("lc_norm", "lr_norm", "cos", "input_cos")}
    loss_ratio = np.zeros(settings.pairs)
    for p in range(settings.pairs):
        smask = mask_from_noise(torch.rand(1, num_patches, generator=g).to(device), work.mask_ratio)
        if work.mask_mode == "same":
            tmask = smask
        else:
            tmask = mask_from_noise(torch.rand(1, num_patches, generator=g).to(device), work.mask_ratio)
        work.student.load_state_dict(s0)
        work.teacher.module.load_state_dict(t0)
        first = images[index[p, 0]].unsqueeze(0)
        # one gradient step + one teacher update on the first input
        loss_r, loss_c = _losses(work, first, smask, tmask)
        loss_before = loss_r + work.gamma * loss_c
        opt.zero_grad(set_to_none=True)
        loss_before.backward()
        opt.step()
        work.teacher.update(work.student, momentum)
        opt.zero_grad(set_to_none=True)
        # both gradients on the second input
        for t in range(len(SEQUENCE_TYPES)):
            second = images[index[p, 1 + t]].unsqueeze(0)
            loss_r, loss_c = _losses(work, second, smask, tmask)
            if t == 0:  # same: the first input after the step
                loss_ratio[p] = float((loss_r + work.gamma * loss_c).detach() / loss_before.detach())
            g_r = _flat(torch.autograd.grad(loss_r, params, retain_graph=True, allow_unused=True), params)
            g_c = _flat(torch.autograd.grad(loss_c, params, allow_unused=True), params)
            n_r, n_c = float(g_r.norm()), float(g_c.norm())
            out["lr_norm"][p, t] = n_r
            out["lc_norm"][p, t] = n_c
            out["cos"][p, t] = max(-1.0, min(1.0, float(g_r @ g_c) / (n_r * n_c))) if n_r * n_c > 0 else 0.0
            out["input_cos"][p, t] = _visible_cos(first, second, smask.mask, work.patch_size)
        if progress is not None:
            progress(p + 1, settings.pairs)
    out["first_step_loss_ratio"] = loss_ratio
    out["indices"] = index.numpy()
    out["labels"] = labels[index].numpy()
    return out


def summarize(results: dict[str, np.ndarray], settings: AlignmentSettings, *, checkpoint: str, cfg,
              momentum: float) -> dict:
    per_type = {q: type_statistics(results[q]) for q in ("lc_norm", "lr_norm", "cos", "input_cos")}
    return {
        "experiment": "grad-alignment",
        "paper": "rc-mae.txt Sec. 4 and App. D, Fig. 2 (d-f)",
        "checkpoint": str(checkpoint),
        "model": {"method": cfg.method.name, "mask_mode": cfg.method.mask_mode, "mask_ratio": cfg.method.mask_ratio,
                  "gamma": cfg.method.gamma, "model": cfg.model.name, "data": cfg.data.name},
        "settings": {**asdict(settings), "teacher_momentum": float(momentum), "optimizer": "SGD (no momentum)",
                     "similar": "another image of the same class", "different": "an image of another class",
                     "masks": "one student mask per pair shared by both inputs"},
        "probes": {"pairs": int(results["cos"].shape[0]), "fraction_unit": "one image pair"},
        "per_type": per_type,
        "first_step_loss_ratio": {"mean": float(np.mean(results["first_step_loss_ratio"])),
                                  "max": float(np.max(results["first_step_loss_ratio"]))},
        "verdicts": trend_verdicts(results["lc_norm"], results["lr_norm"], results["cos"],
                                   near_zero=settings.near_zero),
    }


def write_outputs(out_dir: Path, results: dict[str, np.ndarray], summary: dict) -> tuple[Path, Path]:
    """``grad_alignment.png`` (Fig. 2 d-f as per-pair histograms), ``summary.json`` and ``pairs.npz``."""
    import json

    from mimkit.analysis.plots import save_distribution_figure

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    s, m = summary["settings"], summary["model"]
    title = (f"RC-MAE ({m['mask_mode']} mask, {m['model']}, {m['data']}): {summary['probes']['pairs']} pairs, "
             f"one SGD step lr {s['lr']:g} + EMA m {s['teacher_momentum']:g} on the first image, "
             "gradients on the second")
    png = save_distribution_figure(results, out_dir / "grad_alignment.png", title)
    js = out_dir / "summary.json"
    js.write_text(json.dumps(summary, indent=2) + "\n")
    np.savez_compressed(out_dir / "pairs.npz", types=np.array(SEQUENCE_TYPES), **results)
    return png, js

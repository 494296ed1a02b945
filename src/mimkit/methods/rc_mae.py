"""RC-MAE (Lee et al. 2023): MAE plus a consistency loss to an EMA teacher's reconstructions.

rc-mae.txt Sec. 5. The teacher is a full MAE (encoder + decoder) with the student's architecture,
initialised from the student and updated by EMA (Eq. 2) after optimiser steps. For a student mask
``M_s`` (1 = removed):

* ``L_r`` = MAE reconstruction loss over ``M_s`` (Eq. 1), against norm-pix targets by default;
* ``L_c`` = per-patch MSE between the student's and the (detached, no-autograd) teacher's
  predictions, averaged over the student's masked patches ``M_s`` (Eq. 3);
* ``loss = L_r + gamma * L_c`` (Eq. 6, gamma = 1 in the paper).

``mask_mode="same"`` (RC-MAE-S, the paper's default and the only variant of the reference code):
the teacher sees exactly the student's visible patches. ``mask_mode="different"`` (RC-MAE-D): the
teacher gets an independent random mask; the loss is still averaged over the student's ``M_s``.

With norm_pix_loss the teacher's predictions are already in normalised-pixel space, so they are
compared with the student's as they are.

Optional gradient-alignment monitor (Fig. 3b): every ``grad_align_every`` optimiser steps the
cosine between the flattened gradients of ``L_r`` and ``L_c`` w.r.t. the student's parameters is
logged as ``grad_cos`` (two extra backward passes on those steps).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import Tensor

from mimkit.errors import MimkitError
from mimkit.losses import masked_mse
from mimkit.methods.base import Progress, StepOutput, Which
from mimkit.methods.mae import MAE
from mimkit.models.vit import MaskedAutoencoder, ModelSpec
from mimkit.teacher import EMATeacher, MomentumSchedule, TeacherHooks

MASK_MODES = ("same", "different")


class RCMAE(TeacherHooks, MAE):
    name = "rc-mae"
    #: downstream use of the teacher's encoder (rc-mae App. E.2, App. F.1 / Table 12)
    default_which: Which = "teacher"

    def __init__(
        self,
        spec: ModelSpec,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = True,
        mask_mode: str = "same",
        gamma: float = 1.0,
        momentum: MomentumSchedule = MomentumSchedule(0.996),
        grad_align_every: int = 0,
    ):
        super().__init__(spec, mask_ratio=mask_ratio, norm_pix_loss=norm_pix_loss)
        if mask_mode not in MASK_MODES:
            raise MimkitError(f"unknown RC-MAE mask mode {mask_mode!r}; accepted: {', '.join(MASK_MODES)}")
        if not (isinstance(gamma, (int, float)) and not isinstance(gamma, bool) and math.isfinite(gamma)
                and gamma >= 0):
            raise MimkitError(f"RC-MAE consistency weight gamma must be a finite number >= 0, got {gamma!r}")
        if not isinstance(momentum, MomentumSchedule):
            raise MimkitError(f"RC-MAE momentum must be a MomentumSchedule, got {type(momentum).__name__}")
        if not (isinstance(grad_align_every, int) and not isinstance(grad_align_every, bool)
                and grad_align_every >= 0):
            raise MimkitError(f"grad_align_every must be an integer >= 0 (0 = off), got {grad_align_every!r}")
        self.mask_mode = mask_mode
        self.gamma = float(gamma)
        self.momentum = momentum
        self.grad_align_every = grad_align_every
        # full MAE (encoder + decoder), a copy of the freshly initialised student (App. E.2)
        self.teacher = EMATeacher(self.student)
        self._last_momentum = float(momentum.base)
        self._opt_steps = 0  # optimiser steps done, as last reported by after_optimizer_step

    # -- loss ---------------------------------------------------------------------------------------
    def forward(self, images: Tensor) -> StepOutput:
        mask = self.sample_mask(images)  # M_s
        pred = self.student(images, mask.ids_keep, mask.ids_restore)
        loss_rec = masked_mse(pred, self.targets(images), mask.mask)  # L_r, Eq. (1)

        # RC-MAE-S: same visible patches; RC-MAE-D: an independent mask for the teacher.
        t_mask = mask if self.mask_mode == "same" else self.sample_mask(images)
        # EMATeacher.forward runs under no_grad: no graph, the target is constant.
        # With drop path on, the student's forward is stochastic (the teacher is always in eval),
        # so L_c == 0 at step 0 for RC-MAE-S holds only when drop path is off.
        t_pred = self.teacher(images, t_mask.ids_keep, t_mask.ids_restore)
        loss_cons = masked_mse(pred, t_pred.to(pred.dtype), mask.mask)  # L_c over M_s, Eq. (3)

        loss = loss_rec + self.gamma * loss_cons  # Eq. (6)
        metrics: dict[str, Tensor | float] = {
            "loss_rec": loss_rec.detach(),
            "loss_cons": loss_cons.detach(),
            "momentum": self._last_momentum,
        }
        if self._grad_align_due():
            metrics["grad_cos"] = self.gradient_cosine(loss_rec, loss_cons)
        return StepOutput(loss, metrics)

    def _grad_align_due(self) -> bool:
        k = self.grad_align_every
        return k > 0 and self.training and torch.is_grad_enabled() and self._opt_steps % k == 0

    def gradient_cosine(self, loss_rec: Tensor, loss_cons: Tensor) -> Tensor:
        """cos(grad L_r, grad L_c) over all trainable student parameters, flattened (Fig. 3b).

        Both graphs are retained so the caller can still back-propagate the total loss. A parameter
        that ``L_c`` does not reach gets a zero gradient; the cosine of a zero vector is 0.
        """
        params = [p for p in self.student.parameters() if p.requires_grad]
        g_r = torch.autograd.grad(loss_rec, params, retain_graph=True, allow_unused=True)
        g_c = torch.autograd.grad(loss_cons, params, retain_graph=True, allow_unused=True)
        flat_r = torch.cat([_flat(g, p) for g, p in zip(g_r, params)]).double()
        flat_c = torch.cat([_flat(g, p) for g, p in zip(g_c, params)]).double()
        denom = flat_r.norm() * flat_c.norm()
        if denom == 0:
            return torch.zeros((), device=flat_r.device)
        return (flat_r @ flat_c / denom).clamp(-1.0, 1.0).float()

    # -- teacher updates ----------------------------------------------------------------------------
    def ema_source(self) -> MaskedAutoencoder:
        return self.student  # the whole MAE: encoder and decoder

    def after_optimizer_step(self, progress: Progress) -> dict[str, float]:
        self._opt_steps = progress.step
        return super().after_optimizer_step(progress)

    def method_state_dict(self) -> dict:
        """The last momentum and the optimiser-step counter of the gradient-alignment monitor."""
        return {**super().method_state_dict(), "opt_steps": int(self._opt_steps)}

    def load_method_state_dict(self, state: dict) -> None:
        super().load_method_state_dict(state)
        self._opt_steps = int(state.get("opt_steps", self._opt_steps))

    # -- encoders / checkpoints ---------------------------------------------------------------------
    def encoder(self, which: Which = "student"):
        if which == "student":
            return self.student.encoder
        if which == "teacher":
            return self.teacher.module.encoder
        raise MimkitError(f"method {self.name} has no {which!r} encoder; accepted: student, teacher")

    def teacher_model(self) -> MaskedAutoencoder:
        return self.teacher.module

    # -- end of training ----------------------------------------------------------------------------
    def on_train_end(self, run_dir: Path) -> dict:
        """Histogram of the logged ``grad_cos`` values (``grad_alignment.png``) when the monitor was on."""
        if self.grad_align_every <= 0:
            return {}
        run_dir = Path(run_dir)
        metrics = run_dir / "metrics.jsonl"
        if not metrics.is_file():
            return {}
        summary = save_grad_alignment_histogram(metrics, run_dir / "grad_alignment.png")
        return summary if summary["n"] > 0 else {}


def _flat(grad: Tensor | None, param: Tensor) -> Tensor:
    return torch.zeros(param.numel(), device=param.device, dtype=param.dtype) if grad is None else grad.reshape(-1)


def _read_grad_cos(metrics_jsonl: Path) -> list[float]:
    """``grad_cos`` values (key ``grad_cos`` or ``*/grad_cos``) of a metrics.jsonl, finite only."""
    values: list[float] = []
    with open(metrics_jsonl, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line of an interrupted run
            if not isinstance(record, dict):
                continue
            for key, value in record.items():
                if (key == "grad_cos" or key.endswith("/grad_cos")) and isinstance(value, (int, float)) \
                        and not isinstance(value, bool) and math.isfinite(value):
                    values.append(float(value))
    return values


def save_grad_alignment_histogram(metrics_jsonl: Path, out_png: Path) -> dict:
    """Histogram of cos(grad L_r, grad L_c) as in rc-mae Fig. 3(b).

    Reads every ``grad_cos`` value from ``metrics_jsonl`` (one JSON object per line) and writes
    ``out_png`` (matplotlib, Agg canvas, no pyplot state). Returns ``{"grad_cos_mean",
    "grad_cos_frac_negative", "n"}``; with no values it writes nothing and returns ``n = 0`` with
    NaN statistics.
    """
    values = _read_grad_cos(Path(metrics_jsonl))
    n = len(values)
    if n == 0:
        return {"grad_cos_mean": float("nan"), "grad_cos_frac_negative": float("nan"), "n": 0}
    mean = sum(values) / n
    frac_neg = sum(v < 0 for v in values) / n

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.hist(values, bins=min(50, max(10, n // 5)), range=(-1.0, 1.0), color="tab:blue", alpha=0.8)
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.axvline(mean, color="tab:red", linestyle="--", linewidth=1.0, label=f"mean {mean:.3f}")
    ax.set_xlabel(r"cos($\nabla L_r$, $\nabla L_c$)")
    ax.set_ylabel("count")
    ax.set_title(f"gradient alignment (n={n}, {100 * frac_neg:.0f}% negative)")
    ax.legend(loc="upper right")
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    return {"grad_cos_mean": mean, "grad_cos_frac_negative": frac_neg, "n": n}

"""RC-MAE without a teacher: the consistency gradient as a correction inside the optimiser step.

rc-mae.txt Sec. 7 asks whether the teacher's "conditional momentum correction" can live in the optimiser
instead of a full model copy. This method is MAE's forward and loss (Eq. 1) plus, before every optimiser
step, a correction added to the final gradients that stands in for ``gamma * grad_S L_c`` (Eqs. 3, 6):

* **The difference buffer** ``D = S - T`` (per corrected parameter) needs no teacher. With the EMA
  ``T_t = m T_(t-1) + (1 - m) S_t`` (Eq. 2): ``D_t = m (D_(t-1) + Delta_t)``, ``Delta_t = S_t - S_(t-1)``
  the optimiser's last update (weight decay included). Kept exactly, without a copy of ``S``:
  ``D -= S`` before the step, ``D += S`` after it, ``D *= m`` when the schedule makes a teacher update
  (the same ``method.momentum*`` / ``ema_unit`` keys as RC-MAE; between updates T is constant, so
  ``D = S - T`` follows S). ``D`` starts at 0 (the teacher starts as a copy of the student).
* **The curvature** ``A`` per ``nn.Linear`` (and the patch embedding, a linear map of patch vectors):
  the consistency gradient of a linear layer ``y = W a + b`` is ``(S - T) [a; 1] [a; 1]^T`` summed over
  the tokens the loss sees (rc-mae Eq. 7c, App. D), so the correction is ``gamma * [D_W | D_b] A`` with
  ``A = sum_n w_n [a_n; 1][a_n; 1]^T`` from the student's own forward:
  - prediction head (``decoder.pred``): ``w_n = 2 / (|M| P)`` on the masked tokens, 0 elsewhere: the
    exact gradient of ``masked_mse`` w.r.t. the head when the head is the only layer that differs;
  - every other linear layer: the output side of the Gauss-Newton block ``J^T J`` is approximated per token
    by a multiple of the identity, estimated from the reconstruction gradient ``delta_n = dL_r / dy_n`` of
    the same backward pass: ``w_n = |M| P ||delta_n||^2 / (2 sigma^2 d_out)`` with ``sigma^2 = L_r``
    (for residuals with per-element variance ``sigma^2``, ``E ||J^T r||^2 = sigma^2 ||J||_F^2``). For the
    head this gives the exact weights in expectation. Cross-layer and cross-token terms are dropped
    (block-diagonal, K-FAC-like); ``docs/analysis.md`` measures how close this is on a ViT.
* Norm weights/biases, the cls and mask tokens get no correction (about 0.3 % of the parameters; no D kept);
  the position embeddings are fixed. ``method.correction_tokens=K`` (0 = all) estimates each layer's ``A``
  from at most K tokens per image (a strided subset that moves with the step), the cost knob;
  ``method.correction_scope=head`` corrects the prediction head only (the exact part; ``D`` for the head only).
* ``method.output_factor=fisher`` (experimental): the inner layers' output side from the per-image empirical
  Fisher, ``|M| P / (2 sigma^2) sum_b <G_b, D> G_b`` with ``G_b = sum_n delta_n [a_n; 1]^T`` (cross-token terms
  kept in expectation; every token; its norm overshoots the true gradient's, docs/analysis.md section 4).
* Two equal ways to form ``[D_W | D_b] A``, chosen per layer by cost: accumulate ``A`` (``2 (d_in + 1)^2``
  FLOPs per token, then one product with ``D`` per step), or, when ``2 d_out <= d_in + 1`` (an MLP's second
  layer, the prediction head), multiply by ``D`` per token: ``P = D_W x_n + D_b``, then ``sum_n w_n P_n [x_n; 1]^T``
  (``4 d_out (d_in + 1)`` per token: a forward and a weight gradient of the layer). They differ by float round-off.

``A`` is summed over accumulation micro-steps and all-reduced over processes (with the global ``sigma^2``),
so the correction is the same whatever the process count and accumulation (up to float round-off).
Differences from RC-MAE besides the approximation: the student's predictions are compared with a
*first-order* teacher (exact for a linear model: ``analysis/linear_model.py``, teacher-free arm), only the
RC-MAE-S case (same mask) is modelled, and there is no teacher encoder to evaluate (``--which student``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mimkit.errors import MimkitError
from mimkit.losses import masked_mse
from mimkit.methods.base import Progress, StepOutput, Which
from mimkit.methods.mae import MAE
from mimkit.models.vit import ModelSpec
from mimkit.teacher import MomentumSchedule

HEAD = "decoder.pred"
SCOPES = ("all", "head")
OUTPUT_FACTORS = ("isotropic", "fisher")


def advance_difference(D: Tensor, delta: Tensor, momentum: float) -> Tensor:
    """``D_t = m (D_(t-1) + Delta_t)``: student minus EMA teacher after a step ``Delta_t`` and an EMA update."""
    return momentum * (D + delta)


def augmented_second_moment(x: Tensor, w: Tensor) -> Tensor:
    """``sum_n w_n [x_n; 1][x_n; 1]^T`` for tokens x (n, d) and weights w (n,): (d + 1, d + 1) float32."""
    xa = torch.cat([x.float(), x.new_ones(x.shape[0], 1, dtype=torch.float32)], dim=1)
    return (xa * w.float()[:, None]).T @ xa


class _Tap:
    """One corrected linear map: its parameters, its curvature accumulator and its hooks."""

    def __init__(self, name: str, module: nn.Module, owner: RCMAEFree):
        self.name, self.module, self.owner = name, module, owner
        self.head = name == HEAD
        self.conv = isinstance(module, nn.Conv2d)
        self.d_out = module.weight.shape[0]
        # the cheaper of two equal forms: accumulate A ((d_in + 1)^2 per token) and multiply by D at the step,
        # or multiply by D per token (a forward and a weight-gradient's work: 2 d_out (d_in + 1) per token)
        self.direct = 2 * self.d_out <= self.in_dim() + 1 or (owner.output_factor == "fisher" and not self.head)
        # A-form: A = sum_n w_n [x_n; 1][x_n; 1]^T, (d_in + 1)^2; direct: [D_W | D_b] A, (d_out, d_in + 1)
        self.acc: Tensor | None = None
        self.handle = module.register_forward_hook(self._forward)

    def tokens(self, inp: Tensor) -> Tensor:
        """Input vectors (B, n, d_in) in the order of the output's tokens."""
        if self.conv:  # kernel = stride = patch: a linear map of (C, p, p)-flattened patches, row-major grid
            p = self.module.kernel_size
            return F.unfold(inp, kernel_size=p, stride=p).transpose(1, 2)
        return inp

    def _forward(self, module, inputs, out: Tensor) -> None:
        own = self.owner
        if not (own._collecting and out.requires_grad and torch.is_grad_enabled()):
            return
        x = inputs[0].detach()
        if self.head:  # exact weights from the mask (cls position: 0)
            w = own._head_weights
            self.add(self.tokens(x), w.to(x.device))
            return
        out.register_hook(lambda g: self._backward(x, g))

    def _backward(self, x: Tensor, grad: Tensor) -> None:
        """An inner layer's tokens and output gradients: (a strided subset of) them weighted by ``||delta_n||^2``."""
        x = self.tokens(x)
        g = grad.detach().flatten(2).transpose(1, 2) if self.conv else grad.detach()   # (B, n, d_out)
        if self.owner.output_factor == "fisher":
            self._fisher(x, g)
            return
        n, k, factor = x.shape[1], self.owner.correction_tokens, 1.0
        if k and n > k:  # the subset first: the weights of the other tokens are never computed
            stride = math.ceil(n / k)
            start = self.owner._subsample_offset % stride
            x, g = x[:, start::stride], g[:, start::stride]
            factor = n / len(range(start, n, stride))
        w = self.owner._inner_weights(g, self.d_out)
        self.add(x, w * factor if factor != 1.0 else w)

    def _fisher(self, x: Tensor, g: Tensor) -> None:
        """Per-image empirical Fisher of the layer times D: ``|M| P / 2 * sum_b <G_b, D> G_b`` with the image's
        gradient ``G_b = sum_n delta_n [x_n; 1]^T`` (sigma^2 divided out at the step)."""
        own = self.owner
        scale = own._scale if own._scale is not None else torch.ones((), device=g.device)
        x, g = x.float(), g.float() / scale
        with torch.autocast(x.device.type, enabled=False):
            P = F.linear(x, *self.difference())                                              # (B, n, d_out)
            q = (g * P).sum(dim=(1, 2))                                                      # <G_b, D>
            gq = (g * (q * (own._cur[0] / 2.0))[:, None, None]).reshape(-1, self.d_out)
            xf = x.reshape(-1, x.shape[-1])
            C = torch.cat([gq.T @ xf, gq.sum(0)[:, None]], dim=1)
        self.acc = C if self.acc is None else self.acc + C

    def add(self, x: Tensor, w: Tensor) -> None:
        """Accumulate ``sum_n w_n [x_n; 1][x_n; 1]^T`` over the tokens of x (B, n, d) with weights w (B, n), or,
        for a direct tap, that sum already multiplied by ``[D_W | D_b]`` (``D`` is fixed within a step)."""
        x, w = x.reshape(-1, x.shape[-1]).float(), w.reshape(-1).float()
        with torch.autocast(x.device.type, enabled=False):  # the head's hook runs inside the autocast forward
            if self.direct:
                P = F.linear(x, *self.difference()) * w[:, None]
                C = torch.cat([P.T @ x, P.sum(0)[:, None]], dim=1)   # [D_W | D_b] sum_n w_n [x_n; 1][x_n; 1]^T
            else:
                C = augmented_second_moment(x, w)
        self.acc = C if self.acc is None else self.acc + C

    def difference(self) -> tuple[Tensor, Tensor | None]:
        """This layer's ``D_W`` as (d_out, d_in) and ``D_b`` (None without a bias)."""
        (wn, _), *bias = self.params()
        D = self.owner.D
        return D[f"student.{wn}"].reshape(self.d_out, -1), (D[f"student.{bias[0][0]}"] if bias else None)

    def acc_shape(self) -> tuple[int, int]:
        return (self.d_out if self.direct else self.in_dim() + 1, self.in_dim() + 1)

    def in_dim(self) -> int:
        return self.module.weight[0].numel()

    def params(self) -> list[tuple[str, nn.Parameter]]:
        out = [(f"{self.name}.weight", self.module.weight)]
        if self.module.bias is not None:
            out.append((f"{self.name}.bias", self.module.bias))
        return out


class RCMAEFree(MAE):
    name = "rc-mae-free"
    default_which: Which = "student"
    edits_gradients = True

    def __init__(self, spec: ModelSpec, mask_ratio: float = 0.75, norm_pix_loss: bool = True, gamma: float = 1.0,
                 momentum: MomentumSchedule = MomentumSchedule(0.996), correction_tokens: int = 0,
                 correction_scope: str = "all", output_factor: str = "isotropic"):
        super().__init__(spec, mask_ratio=mask_ratio, norm_pix_loss=norm_pix_loss)
        if not (isinstance(gamma, (int, float)) and not isinstance(gamma, bool) and math.isfinite(gamma)
                and gamma >= 0):
            raise MimkitError(f"rc-mae-free consistency weight gamma must be a finite number >= 0, got {gamma!r}")
        if not isinstance(momentum, MomentumSchedule):
            raise MimkitError(f"rc-mae-free momentum must be a MomentumSchedule, got {type(momentum).__name__}")
        if not (isinstance(correction_tokens, int) and not isinstance(correction_tokens, bool)
                and correction_tokens >= 0):
            raise MimkitError("method.correction_tokens must be an integer >= 0 (0 = every token), got "
                              f"{correction_tokens!r}")
        if output_factor not in OUTPUT_FACTORS:
            raise MimkitError(f"unknown method.output_factor {output_factor!r}; accepted: {', '.join(OUTPUT_FACTORS)}")
        if output_factor == "fisher" and correction_tokens:
            raise MimkitError(f"method.output_factor=fisher uses every token; got method.correction_tokens="
                              f"{correction_tokens}; accepted: 0")
        if correction_scope not in SCOPES:
            raise MimkitError(f"unknown method.correction_scope {correction_scope!r}; accepted: {', '.join(SCOPES)}")
        self.gamma = float(gamma)
        self.momentum = momentum
        self.correction_tokens = correction_tokens
        self.correction_scope = correction_scope
        self.output_factor = output_factor
        # scope "head": only the exact part (the prediction head's own D), at almost no cost
        self._taps = [_Tap(name, mod, self) for name, mod in self.student.named_modules()
                      if (isinstance(mod, nn.Linear) or name == "encoder.patch_embed.proj")
                      and (correction_scope == "all" or name == HEAD)]
        self.D: dict[str, Tensor] = {}          # S - T per corrected parameter (created at the first step)
        self._collecting = True
        self._head_weights: Tensor | None = None
        self._scale: Tensor | None = None       # d(backward root)/d(L_r) of the running micro-step
        self._stats = torch.zeros(2, dtype=torch.float64)  # sum of sigma^2 (= L_r), micro-steps
        self._cur = (1.0, 1.0)                  # (|M| P, sigma^2) of the running micro-step
        self._m_p = 1.0
        self._subsample_offset = 0
        self._pending = False
        self._last_momentum = float(momentum.base)

    # -- loss and curvature ---------------------------------------------------------------------------
    def forward(self, images: Tensor) -> StepOutput:
        mask = self.sample_mask(images)
        collect = self._collecting and self.training and torch.is_grad_enabled()
        if collect:
            if not self.D:
                self._ensure_D()                # direct taps multiply by D during the backward pass
            m = mask.mask.float()
            count = float(m.sum())
            p_dim = self.patch_size**2 * images.shape[1]
            # exact head weights 2 / (|M| P) on masked tokens; the decoder's cls position gets none
            self._head_weights = torch.cat([m.new_zeros(m.shape[0], 1), m], dim=1) * (2.0 / (count * p_dim))
            self._m_p = count * p_dim
        pred = self.student(images, mask.ids_keep, mask.ids_restore)
        loss = masked_mse(pred, self.targets(images), mask.mask)  # Eq. (1)
        if collect:
            sigma2 = float(loss.detach())
            self._cur = (self._m_p, max(sigma2, 1e-12))
            self._stats[0] += sigma2
            self._stats[1] += 1
            if loss.requires_grad:
                loss.register_hook(self._capture_scale)
        return StepOutput(loss, {"loss_rec": loss.detach(), "momentum": self._last_momentum})

    def _capture_scale(self, g: Tensor) -> None:
        self._scale = g.detach().float()

    def _inner_weights(self, grad: Tensor, d_out: int) -> Tensor:
        """``|M| P ||delta_n||^2 / (2 d_out)`` per token of grad (B, n, d_out) (sigma^2 is divided out globally at
        the step)."""
        g = grad.float()
        g2 = (g * g).sum(-1)                                             # (B, n)
        scale = self._scale if self._scale is not None else torch.ones((), device=g.device)
        return g2 / scale.pow(2).clamp_min(1e-30) * (self._cur[0] / (2.0 * d_out))

    # -- the correction ---------------------------------------------------------------------------------
    def corrected_parameters(self) -> dict[str, nn.Parameter]:
        return {f"student.{n}": p for tap in self._taps for n, p in tap.params()}

    def _ensure_D(self) -> None:
        for name, p in self.corrected_parameters().items():
            if name not in self.D:
                self.D[name] = torch.zeros_like(p, dtype=torch.float32)

    def _reduce(self) -> tuple[list[Tensor | None], float, float]:
        """All-reduce the curvature sums and statistics; returns (sum per tap, micro-steps, mean sigma^2)."""
        import torch.distributed as dist

        stats = self._stats.clone()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dev = next(self.student.parameters()).device
            flat = [tap.acc.reshape(-1) if tap.acc is not None else torch.zeros(math.prod(tap.acc_shape()), device=dev)
                    for tap in self._taps]
            buf = torch.cat(flat + [stats.to(dev, torch.float32)])
            dist.all_reduce(buf)
            out, i = [], 0
            for tap in self._taps:
                n = math.prod(tap.acc_shape())
                out.append(buf[i:i + n].view(tap.acc_shape()))
                i += n
            stats = buf[i:].double().cpu()
            sums = out
        else:
            sums = [tap.acc for tap in self._taps]
        micro = float(stats[1])
        return sums, micro, float(stats[0]) / max(micro, 1.0)

    @torch.no_grad()
    def correction(self) -> dict[str, Tensor]:
        """``gamma * [D_W | D_b] A`` per corrected parameter (``student.``-prefixed names), from the
        curvature collected since the last step; empty before any forward."""
        self._ensure_D()
        sums, micro, sigma2 = self._reduce()
        out: dict[str, Tensor] = {}
        if micro == 0:
            return out
        for tap, acc in zip(self._taps, sums):
            if acc is None:
                continue
            acc = acc / micro if tap.head else acc / (micro * max(sigma2, 1e-12))
            (wn, w), *bias = tap.params()
            if tap.direct:
                C = self.gamma * acc
            else:
                Dw, Db = tap.difference()
                Db = Db if Db is not None else torch.zeros_like(Dw[:, 0])
                C = self.gamma * (torch.cat([Dw, Db[:, None]], dim=1) @ acc)
            out[f"student.{wn}"] = C[:, :-1].reshape(w.shape).to(w.dtype)
            if bias:
                out[f"student.{bias[0][0]}"] = C[:, -1].to(w.dtype)
        return out

    def reset_curvature(self) -> None:
        for tap in self._taps:
            tap.acc = None
        self._stats.zero_()
        self._scale = None

    @torch.no_grad()
    def before_optimizer_step(self, progress: Progress) -> None:
        params = self.corrected_parameters()
        for name, c in self.correction().items():
            p = params[name]
            p.grad = c.clone() if p.grad is None else p.grad.add_(c)
        self.reset_curvature()
        self._subsample_offset = progress.step
        torch._foreach_sub_(list(self.D.values()), [params[n].float() for n in self.D])  # D - S_(t-1)
        self._pending = True

    @torch.no_grad()
    def after_optimizer_step(self, progress: Progress) -> dict[str, float]:
        if not self._pending:
            raise RuntimeError("rc-mae-free: after_optimizer_step without before_optimizer_step (D needs both)")
        params = self.corrected_parameters()
        torch._foreach_add_(list(self.D.values()), [params[n].float() for n in self.D])  # + S_t: D + Delta_t
        self._pending = False
        due = getattr(self.momentum, "due", None)
        if self.momentum.unit == "step" and (due is None or due(progress)):
            return self._teacher_update(self.momentum.momentum_for(progress))
        return {}

    def after_epoch(self, progress: Progress) -> dict[str, float]:
        if self.momentum.unit == "epoch":
            return self._teacher_update(self.momentum.momentum_for(progress))
        return {}

    def _teacher_update(self, m: float) -> dict[str, float]:
        """What the EMA update (Eq. 2) does to ``S - T``: ``D <- m D``."""
        if self.D:
            torch._foreach_mul_(list(self.D.values()), float(m))
        self._last_momentum = float(m)
        return {"momentum": float(m)}

    def reset_teacher(self) -> None:
        for d in self.D.values():
            d.zero_()

    # -- state ----------------------------------------------------------------------------------------
    def method_state_dict(self) -> dict:
        self._ensure_D()
        return {"D": {k: v.detach().cpu().clone() for k, v in self.D.items()}, "last_momentum": self._last_momentum}

    def load_method_state_dict(self, state: dict) -> None:
        D = (state or {}).get("D")
        if D is None:
            raise MimkitError("checkpoint has no rc-mae-free difference buffers (method_state.D); it cannot resume "
                              "an rc-mae-free run exactly")
        params = self.corrected_parameters()
        missing, unexpected = sorted(set(params) - set(D)), sorted(set(D) - set(params))
        bad = sorted(k for k in D if k in params and tuple(D[k].shape) != tuple(params[k].shape))
        if missing or unexpected or bad:
            raise MimkitError(f"rc-mae-free difference buffers do not match the model: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}, wrong shape {bad[:3]}")
        self.D = {k: D[k].detach().to(params[k].device, torch.float32).clone() for k in params}
        self._last_momentum = float(state.get("last_momentum", self._last_momentum))
        self._pending = False

    def encoder(self, which: Which = "student"):
        if which != "student":
            raise MimkitError(f"method {self.name} has no {which!r} encoder (it keeps no teacher); accepted: student")
        return self.student.encoder

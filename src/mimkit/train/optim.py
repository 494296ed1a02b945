"""Optimiser and learning-rate schedule of the MAE recipe (rc-mae.txt Table 9)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn


def param_groups(named_params: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """Two AdamW groups: decay on weight matrices, none on biases, norms, tokens and other 1-D params."""
    decay, no_decay = [], []
    for name, p in named_params:
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(".bias") or "token" in name or "pos_embed" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def effective_lr(blr: float, effective_batch: int) -> float:
    """Linear scaling rule (Goyal et al.): lr = blr * effective_batch / 256."""
    return blr * effective_batch / 256


def lr_at(step: int, total_steps: int, warmup_steps: int, peak_lr: float, min_lr: float = 0.0) -> float:
    """Per-iteration linear warmup to ``peak_lr``, then half-cosine down to ``min_lr``.

    ``step`` counts optimiser steps from 0 (the lr used by the step with that index).
    """
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / span, 1.0)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def adamw(groups: list[dict], lr: float, betas, fused: bool | None = None) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` over ``groups``, fused (one kernel per parameter, no temporaries) where supported.

    ``fused=None``: the fused implementation when this torch supports it for the parameters' device (CPU and CUDA
    since torch 2.4), else the default (foreach). Same update rule; on a 2-core CPU the foreach path's temporaries
    cost 14 % of a ViT-B MAE step (docs/PERFORMANCE.md).
    """
    if fused is not False:
        try:
            return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=True)
        except (RuntimeError, ValueError, TypeError):
            if fused:
                raise
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas))


def build_adamw(named_params, lr: float, weight_decay: float, betas: tuple[float, float],
                fused: bool | None = None) -> torch.optim.AdamW:
    return adamw(param_groups(named_params, weight_decay), lr, betas, fused)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)

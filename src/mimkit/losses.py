"""Pixel-reconstruction targets and losses shared by MAE and RC-MAE."""

from __future__ import annotations

from torch import Tensor


def normalize_patches(patches: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor, Tensor]:
    """``norm_pix_loss`` target: each patch (B, N, P) normalised by its own mean and unbiased variance.

    Returns (normalised, mean, var) with mean/var of shape (B, N, 1), so a prediction in normalised
    space is mapped back to pixels by ``pred * (var + eps) ** 0.5 + mean``.
    """
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True, unbiased=True)
    return (patches - mean) / (var + eps) ** 0.5, mean, var


def masked_mse(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """MAE loss: per-patch MSE averaged over pixels, then over removed patches only.

    pred, target: (B, N, P); mask: (B, N), 1 = removed. Visible patches contribute nothing.
    """
    per_patch = ((pred - target) ** 2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum()

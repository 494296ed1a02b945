"""Batched, device-agnostic augmentation of uint8 image batches (no per-image Python loop).

``random_resized_crop_flip`` reproduces torchvision's ``RandomResizedCrop`` + ``RandomHorizontalFlip``
sampling for a whole batch at once: per-image crop boxes are drawn on the CPU from an optional
``torch.Generator`` (so results are reproducible and identical on any device), turned into affine
sampling grids and applied with one ``F.grid_sample`` call on the images' device.

Note: ``grid_sample`` does not low-pass filter, so strong downscaling (a crop much larger than
``out_size``) aliases where torchvision's antialiased resize would blur. For the small in-memory data
sets (crop sizes close to or below the output size) this does not matter.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mimkit.errors import MimkitError

INTERPOLATIONS = ("bicubic", "bilinear", "nearest")
_MAX_TRIES = 10


def _check_images(images_u8: Tensor) -> None:
    if not isinstance(images_u8, Tensor) or images_u8.dtype != torch.uint8 or images_u8.ndim != 4:
        got = (
            f"{images_u8.dtype} {tuple(images_u8.shape)}" if isinstance(images_u8, Tensor) else type(images_u8).__name__
        )
        raise MimkitError(f"expected a uint8 image batch (B, C, H, W), got {got}")


def _check_size(out_size: int) -> None:
    if isinstance(out_size, bool) or not isinstance(out_size, int) or out_size < 1:
        raise MimkitError(f"image size must be a positive integer, got {out_size!r}")


def _rand(shape: tuple[int, ...], generator: torch.Generator | None) -> Tensor:
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(shape, generator=generator, device=device, dtype=torch.float64).cpu()


def sample_crop_boxes(
    batch: int,
    height: int,
    width: int,
    *,
    scale: Sequence[float] = (0.2, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
) -> Tensor:
    """Sample one RandomResizedCrop box per image, vectorised.

    As in torchvision: up to 10 tries per image of (area fraction ~ U(scale), aspect ~ log-U(ratio)),
    the first try whose rounded box fits is used, at a uniformly random integer position; when none
    fits, a centre crop of the whole image clamped to ``ratio``. Consumes a fixed amount of randomness
    (2 x B x 10 + 2 x B draws) whatever the outcome.

    Returns: int64 ``(B, 4)`` rows ``(top, left, h, w)`` in pixels.
    """
    s0, s1 = float(scale[0]), float(scale[1])
    r0, r1 = float(ratio[0]), float(ratio[1])
    if not (0 < s0 <= s1) or not (0 < r0 <= r1):
        raise MimkitError(
            f"crop scale {tuple(scale)} and ratio {tuple(ratio)} must be positive (low, high) pairs with low <= high"
        )
    area = float(height * width)
    target_area = area * (s0 + (s1 - s0) * _rand((batch, _MAX_TRIES), generator))
    log_r0, log_r1 = math.log(r0), math.log(r1)
    aspect = torch.exp(log_r0 + (log_r1 - log_r0) * _rand((batch, _MAX_TRIES), generator))
    w = torch.sqrt(target_area * aspect).round()
    h = torch.sqrt(target_area / aspect).round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # index of the first fitting try
    any_fit = fits.any(dim=1)

    in_ratio = width / height
    if in_ratio < r0:
        fw, fh = width, int(round(width / r0))
    elif in_ratio > r1:
        fw, fh = int(round(height * r1)), height
    else:
        fw, fh = width, height
    w_sel = torch.where(any_fit, w.gather(1, first).squeeze(1), torch.tensor(float(fw), dtype=w.dtype))
    h_sel = torch.where(any_fit, h.gather(1, first).squeeze(1), torch.tensor(float(fh), dtype=h.dtype))

    u_top, u_left = _rand((batch,), generator), _rand((batch,), generator)
    top = torch.where(any_fit, torch.floor(u_top * (height - h_sel + 1)), torch.floor((height - h_sel) / 2))
    left = torch.where(any_fit, torch.floor(u_left * (width - w_sel + 1)), torch.floor((width - w_sel) / 2))
    return torch.stack([top, left, h_sel, w_sel], dim=1).to(torch.int64)


def crop_flip_thetas(boxes: Tensor, flip: Tensor, height: int, width: int) -> Tensor:
    """Affine matrices for ``F.affine_grid(align_corners=False)`` mapping the output square onto each box.

    Args:
        boxes: ``(B, 4)`` rows ``(top, left, h, w)`` in pixels.
        flip: bool ``(B,)``, True mirrors the crop horizontally.

    Returns: float32 ``(B, 2, 3)``.
    """
    top, left, h, w = boxes.to(torch.float64).unbind(1)
    sx = w / width
    sy = h / height
    cx = (2 * left + w) / width - 1
    cy = (2 * top + h) / height - 1
    sx = torch.where(flip, -sx, sx)
    zeros = torch.zeros_like(sx)
    theta = torch.stack([torch.stack([sx, zeros, cx], 1), torch.stack([zeros, sy, cy], 1)], 1)
    return theta.to(torch.float32)


def random_resized_crop_flip(
    images_u8: Tensor,
    out_size: int,
    *,
    scale: Sequence[float] = (0.2, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    hflip_p: float = 0.5,
    interpolation: str = "bicubic",
    generator: torch.Generator | None = None,
    draw: int | None = None,
    offset: int = 0,
) -> Tensor:
    """Random resized crop + horizontal flip of a whole batch.

    Args:
        images_u8: uint8 ``(B, C, H, W)`` on any device.
        out_size: side of the square output.
        scale, ratio: crop area fraction and aspect-ratio ranges (torchvision semantics).
        hflip_p: probability of mirroring each image.
        interpolation: "bicubic", "bilinear" or "nearest".
        generator: source of all random numbers (drawn on its device, used on the images' device).
        draw, offset: draw the random parameters for ``draw`` images and use rows ``offset .. offset + B``
            (a process's share of a global batch gets the same crops whatever the number of processes).

    Returns: float32 ``(B, C, out_size, out_size)`` in [0, 1] on the images' device.
    """
    _check_images(images_u8)
    _check_size(out_size)
    if interpolation not in INTERPOLATIONS:
        raise MimkitError(f"unknown interpolation {interpolation!r} (accepted: {', '.join(INTERPOLATIONS)})")
    b, c, height, width = images_u8.shape
    n = b if draw is None else draw
    if not 0 <= offset <= n - b:
        raise ValueError(f"rows {offset}..{offset + b} do not fit in the {n} drawn crop parameters")
    boxes = sample_crop_boxes(n, height, width, scale=scale, ratio=ratio, generator=generator)[offset : offset + b]
    flip = (_rand((n,), generator) < hflip_p)[offset : offset + b]
    theta = crop_flip_thetas(boxes, flip, height, width).to(images_u8.device)
    grid = F.affine_grid(theta, [b, c, out_size, out_size], align_corners=False)
    x = images_u8.to(torch.float32).div_(255)
    out = F.grid_sample(x, grid, mode=interpolation, padding_mode="border", align_corners=False)
    return out.clamp_(0, 1) if interpolation == "bicubic" else out


def center_resize(images_u8: Tensor, out_size: int) -> Tensor:
    """Un-augmented view: uint8 ``(B, C, H, W)`` -> float32 ``(B, C, out, out)`` in [0, 1].

    Identity (up to the /255) when ``H == W == out_size``, else a bicubic, antialiased resize of the
    whole image (non-square images are stretched).
    """
    _check_images(images_u8)
    _check_size(out_size)
    x = images_u8.to(torch.float32).div_(255)
    if images_u8.shape[-2:] == (out_size, out_size):
        return x
    out = F.interpolate(x, size=(out_size, out_size), mode="bicubic", align_corners=False, antialias=True)
    return out.clamp_(0, 1)


def normalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """``(x - mean) / std`` per channel of a float ``(B, C, H, W)`` batch (a new tensor)."""
    if len(mean) != x.shape[1] or len(std) != x.shape[1]:
        raise MimkitError(f"mean {tuple(mean)} / std {tuple(std)} need one value per channel ({x.shape[1]})")
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s

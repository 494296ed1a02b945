"""What every in-memory source shares: the containers (:class:`ImageSplit`, :class:`InMemoryData`), source
names, decoding one image, the unreadable-image messages, and channel conversion / statistics.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from mimkit.errors import MimkitError

LogFn = Callable[[str], None]

SOURCE_NAMES = ("demo", "fashion-mnist", "cifar10", "imagefolder", "hf", "webdataset")  # last two: data/hf.py, data/webdataset.py
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
HELD_OUT_SPLIT_NAMES = ("val", "test")  # looked for in this order next to train/

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGENET_GREY_MEAN, IMAGENET_GREY_STD = (0.449,), (0.226,)


def _no_log(_: str) -> None:
    pass


# ----------------------------------------------------------------------------------------------
# Containers


@dataclass
class ImageSplit:
    """One split held in memory.

    Attributes:
        images: uint8 ``(N, C, H, W)``, C = 1 for grey, 3 for RGB, on the CPU.
        labels: int64 ``(N,)`` class indices, or None when unlabelled.
    """

    images: torch.Tensor
    labels: torch.Tensor | None

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels is not None:
            if self.labels.shape != (self.images.shape[0],):
                raise ValueError(f"labels must be ({self.images.shape[0]},), got {tuple(self.labels.shape)}")
            self.labels = self.labels.to(torch.int64)

    def __len__(self) -> int:
        return self.images.shape[0]


@dataclass
class InMemoryData:
    """A whole data set held in memory.

    Attributes:
        train: the training split.
        test: a held-out split, or None.
        classes: class names (index = label), or None when unlabelled.
        mean, std: per-channel statistics in [0, 1] pixel units (length C).
    """

    train: ImageSplit
    test: ImageSplit | None
    classes: list[str] | None
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def in_chans(self) -> int:
        return int(self.train.images.shape[1])

    @property
    def image_hw(self) -> tuple[int, int]:
        return int(self.train.images.shape[2]), int(self.train.images.shape[3])


# ----------------------------------------------------------------------------------------------
# Image decoding


def is_image_file(name: str) -> bool:
    """True for a non-hidden file name with an accepted image extension (case-insensitive)."""
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def decode_image(source: bytes | str | os.PathLike, mode: str, size: int | None = None) -> np.ndarray:
    """Decode one image file (path or bytes) with PIL, converted to ``mode`` ("RGB" or "L"); with ``size``,
    centre-cropped to a square and resized to ``size`` x ``size`` (bicubic, ``PIL.ImageOps.fit``).

    Returns: uint8 ``(H, W, C)``.
    """
    return decode_image_mode(source, mode, size)[0]


def decode_image_mode(source: bytes | str | os.PathLike, mode: str, size: int | None = None) -> tuple[np.ndarray, str]:
    """:func:`decode_image` and the file's own PIL mode (e.g. "L" for a grey JPEG converted to RGB)."""
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
        original = im.mode
        img = im.convert(mode)
        if size is not None:
            img = ImageOps.fit(img, (size, size), Image.Resampling.BICUBIC)
        arr = np.asarray(img)
    return (arr[:, :, None] if arr.ndim == 2 else arr), original


def describe_conversions(converted: dict[str, int], mode: str) -> str:
    """``converted 3 images to RGB (L: 2 grey, P: 1)`` for the log, or "" when none was converted."""
    total = sum(converted.values())
    if not total:
        return ""
    parts = ", ".join(f"{m}: {n}{' grey' if m in GREY_MODES else ''}" for m, n in sorted(converted.items()))
    return f"converted {total} image{'s' if total != 1 else ''} to {mode} ({parts})"


GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")


def describe_failure(error: BaseException) -> str:
    """A short one-line reason for an image that failed to decode."""
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def report_skipped(skipped: list[tuple[str, str]], log: LogFn, *, what: str = "") -> None:
    """Log ``skipped N unreadable images, e.g. NAME: REASON`` when anything was skipped."""
    if skipped:
        name, reason = skipped[0]
        log(f"skipped {len(skipped)} unreadable image{'s' if len(skipped) != 1 else ''}{what}, e.g. {name}: {reason}")


def unreadable_error(name: str, reason: str) -> MimkitError:
    return MimkitError(f"unreadable image {name}: {reason} (data.strict=true stops at unreadable images; "
                       "--set data.strict=false skips them)")


def no_images_error(root: Path) -> MimkitError:
    return MimkitError(f"no images found under {root} (accepted extensions: {', '.join(IMAGE_EXTENSIONS)})")


# ----------------------------------------------------------------------------------------------
# Channels


def channels_mode(channels: int) -> str:
    """PIL mode for a channel count: 1 -> "L", 3 -> "RGB"."""
    if channels not in (1, 3):
        raise MimkitError(f"data.channels must be 1 (grey) or 3 (RGB), got {channels!r}")
    return "L" if channels == 1 else "RGB"


def default_mean_std(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """ImageNet statistics for image folders (their grey average for 1 channel)."""
    return (IMAGENET_GREY_MEAN, IMAGENET_GREY_STD) if channels == 1 else (IMAGENET_MEAN, IMAGENET_STD)


def convert_channels(data: InMemoryData, channels: int) -> InMemoryData:
    """Return ``data`` with ``channels`` channels: grey -> RGB repeats the channel (mean/std repeated);
    RGB -> grey uses PIL's luma weights (299, 587, 114)/1000 and recomputes mean/std on train."""
    channels_mode(channels)
    if data.in_chans == channels:
        return data
    if channels == 3:

        def conv(x: torch.Tensor) -> torch.Tensor:
            return x.expand(-1, 3, -1, -1).contiguous()

        mean, std = data.mean * 3, data.std * 3
    else:
        weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)

        def conv(x: torch.Tensor) -> torch.Tensor:
            chunks = [
                (c.float() * weights).sum(1, keepdim=True).round_().clamp_(0, 255).to(torch.uint8)
                for c in x.split(4096)
            ]
            return torch.cat(chunks)

        mean, std = (0.0,), (1.0,)
    train = ImageSplit(conv(data.train.images), data.train.labels)
    test = None if data.test is None else ImageSplit(conv(data.test.images), data.test.labels)
    if channels == 1:
        mean, std = channel_stats(train.images)
    return replace(data, train=train, test=test, mean=mean, std=std)


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] units of uint8 ``(N, C, H, W)`` images."""
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    total_sq = torch.zeros_like(total)
    for chunk in images.split(4096):
        x = chunk.to(torch.float64).div_(255).transpose(0, 1).reshape(images.shape[1], -1)
        total += x.sum(1)
        total_sq += (x * x).sum(1)
    count = images.numel() / images.shape[1]
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(0).sqrt()
    return tuple(round(float(m), 4) for m in mean), tuple(round(float(s), 4) for s in std)


# ----------------------------------------------------------------------------------------------
# Source names


def canonical_source_name(name: str) -> str:
    """Map a user-given source name to one of SOURCE_NAMES (case, '-' and '_' are ignored)."""

    def squash(s: str) -> str:
        return re.sub(r"[-_\s]", "", s.lower())

    for accepted in SOURCE_NAMES:
        if isinstance(name, str) and squash(name) == squash(accepted):
            return accepted
    raise MimkitError(f"unknown data source {name!r} (accepted: {', '.join(SOURCE_NAMES)})")

"""Batch providers used by the training and evaluation loops.

Two implementations share the :class:`DataModule` interface:

- :class:`InMemoryDataModule` (demo, fashion-mnist, cifar10, and imagefolder with ``in_memory=True``):
  uint8 images live on the CPU; for a non-CPU device the whole uint8 split is copied to that device
  once (first use) when it is at most ``max_device_bytes`` (default 4 GiB), else each batch is
  gathered on the CPU and copied. Augmentation runs batched on the device (``augment.py``).
- :class:`FolderDataModule` (imagefolder): files are decoded by a torch ``DataLoader`` with
  ``num_workers`` processes, torchvision functional transforms (random resized crop + flip for
  training; resize to ``img_size / 0.875`` + centre crop for evaluation), uint8 batches
  normalised on the device.

Reproducibility: the epoch order is ``torch.randperm(num_train, generator=torch.Generator()
.manual_seed(seed * 100003 + epoch))``, split across ranks by striding (``perm[rank::world_size]``,
each rank cut to ``num_train // world_size``), then cut into ``batch_size`` batches (drop_last).
Augmentation randomness comes from generators seeded by a hash of (seed, epoch, rank, batch index)
in memory, or of (seed, epoch, image index) per image in folders, so any batch can be recomputed
without running the ones before it (``start`` skips batches for free), whatever ``num_workers``.

:class:`InMemoryDataModule` lives in :mod:`mimkit.data.memory` and :class:`FolderDataModule` in
:mod:`mimkit.data.folder_module`; this module holds the :class:`DataModule` base class, the seed and
sampling helpers they share, and :func:`build_datamodule`.
"""

from __future__ import annotations

import abc
import hashlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor

from mimkit.data.sources import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    IN_MEMORY_BUDGET_GB,
    ImageSplit,
    LogFn,
    canonical_source_name,
    folder_memory_plan,
    list_image_tree,
    load_in_memory,
)
from mimkit.errors import MimkitError

DEFAULT_FOLDER_IMG_SIZE = 224
SPLITS = ("train", "test")


def _no_log(_: str) -> None:
    pass


def mix_seed(*values: int) -> int:
    """A well-mixed 63-bit seed from integers (stable across runs, platforms and Python versions)."""
    text = ",".join(str(int(v)) for v in values).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def _check_positive(what: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MimkitError(f"{what} must be a positive integer, got {value!r}")


class DataModule(abc.ABC):
    """What the training loop sees of a data set.

    Attributes:
        name: source name (``demo``, ``fashion-mnist``, ``cifar10``, ``imagefolder``).
        in_chans: image channels C (1 or 3).
        img_size: side of the square images produced.
        mean, std: per-channel normalisation in [0, 1] pixel units.
        classes: class names, or None when the training split is unlabelled.
        num_train: training images.
        has_test: a labelled held-out split exists (for kNN / linear-probe evaluation).
    """

    name: str
    in_chans: int
    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: list[str] | None
    num_train: int
    has_test: bool

    def steps_per_epoch(self, batch_size: int, world_size: int = 1) -> int:
        """Micro-batches per epoch per rank (drop_last): ``(num_train // world_size) // batch_size``."""
        _check_positive("batch_size", batch_size)
        _check_positive("world_size", world_size)
        steps = (self.num_train // world_size) // batch_size
        if steps == 0:
            raise MimkitError(
                f"train.batch_size {batch_size} x {world_size} process(es) exceeds the {self.num_train} training "
                f"images of {self.name}; use --set train.batch_size={max(1, self.num_train // world_size)} or less"
            )
        return steps

    def epoch_indices(self, epoch: int, seed: int, rank: int = 0, world_size: int = 1,
                      batch_size: int | None = None) -> Tensor:
        """int64: this rank's training-image indices for ``epoch``, in order.

        The epoch's order is one permutation cut into global batches of ``batch_size * world_size``;
        rank r takes rows ``r * batch_size .. (r + 1) * batch_size`` of each. So the union of the ranks'
        k-th batches is the k-th batch of a single process with the global batch size. With one
        process this is the whole permutation.
        """
        _check_positive("world_size", world_size)
        if not 0 <= rank < world_size:
            raise MimkitError(f"rank {rank!r} must be in [0, world_size={world_size})")
        perm = torch.randperm(self.num_train, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        if world_size == 1:
            return perm
        if batch_size is None:
            raise ValueError("epoch_indices needs batch_size when world_size > 1")
        steps = self.steps_per_epoch(batch_size, world_size)
        return perm[: steps * batch_size * world_size].view(steps, world_size, batch_size)[:, rank].reshape(-1)

    def _batch_range(self, batch_size: int, world_size: int, start: int) -> range:
        steps = self.steps_per_epoch(batch_size, world_size)
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise MimkitError(f"start must be a non-negative integer, got {start!r}")
        return range(start, steps)

    @staticmethod
    def _check_split(split: str) -> str:
        split = "test" if split == "val" else split
        if split not in SPLITS:
            raise MimkitError(f"unknown split {split!r} (accepted: train, test)")
        return split

    @abc.abstractmethod
    def train_batches(
        self,
        epoch: int,
        batch_size: int,
        seed: int,
        device: torch.device | str,
        *,
        rank: int = 0,
        world_size: int = 1,
        start: int = 0,
    ) -> Iterator[Tensor]:
        """Augmented, normalised float32 ``(B, C, img_size, img_size)`` batches on ``device``,
        batches ``start .. steps_per_epoch - 1`` of this rank's share of the epoch."""

    @abc.abstractmethod
    def eval_batches(self, split: str, batch_size: int, device: torch.device | str) -> Iterator[tuple[Tensor, Tensor]]:
        """Un-augmented, normalised float32 ``(B, C, img_size, img_size)`` images and int64 ``(B,)``
        labels on ``device``, in a fixed order (last batch may be smaller).
        MimkitError when the split does not exist or has no labels."""

    @abc.abstractmethod
    def sample_images(self, n: int, split: str = "test") -> Tensor:
        """``n`` un-augmented, normalised images of ``split`` (train when there is no held-out split), chosen by
        :func:`sample_indices` (seeded, one class after another): float32 ``(min(n, len), C, img_size, img_size)``
        on the CPU."""

    def describe(self) -> str:
        """One line for logs, e.g. ``cifar10: 50000 train images, 3x32x32, 10 classes, labelled test split``."""
        classes = f"{len(self.classes)} classes" if self.classes is not None else "unlabelled"
        test = "labelled test split" if self.has_test else "no labelled test split"
        return f"{self.name}: {self.num_train} train images, {self.in_chans}x{self.img_size}x{self.img_size}, {classes}, {test}"


def sample_indices(labels: Sequence[int] | None, length: int, n: int, seed: int = 0) -> list[int]:
    """Indices of ``n`` images for pictures: one per class in turn (classes in order, each class's images in a
    seeded random order), so a split sorted by class still shows every class; unlabelled: a seeded random
    sample. Deterministic: the same images for every checkpoint of a data set."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(length, generator=g).tolist()
    if labels is None:
        return order[:n]
    per_class: dict[int, list[int]] = {}
    for i in order:
        per_class.setdefault(int(labels[i]), []).append(i)
    queues = [per_class[c] for c in sorted(per_class)]
    out: list[int] = []
    while len(out) < min(n, length):
        for q in queues:
            if q and len(out) < n:
                out.append(q.pop(0))
    return out


# ----------------------------------------------------------------------------------------------
# Factory


def _check_stats(mean: tuple[float, ...], std: tuple[float, ...], channels: int) -> None:
    if len(mean) != channels or len(std) != channels or any(s <= 0 for s in std):
        raise MimkitError(f"mean {mean} and std {std} need {channels} value(s) each, std > 0")


def _resolve_device(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def build_datamodule(
    name: str,
    path: str | os.PathLike | None,
    img_size: int | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    strict: bool = False,
    in_memory: bool | str = "auto",
    num_workers: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    channels: int | None = None,
    log: LogFn | None = None,
    crop_scale: Sequence[float] = (0.2, 1.0),
    hflip_p: float = 0.5,
    max_train: int | None = None,
    max_test: int | None = None,
    subset_seed: int = 0,
    image_key: str | None = None,
    label_key: str | None = None,
    in_memory_budget_gb: float = IN_MEMORY_BUDGET_GB,
    decode_size: int | None = None,
) -> DataModule:
    """Build the batch provider for a data source.

    Args:
        name: ``demo``, ``fashion-mnist``, ``cifar10`` or ``imagefolder``.
        path: data location (ignored for ``demo``).
        img_size: output side; None = the native size for in-memory sets (the shorter side when
            not square), 224 for folder-backed ones.
        cache_dir: cache of decoded image trees (default ``$MIMKIT_CACHE`` or ``~/.cache/mimkit``).
        strict: unreadable images raise MimkitError instead of being skipped.
        in_memory: "auto" (in memory for demo / fashion-mnist / cifar10; an imagefolder in memory when its
            decoded size fits ``in_memory_budget_gb`` and all images share one size, or ``decode_size`` is
            given: :func:`~mimkit.data.sources.folder_memory_plan`; else folder-backed), True (imagefolder decoded
            into memory: all images must share one size, or ``decode_size``) or False (folder-backed:
            imagefolder, or a cifar10 image-tree folder).
        num_workers: DataLoader processes of folder-backed sets (default ``min(8, cpu_count)``).
        mean, std: override the per-channel normalisation.
        channels: 1 or 3; folders decode to this (default 3); in-memory sets are converted.
        log: optional callable receiving one-line info messages.
        crop_scale, hflip_p: training augmentation (area range of the random crop, flip probability).
        max_train, max_test: keep a fixed random subset (``subset_seed``) of at most this many images.
        image_key, label_key: columns (``hf``) or tar members (``webdataset``) of the image and the label.
        in_memory_budget_gb: decoded size up to which ``in_memory="auto"`` holds an image folder in memory.
        decode_size: resize image-folder images to this square side while decoding them into memory.
    """
    log = log if log is not None else _no_log
    source = canonical_source_name(name)
    if source in ("hf", "webdataset"):  # streamed / Arrow-backed sources live in their own modules
        if source == "hf":
            from mimkit.data.hf import build_hf_datamodule as build
        else:
            from mimkit.data.webdataset import build_webdataset_datamodule as build
        dm = build(
            path, img_size or DEFAULT_FOLDER_IMG_SIZE, cache_dir=cache_dir, strict=strict, in_memory=in_memory,
            num_workers=num_workers, mean=mean, std=std, channels=channels or 3, log=log, crop_scale=crop_scale,
            hflip_p=hflip_p, max_train=max_train, max_test=max_test, subset_seed=subset_seed,
            image_key=image_key, label_key=label_key,
        )  # fmt: skip
        log(f"data {dm.describe()}")
        return dm
    if in_memory not in ("auto", True, False):
        raise MimkitError(f"data.in_memory must be auto, true or false, got {in_memory!r}")
    if img_size is not None:
        _check_positive("img_size", img_size)
    folder = source == "imagefolder" and in_memory is not True
    if in_memory is False and source != "imagefolder":
        if source == "cifar10" and path is not None and (Path(path).expanduser() / "train").is_dir():
            folder = True
        else:
            raise MimkitError(
                f"data source {source!r} is held in memory only (--set data.in_memory=false is accepted for "
                f"data.name=imagefolder and for a cifar10 image-tree folder)"
            )
    if source == "imagefolder" and in_memory == "auto" and path is not None and str(path).strip():
        fits, why = folder_memory_plan(list_image_tree(path), channels or 3, in_memory_budget_gb, decode_size,
                                       cache_dir)
        log(f"data.in_memory=auto: {why}")
        folder = not fits
    if folder:
        # folder_module.py imports this module, so it is imported here rather than at the top
        from mimkit.data.folder_module import FolderDataModule, _subset_files

        if path is None or str(path).strip() == "":
            raise MimkitError(f"data source {source!r} needs a path (got {path!r})")
        ch = channels or 3
        if source == "cifar10" and ch == 3:
            mean, std = mean or CIFAR10_MEAN, std or CIFAR10_STD
        listing = list_image_tree(path)
        listing.train = _subset_files(listing.train, max_train, subset_seed)
        if listing.test is not None:
            listing.test = _subset_files(listing.test, max_test, subset_seed)
        dm: DataModule = FolderDataModule(
            listing, img_size or DEFAULT_FOLDER_IMG_SIZE, name=source, channels=ch, mean=mean, std=std,
            strict=strict, num_workers=num_workers, crop_scale=crop_scale, hflip_p=hflip_p, log=log,
        )  # fmt: skip
    else:
        # memory.py imports this module, so it is imported here rather than at the top
        from mimkit.data.memory import InMemoryDataModule

        data = load_in_memory(source, path, cache_dir=cache_dir, strict=strict, log=log, channels=channels,
                              size=decode_size if source == "imagefolder" else None)
        data.train = _subset_split(data.train, max_train, subset_seed)
        if data.test is not None:
            data.test = _subset_split(data.test, max_test, subset_seed)
        dm = InMemoryDataModule(
            data,
            img_size or min(data.image_hw),
            name=source,
            mean=mean,
            std=std,
            crop_scale=crop_scale,
            hflip_p=hflip_p,
        )
    log(f"data {dm.describe()}")
    return dm


def _subset_order(n: int, limit: int | None, seed: int) -> Tensor | None:
    """Sorted indices of a fixed random subset of size ``limit`` (None when no cut is needed)."""
    if limit is None or limit >= n:
        return None
    _check_positive("data.max_train / data.max_test", limit)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit].sort().values


def _subset_split(split: ImageSplit, limit: int | None, seed: int) -> ImageSplit:
    idx = _subset_order(len(split), limit, seed)
    if idx is None:
        return split
    return ImageSplit(split.images[idx].clone(), None if split.labels is None else split.labels[idx].clone())

__all__ = [
    "DataModule",
    "build_datamodule",
    "mix_seed",
    "sample_indices",
]

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
"""

from __future__ import annotations

import abc
import hashlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import InterpolationMode

from mimkit.data.augment import center_resize, normalize, random_resized_crop_flip, sample_crop_boxes
from mimkit.data.sources import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    FileList,
    ImageSplit,
    ImageTreeListing,
    InMemoryData,
    LogFn,
    canonical_source_name,
    channels_mode,
    IN_MEMORY_BUDGET_GB,
    default_mean_std,
    describe_conversions,
    describe_failure,
    folder_memory_plan,
    list_image_tree,
    load_in_memory,
    report_skipped,
    unreadable_error,
)
from mimkit.errors import MimkitError

EVAL_CROP_FRACTION = 0.875
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


# ----------------------------------------------------------------------------------------------
# In memory


class InMemoryDataModule(DataModule):
    """Batches from an :class:`InMemoryData` (uint8 tensors), augmented on the target device."""

    def __init__(
        self,
        data: InMemoryData,
        img_size: int,
        *,
        name: str,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        crop_scale: Sequence[float] = (0.2, 1.0),
        hflip_p: float = 0.5,
        max_device_bytes: int = 4 * 2**30,
    ) -> None:
        _check_positive("img_size", img_size)
        self.data = data
        self.name = name
        self.in_chans = data.in_chans
        self.img_size = img_size
        self.mean = tuple(float(m) for m in (data.mean if mean is None else mean))
        self.std = tuple(float(s) for s in (data.std if std is None else std))
        _check_stats(self.mean, self.std, self.in_chans)
        self.classes = data.classes if data.train.labels is not None else None
        self.num_train = len(data.train)
        self.has_test = data.test is not None and data.test.labels is not None and self.classes is not None
        self.crop_scale = tuple(crop_scale)
        self.hflip_p = hflip_p
        self.max_device_bytes = max_device_bytes
        self._device_copies: dict[tuple[str, str], Tensor] = {}

    def _split(self, split: str) -> ImageSplit:
        split = self._check_split(split)
        s = self.data.train if split == "train" else self.data.test
        if s is None:
            raise MimkitError(f"{self.name} has no {split} split")
        return s

    def _images_for(self, split: str, device: torch.device) -> Tensor:
        """uint8 images of ``split``: a one-time copy on ``device`` when it fits, else the CPU tensor."""
        images = self._split(split).images
        if device.type == "cpu" or images.numel() > self.max_device_bytes:
            return images
        key = (split, str(device))
        if key not in self._device_copies:
            self._device_copies[key] = images.to(device)
        return self._device_copies[key]

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
        """See :meth:`DataModule.train_batches`."""
        device = _resolve_device(device)
        batches = self._batch_range(batch_size, world_size, start)
        order = self.epoch_indices(epoch, seed, rank, world_size, batch_size)
        images = self._images_for("train", device)
        if images.device != order.device:
            order = order.to(images.device)
        for b in batches:
            batch = images[order[b * batch_size : (b + 1) * batch_size]].to(device, non_blocking=True)
            # crop parameters of the whole global batch b, this rank's rows: independent of world_size
            g = torch.Generator().manual_seed(mix_seed(seed, epoch, b))
            x = random_resized_crop_flip(batch, self.img_size, scale=self.crop_scale, hflip_p=self.hflip_p, generator=g,
                                         draw=batch_size * world_size, offset=rank * batch_size)
            yield normalize(x, self.mean, self.std)

    def eval_batches(self, split: str, batch_size: int, device: torch.device | str) -> Iterator[tuple[Tensor, Tensor]]:
        """See :meth:`DataModule.eval_batches`."""
        _check_positive("batch_size", batch_size)
        device = _resolve_device(device)
        s = self._split(split)
        if s.labels is None or self.classes is None:
            raise MimkitError(f"the {self._check_split(split)} split of {self.name} has no labels")
        images = self._images_for(self._check_split(split), device)
        labels = s.labels.to(device)
        for i in range(0, len(s), batch_size):
            x = center_resize(images[i : i + batch_size].to(device, non_blocking=True), self.img_size)
            yield normalize(x, self.mean, self.std), labels[i : i + batch_size]

    def sample_images(self, n: int, split: str = "test") -> Tensor:
        """See :meth:`DataModule.sample_images`."""
        split = self._check_split(split)
        s = self.data.test if split == "test" and self.data.test is not None else self.data.train
        idx = torch.tensor(sample_indices(None if s.labels is None else s.labels.tolist(), len(s), n), dtype=torch.long)
        return normalize(center_resize(s.images[idx], self.img_size), self.mean, self.std)


# ----------------------------------------------------------------------------------------------
# Folder-backed


class _FolderDataset(Dataset):
    """Decodes one file per item. Items are ``(index, epoch_key | None)``; a key means training
    augmentation with a per-image generator seeded by ``mix_seed(epoch_key, index)``.

    Returns ``(uint8 (C, S, S) or None, label, path, failure reason, original mode when converted else "")``
    (never raises for bad files).
    """

    def __init__(self, files: FileList, mode: str, img_size: int, crop_scale: Sequence[float], hflip_p: float) -> None:
        self.files = files.files
        self.labels = files.labels
        self.mode = mode
        self.img_size = img_size
        self.crop_scale = tuple(crop_scale)
        self.hflip_p = hflip_p

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item: tuple[int, int | None]) -> tuple[Tensor | None, int, str, str, str]:
        index, epoch_key = item
        path = self.files[index]
        label = -1 if self.labels is None else self.labels[index]
        try:
            with self.open_image(index) as im:
                original = im.mode
                img = im.convert(self.mode)
        except Exception as e:  # PIL raises many types for bad files
            return None, label, path, describe_failure(e), ""
        g = None if epoch_key is None else torch.Generator().manual_seed(mix_seed(epoch_key, index))
        converted = original if original != self.mode else ""
        return transform_image(img, self.img_size, g, self.crop_scale, self.hflip_p), label, path, "", converted

    def open_image(self, index: int) -> Image.Image:
        """The PIL image of item ``index`` (subclasses read other stores than files, e.g. ``data/hf.py``)."""
        return Image.open(self.files[index])


def transform_image(img: Image.Image, size: int, generator: torch.Generator | None, crop_scale: Sequence[float],
                    hflip_p: float) -> Tensor:
    """uint8 ``(C, size, size)`` of a decoded PIL image: evaluation (``generator`` None: resize to
    ``size / 0.875`` + centre crop) or training (random resized crop + flip drawn from ``generator``)."""
    s = size
    if generator is None:
        img = TF.center_crop(TF.resize(img, int(s / EVAL_CROP_FRACTION), InterpolationMode.BICUBIC), [s, s])
    else:
        top, left, h, w = sample_crop_boxes(1, img.height, img.width, scale=crop_scale, generator=generator)[
            0
        ].tolist()
        img = TF.resized_crop(img, top, left, h, w, [s, s], InterpolationMode.BICUBIC)
        if torch.rand(1, generator=generator).item() < hflip_p:
            img = TF.hflip(img)
    return TF.pil_to_tensor(img)


def _collate(samples: list[tuple]) -> tuple:
    """Stack the readable samples: (uint8 (b, C, S, S) or None, int64 (b,), [(path, reason) of failures],
    {path: original PIL mode} of the images converted to the dataset's mode)."""
    good = [s for s in samples if s[0] is not None]
    failures = [(s[2], s[3]) for s in samples if s[0] is None]
    images = torch.stack([s[0] for s in good]) if good else None  # type: ignore[misc]
    converted = {s[2]: s[4] for s in good if len(s) > 4 and s[4]}
    return images, torch.tensor([s[1] for s in good], dtype=torch.int64), failures, converted


class _ItemSampler(Sampler):
    """Yields a fixed list of dataset items."""

    def __init__(self, items: list[tuple[int, int | None]]) -> None:
        self.items = items

    def __iter__(self) -> Iterator[tuple[int, int | None]]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


class FolderDataModule(DataModule):
    """Batches decoded from an image-folder tree by a torch DataLoader (any image sizes)."""

    dataset_class: type[_FolderDataset] = _FolderDataset  # what decodes one item (data/hf.py reads Arrow rows)

    def __init__(
        self,
        listing: ImageTreeListing,
        img_size: int,
        *,
        name: str = "imagefolder",
        channels: int = 3,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        strict: bool = False,
        num_workers: int | None = None,
        crop_scale: Sequence[float] = (0.2, 1.0),
        hflip_p: float = 0.5,
        log: LogFn | None = None,
    ) -> None:
        _check_positive("img_size", img_size)
        mode = channels_mode(channels)
        if num_workers is None:
            num_workers = min(8, os.cpu_count() or 1)
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise MimkitError(f"data.num_workers must be a non-negative integer, got {num_workers!r}")
        default_mean, default_std = default_mean_std(channels)
        self.listing = listing
        self.name = name
        self.in_chans = channels
        self.img_size = img_size
        self.mean = tuple(float(m) for m in (default_mean if mean is None else mean))
        self.std = tuple(float(s) for s in (default_std if std is None else std))
        _check_stats(self.mean, self.std, channels)
        self.classes = listing.classes
        self.num_train = len(listing.train)
        self.has_test = listing.test is not None and listing.test.labels is not None and self.classes is not None
        self.strict = strict
        self.num_workers = num_workers
        self.log = log if log is not None else _no_log
        self._datasets = {
            split: self.dataset_class(files, mode, img_size, crop_scale, hflip_p)
            for split, files in (("train", listing.train), ("test", listing.test))
            if files is not None
        }
        self._reported: set[str] = set()
        self._converted: dict[str, str] = {}  # path -> its own PIL mode, for files converted to self.in_chans
        if strict:
            self.validate()

    def describe(self) -> str:
        lazy = "" if self.strict else " (files read from disk every epoch; unreadable ones skipped when met)"
        return super().describe() + lazy

    def validate(self) -> None:
        """``data.strict=true``: decode every image of every split once, before training, and stop at the first
        unreadable one (one pass, in the DataLoader workers)."""
        for split, ds in self._datasets.items():
            items = [(i, None) for i in range(len(ds))]
            loader = self._loader(ds, items, 64, drop_last=False, device=torch.device("cpu"), seed=0)
            for batch in loader:
                failures = batch[2]
                if failures:
                    raise unreadable_error(*failures[0])
        self.log(f"data.strict=true: every image of {self.listing.root} was decoded once and is readable")

    def _dataset(self, split: str) -> _FolderDataset:
        split = self._check_split(split)
        if split not in self._datasets:
            raise MimkitError(f"{self.listing.root} has no test split (expected a val/ or test/ folder next to train/)")
        return self._datasets[split]

    def _loader(
        self, ds: _FolderDataset, items: list, batch_size: int, *, drop_last: bool, device: torch.device, seed: int
    ) -> DataLoader:
        return DataLoader(
            ds,
            batch_size=batch_size,
            sampler=_ItemSampler(items),
            num_workers=self.num_workers,
            collate_fn=_collate,
            drop_last=drop_last,
            pin_memory=device.type == "cuda",
            generator=torch.Generator().manual_seed(seed),  # worker base seeds (augmentation does not use them)
            persistent_workers=False,
        )

    def _batches(self, loader: DataLoader, device: torch.device, what: str) -> Iterator[tuple[Tensor, Tensor]]:
        """Move readable images to ``device`` as normalised floats; handle unreadable files (each reported once,
        when first met: files are read lazily unless ``data.strict=true``) and count converted ones."""
        new: list[tuple[str, str]] = []
        converted_before = len(self._converted)
        for batch in loader:
            images, labels, failures = batch[:3]
            if len(batch) > 3:
                self._converted.update(batch[3])
            for path, reason in failures:
                if self.strict:
                    raise unreadable_error(path, reason)
                if path not in self._reported:
                    self._reported.add(path)
                    new.append((path, reason))
            if images is None:
                continue
            x = images.to(device, non_blocking=True).to(torch.float32).div_(255)
            yield normalize(x, self.mean, self.std), labels.to(device, non_blocking=True)
        if new:
            report_skipped(new, self.log, what=f" in {what} ({len(self._reported)} so far, each counted once; "
                                                f"--set data.strict=true checks every image before training)")
        if len(self._converted) > converted_before:
            counts: dict[str, int] = {}
            for m in self._converted.values():
                counts[m] = counts.get(m, 0) + 1
            mode = "RGB" if self.in_chans == 3 else "grey (L)"
            self.log(f"{describe_conversions(counts, mode)} so far (met in {what})")

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
        """See :meth:`DataModule.train_batches`."""
        device = _resolve_device(device)
        batches = self._batch_range(batch_size, world_size, start)
        order = self.epoch_indices(epoch, seed, rank, world_size, batch_size)[
            batches.start * batch_size : batches.stop * batch_size
        ]
        epoch_key = mix_seed(seed, epoch)
        items = [(i, epoch_key) for i in order.tolist()]
        loader = self._loader(self._dataset("train"), items, batch_size, drop_last=True, device=device, seed=epoch_key)
        for x, _ in self._batches(loader, device, f"epoch {epoch}"):
            yield x

    def eval_batches(self, split: str, batch_size: int, device: torch.device | str) -> Iterator[tuple[Tensor, Tensor]]:
        """See :meth:`DataModule.eval_batches`."""
        _check_positive("batch_size", batch_size)
        device = _resolve_device(device)
        ds = self._dataset(split)
        if ds.labels is None or self.classes is None:
            raise MimkitError(
                f"the {self._check_split(split)} split of {self.listing.root} has no labels (images are not in class folders)"
            )
        items = [(i, None) for i in range(len(ds))]
        loader = self._loader(ds, items, batch_size, drop_last=False, device=device, seed=0)
        yield from self._batches(loader, device, f"the {self._check_split(split)} split")

    def sample_images(self, n: int, split: str = "test") -> Tensor:
        """See :meth:`DataModule.sample_images`."""
        split = self._check_split(split)
        ds = self._datasets["test"] if split == "test" and "test" in self._datasets else self._datasets["train"]
        out: list[Tensor] = []
        for i in sample_indices(ds.labels, len(ds), len(ds)):  # in sample order; unreadable ones are passed over
            if len(out) >= n:
                break
            image, _, path, reason = ds[(i, None)][:4]
            if image is None:
                if self.strict:
                    raise unreadable_error(path, reason)
                continue
            out.append(image)
        if not out:
            return torch.empty(0, self.in_chans, self.img_size, self.img_size)
        return normalize(torch.stack(out).to(torch.float32).div_(255), self.mean, self.std)


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


def _subset_files(files: FileList, limit: int | None, seed: int) -> FileList:
    idx = _subset_order(len(files), limit, seed)
    if idx is None:
        return files
    keep = idx.tolist()
    return FileList([files.files[i] for i in keep], None if files.labels is None else [files.labels[i] for i in keep])


__all__ = [
    "DataModule",
    "FolderDataModule",
    "InMemoryDataModule",
    "build_datamodule",
    "mix_seed",
]

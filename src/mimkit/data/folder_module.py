"""The folder-backed batch provider, :class:`FolderDataModule`: image files decoded by a torch ``DataLoader``
(one file per item, augmented per image with torchvision functional transforms), uint8 batches normalised
on the device; also the per-image transform and the fixed file subset. The interface and the
reproducibility rules are :class:`mimkit.data.module.DataModule`'s.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import InterpolationMode

from mimkit.data.augment import normalize, sample_crop_boxes
from mimkit.data.module import (
    DataModule,
    _check_positive,
    _check_stats,
    _no_log,
    _resolve_device,
    _subset_order,
    mix_seed,
    sample_indices,
)
from mimkit.data.sources import (
    FileList,
    ImageTreeListing,
    LogFn,
    channels_mode,
    default_mean_std,
    describe_conversions,
    describe_failure,
    report_skipped,
    unreadable_error,
)
from mimkit.errors import MimkitError

EVAL_CROP_FRACTION = 0.875


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


def _subset_files(files: FileList, limit: int | None, seed: int) -> FileList:
    idx = _subset_order(len(files), limit, seed)
    if idx is None:
        return files
    keep = idx.tolist()
    return FileList([files.files[i] for i in keep], None if files.labels is None else [files.labels[i] for i in keep])


__all__ = ["FolderDataModule", "transform_image"]

"""Labelled, augmented training batches for the supervised downstream commands (linear probe, fine-tuning).

The pre-training batches carry no labels, so the downstream commands build their own pipeline from timm's
transforms, for in-memory data sets and image folders alike:

    per image (PIL):   timm ``create_transform``: RandomResizedCrop + flip [+ RandAugment] -> uint8 tensor
    per batch (torch): /255, normalise with the data set's mean/std [-> timm RandomErasing]

Reproducibility: the epoch's order is :meth:`DataModule.epoch_indices` (``randperm`` seeded by seed and
epoch); each image's transform runs with Python's, NumPy's and torch's RNGs seeded by
``mix_seed(seed, epoch, index)`` and restored afterwards, so a batch does not depend on the number of loader
workers or on what ran before it, and the caller's RNG streams are untouched. Random erasing (batched, in the
calling process) draws from the global RNGs, which the training loop re-seeds at every epoch start.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps
from timm.data import create_transform
from timm.data.auto_augment import RandAugment
from timm.data.random_erasing import RandomErasing
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from mimkit.data.augment import normalize
from mimkit.data.module import mix_seed
from mimkit.errors import MimkitError


@contextlib.contextmanager
def seeded(seed: int):
    """Run a block with Python's, NumPy's and torch's (CPU) RNGs seeded by ``seed``; restore them afterwards."""
    py, np_state, th = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(np_state)
        torch.set_rng_state(th)


def _posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize, valid for 0 bits too (Pillow >= 11 refuses 0; older Pillow gave a black image)."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size, 0)
    return ImageOps.posterize(img, bits_to_keep)


def train_transform(img_size: int, mean: Sequence[float], *, crop_scale: Sequence[float] = (0.08, 1.0),
                    hflip: float = 0.5, rand_augment: str | None = None, interpolation: str = "bicubic"):
    """timm's training transform (PIL image -> uint8 ``(C, S, S)`` tensor), no normalisation / erasing.

    ``rand_augment`` is a timm RandAugment string, e.g. ``rand-m9-mstd0.5-inc1`` (MAE fine-tuning: RandAug(9, 0.5)).
    """
    try:
        tf = create_transform(
            img_size, is_training=True, scale=tuple(crop_scale), hflip=hflip, color_jitter=None,
            auto_augment=rand_augment or None, interpolation=interpolation, mean=tuple(mean), normalize=False,
        )
    except (AssertionError, ValueError, KeyError) as e:
        raise MimkitError(f"aug.rand_augment {rand_augment!r} is not a timm RandAugment string "
                          f"(e.g. rand-m9-mstd0.5-inc1): {e}") from None
    for t in tf.transforms:
        if isinstance(t, RandAugment):
            for op in t.ops:
                if op.name.startswith("Posterize"):
                    op.aug_fn = _posterize
    return tf


@dataclass
class LabelledSource:
    """The labelled training split: in-memory uint8 images, or files decoded on demand."""

    labels: Tensor                       # int64 (N,)
    images: Tensor | None = None         # uint8 (N, C, H, W), in memory
    files: list[str] | None = None       # or image files (names, for messages, when ``opener`` reads them)
    mode: str = "RGB"                    # PIL mode for files
    opener: Callable[[int], Image.Image] | None = None  # reads item i (e.g. an Arrow row of data.name=hf)

    def __len__(self) -> int:
        return len(self.labels)

    def pil(self, index: int) -> Image.Image:
        if self.images is not None:
            x = self.images[index]
            arr = x[0].numpy() if x.shape[0] == 1 else x.permute(1, 2, 0).numpy()
            return Image.fromarray(arr)
        with (self.opener(index) if self.opener is not None else Image.open(self.files[index])) as im:
            return im.convert(self.mode)


def labelled_train_source(data) -> LabelledSource:
    """The labelled training split of an in-memory or folder-backed DataModule."""
    if data.classes is None:
        raise MimkitError(f"the training split of {data.name} has no labels; this command needs class labels")
    if hasattr(data, "data"):  # InMemoryDataModule
        split = data.data.train
        return LabelledSource(labels=split.labels, images=split.images)
    if hasattr(data, "listing"):  # FolderDataModule
        files = data.listing.train
        return LabelledSource(labels=torch.as_tensor(files.labels, dtype=torch.int64), files=list(files.files),
                              mode="L" if data.in_chans == 1 else "RGB", opener=data._datasets["train"].open_image)
    if data.name == "webdataset":
        raise MimkitError("data.name=webdataset is streamed; the linear probe and fine-tuning read images by index: "
                          "give them the same images as an image folder or a datasets folder (data.name=hf)")
    raise MimkitError(f"data module {type(data).__name__} does not expose its training images")


class _Augmented(Dataset):
    def __init__(self, source: LabelledSource, transform) -> None:
        self.source, self.transform = source, transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, item: tuple[int, int]):
        index, key = item
        try:
            img = self.source.pil(index)
        except Exception as e:  # an unreadable file: dropped from its batch
            return None, int(self.source.labels[index]), f"{self.source.files[index]}: {e}"
        with seeded(mix_seed(key, index)):
            x = self.transform(img)
        return x, int(self.source.labels[index]), ""


def _collate(samples):
    good = [s for s in samples if s[0] is not None]
    if not good:
        return None, None, [s[2] for s in samples]
    return torch.stack([s[0] for s in good]), torch.tensor([s[1] for s in good]), [s[2] for s in samples if s[2]]


class LabelledBatches:
    """Augmented, normalised, labelled training batches (drop_last), reproducible per (seed, epoch)."""

    def __init__(self, data, transform, *, num_workers: int = 0, reprob: float = 0.0, remode: str = "pixel",
                 log: Callable[[str], None] | None = None) -> None:
        self.data = data
        self.log = log
        self._reported: set[str] = set()
        self.source = labelled_train_source(data)
        self.dataset = _Augmented(self.source, transform)
        self.num_workers = num_workers
        self.mean, self.std = data.mean, data.std
        self.reprob, self.remode = reprob, remode

    def steps_per_epoch(self, batch_size: int) -> int:
        return self.data.steps_per_epoch(batch_size)

    def epoch(self, epoch: int, batch_size: int, seed: int, device, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """``(images float32 (B, C, S, S) normalised, labels int64 (B,))`` on ``device``, from batch ``start`` of the
        epoch (a resumed step checkpoint: batches are functions of (seed, epoch, index), so the rest is the same)."""
        for _, images, labels in self.chunks(epoch, batch_size, seed, device, start=start):
            yield images, labels

    def chunks(self, epoch: int, batch_size: int, seed: int, device, chunk: int | None = None, start: int = 0
               ) -> Iterator[tuple[int, Tensor, Tensor]]:
        """``(batch index, images, labels)`` with each batch delivered in pieces of at most ``chunk`` images (a
        big linear-probe batch whose features are computed piece by piece); the images do not depend on ``chunk``."""
        steps = self.steps_per_epoch(batch_size)
        order = self.data.epoch_indices(epoch, seed).tolist()
        key = mix_seed(seed, epoch)
        chunk = min(chunk or batch_size, batch_size)
        pieces, owner = [], []
        for b in range(start, steps):
            items = [(i, key) for i in order[b * batch_size:(b + 1) * batch_size]]
            for j in range(0, len(items), chunk):
                pieces.append(items[j:j + chunk])
                owner.append(b)
        loader = DataLoader(self.dataset, batch_sampler=pieces, num_workers=self.num_workers, collate_fn=_collate,
                            generator=torch.Generator().manual_seed(key))
        for b, (images, labels, failures) in zip(owner, loader):
            if failures and getattr(self.data, "strict", False):
                raise MimkitError(f"unreadable training image {failures[0]}")
            for failure in failures:  # skipped (data.strict=false), reported once each
                if failure not in self._reported and self.log is not None:
                    self.log(f"skipping unreadable training image {failure}")
                self._reported.add(failure)
            if images is None:
                continue
            x = normalize(images.to(device, non_blocking=True).float().div_(255), self.mean, self.std)
            if self.reprob > 0:  # timm's RandomErasing, per image of the batch, noise drawn on x's device
                x = RandomErasing(self.reprob, mode=self.remode, device=str(x.device))(x)
            yield b, x, labels.to(device, non_blocking=True)


"""The in-memory batch provider, :class:`InMemoryDataModule`: uint8 images held on the CPU (copied once to the
device when they fit), augmented batched on the device. The interface and the reproducibility rules are
:class:`mimkit.data.module.DataModule`'s.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from mimkit.data.augment import center_resize, normalize, random_resized_crop_flip
from mimkit.data.module import (
    DataModule,
    _check_positive,
    _check_stats,
    _resolve_device,
    mix_seed,
    sample_indices,
)
from mimkit.data.sources import ImageSplit, InMemoryData
from mimkit.errors import MimkitError


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


__all__ = ["InMemoryDataModule"]

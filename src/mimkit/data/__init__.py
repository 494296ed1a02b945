"""Data sources, batched augmentation and the batch providers used by training and evaluation.

Entry points:

- :func:`build_datamodule` -> :class:`DataModule` (``train_batches`` / ``eval_batches`` / ``sample_images``).
- :func:`load_in_memory` -> :class:`InMemoryData` (uint8 ``(N, C, H, W)`` tensors + labels).
- :func:`random_resized_crop_flip`, :func:`center_resize`, :func:`normalize`: batched image ops.

Sources: ``demo`` (embedded Fashion-MNIST subset, no path), ``fashion-mnist`` (folder of IDX files),
``cifar10`` (python batches, image tree, or a tar of either) and ``imagefolder`` (class folders).
"""

from mimkit.data.augment import center_resize, normalize, random_resized_crop_flip, sample_crop_boxes
from mimkit.data.folder_module import FolderDataModule
from mimkit.data.idx import read_idx, write_idx
from mimkit.data.memory import InMemoryDataModule
from mimkit.data.module import DataModule, build_datamodule
from mimkit.data.sources import (
    IMAGE_EXTENSIONS,
    SOURCE_NAMES,
    ImageSplit,
    InMemoryData,
    default_cache_dir,
    list_image_tree,
    load_in_memory,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "SOURCE_NAMES",
    "DataModule",
    "FolderDataModule",
    "ImageSplit",
    "InMemoryData",
    "InMemoryDataModule",
    "build_datamodule",
    "center_resize",
    "default_cache_dir",
    "list_image_tree",
    "load_in_memory",
    "normalize",
    "random_resized_crop_flip",
    "read_idx",
    "sample_crop_boxes",
    "write_idx",
]

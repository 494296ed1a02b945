"""In-memory data sources: the embedded demo set, Fashion-MNIST, CIFAR-10 and small image-folder trees.

Every source yields an :class:`InMemoryData`: uint8 image tensors ``(N, C, H, W)`` (C = 1 grey, 3 RGB)
and int64 labels ``(N,)`` held on the CPU, plus class names and per-channel mean/std in [0, 1] pixel
units. Decoding many JPEG/PNG files is slow, so image trees (folders or tar archives) are decoded once
and cached as an uncompressed ``.npz`` in a cache folder (``cache_dir``, else ``$MIMKIT_CACHE``, else
``~/.cache/mimkit``), keyed by a hash of the source's absolute path, size and modification time.

One module per kind: ``common`` (containers, source names, decoding one image, unreadable-image messages,
channel helpers), ``decode`` (decoding many images into arrays), ``cache`` (the decode cache),
``fashion_mnist`` (the embedded demo set and IDX files), ``folder`` (image-folder trees, ``imagefolder`` and
its memory plan) and ``cifar`` (python batches, image trees, tar archives). This package holds the dispatch,
:func:`load_in_memory`, and re-exports the public names of every module.
"""

from __future__ import annotations

import os

from mimkit.data.sources.cache import default_cache_dir
from mimkit.data.sources.cifar import (
    CIFAR10_CLASSES,
    CIFAR10_MEAN,
    CIFAR10_STD,
    load_cifar10,
)
from mimkit.data.sources.common import (
    GREY_MODES,
    HELD_OUT_SPLIT_NAMES,
    IMAGE_EXTENSIONS,
    IMAGENET_GREY_MEAN,
    IMAGENET_GREY_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SOURCE_NAMES,
    ImageSplit,
    InMemoryData,
    LogFn,
    _no_log,
    canonical_source_name,
    channel_stats,
    channels_mode,
    convert_channels,
    decode_image,
    decode_image_mode,
    default_mean_std,
    describe_conversions,
    describe_failure,
    is_image_file,
    no_images_error,
    report_skipped,
    unreadable_error,
)
from mimkit.data.sources.decode import stack_same_size
from mimkit.data.sources.fashion_mnist import (
    DEMO_FILE,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_FILES,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    find_fashion_mnist_files,
    load_demo,
    load_fashion_mnist,
)
from mimkit.data.sources.folder import (
    IN_MEMORY_BUDGET_GB,
    RESIZE_HINT,
    FileList,
    ImageTreeListing,
    folder_memory_plan,
    list_image_tree,
    load_imagefolder,
)
from mimkit.errors import MimkitError


def load_in_memory(
    name: str,
    path: str | os.PathLike | None,
    *,
    cache_dir: str | os.PathLike | None = None,
    strict: bool = False,
    log: LogFn | None = None,
    channels: int | None = None,
    size: int | None = None,
) -> InMemoryData:
    """Load a data set into memory.

    Args:
        name: one of ``demo, fashion-mnist, cifar10, imagefolder``.
        path: where the data lies (ignored for ``demo``).
        cache_dir: where decoded image trees are cached (default ``$MIMKIT_CACHE`` or ``~/.cache/mimkit``).
        strict: raise MimkitError on the first unreadable image instead of skipping it.
        log: optional callable receiving one-line info messages.
        channels: 1 or 3 to convert the images (grey <-> RGB); None keeps the source's own
            (``imagefolder`` decodes to RGB by default).
        size: ``imagefolder`` only: resize every image to ``size`` x ``size`` while decoding (centre square).

    Returns: an :class:`InMemoryData` with uint8 ``(N, C, H, W)`` images on the CPU.
    """
    log = log if log is not None else _no_log
    source = canonical_source_name(name)
    if source == "demo":
        data = load_demo()
    else:
        if path is None or str(path).strip() == "":
            raise MimkitError(f"data source {source!r} needs a path (got {path!r})")
        if source == "fashion-mnist":
            data = load_fashion_mnist(path)
        elif source == "cifar10":
            data = load_cifar10(path, cache_dir=cache_dir, strict=strict, log=log)
        else:
            data = load_imagefolder(path, channels=channels or 3, cache_dir=cache_dir, strict=strict, log=log,
                                    size=size)
    if channels is not None:
        data = convert_channels(data, channels)
    return data


__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "DEMO_FILE",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_FILES",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "GREY_MODES",
    "HELD_OUT_SPLIT_NAMES",
    "IMAGENET_GREY_MEAN",
    "IMAGENET_GREY_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "IN_MEMORY_BUDGET_GB",
    "RESIZE_HINT",
    "SOURCE_NAMES",
    "FileList",
    "ImageSplit",
    "ImageTreeListing",
    "InMemoryData",
    "LogFn",
    "canonical_source_name",
    "channel_stats",
    "channels_mode",
    "convert_channels",
    "decode_image",
    "decode_image_mode",
    "default_cache_dir",
    "default_mean_std",
    "describe_conversions",
    "describe_failure",
    "find_fashion_mnist_files",
    "folder_memory_plan",
    "is_image_file",
    "list_image_tree",
    "load_cifar10",
    "load_demo",
    "load_fashion_mnist",
    "load_imagefolder",
    "load_in_memory",
    "no_images_error",
    "report_skipped",
    "stack_same_size",
    "unreadable_error",
]

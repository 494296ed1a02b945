"""The embedded demo set (a Fashion-MNIST subset shipped in ``mimkit/data/embedded``) and Fashion-MNIST from
its four IDX files."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from mimkit.data.idx import read_idx
from mimkit.data.sources.common import ImageSplit, InMemoryData
from mimkit.errors import MimkitError

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)

DEMO_FILE = "fashion_mnist_demo.npz"


def load_demo() -> InMemoryData:
    """The embedded Fashion-MNIST subset: 10,000 train + 2,000 test, ``(N, 1, 28, 28)``, 10 classes."""
    resource = resources.files("mimkit.data").joinpath("embedded", DEMO_FILE)
    if not resource.is_file():
        raise MimkitError(f"embedded demo data {resource} is missing (rebuild it with scripts/build_demo_data.py)")
    with resource.open("rb") as f, np.load(f, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    return InMemoryData(
        train=ImageSplit(
            torch.from_numpy(arrays["train_images"]).unsqueeze(1), torch.from_numpy(arrays["train_labels"])
        ),
        test=ImageSplit(torch.from_numpy(arrays["test_images"]).unsqueeze(1), torch.from_numpy(arrays["test_labels"])),
        classes=[str(c) for c in arrays["classes"]],
        mean=FASHION_MNIST_MEAN,
        std=FASHION_MNIST_STD,
    )


def find_fashion_mnist_files(path: str | os.PathLike) -> dict[str, Path]:
    """Locate the four IDX files (``NAME`` or ``NAME.gz``) in ``path`` or its ``raw/`` or
    ``FashionMNIST/raw/`` subfolder (torchvision's layout).

    Returns: ``{"train_images": Path, "train_labels": ..., "test_images": ..., "test_labels": ...}``.
    """
    root = Path(path).expanduser()
    expected = ", ".join(f"{n}[.gz]" for n in FASHION_MNIST_FILES.values())
    if not root.is_dir():
        raise MimkitError(f"fashion-mnist folder {root} does not exist (expected a folder holding {expected})")

    def find(folder: Path) -> dict[str, Path]:
        found = {}
        for key, base in FASHION_MNIST_FILES.items():
            hit = next((c for c in (folder / f"{base}.gz", folder / base) if c.is_file()), None)
            if hit is not None:
                found[key] = hit
        return found

    in_root = find(root)
    for folder in (root, root / "raw", root / "FashionMNIST" / "raw"):
        found = in_root if folder == root else find(folder)
        if len(found) == len(FASHION_MNIST_FILES):
            return found
    missing = ", ".join(f"{b}[.gz]" for k, b in FASHION_MNIST_FILES.items() if k not in in_root)
    raise MimkitError(f"fashion-mnist folder {root} lacks {missing} (expected files: {expected})")


def load_fashion_mnist(path: str | os.PathLike) -> InMemoryData:
    """Fashion-MNIST from its four IDX files: 60,000 train + 10,000 test, ``(N, 1, 28, 28)``."""
    files = find_fashion_mnist_files(path)
    splits = {}
    for split in ("train", "test"):
        images = read_idx(files[f"{split}_images"])
        labels = read_idx(files[f"{split}_labels"])
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels) or images.dtype != np.uint8:
            raise MimkitError(
                f"{files[f'{split}_images']}: expected uint8 (N, H, W) images and (N,) labels, "
                f"got {images.dtype} {images.shape} and {labels.shape}"
            )
        splits[split] = ImageSplit(torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)))
    return InMemoryData(
        splits["train"], splits["test"], list(FASHION_MNIST_CLASSES), FASHION_MNIST_MEAN, FASHION_MNIST_STD
    )

#!/usr/bin/env python
"""Build the embedded demo data set ``src/mimkit/data/embedded/fashion_mnist_demo.npz``.

A class-balanced subset of Fashion-MNIST (MIT licence, Copyright (c) 2017 Zalando SE): 1000 images
per class from the training file (10,000) and 200 per class from the t10k file (2,000), picked with a
fixed seed and kept in their original file order. Stored with ``np.savez_compressed``:

- ``train_images`` uint8 (10000, 28, 28), ``train_labels`` uint8 (10000,)
- ``test_images``  uint8 (2000, 28, 28),  ``test_labels``  uint8 (2000,)
- ``classes`` unicode (10,)

Usage: python scripts/build_demo_data.py [--src DIR] [--out FILE]
(DIR defaults to $MIMKIT_SHARED_DATA/fashion-mnist, else ../shared/data/fashion-mnist.)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from mimkit.data.idx import read_idx  # noqa: E402
from mimkit.data.sources import FASHION_MNIST_CLASSES, find_fashion_mnist_files  # noqa: E402

SEED = 20170825  # Fashion-MNIST's release date; any fixed value works
TRAIN_PER_CLASS = 1000
TEST_PER_CLASS = 200
MAX_BYTES = 6 * 1024 * 1024

LICENSE_TEXT = """\
The file fashion_mnist_demo.npz in this folder is a subset of Fashion-MNIST
(https://github.com/zalandoresearch/fashion-mnist): 1000 training images per class
(10,000) and 200 test images per class (2,000), chosen with a fixed seed, stored
unchanged as uint8 arrays. It is distributed under the following licence.

The MIT License (MIT)

Copyright (c) 2017 Zalando SE

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
"""


def balanced_subset(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``per_class`` samples of every class, drawn without replacement, sorted ascending."""
    picks = []
    for c in range(len(FASHION_MNIST_CLASSES)):
        pool = np.flatnonzero(labels == c)
        if len(pool) < per_class:
            raise SystemExit(f"class {c} has only {len(pool)} images, need {per_class}")
        picks.append(rng.choice(pool, size=per_class, replace=False))
    return np.sort(np.concatenate(picks))


def main() -> None:
    default_shared = Path(os.environ.get("MIMKIT_SHARED_DATA", REPO.parent / "shared" / "data"))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=default_shared / "fashion-mnist")
    parser.add_argument(
        "--out", type=Path, default=REPO / "src" / "mimkit" / "data" / "embedded" / "fashion_mnist_demo.npz"
    )
    args = parser.parse_args()

    files = find_fashion_mnist_files(args.src)
    rng = np.random.default_rng(SEED)
    arrays: dict[str, np.ndarray] = {}
    for split, per_class in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        images = read_idx(files[f"{split}_images"])
        labels = read_idx(files[f"{split}_labels"])
        keep = balanced_subset(labels, per_class, rng)
        arrays[f"{split}_images"] = np.ascontiguousarray(images[keep], dtype=np.uint8)
        arrays[f"{split}_labels"] = np.ascontiguousarray(labels[keep], dtype=np.uint8)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp.npz")
    np.savez_compressed(tmp, classes=np.array(FASHION_MNIST_CLASSES), **arrays)
    os.replace(tmp, args.out)
    (args.out.parent / "LICENSE-fashion-mnist.txt").write_text(LICENSE_TEXT)

    size = args.out.stat().st_size
    counts = {k: v.shape for k, v in arrays.items()}
    print(f"wrote {args.out} ({size / 2**20:.2f} MiB): {counts} from {args.src}")
    if size > MAX_BYTES:
        raise SystemExit(f"{args.out} is {size} bytes, over the {MAX_BYTES} byte budget")


if __name__ == "__main__":
    main()

"""Tests of mimkit.data: IDX parsing, sources, batched augmentation and the batch providers."""

from __future__ import annotations

import gzip
import math
import os
import pickle
import struct
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mimkit.data import (
    ImageSplit,
    InMemoryData,
    build_datamodule,
    center_resize,
    load_in_memory,
    normalize,
    random_resized_crop_flip,
    read_idx,
    sample_crop_boxes,
    write_idx,
)
from mimkit.data.augment import crop_flip_thetas
from mimkit.data.memory import InMemoryDataModule
from mimkit.errors import MimkitError

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MIMKIT_SHARED_DATA", REPO.parent / "shared" / "data"))
EMBEDDED = REPO / "src" / "mimkit" / "data" / "embedded"


class Log(list):
    """Collects log lines."""

    def __call__(self, line: str) -> None:
        self.append(line)

    def text(self) -> str:
        return "\n".join(self)


# ----------------------------------------------------------------------------------------------
# IDX


def test_idx_parses_hand_built_file(tmp_path: Path) -> None:
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = bytes([0, 0, 0x08, 3]) + struct.pack(">III", 2, 3, 4) + images.tobytes()
    (tmp_path / "plain-idx3-ubyte").write_bytes(raw)
    with gzip.open(tmp_path / "zipped-idx3-ubyte.gz", "wb") as f:
        f.write(raw)
    for name in ("plain-idx3-ubyte", "zipped-idx3-ubyte.gz"):
        out = read_idx(tmp_path / name)
        assert out.dtype == np.uint8 and out.shape == (2, 3, 4)
        np.testing.assert_array_equal(out, images)
    ints = np.array([1, -2, 300000], dtype=np.int32)
    (tmp_path / "ints").write_bytes(bytes([0, 0, 0x0C, 1]) + struct.pack(">I", 3) + ints.astype(">i4").tobytes())
    np.testing.assert_array_equal(read_idx(tmp_path / "ints"), ints)


def test_idx_round_trip_and_errors(tmp_path: Path) -> None:
    for arr in (
        np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8),
        np.linspace(-1, 1, 6).astype(np.float32),
    ):
        write_idx(tmp_path / "a.gz", arr)
        write_idx(tmp_path / "a", arr)
        np.testing.assert_array_equal(read_idx(tmp_path / "a.gz"), arr)
        np.testing.assert_array_equal(read_idx(tmp_path / "a"), arr)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x01\x05")
    with pytest.raises(MimkitError, match="bad magic"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"\x00" * 3)
    with pytest.raises(MimkitError, match="does not match"):
        read_idx(tmp_path / "short")


def _write_fake_fashion_mnist(folder: Path, n_train: int = 30, n_test: int = 10) -> None:
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    write_idx(folder / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8))
    write_idx(folder / "train-labels-idx1-ubyte.gz", (np.arange(n_train) % 10).astype(np.uint8))
    write_idx(folder / "t10k-images-idx3-ubyte", rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8))  # not gzipped
    write_idx(folder / "t10k-labels-idx1-ubyte", (np.arange(n_test) % 10).astype(np.uint8))


def test_fashion_mnist_folder(tmp_path: Path) -> None:
    _write_fake_fashion_mnist(tmp_path / "fm")
    data = load_in_memory("fashion-mnist", str(tmp_path / "fm"))
    assert data.train.images.shape == (30, 1, 28, 28) and data.train.images.dtype == torch.uint8
    assert data.test is not None and data.test.images.shape == (10, 1, 28, 28)
    assert data.train.labels is not None and data.train.labels.dtype == torch.int64
    assert data.classes is not None and len(data.classes) == 10 and data.mean == (0.2860,)
    (tmp_path / "fm" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(MimkitError, match="t10k-labels-idx1-ubyte") as e:
        load_in_memory("fashion-mnist", str(tmp_path / "fm"))
    assert "\n" not in str(e.value) and str(tmp_path / "fm") in str(e.value)
    with pytest.raises(MimkitError, match="does not exist"):
        load_in_memory("fashion-mnist", str(tmp_path / "nowhere"))


@pytest.mark.skipif(not (SHARED / "fashion-mnist").is_dir(), reason="shared Fashion-MNIST not available (set MIMKIT_SHARED_DATA)")
def test_real_fashion_mnist() -> None:
    data = load_in_memory("fashion-mnist", str(SHARED / "fashion-mnist"))
    assert len(data.train) == 60000 and data.test is not None and len(data.test) == 10000
    assert torch.bincount(data.train.labels).tolist() == [6000] * 10  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------
# Embedded demo


def test_demo_npz_is_balanced_and_small() -> None:
    npz = EMBEDDED / "fashion_mnist_demo.npz"
    assert npz.stat().st_size < 6.5 * 2**20
    with np.load(npz, allow_pickle=False) as z:
        assert z["train_images"].shape == (10000, 28, 28) and z["train_images"].dtype == np.uint8
        assert z["test_images"].shape == (2000, 28, 28) and z["test_images"].dtype == np.uint8
        assert np.bincount(z["train_labels"]).tolist() == [1000] * 10
        assert np.bincount(z["test_labels"]).tolist() == [200] * 10
        assert len(z["classes"]) == 10
    licence = (EMBEDDED / "LICENSE-fashion-mnist.txt").read_text()
    assert "Copyright (c) 2017 Zalando SE" in licence and "subset" in licence
    data = load_in_memory("demo", None)
    assert data.train.images.shape == (10000, 1, 28, 28) and data.mean == (0.2860,) and data.std == (0.3530,)


# ----------------------------------------------------------------------------------------------
# Augmentation


def _random_images(b: int = 6, c: int = 3, h: int = 20, w: int = 20, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (b, c, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_crop_flip_shape_range_and_reproducibility() -> None:
    imgs = _random_images(8, 3, 24, 30)
    out = random_resized_crop_flip(imgs, 16, generator=torch.Generator().manual_seed(1))
    assert out.shape == (8, 3, 16, 16) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    again = random_resized_crop_flip(imgs, 16, generator=torch.Generator().manual_seed(1))
    other = random_resized_crop_flip(imgs, 16, generator=torch.Generator().manual_seed(2))
    assert torch.equal(out, again)
    assert not torch.allclose(out, other)
    grey = random_resized_crop_flip(_random_images(4, 1), 12, interpolation="bilinear")
    assert grey.shape == (4, 1, 12, 12)
    with pytest.raises(MimkitError, match="interpolation"):
        random_resized_crop_flip(imgs, 16, interpolation="lanczos")
    with pytest.raises(MimkitError, match="uint8"):
        random_resized_crop_flip(imgs.float(), 16)


def test_full_crop_is_identity_and_flip_mirrors() -> None:
    imgs = _random_images(5, 3, 20, 20)
    exact = imgs.float() / 255
    kw = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0))
    same = random_resized_crop_flip(imgs, 20, hflip_p=0.0, **kw)
    flipped = random_resized_crop_flip(imgs, 20, hflip_p=1.0, **kw)
    torch.testing.assert_close(same, exact, atol=1e-5, rtol=0)
    torch.testing.assert_close(flipped, torch.flip(exact, dims=[3]), atol=1e-5, rtol=0)
    # a fixed box selects exactly that window (integer box, output size = box size)
    boxes = torch.tensor([[3, 5, 8, 12]] * 5)
    theta = crop_flip_thetas(boxes, torch.tensor([False, True, False, True, False]), 20, 20)
    grid = F.affine_grid(theta, [5, 3, 8, 12], align_corners=False)
    window = F.grid_sample(exact, grid, mode="bicubic", padding_mode="border", align_corners=False)
    expected = exact[:, :, 3:11, 5:17].clone()
    expected[1::2] = torch.flip(expected[1::2], dims=[3])
    torch.testing.assert_close(window, expected, atol=1e-5, rtol=0)


def test_crop_box_statistics() -> None:
    boxes = sample_crop_boxes(
        20000, 224, 224, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), generator=torch.Generator().manual_seed(0)
    )
    top, left, h, w = boxes.T.double()
    frac = h * w / 224**2
    assert frac.min() >= 0.19 and frac.max() <= 1.0
    assert 0.5 < frac.mean() < 0.7  # uniform area fraction over [0.2, 1] (some large tries rejected)
    aspect = w / h
    assert aspect.min() >= 0.74 and aspect.max() <= 1.35
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 224).all() and (left + w <= 224).all()
    # positions cover the whole free range
    assert ((224 - h) > 0).any() and (top == 0).any() and (top + h == 224).any()
    # impossible scale -> centre crop clamped to the ratio (4:1 wide image, ratio <= 4/3)
    fb = sample_crop_boxes(3, 10, 40, scale=(5.0, 6.0), ratio=(3 / 4, 4 / 3))
    assert fb.tolist() == [[0, 13, 10, 13]] * 3


def test_center_resize_and_normalize() -> None:
    imgs = _random_images(2, 3, 16, 16)
    torch.testing.assert_close(center_resize(imgs, 16), imgs.float() / 255)
    big = center_resize(imgs, 24)
    assert big.shape == (2, 3, 24, 24) and big.min() >= 0 and big.max() <= 1
    x = torch.ones(1, 3, 2, 2)
    out = normalize(x, (0.5, 0.25, 0.0), (0.5, 0.25, 2.0))
    assert out[0, :, 0, 0].tolist() == [1.0, 3.0, 0.5]
    with pytest.raises(MimkitError, match="one value per channel"):
        normalize(x, (0.5,), (0.5,))


# ----------------------------------------------------------------------------------------------
# In-memory batches


def _constant_images_module(n: int = 40, size: int = 8) -> InMemoryDataModule:
    """Image i is constant with value i: any crop keeps it, so batches reveal their indices."""
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, size, size).contiguous()
    data = InMemoryData(ImageSplit(images, torch.arange(n) % 3), None, ["a", "b", "c"], (0.0,), (1.0,))
    return InMemoryDataModule(data, size, name="const")


def _indices(batch: torch.Tensor) -> list[int]:
    return (batch.mean(dim=(1, 2, 3)) * 255).round().long().tolist()


def test_train_batches_order_is_seeded_permutation() -> None:
    dm = _constant_images_module()
    assert dm.steps_per_epoch(8) == 5 and dm.steps_per_epoch(16) == 2 and dm.steps_per_epoch(8, world_size=3) == 1
    seen = [i for b in dm.train_batches(0, 8, seed=7, device="cpu") for i in _indices(b)]
    assert sorted(seen) == list(range(40))
    assert seen == dm.epoch_indices(0, 7).tolist()
    assert seen == [i for b in dm.train_batches(0, 8, seed=7, device="cpu") for i in _indices(b)]
    assert seen != [i for b in dm.train_batches(1, 8, seed=7, device="cpu") for i in _indices(b)]
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(7 * 100003 + 0)).tolist()
    assert seen == perm
    dropped = [i for b in dm.train_batches(0, 16, seed=7, device="cpu") for i in _indices(b)]
    assert len(dropped) == 32 and len(set(dropped)) == 32  # drop_last
    r0 = [i for b in dm.train_batches(0, 4, 7, "cpu", rank=0, world_size=2) for i in _indices(b)]
    r1 = [i for b in dm.train_batches(0, 4, 7, "cpu", rank=1, world_size=2) for i in _indices(b)]
    # rank r takes rows r*4 .. r*4+3 of each global batch of 8: the union of the ranks' k-th batches is the
    # k-th batch of one process with batch 8
    assert r0 == [perm[i] for k in range(5) for i in range(8 * k, 8 * k + 4)]
    assert r1 == [perm[i] for k in range(5) for i in range(8 * k + 4, 8 * k + 8)]
    assert not set(r0) & set(r1)
    with pytest.raises(MimkitError, match="batch_size 64"):
        dm.steps_per_epoch(64)


def test_ranks_split_the_global_batch_with_identical_augmentation() -> None:
    dm = build_datamodule("demo", None, img_size=16)
    single = list(dm.train_batches(2, 64, seed=3, device="cpu"))
    ranks = [list(dm.train_batches(2, 32, seed=3, device="cpu", rank=r, world_size=2)) for r in range(2)]
    assert len(single) == len(ranks[0]) == len(ranks[1])
    for k in range(len(single)):
        assert torch.equal(torch.cat([ranks[0][k], ranks[1][k]]), single[k])


def test_train_batches_start_matches_skipping() -> None:
    dm = build_datamodule("demo", None, img_size=16)
    full = list(dm.train_batches(3, 500, seed=1, device="cpu"))
    assert len(full) == dm.steps_per_epoch(500) == 20
    assert full[0].shape == (500, 1, 16, 16) and full[0].dtype == torch.float32
    resumed = list(dm.train_batches(3, 500, seed=1, device="cpu", start=17))
    assert len(resumed) == 3
    for a, b in zip(full[17:], resumed):
        assert torch.equal(a, b)
    assert not torch.equal(full[0], next(dm.train_batches(4, 500, seed=1, device="cpu")))


def test_eval_batches_and_samples() -> None:
    dm = build_datamodule("demo", None)
    assert (dm.in_chans, dm.img_size, dm.num_train, dm.has_test) == (1, 28, 10000, True)
    batches = list(dm.eval_batches("test", 512, "cpu"))
    assert sum(len(y) for _, y in batches) == 2000 and batches[-1][0].shape == (2000 - 3 * 512, 1, 28, 28)
    x, y = batches[0]
    raw = load_in_memory("demo", None).test
    torch.testing.assert_close(x, (raw.images[:512].float() / 255 - 0.2860) / 0.3530)
    assert torch.equal(y, raw.labels[:512])  # type: ignore[index]
    assert dm.sample_images(5).shape == (5, 1, 28, 28)
    rgb = build_datamodule("demo", None, 32, channels=3)
    assert (
        rgb.in_chans == 3
        and rgb.mean == (0.2860,) * 3
        and next(rgb.eval_batches("train", 4, "cpu"))[0].shape == (4, 3, 32, 32)
    )
    with pytest.raises(MimkitError, match="unknown split"):
        next(dm.eval_batches("holdout", 4, "cpu"))


def test_unknown_source_and_bad_arguments() -> None:
    with pytest.raises(MimkitError, match="demo, fashion-mnist, cifar10, imagefolder") as e:
        load_in_memory("mnist", None)
    assert "'mnist'" in str(e.value)
    with pytest.raises(MimkitError, match="demo, fashion-mnist, cifar10, imagefolder"):
        build_datamodule("imagenet", "/x", 32)
    with pytest.raises(MimkitError, match="needs a path"):
        build_datamodule("cifar10", None)
    with pytest.raises(MimkitError, match="in_memory"):
        build_datamodule("demo", None, in_memory="sometimes")
    with pytest.raises(MimkitError, match="mean"):
        build_datamodule("demo", None, mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))


# ----------------------------------------------------------------------------------------------
# Image folders


def _png(path: Path, size: tuple[int, int], mode: str = "RGB", seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(path)


def _tree(root: Path, sizes=((20, 16), (12, 12), (16, 16))) -> Path:
    """train/{cat,dog} with RGB + grey PNGs of mixed sizes and one corrupt file; test/{cat,dog}."""
    for i in range(3):
        _png(root / "train" / "cat" / f"c{i}.png", sizes[i % len(sizes)], seed=i)
        _png(root / "train" / "dog" / f"d{i}.PNG", sizes[(i + 1) % len(sizes)], mode="L", seed=10 + i)
        (root / "train" / "dog" / "notes.txt").write_text("not an image")
    (root / "train" / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a real png")
    _png(root / "test" / "cat" / "t0.png", sizes[0], seed=20)
    _png(root / "test" / "dog" / "t1.jpg", sizes[1 % len(sizes)], mode="L", seed=21)
    return root


def test_imagefolder_folder_backed(tmp_path: Path) -> None:
    root = _tree(tmp_path / "tree")
    log = Log()
    dm = build_datamodule("imagefolder", str(root), 16, num_workers=0, log=log)
    assert dm.classes == ["cat", "dog"] and dm.num_train == 7 and dm.has_test and dm.in_chans == 3
    batches = list(dm.train_batches(0, 7, seed=0, device="cpu"))
    assert len(batches) == 1 and batches[0].shape == (6, 3, 16, 16)  # the corrupt file is filtered out
    assert "skipped 1 unreadable image" in log.text() and "broken.png" in log.text()
    again = list(dm.train_batches(0, 7, seed=0, device="cpu"))
    assert torch.equal(batches[0], again[0])
    xs, ys = zip(*dm.eval_batches("test", 4, "cpu"))
    assert torch.cat(ys).tolist() == [0, 1] and xs[0].shape == (2, 3, 16, 16)
    assert dm.sample_images(8).shape == (2, 3, 16, 16)
    with pytest.raises(MimkitError, match="broken.png") as e:  # strict: every image is checked up front
        build_datamodule("imagefolder", str(root), 16, num_workers=0, strict=True)
    assert "\n" not in str(e.value) and "data.strict=false" in str(e.value)
    grey = build_datamodule("imagefolder", str(root), 8, num_workers=0, channels=1)
    assert grey.in_chans == 1 and next(grey.train_batches(0, 2, 0, "cpu")).shape == (2, 1, 8, 8)


def test_imagefolder_workers_reproduce_single_process(tmp_path: Path) -> None:
    root = _tree(tmp_path / "tree")
    single = build_datamodule("imagefolder", str(root), 12, num_workers=0)
    workers = build_datamodule("imagefolder", str(root), 12, num_workers=2)
    a = list(single.train_batches(2, 3, seed=5, device="cpu"))
    b = list(workers.train_batches(2, 3, seed=5, device="cpu"))
    assert len(a) == len(b) == 2
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    resumed = list(single.train_batches(2, 3, seed=5, device="cpu", start=1))
    assert len(resumed) == 1 and torch.equal(resumed[0], a[1])


def test_imagefolder_in_memory_and_layouts(tmp_path: Path) -> None:
    same = _tree(tmp_path / "same", sizes=((16, 16),))
    log = Log()
    dm = build_datamodule("imagefolder", str(same), in_memory=True, cache_dir=str(tmp_path / "cache"), log=log)
    assert isinstance(dm, InMemoryDataModule) and dm.num_train == 6 and dm.img_size == 16 and dm.has_test
    assert "skipped 1 unreadable image" in log.text()
    with pytest.raises(MimkitError, match="broken.png"):
        load_in_memory("imagefolder", str(same), cache_dir=str(tmp_path / "cache"), strict=True)
    mixed = _tree(tmp_path / "mixed")
    with pytest.raises(MimkitError, match="differ in size.*in_memory=false"):
        build_datamodule("imagefolder", str(mixed), in_memory=True, cache_dir=str(tmp_path / "cache"))
    # loose images: unlabelled pre-training set
    for i in range(3):
        _png(tmp_path / "flat" / f"{i}.png", (10, 10), seed=i)
    flat = build_datamodule("imagefolder", str(tmp_path / "flat"), 8, num_workers=0)
    assert flat.classes is None and not flat.has_test and flat.num_train == 3
    assert next(flat.train_batches(0, 3, 0, "cpu")).shape == (3, 3, 8, 8)
    with pytest.raises(MimkitError, match="no labels"):
        next(flat.eval_batches("train", 2, "cpu"))
    with pytest.raises(MimkitError, match="no test split"):
        next(flat.eval_batches("test", 2, "cpu"))


def test_empty_and_missing_folders(tmp_path: Path) -> None:
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    (tmp_path / "empty" / "cls" / "readme.txt").write_text("x")
    with pytest.raises(MimkitError, match=r"no images found under .*empty \(accepted extensions: \.jpg"):
        build_datamodule("imagefolder", str(tmp_path / "empty"), 32)
    with pytest.raises(MimkitError, match="does not exist"):
        build_datamodule("imagefolder", str(tmp_path / "missing"), 32)
    with pytest.raises(MimkitError, match="does not exist"):
        load_in_memory("cifar10", str(tmp_path / "missing"))


# ----------------------------------------------------------------------------------------------
# CIFAR-10


def _write_cifar_batches(folder: Path, n_per_batch: int = 20, n_batches: int = 2) -> np.ndarray:
    """Python batches like the CIFAR authors' (pickle protocol 2, bytes keys); returns all train data."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    chunks = []
    for b in range(1, n_batches + 1):
        data = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        chunks.append(data)
        batch = {
            b"batch_label": b"training batch",
            b"data": data,
            b"labels": [(b + i) % 10 for i in range(n_per_batch)],
        }
        (folder / f"data_batch_{b}").write_bytes(pickle.dumps(batch, protocol=2))
    test = {b"data": rng.integers(0, 256, (10, 3072), dtype=np.uint8), b"labels": list(range(10))}
    (folder / "test_batch").write_bytes(pickle.dumps(test, protocol=2))
    names = [b"plane", b"car", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}, protocol=2))
    return np.concatenate(chunks)


def test_cifar10_python_batches(tmp_path: Path) -> None:
    train = _write_cifar_batches(tmp_path / "dl" / "cifar-10-batches-py")
    for path in (tmp_path / "dl" / "cifar-10-batches-py", tmp_path / "dl"):
        data = load_in_memory("cifar10", str(path), cache_dir=str(tmp_path / "cache"))
        assert data.train.images.shape == (40, 3, 32, 32) and data.test is not None and len(data.test) == 10
        # row layout: 1024 red, 1024 green, 1024 blue values, each row-major 32x32
        assert data.train.images[1, 1, 2, 3].item() == train[1, 1024 + 2 * 32 + 3]
        assert data.train.labels[:3].tolist() == [1, 2, 3]  # type: ignore[index]
        assert data.classes is not None and data.classes[0] == "plane" and data.mean == (0.4914, 0.4822, 0.4465)
    # the same batches inside a tar.gz, read without extraction
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(tmp_path / "dl" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    data = load_in_memory("cifar10", str(archive), cache_dir=str(tmp_path / "cache"))
    assert data.train.images.shape == (40, 3, 32, 32)
    assert data.train.images[1, 1, 2, 3].item() == train[1, 1024 + 2 * 32 + 3]


def test_cifar10_batches_refuse_foreign_pickles(tmp_path: Path) -> None:
    _write_cifar_batches(tmp_path / "b")

    class Evil:
        def __reduce__(self):
            return (os.getcwd, ())

    (tmp_path / "b" / "data_batch_1").write_bytes(pickle.dumps({b"data": Evil()}, protocol=2))
    with pytest.raises(MimkitError, match="not a CIFAR python batch"):
        load_in_memory("cifar10", str(tmp_path / "b"))


def test_cifar10_image_tree_folder_and_tar_cached(tmp_path: Path) -> None:
    root = tmp_path / "c10"
    for split, n in (("train", 3), ("test", 1)):
        for c, cls in enumerate(("cat", "ship")):
            for i in range(n):
                _png(root / split / cls / f"{i:04d}.png", (32, 32), seed=100 * c + i + (50 if split == "test" else 0))
    (root / "train" / "ship" / "9999.png").write_bytes(b"garbage")
    archive = tmp_path / "c10.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(root, arcname="cifar10")  # tree below a prefix folder
    cache = tmp_path / "cache"
    results = {}
    for path in (root, archive):
        log = Log()
        first = load_in_memory("cifar10", str(path), cache_dir=str(cache), log=log)
        assert "decoded 8 images" in log.text() and "skipped 1 unreadable image" in log.text()
        log2 = Log()
        second = load_in_memory("cifar10", str(path), cache_dir=str(cache), log=log2)
        assert "from the cache" in log2.text()
        assert torch.equal(first.train.images, second.train.images)
        assert first.classes == ["cat", "ship"] and first.train.labels.tolist() == [0, 0, 0, 1, 1, 1]  # type: ignore[union-attr]
        assert first.test is not None and first.test.images.shape == (2, 3, 32, 32)
        with pytest.raises(MimkitError, match="9999.png"):
            load_in_memory("cifar10", str(path), cache_dir=str(cache), strict=True)
        results[path] = first
    assert torch.equal(results[root].train.images, results[archive].train.images)
    expected = np.array(Image.open(root / "train" / "cat" / "0000.png")).transpose(2, 0, 1).copy()
    assert torch.equal(results[root].train.images[0], torch.from_numpy(expected))
    # folder-backed view of the same tree
    dm = build_datamodule("cifar10", str(root), in_memory=False, num_workers=0)
    assert dm.num_train == 7 and dm.mean == (0.4914, 0.4822, 0.4465)
    _png(root / "train" / "cat" / "0003.png", (30, 32), seed=7)
    with pytest.raises(MimkitError, match="differ in size.*imagefolder"):
        load_in_memory("cifar10", str(root), cache_dir=str(cache))


@pytest.mark.slow
@pytest.mark.skipif(
    not (SHARED / "cifar10" / "cifar10-jpeg.tar.gz").is_file(), reason="shared CIFAR-10 tar not available (set MIMKIT_SHARED_DATA)"
)
def test_real_cifar10_tar(tmp_path: Path) -> None:
    archive = SHARED / "cifar10" / "cifar10-jpeg.tar.gz"
    t0 = time.perf_counter()
    data = load_in_memory("cifar10", str(archive), cache_dir=str(tmp_path))
    first = time.perf_counter() - t0
    assert (
        data.train.images.shape == (50000, 3, 32, 32)
        and data.test is not None
        and data.test.images.shape == (10000, 3, 32, 32)
    )
    assert torch.bincount(data.train.labels).tolist() == [5000] * 10  # type: ignore[arg-type]
    assert data.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    log = Log()
    t0 = time.perf_counter()
    again = load_in_memory("cifar10", str(archive.parent), cache_dir=str(tmp_path), log=log)
    second = time.perf_counter() - t0
    assert "from the cache" in log.text() and second < 2.0, (first, second)
    assert torch.equal(again.test.images[-5:], data.test.images[-5:])  # type: ignore[union-attr]
    mean = data.train.images[::10].float().mean(dim=(0, 2, 3)) / 255
    assert all(math.isclose(m, r, abs_tol=0.05) for m, r in zip(mean.tolist(), data.mean))

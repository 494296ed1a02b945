"""In-memory data sources: the embedded demo set, Fashion-MNIST, CIFAR-10 and small image-folder trees.

Every source yields an :class:`InMemoryData`: uint8 image tensors ``(N, C, H, W)`` (C = 1 grey, 3 RGB)
and int64 labels ``(N,)`` held on the CPU, plus class names and per-channel mean/std in [0, 1] pixel
units. Decoding many JPEG/PNG files is slow, so image trees (folders or tar archives) are decoded once
and cached as an uncompressed ``.npz`` in a cache folder (``cache_dir``, else ``$MIMKIT_CACHE``, else
``~/.cache/mimkit``), keyed by a hash of the source's absolute path, size and modification time.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable
from collections import Counter
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image, ImageOps

from mimkit.data.idx import read_idx
from mimkit.errors import MimkitError

LogFn = Callable[[str], None]

SOURCE_NAMES = ("demo", "fashion-mnist", "cifar10", "imagefolder", "hf", "webdataset")  # last two: data/hf.py, data/webdataset.py
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
HELD_OUT_SPLIT_NAMES = ("val", "test")  # looked for in this order next to train/

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

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGENET_GREY_MEAN, IMAGENET_GREY_STD = (0.449,), (0.226,)

DEMO_FILE = "fashion_mnist_demo.npz"
_CACHE_VERSION = "1"  # bump when the cache layout or decoding changes


def _no_log(_: str) -> None:
    pass


# ----------------------------------------------------------------------------------------------
# Containers


@dataclass
class ImageSplit:
    """One split held in memory.

    Attributes:
        images: uint8 ``(N, C, H, W)``, C = 1 for grey, 3 for RGB, on the CPU.
        labels: int64 ``(N,)`` class indices, or None when unlabelled.
    """

    images: torch.Tensor
    labels: torch.Tensor | None

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels is not None:
            if self.labels.shape != (self.images.shape[0],):
                raise ValueError(f"labels must be ({self.images.shape[0]},), got {tuple(self.labels.shape)}")
            self.labels = self.labels.to(torch.int64)

    def __len__(self) -> int:
        return self.images.shape[0]


@dataclass
class InMemoryData:
    """A whole data set held in memory.

    Attributes:
        train: the training split.
        test: a held-out split, or None.
        classes: class names (index = label), or None when unlabelled.
        mean, std: per-channel statistics in [0, 1] pixel units (length C).
    """

    train: ImageSplit
    test: ImageSplit | None
    classes: list[str] | None
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def in_chans(self) -> int:
        return int(self.train.images.shape[1])

    @property
    def image_hw(self) -> tuple[int, int]:
        return int(self.train.images.shape[2]), int(self.train.images.shape[3])


# ----------------------------------------------------------------------------------------------
# Demo and Fashion-MNIST


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


# ----------------------------------------------------------------------------------------------
# Image decoding and image-folder listings


def is_image_file(name: str) -> bool:
    """True for a non-hidden file name with an accepted image extension (case-insensitive)."""
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def decode_image(source: bytes | str | os.PathLike, mode: str, size: int | None = None) -> np.ndarray:
    """Decode one image file (path or bytes) with PIL, converted to ``mode`` ("RGB" or "L"); with ``size``,
    centre-cropped to a square and resized to ``size`` x ``size`` (bicubic, ``PIL.ImageOps.fit``).

    Returns: uint8 ``(H, W, C)``.
    """
    return decode_image_mode(source, mode, size)[0]


def decode_image_mode(source: bytes | str | os.PathLike, mode: str, size: int | None = None) -> tuple[np.ndarray, str]:
    """:func:`decode_image` and the file's own PIL mode (e.g. "L" for a grey JPEG converted to RGB)."""
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
        original = im.mode
        img = im.convert(mode)
        if size is not None:
            img = ImageOps.fit(img, (size, size), Image.Resampling.BICUBIC)
        arr = np.asarray(img)
    return (arr[:, :, None] if arr.ndim == 2 else arr), original


def describe_conversions(converted: dict[str, int], mode: str) -> str:
    """``converted 3 images to RGB (L: 2 grey, P: 1)`` for the log, or "" when none was converted."""
    total = sum(converted.values())
    if not total:
        return ""
    parts = ", ".join(f"{m}: {n}{' grey' if m in GREY_MODES else ''}" for m, n in sorted(converted.items()))
    return f"converted {total} image{'s' if total != 1 else ''} to {mode} ({parts})"


GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")


def describe_failure(error: BaseException) -> str:
    """A short one-line reason for an image that failed to decode."""
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def report_skipped(skipped: list[tuple[str, str]], log: LogFn, *, what: str = "") -> None:
    """Log ``skipped N unreadable images, e.g. NAME: REASON`` when anything was skipped."""
    if skipped:
        name, reason = skipped[0]
        log(f"skipped {len(skipped)} unreadable image{'s' if len(skipped) != 1 else ''}{what}, e.g. {name}: {reason}")


def unreadable_error(name: str, reason: str) -> MimkitError:
    return MimkitError(f"unreadable image {name}: {reason} (data.strict=true stops at unreadable images; "
                       "--set data.strict=false skips them)")


@dataclass
class FileList:
    """Image files of one split: absolute paths in a fixed (sorted) order and optional class indices."""

    files: list[str]
    labels: list[int] | None

    def __len__(self) -> int:
        return len(self.files)


@dataclass
class ImageTreeListing:
    """The result of listing an image-folder tree once.

    Attributes:
        root: the folder that was listed.
        train: the training files (``root/train`` when it exists, else the whole root).
        test: files of ``root/val`` or ``root/test`` when ``root/train`` exists next to one, else None.
        classes: sorted class-folder names of the train split, or None when images lie directly
            in the split folder (unlabelled).
    """

    root: Path
    train: FileList
    test: FileList | None
    classes: list[str] | None


def _walk_images(folder: Path) -> list[str]:
    """All image files under ``folder`` (recursive, symlinks followed, hidden entries skipped), sorted."""
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(os.path.join(dirpath, f) for f in sorted(filenames) if is_image_file(f))
    return out


def _list_split(folder: Path) -> tuple[list[str], list[int] | None, list[str] | None]:
    """Files, labels and class names of one split folder (class subfolders, or loose images = unlabelled)."""
    with os.scandir(folder) as it:
        entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    if any(e.is_file() and is_image_file(e.name) for e in entries):
        return _walk_images(folder), None, None  # images directly in the folder: unlabelled
    files: list[str] = []
    labels: list[int] = []
    classes: list[str] = []
    for entry in entries:
        if entry.is_dir():
            found = _walk_images(Path(entry.path))
            if found:
                labels.extend([len(classes)] * len(found))
                classes.append(entry.name)
                files.extend(found)
    return files, labels, classes


def no_images_error(root: Path) -> MimkitError:
    return MimkitError(f"no images found under {root} (accepted extensions: {', '.join(IMAGE_EXTENSIONS)})")


def list_image_tree(root: str | os.PathLike) -> ImageTreeListing:
    """List an image-folder tree: ``root/<class>/<image>``, ``root/<image>`` (unlabelled), or
    ``root/train/...`` with ``root/val/...`` or ``root/test/...`` as held-out split.

    Class folders are the immediate subfolders of a split folder; images inside them are found
    recursively. Test class folders must also exist in train (labels use the train class order).
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise MimkitError(f"data folder {root} does not exist")
    if not root.is_dir():
        raise MimkitError(
            f"data path {root} is not a folder (expected ROOT/<class>/<image> or ROOT/train/<class>/<image>)"
        )
    root = root.resolve()
    train_dir = root / "train"
    test_dir = next((root / n for n in HELD_OUT_SPLIT_NAMES if (root / n).is_dir()), None)
    if not train_dir.is_dir():
        train_dir, test_dir = root, None
    files, labels, classes = _list_split(train_dir)
    if not files:
        raise no_images_error(root)
    test = None
    if test_dir is not None:
        t_files, t_labels, t_classes = _list_split(test_dir)
        if t_files:
            if classes is None or t_classes is None:
                t_labels = None
            else:
                unknown = sorted(set(t_classes) - set(classes))
                if unknown:
                    raise MimkitError(
                        f"{test_dir} has class folders {unknown} that {train_dir} lacks (train classes: {', '.join(classes)})"
                    )
                index = {c: i for i, c in enumerate(classes)}
                t_labels = [index[t_classes[i]] for i in t_labels]
            test = FileList(t_files, t_labels)
    return ImageTreeListing(root, FileList(files, labels), test, classes)


# ----------------------------------------------------------------------------------------------
# Cache of decoded arrays


def default_cache_dir() -> Path:
    """``$MIMKIT_CACHE`` if set, else ``~/.cache/mimkit``."""
    env = os.environ.get("MIMKIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mimkit"


def _cache_file(cache_dir: str | os.PathLike | None, kind: str, key: str) -> Path:
    digest = hashlib.sha256(f"{_CACHE_VERSION}|{kind}|{key}".encode()).hexdigest()[:20]
    base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return base / f"{kind}-{digest}.npz"


@dataclass
class _Decoded:
    """Decoded arrays of an image tree (what the cache holds)."""

    train_images: np.ndarray  # uint8 (N, C, H, W)
    train_labels: np.ndarray | None  # int64 (N,)
    test_images: np.ndarray | None
    test_labels: np.ndarray | None
    classes: list[str] | None
    skipped: list[tuple[str, str]]
    converted: dict[str, int] = field(default_factory=dict)  # original PIL mode -> images converted from it


def _save_cache(path: Path, d: _Decoded, log: LogFn) -> bool:
    """Write ``d`` to ``path`` atomically (temporary file + os.replace); False when not writable."""
    arrays: dict[str, np.ndarray] = {"train_images": d.train_images}
    for k in ("train_labels", "test_images", "test_labels"):
        if getattr(d, k) is not None:
            arrays[k] = getattr(d, k)
    if d.classes is not None:
        arrays["classes"] = np.array(d.classes, dtype=str)
    arrays["skipped"] = np.array([f"{n}\t{r}" for n, r in d.skipped], dtype=str).reshape(-1)
    arrays["converted"] = np.array([f"{m}\t{n}" for m, n in d.converted.items()], dtype=str).reshape(-1)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)  # uncompressed: loads in well under a second
            os.chmod(tmp, 0o644)  # mkstemp creates 0600
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as e:
        log(f"could not write the data cache {path} ({e}); continuing without it")
        return False
    return True


def _load_cache(path: Path, log: LogFn) -> _Decoded | None:
    """The cached arrays at ``path``, or None when absent or unreadable."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            a = {k: z[k] for k in z.files}
        return _Decoded(
            train_images=a["train_images"],
            train_labels=a.get("train_labels"),
            test_images=a.get("test_images"),
            test_labels=a.get("test_labels"),
            classes=[str(c) for c in a["classes"]] if "classes" in a else None,
            skipped=[tuple(s.split("\t", 1)) for s in a["skipped"].tolist()],  # type: ignore[misc]
            converted={m: int(n) for m, n in (c.split("\t", 1) for c in a["converted"].tolist())}
            if "converted" in a else {},  # caches written before the count existed: unknown
        )
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        log(f"ignoring unreadable data cache {path} ({e})")
        return None


def _cached_decode(
    kind: str, key: str, source: Path, decode: Callable[[], _Decoded], *, cache_dir, strict: bool, log: LogFn
) -> _Decoded:
    """Return the cached arrays for ``key`` or run ``decode`` and cache its result."""
    path = _cache_file(cache_dir, kind, key)
    start = time.perf_counter()
    d = _load_cache(path, log)
    if d is not None:
        n = len(d.train_images) + (0 if d.test_images is None else len(d.test_images))
        log(f"loaded {n} decoded images of {source} from the cache {path} in {time.perf_counter() - start:.1f} s")
    else:
        d = decode()
        n = len(d.train_images) + (0 if d.test_images is None else len(d.test_images))
        saved = _save_cache(path, d, log)
        log(
            f"decoded {n} images from {source} in {time.perf_counter() - start:.1f} s"
            + (f" (cached at {path})" if saved else "")
        )
    if strict and d.skipped:
        raise unreadable_error(*d.skipped[0])
    report_skipped(d.skipped, log)
    conversions = describe_conversions(d.converted, "grey (L)" if d.train_images.shape[1] == 1 else "RGB")
    if conversions:
        log(f"{conversions} while decoding {source}")
    return d


def _stat_key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def _listing_key(listing: ImageTreeListing) -> str:
    """Hash of every listed file's path, size and mtime (a changed, added or removed file changes it)."""
    h = hashlib.sha256(str(listing.root).encode())
    for split in (listing.train, listing.test):
        h.update(b"|split|")
        if split is None:
            continue
        for i, f in enumerate(split.files):
            st = os.stat(f)
            label = -1 if split.labels is None else split.labels[i]
            h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}|{label}\n".encode())
    h.update(repr(listing.classes).encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# Decoding many images


class _Decoder:
    """Decodes images one by one, keeping (sort key, name, array, label) and the unreadable ones.

    In strict mode the first unreadable image raises MimkitError naming it.
    """

    def __init__(self, mode: str, strict: bool, size: int | None = None) -> None:
        self.mode = mode
        self.strict = strict
        self.size = size
        self.items: list[tuple[object, str, np.ndarray, object]] = []
        self.skipped: list[tuple[str, str]] = []
        self.converted: Counter[str] = Counter()

    def add(self, name: str, source: bytes | str, label: object = None, sort_key: object = None) -> None:
        try:
            arr, original = decode_image_mode(source, self.mode, self.size)
        except Exception as e:  # PIL raises many types (OSError, ValueError, SyntaxError, DecompressionBombError...)
            if self.strict:
                raise unreadable_error(name, describe_failure(e)) from None
            self.skipped.append((name, describe_failure(e)))
            return
        if original != self.mode:
            self.converted[original] += 1
        self.items.append((len(self.items) if sort_key is None else sort_key, name, arr, label))


def stack_same_size(arrays: list[np.ndarray], names: list[str], where: object, hint: str) -> np.ndarray:
    """Stack ``(H, W, C)`` arrays into uint8 ``(N, C, H, W)``; MimkitError naming two files when sizes differ."""
    first = arrays[0].shape
    for arr, name in zip(arrays, names):
        if arr.shape != first:
            raise MimkitError(
                f"images under {where} differ in size ({names[0]} is {first[1]}x{first[0]}x{first[2]}, {name} is "
                f"{arr.shape[1]}x{arr.shape[0]}x{arr.shape[2]}); an in-memory set needs one size: {hint}"
            )
    return np.ascontiguousarray(np.stack(arrays).transpose(0, 3, 1, 2))


def _assemble(train: _Decoder, test: _Decoder | None, classes: list[str] | None, where: object, hint: str) -> _Decoded:
    """Sort the decoded items, check that all share one size and stack them.

    Labels are taken from the items (ints, or class names mapped through ``classes``); a split
    with any missing label is unlabelled.
    """
    skipped = train.skipped + (test.skipped if test is not None else [])
    train_items = sorted(train.items, key=lambda t: t[0])
    test_items = sorted(test.items, key=lambda t: t[0]) if test is not None else []
    if not train_items:
        if skipped:
            name, reason = skipped[0]
            raise MimkitError(f"none of the {len(skipped)} images under {where} could be read (e.g. {name}: {reason})")
        raise no_images_error(Path(str(where)))
    index = {c: i for i, c in enumerate(classes)} if classes is not None else {}

    def labels(items: list[tuple[object, str, np.ndarray, object]]) -> np.ndarray | None:
        if classes is None or any(t[3] is None for t in items):
            return None
        return np.asarray([index[t[3]] if isinstance(t[3], str) else t[3] for t in items], dtype=np.int64)

    everything = train_items + test_items
    stacked = stack_same_size([t[2] for t in everything], [t[1] for t in everything], where, hint)
    n = len(train_items)
    converted = train.converted + (test.converted if test is not None else Counter())
    return _Decoded(
        train_images=stacked[:n],
        train_labels=labels(train_items),
        test_images=stacked[n:] if test_items else None,
        test_labels=labels(test_items) if test_items else None,
        classes=classes,
        skipped=skipped,
        converted=dict(converted),
    )


def _decode_listing(listing: ImageTreeListing, mode: str, strict: bool, hint: str, size: int | None = None) -> _Decoded:
    decoders: list[_Decoder] = []
    for split in (listing.train, listing.test):
        if split is None:
            continue
        dec = _Decoder(mode, strict, size)
        for i, f in enumerate(split.files):
            dec.add(f, f, None if split.labels is None else split.labels[i])
        decoders.append(dec)
    return _assemble(decoders[0], decoders[1] if len(decoders) > 1 else None, listing.classes, listing.root, hint)


def _to_in_memory(d: _Decoded, mean: tuple[float, ...], std: tuple[float, ...]) -> InMemoryData:
    def split(images: np.ndarray | None, labels: np.ndarray | None) -> ImageSplit | None:
        if images is None:
            return None
        return ImageSplit(torch.from_numpy(images), None if labels is None else torch.from_numpy(labels))

    train = split(d.train_images, d.train_labels)
    assert train is not None
    return InMemoryData(train, split(d.test_images, d.test_labels), d.classes, mean, std)


# ----------------------------------------------------------------------------------------------
# CIFAR-10

_CIFAR_BATCH_RE = re.compile(r"^(data_batch_\d+|test_batch|batches\.meta)$")
_CIFAR_LAYOUTS = (
    "expected the python batches (data_batch_1..5, test_batch, batches.meta; optionally inside "
    "cifar-10-batches-py/), an image tree (train/<class>/<image>, test/<class>/<image>) or a .tar.gz of either"
)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays (the CIFAR batches hold dicts of bytes, lists and arrays)."""

    _ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    }  # fmt: skip

    def find_class(self, module: str, name: str):  # noqa: ANN201
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if module.startswith("numpy.core") and hasattr(np, "_core"):
            module = "numpy._core" + module[len("numpy.core") :]  # numpy 2 moved numpy.core
        return super().find_class(module, name)


def _unpickle(blob: bytes, name: str) -> dict:
    try:
        obj = _NumpyOnlyUnpickler(io.BytesIO(blob), encoding="bytes").load()
    except Exception as e:  # any malformed pickle
        raise MimkitError(f"{name} is not a CIFAR python batch ({describe_failure(e)})") from None
    if not isinstance(obj, dict):
        raise MimkitError(f"{name} is not a CIFAR python batch (holds a {type(obj).__name__}, expected a dict)")
    return obj


def _cifar_batch_arrays(blob: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(N, 3, 32, 32) uint8 images and (N,) int64 labels of one python batch."""
    d = _unpickle(blob, name)
    if b"data" not in d or b"labels" not in d:
        raise MimkitError(f"{name} lacks b'data' or b'labels' (keys: {sorted(d)})")
    data = np.asarray(d[b"data"])
    labels = np.asarray(d[b"labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise MimkitError(
            f"{name}: expected uint8 data (N, 3072) and N labels, got {data.dtype} {data.shape} and {labels.shape}"
        )
    return data.reshape(-1, 3, 32, 32), labels


def _decode_cifar_batches(blobs: dict[str, bytes], where: object) -> _Decoded:
    data_names = sorted((n for n in blobs if n.startswith("data_batch_")), key=lambda n: int(n.rsplit("_", 1)[1]))
    if not data_names:
        raise MimkitError(f"{where} has no data_batch_N file ({_CIFAR_LAYOUTS})")
    parts = [_cifar_batch_arrays(blobs[n], f"{where}/{n}") for n in data_names]
    test = _cifar_batch_arrays(blobs["test_batch"], f"{where}/test_batch") if "test_batch" in blobs else None
    classes = list(CIFAR10_CLASSES)
    if "batches.meta" in blobs:
        meta = _unpickle(blobs["batches.meta"], f"{where}/batches.meta")
        if b"label_names" in meta:
            classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta[b"label_names"]]
    return _Decoded(
        train_images=np.concatenate([p[0] for p in parts]),
        train_labels=np.concatenate([p[1] for p in parts]),
        test_images=None if test is None else test[0],
        test_labels=None if test is None else test[1],
        classes=classes,
        skipped=[],
    )


def _split_and_class(member: str) -> tuple[str, str] | None:
    """("train" | "test", class) of an archive member ``[prefix/]<split>/<class>/.../<image>``."""
    parts = PurePosixPath(member).parts
    for k, part in enumerate(parts[:-2]):
        if part == "train" or part in HELD_OUT_SPLIT_NAMES:
            return ("train" if part == "train" else "test"), parts[k + 1]
    return None


def _decode_cifar_tar(path: Path, strict: bool) -> _Decoded:
    """Read a tar archive once, member by member (no extraction): python batches or an image tree."""
    blobs: dict[str, bytes] = {}
    decoders = {"train": _Decoder("RGB", strict), "test": _Decoder("RGB", strict)}
    try:
        with tarfile.open(path, "r:*") as tf:
            for member in tf:
                if not member.isfile():
                    continue
                base = PurePosixPath(member.name).name
                is_batch = _CIFAR_BATCH_RE.match(base) is not None
                where = _split_and_class(member.name) if is_image_file(base) else None
                if not is_batch and where is None:
                    continue
                f = tf.extractfile(member)
                data = f.read() if f is not None else b""
                if is_batch:
                    blobs[base] = data
                else:
                    split, cls = where  # type: ignore[misc]
                    decoders[split].add(f"{path}:{member.name}", data, label=cls, sort_key=(cls, member.name))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise MimkitError(f"cannot read the archive {path}: {describe_failure(e)}") from None
    train, test = decoders["train"], decoders["test"]
    if any(n.startswith("data_batch_") for n in blobs) and not (train.items or train.skipped):
        return _decode_cifar_batches(blobs, path)
    if not (train.items or train.skipped):
        raise MimkitError(f"{path} holds no CIFAR-10 data ({_CIFAR_LAYOUTS})")
    classes = sorted({t[3] for t in train.items})  # type: ignore[type-var]
    unknown = sorted({t[3] for t in test.items} - set(classes))  # type: ignore[operator]
    if unknown:
        raise MimkitError(
            f"{path}: test classes {unknown} do not appear in train (train classes: {', '.join(classes)})"
        )
    has_test = bool(test.items or test.skipped)
    return _assemble(train, test if has_test else None, classes, path, "use the `imagefolder` data source")


def _resolve_cifar_path(path: str | os.PathLike) -> tuple[str, Path]:
    """("tar" | "batches" | "tree", path) for a CIFAR-10 location."""
    p = Path(path).expanduser()
    if not p.exists():
        raise MimkitError(f"cifar10 path {p} does not exist ({_CIFAR_LAYOUTS})")
    if p.is_file():
        if tarfile.is_tarfile(p):
            return "tar", p
        raise MimkitError(f"cifar10 path {p} is a file but not a tar archive ({_CIFAR_LAYOUTS})")
    for d in (p, p / "cifar-10-batches-py"):
        if (d / "data_batch_1").is_file():
            return "batches", d
    if (p / "train").is_dir():
        return "tree", p
    archives = sorted(f for f in p.iterdir() if f.is_file() and f.name.endswith((".tar.gz", ".tgz", ".tar")))
    if len(archives) == 1:
        return "tar", archives[0]
    raise MimkitError(f"cifar10 path {p} is not a CIFAR-10 folder ({_CIFAR_LAYOUTS})")


def load_cifar10(
    path: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None, strict: bool = False, log: LogFn = _no_log
) -> InMemoryData:
    """CIFAR-10 from python batches, an image tree or a tar of either: ``(N, 3, 32, 32)`` uint8.

    Image trees and archives are decoded once and cached (see module docstring); python-batch
    folders are read directly (a fraction of a second).
    """
    kind, p = _resolve_cifar_path(path)
    if kind == "batches":
        blobs = {f.name: f.read_bytes() for f in sorted(p.iterdir()) if f.is_file() and _CIFAR_BATCH_RE.match(f.name)}
        d = _decode_cifar_batches(blobs, p)
    elif kind == "tar":
        d = _cached_decode(
            "cifar10",
            _stat_key(p),
            p,
            lambda: _decode_cifar_tar(p, strict),
            cache_dir=cache_dir,
            strict=strict,
            log=log,
        )
    else:
        listing = list_image_tree(p)
        if listing.classes is None:
            raise MimkitError(f"cifar10 folder {listing.root} has images outside class folders ({_CIFAR_LAYOUTS})")
        hint = "use the `imagefolder` data source"
        d = _cached_decode(
            "cifar10", _listing_key(listing), listing.root, lambda: _decode_listing(listing, "RGB", strict, hint),
            cache_dir=cache_dir, strict=strict, log=log,
        )  # fmt: skip
    if d.train_images.shape[1] != 3:
        raise MimkitError(f"cifar10 data at {p} is not RGB (got {d.train_images.shape[1]} channels)")
    return _to_in_memory(d, CIFAR10_MEAN, CIFAR10_STD)


# ----------------------------------------------------------------------------------------------
# Image folders held in memory


def channels_mode(channels: int) -> str:
    """PIL mode for a channel count: 1 -> "L", 3 -> "RGB"."""
    if channels not in (1, 3):
        raise MimkitError(f"data.channels must be 1 (grey) or 3 (RGB), got {channels!r}")
    return "L" if channels == 1 else "RGB"


def default_mean_std(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """ImageNet statistics for image folders (their grey average for 1 channel)."""
    return (IMAGENET_GREY_MEAN, IMAGENET_GREY_STD) if channels == 1 else (IMAGENET_MEAN, IMAGENET_STD)


def load_imagefolder(
    path: str | os.PathLike,
    *,
    channels: int = 3,
    cache_dir: str | os.PathLike | None = None,
    strict: bool = False,
    log: LogFn = _no_log,
    size: int | None = None,
) -> InMemoryData:
    """Decode a whole image-folder tree into memory (all images must share one size, or ``size`` resizes them
    on decode: centre square, ``size`` x ``size``); cached."""
    mode = channels_mode(channels)
    listing = list_image_tree(path)
    hint = RESIZE_HINT
    key = _imagefolder_key(listing, mode, size)
    d = _cached_decode(
        "imagefolder", key, listing.root,
        lambda: _decode_listing(listing, mode, strict, hint, size), cache_dir=cache_dir, strict=strict, log=log,
    )  # fmt: skip
    mean, std = default_mean_std(channels)
    return _to_in_memory(d, mean, std)


# ----------------------------------------------------------------------------------------------
# Entry point


RESIZE_HINT = ("--set data.in_memory=false reads them from disk, or --set data.in_memory_resize=true resizes them to "
               "model.img_size while decoding")
IN_MEMORY_BUDGET_GB = 2.0  #: default of data.in_memory_budget_gb


def _imagefolder_key(listing: ImageTreeListing, mode: str, size: int | None) -> str:
    return f"{mode}|{_listing_key(listing)}" if size is None else f"{mode}|{size}|{_listing_key(listing)}"


def folder_memory_plan(listing: ImageTreeListing, channels: int, budget_gb: float,
                       size: int | None = None, cache_dir: str | os.PathLike | None = None) -> tuple[bool, str]:
    """``data.in_memory=auto`` for an image folder: (hold it in memory?, why, for the log).

    In memory when its decoded uint8 size (images x channels x H x W, both splits) fits ``budget_gb`` and every
    image has one size (read from the file headers, no decoding), or when ``size`` (resize on decode) is given and
    ``images x channels x size^2`` fits. Otherwise the folder is read from disk every epoch. A folder already in
    the decode cache (``cache_dir``) is not scanned again (a stat per file instead of a header read).
    """
    files = listing.train.files + (listing.test.files if listing.test is not None else [])
    budget = budget_gb * 1e9
    cached = _cache_file(cache_dir, "imagefolder", _imagefolder_key(listing, channels_mode(channels), size))
    if cached.is_file() and cached.stat().st_size <= budget + 2**20:
        return True, f"{len(files)} images already decoded in the cache {cached}, within data.in_memory_budget_gb={budget_gb:g}"
    if size is not None:
        total = len(files) * channels * size * size
        if total <= budget:
            return True, (f"{len(files)} images resized to {size}x{size} on decode = {total / 1e6:.0f} MB, within "
                          f"data.in_memory_budget_gb={budget_gb:g}")
        return False, (f"{len(files)} images at {size}x{size} = {total / 1e9:.1f} GB decoded, over "
                       f"data.in_memory_budget_gb={budget_gb:g}: read from disk every epoch")
    first: tuple[str, tuple[int, int]] | None = None
    for f in files:
        try:
            with Image.open(f) as im:
                wh = im.size
        except Exception:  # unreadable: decoding reports it
            continue
        if first is None:
            first = (f, wh)
            total = len(files) * channels * wh[0] * wh[1]
            if total > budget:
                return False, (f"about {total / 1e9:.1f} GB decoded ({len(files)} images like {Path(f).name}, "
                               f"{wh[0]}x{wh[1]}), over data.in_memory_budget_gb={budget_gb:g}: read from disk "
                               "every epoch")
        elif wh != first[1]:
            return False, (f"images differ in size ({Path(first[0]).name} is {first[1][0]}x{first[1][1]}, "
                           f"{Path(f).name} is {wh[0]}x{wh[1]}): read from disk every epoch; --set "
                           "data.in_memory_resize=true holds them in memory at model.img_size")
    if first is None:
        return True, "no readable image header"
    total = len(files) * channels * first[1][0] * first[1][1]
    return True, (f"{len(files)} images of {first[1][0]}x{first[1][1]} = {total / 1e6:.0f} MB decoded, within "
                  f"data.in_memory_budget_gb={budget_gb:g}: decoded once (cached) and held in memory")


def canonical_source_name(name: str) -> str:
    """Map a user-given source name to one of SOURCE_NAMES (case, '-' and '_' are ignored)."""

    def squash(s: str) -> str:
        return re.sub(r"[-_\s]", "", s.lower())

    for accepted in SOURCE_NAMES:
        if isinstance(name, str) and squash(name) == squash(accepted):
            return accepted
    raise MimkitError(f"unknown data source {name!r} (accepted: {', '.join(SOURCE_NAMES)})")


def convert_channels(data: InMemoryData, channels: int) -> InMemoryData:
    """Return ``data`` with ``channels`` channels: grey -> RGB repeats the channel (mean/std repeated);
    RGB -> grey uses PIL's luma weights (299, 587, 114)/1000 and recomputes mean/std on train."""
    channels_mode(channels)
    if data.in_chans == channels:
        return data
    if channels == 3:

        def conv(x: torch.Tensor) -> torch.Tensor:
            return x.expand(-1, 3, -1, -1).contiguous()

        mean, std = data.mean * 3, data.std * 3
    else:
        weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)

        def conv(x: torch.Tensor) -> torch.Tensor:
            chunks = [
                (c.float() * weights).sum(1, keepdim=True).round_().clamp_(0, 255).to(torch.uint8)
                for c in x.split(4096)
            ]
            return torch.cat(chunks)

        mean, std = (0.0,), (1.0,)
    train = ImageSplit(conv(data.train.images), data.train.labels)
    test = None if data.test is None else ImageSplit(conv(data.test.images), data.test.labels)
    if channels == 1:
        mean, std = channel_stats(train.images)
    return replace(data, train=train, test=test, mean=mean, std=std)


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] units of uint8 ``(N, C, H, W)`` images."""
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    total_sq = torch.zeros_like(total)
    for chunk in images.split(4096):
        x = chunk.to(torch.float64).div_(255).transpose(0, 1).reshape(images.shape[1], -1)
        total += x.sum(1)
        total_sq += (x * x).sum(1)
    count = images.numel() / images.shape[1]
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(0).sqrt()
    return tuple(round(float(m), 4) for m in mean), tuple(round(float(s), 4) for s in std)


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

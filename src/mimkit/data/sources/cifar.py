"""CIFAR-10 in memory from its python batches, an image tree (``train/<class>/<image>``) or a tar of either
(read member by member, never extracted). Trees and archives are decoded once and cached
(:mod:`mimkit.data.sources.cache`)."""

from __future__ import annotations

import io
import os
import pickle
import re
import tarfile
from pathlib import Path, PurePosixPath

import numpy as np

from mimkit.data.sources.cache import _cached_decode, _stat_key
from mimkit.data.sources.common import (
    HELD_OUT_SPLIT_NAMES,
    InMemoryData,
    LogFn,
    _no_log,
    describe_failure,
    is_image_file,
)
from mimkit.data.sources.decode import _assemble, _Decoded, _Decoder, _to_in_memory
from mimkit.data.sources.folder import _decode_listing, _listing_key, list_image_tree
from mimkit.errors import MimkitError

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)

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

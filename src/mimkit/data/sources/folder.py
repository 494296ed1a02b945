"""Image-folder trees: listing them (``root/<class>/<image>``, unlabelled ``root/<image>``, ``root/train`` next
to ``root/val`` or ``root/test``), decoding a listing, the ``imagefolder`` in-memory loader and the
``data.in_memory=auto`` memory plan."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from mimkit.data.sources.cache import _cache_file, _cached_decode
from mimkit.data.sources.common import (
    HELD_OUT_SPLIT_NAMES,
    InMemoryData,
    LogFn,
    _no_log,
    channels_mode,
    default_mean_std,
    is_image_file,
    no_images_error,
)
from mimkit.data.sources.decode import _assemble, _Decoded, _Decoder, _to_in_memory
from mimkit.errors import MimkitError

RESIZE_HINT = ("--set data.in_memory=false reads them from disk, or --set data.in_memory_resize=true resizes them to "
               "model.img_size while decoding")
IN_MEMORY_BUDGET_GB = 2.0  #: default of data.in_memory_budget_gb


# ----------------------------------------------------------------------------------------------
# Listing


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


# ----------------------------------------------------------------------------------------------
# Image folders held in memory


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

"""Write WebDataset tar shards (``KEY.jpg|png|webp`` + ``KEY.cls``) from an image folder or a ``datasets`` folder.

The encoded bytes are copied as they are (no re-encoding, except images stored only as decoded pixels,
written as PNG). Samples are shuffled once (``seed``) before being dealt into shards, so that every shard
holds a mix of classes; each split folder gets a ``shardindex.json`` (the ``wids`` index format: shard
names and sample counts, plus ``classes``) that ``data.name=webdataset`` reads instead of scanning.
"""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from mimkit.data.sources import LogFn, list_image_tree
from mimkit.data.webdataset import INDEX_FILE, require_webdataset
from mimkit.errors import MimkitError

PIL_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


def _encoded(data: bytes) -> tuple[bytes, str]:
    """(bytes, extension) of an encoded image; formats other than JPEG/PNG/WebP are re-encoded as PNG."""
    with Image.open(io.BytesIO(data)) as im:
        fmt = im.format
        if fmt in PIL_EXT:
            return data, PIL_EXT[fmt]
        buf = io.BytesIO()
        im.save(buf, format="PNG")
    return buf.getvalue(), "png"


def _folder_splits(root: str) -> tuple[dict[str, tuple[int, Callable[[int], tuple[bytes, int]]]], list[str] | None]:
    listing = list_image_tree(root)
    splits = {}
    for split, files in (("train", listing.train), ("test", listing.test)):
        if files is None:
            continue

        def read(i: int, files=files) -> tuple[bytes, int]:
            return Path(files.files[i]).read_bytes(), -1 if files.labels is None else files.labels[i]

        splits[split] = (len(files), read)
    return splits, listing.classes


def _hf_splits(path: str, image_key: str | None, label_key: str | None, log: LogFn):
    from mimkit.data.hf import IMAGE_KEYS, LABEL_KEYS, _labels, _pick_key, open_dataset, require_datasets

    datasets = require_datasets()
    found = open_dataset(path, None, log)
    if "train" not in found:
        raise MimkitError(f"Hugging Face dataset {path} has no 'train' split (splits: {', '.join(found)})")
    columns = list(found["train"].column_names)
    ikey = _pick_key(image_key, IMAGE_KEYS, columns, "image", f"the train split of {path}", required=True)
    lkey = _pick_key(label_key, LABEL_KEYS, columns, "label", f"the train split of {path}", required=False)
    splits, classes = {}, None
    for split, name in (("train", "train"), ("test", next((s for s in ("test", "validation", "val") if s in found), None))):
        if name is None:
            continue
        ds = found[name]
        labels = None
        if lkey is not None:
            labels, classes = _labels(ds, lkey, classes)
        if isinstance(ds.features[ikey], datasets.Image):
            ds = ds.cast_column(ikey, datasets.Image(decode=False))

        def read(i: int, ds=ds, labels=labels) -> tuple[bytes, int]:
            cell = ds[i][ikey]
            data = (cell.get("bytes") or Path(cell["path"]).read_bytes()) if isinstance(cell, dict) else cell
            return bytes(data), -1 if labels is None else labels[i]

        splits[split] = (len(ds), read)
    return splits, classes


def write_shards(source: str | os.PathLike, out: str | os.PathLike, *, shard_size: int = 1000, seed: int = 0,
                 image_key: str | None = None, label_key: str | None = None,
                 log: LogFn | None = None) -> dict[str, Any]:
    """Write ``out/train/shard-NNNNNN.tar`` (and ``out/test/`` when the source has a held-out split).

    Returns ``{split: {"shards": n, "samples": n}}``."""
    from mimkit.data.hf import _is_saved_folder

    log = log or (lambda _: None)
    wds = require_webdataset()
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise MimkitError(f"--shard-size must be a positive integer, got {shard_size!r}")
    src, out = Path(source).expanduser(), Path(out).expanduser()
    if not src.exists():
        raise MimkitError(f"source {src} does not exist (expected an image folder or a datasets folder)")
    if out.exists() and any(out.glob("*/*.tar")):
        raise MimkitError(f"{out} already holds shards; choose another --out (nothing was written)")
    if _is_saved_folder(src) or (src.is_dir() and any(src.rglob("*.parquet"))):
        splits, classes = _hf_splits(str(src), image_key, label_key, log)
    else:
        splits, classes = _folder_splits(str(src))
    report = {}
    for split, (n, read) in splits.items():
        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
        # an integer mtime: webdataset's float default gives every member a PAX header, which doubles the
        # headers Python's tarfile parses when reading (about 25% of the read time of small images)
        with wds.ShardWriter(str(folder / "shard-%06d.tar"), maxcount=shard_size, maxsize=float("inf"), verbose=0,
                             mtime=int(time.time())) as w:
            for k, i in enumerate(order):
                data, label = read(i)
                data, ext = _encoded(data)
                sample = {"__key__": f"{k:09d}", ext: data}
                if label >= 0:
                    sample["cls"] = str(label).encode()
                w.write(sample)
        counts = [min(shard_size, n - s) for s in range(0, n, shard_size)]
        index = {"wids_version": 1, "name": f"{src.name}-{split}",
                 "shardlist": [{"url": f"shard-{j:06d}.tar", "nsamples": c} for j, c in enumerate(counts)],
                 "classes": classes}
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=1) + "\n")
        report[split] = {"shards": len(counts), "samples": n}
        log(f"{split}: {n} samples in {len(counts)} shard(s) -> {folder}/shard-{{000000..{len(counts) - 1:06d}}}.tar")
    return report

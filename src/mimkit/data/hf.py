"""``data.name=hf``: Hugging Face ``datasets`` (Arrow / parquet on disk, or a name ``load_dataset`` resolves).

``data.path`` is, in this order of detection:

- a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (``dataset_dict.json`` or
  ``state.json`` inside): opened with ``datasets.load_from_disk`` (memory-mapped, no copy);
- any other local folder (parquet / arrow / ... files, split names from the file or folder names as
  ``datasets`` infers them: ``train-*.parquet``, ``test/``, ...): ``datasets.load_dataset(folder)``,
  converted once into the Arrow cache under ``data.cache_dir/hf`` (default ``$MIMKIT_CACHE/hf``);
- anything else: a Hub name for ``datasets.load_dataset(name)`` (the only branch that uses the network;
  ``HF_DATASETS_OFFLINE=1`` makes it fail with the library's own message).

Splits: ``train`` for training; ``test`` or else ``validation`` as the held-out split. Columns:
``data.image_key`` (default the first of ``image``, ``img``, ``jpg``, ``png``, ``pixel_values`` present),
``data.label_key`` (default ``label`` or ``labels`` when present; labels are optional for pre-training).
The image column is read undecoded (``Image(decode=False)``) and decoded by PIL in the DataLoader workers,
so decoding, unreadable-image handling, augmentation and exact resume are those of image folders
(:class:`mimkit.data.folder_module.FolderDataModule`: the same crops for the same (seed, epoch, index)).
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from mimkit.data.folder_module import FolderDataModule, _FolderDataset
from mimkit.data.module import DataModule, _subset_order
from mimkit.data.sources import FileList, ImageTreeListing, LogFn, default_cache_dir
from mimkit.errors import MimkitError

IMAGE_KEYS = ("image", "img", "jpg", "png", "pixel_values")
LABEL_KEYS = ("label", "labels")
HELD_OUT = ("test", "validation", "val")


def require_datasets():
    """The ``datasets`` module, or one line naming the extra that installs it."""
    try:
        import datasets
    except ImportError:
        raise MimkitError("data.name=hf needs the `datasets` package: pip install 'mimkit[hf]'") from None
    return datasets


class RowNames(Sequence):
    """Lazy names ``SOURCE[split][i]`` of a split's rows (used in messages about unreadable images)."""

    def __init__(self, prefix: str, rows: Sequence[int] | range) -> None:
        self.prefix, self.rows = prefix, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):  # noqa: ANN001, ANN204
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return f"{self.prefix}[{self.rows[i]}]"


class HFFileList(FileList):
    """A split of a ``datasets.Dataset``: ``files`` are row names, ``rows`` the Arrow row of each item."""

    def __init__(self, dataset: Any, image_key: str, prefix: str, labels: list[int] | None,
                 rows: Sequence[int] | None = None) -> None:
        self.dataset, self.image_key = dataset, image_key
        self.rows = range(len(dataset)) if rows is None else rows
        super().__init__(RowNames(prefix, self.rows), labels)  # type: ignore[arg-type]

    def subset(self, keep: list[int]) -> HFFileList:
        labels = None if self.labels is None else [self.labels[i] for i in keep]
        return HFFileList(self.dataset, self.image_key, self.files.prefix, labels, [self.rows[i] for i in keep])


class _HFImages(_FolderDataset):
    """Decodes the undecoded image cell (``{"bytes", "path"}`` or raw bytes) of an Arrow row with PIL."""

    def __init__(self, files: HFFileList, *args: Any) -> None:
        super().__init__(files, *args)
        self.dataset, self.image_key, self.rows = files.dataset, files.image_key, files.rows

    def open_image(self, index: int) -> Image.Image:
        cell = self.dataset[int(self.rows[index])][self.image_key]
        if isinstance(cell, dict):
            if cell.get("bytes"):
                return Image.open(io.BytesIO(cell["bytes"]))
            if cell.get("path"):
                return Image.open(cell["path"])
            raise ValueError("empty image cell (no bytes, no path)")
        if isinstance(cell, (bytes, bytearray)):
            return Image.open(io.BytesIO(cell))
        if isinstance(cell, Image.Image):
            return cell
        raise ValueError(f"image cell of type {type(cell).__name__} is not an encoded image")


class HFDataModule(FolderDataModule):
    """A ``datasets`` split decoded by DataLoader workers exactly like an image folder."""

    dataset_class = _HFImages

    def describe(self) -> str:
        lazy = "" if self.strict else " (Arrow rows decoded every epoch; unreadable ones skipped when met)"
        return DataModule.describe(self) + lazy


def _is_saved_folder(p: Path) -> bool:
    return p.is_dir() and any((p / f).is_file() for f in ("dataset_dict.json", "state.json", "dataset_info.json"))


def open_dataset(path: str, cache_dir: str | os.PathLike | None, log: LogFn) -> dict[str, Any]:
    """``{split: datasets.Dataset}`` of a saved folder, a local data folder or a Hub name."""
    datasets = require_datasets()
    p = Path(path).expanduser()
    try:
        if _is_saved_folder(p):
            ds = datasets.load_from_disk(str(p))
        elif p.is_dir():
            cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
            ds = datasets.load_dataset(str(p), cache_dir=str(cache / "hf"))
        elif p.exists():
            raise MimkitError(f"data.path {p} is a file; data.name=hf takes a datasets folder (save_to_disk), "
                              "a folder of parquet/arrow files or a dataset name")
        else:
            log(f"{path} is not a local folder: asking datasets.load_dataset({path!r}) (may download)")
            ds = datasets.load_dataset(path)
    except MimkitError:
        raise
    except Exception as e:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ValueError, ...)
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise MimkitError(f"cannot open Hugging Face dataset {path!r}: {first}") from None
    if isinstance(ds, datasets.Dataset):
        return {"train": ds}
    return dict(ds)


def _pick_key(given: str | None, candidates: tuple[str, ...], columns: list[str], what: str, where: str,
              required: bool) -> str | None:
    if given is not None:
        if given not in columns:
            raise MimkitError(f"{what} column {given!r} is not in {where} (columns: {', '.join(columns)})")
        return given
    found = next((c for c in candidates if c in columns), None)
    if found is None and required:
        raise MimkitError(f"no image column in {where} (columns: {', '.join(columns)}); "
                          f"name it with --set data.image_key=COLUMN (default looks for {', '.join(candidates)})")
    return found


def _labels(ds: Any, key: str, classes: list[str] | None) -> tuple[list[int], list[str]]:
    """Integer labels of a split and the class names (ClassLabel names, else sorted values)."""
    feature = ds.features[key]
    values = ds.data.column(key).to_pylist()
    if classes is None:
        names = getattr(feature, "names", None)
        if names:
            classes = list(names)
        elif all(isinstance(v, int) for v in values):
            classes = [str(i) for i in range(max(values) + 1)] if values else []
        else:
            classes = sorted({str(v) for v in values})
    if all(isinstance(v, int) for v in values):
        bad = [v for v in values if not 0 <= v < len(classes)]
        if bad:
            raise MimkitError(f"label {bad[0]!r} in column {key!r} is outside the {len(classes)} train classes")
        return values, classes
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({str(v) for v in values} - set(index))
    if unknown:
        raise MimkitError(f"labels {unknown[:5]} in column {key!r} do not appear in train (classes: {classes[:10]})")
    return [index[str(v)] for v in values], classes


def build_hf_datamodule(path: str | os.PathLike | None, img_size: int, *, cache_dir=None, strict: bool = False,
                        in_memory: bool | str = "auto", num_workers: int | None = None, mean=None, std=None,
                        channels: int = 3, log: LogFn | None = None, crop_scale=(0.2, 1.0), hflip_p: float = 0.5,
                        max_train: int | None = None, max_test: int | None = None, subset_seed: int = 0,
                        image_key: str | None = None, label_key: str | None = None) -> HFDataModule:
    """The :class:`HFDataModule` of ``path`` (see the module docstring)."""
    log = log or (lambda _: None)
    if path is None or str(path).strip() == "":
        raise MimkitError("data source 'hf' needs data.path: a datasets folder, a parquet folder or a dataset name")
    if in_memory is True:
        raise MimkitError("data.name=hf is decoded by DataLoader workers; data.in_memory accepts auto or false here")
    datasets = require_datasets()
    splits = open_dataset(str(path), cache_dir, log)
    if "train" not in splits:
        raise MimkitError(f"Hugging Face dataset {path} has no 'train' split (splits: {', '.join(splits)})")
    held = next((s for s in HELD_OUT if s in splits), None)
    train_ds = splits["train"]
    columns = list(train_ds.column_names)
    where = f"the train split of {path}"
    ikey = _pick_key(image_key, IMAGE_KEYS, columns, "image", where, required=True)
    lkey = _pick_key(label_key, LABEL_KEYS, columns, "label", where, required=False)

    def prepare(ds: Any, split: str, classes: list[str] | None) -> tuple[HFFileList, list[str] | None]:
        missing = [k for k in (ikey, lkey) if k is not None and k not in ds.column_names]
        if missing:
            raise MimkitError(f"the {split} split of {path} lacks column {missing[0]!r} "
                              f"(columns: {', '.join(ds.column_names)})")
        if isinstance(ds.features[ikey], datasets.Image):
            ds = ds.cast_column(ikey, datasets.Image(decode=False))
        ds = ds.select_columns([ikey])  # rows read by workers hold only the encoded image
        labels = None
        if lkey is not None:
            labels, classes = _labels(splits[split], lkey, classes)
        return HFFileList(ds, ikey, f"{path}:{split}", labels), classes

    train, classes = prepare(train_ds, "train", None)
    test = None
    if held is not None:
        test, _ = prepare(splits[held], held, classes)
    train = _subset(train, max_train, subset_seed)
    test = None if test is None else _subset(test, max_test, subset_seed)
    listing = ImageTreeListing(Path(str(path)), train, test, classes if lkey is not None else None)
    return HFDataModule(listing, img_size, name="hf", channels=channels, mean=mean, std=std, strict=strict,
                        num_workers=num_workers, crop_scale=crop_scale, hflip_p=hflip_p, log=log)


def _subset(files: HFFileList, limit: int | None, seed: int) -> HFFileList:
    keep = _subset_order(len(files), limit, seed)  # the same fixed subset rule as the other sources
    return files if keep is None else files.subset(keep.tolist())

"""``data.name=webdataset``: tar shards streamed with the ``webdataset`` package.

``data.path`` is a brace pattern (``/data/shard-{000000..000099}.tar``), a folder of ``.tar`` shards, or a
folder with ``train/`` and ``test/`` (or ``val/``) shard folders (the held-out split, for kNN). Samples are
the members sharing a key: ``data.image_key`` lists the image extensions tried in order (default
``jpg;jpeg;png;webp``), ``data.label_key`` the integer label member (default ``cls`` when present).
Sample counts (and class names) come from ``shardindex.json`` next to the shards (``mimkit shards`` writes
it, in the ``wids`` index format), else from one scan of the tar headers at start-up.

Epoch plan (what exact resume and DDP rely on; all of it is a function of (seed, epoch)):

1. the shard order is ``randperm(num_shards)`` seeded by ``(seed, epoch)``;
2. process ``rank`` of ``W`` takes shards ``order[rank::W]`` (no shard, hence no sample, is read twice in an
   epoch; ranks read disjoint samples); DataLoader worker ``w`` of ``K`` takes every K-th of those;
3. each worker streams its shards in that order through a shuffle buffer of ``SHUFFLE_BUFFER`` samples
   seeded by ``(seed, epoch, rank, w)``; the workers' outputs are interleaved in the DataLoader's fixed
   round-robin order and cut into batches in the main process;
4. every rank yields ``steps_per_epoch`` batches, the same count on every rank: the samples of the
   ``num_shards // W`` smallest shards, divided by the batch size (samples a larger share holds beyond
   that are left for that epoch; equal shards and ``num_shards % W == 0`` lose none);
5. the crop and flip of a sample are drawn from a generator seeded by (seed, epoch, shard, position in
   the shard), whatever the worker count.

So the data order is exact at the granularity of samples for a given (seed, epoch, world size,
``data.num_workers``): a resumed run (same saved config) reads the same batches. Changing the world size
or the worker count changes which shard goes where, hence the order. Resuming inside an epoch (``start``)
reads and drops the batches before ``start``.
"""

from __future__ import annotations

import glob
import io
import json
import os
import random
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mimkit.data.augment import normalize
from mimkit.data.folder_module import transform_image
from mimkit.data.module import DataModule, _check_positive, _check_stats, _resolve_device, mix_seed
from mimkit.data.sources import (LogFn, channels_mode, default_mean_std, describe_failure, report_skipped,
                                 unreadable_error)
from mimkit.errors import MimkitError

DEFAULT_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
DEFAULT_LABEL_KEY = "cls"
INDEX_FILE = "shardindex.json"
SHUFFLE_BUFFER = 1000
CHUNK = 16  # samples a worker sends to the main process at once


def require_webdataset():
    """The ``webdataset`` module, or one line naming the extra that installs it."""
    try:
        import webdataset
    except ImportError:
        raise MimkitError("data.name=webdataset needs the `webdataset` package: pip install 'mimkit[webdataset]'") from None
    return webdataset


# ----------------------------------------------------------------------------------------------
# Shard lists and counts


@dataclass
class ShardSet:
    """The shards of one split: paths (sorted), samples per shard, label per class index or None."""

    urls: list[str]
    counts: list[int]
    classes: list[str] | None

    @property
    def num_samples(self) -> int:
        return sum(self.counts)


def expand_shards(path: str) -> list[str]:
    """Shard paths of a brace pattern or a folder of ``.tar`` files (sorted); MimkitError when none exist."""
    from braceexpand import braceexpand

    p = Path(path).expanduser()
    if p.is_dir():
        found = sorted(str(f) for f in p.iterdir() if f.is_file() and f.name.endswith(".tar"))
        if not found:
            raise MimkitError(f"no .tar shards in the folder {p} (expected shard-000000.tar ... or train/ and test/)")
        return found
    names = [str(Path(n).expanduser()) for pattern in path.split("::") for n in braceexpand(pattern)]
    names = sorted({m for n in names for m in (glob.glob(n) if any(c in n for c in "*?[") else [n])})
    present = [n for n in names if os.path.isfile(n)]
    if not present:
        raise MimkitError(f"the shard pattern {path!r} matches no file (expected e.g. DIR/shard-{{000000..000003}}.tar "
                          "or a folder of .tar shards)")
    missing = [n for n in names if not os.path.isfile(n)]
    if missing:
        raise MimkitError(f"the shard pattern {path!r} names {len(missing)} missing file(s), e.g. {missing[0]}")
    return present


def _key_of(name: str) -> str:
    """The sample key of a member name (webdataset's rule: up to the first dot of the base name)."""
    folder, base = os.path.split(name)
    return os.path.join(folder, base.split(".", 1)[0])


def _read_index(urls: list[str]) -> tuple[list[int], list[str] | None] | None:
    index = Path(urls[0]).parent / INDEX_FILE
    if not index.is_file():
        return None
    try:
        data = json.loads(index.read_text())
        sizes = {os.path.normpath(index.parent / e["url"]): int(e["nsamples"]) for e in data["shardlist"]}
    except (ValueError, KeyError, TypeError) as e:
        raise MimkitError(f"{index} is not a shard index ({describe_failure(e)}); delete it to count by scanning")
    if any(os.path.normpath(u) not in sizes for u in urls):
        return None
    return [sizes[os.path.normpath(u)] for u in urls], data.get("classes")


def scan_shards(urls: list[str], label_key: str | None) -> tuple[list[int], list[int]]:
    """(samples per shard, label values found) from one pass over the tar headers (labels read when small)."""
    counts, labels = [], []
    for url in urls:
        keys = set()
        try:
            with tarfile.open(url, "r:*") as tf:
                for m in tf:
                    if not m.isfile() or os.path.basename(m.name).startswith("__"):
                        continue
                    key = _key_of(m.name)
                    keys.add(key)
                    if label_key and m.name.endswith("." + label_key) and m.size < 64:
                        text = tf.extractfile(m).read().decode(errors="replace").strip()  # type: ignore[union-attr]
                        if text.lstrip("-").isdigit():
                            labels.append(int(text))
        except (tarfile.TarError, OSError, EOFError) as e:
            raise MimkitError(f"cannot read the shard {url}: {describe_failure(e)}") from None
        counts.append(len(keys))
    return counts, labels


def shard_set(path: str, label_key: str | None, log: LogFn) -> ShardSet:
    urls = expand_shards(path)
    indexed = _read_index(urls)
    if indexed is not None:
        counts, classes = indexed
    else:
        counts, labels = scan_shards(urls, label_key)
        classes = [str(i) for i in range(max(labels) + 1)] if labels else None
        log(f"counted {sum(counts)} samples in {len(urls)} shard(s) by scanning (no {INDEX_FILE}; "
            "`mimkit shards` writes one)")
    if sum(counts) == 0:
        raise MimkitError(f"the shards of {path!r} hold no sample")
    return ShardSet(urls, counts, classes)


# ----------------------------------------------------------------------------------------------
# Streaming


def _failure(name: str, reason: str) -> tuple[None, int, str, str]:
    return None, -1, name, reason


class _ShardStream(IterableDataset):
    """One rank's shards for one epoch (or one evaluation pass): decoded, augmented uint8 samples.

    Items: ``(uint8 (C, S, S) or None, label, name, failure reason)`` (never raises for a bad member)."""

    def __init__(self, module: WebDataModule, urls: list[tuple[int, str]], seeds: tuple[int, ...] | None) -> None:
        self.m, self.urls, self.seeds = module, urls, seeds  # urls: (global shard index, path); seeds None = eval

    def __iter__(self) -> Iterator[tuple[Tensor | None, int, str, str]]:
        wds = require_webdataset()
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        mine = self.urls[worker::workers]
        index_of = {url: i for i, url in mine}
        samples = wds.tarfile_to_samples(handler=wds.warn_and_continue)(iter([{"url": u} for _, u in mine]))
        samples = _positions(samples)
        if self.seeds is not None:
            rng = random.Random(mix_seed(*self.seeds, worker))
            samples = wds.shuffle(SHUFFLE_BUFFER, initial=SHUFFLE_BUFFER, rng=rng)(samples)
        for sample, pos in samples:
            yield self.m.decode(sample, index_of.get(sample.get("__url__"), -1), pos, self.seeds)


def _positions(samples: Iterator[dict]) -> Iterator[tuple[dict, int]]:
    """Attach each sample's position in its shard."""
    url, pos = None, 0
    for s in samples:
        pos = pos + 1 if s.get("__url__") == url else 0
        url = s.get("__url__")
        yield s, pos


def _collate(items: list) -> list:
    return items


class WebDataModule(DataModule):
    """Batches streamed from tar shards (see the module docstring for the epoch plan)."""

    def __init__(self, train: ShardSet, test: ShardSet | None, img_size: int, *, channels: int = 3, mean=None,
                 std=None, strict: bool = False, num_workers: int | None = None, crop_scale=(0.2, 1.0),
                 hflip_p: float = 0.5, log: LogFn | None = None, image_keys: Sequence[str] = DEFAULT_IMAGE_KEYS,
                 label_key: str | None = DEFAULT_LABEL_KEY, where: str = "") -> None:
        _check_positive("img_size", img_size)
        self.mode = channels_mode(channels)
        if num_workers is None:
            num_workers = min(8, os.cpu_count() or 1)
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise MimkitError(f"num_workers must be a non-negative integer, got {num_workers!r}")
        default_mean, default_std = default_mean_std(channels)
        self.name, self.where = "webdataset", where
        self.train, self.test = train, test
        self.in_chans, self.img_size = channels, img_size
        self.mean = tuple(float(m) for m in (default_mean if mean is None else mean))
        self.std = tuple(float(s) for s in (default_std if std is None else std))
        _check_stats(self.mean, self.std, channels)
        self.classes = train.classes if label_key else None
        self.num_train = train.num_samples
        self.has_test = test is not None and self.classes is not None
        self.strict, self.num_workers = strict, num_workers
        self.crop_scale, self.hflip_p = tuple(crop_scale), hflip_p
        self.image_keys, self.label_key = tuple(image_keys), label_key
        self.log = log if log is not None else (lambda _: None)
        self.skipped_total = 0  # unreadable samples met so far (all passes)
        self._reported: set[str] = set()

    # -------------------------------------------------------------------------------------- plan
    def steps_per_epoch(self, batch_size: int, world_size: int = 1) -> int:
        """Batches every rank yields per epoch: the samples of the ``num_shards // world_size`` smallest
        shards (what any rank is sure to hold, whatever the epoch's shard order) // ``batch_size``."""
        _check_positive("batch_size", batch_size)
        _check_positive("world_size", world_size)
        shards = len(self.train.urls)
        if shards < world_size:
            raise MimkitError(f"{shards} shard(s) cannot be split across {world_size} processes (a process reads "
                              f"whole shards); write at least {world_size} shards, e.g. with `mimkit shards`")
        sure = sum(sorted(self.train.counts)[: shards // world_size])
        steps = sure // batch_size
        if steps == 0:
            raise MimkitError(f"batch_size {batch_size} exceeds the {sure} samples each of {world_size} process(es) "
                              f"is sure to read from {self.where}; use a batch_size of at most {max(1, sure)}")
        return steps

    def epoch_shards(self, epoch: int, seed: int, rank: int = 0, world_size: int = 1) -> list[tuple[int, str]]:
        """(shard index, path) of the shards ``rank`` reads in ``epoch``, in order."""
        if not 0 <= rank < world_size:
            raise MimkitError(f"rank {rank!r} must be in [0, world_size={world_size})")
        order = torch.randperm(len(self.train.urls), generator=torch.Generator().manual_seed(mix_seed(seed, epoch)))
        return [(i, self.train.urls[i]) for i in order[rank::world_size].tolist()]

    # -------------------------------------------------------------------------------------- decoding
    def decode(self, sample: dict, shard: int, pos: int, seeds: tuple[int, ...] | None):
        """One sample -> ``(uint8 (C, S, S) or None, label, name, reason)``; training crops when ``seeds``."""
        name = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
        key = next((k for k in self.image_keys if k in sample), None)
        if key is None:
            members = ", ".join(sorted(k for k in sample if not k.startswith("__"))) or "none"
            return _failure(name, f"no {';'.join(self.image_keys)} member (members: {members})")
        label = -1
        if self.label_key and self.label_key in sample:
            try:
                label = int(bytes(sample[self.label_key]).decode().strip())
            except ValueError:
                return _failure(name, f"label member .{self.label_key} is not an integer")
        try:
            with Image.open(io.BytesIO(sample[key])) as im:
                img = im.convert(self.mode)
        except Exception as e:  # PIL raises many types for bad bytes
            return _failure(name, describe_failure(e))
        g = None if seeds is None else torch.Generator().manual_seed(mix_seed(seeds[0], seeds[1], shard, pos))
        return transform_image(img, self.img_size, g, self.crop_scale, self.hflip_p), label, name, ""

    def _stream(self, urls: list[tuple[int, str]], seeds, device: torch.device, batch_size: int, what: str,
                limit: int | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        """Normalised batches of ``batch_size`` slots (unreadable samples leave their slot out)."""
        loader = DataLoader(_ShardStream(self, urls, seeds), batch_size=CHUNK, collate_fn=_collate,
                            num_workers=min(self.num_workers, len(urls)), pin_memory=False)
        skipped: list[tuple[str, str]] = []
        pending: list = []
        done = 0

        def emit(slots: list) -> tuple[Tensor, Tensor] | None:
            good = [s for s in slots if s[0] is not None]
            for _, _, name, reason in (s for s in slots if s[0] is None):
                if self.strict:
                    raise unreadable_error(name, reason)
                skipped.append((name, reason))
                self.skipped_total += 1
                if name not in self._reported:
                    self._reported.add(name)
                    self.log(f"skipping unreadable sample {name}: {reason}")
            if not good:
                return None
            x = torch.stack([s[0] for s in good]).to(device, non_blocking=True).to(torch.float32).div_(255)
            y = torch.tensor([s[1] for s in good], dtype=torch.int64)
            return normalize(x, self.mean, self.std), y.to(device)

        for chunk in loader:
            pending.extend(chunk)
            while len(pending) >= batch_size and (limit is None or done < limit):
                out, pending, done = emit(pending[:batch_size]), pending[batch_size:], done + 1
                if out is not None:
                    yield out
            if limit is not None and done >= limit:
                break
        if pending and limit is None:
            out = emit(pending)
            if out is not None:
                yield out
        report_skipped(skipped, self.log, what=f" in {what}")

    # -------------------------------------------------------------------------------------- DataModule
    def train_batches(self, epoch: int, batch_size: int, seed: int, device: torch.device | str, *, rank: int = 0,
                      world_size: int = 1, start: int = 0) -> Iterator[Tensor]:
        """See :meth:`DataModule.train_batches` (``start`` reads and drops the batches before it)."""
        device = _resolve_device(device)
        batches = self._batch_range(batch_size, world_size, start)
        urls = self.epoch_shards(epoch, seed, rank, world_size)
        for b, (x, _) in enumerate(self._stream(urls, (seed, epoch, rank), device, batch_size, f"epoch {epoch}",
                                                limit=batches.stop)):
            if b >= batches.start:
                yield x

    def eval_batches(self, split: str, batch_size: int, device: torch.device | str) -> Iterator[tuple[Tensor, Tensor]]:
        """See :meth:`DataModule.eval_batches` (shards in sorted order, samples in tar order)."""
        _check_positive("batch_size", batch_size)
        split = self._check_split(split)
        shards = self._split(split)
        if self.classes is None:
            raise MimkitError(f"the {split} split of {self.where} has no labels (no .{self.label_key} members)")
        yield from self._stream(list(enumerate(shards.urls)), None, _resolve_device(device), batch_size,
                                f"the {split} split")

    def _split(self, split: str) -> ShardSet:
        if split == "train":
            return self.train
        if self.test is None:
            raise MimkitError(f"{self.where} has no test split (expected test/ or val/ shards next to train/)")
        return self.test

    def sample_images(self, n: int, split: str = "test") -> Tensor:
        """See :meth:`DataModule.sample_images` (read in the main process, first shards first)."""
        shards = self.test if self._check_split(split) == "test" and self.test is not None else self.train
        wds = require_webdataset()
        out: list[Tensor] = []
        samples = wds.tarfile_to_samples(handler=wds.warn_and_continue)(iter([{"url": u} for u in shards.urls]))
        for sample in samples:
            if len(out) >= n:
                break
            image, _, name, reason = self.decode(sample, 0, 0, None)
            if image is None:
                if self.strict:
                    raise unreadable_error(name, reason)
                continue
            out.append(image)
        if not out:
            return torch.empty(0, self.in_chans, self.img_size, self.img_size)
        return normalize(torch.stack(out).to(torch.float32).div_(255), self.mean, self.std)


# ----------------------------------------------------------------------------------------------
# Factory


def _split_paths(path: str) -> tuple[str, str | None]:
    p = Path(path).expanduser()
    if p.is_dir() and (p / "train").is_dir():
        held = next((p / n for n in ("test", "val") if (p / n).is_dir()), None)
        return str(p / "train"), None if held is None else str(held)
    return path, None


def _check_first_sample(shards: ShardSet, image_keys: Sequence[str]) -> None:
    """A missing image member is a user error when the first sample already lacks it (wrong data.image_key)."""
    wds = require_webdataset()
    for sample in wds.tarfile_to_samples(handler=wds.warn_and_continue)(iter([{"url": shards.urls[0]}])):
        members = sorted(k for k in sample if not k.startswith("__"))
        if not any(k in sample for k in image_keys):
            raise MimkitError(f"no image member {';'.join(image_keys)} in sample {sample.get('__key__')!r} of "
                              f"{shards.urls[0]} (members: {', '.join(members)}); choose one with --set data.image_key=EXT")
        return


def build_webdataset_datamodule(path: str | os.PathLike | None, img_size: int, *, cache_dir=None, strict: bool = False,
                                in_memory: bool | str = "auto", num_workers: int | None = None, mean=None, std=None,
                                channels: int = 3, log: LogFn | None = None, crop_scale=(0.2, 1.0),
                                hflip_p: float = 0.5, max_train: int | None = None, max_test: int | None = None,
                                subset_seed: int = 0, image_key: str | None = None,
                                label_key: str | None = None) -> WebDataModule:
    """The :class:`WebDataModule` of ``path`` (see the module docstring)."""
    log = log or (lambda _: None)
    require_webdataset()
    if path is None or str(path).strip() == "":
        raise MimkitError("data source 'webdataset' needs data.path: a shard pattern or a folder of .tar shards")
    if in_memory is True:
        raise MimkitError("data.name=webdataset is streamed; data.in_memory accepts auto or false here")
    if max_train is not None or max_test is not None:
        raise MimkitError("data.max_train / data.max_test are not available for webdataset (whole shards are "
                          "streamed); point data.path at fewer shards instead")
    image_keys = tuple(k.strip().lstrip(".") for k in (image_key or ";".join(DEFAULT_IMAGE_KEYS)).split(";") if k.strip())
    lkey = (label_key or DEFAULT_LABEL_KEY).lstrip(".")
    train_path, test_path = _split_paths(str(path))
    train = shard_set(train_path, lkey, log)
    _check_first_sample(train, image_keys)
    test = None if test_path is None else shard_set(test_path, lkey, log)
    if train.classes is None:
        if label_key is not None:
            raise MimkitError(f"no .{lkey} label member found in the shards of {path} (data.label_key={label_key!r})")
        lkey = None
    elif test is not None:
        test.classes = train.classes
    return WebDataModule(train, test, img_size, channels=channels, mean=mean, std=std, strict=strict,
                         num_workers=num_workers, crop_scale=crop_scale, hflip_p=hflip_p, log=log,
                         image_keys=image_keys, label_key=lkey, where=str(path))

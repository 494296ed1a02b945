"""Small real data sets made from the shared CIFAR-10 test images (tests of data.name=hf / webdataset).

Built once per test session into a temporary folder; tests skip when ../shared/data is absent.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

CIFAR_TAR = "cifar10/cifar10-jpeg.tar.gz"


def cifar_test_jpegs(shared: Path, per_class: int) -> list[tuple[str, str, bytes]]:
    """The first ``per_class`` JPEGs of each class of CIFAR-10's test split: (class, member name, bytes),
    sorted by (class, name)."""
    src = shared / CIFAR_TAR
    if not src.is_file():
        pytest.skip(f"shared CIFAR-10 archive {src} not present")
    found: dict[str, list[tuple[str, bytes]]] = {}
    with tarfile.open(src) as tf:
        for m in tf:
            parts = m.name.split("/")
            if not m.isfile() or len(parts) < 3 or parts[-3] != "test":
                continue
            items = found.setdefault(parts[-2], [])
            if len(items) < per_class:
                items.append((m.name, tf.extractfile(m).read()))  # type: ignore[union-attr]
            if len(found) == 10 and all(len(v) >= per_class for v in found.values()):
                break
    return [(c, n, b) for c in sorted(found) for n, b in sorted(found[c])]


def write_hf_folder(out: Path, items: list[tuple[str, str, bytes]], n_test_per_class: int) -> Path:
    """A ``DatasetDict`` (train / test, ``image`` + ClassLabel ``label``) saved with ``save_to_disk``."""
    datasets = pytest.importorskip("datasets")
    classes = sorted({c for c, _, _ in items})
    split: dict[str, dict[str, list]] = {"train": {"image": [], "label": []}, "test": {"image": [], "label": []}}
    seen: dict[str, int] = {}
    for c, _, data in items:
        seen[c] = seen.get(c, 0) + 1
        part = split["test" if seen[c] <= n_test_per_class else "train"]
        part["image"].append({"bytes": data, "path": None})
        part["label"].append(classes.index(c))
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=classes)})
    dd = datasets.DatasetDict({k: datasets.Dataset.from_dict(v, features=features) for k, v in split.items()})
    dd.save_to_disk(str(out))
    return out


def fingerprints(batches) -> list[float]:
    """One number per image of a stream of batches (its pixel sum): identifies a sample when crops are off."""
    return [round(float(x.double().sum()), 3) for b in batches for x in b]


def ddp_shard_reader(rank: int, world: int, path: str, init: str, out: str) -> None:
    """One process of a gloo group: read this rank's share of webdataset epoch 0 (full-image crops) and gather
    every rank's sample fingerprints into ``out`` (JSON) on rank 0."""
    import json

    import torch.distributed as dist

    from mimkit.data import build_datamodule

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    dm = build_datamodule("webdataset", path, 32, num_workers=0, crop_scale=(1.0, 1.0), hflip_p=0.0)
    mine = fingerprints(dm.train_batches(0, 20, 0, "cpu", rank=rank, world_size=world))
    gathered: list = [None] * world
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        Path(out).write_text(json.dumps({"steps": dm.steps_per_epoch(20, world), "ranks": gathered}))
    dist.destroy_process_group()

"""Throughput of the data sources on the same images: in memory, image folder, Hugging Face datasets, WebDataset.

Takes N CIFAR-10 test JPEGs (N/10 per class) from the CIFAR-10 image-tree archive, writes them as an image
folder, a ``datasets`` folder (``save_to_disk``) and WebDataset shards (``mimkit shards``), then times one
training epoch of ``train_batches`` (random resized crop + flip, normalised float batches) for each source,
after a first (warm-up) epoch, plus the set-up time (listing, decoding into memory, opening Arrow files,
counting shards). Prints a Markdown table with images/s (wall clock) and images per CPU-second of this
process (with ``--workers 0`` all the work is in it; the figure that stays put when the core is shared).

    taskset -c 1 env OMP_NUM_THREADS=1 python benchmarks/data_sources.py --archive ../shared/data/cifar10/cifar10-jpeg.tar.gz
"""

from __future__ import annotations

import argparse
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

import torch


def extract(archive: Path, out: Path, per_class: int) -> int:
    """``out/train/<class>/<name>.jpg`` from the first ``per_class`` test JPEGs of each class."""
    counts: dict[str, int] = {}
    with tarfile.open(archive) as tf:
        for m in tf:
            parts = m.name.split("/")
            if not m.isfile() or len(parts) < 3 or parts[-3] != "test" or counts.get(parts[-2], 0) >= per_class:
                continue
            counts[parts[-2]] = counts.get(parts[-2], 0) + 1
            dest = out / "train" / parts[-2] / parts[-1]
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(tf.extractfile(m).read())  # type: ignore[union-attr]
            if len(counts) == 10 and all(v >= per_class for v in counts.values()):
                break
    return sum(counts.values())


def write_hf(folder: Path, out: Path) -> None:
    import datasets

    from mimkit.data.sources import list_image_tree

    listing = list_image_tree(folder)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=listing.classes)})
    rows = {"image": [{"bytes": Path(f).read_bytes(), "path": None} for f in listing.train.files],
            "label": listing.train.labels}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows, features=features)}).save_to_disk(str(out))


def time_source(name: str, path: Path, img_size: int, batch: int, **kw) -> dict:
    from mimkit.data import build_datamodule

    t0 = time.perf_counter()
    dm = build_datamodule(name, str(path), img_size, **kw)
    setup = time.perf_counter() - t0
    for _ in dm.train_batches(0, batch, 0, "cpu"):  # warm-up epoch (file cache, workers, first decode)
        pass
    t0, c0, n = time.perf_counter(), time.process_time(), 0
    for x in dm.train_batches(1, batch, 0, "cpu"):
        n += x.shape[0]
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"setup_s": setup, "imgs_per_s": n / wall, "imgs_per_cpu_s": n / cpu, "images": n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archive", default=str(Path(__file__).resolve().parents[2] / "shared/data/cifar10/cifar10-jpeg.tar.gz"))
    ap.add_argument("--images", type=int, default=2000, help="images (a tenth per class)")
    ap.add_argument("--sizes", default="32,224", help="output image sizes to time")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers of the streamed sources")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from mimkit.data.shards import write_shards

    tmp = Path(tempfile.mkdtemp(prefix="mimkit-data-bench-"))
    try:
        n = extract(Path(args.archive), tmp / "folder", args.images // 10)
        write_hf(tmp / "folder", tmp / "hf")
        write_shards(tmp / "folder", tmp / "shards", shard_size=max(1, n // 8))
        rows = []
        for size in (int(s) for s in args.sizes.split(",")):
            common = dict(num_workers=args.workers, cache_dir=str(tmp / "cache"))
            cases = [
                ("in memory (imagefolder, in_memory=true)", "imagefolder", tmp / "folder", dict(in_memory=True)),
                ("image folder (in_memory=false)", "imagefolder", tmp / "folder", dict(in_memory=False)),
                ("hf (save_to_disk folder)", "hf", tmp / "hf", {}),
                ("webdataset (8 shards)", "webdataset", tmp / "shards", {}),
            ]
            for label, name, path, kw in cases:
                r = time_source(name, path, size, args.batch, **common, **kw)
                rows.append((size, label, r))
                print(f"{size:4d} px  {label:42s} setup {r['setup_s']:6.2f} s  {r['imgs_per_s']:8.0f} images/s  "
                      f"{r['imgs_per_cpu_s']:8.0f} images/CPU-s", flush=True)
        print(f"\n{n} CIFAR-10 test JPEGs (32x32), batch {args.batch}, {args.workers} DataLoader workers, "
              f"torch threads 1, one training epoch after a warm-up epoch\n")
        print("| output size | source | set-up (s) | images/s (wall) | images per CPU-second |\n|---|---|---|---|---|")
        for size, label, r in rows:
            print(f"| {size} px | {label} | {r['setup_s']:.2f} | {r['imgs_per_s']:.0f} | {r['imgs_per_cpu_s']:.0f} |")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

"""data.name=hf and data.name=webdataset on real CIFAR-10 test images (a datasets folder and shards made here)."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from conftest import SHARED_DATA
from helpers import sets
from mimkit.cli import main
from mimkit.data import build_datamodule
from mimkit.errors import MimkitError
from realdata import cifar_test_jpegs, ddp_shard_reader, fingerprints, write_hf_folder

pytest.importorskip("datasets")
pytest.importorskip("webdataset")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

PER_CLASS, TEST_PER_CLASS = 30, 5  # 250 train + 50 test images


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> dict[str, Path]:
    """The same CIFAR-10 images as an image folder, a datasets folder and WebDataset shards (`mimkit shards`)."""
    items = cifar_test_jpegs(SHARED_DATA, PER_CLASS)
    root = tmp_path_factory.mktemp("real")
    seen: Counter = Counter()
    for c, name, data in items:
        seen[c] += 1
        f = root / "folder" / ("test" if seen[c] <= TEST_PER_CLASS else "train") / c / Path(name).name
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(data)
    write_hf_folder(root / "hf", items, TEST_PER_CLASS)
    assert main(["shards", "--source", str(root / "hf"), "--out", str(root / "shards"), "--shard-size", "50"]) == 0
    return {"folder": root / "folder", "hf": root / "hf", "shards": root / "shards"}


def test_hf_reads_the_same_pixels_labels_and_crops_as_the_image_folder(real):
    kw = dict(num_workers=0)
    hf, folder = build_datamodule("hf", real["hf"], 32, **kw), build_datamodule("imagefolder", real["folder"], 32, in_memory=False, **kw)
    assert hf.describe().startswith("hf: 250 train images, 3x32x32, 10 classes, labelled test split")
    assert hf.classes == folder.classes and len(hf.classes) == 10 and hf.num_train == 250
    for (xa, ya), (xb, yb) in zip(hf.eval_batches("test", 20, "cpu"), folder.eval_batches("test", 20, "cpu"), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # the same (seed, epoch) gives the same order and crops: training batches are identical
    for a, b in zip(hf.train_batches(3, 50, 7, "cpu"), folder.train_batches(3, 50, 7, "cpu"), strict=True):
        assert torch.equal(a, b)
    hf_sub = build_datamodule("hf", real["hf"], 32, max_train=40, **kw)
    assert hf_sub.num_train == 40


def test_webdataset_epoch_reads_every_sample_once_in_a_seed_epoch_order(real):
    idx = json.loads((real["shards"] / "train" / "shardindex.json").read_text())
    assert [e["nsamples"] for e in idx["shardlist"]] == [50] * 5 and len(idx["classes"]) == 10
    plain = dict(crop_scale=(1.0, 1.0), hflip_p=0.0)  # full-image crops: a sample's tensor is its identity
    folder = build_datamodule("imagefolder", real["folder"], 32, in_memory=False, num_workers=0, **plain)
    every = Counter(fingerprints(folder.train_batches(0, 50, 0, "cpu")))
    dm = build_datamodule("webdataset", real["shards"], 32, num_workers=2, **plain)
    assert dm.num_train == 250 and dm.steps_per_epoch(10) == 25 and dm.has_test
    e0 = fingerprints(dm.train_batches(0, 10, 0, "cpu"))
    assert Counter(e0) == every  # each of the 250 images exactly once
    again = build_datamodule("webdataset", real["shards"], 32, num_workers=2, **plain)
    assert fingerprints(again.train_batches(0, 10, 0, "cpu")) == e0  # a function of (seed, epoch)
    e1 = fingerprints(dm.train_batches(1, 10, 0, "cpu"))
    assert Counter(e1) == every and e1 != e0
    assert fingerprints(dm.train_batches(0, 10, 0, "cpu", start=20)) == e0[200:]
    # augmented batches repeat too (crops seeded by (seed, epoch, shard, position))
    aug = build_datamodule("webdataset", real["shards"], 32, num_workers=2)
    a, b = list(aug.train_batches(2, 25, 5, "cpu")), list(aug.train_batches(2, 25, 5, "cpu"))
    assert len(a) == 10 and all(torch.equal(x, y) for x, y in zip(a, b))
    ys = torch.cat([y for _, y in dm.eval_batches("test", 16, "cpu")])
    assert torch.bincount(ys).tolist() == [TEST_PER_CLASS] * 10


def test_webdataset_two_gloo_processes_read_disjoint_samples(real, tmp_path):
    out = tmp_path / "ranks.json"
    mp.start_processes(ddp_shard_reader, args=(2, str(real["shards"]), f"file://{tmp_path / 'rdzv'}", str(out)),
                       nprocs=2, start_method="spawn")
    res = json.loads(out.read_text())
    a, b = res["ranks"]
    # 5 shards of 50 over 2 ranks: each is sure of 2 shards = 100 samples = 5 batches of 20, the same on both
    assert res["steps"] == 5 and len(a) == len(b) == 100
    assert not set(a) & set(b) and len(set(a)) == len(set(b)) == 100


TINY_RUN = ["--no-progress", *sets("model.img_size=32", "model.patch_size=8", "train.batch_size=50", "train.epochs=2",
                                   "train.deterministic=true", "train.ckpt_every=1", "train.log_every=1",
                                   "data.max_train=null", "data.max_test=null")]


@pytest.mark.parametrize("source,workers", [("hf", 0), ("webdataset", 2)])
def test_pretraining_resumes_exactly(real, tmp_path, source, workers):
    path = real["hf" if source == "hf" else "shards"]
    data = ["--set", f"data.name={source}", "--set", f"data.path={path}", "--set", f"data.num_workers={workers}"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["pretrain", *TINY_RUN, *data, "--output", str(a)]) == 0
    shutil.copytree(a, b)  # b: the run as it stood after epoch 1, then resumed
    shutil.copy(b / "checkpoints" / "epoch_0001.pt", b / "checkpoints" / "last.pt")
    (b / "summary.json").unlink()
    assert main(["pretrain", "--no-progress", "--output", str(b), "--resume"]) == 0
    ma, mb = ((r / "metrics.jsonl").read_text().splitlines() for r in (a, b))
    losses = lambda lines: [(r["step"], r.get("loss")) for r in map(json.loads, lines)]  # noqa: E731
    assert losses(mb) == losses(ma) and len(ma) >= 10
    sa, sb = (torch.load(r / "checkpoints" / "last.pt", weights_only=True)["student"] for r in (a, b))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    summary = json.loads((a / "summary.json").read_text())
    assert 0.0 <= summary["knn_top1"] <= 1.0


def _error(capsys, argv) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    return err


def test_bad_input_is_one_line_and_exit_2(real, tmp_path, capsys):
    base = ["pretrain", "--no-progress", *sets("model.img_size=32", "model.patch_size=8", "data.max_train=null",
                                               "data.max_test=null")]
    err = _error(capsys, [*base, "--set", "data.name=hf", "--set", f"data.path={real['hf']}", "--set",
                          "data.image_key=picture", "--output", str(tmp_path / "r1")])
    assert "image column 'picture'" in err and "columns: image, label" in err
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"pic": [b"x"], "label": [0]}).save_to_disk(str(tmp_path / "nokey"))
    err = _error(capsys, [*base, "--set", "data.name=hf", "--set", f"data.path={tmp_path / 'nokey'}",
                          "--output", str(tmp_path / "r2")])
    assert "no image column" in err and "columns: pic, label" in err and "data.image_key" in err
    pattern = f"{tmp_path}/none-{{000000..000003}}.tar"
    err = _error(capsys, [*base, "--set", "data.name=webdataset", "--set", f"data.path={pattern}",
                          "--output", str(tmp_path / "r3")])
    assert f"the shard pattern {pattern!r} matches no file" in err
    err = _error(capsys, [*base, "--set", "data.name=webdataset", "--set", f"data.path={real['shards']}",
                          "--set", "data.image_key=png", "--output", str(tmp_path / "r4")])
    assert "no image member png" in err and "members: cls, jpg" in err
    err = _error(capsys, [*base, "--set", "train.loggers=tensorboard,neptune", "--output", str(tmp_path / "r5")])
    assert "'neptune'" in err and "tensorboard, wandb, mlflow, csv" in err


def test_corrupt_shard_member_is_skipped_and_counted(real, tmp_path):
    wds = pytest.importorskip("webdataset")
    src = real["shards"] / "train" / "shard-000000.tar"
    samples = list(wds.tarfile_to_samples()(iter([{"url": str(src)}])))
    bad_key = samples[3]["__key__"]
    samples[3]["jpg"] = b"\xff\xd8 this is not a JPEG"
    with wds.TarWriter(str(tmp_path / "shard-000000.tar")) as w:
        for s in samples:
            w.write({k: v for k, v in s.items() if k in ("__key__", "jpg", "cls")})
    log: list[str] = []
    dm = build_datamodule("webdataset", str(tmp_path / "shard-{000000..000000}.tar"), 32, num_workers=0,
                          log=log.append)
    assert dm.num_train == 50 and dm.classes is not None
    images = sum(x.shape[0] for x in dm.train_batches(0, 10, 0, "cpu"))
    assert images == 49 and dm.skipped_total == 1
    assert any("skipped 1 unreadable image" in line and bad_key in line for line in log)
    strict = build_datamodule("webdataset", str(tmp_path), 32, num_workers=0, strict=True)
    with pytest.raises(MimkitError, match=f"unreadable image .*{bad_key}"):
        list(strict.train_batches(0, 10, 0, "cpu"))


def test_hf_parquet_folder_and_unlabelled_split(real, tmp_path):
    datasets = pytest.importorskip("datasets")
    saved = datasets.load_from_disk(str(real["hf"]))
    (tmp_path / "pq").mkdir()
    for split in ("train", "test"):  # the file names give the splits, as datasets infers them
        saved[split].to_parquet(str(tmp_path / "pq" / f"{split}-00000-of-00001.parquet"))
    pq = build_datamodule("hf", tmp_path / "pq", 32, num_workers=0)
    ref = build_datamodule("hf", real["hf"], 32, num_workers=0)
    assert pq.num_train == 250 and pq.classes == ref.classes and pq.has_test
    for (xa, ya), (xb, yb) in zip(pq.eval_batches("test", 25, "cpu"), ref.eval_batches("test", 25, "cpu"), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    saved["train"].remove_columns("label").save_to_disk(str(tmp_path / "nolabel"))
    bare = build_datamodule("hf", tmp_path / "nolabel", 32, num_workers=0)
    assert bare.classes is None and not bare.has_test and bare.num_train == 250
    with pytest.raises(MimkitError, match="has no labels"):
        next(bare.eval_batches("train", 25, "cpu"))
    assert sum(x.shape[0] for x in bare.train_batches(0, 50, 0, "cpu")) == 250


def test_shards_from_an_image_folder(real, tmp_path):
    assert main(["shards", "--source", str(real["folder"]), "--out", str(tmp_path / "s"), "--shard-size", "100"]) == 0
    index = json.loads((tmp_path / "s" / "train" / "shardindex.json").read_text())
    assert [e["nsamples"] for e in index["shardlist"]] == [100, 100, 50] and index["classes"][0] == "airplane"
    dm = build_datamodule("webdataset", str(tmp_path / "s" / "train" / "shard-{000000..000002}.tar"), 32, num_workers=0)
    assert dm.num_train == 250 and dm.classes == index["classes"] and not dm.has_test
    with pytest.raises(MimkitError, match="already holds shards"):
        from mimkit.data.shards import write_shards

        write_shards(real["folder"], tmp_path / "s")


def test_labelled_downstream_source_reads_hf_rows_and_refuses_shards(real):
    import io

    from PIL import Image

    from mimkit.eval.labelled import labelled_train_source

    hf = build_datamodule("hf", real["hf"], 32, num_workers=0)
    src = labelled_train_source(hf)
    first = Path(hf.listing.train.files[0])  # a row name, not a file: the source reads the Arrow row
    assert not first.exists() and len(src) == 250 and int(src.labels[0]) == 0
    datasets = pytest.importorskip("datasets")
    row = datasets.load_from_disk(str(real["hf"]))["train"].cast_column("image", datasets.Image(decode=False))[0]
    with Image.open(io.BytesIO(row["image"]["bytes"])) as im:
        assert np.array_equal(np.asarray(src.pil(0)), np.asarray(im.convert("RGB")))
    wds = build_datamodule("webdataset", real["shards"], 32, num_workers=0)
    with pytest.raises(MimkitError, match="webdataset is streamed"):
        labelled_train_source(wds)


@pytest.mark.parametrize("source,module", [("hf", "datasets"), ("webdataset", "webdataset")])
def test_a_missing_data_package_names_its_extra(tmp_path, monkeypatch, source, module):
    import sys

    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    with pytest.raises(MimkitError) as e:
        build_datamodule(source, tmp_path, 32)
    assert str(e.value) == (f"data.name={source} needs the `{module}` package: pip install 'mimkit[{source}]'")

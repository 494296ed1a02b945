"""What a new user meets first (issue 17): image folders in memory by rule, corrupt and grey images counted
once, pictures across classes, no silent demo preset, messages in config-key terms, signed gains."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mimkit import cli
from mimkit.data import build_datamodule
from mimkit.data.folder_module import FolderDataModule
from mimkit.data.memory import InMemoryDataModule
from mimkit.data.module import sample_indices
from mimkit.errors import MimkitError


class Log(list):
    def __call__(self, line: str) -> None:
        self.append(line)

    def text(self) -> str:
        return "\n".join(self)


def _folder(root: Path, sizes=((8, 8),), grey: int = 0, corrupt: bool = False, per_class: int = 4) -> Path:
    rng = np.random.default_rng(0)
    k = 0
    for split in ("train", "val"):
        for cls in ("ant", "bee", "cat"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(per_class):
                w, h = sizes[k % len(sizes)]
                k += 1
                if grey and split == "train" and cls == "ant" and i < grey:
                    Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L").save(d / f"{i}.png")
                else:
                    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB").save(d / f"{i}.png")
    if corrupt:
        (root / "train" / "bee" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return root


def test_in_memory_auto_holds_a_small_folder_of_one_size(tmp_path):
    log = Log()
    dm = build_datamodule("imagefolder", _folder(tmp_path / "same"), 8, cache_dir=tmp_path / "c", log=log)
    assert isinstance(dm, InMemoryDataModule) and dm.num_train == 12
    assert "data.in_memory=auto: 24 images of 8x8 = 0 MB decoded, within data.in_memory_budget_gb=2" in log.text()
    log = Log()  # the next start finds the decode cache and reads no image header
    again = build_datamodule("imagefolder", tmp_path / "same", 8, cache_dir=tmp_path / "c", log=log)
    assert isinstance(again, InMemoryDataModule) and "24 images already decoded in the cache" in log.text()
    # over the budget: read from disk
    log = Log()
    dm = build_datamodule("imagefolder", tmp_path / "same", 8, in_memory_budget_gb=1e-6, num_workers=0, log=log)
    assert isinstance(dm, FolderDataModule) and "over data.in_memory_budget_gb=1e-06" in log.text()
    # mixed sizes: from disk, unless resized on decode (to model.img_size)
    mixed = _folder(tmp_path / "mixed", sizes=((8, 8), (10, 6)))
    log = Log()
    dm = build_datamodule("imagefolder", mixed, 8, num_workers=0, log=log)
    assert isinstance(dm, FolderDataModule) and "differ in size" in log.text()
    assert "--set data.in_memory_resize=true" in log.text()
    dm = build_datamodule("imagefolder", mixed, 8, decode_size=8, cache_dir=tmp_path / "c")
    assert isinstance(dm, InMemoryDataModule) and dm.data.train.images.shape == (12, 3, 8, 8)


def test_in_memory_resize_is_a_config_key(tmp_path):
    from mimkit.config import build_config
    from mimkit.runtime import datamodule_from_config

    mixed = _folder(tmp_path / "mixed", sizes=((8, 8), (12, 9)))
    cfg = build_config("cifar10-vit-tiny", ["data.name=imagefolder", f"data.path={mixed}", "model.img_size=8",
                                            "model.patch_size=4", "data.in_memory_resize=true",
                                            f"data.cache_dir={tmp_path / 'c'}"])
    dm = datamodule_from_config(cfg)
    assert isinstance(dm, InMemoryDataModule) and dm.data.test.images.shape == (12, 3, 8, 8)


def test_corrupt_image_counted_once_and_strict_checks_up_front(tmp_path):
    root = _folder(tmp_path / "f", sizes=((8, 8), (9, 7)), corrupt=True)
    log = Log()
    dm = build_datamodule("imagefolder", root, 8, num_workers=0, log=log)
    assert isinstance(dm, FolderDataModule) and "unreadable ones skipped when met" in dm.describe()
    for epoch in range(2):
        assert len(list(dm.train_batches(epoch, 4, 0, "cpu"))) == 3
    list(dm.eval_batches("train", 8, "cpu"))
    assert sum("broken.jpg" in line for line in log) == 1 and "skipped 1 unreadable image in epoch 0" in log.text()
    with pytest.raises(MimkitError, match="broken.jpg") as e:  # before any batch is asked for
        build_datamodule("imagefolder", root, 8, num_workers=0, strict=True)
    assert "--set data.strict=false" in str(e.value) and "\n" not in str(e.value)
    # in memory: decoded (and counted) once; strict stops at decoding time
    same = _folder(tmp_path / "s", corrupt=True)
    log = Log()
    dm = build_datamodule("imagefolder", same, 8, cache_dir=tmp_path / "c", log=log)
    assert isinstance(dm, InMemoryDataModule) and dm.num_train == 12 and sum("broken.jpg" in x for x in log) == 1
    with pytest.raises(MimkitError, match="broken.jpg"):
        build_datamodule("imagefolder", same, 8, cache_dir=tmp_path / "c2", strict=True)


def test_grey_images_converted_to_rgb_are_counted(tmp_path):
    log = Log()
    build_datamodule("imagefolder", _folder(tmp_path / "g", grey=3), 8, cache_dir=tmp_path / "c", log=log)
    assert "converted 3 images to RGB (L: 3 grey)" in log.text()
    log = Log()
    dm = build_datamodule("imagefolder", _folder(tmp_path / "gm", sizes=((8, 8), (9, 9)), grey=2), 8,
                          num_workers=0, log=log)
    list(dm.train_batches(0, 4, 0, "cpu"))
    assert "converted 2 images to RGB (L: 2 grey) so far" in log.text()


def test_pictures_sample_every_class_with_a_fixed_seed():
    labels = [0] * 50 + [1] * 50 + [2] * 50   # a split sorted by class
    idx = sample_indices(labels, 150, 6)
    assert [labels[i] for i in idx] == [0, 1, 2, 0, 1, 2] and idx == sample_indices(labels, 150, 6)
    assert len(set(sample_indices(None, 10, 4))) == 4
    dm = build_datamodule("demo", None, max_test=300)
    got = dm.sample_images(10)
    test = dm.data.test
    want = [int(test.labels[i]) for i in sample_indices(test.labels.tolist(), len(test), 10)]
    assert sorted(want) == list(range(10))  # ten images, ten classes
    ref = build_datamodule("demo", None, max_test=300).sample_images(10)
    assert torch.equal(got, ref)


def test_no_silent_demo_preset_for_other_data(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["pretrain", "--set", "data.name=imagefolder", "--set", f"data.path={tmp_path}",
                     "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--config" in err and "in1k-vit-base-mae" in err and "finetune-" not in err
    assert not out.exists()


def test_messages_name_config_keys(tmp_path):
    with pytest.raises(MimkitError, match="data.in_memory must be auto, true or false"):
        build_datamodule("demo", None, in_memory="sometimes")
    with pytest.raises(MimkitError, match=r"--set data.in_memory=false"):
        build_datamodule("imagefolder", _folder(tmp_path / "m", sizes=((8, 8), (9, 9))), 8, in_memory=True,
                         cache_dir=tmp_path / "c")
    with pytest.raises(MimkitError, match="--set train.batch_size="):
        build_datamodule("demo", None, max_train=10).steps_per_epoch(64)


def test_gains_are_signed_and_feature_extraction_reports_progress():
    from mimkit.eval.knn import extract_features, format_gain

    assert format_gain(0.700, 0.714) == "-1.4 points" and format_gain(0.8, 0.7) == "+10.0 points"
    lines = []
    enc = torch.nn.Module()
    enc.forward_features = lambda x: x.flatten(1).unsqueeze(1).repeat(1, 2, 1)
    batches = [(torch.randn(4, 8), torch.zeros(4, dtype=torch.long)) for _ in range(3)]
    f, y = extract_features(enc, batches, "cls", log=lines.append, total=12, log_every_s=0.0, desc="kNN bank")
    assert f.shape == (12, 8) and len(lines) == 3
    assert lines[-1].startswith("kNN bank: 12/12 images (") and "s left" in lines[0]


def test_bench_prints_unless_asked_to_write_a_page(tmp_path, monkeypatch, capsys):
    from mimkit.bench import main as bench_main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("mimkit.bench.measure_gemm_peak", lambda device: 1e9)  # the 2048^3 GEMM timing: not tested here
    args = ["--img", "16", "--patch", "4", "--batch", "4", "--repeats", "1", "--warmup", "1", "--methods", "mae",
            "--no-memory", "--no-gemm-profile", "--device", "cpu"]
    assert bench_main(args) == 0
    assert not (tmp_path / "docs").exists() and "printed only: --out docs/PERFORMANCE.md" in capsys.readouterr().out
    assert bench_main([*args, "--out", "perf.md"]) == 0
    assert (tmp_path / "perf.md").is_file() and f"wrote this section into {tmp_path / 'perf.md'}" in capsys.readouterr().out


def test_help_and_pictures(tmp_path, capsys):
    for argv in (["export", "--help"], ["eval", "knn", "--help"], ["visualize", "attention", "--help"],
                 ["pretrain", "--help"], ["bench", "--help"]):
        with pytest.raises(SystemExit):
            cli.main(argv)
        text = capsys.readouterr().out
        assert "train.epochs=5" not in text and "rc-mae.txt" not in text and "--bench-device" not in text, argv
    with pytest.raises(SystemExit):
        cli.main(["eval", "knn", "--help"])
    assert "the checkpoint's run folder" in " ".join(capsys.readouterr().out.split())
    assert cli.main(["pretrain", "--config", "nope"]) == 2
    err = capsys.readouterr().err
    assert "pre-training presets: cifar10-vit-tiny, demo" in err and "fine-tuning presets (mimkit finetune): " in err
    # reconstruction pictures carry column titles above the four panels
    from mimkit.config import build_config
    from mimkit.methods import build_method
    from mimkit.viz.reconstructions import save_reconstruction_grid

    cfg = build_config(None, ["method.name=mae", "model.img_size=16", "model.patch_size=4", "model.embed_dim=32",
                              "model.depth=1", "model.num_heads=2", "model.decoder_dim=32", "model.decoder_depth=1",
                              "model.decoder_heads=2"])
    png = save_reconstruction_grid(build_method(cfg, 1), torch.randn(2, 1, 16, 16), tmp_path / "r.png", (0.5,), (0.5,))
    im = np.asarray(Image.open(png).convert("L"))
    body_h = 2 * (16 * 4 + 2) + 2
    assert im.shape == (body_h + 14, 4 * (16 * 4 + 2) + 2) and im[:14].min() < 100  # dark title text on white


def test_frozen_scores_are_the_knn_and_probe_of_the_commands():
    from mimkit.config import build_config
    from mimkit.eval.frozen import frozen_scores
    from mimkit.eval.knn import evaluate_knn
    from mimkit.config.linprobe import build_linprobe_config
    from mimkit.eval.linprobe import run_linprobe
    from mimkit.interop.loading import random_init_encoder
    from mimkit.runtime import datamodule_from_config

    cfg = build_config(None, ["method.name=mae", "model.img_size=16", "model.patch_size=4", "model.embed_dim=32",
                              "model.depth=1", "model.num_heads=2", "data.max_train=256", "data.max_test=128",
                              "eval.pool=mean"])
    data = datamodule_from_config(cfg)
    enc = random_init_encoder(cfg, 1, 0)
    cpu = torch.device("cpu")
    got = frozen_scores(enc, data, cfg, device=cpu, linprobe_overrides=["train.epochs=5"])
    assert got["knn_top1"] == pytest.approx(evaluate_knn(enc, data, device=cpu, pool="mean")["knn_top1"])
    lp = run_linprobe(enc, data, build_linprobe_config(None, ["eval.pool=mean", "train.epochs=5"], cfg.to_dict()),
                      device=cpu)
    assert got["linprobe_top1"] == pytest.approx(lp["linprobe_top1"])

"""Every bad input gives one clear line on stderr and exit status 2, and damages nothing."""

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from helpers import sets
from mimkit.cli import main


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err
    return code, err


def assert_one_line(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert err.startswith("mimkit: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, (n, err)


@pytest.mark.parametrize("override,needles", [
    (["model.img_size=30"], ["model.img_size 30", "not divisible", "patch_size 4"]),
    (["method.mask_ratio=1.5"], ["method.mask_ratio", "(0, 1)", "1.5"]),
    (["method.mask_ratio=0"], ["method.mask_ratio", "(0, 1)"]),
    (["model.name=vit_gigantic"], ["vit_gigantic", "vit_tiny"]),
    (["method.name=byol"], ["byol", "mae, rc-mae, sdae"]),
    (["train.epoch=3"], ["train.epoch'", "epochs"]),
    (["train.epochs=many"], ["train.epochs", "integer", "many"]),
    (["data.name=cifar10", "data.path=/nonexistent/cifar"], ["/nonexistent/cifar"]),
])
def test_bad_config_values(tmp_path, capsys, override, needles):
    args = ["pretrain", "--output", str(tmp_path / "run"), "--no-progress", *sets()]
    for o in override:
        args += ["--set", o]
    assert_one_line(*run_cli(capsys, *args), *needles)


def test_unknown_preset(tmp_path, capsys):
    assert_one_line(*run_cli(capsys, "pretrain", "--config", "imagenet-giant", "--output", str(tmp_path / "r")),
                    "imagenet-giant", "demo")


def test_empty_data_folder(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = run_cli(capsys, "pretrain", "--output", str(tmp_path / "r"), "--no-progress",
                        *sets("data.name=imagefolder", f"data.path={empty}"))
    assert_one_line(code, err, str(empty))


def _image_tree(root: Path, corrupt: bool) -> Path:
    for split in ("train", "test"):
        for cls in ("a", "b"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(40):
                Image.new("RGB", (20, 20), (i * 5, 100 if cls == "a" else 200, 0)).save(d / f"{i}.png")
    if corrupt:
        (root / "train" / "a" / "broken.png").write_bytes(b"not a png at all")
    return root


def test_corrupt_image_is_skipped_by_default_and_fatal_when_strict(tmp_path, capsys):
    root = _image_tree(tmp_path / "imgs", corrupt=True)
    common = ["--no-progress", *sets("data.name=imagefolder", f"data.path={root}", "data.num_workers=0",
                                     "data.max_train=null", "data.max_test=null", "train.batch_size=16",
                                     "train.epochs=1")]
    assert main(["pretrain", "--output", str(tmp_path / "ok"), *common]) == 0
    log = (tmp_path / "ok" / "train.log").read_text()
    assert "skipped 1" in log and "broken.png" in log
    capsys.readouterr()
    code, err = run_cli(capsys, "pretrain", "--output", str(tmp_path / "strict"), *common, "--set", "data.strict=true")
    assert_one_line(code, err, "broken.png")


def test_foreign_and_truncated_checkpoints(tmp_path, capsys):
    foreign = tmp_path / "foreign.pt"
    import torch

    torch.save({"model": {"w": torch.zeros(2)}}, foreign)
    assert_one_line(*run_cli(capsys, "eval", "knn", "--checkpoint", str(foreign)), "not a mimkit checkpoint")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00" * 100)
    assert_one_line(*run_cli(capsys, "eval", "knn", "--checkpoint", str(junk)), "cannot be read")
    assert_one_line(*run_cli(capsys, "eval", "knn", "--checkpoint", str(tmp_path / "missing.pt")), "does not exist")
    # an official-style .pth (training arguments pickled beside the weights): the one reader points to `mimkit import`,
    # from the evaluation commands and from train.init_from alike
    import argparse

    official = tmp_path / "checkpoint-799.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "args": argparse.Namespace(model="mae_vit_base_patch16")}, official)
    for argv in (["eval", "knn", "--checkpoint", str(official)],
                 ["pretrain", "--output", str(tmp_path / "run"), "--set", f"train.init_from={official}"]):
        assert_one_line(*run_cli(capsys, *argv), "pickled Python objects", f"mimkit import --checkpoint {official}")
    # a folder: the evaluation commands also accept export folders, training's init_from does not
    assert_one_line(*run_cli(capsys, "eval", "knn", "--checkpoint", str(tmp_path)), "is a folder",
                    "or an export folder holding model.safetensors")
    code, err = run_cli(capsys, "pretrain", "--output", str(tmp_path / "run2"), "--set", f"train.init_from={tmp_path}")
    assert_one_line(code, err, "is a folder")
    assert "export folder" not in err


def test_truncated_checkpoint_and_failed_resume_leave_last_pt_intact(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["pretrain", "--output", str(run), "--no-progress", *sets("train.epochs=1")]) == 0
    last = run / "checkpoints" / "last.pt"
    before = last.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(before[: len(before) // 2])
    assert_one_line(*run_cli(capsys, "eval", "knn", "--checkpoint", str(cut)), "cannot be read")
    # a resume that fails on a bad override does not touch the checkpoint
    code, err = run_cli(capsys, "pretrain", "--output", str(run), "--resume", "--set", "method.mask_ratio=2")
    assert_one_line(code, err, "mask_ratio")
    assert last.read_bytes() == before


def test_cli_exit_status_and_single_line_from_a_real_process(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mimkit", "pretrain", "--config", "nope", "--output", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "unknown preset 'nope'" in proc.stderr

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import sets
from mimkit.cli import main
from mimkit.train.checkpoint import FORMAT


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_tiny_pretraining_writes_the_run_folder(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["pretrain", "--output", str(run), "--no-progress", *sets("train.ckpt_every=2")]) == 0
    out = capsys.readouterr().out
    assert "lr = 0.0025" in out  # blr 1e-2 x 64 / 256, printed at start
    # the preset line opens train.log as well as the console (a run folder says which recipe made it)
    preset = ("mimkit pretrain: preset demo (the default; --config NAME|FILE.yaml to choose, `mimkit presets` lists "
              "them)")
    first = (run / "train.log").read_text().splitlines()[0]  # "YYYY-MM-DD HH:MM:SS <line>"
    assert first.split(" ", 2)[2] == preset and preset in out.splitlines()
    for name in ("config.yaml", "metrics.jsonl", "train.log", "summary.json", "checkpoints/last.pt",
                 "checkpoints/epoch_0002.pt", "checkpoints/epoch_0003.pt", "reconstructions/final.png"):
        assert (run / name).is_file(), name
    assert any((run / "tb").iterdir())
    records = read_metrics(run)
    assert [r["step"] for r in records] == [2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24]
    for r in records:
        assert {"step", "epoch", "lr", "loss", "loss_rec", "imgs_per_s"} <= set(r)
    assert records[-1]["loss"] < records[0]["loss"]
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["format"] == FORMAT and ckpt["method"] == "mae" and ckpt["epoch"] == 3 and ckpt["global_step"] == 24
    assert {"student", "teacher", "optimizer", "scaler", "rng", "config", "version"} <= set(ckpt)
    assert ckpt["config"]["train"]["epochs"] == 3
    summary = json.loads((run / "summary.json").read_text())
    assert 0.0 <= summary["knn_top1"] <= 1.0 and summary["steps"] == 24
    assert summary["final_loss"] == pytest.approx(records[-1]["loss"])
    # the stand-alone evaluation reproduces the kNN number of the run
    assert main(["eval", "knn", "--checkpoint", str(run / "checkpoints" / "last.pt"), "--no-progress"]) == 0
    assert json.loads((run / "eval_knn.json").read_text())["knn_top1"] == pytest.approx(summary["knn_top1"])


def _pretrain_cmd(run: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mimkit", "pretrain", "--output", str(run), "--no-progress",
            *sets("train.deterministic=true", "train.epochs=4", "train.log_every=1"), *extra]


def test_sigkill_then_resume_logs_the_same_losses(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(_pretrain_cmd(full), check=True, env=env, capture_output=True)
    proc = subprocess.Popen(_pretrain_cmd(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill in the middle of the third epoch, after two checkpoints
        m = killed / "metrics.jsonl"
        if m.exists() and any(json.loads(line)["step"] >= 19 for line in m.read_text().splitlines() if line.strip()):
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "summary.json").exists()
    assert torch.load(killed / "checkpoints" / "last.pt", weights_only=True)["epoch"] >= 1
    subprocess.run(_pretrain_cmd(killed, "--resume"), check=True, env=env, capture_output=True)
    a, b = read_metrics(full), read_metrics(killed)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 33))
    for ra, rb in zip(a, b):
        assert ra["loss"] == rb["loss"] and ra["lr"] == rb["lr"], ra["step"]
    sa = json.loads((full / "summary.json").read_text())
    sb = json.loads((killed / "summary.json").read_text())
    assert sa["final_loss"] == sb["final_loss"]
    assert sa["knn_top1"] == sb["knn_top1"]
    wa = torch.load(full / "checkpoints" / "last.pt", weights_only=True)["student"]
    wb = torch.load(killed / "checkpoints" / "last.pt", weights_only=True)["student"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_existing_run_folder_is_not_overwritten(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("keep me")
    assert main(["pretrain", "--output", str(run), "--no-progress", *sets()]) == 2
    err = capsys.readouterr().err
    assert "is not empty" in err and "--resume" in err and err.count("\n") == 1
    assert (run / "notes.txt").read_text() == "keep me"


def test_init_from_a_checkpoint_starts_student_and_teacher_from_its_weights(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(["pretrain", "--output", str(first), "--no-progress", *sets("train.epochs=1")]) == 0
    src = torch.load(first / "checkpoints" / "last.pt", weights_only=True)["student"]
    assert main(["pretrain", "--output", str(second), "--no-progress", "--method", "rc-mae",
                 *sets("train.epochs=1", "train.blr=1e-12", f"train.init_from={first / 'checkpoints' / 'last.pt'}")]) == 0
    ck = torch.load(second / "checkpoints" / "last.pt", weights_only=True)
    # a vanishing lr keeps the student where it started: at the imported weights, and the teacher with it
    for k in ("encoder.blocks.0.attn.qkv.weight", "decoder.pred.weight"):
        assert torch.allclose(ck["student"][k], src[k], atol=1e-6)
        assert torch.allclose(ck["teacher"][k], src[k], atol=1e-6)
    assert "initialised the student from" in (second / "train.log").read_text()

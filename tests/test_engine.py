"""The training engine: step checkpoints with exact mid-epoch resume (SIGKILL), method state across resume, the EMA
once per optimiser step, hard-linked epoch checkpoints, auto-resume, failed starts, short-run schedules."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import _state, run_tree, sets
from PIL import Image

from mimkit.cli import main
from mimkit.train.checkpoint import atomic_link, atomic_save

#: a driver that SIGKILLs its own process right after metrics line ``step == KILL`` (of rank KILL_RANK, once: a
#: marker file says it happened), then runs the mimkit CLI. A real kill -9, at a deterministic point.
DRIVER = '''
import os, signal, sys
from mimkit.train import runlog
kill_at, marker = int(sys.argv[1]), sys.argv[2]
original = runlog.RunLog.metrics
def metrics(self, record):
    original(self, record)
    if (record.get("step") == kill_at and "loss" in record and not os.path.exists(marker)
            and os.environ.get("RANK", "0") == os.environ.get("KILL_RANK", "0")):
        open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
runlog.RunLog.metrics = metrics
from mimkit.cli import main
sys.exit(main(sys.argv[3:]))
'''

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": "0"}


def read_metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "imgs_per_s"}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def _image_folder(root: Path) -> Path:
    """2 classes x 160 training / 32 validation PNGs of 16 px, three sizes of noise patterns."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 160), ("val", 32)):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                size = (16, 20, 24)[i % 3]
                arr = (rng.random((size, size, 3)) * (120 if c == "a" else 255)).astype(np.uint8)
                Image.fromarray(arr).save(root / split / c / f"{i:03d}.png")
    return root


CASES = {
    "rc-mae-S": ["method.name=rc-mae", "method.mask_mode=same", "method.grad_align_every=5"],
    "rc-mae-D": ["method.name=rc-mae", "method.mask_mode=different", "train.accum_steps=2", "data.max_train=512"],
    "sdae": ["method.name=sdae"],
    "mae-imagefolder": ["method.name=mae", "data.name=imagefolder", "data.in_memory=false"],
}


@pytest.mark.parametrize("case", list(CASES))
def test_sigkill_after_a_step_checkpoint_resumes_the_epoch_exactly(tmp_path, case):
    # 8 steps per epoch; step checkpoints every 3 steps; killed 2 steps after the last one before `kill`
    epochs, kill = (3, 23) if case == "sdae" else (2, 14)
    items = ["train.deterministic=true", f"train.epochs={epochs}", "train.log_every=1", "train.batch_size=32",
             "data.max_train=256", "data.max_test=64", "train.ckpt_every_steps=3", *CASES[case]]
    if case == "mae-imagefolder":
        items.append(f"data.path={_image_folder(tmp_path / 'images')}")
    args = ["pretrain", "--no-progress", *sets(*items)]
    full, cut = tmp_path / "full", tmp_path / "cut"
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the killed process (OMP_NUM_THREADS=1): the same reductions, bit for bit
    killed = subprocess.run([sys.executable, str(driver), str(kill), str(tmp_path / "killed"), *args,
                             "--output", str(cut)], env=ENV, capture_output=True)
    assert killed.returncode == -9
    ckpt = torch.load(cut / "checkpoints" / "last.pt", weights_only=True)
    micro = (kill - 2) % 8 * (2 if "accum" in str(items) else 1)  # micro-batches of the epoch already done
    assert (ckpt["epoch"], ckpt["global_step"], ckpt["epoch_micro"]) == ((kill - 2) // 8, kill - 2, micro)
    assert max(r["step"] for r in read_metrics(cut)) == kill  # the two steps after the checkpoint are lost
    try:
        assert main([*args, "--output", str(full)]) == 0
        assert main([*args, "--output", str(cut), "--resume"]) == 0
    finally:
        torch.set_num_threads(before)
    a, b = read_metrics(full), read_metrics(cut)
    assert [r["step"] for r in a] == [r["step"] for r in b] and len(a) >= 8 * epochs
    assert a == b  # every logged value: loss, lr, loss_rec / loss_cons, momentum, grad_cos
    if case != "mae-imagefolder":
        assert any("momentum" in r for r in a)
    if case == "sdae":  # per-epoch EMA: the resumed epoch 3 logs the momentum of the update after epoch 2, not base
        assert len({r["momentum"] for r in a if "loss" in r}) == 2
    if case == "rc-mae-S":
        # before steps 1, 6, 11, 16: the monitor kept its step counter across the resume (restarting it at 0
        # would measure before step 13 too)
        assert [r["step"] for r in a if "grad_cos" in r] == [1, 6, 11, 16]
    wa = torch.load(full / "checkpoints" / "last.pt", weights_only=True)
    wb = torch.load(cut / "checkpoints" / "last.pt", weights_only=True)
    for part in ("student", "teacher"):
        if wa[part] is not None:
            assert all(torch.equal(wa[part][k], wb[part][k]) for k in wa[part]), part
    assert wa["method_state"] == wb["method_state"]
    assert f"micro-batch {micro} of epoch {ckpt['epoch'] + 1}" in (cut / "train.log").read_text()
    sa, sb = (json.loads((r / "summary.json").read_text()) for r in (full, cut))
    assert sa["final_loss"] == sb["final_loss"] and sa["knn_top1"] == sb["knn_top1"]


def test_ema_is_updated_once_per_optimizer_step_never_on_micro_steps(tmp_path, monkeypatch):
    from mimkit.teacher import EMATeacher

    calls: list[float] = []
    original = EMATeacher.update

    def counting(self, source, momentum):
        calls.append(float(momentum))
        return original(self, source, momentum)

    monkeypatch.setattr(EMATeacher, "update", counting)
    torch.set_num_threads(1)
    # 256 images / batch 32 = 8 micro-batches per epoch, accumulated 4 at a time: 2 optimiser steps per epoch
    assert main(["pretrain", "--output", str(tmp_path / "run"), "--no-progress", *sets(
        "method.name=rc-mae", "train.epochs=2", "train.batch_size=32", "train.accum_steps=4", "data.max_train=256",
        "train.log_every=1", "method.momentum_schedule=cosine", "method.momentum=0.9", "method.momentum_final=1.0")]) == 0
    reset = [m for m in calls if m == 0.0]  # the construction-time copy (teacher := student), if any
    updates = [m for m in calls if m != 0.0]
    assert len(updates) == 4 and len(reset) <= 1  # once per optimiser step (4 steps), not per micro-batch (16)
    logged = [r["momentum"] for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert len(logged) == 4 and updates == sorted(updates)  # the cosine schedule moves once per optimiser step


def test_epoch_checkpoints_are_links_to_last_not_copies(tmp_path):
    run = tmp_path / "run"
    assert main(["pretrain", "--output", str(run), "--no-progress", *sets("train.epochs=2", "train.ckpt_every=1")]) == 0
    ck = run / "checkpoints"
    assert os.path.samefile(ck / "last.pt", ck / "epoch_0002.pt")
    assert not os.path.samefile(ck / "epoch_0001.pt", ck / "epoch_0002.pt")
    assert torch.load(ck / "epoch_0001.pt", weights_only=True)["epoch"] == 1  # not changed by the later saves
    # a later atomic save of last.pt leaves its linked copy as it was
    atomic_save({"x": torch.ones(1)}, ck / "last.pt")
    assert torch.load(ck / "epoch_0002.pt", weights_only=True)["epoch"] == 2
    atomic_link(ck / "last.pt", ck / "copy.pt")
    assert os.path.samefile(ck / "last.pt", ck / "copy.pt") and not list(ck.glob(".*tmp"))


def test_failed_start_does_not_block_the_retry(tmp_path, capsys):
    run = tmp_path / "run"
    bad = ["--output", str(run), "--no-progress", *sets("data.name=imagefolder", f"data.path={tmp_path / 'nope'}")]
    assert main(["pretrain", *bad]) == 2
    assert "nope" in capsys.readouterr().err
    assert not (run / "checkpoints" / "last.pt").exists()
    left = run.is_dir() and any(run.iterdir())  # what the failed start wrote (if it got that far)
    assert main(["pretrain", "--output", str(run), "--no-progress", *sets("train.epochs=1")]) == 0
    assert (run / "checkpoints" / "last.pt").is_file()
    assert (run / "train.log.failed").is_file() == left
    assert [r["step"] for r in read_metrics(run)] == [2, 4, 6, 8]  # nothing of the failed start mixed in
    # a folder with a checkpoint is still protected
    assert main(["pretrain", "--output", str(run), "--no-progress", *sets("train.epochs=1")]) == 2
    assert "is not empty" in capsys.readouterr().err


def test_auto_resume_starts_fresh_then_continues(tmp_path):
    run = tmp_path / "run"
    assert main(["pretrain", "--output", str(run), "--no-progress", "--auto-resume", *sets("train.epochs=1")]) == 0
    assert main(["pretrain", "--output", str(run), "--no-progress", "--auto-resume", *sets("train.epochs=2")]) == 0
    assert "resumed" in (run / "train.log").read_text()
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 2
    assert main(["pretrain", "--no-progress", "--auto-resume", *sets()]) == 2  # needs --output


def test_short_run_warns_about_warmup_and_logs_every_epoch(tmp_path, capsys):
    run = tmp_path / "run"
    # 8 steps per epoch, 2 epochs; warm-up 10 epochs = 80 steps; log_every 20 > 8
    assert main(["pretrain", "--output", str(run), "--no-progress", *sets(
        "train.epochs=2", "train.warmup_epochs=10", "train.log_every=20", "method.name=rc-mae", "eval.knn_init=true")]) == 0
    out = capsys.readouterr().out
    assert "warm-up (80 steps) is longer than the run (16 steps)" in out and "nan" not in out
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [8, 16]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["peak_lr"] == pytest.approx(0.0025)
    assert summary["lr_reached"] == pytest.approx(0.0025 * 15 / 80)  # the lr of the last step, still warming up
    # both encoders of a teacher method, at the end and at initialisation (the teacher starts as the student)
    assert 0 <= summary["knn_top1_teacher"] <= 1 and 0 <= summary["knn_top1_student"] <= 1
    assert summary["knn_top1"] == summary["knn_top1_teacher"]
    assert summary["knn_top1_init_teacher"] == summary["knn_top1_init_student"] == summary["knn_top1_init"]
    lines = [line for line in out.splitlines() if line.startswith("epoch 1/2")]
    assert lines and "this epoch, ETA" in lines[0]


def test_torchrun_max_restarts_with_auto_resume_recovers_a_killed_rank(tmp_path):
    """2 gloo processes; rank 1 is SIGKILLed after step 6 (step checkpoint at 4); torchrun restarts both and
    --auto-resume continues from last.pt: the same losses and weights as an uninterrupted 2-process run."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    args = ["pretrain", "--auto-resume", "--no-progress", *sets(
        "data.max_train=256", "data.max_test=64", "train.epochs=2", "train.log_every=1", "train.deterministic=true",
        "train.batch_size=16", "train.ckpt_every_steps=4", "method.name=rc-mae")]
    runs = {}
    for name, kill in (("full", "0"), ("killed", "6")):
        out = tmp_path / name
        with socket.socket() as sock:  # a fixed free port: the restarted workers meet again at the same endpoint
            sock.bind(("localhost", 0))
            port = sock.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--max-restarts=5",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=localhost:{port}", str(driver), kill,
               str(tmp_path / f"{name}.mark"),
               *args, "--output", str(out)]
        # (MASTER_PORT=0 hangs the restarted workers; on a loaded machine a restarted round can also fail to connect
        # its gloo mesh in time, which further restarts absorb: the kill happens once, the result must be exact)
        env = {k: v for k, v in ENV.items() if k != "MASTER_PORT"}
        try:  # output in files, and on a time-out every worker killed too (torchrun gives them sessions of their own)
            proc = run_tree(cmd, timeout=240, env={**env, "KILL_RANK": "1"}, cwd=tmp_path)
        except subprocess.TimeoutExpired:
            # a restarted round that cannot rendezvous on a heavily loaded machine hangs in torch's c10d store
            # (seen only with other jobs on the same cores); the exactness checks below need the run to finish
            pytest.skip(f"torchrun {name} run did not finish within 240 s on this machine (rendezvous under load)")
        stderr = proc.stderr
        if proc.returncode != 0 and name == "killed" and "Gloo connectFullMesh failed" in stderr:
            # every restarted round failed to connect its gloo mesh (seen on one loaded core beside other jobs, never
            # on an idle machine): torch's elastic restart, not mimkit, did not come up; nothing to compare
            pytest.skip("torchrun's restarted rounds could not connect their gloo mesh on this machine (load); the "
                        "exact-resume comparison needs a restarted round that starts")
        errors = [line for line in stderr.splitlines() if "Error" in line or "error" in line]
        assert proc.returncode == 0, "\n".join(errors[-20:]) + stderr[-1500:]
        runs[name] = out
    assert (tmp_path / "killed.mark").exists() and not (tmp_path / "full.mark").exists()
    log = (runs["killed"] / "train.log").read_text()
    assert "resumed" in log and "micro-batch 4 of epoch 1, step 4" in log.replace(")", "").replace("(", "")
    a, b = read_metrics(runs["full"]), read_metrics(runs["killed"])
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 17))
    assert a == b
    wa = torch.load(runs["full"] / "checkpoints" / "last.pt", weights_only=True)
    wb = torch.load(runs["killed"] / "checkpoints" / "last.pt", weights_only=True)
    for part in ("student", "teacher"):
        assert all(torch.equal(wa[part][k], wb[part][k]) for k in wa[part]), part


def test_core_share_splits_the_threads_among_live_jobs_and_gives_them_back(tmp_path):
    """runtime.CoreShare: alone, a job keeps its threads; with another live mimkit job registered, base // 2; when
    that job ends, its file is removed and the threads come back. Off for user-chosen thread counts."""
    from mimkit.runtime import CoreShare

    before = torch.get_num_threads()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        share = CoreShare(tmp_path, base=4, every_s=0)
        assert share.jobs() == 1 and share.adjust() == 4 and torch.get_num_threads() == 4
        (tmp_path / str(other.pid)).write_text("2")  # another job registers
        (tmp_path / "notes.txt").write_text("")      # not a job file: ignored
        assert share.jobs() == 2 and share.adjust() == 2 and torch.get_num_threads() == 2
        assert share.adjust() is None                 # no change, nothing to do
        other.kill()
        other.wait()
        assert share.adjust() == 4 and not (tmp_path / str(other.pid)).exists()
        share.close()
        assert not (tmp_path / str(os.getpid())).exists()
    finally:
        other.kill()
        torch.set_num_threads(before)
    assert CoreShare.create("cpu", {"OMP_NUM_THREADS": "2"}, directory=tmp_path) is None
    assert CoreShare.create("cpu", {"MIMKIT_SHARE_CORES": "0"}, directory=tmp_path) is None
    assert CoreShare.create(torch.device("cuda"), {}, directory=tmp_path) is None
    share = CoreShare.create("cpu", {}, directory=tmp_path)
    assert share is not None and (tmp_path / str(os.getpid())).exists()
    share.close()


def test_run_tree_kills_workers_that_live_in_sessions_of_their_own(tmp_path):
    """The time-out path the torchrun tests rely on: a worker started in a new session (as torchrun starts them),
    holding the output open, is killed too, and the call returns instead of waiting on it."""
    code = ("import subprocess, sys, time; "
            "w = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'], start_new_session=True); "
            f"open({str(tmp_path / 'pid')!r}, 'w').write(str(w.pid)); time.sleep(300)")
    with pytest.raises(subprocess.TimeoutExpired):
        run_tree([sys.executable, "-c", code], timeout=3)
    pid = int((tmp_path / "pid").read_text())
    assert _state(pid) in (None, "Z", "X")  # gone (or a zombie): run_tree waits until the killed have exited


def test_a_training_run_gives_threads_to_another_mimkit_job(tmp_path, monkeypatch):
    """The engine calls CoreShare between steps: with another live job registered, a 2-thread run drops to one
    thread and says so in train.log; a deterministic run keeps its threads (its numbers must not depend on them)."""
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    (jobs / str(other.pid)).write_text("2")
    monkeypatch.setenv("MIMKIT_JOBS_DIR", str(jobs))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MIMKIT_SHARE_CORES", raising=False)
    before = torch.get_num_threads()
    try:
        for det, name in ((False, "shared"), (True, "det")):
            torch.set_num_threads(2)
            args = ["pretrain", "--no-progress", "--output", str(tmp_path / name),
                    *sets("train.epochs=1", "data.max_train=128", f"train.deterministic={str(det).lower()}")]
            assert main(args) == 0
            log = (tmp_path / name / "train.log").read_text()
            said = "other mimkit jobs running on this machine: 1 intra-op thread(s) of 2 from step 2" in log
            assert said != det, log
            assert not (jobs / str(os.getpid())).exists()  # unregistered at the end
    finally:
        other.kill()
        torch.set_num_threads(before)

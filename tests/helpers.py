"""Shared settings for end-to-end tests: a tiny ViT on a slice of the embedded demo data."""

TINY = [
    "method.name=mae", "data.crop_min_scale=0.2",
    "model.img_size=16", "model.patch_size=4", "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
    "model.decoder_dim=32", "model.decoder_depth=1", "model.decoder_heads=2",
    "data.max_train=512", "data.max_test=256", "train.batch_size=64", "train.epochs=3", "train.warmup_epochs=1",
    "train.log_every=2", "train.blr=1e-2", "eval.batch_size=256", "eval.knn_init=false",
]


def sets(*items: str) -> list[str]:
    out = []
    for item in (*TINY, *items):
        out += ["--set", item]
    return out


def run_tree(cmd: list[str], timeout: float, **kwargs):
    """Run ``cmd`` with its output in files (never pipes) and, past ``timeout`` seconds, SIGKILL it and every
    process below it, then raise ``subprocess.TimeoutExpired``. torchrun starts its workers in sessions of their
    own, so killing torchrun's process group leaves them alive; collecting descendants by parent id reaches them.
    Returns a CompletedProcess with text stdout/stderr."""
    import os
    import signal
    import subprocess
    import tempfile

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, start_new_session=True, **kwargs)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGSTOP)  # frozen, it cannot start a worker between the scan and the kill
            _wait_state(proc.pid, "TtZX")      # signals are asynchronous: wait until it has stopped
            killed = [*_descendants(proc.pid), proc.pid]
            for pid in killed:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.wait()
            for pid in killed:                 # and until each killed process has exited (a loaded core delays it)
                _wait_state(pid, "ZX")
            raise
        out.seek(0), err.seek(0)
        return subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read())


def _state(pid: int) -> str | None:
    """The process state letter from /proc (R, S, T, Z, ...), None when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _wait_state(pid: int, states: str, limit: float = 10.0) -> None:
    """Poll until ``pid`` is in one of ``states`` or gone (at most ``limit`` seconds)."""
    import time

    end = time.monotonic() + limit
    while time.monotonic() < end:
        st = _state(pid)
        if st is None or st in states:
            return
        time.sleep(0.01)


def _descendants(root: int) -> list[int]:
    """Every live process below ``root``, from /proc's parent ids (Linux)."""
    from pathlib import Path

    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found

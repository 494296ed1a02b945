"""Checkpoint I/O: plain tensors and Python values only, written atomically.

A checkpoint loads with ``torch.load(weights_only=True)``; a write goes to a temporary file in the
same folder, is fsync'ed and renamed over the target, so a crash at any moment leaves either the
old or the new file, never a truncated one.
"""

from __future__ import annotations

import os
import pickle
import random
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mimkit import __version__
from mimkit.errors import MimkitError

FORMAT = "mimkit-checkpoint-v1"


def atomic_save(obj: Any, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def atomic_link(src: Path, dst: Path) -> None:
    """Make ``dst`` the same file as ``src`` (a hard link, no second copy on disk), atomically.

    Safe with :func:`atomic_save`: a later save of ``src`` renames a new file over it, so the inode ``dst``
    points at is never modified. Where hard links are not supported the bytes are copied (atomically too).
    """
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        if tmp.exists():
            tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(dst.parent)


def _fsync_dir(folder: Path) -> None:
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def rng_state() -> dict[str, Any]:
    """Every RNG the run touches, as tensors and plain values."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": _to_plain(random.getstate()),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_to_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_plain(x):
    return [_to_plain(v) for v in x] if isinstance(x, tuple) else x


def _to_tuple(x):
    return tuple(_to_tuple(v) for v in x) if isinstance(x, list) else x


def make_checkpoint(*, method_name: str, config: dict, student: dict, teacher: dict | None, optimizer: dict | None,
                    scaler: dict | None, global_step: int, epoch: int, extra: dict | None = None,
                    method_state: dict | None = None) -> dict[str, Any]:
    """``epoch`` = number of finished epochs; ``global_step`` = optimiser steps taken; ``method_state`` = the
    method's non-weight state (:meth:`Method.method_state_dict`; checkpoints written before it existed lack the
    key and load as ``{}``). A checkpoint written inside an epoch also has ``epoch_micro`` (the next micro-batch
    of epoch ``epoch``) and ``engine`` (the open metrics windows), see :mod:`mimkit.train.engine`."""
    return {
        "format": FORMAT,
        "version": __version__,
        "method": method_name,
        "config": config,
        "student": student,
        "teacher": teacher,
        "optimizer": optimizer,
        "scaler": scaler,
        "global_step": global_step,
        "epoch": epoch,
        "rng": rng_state(),
        "extra": extra or {},
        "method_state": method_state or {},
    }


def _first_sentence(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    head = line.split(". ")[0].rstrip(".")
    return head.replace("PytorchStreamReader failed reading zip archive: ", "")


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load one of our ``.pt`` files as a dict; every failure is one MimkitError line. The one reader of our
    checkpoint files: ``--resume``, ``train.init_from`` and :func:`mimkit.interop.loading.open_checkpoint` (which
    turns any checkpoint, export folders included, into a typed object) all read through it.

    A missing path, a folder, a file that is not a torch file (text, truncated, another format), a torch file with
    pickled Python objects (e.g. an official MAE ``.pth``) and a torch file that is not ours each get their own
    message naming the path.
    """
    path = Path(path)
    if not path.exists():
        raise MimkitError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise MimkitError(f"checkpoint {path} is a folder, not a checkpoint file; accepted: a mimkit .pt file "
                          f"(e.g. {path / 'checkpoints' / 'last.pt'})")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError, OSError, KeyError,
            IndexError, TypeError, AttributeError, UnicodeDecodeError) as e:
        reason = (_first_sentence(str(e)) or type(e).__name__)[:160]
        if isinstance(e, pickle.UnpicklingError) and "Unsupported global" in str(e):  # a class weights_only refuses
            raise MimkitError(f"{path} holds pickled Python objects beyond tensors (an official MAE / RC-MAE / SdAE "
                              f".pth with its training arguments, say), so it is not a mimkit checkpoint; convert it "
                              f"with `mimkit import --checkpoint {path} --out ours.pt`") from None
        raise MimkitError(f"checkpoint {path} cannot be read: truncated, corrupt or not a torch checkpoint file "
                          f"({type(e).__name__}: {reason})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise MimkitError(
            f"{path} is not a mimkit checkpoint (expected a dict with format={FORMAT!r}); official MAE / RC-MAE / "
            "SdAE files, timm and Hugging Face models are converted with `mimkit import`"
        )
    return ckpt

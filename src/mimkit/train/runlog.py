"""Run folder bookkeeping: the output folder guard, a text log, metrics.jsonl and TensorBoard."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mimkit.errors import MimkitError


def prepare_run_dir(output: Path, resume: bool) -> Path:
    """Create the run folder; refuse to write into a non-empty one unless resuming."""
    output = Path(output)
    if resume:
        if not (output / "checkpoints" / "last.pt").is_file():
            raise MimkitError(f"nothing to resume: {output / 'checkpoints' / 'last.pt'} does not exist")
        return output
    if output.exists() and not output.is_dir():
        raise MimkitError(f"output {output} exists and is not a folder")
    if output.is_dir() and _failed_start(output):  # a run that stopped before its first checkpoint: start again
        _clear_failed_start(output)
    elif output.is_dir() and any(output.iterdir()):
        raise MimkitError(
            f"output folder {output} is not empty; pass --resume to continue that run or choose another --output"
        )
    output.mkdir(parents=True, exist_ok=True)
    return output


#: what a run writes before its first checkpoint (a folder holding only these, and no checkpoint, is a failed start)
_START_FILES = ("train.log", "train.log.failed", "metrics.jsonl", "metrics.csv", "config.yaml", "tb", "checkpoints",
                "trackers.json", "wandb")  # the last two: train.loggers=wandb|mlflow (train/trackers.py)


def _failed_start(output: Path) -> bool:
    """True for a non-empty folder that holds only what a run writes before its first checkpoint."""
    entries = list(output.iterdir())
    if not entries or any(e.name not in _START_FILES for e in entries):
        return False
    ckpts = output / "checkpoints"
    return not (ckpts.is_dir() and any(p.suffix == ".pt" for p in ckpts.iterdir()))


def _clear_failed_start(output: Path) -> None:
    """Remove the logs of a start that failed before any checkpoint (issue 17 item 15): its retry starts fresh.
    The old train.log is kept as ``train.log.failed`` for reference."""
    import shutil

    for entry in output.iterdir():
        if entry.name == "train.log":
            os.replace(entry, output / "train.log.failed")
        elif entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()


class RunLog:
    """Lines to stdout and ``train.log``; metrics to ``metrics.jsonl`` and TensorBoard (rank 0 only)."""

    def __init__(self, run_dir: Path | None, *, echo: bool = True, tensorboard: bool = True, purge_step: int | None = None,
                 loggers: Sequence[str] = ("tensorboard",), config: dict[str, Any] | None = None,
                 first_lines: Sequence[str] = ()):
        """``loggers``: ``train.loggers`` (tensorboard, wandb, mlflow, csv; see :mod:`mimkit.train.trackers`);
        ``config``: the resolved config, logged as the trackers' parameters; ``first_lines``: logged before anything
        else (e.g. the command's preset line), on the console too with ``echo``."""
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.echo = echo
        self._tb = None
        self._text = None
        self._metrics = None
        self._trackers: list = []
        if self.run_dir is not None:
            self._text = open(self.run_dir / "train.log", "a", buffering=1)
            self._metrics = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        for line in first_lines:
            self.info(line)
        if self.run_dir is not None:
            from mimkit.train.trackers import build_trackers

            self._trackers = build_trackers(loggers, self.run_dir, config, purge_step, self.info)
            if tensorboard and "tensorboard" in loggers:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self._tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=purge_step)
                except ImportError:  # pragma: no cover - tensorboard is a dependency
                    self._tb = None

    def info(self, message: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        if self.echo:
            print(message, file=sys.stdout, flush=True)
        if self._text is not None:
            self._text.write(f"{stamp} {message}\n")

    def metrics(self, record: dict[str, Any]) -> None:
        clean = {k: (float(v) if isinstance(v, float) and math.isfinite(v) else v) for k, v in record.items()}
        if self._metrics is not None:
            self._metrics.write(json.dumps(clean) + "\n")
        scalars = {f"train/{key}": value for key, value in record.items()
                   if key not in ("step", "epoch") and isinstance(value, (int, float))}
        if self._tb is not None:
            for tag, value in scalars.items():
                self._tb.add_scalar(tag, value, record["step"])
        for tracker in self._trackers:
            tracker.scalars(scalars, record["step"])

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self._tb is not None:
            self._tb.add_scalar(tag, value, step)
        for tracker in self._trackers:
            tracker.scalars({tag: value}, step)

    def close(self) -> None:
        if self._trackers and self.run_dir is not None:  # the run's results as artifacts, then close
            for path in (self.run_dir / "summary.json", self.run_dir / "config.yaml"):
                if path.is_file():
                    for tracker in self._trackers:
                        tracker.artifact(path)
            for png in sorted((self.run_dir / "reconstructions").glob("*.png")):
                for tracker in self._trackers:
                    tracker.artifact(png, "reconstructions")
        for tracker in self._trackers:
            tracker.close()
        for f in (self._text, self._metrics):
            if f is not None:
                f.close()
        if self._tb is not None:
            self._tb.close()


def truncate_metrics(path: Path, last_step: int) -> int:
    """Drop metrics lines logged after ``last_step`` (work lost by a crash and redone on resume).

    Rewrites atomically; returns the number of lines dropped.
    """
    if not path.is_file():
        return 0
    keep, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill
            dropped += 1
            continue
        if rec.get("step", 0) <= last_step:
            keep.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, path)
    return dropped


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = Path(path).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)

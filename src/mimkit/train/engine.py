"""The training engine: one implementation of "how a step runs", shared by pre-training and fine-tuning.

The engine owns micro-batches and gradient accumulation, autocast and the grad scaler, the hook that may edit the
final gradients (``before_optimizer_step``), clipping, the optimiser step and the lr schedule, the hooks after each
optimiser step and epoch, the metrics window and its log lines, progress bars, and step / epoch checkpoints with exact
resume. What differs between its users (what a forward pass is, what happens at an epoch end, what a checkpoint
holds) comes from a :class:`Task`.

Exact resume. Every source of randomness is a function of (seed, epoch[, batch]): the data order and augmentation
come from generators seeded per epoch/batch, the task re-seeds the global RNGs at every epoch start, and the masks of
a micro-batch come from its own generator. A checkpoint written at an epoch end resumes by re-seeding the next epoch;
one written after optimiser step ``k`` inside an epoch (``train.ckpt_every_steps``) also records the position in the
epoch (``epoch_micro``: the next micro-batch), the global RNG states at that moment and each rank's open metrics
window, so the resumed run continues with the same batches, crops, masks, drop-path draws and logged means.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from mimkit.errors import MimkitError
from mimkit.progress import Progress
from mimkit.runtime import CoreShare
from mimkit.train.checkpoint import atomic_link, atomic_save, set_rng_state
from mimkit.train.distributed import DistEnv, mean_over_ranks
from mimkit.train.optim import lr_at, set_lr
from mimkit.train.runlog import RunLog


@dataclass(frozen=True)
class Schedule:
    """The step arithmetic of a run (all counts per process)."""

    epochs: int
    steps_per_epoch: int          # optimiser steps per epoch
    accum_steps: int
    peak_lr: float
    min_lr: float
    warmup_steps: int
    log_every: int
    clip_grad: float | None = None
    ckpt_every_steps: int = 0     # 0: checkpoints at epoch ends only

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    @property
    def log_interval(self) -> int:
        """``log_every``, at most one epoch: every epoch logs at least once (a multiple of it falls in every epoch)."""
        return max(1, min(self.log_every, self.steps_per_epoch))

    def lr_reached(self) -> float:
        """The highest learning rate the run actually uses (below ``peak_lr`` when the warm-up outlasts the run)."""
        total = self.total_steps
        if total <= 0:
            return 0.0
        candidates = {0, min(self.warmup_steps, total - 1), total - 1}
        return max(lr_at(s, total, self.warmup_steps, self.peak_lr, self.min_lr) for s in candidates)


@dataclass
class EpochEnd:
    """What a task reports at the end of an epoch: a text for the epoch line and extra checkpoint names to keep."""

    text: str
    keep: list[str] = field(default_factory=list)   # e.g. ["epoch_0005.pt", "best.pt"]: the same file as last.pt


class Task(Protocol):  # pragma: no cover - a structural type
    """What a user of the engine provides."""

    edits_gradients: bool

    def begin_epoch(self, epoch: int) -> None:
        """Re-seed the global RNGs for ``epoch`` and switch to train mode."""

    def train_mode(self) -> None:
        """Switch to train mode (a resumed epoch: the RNG states come from the checkpoint)."""

    def batches(self, epoch: int, start: int) -> Iterator[Any]:
        """The epoch's micro-batches from index ``start``."""

    def prepare(self, batch: Any) -> tuple[Any, int]:
        """Per-batch work outside autocast (e.g. mixup); returns the batch and its number of images."""

    def forward(self, batch: Any, epoch: int, micro: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """Loss to back-propagate (under autocast) and the metrics to average into the log window."""

    def clip_parameters(self): ...

    def before_optimizer_step(self, progress: Progress) -> None: ...

    def after_optimizer_step(self, progress: Progress) -> dict[str, float]: ...

    def end_epoch(self, epoch: int, step: int, epoch_means: dict[str, float]) -> EpochEnd: ...

    def checkpoint(self, step: int, epochs_done: int, extra: dict) -> dict[str, Any]: ...

    def after_checkpoint(self, epochs_done: int) -> None: ...


def autocast_context(amp_dtype: torch.dtype | None, device: torch.device):
    return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def _window_to_state(window: dict, imgs: int) -> dict:
    return {"sums": {k: [total.detach().cpu() if torch.is_tensor(total) else total, count]
                     for k, (total, count) in window.items()}, "imgs": imgs}


def _window_from_state(state: dict | None) -> tuple[dict, int]:
    if not state:
        return {}, 0
    return {k: (total, int(count)) for k, (total, count) in state["sums"].items()}, int(state.get("imgs", 0))


def gather_objects(obj: Any, env: DistEnv) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order (``[obj]`` in a single process)."""
    if not env.enabled:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def _means(window: dict) -> dict[str, float]:
    out = {}
    for k, (total, count) in window.items():
        m = total / count
        out[k] = m.item() if torch.is_tensor(m) else m
    return out


@dataclass
class Engine:
    """Runs the epochs of a :class:`Task` (see the module docstring)."""

    task: Task
    schedule: Schedule
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    device: torch.device
    log: RunLog
    run_dir: Path
    env: DistEnv = DistEnv()
    no_sync: Callable[[], Any] | None = None      # DDP's no_sync (accumulation micro-steps skip the all-reduce)
    show: bool = False
    wall_before: float = 0.0                      # seconds spent in earlier sessions of this run
    t_start: float = field(default_factory=time.time)
    extra: dict = field(default_factory=dict)     # kept in every checkpoint (the engine adds its history)
    share: CoreShare | None = None                # threads shared with other mimkit jobs (runtime.CoreShare)
    rates: list[float] = field(default_factory=list)
    last_record: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rates = list(self.extra.get("imgs_per_s_history", self.rates))
        self.last_record = dict(self.extra.get("last_record", self.last_record))

    @property
    def ckpt_dir(self) -> Path:
        return Path(self.run_dir) / "checkpoints"

    # ------------------------------------------------------------------------------------------------
    def run(self, start_epoch: int, step: int, resume: dict | None = None) -> int:
        """Train from ``start_epoch`` (finished epochs) / ``step``; ``resume`` is the checkpoint resumed from.
        Returns the global step at the end."""
        try:
            return self._run(start_epoch, step, resume)
        finally:
            if self.share is not None:
                self.share.close()

    def _run(self, start_epoch: int, step: int, resume: dict | None) -> int:
        s, task = self.schedule, self.task
        start_micro = int(resume.get("epoch_micro", 0)) if resume else 0
        session_epochs, session_t0 = 0, time.time()
        for epoch in range(start_epoch, s.epochs):
            epoch_t0 = time.time()
            first = start_micro if epoch == start_epoch else 0
            window, window_imgs, epoch_sums = {}, 0, {}
            if first:  # a step checkpoint: continue the epoch where it stopped, with its RNG states and windows
                set_rng_state(resume["rng"])
                task.train_mode()
                saved = resume.get("engine") or {}
                windows, sums = saved.get("windows") or [], saved.get("epoch_sums") or []
                if len(windows) == self.env.world_size:  # (another process count: the open window restarts)
                    window, window_imgs = _window_from_state(windows[self.env.rank])
                    epoch_sums, _ = _window_from_state(sums[self.env.rank])
            else:
                task.begin_epoch(epoch)
            step = self._epoch(epoch, first, step, window, window_imgs, epoch_sums)
            session_epochs += 1
            done = epoch + 1
            end = task.end_epoch(epoch, step, _means(epoch_sums))
            self.extra.update(imgs_per_s_history=self.rates[-1000:], last_record=self.last_record,
                              wall_time_s=self.wall_before + time.time() - self.t_start)
            state = task.checkpoint(step, done, self.extra)
            if self.env.is_main:
                atomic_save(state, self.ckpt_dir / "last.pt")
                for name in end.keep:  # the same bytes: a hard link, not a second copy (issue 17 item 21)
                    atomic_link(self.ckpt_dir / "last.pt", self.ckpt_dir / name)
            epoch_s = time.time() - epoch_t0
            left = s.epochs - done
            eta = (time.time() - session_t0) / session_epochs * left
            self.log.info(f"epoch {done}/{s.epochs} step {step} {end.text} ({format_duration(epoch_s)} this epoch"
                          + (f", ETA {format_duration(eta)}" if left else "") + ")")
            task.after_checkpoint(done)
        return step

    # ------------------------------------------------------------------------------------------------
    def _epoch(self, epoch: int, first: int, step: int, window: dict, window_imgs: int, epoch_sums: dict) -> int:
        s, task = self.schedule, self.task
        total_steps, limit = s.total_steps, s.steps_per_epoch * s.accum_steps
        bar = tqdm(total=s.steps_per_epoch, initial=first // s.accum_steps, desc=f"epoch {epoch + 1}/{s.epochs}",
                   disable=not self.show, leave=False)
        window_t0 = time.perf_counter()
        for micro, batch in enumerate(task.batches(epoch, first), start=first):
            if micro >= limit:
                break
            batch, n_images = task.prepare(batch)
            syncing = (micro + 1) % s.accum_steps == 0
            sync_ctx = self.no_sync() if self.no_sync is not None and not syncing else contextlib.nullcontext()
            with sync_ctx:
                with autocast_context(self.amp_dtype, self.device):
                    loss, metrics = task.forward(batch, epoch, micro)
                self.scaler.scale(loss / s.accum_steps).backward()
            for k, v in metrics.items():  # summed; averaged per key when logged
                total, count = window.get(k, (0.0, 0))
                window[k] = (total + v, count + 1)
                total, count = epoch_sums.get(k, (0.0, 0))
                epoch_sums[k] = (total + v, count + 1)
            window_imgs += n_images
            if not syncing:
                continue  # accumulation micro-step: no optimiser step, no EMA update
            step = self._optimizer_step(epoch, step)
            if self.share is not None and (threads := self.share.adjust()) is not None:
                jobs = "alone again" if threads == self.share.base else "other mimkit jobs running on this machine"
                self.log.info(f"{jobs}: {threads} intra-op thread(s) of {self.share.base} from step {step + 1}")
            progress = Progress(step, epoch, s.steps_per_epoch, total_steps, s.epochs)
            after = task.after_optimizer_step(progress)
            bar.update(1)
            if step % s.log_interval == 0 or step == total_steps:
                self._log(epoch, step, window, window_imgs, window_t0, after, bar)
                window, window_imgs, window_t0 = {}, 0, time.perf_counter()
            if s.ckpt_every_steps and step % s.ckpt_every_steps == 0 and micro + 1 < limit:
                self._step_checkpoint(epoch, micro + 1, step, window, window_imgs, epoch_sums)
        bar.close()
        self.optimizer.zero_grad(set_to_none=True)  # drop a trailing partial accumulation
        return step

    def _optimizer_step(self, epoch: int, step: int) -> int:
        s, task, opt, scaler = self.schedule, self.task, self.optimizer, self.scaler
        lr = lr_at(step, s.total_steps, s.warmup_steps, s.peak_lr, s.min_lr)
        set_lr(opt, lr)
        self._lr = lr
        if s.clip_grad or task.edits_gradients:
            scaler.unscale_(opt)
        if task.edits_gradients:  # e.g. rc-mae-free: a correction added to the final gradients
            task.before_optimizer_step(Progress(step + 1, epoch, s.steps_per_epoch, s.total_steps, s.epochs))
        if s.clip_grad:
            torch.nn.utils.clip_grad_norm_(task.clip_parameters(), s.clip_grad)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        return step + 1

    def _log(self, epoch: int, step: int, window: dict, window_imgs: int, window_t0: float, after: dict, bar) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - window_t0
        record: dict[str, Any] = {"step": step, "epoch": epoch, "lr": self._lr}
        record.update(mean_over_ranks(_means(window), self.env, self.device))
        record.update({k: float(v) for k, v in after.items()})
        record["imgs_per_s"] = window_imgs * self.env.world_size / max(elapsed, 1e-9)
        if not all(torch.isfinite(torch.tensor(v)) for v in record.values() if isinstance(v, float)):
            raise MimkitError(
                f"loss became non-finite at step {step} (epoch {epoch + 1}); the last checkpoint "
                f"{self.ckpt_dir / 'last.pt'} is intact: resume with a lower train.blr or "
                "train.clip_grad, or precision=fp32"
            )
        self.log.metrics(record)
        self.rates.append(record["imgs_per_s"])
        self.last_record = record
        if "loss" in record:
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{self._lr:.2e}")

    def _step_checkpoint(self, epoch: int, next_micro: int, step: int, window: dict, window_imgs: int,
                         epoch_sums: dict) -> None:
        """last.pt in the middle of an epoch: the position, every rank's open windows and the RNG states."""
        windows = gather_objects(_window_to_state(window, window_imgs), self.env)
        sums = gather_objects(_window_to_state(epoch_sums, 0), self.env)
        self.extra.update(imgs_per_s_history=self.rates[-1000:], last_record=self.last_record,
                          wall_time_s=self.wall_before + time.time() - self.t_start)
        state = self.task.checkpoint(step, epoch, self.extra)
        state["epoch_micro"] = next_micro
        state["engine"] = {"windows": windows, "epoch_sums": sums}
        if self.env.is_main:
            atomic_save(state, self.ckpt_dir / "last.pt")

"""End-to-end fine-tuning of a pre-trained encoder (rc-mae.txt Table 10), or of a random one (the baseline).

Recipe: AdamW (0.9, 0.999) with layer-wise lr decay, per-iteration linear warmup then half-cosine,
drop path, RandAugment(9, 0.5) + random erasing 0.25 (timm transforms), mixup 0.8 / cutmix 1.0 with label
smoothing 0.1 (timm ``Mixup`` + ``SoftTargetCrossEntropy``), global average pooling + fc_norm, head init std
2e-5. Top-1 / top-5 on the test split after every epoch; ``checkpoints/last.pt`` every epoch and
``checkpoints/best.pt`` when top-1 improves.

Exact resume, as pre-training: the epoch's image order and every image's augmentation are functions of
(seed, epoch, index); the global RNGs (drop path, mixup, random erasing) are re-seeded at every epoch start;
checkpoints are written at epoch ends and, with ``train.ckpt_every_steps=N``, every N optimiser steps inside an
epoch (with the position in the epoch and the RNG states). A run killed at any moment and resumed from ``last.pt``
replays the interrupted epoch, or the rest of it after a step checkpoint, exactly. The step itself (accumulation, precision, clipping, logging, checkpoints, resume) is
:mod:`mimkit.train.engine`'s, shared with pre-training; :class:`FinetuneTask` says what a step and an epoch end are.
"""

from __future__ import annotations

import os
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from mimkit.config import parse_override, set_value, to_dict
from mimkit.errors import MimkitError
from mimkit.eval.labelled import LabelledBatches, train_transform
from mimkit.interop.loading import (FINETUNE_METHOD, check_data_channels, check_labelled, check_same_encoder,
                                load_pretrained_encoder)
from mimkit.config.finetune import FinetuneConfig, finetune_config_from_dict, mixing, validate
from mimkit.eval.accuracy import evaluate_classifier
from mimkit.models.classifier import ViTClassifier, layer_decay_groups
from mimkit.models.vit import ViTEncoder, resolve_model_spec
from mimkit.runtime import CoreShare, datamodule_from_config, resolve_device
from mimkit.train.checkpoint import load_checkpoint, make_checkpoint
from mimkit.train.engine import Engine, EpochEnd, Schedule
from mimkit.train.loop import (autocast_dtype, epoch_seed, resolve_resume, set_determinism, show_progress_default,
                               warn_schedule)
from mimkit.train.optim import adamw, effective_lr
from mimkit.train.runlog import RunLog, prepare_run_dir, truncate_metrics, write_json


@dataclass(frozen=True)
class Init:
    """Where the encoder's weights come from: a pre-training checkpoint's ``which`` encoder, or random."""

    checkpoint: str | None = None
    which: str | None = None
    from_scratch: bool = False

    def describe(self) -> str:
        if self.from_scratch:
            return "random init (from scratch)" + (f", shapes of {self.checkpoint}" if self.checkpoint else "")
        return f"{self.which} encoder of {self.checkpoint}"


def seed_all(seed: int) -> None:
    """Re-seed the global RNGs (torch: drop path; NumPy: mixup; Python: random erasing)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def default_workers(cfg: FinetuneConfig, device: torch.device) -> int:
    """Loader processes: ``data.num_workers``, else none on CPU (they would compete with the model for the
    cores) and ``min(8, cpu_count)`` on CUDA."""
    if cfg.data.num_workers is not None:
        return cfg.data.num_workers
    return 0 if device.type == "cpu" else min(8, os.cpu_count() or 1)


def build_classifier(cfg: FinetuneConfig, in_chans: int, num_classes: int,
                     encoder_state: dict[str, torch.Tensor] | None) -> ViTClassifier:
    """The classifier: the configured encoder (with the fine-tuning drop path), pre-trained weights if given."""
    encoder = ViTEncoder(resolve_model_spec(cfg.model, in_chans).encoder)
    if encoder_state is not None:
        encoder.load_state_dict(encoder_state)
    return ViTClassifier(encoder, num_classes, cfg.head.global_pool, cfg.head.init_std)


def build_mixup(cfg: FinetuneConfig, num_classes: int) -> Mixup | None:
    """timm's Mixup/CutMix (batch mode) with label smoothing; None when both are off."""
    if not mixing(cfg):
        return None
    a = cfg.aug
    return Mixup(mixup_alpha=a.mixup, cutmix_alpha=a.cutmix, prob=a.mixup_prob, switch_prob=a.mixup_switch_prob,
                 mode="batch", label_smoothing=a.label_smoothing, num_classes=num_classes)


def build_criterion(cfg: FinetuneConfig) -> torch.nn.Module:
    if mixing(cfg):
        return SoftTargetCrossEntropy()  # mixup targets already carry the smoothing
    if cfg.aug.label_smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=cfg.aug.label_smoothing)
    return torch.nn.CrossEntropyLoss()


class FinetuneTask:
    """What a fine-tuning step and epoch end are, for :class:`mimkit.train.engine.Engine`."""

    edits_gradients = False

    def __init__(self, finetuner: Finetuner, cfg: FinetuneConfig, model, data, batches: LabelledBatches, mixup,
                 criterion, optimizer, scaler, device, log: RunLog, show: bool, extra: dict):
        self.finetuner, self.cfg, self.model, self.data, self.loader = finetuner, cfg, model, data, batches
        self.mixup, self.criterion, self.optimizer, self.scaler = mixup, criterion, optimizer, scaler
        self.device, self.log, self.show, self.extra = device, log, show, extra
        self._improved = False

    def begin_epoch(self, epoch: int) -> None:
        seed_all(epoch_seed(self.cfg.train.seed, epoch))
        self.model.train()

    def train_mode(self) -> None:
        self.model.train()

    def batches(self, epoch: int, start: int):
        return self.loader.epoch(epoch, self.cfg.train.batch_size, self.cfg.train.seed, self.device, start=start)

    def prepare(self, batch):
        images, labels = batch
        if self.mixup is None:
            return (images, labels), images.shape[0]
        if images.shape[0] % 2:  # an unreadable file made the batch odd; mixup pairs images
            images, labels = images[:-1], labels[:-1]
        images, targets = self.mixup(images, labels)
        return (images, targets), images.shape[0]

    def forward(self, batch, epoch: int, micro: int):
        images, targets = batch
        loss = self.criterion(self.model(images), targets)
        return loss, {"loss": loss.detach().float().item()}

    def clip_parameters(self):
        return self.model.parameters()

    def before_optimizer_step(self, progress) -> None:  # pragma: no cover - edits_gradients is False
        pass

    def after_optimizer_step(self, progress) -> dict[str, float]:
        return {}

    def end_epoch(self, epoch: int, step: int, epoch_means: dict[str, float]) -> EpochEnd:
        cfg, extra, log, data = self.cfg, self.extra, self.log, self.data
        done = epoch + 1
        res = evaluate_classifier(self.model, data.eval_batches("test", cfg.eval.batch_size, self.device), self.show,
                                  "test")
        record = {"step": step, "epoch": epoch, "train_loss": epoch_means.get("loss", 0.0),
                  "test_top1": res["top1"], "test_top5": res["top5"], "test_loss": res["loss"]}
        log.metrics(record)
        log.scalar("eval/top1", res["top1"], step)
        extra["history"].append({"epoch": done, **{k: record[k] for k in ("train_loss", "test_top1", "test_top5")}})
        improved = res["top1"] > extra["best"]["top1"]
        if improved:
            extra["best"] = {"top1": res["top1"], "top5": res["top5"], "epoch": done}
        extra["classes"] = list(data.classes)
        keep = (["best.pt"] if improved else []) + (
            [f"epoch_{done:04d}.pt"] if cfg.train.ckpt_every and done % cfg.train.ckpt_every == 0 else [])
        return EpochEnd(f"train loss {record['train_loss']:.4f} test top-1 {res['top1']:.4f} top-5 {res['top5']:.4f}",
                        keep)

    def checkpoint(self, step: int, epochs_done: int, extra: dict) -> dict[str, Any]:
        return make_checkpoint(method_name=FINETUNE_METHOD, config=to_dict(self.cfg),
                               student=self.model.state_dict(), teacher=None, optimizer=self.optimizer.state_dict(),
                               scaler=self.scaler.state_dict() if self.scaler.is_enabled() else None,
                               global_step=step, epoch=epochs_done, extra=extra)

    def after_checkpoint(self, epochs_done: int) -> None:
        if self.finetuner.after_epoch is not None:
            self.finetuner.after_epoch(epochs_done)


@dataclass
class Finetuner:
    cfg: FinetuneConfig
    run_dir: Path
    init: Init = Init()
    resume: bool | str = False                      # True, False or "auto" (resume when last.pt exists)
    overrides: tuple[str, ...] = ()                 # --set items, re-applied over the saved config on resume
    pretrained_ckpt: dict | None = None             # already-loaded pre-training checkpoint (avoids a reload)
    show_progress: bool | None = None
    echo: bool = True
    after_epoch: Callable[[int], None] | None = None  # called after each epoch's checkpoints are written

    def run(self) -> dict[str, Any]:
        cfg, init, state = self.cfg, self.init, None
        self.resume = resolve_resume(Path(self.run_dir), self.resume)
        if self.resume:
            last = Path(self.run_dir) / "checkpoints" / "last.pt"
            if not last.is_file():
                raise MimkitError(f"nothing to resume: {last} does not exist")
            state = load_checkpoint(last)
            if state.get("method") != FINETUNE_METHOD:
                raise MimkitError(f"{last} is not a fine-tuning checkpoint; --resume continues a `mimkit finetune` "
                                  "run folder")
            cfg = finetune_config_from_dict(state["config"])
            for item in self.overrides:
                set_value(cfg, *parse_override(item))
            validate(cfg)
            init = Init(**state["extra"]["init"])
        run_dir = prepare_run_dir(self.run_dir, self.resume)  # refuses a non-empty folder unless resuming
        # what can fail on user input fails before anything is written (an empty new folder is reusable)
        data, init, encoder_state = self._inputs(cfg, init, state is not None)
        dropped = truncate_metrics(run_dir / "metrics.jsonl", state["global_step"]) if state is not None else 0
        log = RunLog(run_dir, echo=self.echo, purge_step=(state["global_step"] + 1) if state else None,
                     loggers=cfg.train.loggers, config=to_dict(cfg))
        try:
            if dropped:
                log.info(f"dropped {dropped} metrics lines logged after the last checkpoint")
            log.info(f"data {data.describe()}")
            return self._run(cfg, init, run_dir, state, log, data, encoder_state)
        finally:
            log.close()

    def _inputs(self, cfg: FinetuneConfig, init: Init, resuming: bool):
        """The data, the resolved init, and the pre-trained encoder weights (None: random init or resume)."""
        data = datamodule_from_config(cfg)
        check_labelled(data, "fine-tuning")
        encoder_state = None
        if not resuming and init.checkpoint is not None:
            pre = load_pretrained_encoder(init.checkpoint, init.which, self.pretrained_ckpt)
            init = Init(init.checkpoint, pre.which, init.from_scratch)
            check_same_encoder(cfg.model, pre.config["model"], pre.in_chans, init.checkpoint)
            check_data_channels(pre.in_chans, data, init.checkpoint)
            if not init.from_scratch:
                encoder_state = pre.encoder.state_dict()
        return data, init, encoder_state

    # ------------------------------------------------------------------------------------------------
    def _run(self, cfg: FinetuneConfig, init: Init, run_dir: Path, state: dict | None, log: RunLog, data,
             encoder_state: dict | None) -> dict[str, Any]:
        t_start = time.time()
        tr = cfg.train
        device = resolve_device(tr.device)
        set_determinism(tr.seed, tr.deterministic)
        show = show_progress_default() if self.show_progress is None else self.show_progress
        num_classes = len(data.classes)
        torch.manual_seed(tr.seed)  # head init (and the whole encoder from scratch)
        model = build_classifier(cfg, data.in_chans, num_classes, encoder_state).to(device)

        effective_batch = tr.batch_size * tr.accum_steps
        peak_lr = tr.lr if tr.lr is not None else effective_lr(tr.blr, effective_batch)
        steps_per_epoch = data.steps_per_epoch(tr.batch_size) // tr.accum_steps
        if steps_per_epoch < 1:
            raise MimkitError(f"train.batch_size {tr.batch_size} x train.accum_steps {tr.accum_steps} is larger than "
                              f"the {data.num_train} training images; lower the batch size")
        total_steps = steps_per_epoch * tr.epochs
        warmup_steps = round(tr.warmup_epochs * steps_per_epoch)
        optimizer = adamw(layer_decay_groups(model, tr.weight_decay, tr.layer_decay), peak_lr, tr.betas)
        amp_dtype = autocast_dtype(tr.precision, device)
        scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
        mixup = build_mixup(cfg, num_classes)
        criterion = build_criterion(cfg)
        a = cfg.aug
        transform = train_transform(data.img_size, data.mean, crop_scale=a.crop_scale, hflip=a.hflip,
                                    rand_augment=a.rand_augment, interpolation=a.interpolation)
        batches = LabelledBatches(data, transform, num_workers=default_workers(cfg, device), reprob=a.reprob,
                                  remode=a.remode, log=log.info)

        start_epoch, step, extra = 0, 0, {}
        if state is not None:
            model.load_state_dict(state["student"])
            optimizer.load_state_dict(state["optimizer"])
            if state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            start_epoch, step, extra = state["epoch"], state["global_step"], dict(state["extra"])
            micro = int(state.get("epoch_micro", 0))
            log.info(f"resumed {run_dir} at epoch {start_epoch}" + (f" (micro-batch {micro} of epoch {start_epoch + 1})"
                                                                   if micro else "") + f", step {step}")
        else:
            (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        extra["init"] = {"checkpoint": init.checkpoint, "which": init.which, "from_scratch": init.from_scratch}
        extra.setdefault("history", [])
        extra.setdefault("best", {"top1": -1.0, "epoch": 0})

        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log.info(f"mimkit finetune: {init.describe()}; model={cfg.model.name}/{cfg.model.patch_size}@{data.img_size} "
                 f"depth {model.encoder.spec.depth} ({n_params / 1e6:.2f}M trainable), {num_classes} classes, "
                 f"data={data.name} ({data.num_train} train images), device={device}")
        log.info(f"lr = {peak_lr:.3g} (blr {tr.blr:g} x effective batch {effective_batch} / 256"
                 f"{'; set directly by train.lr' if tr.lr is not None else ''}), layer decay {tr.layer_decay}, "
                 f"drop path {cfg.model.drop_path}, {steps_per_epoch} steps/epoch, {total_steps} steps, "
                 f"warmup {warmup_steps} steps")

        wall_before = float(extra.get("wall_time_s", 0.0))
        schedule = Schedule(tr.epochs, steps_per_epoch, tr.accum_steps, peak_lr, tr.min_lr, warmup_steps,
                            tr.log_every, tr.clip_grad, tr.ckpt_every_steps)
        warn_schedule(schedule, log.info)
        task = FinetuneTask(self, cfg, model, data, batches, mixup, criterion, optimizer, scaler, device, log, show,
                            extra)
        engine = Engine(task, schedule, optimizer, scaler, amp_dtype, device, log, run_dir, show=show,
                        wall_before=wall_before, t_start=t_start, extra=extra,
                        share=None if tr.deterministic else CoreShare.create(device))
        step = engine.run(start_epoch, step, state)
        rates = engine.rates

        last = extra["history"][-1] if extra["history"] else {}
        summary = {
            "init": extra["init"], "epochs": tr.epochs, "steps": step, "peak_lr": peak_lr,
            "lr_reached": schedule.lr_reached(), "top1": last.get("test_top1"), "top5": last.get("test_top5"),
            "best_top1": extra["best"]["top1"], "best_top5": extra["best"].get("top5"),
            "best_epoch": extra["best"]["epoch"],
            "history": extra["history"], "num_classes": num_classes, "train_images": data.num_train,
            "imgs_per_s_median": statistics.median(rates) if rates else None,
            "wall_time_s": wall_before + time.time() - t_start,
            "checkpoint_last": str(run_dir / "checkpoints" / "last.pt"),
            "checkpoint_best": str(run_dir / "checkpoints" / "best.pt"),
        }
        write_json(run_dir / "eval_finetune.json", summary)
        write_json(run_dir / "summary.json", summary)
        log.info(f"fine-tuned top-1 {summary['top1']:.4f} top-5 {summary['top5']:.4f} (best top-1 "
                 f"{summary['best_top1']:.4f} at epoch {summary['best_epoch']}); run folder: {run_dir}")
        return summary


def finetune(cfg: FinetuneConfig, output: str | os.PathLike, *, init: Init = Init(), resume: bool | str = False,
             overrides: tuple[str, ...] = (), pretrained_ckpt: dict | None = None, show_progress: bool | None = None,
             echo: bool = True, after_epoch: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Fine-tune per ``cfg`` into ``output`` (or continue it with ``resume``); returns the summary.

    ``after_epoch(done)`` runs after each epoch's checkpoints are written (a hook for tests and notebooks).
    """
    if resume == "auto":
        resume = resolve_resume(Path(output), resume)
    if not resume and init.checkpoint is None and not init.from_scratch:
        raise MimkitError("fine-tuning needs --checkpoint (a pre-training checkpoint) or --from-scratch")
    return Finetuner(cfg, Path(output), init, resume, tuple(overrides), pretrained_ckpt, show_progress, echo,
                     after_epoch).run()

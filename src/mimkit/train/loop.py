"""Pre-training: builds the method, data and optimiser from a config and runs them on the training engine.

The step itself (accumulation, precision, clipping, hooks, logging, step/epoch checkpoints, exact resume) lives in
:mod:`mimkit.train.engine`; this module says what a pre-training step and epoch end are (masks per micro-batch, the
method's EMA hooks, the kNN monitor it is given (:attr:`Trainer.knn`) and pictures) and what the run folder holds.

Determinism and exact resume: every source of randomness is a function of (seed, epoch[, batch]):
the data order and augmentation come from generators seeded per epoch/batch, and the global RNG
(drop path) is re-seeded at the start of every epoch; masks come from a generator per micro-batch. A run
killed at any moment and resumed from ``last.pt`` replays the interrupted epoch (or, after a
``train.ckpt_every_steps`` checkpoint, the rest of it) exactly.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch
import yaml
from torch.nn.parallel import DistributedDataParallel as DDP

from mimkit.config import Config, config_from_dict, parse_override, set_value
from mimkit.errors import MimkitError
from mimkit.data.module import mix_seed
from mimkit.methods import Method, Progress, build_method
from mimkit.models.vit import compile_blocks
from mimkit.methods.base import StepRandom
from mimkit.runtime import CoreShare, datamodule_from_config, resolve_device
from mimkit.train.distributed import (DistEnv, gather_tensors, init_distributed, on_main, shutdown,
                                      spread_over_ranks)
from mimkit.train.checkpoint import load_checkpoint, make_checkpoint, set_rng_state
from mimkit.train.engine import Engine, EpochEnd, Schedule
from mimkit.train.optim import build_adamw, effective_lr
from mimkit.train.runlog import RunLog, prepare_run_dir, truncate_metrics, write_json
from mimkit.viz.reconstructions import save_reconstruction_grid

def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """None = fp32. Autocast only on CUDA: bf16 is very slow on CPUs without AVX-512/AMX."""
    if device.type != "cuda" or precision == "fp32":
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def set_determinism(seed: int, deterministic: bool) -> None:
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


def epoch_seed(seed: int, epoch: int) -> int:
    return seed * 1_000_003 + epoch


def show_progress_default() -> bool:
    return sys.stderr.isatty()


def resolve_resume(run_dir: Path, resume: bool | str) -> bool:
    """``resume="auto"`` (``--auto-resume``): continue from ``checkpoints/last.pt`` when it exists, else start fresh."""
    if resume == "auto":
        return (Path(run_dir) / "checkpoints" / "last.pt").is_file()
    return bool(resume)


class PretrainTask:
    """What a pre-training step and epoch end are, for :class:`mimkit.train.engine.Engine`."""

    def __init__(self, trainer: Trainer, cfg: Config, method: Method, model, data, env: DistEnv, device,
                 log: RunLog, run_dir: Path, eval_which: str, show: bool, pictures, optimizer, scaler,
                 schedule: Schedule):
        self.trainer, self.cfg, self.method, self.model, self.data = trainer, cfg, method, model, data
        self.env, self.device, self.log, self.run_dir = env, device, log, run_dir
        self.eval_which, self.show, self.pictures = eval_which, show, pictures
        self.optimizer, self.scaler, self.schedule = optimizer, scaler, schedule
        self.edits_gradients = method.edits_gradients
        self.engine: Engine | None = None

    def begin_epoch(self, epoch: int) -> None:
        torch.manual_seed(epoch_seed(self.cfg.train.seed, epoch))
        self.method.train()

    def train_mode(self) -> None:
        self.method.train()

    def batches(self, epoch: int, start: int):
        tr = self.cfg.train
        return self.data.train_batches(epoch, tr.batch_size, tr.seed, self.device, rank=self.env.rank,
                                       world_size=self.env.world_size, start=start)

    def prepare(self, images):
        return images, images.shape[0]

    def forward(self, images, epoch: int, micro: int):
        # masks drawn for the global batch, this rank's rows: same run whatever the process count
        self.method.step_random = StepRandom(mix_seed(self.cfg.train.seed, epoch, micro), self.env.rank,
                                             self.env.world_size)
        out = self.model(images)
        metrics = {k: v.detach().float() if torch.is_tensor(v) else torch.tensor(float(v))
                   for k, v in {"loss": out.loss, **out.metrics}.items()}
        return out.loss, metrics

    def clip_parameters(self):
        return list(self.method.student_parameters())

    def before_optimizer_step(self, progress: Progress) -> None:
        self.method.before_optimizer_step(progress)

    def after_optimizer_step(self, progress: Progress) -> dict[str, float]:
        return self.method.after_optimizer_step(progress)

    def end_epoch(self, epoch: int, step: int, epoch_means: dict[str, float]) -> EpochEnd:
        cfg, tr, method, env, log = self.cfg, self.cfg.train, self.method, self.env, self.log
        s = self.schedule
        done = epoch + 1
        after_epoch = method.after_epoch(Progress(step, done, s.steps_per_epoch, s.total_steps, tr.epochs))
        if env.enabled and method.teacher_state_dict() is not None:
            spread = spread_over_ranks(sum(float(v.double().sum()) for v in method.teacher_state_dict().values()), env)
            if spread != 0.0:
                log.info(f"warning: teacher weights differ across ranks after epoch {done} (checksum spread {spread:g})")
        if after_epoch:
            log.metrics({"step": step, "epoch": epoch, **{k: float(v) for k, v in after_epoch.items()}})
        has_labels = self.data.classes is not None and self.data.has_test and self.trainer.knn is not None
        if cfg.eval.knn_every and done % cfg.eval.knn_every == 0 and done < tr.epochs and has_labels:
            res = self.trainer._knn(method, self.data, cfg, self.device, self.eval_which, self.show, env, log)
            log.metrics({"step": step, "epoch": epoch, **res})
            log.scalar("eval/knn_top1", res["knn_top1"], step)
            log.info(f"epoch {done}: kNN top-1 {res['knn_top1']:.4f}")
        if tr.pictures_every and done % tr.pictures_every == 0 and done < tr.epochs and env.is_main:
            self.trainer._pictures(method, self.pictures, self.data,
                                   self.run_dir / "reconstructions" / f"epoch_{done:04d}.png", self.eval_which)
        keep = [f"epoch_{done:04d}.pt"] if done % tr.ckpt_every == 0 or done == tr.epochs else []
        loss = self.engine.last_record.get("loss") if self.engine is not None else None
        return EpochEnd(f"loss {loss:.4f}" if loss is not None else "loss (nothing logged yet)", keep)

    def checkpoint(self, step: int, epochs_done: int, extra: dict) -> dict[str, Any]:
        method, scaler = self.method, self.scaler
        return make_checkpoint(
            method_name=method.name, config=self.cfg.to_dict(), student=method.student.state_dict(),
            teacher=method.teacher_state_dict(), optimizer=self.optimizer.state_dict(),
            scaler=scaler.state_dict() if scaler.is_enabled() else None, global_step=step, epoch=epochs_done,
            extra=extra, method_state=method.method_state_dict(),
        )

    def after_checkpoint(self, epochs_done: int) -> None:
        pass


@dataclass
class Trainer:
    """Builds everything from a config and runs pre-training into ``run_dir``."""

    cfg: Config
    run_dir: Path
    resume: bool | str = False   # True, False or "auto" (resume when checkpoints/last.pt exists)
    show_progress: bool | None = None
    echo: bool = True
    cfg_overrides: tuple[str, ...] = ()  # --set items, re-applied over the saved config on resume
    #: the kNN monitor (during training, ``eval.knn_every``, and at the end), supplied by the caller so that
    #: training does not import the evaluations above it: ``knn(encoder, data, *, device, k, temperature, pool,
    #: batch_size, show_progress, shard, gather, log) -> {"knn_top1": ...}``, e.g.
    #: :func:`mimkit.eval.knn.evaluate_knn` (what :func:`mimkit.api.pretrain` and ``mimkit pretrain`` pass).
    #: None: no kNN.
    knn: Callable[..., dict[str, float]] | None = None
    #: lines that open train.log of a new run (the command's "preset demo ..." line), after the console
    notes: tuple[str, ...] = ()

    def run(self) -> dict[str, Any]:
        env, device = init_distributed(resolve_device(self.cfg.train.device))
        log = None
        try:
            cfg = self.cfg
            run_dir = Path(self.run_dir)
            resume = resolve_resume(run_dir, self.resume)
            on_main(env, lambda: prepare_run_dir(run_dir, resume))
            ckpt, dropped = None, 0
            if resume:
                ckpt = load_checkpoint(run_dir / "checkpoints" / "last.pt")
                saved = config_from_dict(ckpt["config"])
                # the saved config wins; only what the user overrides now (e.g. more epochs) changes
                for item in self.cfg_overrides:
                    set_value(saved, *parse_override(item))
                cfg = saved
                if env.is_main:
                    dropped = truncate_metrics(run_dir / "metrics.jsonl", ckpt["global_step"])
            log = RunLog(run_dir if env.is_main else None, echo=self.echo and env.is_main,
                         purge_step=(ckpt["global_step"] + 1) if ckpt else None,
                         loggers=cfg.train.loggers, config=cfg.to_dict(), first_lines=() if resume else self.notes)
            return self._run(cfg, run_dir, ckpt, log, dropped, env, device)
        finally:
            if log is not None:
                log.close()
            shutdown()

    # ------------------------------------------------------------------------------------------------
    def _run(self, cfg: Config, run_dir: Path, ckpt: dict | None, log: RunLog, dropped: int, env: DistEnv,
             device: torch.device) -> dict[str, Any]:
        t_start = time.time()
        tr = cfg.train
        set_determinism(tr.seed, tr.deterministic)
        show = env.is_main and (show_progress_default() if self.show_progress is None else self.show_progress)

        data = datamodule_from_config(cfg, log=log.info)
        method = build_method(cfg, data.in_chans).to(device)
        if tr.compile:
            log.info(f"torch.compile: {compile_blocks(method)} transformer blocks (the first steps include compiling)")
        world_size = env.world_size
        # DDP averages the student's gradients; the teacher (requires_grad=False) is not synchronised
        # because every rank updates it identically from the identical student (checked every epoch).
        model = DDP(method, device_ids=[device.index] if device.type == "cuda" else None) if env.enabled else method
        effective_batch = tr.batch_size * tr.accum_steps * world_size
        peak_lr = tr.lr if tr.lr is not None else effective_lr(tr.blr, effective_batch)
        micro_per_epoch = data.steps_per_epoch(tr.batch_size, world_size)
        steps_per_epoch = micro_per_epoch // tr.accum_steps
        if steps_per_epoch < 1:
            raise MimkitError(
                f"train.batch_size {tr.batch_size} x train.accum_steps {tr.accum_steps} is larger than the "
                f"{data.num_train} training images; lower the batch size"
            )
        total_steps = steps_per_epoch * tr.epochs
        warmup_steps = round(tr.warmup_epochs * steps_per_epoch)
        schedule = Schedule(tr.epochs, steps_per_epoch, tr.accum_steps, peak_lr, tr.min_lr, warmup_steps,
                            tr.log_every, tr.clip_grad, getattr(tr, "ckpt_every_steps", 0) or 0)
        optimizer = build_adamw(method.student.named_parameters(), peak_lr, tr.weight_decay, tr.betas)
        amp_dtype = autocast_dtype(tr.precision, device)
        scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

        start_epoch, step, extra = 0, 0, {}
        if ckpt is not None:
            method.student.load_state_dict(ckpt["student"])
            method.load_teacher_state_dict(ckpt["teacher"])
            method.load_method_state_dict(ckpt.get("method_state") or {})
            optimizer.load_state_dict(ckpt["optimizer"])
            if ckpt.get("scaler"):
                scaler.load_state_dict(ckpt["scaler"])
            start_epoch, step, extra = ckpt["epoch"], ckpt["global_step"], dict(ckpt.get("extra") or {})
            set_rng_state(ckpt["rng"])
            micro = int(ckpt.get("epoch_micro", 0))
            log.info(f"resumed {run_dir} at epoch {start_epoch}" + (f" (micro-batch {micro} of epoch {start_epoch + 1})"
                                                                   if micro else "") + f", step {step}"
                     + (f" (dropped {dropped} metrics lines logged after that checkpoint)" if dropped else ""))
        else:
            if tr.init_from:
                report = method.load_initial_weights(load_checkpoint(tr.init_from)["student"])
                log.info(f"initialised the student from {tr.init_from}: {len(report['loaded'])} tensors loaded"
                         + "".join(f"; {k} {', '.join(v[:6])}{' ...' if len(v) > 6 else ''}"
                                   for k, v in report.items() if k != "loaded" and v)
                         + "; teacher reset to the student")
            if env.is_main:
                (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

        n_student = sum(p.numel() for p in method.student_parameters())
        log.info(
            f"mimkit pretrain: method={method.name} model={cfg.model.name}/{cfg.model.patch_size}@{cfg.model.img_size} "
            f"({n_student / 1e6:.2f}M trainable) data={cfg.data.name} ({data.num_train} train images) device={device}"
            f"{' precision=' + str(amp_dtype).split('.')[-1] if amp_dtype else ' precision=fp32'}"
            f"{f' processes={world_size}' if env.enabled else ''}"
        )
        log.info(
            f"lr = {peak_lr:.3g} (blr {tr.blr:g} x effective batch {effective_batch} / 256"
            f"{'; set directly by train.lr' if tr.lr is not None else ''}), {steps_per_epoch} steps/epoch, "
            f"{total_steps} steps, warmup {warmup_steps} steps"
        )
        warn_schedule(schedule, log.info)
        if hasattr(method, "teacher_regime"):  # EMA teacher: does the run give it time to average the student?
            regime = method.teacher_regime(total_steps, steps_per_epoch, tr.epochs)
            log.info(regime.line())
            extra["teacher_regime"] = dataclasses.asdict(regime)

        has_labels = data.classes is not None and data.has_test and self.knn is not None
        if self.knn is None and data.classes is not None and data.has_test:
            log.info("note: no kNN monitor was given (mimkit.api.pretrain and `mimkit pretrain` pass "
                     "mimkit.eval.knn.evaluate_knn): no kNN during or after training, eval.knn_* unused")
        eval_which = cfg.eval.which or method.default_which
        if ckpt is None and cfg.eval.knn_init and has_labels:
            res = self._knn(method, data, cfg, device, eval_which, show, env, log)
            extra["knn_top1_init"] = res["knn_top1"]
            log.info(f"kNN top-1 at initialisation ({eval_which}): {res['knn_top1']:.4f}")

        wall_before = float(extra.get("wall_time_s", 0.0))
        pictures = data.sample_images(8)
        task = PretrainTask(self, cfg, method, model, data, env, device, log, run_dir, eval_which, show, pictures,
                            optimizer, scaler, schedule)
        engine = Engine(task, schedule, optimizer, scaler, amp_dtype, device, log, run_dir, env=env,
                        no_sync=model.no_sync if env.enabled else None, show=show, wall_before=wall_before,
                        t_start=t_start, extra=extra,
                        share=None if tr.deterministic else CoreShare.create(device))
        task.engine = engine
        step = engine.run(start_epoch, step, ckpt)
        return self._finish(cfg, method, data, device, run_dir, log, extra, engine.last_record, engine.rates,
                            pictures, eval_which, show, wall_before - t_start, step, schedule, env)

    # ------------------------------------------------------------------------------------------------
    def _knn(self, method: Method, data, cfg: Config, device, which: str, show: bool, env: DistEnv,
             log=None) -> dict[str, float]:
        """kNN of one encoder; without a progress bar, the feature extraction logs its rate and time left."""
        say = log.info if log is not None and not show and env.is_main else None
        return self.knn(method.encoder(which), data, device=device, k=cfg.eval.knn_k, temperature=cfg.eval.knn_t,
                            pool=cfg.eval.pool, batch_size=cfg.eval.batch_size, show_progress=show,
                            shard=(env.rank, env.world_size), gather=lambda t: gather_tensors(t, env), log=say)

    def _pictures(self, method: Method, images, data, path: Path, which: str) -> Path | None:
        return save_reconstruction_grid(method, images, path, data.mean, data.std, seed=0, which=which)

    def _finish(self, cfg, method, data, device, run_dir, log, extra, last_record, step_times, pictures, which, show,
                wall_offset, step, schedule: Schedule, env) -> dict[str, Any]:
        summary: dict[str, Any] = {
            "method": method.name, "epochs": cfg.train.epochs, "steps": step, "peak_lr": schedule.peak_lr,
            "lr_reached": schedule.lr_reached(),
            "final_loss": last_record.get("loss"), "eval_which": which,
            "imgs_per_s_median": statistics.median(step_times) if step_times else None,
            "checkpoint": str(run_dir / "checkpoints" / "last.pt"),
        }
        for key in ("loss_rec", "loss_cons"):
            if key in last_record:
                summary[f"final_{key}"] = last_record[key]
        teacher = method.teacher_state_dict() is not None
        if "knn_top1_init" in extra:
            summary["knn_top1_init"] = extra["knn_top1_init"]
            if teacher:  # the teacher starts as an exact copy of the student: one measurement is both
                summary["knn_top1_init_teacher"] = summary["knn_top1_init_student"] = extra["knn_top1_init"]
        if "teacher_regime" in extra:
            summary["teacher_regime"] = extra["teacher_regime"]
        if data.classes is not None and data.has_test and self.knn is not None:
            res = self._knn(method, data, cfg, device, which, show, env, log)
            summary.update(res)
            log.scalar("eval/knn_top1", res["knn_top1"], step)
            if teacher:  # both encoders of a teacher method (issue 17 item 4)
                other = "student" if which == "teacher" else "teacher"
                summary[f"knn_top1_{which}"] = res["knn_top1"]
                summary[f"knn_top1_{other}"] = self._knn(method, data, cfg, device, other, show, env, log)["knn_top1"]
        if not env.is_main:
            return summary
        png = self._pictures(method, pictures, data, run_dir / "reconstructions" / "final.png", which)
        if png is not None:
            summary["reconstruction"] = str(png)
        summary.update(method.on_train_end(run_dir))
        summary["wall_time_s"] = time.time() + wall_offset  # this session's time plus earlier sessions'
        summary["processes"] = env.world_size
        write_json(run_dir / "summary.json", summary)
        if "knn_top1" in summary:
            init = summary.get("knn_top1_init")
            gain = f" (at initialisation {init:.4f}, {100 * (summary['knn_top1'] - init):+.1f} points)" if init is not None else ""
            log.info(f"kNN top-1 ({which} encoder, k={cfg.eval.knn_k}): {summary['knn_top1']:.4f}{gain}")
            for name in ("teacher", "student"):
                if teacher and name != which and f"knn_top1_{name}" in summary:
                    log.info(f"kNN top-1 ({name} encoder, k={cfg.eval.knn_k}): {summary[f'knn_top1_{name}']:.4f}")
        log.info(f"run folder: {run_dir}")
        log.info(f"checkpoint: {summary['checkpoint']}")
        if png is not None:
            log.info(f"reconstructions: {png}")
        return summary


def warn_schedule(schedule: Schedule, info) -> None:
    """Warn when the warm-up outlasts the run (the lr never reaches its peak) or when epochs are too short to log."""
    if schedule.warmup_steps > schedule.total_steps:
        info(f"warning: the warm-up ({schedule.warmup_steps} steps) is longer than the run ({schedule.total_steps} "
             f"steps): the lr only reaches {schedule.lr_reached():.3g} of its peak {schedule.peak_lr:.3g}; lower "
             "train.warmup_epochs (e.g. --set train.warmup_epochs=1) for a short run")
    if schedule.log_every > schedule.steps_per_epoch:
        info(f"note: train.log_every={schedule.log_every} is longer than an epoch ({schedule.steps_per_epoch} steps); "
             f"logging every {schedule.log_interval} steps so that every epoch is logged")


def pretrain(cfg: Config, output: str | os.PathLike, *, resume: bool | str = False, overrides: tuple[str, ...] = (),
             show_progress: bool | None = None, echo: bool = True,
             knn: Callable[..., dict[str, float]] | None = None, notes: tuple[str, ...] = ()) -> dict[str, Any]:
    """Pre-train per ``cfg`` into ``output`` (or continue it with ``resume``; ``"auto"``: continue when
    ``checkpoints/last.pt`` exists, else start fresh); returns the summary. ``knn``: the kNN monitor
    (:attr:`Trainer.knn`); :func:`mimkit.api.pretrain` passes the evaluation suite's. ``notes``: lines that open
    ``train.log`` of a new run."""
    return Trainer(cfg, Path(output), resume, show_progress, echo, tuple(overrides), knn, tuple(notes)).run()

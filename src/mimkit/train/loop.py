"""The method-agnostic pre-training loop: epochs, accumulation, precision, logging, checkpoints, resume.

Determinism and exact resume: every source of randomness is a function of (seed, epoch[, batch]):
the data order and augmentation come from generators seeded per epoch/batch, and the global RNG
(masks, drop path) is re-seeded at the start of every epoch. Checkpoints are written at epoch ends,
so a run killed at any moment and resumed from ``last.pt`` replays the interrupted epoch exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from mimkit.config import Config, config_from_dict, parse_override, set_value
from mimkit.errors import MimkitError
from mimkit.eval.knn import evaluate_knn
from mimkit.data.module import mix_seed
from mimkit.methods import Method, Progress, build_method
from mimkit.models.vit import compile_blocks
from mimkit.methods.base import StepRandom
from mimkit.runtime import datamodule_from_config, resolve_device
from mimkit.train.distributed import (DistEnv, gather_tensors, init_distributed, mean_over_ranks, on_main, shutdown,
                                      spread_over_ranks)
from mimkit.train.checkpoint import atomic_save, load_checkpoint, make_checkpoint, set_rng_state
from mimkit.train.optim import build_adamw, effective_lr, lr_at, set_lr
from mimkit.train.runlog import RunLog, prepare_run_dir, truncate_metrics, write_json
from mimkit.viz import save_reconstruction_grid


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


@dataclass
class Trainer:
    """Builds everything from a config and runs pre-training into ``run_dir``."""

    cfg: Config
    run_dir: Path
    resume: bool = False
    show_progress: bool | None = None
    echo: bool = True
    cfg_overrides: tuple[str, ...] = ()  # --set items, re-applied over the saved config on resume

    def run(self) -> dict[str, Any]:
        env, device = init_distributed(resolve_device(self.cfg.train.device))
        log = None
        try:
            cfg = self.cfg
            run_dir = Path(self.run_dir)
            on_main(env, lambda: prepare_run_dir(run_dir, self.resume))
            ckpt, dropped = None, 0
            if self.resume:
                ckpt = load_checkpoint(run_dir / "checkpoints" / "last.pt")
                saved = config_from_dict(ckpt["config"])
                # the saved config wins; only what the user overrides now (e.g. more epochs) changes
                for item in self.cfg_overrides:
                    set_value(saved, *parse_override(item))
                cfg = saved
                if env.is_main:
                    dropped = truncate_metrics(run_dir / "metrics.jsonl", ckpt["global_step"])
            log = RunLog(run_dir if env.is_main else None, echo=self.echo and env.is_main,
                         purge_step=(ckpt["global_step"] + 1) if ckpt else None)
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
        optimizer = build_adamw(method.student.named_parameters(), peak_lr, tr.weight_decay, tr.betas)
        amp_dtype = autocast_dtype(tr.precision, device)
        scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

        start_epoch, step, extra = 0, 0, {}
        if ckpt is not None:
            method.student.load_state_dict(ckpt["student"])
            method.load_teacher_state_dict(ckpt["teacher"])
            optimizer.load_state_dict(ckpt["optimizer"])
            if ckpt.get("scaler"):
                scaler.load_state_dict(ckpt["scaler"])
            start_epoch, step, extra = ckpt["epoch"], ckpt["global_step"], dict(ckpt.get("extra") or {})
            set_rng_state(ckpt["rng"])
            log.info(f"resumed {run_dir} at epoch {start_epoch}, step {step}"
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
        if hasattr(method, "teacher_regime"):  # EMA teacher: does the run give it time to average the student?
            regime = method.teacher_regime(total_steps, steps_per_epoch, tr.epochs)
            log.info(regime.line())
            extra["teacher_regime"] = dataclasses.asdict(regime)

        has_labels = data.classes is not None and data.has_test
        eval_which = cfg.eval.which or method.default_which
        if ckpt is None and cfg.eval.knn_init and has_labels:
            res = self._knn(method, data, cfg, device, eval_which, show, env)
            extra["knn_top1_init"] = res["knn_top1"]
            log.info(f"kNN top-1 at initialisation ({eval_which}): {res['knn_top1']:.4f}")

        wall_before = float(extra.get("wall_time_s", 0.0))
        pictures = data.sample_images(8)
        progress = Progress(step, start_epoch, steps_per_epoch, total_steps, tr.epochs)
        step_times: list[float] = list(extra.get("imgs_per_s_history", []))
        last_record: dict[str, Any] = dict(extra.get("last_record", {}))
        for epoch in range(start_epoch, tr.epochs):
            torch.manual_seed(epoch_seed(tr.seed, epoch))
            method.train()
            batches = data.train_batches(epoch, tr.batch_size, tr.seed, device, rank=env.rank, world_size=world_size)
            bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{tr.epochs}", disable=not show, leave=False)
            window: dict[str, tuple[torch.Tensor, int]] = {}
            window_t0, window_imgs = time.perf_counter(), 0
            for micro, images in enumerate(batches):
                if micro >= steps_per_epoch * tr.accum_steps:
                    break
                # masks drawn for the global batch, this rank's rows: same run whatever the process count
                method.step_random = StepRandom(mix_seed(tr.seed, epoch, micro), env.rank, world_size)
                syncing = (micro + 1) % tr.accum_steps == 0
                sync_ctx = model.no_sync() if env.enabled and not syncing else contextlib.nullcontext()
                amp_ctx = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
                with sync_ctx:
                    with amp_ctx:
                        out = model(images)
                    scaler.scale(out.loss / tr.accum_steps).backward()
                for k, v in {"loss": out.loss, **out.metrics}.items():  # summed; averaged per key when logged
                    v = v.detach().float() if torch.is_tensor(v) else torch.tensor(float(v))
                    total, count = window.get(k, (0.0, 0))
                    window[k] = (total + v, count + 1)
                window_imgs += images.shape[0]
                if not syncing:
                    continue  # accumulation micro-step: no optimiser step, no EMA update
                lr = lr_at(step, total_steps, warmup_steps, peak_lr, tr.min_lr)
                set_lr(optimizer, lr)
                if tr.clip_grad or method.edits_gradients:
                    scaler.unscale_(optimizer)
                if method.edits_gradients:  # e.g. rc-mae-free: a correction added to the final gradients
                    method.before_optimizer_step(Progress(step + 1, epoch, steps_per_epoch, total_steps, tr.epochs))
                if tr.clip_grad:
                    torch.nn.utils.clip_grad_norm_(list(method.student_parameters()), tr.clip_grad)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                progress = Progress(step, epoch, steps_per_epoch, total_steps, tr.epochs)
                after = method.after_optimizer_step(progress)
                bar.update(1)
                if step % tr.log_every == 0 or step == total_steps:
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    elapsed = time.perf_counter() - window_t0
                    record = {"step": step, "epoch": epoch, "lr": lr}
                    means = {k: (total / count).item() for k, (total, count) in window.items()}
                    record.update(mean_over_ranks(means, env, device))
                    record.update({k: float(v) for k, v in after.items()})
                    record["imgs_per_s"] = window_imgs * world_size / max(elapsed, 1e-9)
                    if not all(torch.isfinite(torch.tensor(v)) for v in record.values() if isinstance(v, float)):
                        raise MimkitError(
                            f"loss became non-finite at step {step} (epoch {epoch + 1}); the last checkpoint "
                            f"{run_dir / 'checkpoints' / 'last.pt'} is intact: resume with a lower train.blr or "
                            "train.clip_grad, or precision=fp32"
                        )
                    log.metrics(record)
                    step_times.append(record["imgs_per_s"])
                    last_record = record
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}")
                    window, window_t0, window_imgs = {}, time.perf_counter(), 0
            bar.close()
            optimizer.zero_grad(set_to_none=True)  # drop a trailing partial accumulation
            done = epoch + 1
            progress = Progress(step, done, steps_per_epoch, total_steps, tr.epochs)
            after_epoch = method.after_epoch(progress)
            if env.enabled and method.teacher_state_dict() is not None:
                spread = spread_over_ranks(sum(float(v.double().sum()) for v in method.teacher_state_dict().values()), env)
                if spread != 0.0:
                    log.info(f"warning: teacher weights differ across ranks after epoch {done} (checksum spread {spread:g})")
            if after_epoch:
                log.metrics({"step": step, "epoch": epoch, **{k: float(v) for k, v in after_epoch.items()}})
            if cfg.eval.knn_every and done % cfg.eval.knn_every == 0 and done < tr.epochs and has_labels:
                res = self._knn(method, data, cfg, device, eval_which, show, env)
                log.metrics({"step": step, "epoch": epoch, **res})
                log.scalar("eval/knn_top1", res["knn_top1"], step)
                log.info(f"epoch {done}: kNN top-1 {res['knn_top1']:.4f}")
            if tr.pictures_every and done % tr.pictures_every == 0 and done < tr.epochs and env.is_main:
                self._pictures(method, pictures, data, run_dir / "reconstructions" / f"epoch_{done:04d}.png", eval_which)
            extra.update(imgs_per_s_history=step_times[-1000:], last_record=last_record,
                         wall_time_s=wall_before + time.time() - t_start)
            state = make_checkpoint(
                method_name=method.name, config=cfg.to_dict(), student=method.student.state_dict(),
                teacher=method.teacher_state_dict(), optimizer=optimizer.state_dict(),
                scaler=scaler.state_dict() if scaler.is_enabled() else None, global_step=step, epoch=done,
                extra=extra,
            )
            if env.is_main:
                atomic_save(state, run_dir / "checkpoints" / "last.pt")
                if done % tr.ckpt_every == 0 or done == tr.epochs:
                    atomic_save(state, run_dir / "checkpoints" / f"epoch_{done:04d}.pt")
            log.info(f"epoch {done}/{tr.epochs} step {step} loss {last_record.get('loss', float('nan')):.4f} "
                     f"({time.time() - t_start:.0f}s)")

        return self._finish(cfg, method, data, device, run_dir, log, extra, last_record, step_times, pictures,
                            eval_which, show, wall_before - t_start, step, peak_lr, env)

    # ------------------------------------------------------------------------------------------------
    def _knn(self, method: Method, data, cfg: Config, device, which: str, show: bool, env: DistEnv) -> dict[str, float]:
        return evaluate_knn(method.encoder(which), data, device=device, k=cfg.eval.knn_k, temperature=cfg.eval.knn_t,
                            pool=cfg.eval.pool, batch_size=cfg.eval.batch_size, show_progress=show,
                            shard=(env.rank, env.world_size), gather=lambda t: gather_tensors(t, env))

    def _pictures(self, method: Method, images, data, path: Path, which: str) -> Path | None:
        return save_reconstruction_grid(method, images, path, data.mean, data.std, seed=0, which=which)

    def _finish(self, cfg, method, data, device, run_dir, log, extra, last_record, step_times, pictures, which, show,
                wall_offset, step, peak_lr, env) -> dict[str, Any]:
        summary: dict[str, Any] = {
            "method": method.name, "epochs": cfg.train.epochs, "steps": step, "peak_lr": peak_lr,
            "final_loss": last_record.get("loss"), "eval_which": which,
            "imgs_per_s_median": statistics.median(step_times) if step_times else None,
            "checkpoint": str(run_dir / "checkpoints" / "last.pt"),
        }
        for key in ("loss_rec", "loss_cons"):
            if key in last_record:
                summary[f"final_{key}"] = last_record[key]
        if "knn_top1_init" in extra:
            summary["knn_top1_init"] = extra["knn_top1_init"]
        if "teacher_regime" in extra:
            summary["teacher_regime"] = extra["teacher_regime"]
        if data.classes is not None and data.has_test:
            res = self._knn(method, data, cfg, device, which, show, env)
            summary.update(res)
            log.scalar("eval/knn_top1", res["knn_top1"], step)
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
            gain = f" (at initialisation {init:.4f}, +{100 * (summary['knn_top1'] - init):.1f} points)" if init is not None else ""
            log.info(f"kNN top-1 ({which} encoder, k={cfg.eval.knn_k}): {summary['knn_top1']:.4f}{gain}")
        log.info(f"run folder: {run_dir}")
        log.info(f"checkpoint: {summary['checkpoint']}")
        if png is not None:
            log.info(f"reconstructions: {png}")
        return summary


def pretrain(cfg: Config, output: str | os.PathLike, *, resume: bool = False, overrides: tuple[str, ...] = (),
             show_progress: bool | None = None, echo: bool = True) -> dict[str, Any]:
    """Pre-train per ``cfg`` into ``output`` (or continue it with ``resume``); returns the summary."""
    return Trainer(cfg, Path(output), resume, show_progress, echo, tuple(overrides)).run()

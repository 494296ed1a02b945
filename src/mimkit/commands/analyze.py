"""``mimkit analyze linear-model | grad-alignment | grad-hist`` (registered by :mod:`mimkit.cli`)."""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

from mimkit.errors import MimkitError


def register(groups, common) -> None:
    ana = groups["analyze"]

    from mimkit.analysis.linear_model import PROBE_STEPS, LinearModelConfig

    d = LinearModelConfig()
    p = ana.add_parser("linear-model", help="the linear MAE + teacher experiment (rc-mae Sec. 4, App. E.1, Fig. 2a-c)",
                       description="Train a linear student/teacher on Gaussian clusters and probe, after every "
                                   "iteration, the reconstruction and consistency gradients on same / similar / "
                                   "different input pairs. Writes linear_model.png, summary.json, curves.npz.")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--runs", type=int, default=d.runs, help=f"independent runs (default {d.runs})")
    p.add_argument("--iterations", type=int, default=d.iterations, help=f"training iterations (default {d.iterations})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"training batch (default {d.batch_size})")
    p.add_argument("--probe-batch", type=int, default=d.probe_batch,
                   help=f"extra-batch points probed per iteration (default {d.probe_batch})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"learning rate (default {d.lr:g})")
    p.add_argument("--sgd-momentum", type=float, default=d.sgd_momentum,
                   help=f"SGD momentum (default {d.sgd_momentum:g})")
    p.add_argument("--teacher-momentum", type=float, default=d.teacher_momentum,
                   help=f"EMA teacher momentum alpha (default {d.teacher_momentum:g})")
    p.add_argument("--mask-ratio", type=float, default=d.mask_ratio, help=f"masked fraction (default {d.mask_ratio:g})")
    p.add_argument("--dim", type=int, default=d.dim, help=f"input dimension (default {d.dim})")
    p.add_argument("--clusters", type=int, default=d.clusters, help=f"Gaussian clusters (default {d.clusters})")
    p.add_argument("--points-per-cluster", type=int, default=d.points_per_cluster,
                   help=f"points per cluster (default {d.points_per_cluster}; the paper's '1000 instances' = 100)")
    p.add_argument("--wishart-df", type=int, default=None,
                   help="Wishart degrees of freedom (default round(1.5 x dim) = 48; the paper prints 54)")
    p.add_argument("--mean-range", type=float, default=d.mean_range,
                   help=f"cluster means ~ U(-R, R) (default {d.mean_range:g})")
    p.add_argument("--scale-low", type=float, default=d.scale_low,
                   help=f"Wishart scale diagonal low (default {d.scale_low:g})")
    p.add_argument("--scale-high", type=float, default=d.scale_high,
                   help=f"Wishart scale diagonal high (default {d.scale_high:g})")
    p.add_argument("--cov-normalize", action="store_true",
                   help="divide each Wishart covariance by its df (mean V: tight clusters) instead of mean df x V")
    p.add_argument("--probe-step", choices=PROBE_STEPS, default=d.probe_step,
                   help="the step on the first input: plain SGD (default) or the training optimiser incl. momentum")
    p.add_argument("--independent-masks", action="store_true",
                   help="draw a fresh mask for the second input (default: both inputs share one mask)")
    p.add_argument("--near-zero", type=float, default=d.near_zero,
                   help=f"|mean cos| threshold for the 'near zero' verdict (default {d.near_zero:g})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"seed (default {d.seed})")
    p.add_argument("--teacher-free", action="store_true",
                   help="also train the teacher-free arm (rc-mae-free's D A correction) and draw it over the teacher's")
    p.set_defaults(func=cmd_linear_model)

    p = ana.add_parser("grad-alignment", parents=[common(checkpoint=True, output=False)],
                       help="the three-sequence gradient probe on an RC-MAE checkpoint (rc-mae Fig. 2d-f)",
                       description="One SGD step + EMA teacher update on a first image, then grad L_r and grad L_c "
                                   "on a second image that is the same image, another image of the same class, or "
                                   "an image of another class. Writes grad_alignment.png, summary.json, pairs.npz.")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--pairs", type=int, default=200, help="first images probed (default 200)")
    p.add_argument("--lr", type=float, default=0.01, help="SGD learning rate of the one step (default 0.01)")
    p.add_argument("--teacher-momentum", type=float, default=None,
                   help="EMA momentum of the one teacher update (default: the checkpoint's method.momentum)")
    p.add_argument("--split", choices=("train", "test"), default="train", help="image split (default train)")
    p.add_argument("--pool", type=int, default=2000, help="images read from the split (default 2000)")
    p.add_argument("--near-zero", type=float, default=0.1,
                   help="|mean cos| threshold for the 'near zero' verdict (default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="pairs and masks seed (default 0)")
    p.set_defaults(func=cmd_grad_alignment)

    p = ana.add_parser("teacher-free", parents=[common(checkpoint=False, output=False)],
                       help="rc-mae-free's correction vs the true consistency gradient at RC-MAE checkpoints",
                       description="At each checkpoint (rc-mae: D = S - T; rc-mae-free: T = S - D) compare the true "
                                   "consistency gradient with the teacher-free correction gamma * D A, per layer "
                                   "group (cosine, norm ratio). Writes teacher_free.png, table.md, summary.json.")
    p.add_argument("--checkpoint", nargs="+", required=True, metavar="CKPT", help="one or more checkpoints")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--batches", type=int, default=4, help="batches compared per checkpoint (default 4)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    p.add_argument("--seed", type=int, default=0, help="masks seed (default 0)")
    p.set_defaults(func=cmd_teacher_free)

    p = ana.add_parser("grad-hist", help="histograms of the logged cos(grad L_r, grad L_c) of runs (rc-mae Fig. 3b)",
                       description="Side-by-side histograms of the grad_cos values that RC-MAE runs trained with "
                                   "method.grad_align_every=K logged; labels from each run's config.yaml. Also "
                                   "writes FILE.json with the statistics.")
    p.add_argument("--runs", nargs="+", required=True, metavar="RUN",
                   help="run folders (or their metrics.jsonl), e.g. an RC-MAE-S and an RC-MAE-D run")
    p.add_argument("--out", required=True, metavar="FILE.png")
    p.add_argument("--near-zero", type=float, default=0.1,
                   help="|mean| threshold for 'centred near zero' (default 0.1)")
    p.set_defaults(func=cmd_grad_hist)


def _print_verdicts(verdicts: dict) -> None:
    from mimkit.analysis.trends import verdict_lines

    for line in verdict_lines(verdicts):
        print(line)


def cmd_linear_model(args) -> int:
    from mimkit.analysis.linear_model import LinearModelConfig, run_linear_model, write_outputs

    cfg = LinearModelConfig(
        dim=args.dim, clusters=args.clusters, points_per_cluster=args.points_per_cluster, mean_range=args.mean_range,
        wishart_df=args.wishart_df, scale_low=args.scale_low, scale_high=args.scale_high,
        cov_normalize=args.cov_normalize, mask_ratio=args.mask_ratio,
        lr=args.lr, sgd_momentum=args.sgd_momentum, teacher_momentum=args.teacher_momentum,
        batch_size=args.batch_size, iterations=args.iterations, runs=args.runs, probe_batch=args.probe_batch,
        probe_step=args.probe_step, shared_mask=not args.independent_masks, seed=args.seed, near_zero=args.near_zero,
    ).validate()
    t0 = time.perf_counter()
    curves = run_linear_model(cfg)
    free = run_linear_model(cfg, arm="free") if args.teacher_free else None
    png, js, summary = write_outputs(Path(args.out), curves, cfg, free)
    print(f"linear model: {cfg.runs} runs x {cfg.iterations} iterations in {time.perf_counter() - t0:.1f}s "
          f"-> {png}, {js}")
    _print_verdicts(summary["verdicts"])
    if free is not None:
        print(f"teacher-free arm: largest relative difference from the teacher arm's curves "
              f"{summary['teacher_free']['max_relative_curve_difference']:.2e}")
    return 0


def cmd_grad_alignment(args) -> int:
    from mimkit.analysis.vit_alignment import (AlignmentSettings, check_rc_mae, collect_pool, probe_pairs, summarize,
                                               write_outputs)
    from mimkit.api import load_method

    settings = AlignmentSettings(pairs=args.pairs, lr=args.lr, teacher_momentum=args.teacher_momentum,
                                 split=args.split, pool=args.pool, seed=args.seed, near_zero=args.near_zero).validate()
    t0 = time.perf_counter()
    cfg, method, data, device = load_method(args.checkpoint, args.overrides, args.device)
    check_rc_mae(method, args.checkpoint)
    momentum = float(settings.teacher_momentum if settings.teacher_momentum is not None else cfg.method.momentum)
    images, labels = collect_pool(data, settings.split, settings.pool, cfg.eval.batch_size, device)

    bar = None
    if not args.no_progress and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=settings.pairs, desc="grad-alignment pairs", leave=False)
    try:
        results = probe_pairs(method, images, labels, settings, momentum,
                              progress=(lambda done, total: bar.update(1)) if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    summary = summarize(results, settings, checkpoint=args.checkpoint, cfg=cfg, momentum=momentum)
    png, js = write_outputs(Path(args.out), results, summary)
    print(f"grad-alignment: {settings.pairs} pairs in {time.perf_counter() - t0:.1f}s -> {png}, {js}")
    _print_verdicts(summary["verdicts"])
    return 0


def cmd_teacher_free(args) -> int:
    from mimkit.analysis.teacher_free import FidelitySettings, fidelity, write_outputs
    from mimkit.analysis.vit_alignment import collect_pool
    from mimkit.interop.loading import open_checkpoint

    settings = FidelitySettings(batches=args.batches, batch_size=args.batch_size, seed=args.seed).validate()
    t0 = time.perf_counter()
    results, images = {}, None
    for ckpt in args.checkpoint:
        loaded = open_checkpoint(ckpt, overrides=args.overrides, device=args.device)
        if images is None:
            need = settings.batches * settings.batch_size
            images, _ = collect_pool(loaded.datamodule(), "train", need, loaded.config.eval.batch_size, loaded.device)
        label = f"{loaded.method_name} epoch {loaded.epoch}"
        results[label] = fidelity(loaded, images, settings)
    png, js, md = write_outputs(Path(args.out), results, {"checkpoints": list(args.checkpoint),
                                                         "settings": dataclasses.asdict(settings)})
    print(md)
    print(f"teacher-free fidelity: {len(results)} checkpoint(s) in {time.perf_counter() - t0:.1f}s -> {png}, {js}")
    return 0


def cmd_grad_hist(args) -> int:
    from mimkit.analysis.grad_hist import grad_histograms

    if not (0.0 <= args.near_zero <= 1.0):
        raise MimkitError(f"--near-zero must be a number in [0, 1], got {args.near_zero}")
    summary = grad_histograms(args.runs, Path(args.out), near_zero=args.near_zero)
    for r in summary["runs"]:
        print(f"{r['label']}: n={r['n']} mean cos {r['mean']:+.3f}, {100 * r['frac_negative']:.0f}% negative")
    for name, v in summary["verdicts"].items():
        print(f"  [{'holds ' if v['holds'] else 'FAILS '}] {name}: {v['claim']}")
    print(f"-> {args.out}, {Path(args.out).with_suffix('.json')}")
    return 0

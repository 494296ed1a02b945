"""CLI commands of the evaluation suite: ``mimkit eval knn``, ``mimkit eval linprobe``, ``mimkit eval robustness``
and ``mimkit finetune``.

Registered by :mod:`mimkit.cli` through ``register(groups, common)``. The commands only parse and dispatch;
the work is in :mod:`mimkit.eval.knn`, :mod:`mimkit.eval.linprobe`, :mod:`mimkit.finetune` and
:mod:`mimkit.eval.robustness`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from mimkit.errors import MimkitError


def register(groups, common) -> None:
    top, ev = groups["top"], groups["eval"]

    p = ev.add_parser("knn", parents=[common(checkpoint=True, which=True)], help="weighted kNN on frozen features")
    add_random_init(p)
    p.set_defaults(func=cmd_eval_knn)

    p = top.add_parser(
        "finetune", parents=[common(which=True)],
        help="end-to-end fine-tuning of a pre-trained encoder (RC-MAE paper, Table 10), or from scratch",
        description="Fine-tune the encoder of a pre-training checkpoint (its data and encoder shape come along) "
                    "with a finetune-* preset (--config) and --set overrides; --from-scratch trains the same "
                    "classifier from a random init (the baseline that shows what pre-training bought).",
    )
    p.add_argument("--checkpoint", metavar="PATH", help="pre-training checkpoint whose encoder is fine-tuned")
    p.add_argument("--from-scratch", action="store_true",
                   help="random init, same recipe (shapes/data from --checkpoint when given, else from --config/--set)")
    p.add_argument("--resume", action="store_true", help="continue the run in --output from checkpoints/last.pt")
    p.add_argument("--auto-resume", action="store_true",
                   help="continue from --output's checkpoints/last.pt when it exists (ignoring --config/--checkpoint, "
                        "which the first start used), else start fresh")
    p.set_defaults(func=cmd_finetune)

    p = ev.add_parser(
        "linprobe", parents=[common(checkpoint=True, which=True)],
        help="linear probe of the frozen encoder (RC-MAE paper, Table 11); aug.augment=false caches features",
    )

    add_random_init(p)
    p.set_defaults(func=cmd_eval_linprobe)

    p = ev.add_parser(
        "robustness", parents=[common(checkpoint=True)],
        help="errors of a fine-tuned classifier under 15 corruptions x 5 severities (mCE vs --baseline)",
        description="Takes a checkpoint written by `mimkit finetune` (best.pt or last.pt). --set overrides apply "
                    "to its saved settings (e.g. data.path, eval.batch_size).",
    )
    p.add_argument("--baseline", metavar="FILE.json",
                   help="eval_robustness.json of a reference model: adds normalised CE, mCE and relative mCE")
    p.add_argument("--corruptions", default="all", metavar="NAMES", help="comma-separated corruption names, or all")
    p.add_argument("--severities", default="1,2,3,4,5", metavar="LIST", help="comma-separated severities (1..5)")
    p.add_argument("--seed", type=int, default=0, help="corruption seed (same seed = same images for every model)")
    p.add_argument("--max-images", type=int, default=None, metavar="N", help="evaluate a fixed random subset of N test images (the same for every model)")
    p.set_defaults(func=cmd_eval_robustness)


def _show(args) -> bool:
    return not args.no_progress and sys.stderr.isatty()


def _extra_overrides(args, which_key: str | None = "eval.which") -> list[str]:
    extra = []
    if getattr(args, "device", None):
        extra.append(f"train.device={args.device}")
    if which_key and getattr(args, "which", None):
        extra.append(f"{which_key}={args.which}")
    return extra


# ------------------------------------------------------------------------------------------------ finetune
def cmd_finetune(args) -> int:
    from mimkit.interop.loading import read_pretraining_checkpoint
    from mimkit.config.finetune import build_finetune_config
    from mimkit.finetune import Init, finetune

    overrides = list(args.overrides) + _extra_overrides(args)
    if args.auto_resume:
        if args.resume or args.output is None:
            raise MimkitError("--auto-resume needs --output DIR (the run folder to continue or start) and "
                              "replaces --resume; pass one of them")
        if (Path(args.output) / "checkpoints" / "last.pt").is_file():
            finetune(None, args.output, resume=True, overrides=tuple(overrides),
                     show_progress=False if args.no_progress else None)
            return 0
    if args.resume:
        if args.output is None:
            raise MimkitError("--resume needs --output DIR, the fine-tuning run folder to continue")
        if args.config or args.checkpoint or args.from_scratch:
            raise MimkitError("--resume continues with the run's saved settings and weights; --config, --checkpoint "
                              "and --from-scratch are not accepted with it (use --set, e.g. --set train.epochs=50)")
        finetune(None, args.output, resume=True, overrides=tuple(overrides),
                 show_progress=False if args.no_progress else None)
        return 0
    ckpt = None
    if args.checkpoint:
        ckpt = read_pretraining_checkpoint(args.checkpoint)
    elif not args.from_scratch:
        raise MimkitError("mimkit finetune needs --checkpoint PATH (a pre-training checkpoint) or --from-scratch")
    cfg = build_finetune_config(args.config, overrides, ckpt["config"] if ckpt else None)
    output = args.output
    if output is None:
        name = Path(args.config).stem if args.config else "finetune"
        output = str(Path("runs") / f"{name}-{'scratch' if args.from_scratch else 'pretrained'}-"
                                    f"{time.strftime('%Y%m%d-%H%M%S')}")
    init = Init(args.checkpoint, args.which or cfg.eval.which, args.from_scratch)
    finetune(cfg, output, init=init, overrides=tuple(overrides), pretrained_ckpt=ckpt,
             show_progress=False if args.no_progress else None)
    return 0


# ------------------------------------------------------------------------------------------------ linprobe
def cmd_eval_linprobe(args) -> int:
    from mimkit.api import eval_result_name, evaluation_settings, record_evaluation, result_path
    from mimkit.config.linprobe import build_linprobe_config
    from mimkit.eval.linprobe import run_linprobe
    from mimkit.interop.loading import (check_data_channels, check_labelled, check_same_encoder, open_checkpoint,
                                     random_init_encoder)
    from mimkit.runtime import datamodule_from_config, resolve_device

    loaded = open_checkpoint(args.checkpoint)  # --set items are the probe's settings (train.epochs = probe epochs)
    overrides = list(args.overrides) + _extra_overrides(args)
    cfg = build_linprobe_config(args.config, overrides, loaded.config.to_dict())
    seed = random_init_seed(args, loaded.config)
    which = cfg.eval.which or loaded.default_which
    name = eval_result_name("linprobe", which=which, default_which=loaded.default_which, random_init=seed,
                            overrides=[o for o in overrides if not o.startswith("eval.which=")])
    out = result_path(args.checkpoint, args.output, name)
    encoder = random_init_encoder(loaded.config, loaded.in_chans, seed) if seed is not None else loaded.encoder(which)
    check_same_encoder(cfg.model, loaded.config.to_dict()["model"], loaded.in_chans, args.checkpoint)
    data = datamodule_from_config(cfg)
    check_labelled(data, "linear probing")
    check_data_channels(loaded.in_chans, data, args.checkpoint)
    device = resolve_device(cfg.train.device)
    tr = cfg.train
    what = f"encoder at initialisation (seed {seed})" if seed is not None else f"{which} encoder"
    print(f"linear probe: {what} of {args.checkpoint} ({loaded.method_name}), {cfg.eval.pool} features, "
          f"{data.num_train} train / test split of {data.name}, {tr.epochs} epochs, batch {tr.batch_size}, "
          f"{'augmented (RandomResizedCrop + flip)' if cfg.aug.augment else 'cached features (aug.augment=false)'}",
          flush=True)
    res = run_linprobe(encoder.to(device), data, cfg, device=device, show_progress=_show(args))
    res.update(evaluation_settings(loaded, data, which=which, random_init=seed, overrides=overrides),
               pool=cfg.eval.pool)
    record_evaluation(out, res)
    print(f"linear probe top-1 ({what}): {res['linprobe_top1']:.4f}  top-5 {res['linprobe_top5']:.4f} "
          f"(lr {res['lr']:.3g}, blr {res['blr']:.3g}{' auto' if res['blr_auto'] else ''}; {res['wall_time_s']:.0f}s)"
          f"  -> {out}")
    return 0


# ------------------------------------------------------------------------------------------------ robustness
def _parse_list(text: str, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise MimkitError(f"--{what} is empty; give a comma-separated list")
    return items


def load_classifier_checkpoint(checkpoint, overrides=(), device: str | None = None):
    """A fine-tuned classifier through the one checkpoint reader -> (fine-tuning cfg, model in eval mode, data,
    device); the data must be the one it was fine-tuned on (labels, channels, class count)."""
    from mimkit.interop.loading import check_labelled, open_checkpoint

    loaded = open_checkpoint(checkpoint, overrides=overrides, device=device)
    cfg = loaded.finetune_config()
    data = loaded.datamodule()
    check_labelled(data, "robustness evaluation")
    num_classes = loaded.classifier.num_classes
    if num_classes != len(data.classes):
        raise MimkitError(f"the classifier in {checkpoint} has {num_classes} classes but {data.name} has "
                          f"{len(data.classes)}; point data.* at the data set it was fine-tuned on")
    return cfg, loaded.classifier, data, loaded.device


def cmd_eval_robustness(args) -> int:
    from mimkit.api import result_path
    from mimkit.eval.corruptions import CORRUPTIONS, check_names
    from mimkit.eval.robustness import compare_with_baseline, evaluate_robustness, read_baseline
    from mimkit.train.runlog import write_json

    if args.config:
        raise MimkitError("eval robustness takes its settings from the fine-tuned checkpoint; --config is not "
                          "accepted (use --set, e.g. --set data.path=... or --set eval.batch_size=512)")
    if args.corruptions.strip() == "all":
        names = list(CORRUPTIONS)
    else:
        names = check_names(_parse_list(args.corruptions, "corruptions"))
    try:
        severities = [int(s) for s in _parse_list(args.severities, "severities")]
    except ValueError:
        raise MimkitError(f"--severities must be integers 1..5 separated by commas, got {args.severities!r}") from None
    baseline = read_baseline(args.baseline) if args.baseline else None
    out = result_path(args.checkpoint, args.output, "eval_robustness.json")
    cfg, model, data, device = load_classifier_checkpoint(args.checkpoint, args.overrides, args.device)
    res = evaluate_robustness(model, data, device=device, corruptions=names, severities=severities, seed=args.seed,
                              max_images=args.max_images, batch_size=cfg.eval.batch_size, show_progress=_show(args))
    if baseline is not None:
        res.update(compare_with_baseline(res, baseline, args.baseline))
    res["checkpoint"] = str(args.checkpoint)
    write_json(out, res)
    line = (f"robustness: clean error {res['clean_error']:.4f}, "
            f"mean corruption error {res['mean_corruption_error']:.4f} "
            f"({len(names)} corruptions x {len(severities)} severities, {res['num_images']} images)")
    if baseline is not None and res["mCE"] is not None:
        line += f", mCE {res['mCE']:.1f} / relative mCE {res['relative_mCE'] or float('nan'):.1f} vs {args.baseline}"
    print(f"{line}  -> {out}")
    return 0


# ------------------------------------------------------------------------------------------------ knn
def cmd_eval_knn(args) -> int:
    from mimkit.api import eval_result_name, evaluation_settings, record_evaluation, result_path
    from mimkit.eval.knn import evaluate_knn
    from mimkit.interop.loading import open_checkpoint, random_init_encoder

    loaded = open_checkpoint(args.checkpoint, overrides=args.overrides, device=args.device)
    cfg = loaded.config
    seed = random_init_seed(args, cfg)
    which = args.which or loaded.default_which
    if seed is not None:
        encoder = random_init_encoder(cfg, loaded.in_chans, seed).to(loaded.device)
    else:
        encoder = loaded.encoder(which)
    data = loaded.datamodule()
    name = eval_result_name("knn", which=which, default_which=loaded.default_which, random_init=seed,
                            overrides=args.overrides)
    out = result_path(args.checkpoint, args.output, name)
    res = evaluate_knn(encoder, data, device=loaded.device, k=cfg.eval.knn_k, temperature=cfg.eval.knn_t,
                       pool=cfg.eval.pool, batch_size=cfg.eval.batch_size,
                       show_progress=not args.no_progress and sys.stderr.isatty(),
                       log=None if args.no_progress else (lambda line: print(line, flush=True)))
    res.update(evaluation_settings(loaded, data, which=which, random_init=seed, overrides=args.overrides),
               k=cfg.eval.knn_k, t=cfg.eval.knn_t, pool=cfg.eval.pool)
    record_evaluation(out, res)
    what = f"encoder at initialisation, seed {seed}" if seed is not None else f"{which} encoder"
    print(f"kNN top-1 ({what}, k={cfg.eval.knn_k}, {cfg.eval.pool} pool): {res['knn_top1']:.4f}  -> {out}")
    return 0


def random_init_seed(args, cfg) -> int | None:
    """``--random-init [SEED]``: None when absent; the run's ``train.seed`` when given without a value."""
    value = getattr(args, "random_init", None)
    if value is None:
        return None
    if value == "run":
        return int(cfg.train.seed)
    try:
        return int(value)
    except ValueError:
        raise MimkitError(f"--random-init takes an integer seed (or nothing: the run's train.seed), got {value!r}") from None


def add_random_init(p) -> None:
    p.add_argument("--random-init", nargs="?", const="run", default=None, metavar="SEED",
                   help="evaluate the encoder at initialisation instead of the checkpoint's weights: the same config, "
                        "freshly initialised with SEED (default: the run's train.seed, i.e. the weights it started "
                        "from) - the baseline every pre-training result is read against")

"""``mimkit`` command line: subcommands only parse arguments and dispatch.

User mistakes (:class:`MimkitError`) print one line and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

from mimkit import __version__
from mimkit.errors import MimkitError


#: modules that add their own subcommands: each has ``register(groups, common)`` where ``groups`` maps
#: "top", "eval", "visualize", "analyze" to argparse sub-parser collections and ``common`` is :func:`_common`.
COMMAND_MODULES: list[str] = ["mimkit.bench", "mimkit.commands.interop", "mimkit.commands.visualize",
                             "mimkit.commands.analyze", "mimkit.commands.eval", "mimkit.commands.data"]


def _common(*, checkpoint: bool = False, which: bool = False, output: bool = True) -> argparse.ArgumentParser:
    """Options shared by the subcommands (one definition, reused via ``parents=``)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--config", metavar="NAME|FILE.yaml", help="preset name (see `mimkit presets`) or YAML file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, dotted key (repeatable), e.g. --set data.path=/data/photos; "
                        "every key: mimkit config --list")
    if output:
        p.add_argument("--output", metavar="DIR", help="folder for the result JSON (default: the checkpoint's run "
                       "folder)" if checkpoint else "run folder (default: runs/<preset>-<time>)")
    if checkpoint:
        p.add_argument("--checkpoint", metavar="PATH", required=True, help="a mimkit checkpoint (.pt)")
    if which:
        p.add_argument("--which", choices=("teacher", "student"), default=None,
                       help="encoder to use (default: the method's own; teacher for RC-MAE, student for MAE/SdAE)")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default=None, help="default: auto")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mimkit", description="mimkit: masked image modelling with mean teachers (MAE, RC-MAE, SdAE).")
    parser.add_argument("--version", action="version", version=f"mimkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", parents=[_common()], help="pre-train (no arguments: the embedded demo)",
                       description="Pre-train a ViT with MAE, RC-MAE or SdAE. Without arguments: the embedded demo "
                                   "(RC-MAE-S on a Fashion-MNIST subset, ~5 min on 2 CPU cores). Choose a preset or "
                                   "YAML file with --config and change any key with --set (mimkit config --list); "
                                   "the run folder gets config.yaml, train.log, metrics.jsonl, checkpoints/ and "
                                   "summary.json.")
    p.add_argument("--method", choices=("mae", "rc-mae", "sdae", "rc-mae-free"), help="shortcut for --set method.name=...")
    p.add_argument("--resume", action="store_true", help="continue the run in --output from checkpoints/last.pt")
    p.add_argument("--auto-resume", action="store_true",
                   help="continue from --output's checkpoints/last.pt when it exists, else start fresh (for "
                        "`torchrun --max-restarts=N ... mimkit pretrain --auto-resume`: a killed process recovers)")
    p.set_defaults(func=cmd_pretrain)

    ev = sub.add_parser("eval", help="evaluate a checkpoint's encoder").add_subparsers(dest="eval_command", required=True)
    vis = sub.add_parser("visualize", help="pictures").add_subparsers(dest="vis_command", required=True)
    ana = sub.add_parser("analyze", help="analyses of what the teacher does").add_subparsers(dest="analyze_command",
                                                                                              required=True)
    p = sub.add_parser("presets", help="list the shipped presets")
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("config", help="list every configuration key (type, default, meaning); docs/CONFIG.md",
                       description="Every key of pre-training, linear probe and fine-tuning, read from the typed "
                                   "config: mimkit config --list (the default) or --markdown (docs/CONFIG.md).")
    p.add_argument("--list", action="store_true", help="keys, defaults and meanings as plain text (default)")
    p.add_argument("--markdown", action="store_true", help="the same as a Markdown page (docs/CONFIG.md)")
    p.set_defaults(func=cmd_config)

    groups = {"top": sub, "eval": ev, "visualize": vis, "analyze": ana}
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(groups, _common)
    return parser


# ------------------------------------------------------------------------------------------ commands
def cmd_pretrain(args) -> int:
    from mimkit.config import build_config
    from mimkit.api import pretrain

    extra = {}
    if args.method:
        extra["method.name"] = args.method
    if args.device:
        extra["train.device"] = args.device
    if args.auto_resume:  # continue when the run folder has a checkpoint, else start fresh
        if args.resume or args.output is None:
            raise MimkitError("--auto-resume needs --output DIR (the run folder to continue or start) and "
                              "replaces --resume; pass one of them")
        args.resume = (Path(args.output) / "checkpoints" / "last.pt").is_file()
    output = args.output
    if output is None:
        if args.resume:
            raise MimkitError("--resume needs --output DIR, the run folder to continue")
        name = Path(args.config).stem if args.config else "demo"
        output = str(Path("runs") / f"{name}-{args.method or 'run'}-{time.strftime('%Y%m%d-%H%M%S')}")
    cfg = build_config(args.config, args.overrides, extra)
    notes = ()
    if not args.resume:
        check_preset_fits(args.config, cfg, args.overrides)
        notes = (f"mimkit pretrain: {describe_source(args.config)}",)  # the first line of train.log and the console
    pretrain(cfg, output, resume=args.resume, overrides=tuple(args.overrides),
             show_progress=False if args.no_progress else None, notes=notes)
    return 0


#: data sources the demo preset's 28 px one-channel model is made for
DEMO_SOURCES = ("demo", "fashion-mnist")


def describe_source(config: str | None) -> str:
    if config is None:
        return "preset demo (the default; --config NAME|FILE.yaml to choose, `mimkit presets` lists them)"
    return f"config file {config}" if config.endswith((".yaml", ".yml")) or Path(config).is_file() else f"preset {config}"


def check_preset_fits(config: str | None, cfg, overrides=()) -> None:
    """Without --config the demo preset applies: refuse to train its 28 px grey model on other data unless the
    image size was chosen explicitly (``--set model.img_size=...``)."""
    from mimkit.config import load_source, parse_override, preset_names
    from mimkit.data.sources import canonical_source_name

    if config is not None or any(parse_override(o)[0] == "model.img_size" for o in overrides):
        return
    source = canonical_source_name(cfg.data.name)
    if source in DEMO_SOURCES:
        return
    fits = [n for n in preset_names("pretrain") if (load_source(n).get("data") or {}).get("name") == source]
    hint = f"presets for {source}: {', '.join(fits)}" if fits else f"no shipped preset uses {source}"
    raise MimkitError(
        f"--set data.name={cfg.data.name} without --config would train the demo preset's model (28 px, 1 channel) "
        f"on it; choose a config with --config NAME or FILE.yaml ({hint}; all pre-training presets: "
        f"{', '.join(preset_names('pretrain'))}; or keep the demo recipe and size it: --set model.img_size=N; "
        "keys: mimkit config --list)"
    )


def cmd_presets(args) -> int:
    from mimkit.config import preset_description, preset_names

    for kind in ("pretrain", "finetune"):
        print(f"{kind} presets (mimkit {kind} --config NAME):")
        for name in preset_names(kind):
            print(f"  {name:24s} {preset_description(name)}")
    return 0


def cmd_config(args) -> int:
    from mimkit.config.reference import markdown, plain_list

    print(markdown() if args.markdown else plain_list(), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except MimkitError as e:
        print(f"mimkit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mimkit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

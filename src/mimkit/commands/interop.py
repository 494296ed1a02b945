"""Commands for working elsewhere: ``mimkit export`` and ``mimkit import``.

Registered by :mod:`mimkit.cli` through ``COMMAND_MODULES``; each command only parses and dispatches to
:mod:`mimkit.interop` (export, import, model cards).
"""

from __future__ import annotations

from pathlib import Path

from mimkit.errors import MimkitError


def register(groups, common) -> None:
    """Add the commands to the ``top`` sub-parser collection."""
    from mimkit.interop.export import FORMATS

    top = groups["top"]

    p = top.add_parser(
        "export", parents=[common(checkpoint=True, which=True, output=False)],
        help="write a checkpoint's encoder (timm, hf-vit) or MAE (hf) as a folder timm / transformers load",
    )
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="timm: encoder for timm; hf: ViTMAEForPreTraining (MAE, RC-MAE); hf-vit: ViTModel (any)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write (created; files in it replaced)")
    p.add_argument("--pool", choices=("cls", "mean"), default=None,
                   help="timm global pool: cls token or mean of patch tokens (default: the run's eval.pool)")
    p.add_argument("--check", action="store_true",
                   help="load the export back with timm / transformers and compare with ours")
    p.set_defaults(func=cmd_export)

    p = top.add_parser(
        "import", parents=[common(which=True, output=False)],
        help="official MAE / RC-MAE / SdAE checkpoint, timm or Hugging Face model -> a mimkit checkpoint",
    )
    p.add_argument("--checkpoint", required=True, metavar="FILE|DIR",
                   help=".pth/.pt/.bin/.safetensors file, or a timm / Hugging Face model folder")
    p.add_argument("--out", required=True, metavar="OURS.pt", help="mimkit checkpoint to write")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow full unpickling of files holding Python objects beyond tensors "
                        "(CAN RUN ARBITRARY CODE: only for files from a source you trust)")
    p.set_defaults(func=cmd_import)


# ------------------------------------------------------------------------------------------ commands
def cmd_export(args) -> int:
    from mimkit.interop.export import check_export, export_checkpoint

    path, which, module = export_checkpoint(args.checkpoint, args.format, args.out, which=args.which,
                                            overrides=args.overrides, pool=args.pool)
    what = {"hf": "MAE (encoder + decoder)", "timm": "encoder"}.get(args.format, "encoder")
    if which == "classifier":
        which, what = "fine-tuned", "classifier (encoder + head)"
    print(f"exported the {which} {what} as {args.format}: {path}")
    from mimkit.interop.modelcard import write_model_card

    print(f"model card: {write_model_card(path, args.format, args.checkpoint, which)}")
    if args.check:
        diff = check_export(path, args.format, module)
        print(f"check: loaded back, largest difference to mimkit's output {diff:.2e}")
        if not diff <= 1e-4:
            raise MimkitError(f"the export at {path} does not reproduce the checkpoint (difference {diff:.2e})")
    return 0


def _override(overrides, key: str):
    from mimkit.config import parse_override

    value = None
    for item in overrides:
        k, v = parse_override(item)
        if k == key:
            value = v
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise MimkitError(f"{key} must be a positive integer, got {value!r}")
    return value


#: config keys the imported weights fix (a --set may not contradict them)
FIXED_BY_WEIGHTS = ("model.img_size", "model.patch_size", "model.embed_dim", "model.depth", "model.mlp_ratio")


def _data_channels(cfg) -> int:
    from mimkit.data.sources import canonical_source_name

    if cfg.data.channels:
        return cfg.data.channels
    return {"demo": 1, "fashion-mnist": 1}.get(canonical_source_name(cfg.data.name), 3)


def cmd_import(args) -> int:
    from mimkit.config import build_config, parse_override
    from mimkit.interop import import_checkpoint
    from mimkit.interop.foreign import imported_checkpoint
    from mimkit.train.checkpoint import atomic_save

    imported = import_checkpoint(
        args.checkpoint, which=args.which, trust=args.trust_checkpoint,
        num_heads=_override(args.overrides, "model.num_heads"),
        decoder_heads=_override(args.overrides, "model.decoder_heads"),
    )
    values = imported.config_values()
    given = dict(parse_override(o) for o in args.overrides)
    for key in FIXED_BY_WEIGHTS:
        if key in given and given[key] != values[key]:
            raise MimkitError(f"{key}={given[key]} contradicts the imported weights ({values[key]}); leave it out")
    # without --config the imported weights become an MAE run (the demo preset's method is RC-MAE)
    base = [] if args.config else ["method.name=mae"]
    cfg = build_config(args.config, [*base, *args.overrides], values)
    chans = _data_channels(cfg)
    if chans != imported.spec.in_chans:
        raise MimkitError(
            f"the imported encoder takes {imported.spec.in_chans}-channel images but data {cfg.data.name!r} gives "
            f"{chans}; pass --set data.channels={imported.spec.in_chans} (converts the images) or choose the "
            "data with --config / --set data.name=..."
        )
    out = Path(args.out)
    if out.is_dir():
        raise MimkitError(f"--out {out} is a folder; give a file name such as {out / 'imported.pt'}")
    ckpt, notes = imported_checkpoint(imported, cfg, origin=str(args.checkpoint))
    atomic_save(ckpt, out)
    s = imported.spec
    entry = f", entry {imported.entry!r}" if imported.entry else ""
    print(f"imported {imported.which} weights ({imported.source} layout{entry}) from {args.checkpoint}")
    print(f"encoder: {s.img_size} px, patch {s.patch_size}, {s.in_chans} channel(s), width {s.embed_dim}, "
          f"depth {s.depth}, {s.num_heads} heads, mlp ratio {s.mlp_ratio:g}")
    for line in imported.notes + notes:
        print(f"note: {line}")
    print(f"wrote {out} (method {cfg.method.name}, data {cfg.data.name}); e.g. mimkit eval knn --checkpoint {out}")
    return 0

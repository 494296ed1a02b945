"""Commands for working elsewhere and looking at models: ``mimkit export``, ``mimkit import``,
``mimkit visualize attention`` and ``mimkit visualize reconstruction-compare``.

Registered by :mod:`mimkit.cli` through ``COMMAND_MODULES``; each command only parses and dispatches to
:mod:`mimkit.export`, :mod:`mimkit.interop` and :mod:`mimkit.attention`.
"""

from __future__ import annotations

from pathlib import Path

from mimkit.errors import MimkitError


def register(groups, common) -> None:
    """Add the commands to the ``top`` and ``visualize`` sub-parser collections."""
    from mimkit.attention import STYLES
    from mimkit.export import FORMATS

    top, vis = groups["top"], groups["visualize"]

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

    p = vis.add_parser(
        "attention", parents=[common(checkpoint=True, which=True, output=False)],
        help="last-layer attention maps: query patch (RC-MAE Fig. 4) or cls per head (SdAE Fig. S-3)",
    )
    p.add_argument("--out", required=True, metavar="FILE.png")
    p.add_argument("--style", choices=STYLES, default="rcmae",
                   help="rcmae: one query patch, mean over heads, top 10%% of the mass; sdae: cls attention per head")
    p.add_argument("--num-images", type=int, default=4)
    p.add_argument("--query-patch", type=int, default=None, metavar="IDX",
                   help="row-major patch index of the query (rcmae style; default: the centre patch)")
    p.add_argument("--mass", type=float, default=0.1, help="fraction of the attention mass kept (rcmae style)")
    p.add_argument("--both", action="store_true", help="draw the student and the teacher side by side")
    p.set_defaults(func=cmd_visualize_attention)

    p = vis.add_parser(
        "reconstruction-compare", parents=[common(checkpoint=True, output=False)],
        help="RC-MAE student and teacher reconstructions side by side, on the same masks",
    )
    p.add_argument("--out", required=True, metavar="FILE.png")
    p.add_argument("--num-images", type=int, default=6)
    p.add_argument("--seed", type=int, default=0, help="mask seed (same as `visualize reconstruction --seed`)")
    p.set_defaults(func=cmd_visualize_reconstruction_compare)


# ------------------------------------------------------------------------------------------ commands
def cmd_export(args) -> int:
    from mimkit.export import check_export, export_checkpoint

    path, which, module = export_checkpoint(args.checkpoint, args.format, args.out, which=args.which,
                                            overrides=args.overrides, pool=args.pool)
    what = {"hf": "MAE (encoder + decoder)", "timm": "encoder"}.get(args.format, "encoder")
    if which == "classifier":
        which, what = "fine-tuned", "classifier (encoder + head)"
    print(f"exported the {which} {what} as {args.format}: {path}")
    from mimkit.modelcard import write_model_card

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


def _check_count(n: int) -> None:
    if n < 1:
        raise MimkitError(f"--num-images must be >= 1, got {n}")


def cmd_visualize_attention(args) -> int:
    from mimkit.api import load_for_eval
    from mimkit.attention import save_attention_figure

    _check_count(args.num_images)
    loaded = load_for_eval(args.checkpoint, args.overrides, args.device, which=args.which)
    if args.both:
        encoders = {w: loaded.checkpoint.encoder(w) for w in ("student", "teacher")}
    else:
        encoders = {loaded.which: loaded.encoder}
    images = loaded.data.sample_images(args.num_images)
    png = save_attention_figure(encoders, images, args.out, loaded.data.mean, loaded.data.std, style=args.style,
                                query=args.query_patch, mass=args.mass)
    print(f"attention maps ({', '.join(encoders)}, {args.style} style): {png}")
    return 0


def cmd_visualize_reconstruction_compare(args) -> int:
    from mimkit.api import load_for_eval
    from mimkit.attention import save_teacher_student_reconstructions

    _check_count(args.num_images)
    loaded = load_for_eval(args.checkpoint, args.overrides, args.device)
    method = loaded.need_method("a student/teacher reconstruction picture")
    if loaded.checkpoint.raw.get("teacher") is None:
        raise MimkitError(f"reconstruction-compare draws a student and its EMA teacher; {args.checkpoint} (method "
                          f"{method.name}) has no teacher: `mimkit visualize reconstruction` draws its student")
    images = loaded.data.sample_images(args.num_images)
    png = save_teacher_student_reconstructions(method, images, args.out, loaded.data.mean, loaded.data.std,
                                               seed=args.seed)
    print(f"student and teacher reconstructions: {png}")
    return 0

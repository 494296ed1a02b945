"""Pictures of a checkpoint: ``mimkit visualize reconstruction``, ``attention`` and ``reconstruction-compare``.

Registered by :mod:`mimkit.cli` through ``COMMAND_MODULES``; each command only parses and dispatches to
:mod:`mimkit.viz` (reconstructions, attention maps).
"""

from __future__ import annotations

from pathlib import Path

from mimkit.errors import MimkitError


def register(groups, common) -> None:
    """Add the commands to the ``visualize`` sub-parser collection."""
    from mimkit.viz.attention import STYLES

    vis = groups["visualize"]
    p = vis.add_parser("reconstruction", parents=[common(checkpoint=True, which=True, output=False)],
                       help="original | masked | prediction | pasted, fixed masks")
    p.add_argument("--out", required=True, metavar="FILE.png")
    p.add_argument("--num-images", type=int, default=8)
    p.add_argument("--seed", type=int, default=0, help="mask seed (same seed = same masks for any checkpoint)")
    p.set_defaults(func=cmd_visualize_reconstruction)


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
def cmd_visualize_reconstruction(args) -> int:
    from mimkit.api import load_for_eval
    from mimkit.viz.reconstructions import save_reconstruction_grid

    loaded = load_for_eval(args.checkpoint, args.overrides, args.device, which=args.which)
    method = loaded.need_method("a reconstruction picture")
    images = loaded.data.sample_images(args.num_images)
    png = save_reconstruction_grid(method, images, Path(args.out), loaded.data.mean, loaded.data.std,
                                   seed=args.seed, which=loaded.which)
    if png is None:
        raise MimkitError(f"method {loaded.method.name} does not predict pixels; no reconstruction to draw")
    print(f"reconstructions ({loaded.which}): {png}")
    return 0


def _check_count(n: int) -> None:
    if n < 1:
        raise MimkitError(f"--num-images must be >= 1, got {n}")


def cmd_visualize_attention(args) -> int:
    from mimkit.api import load_for_eval
    from mimkit.viz.attention import save_attention_figure

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
    from mimkit.viz.attention import save_teacher_student_reconstructions

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

"""``mimkit shards``: write WebDataset tar shards from an image folder or a Hugging Face ``datasets`` folder.

Registered by :mod:`mimkit.cli` through ``COMMAND_MODULES``; the work is :func:`mimkit.data.shards.write_shards`.
"""

from __future__ import annotations


def register(groups, common) -> None:
    """Add ``shards`` to the top-level commands."""
    p = groups["top"].add_parser(
        "shards", help="write WebDataset .tar shards (+ shardindex.json) from an image folder or a datasets folder")
    p.add_argument("--source", required=True, metavar="DIR",
                   help="image folder (ROOT/<class>/..., ROOT/train + ROOT/test) or datasets folder (save_to_disk / parquet)")
    p.add_argument("--out", required=True, metavar="DIR", help="writes DIR/train/shard-NNNNNN.tar (and DIR/test/)")
    p.add_argument("--shard-size", type=int, default=1000, metavar="N", help="samples per shard (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the one-time shuffle before sharding")
    p.add_argument("--image-key", default=None, help="datasets image column (default: detected)")
    p.add_argument("--label-key", default=None, help="datasets label column (default: detected)")
    p.set_defaults(func=cmd_shards)


def cmd_shards(args) -> int:
    from mimkit.data.shards import write_shards

    report = write_shards(args.source, args.out, shard_size=args.shard_size, seed=args.seed,
                          image_key=args.image_key, label_key=args.label_key, log=print)
    split = "train" if "test" not in report else "train/test"
    print(f"wrote {sum(r['shards'] for r in report.values())} shard(s) to {args.out}; train with "
          f"--set data.name=webdataset --set data.path={args.out}" + (f" ({split} splits)" if "test" in report else ""))
    return 0

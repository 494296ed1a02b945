"""1-process vs N-process DDP (torchrun) throughput of `mimkit pretrain` at the same global batch.

    python benchmarks/ddp_scaling.py                          # CIFAR-10, ViT-Tiny/4 @ 32, global batch 128, 2 cores
    python benchmarks/ddp_scaling.py --nproc 2 --threads 2    # e.g. on a 4-core machine

Runs the real trainer (data pipeline, forward, backward, all-reduce, AdamW, logging) for a short epoch, first
as one process with ``nproc x threads`` threads, then under torchrun with ``nproc`` processes of ``threads``
threads each (gloo on CPU, NCCL on CUDA), and reads the median images/s the trainer logged (global images over
wall time of each logging window). Writes a section of docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cifar10" / "cifar10-jpeg.tar.gz"
TITLE = "### DDP scaling: 1 process vs torchrun"


def run(cmd: list[str], threads: int, out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    t = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd[:6])} ... failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    summary["process_wall_s"] = time.time() - t
    return summary


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=os.environ.get("MIMKIT_CIFAR10", str(DEFAULT_DATA)))
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="threads per DDP process (the single process gets nproc x)")
    p.add_argument("--batch", type=int, default=128, help="global batch")
    p.add_argument("--images", type=int, default=5120, help="training images (one epoch)")
    p.add_argument("--method", default="mae", choices=("mae", "rc-mae", "sdae"))
    p.add_argument("--out", default=str(ROOT / "docs" / "PERFORMANCE.md"))
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    if args.batch % args.nproc:
        p.error(f"--batch {args.batch} must be divisible by --nproc {args.nproc}")
    if not Path(args.data).exists():
        print(f"error: CIFAR-10 not found at {args.data}; pass --data PATH", file=sys.stderr)
        return 2
    common = ["--config", "cifar10-vit-tiny", "--no-progress", "--method", args.method,
              *[x for o in (f"data.path={Path(args.data).resolve()}", f"data.max_train={args.images}",
                            "data.max_test=500", "train.epochs=1", "train.warmup_epochs=0.1", "train.log_every=4",
                            "eval.knn_every=0") for x in ("--set", o)]]
    with tempfile.TemporaryDirectory() as tmp:
        one, many = Path(tmp) / "one", Path(tmp) / "many"
        s1 = run([sys.executable, "-m", "mimkit", "pretrain", *common, "--output", str(one),
                  "--set", f"train.batch_size={args.batch}"], args.nproc * args.threads, one)
        sn = run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}",
                  "--rdzv-backend=c10d", "--rdzv-endpoint=localhost:0", "-m", "mimkit", "pretrain", *common,
                  "--output", str(many), "--set", f"train.batch_size={args.batch // args.nproc}"], args.threads, many)
    r1, rn = s1["imgs_per_s_median"], sn["imgs_per_s_median"]
    lines = [TITLE, "",
             f"{time.strftime('%Y-%m-%d')}; `mimkit pretrain --method {args.method}` on CIFAR-10 (ViT-Tiny/4 @ 32, "
             f"decoder 128 x 4), global batch {args.batch}, one epoch of {args.images} images; median images/s of "
             f"the trainer's logging windows (every 4 steps); {os.cpu_count()} CPU cores.", "",
             "| setup | processes x threads | imgs/s | relative | final loss |", "|---|---|---|---|---|",
             f"| one process | 1 x {args.nproc * args.threads} | {r1:.1f} | 1.000 | {s1['final_loss']:.4f} |",
             f"| torchrun DDP (gloo) | {args.nproc} x {args.threads} | {rn:.1f} | {rn / r1:.3f} | "
             f"{sn['final_loss']:.4f} |", "",
             "Both runs see the same images, crops and masks (the global batch is split across ranks), so their "
             "losses agree to float tolerance (tests/test_distributed.py checks it step by step).", "",
             f"Command: `python benchmarks/ddp_scaling.py {' '.join(sys.argv[1:])}`".replace("  ", " ").rstrip(), ""]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        from mimkit.bench import write_section
        write_section(Path(args.out), text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

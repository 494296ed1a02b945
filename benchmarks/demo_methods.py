"""The demo recipe with each method at the same budget: kNN of teacher and student, wall time.

    python benchmarks/demo_methods.py [--runs runs/demo-methods] [--methods mae,rc-mae-s,rc-mae-d,sdae]

Resumable: a finished run (summary.json present) is not repeated, an interrupted one continues from its
last checkpoint. Writes docs/DEMO_METHODS.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

VARIANTS = {
    "mae": ["--method", "mae"],
    "rc-mae-s": ["--method", "rc-mae", "--set", "method.mask_mode=same"],
    "rc-mae-d": ["--method", "rc-mae", "--set", "method.mask_mode=different"],
    "sdae": ["--method", "sdae"],
}


def mimkit(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "mimkit", *args], check=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default="runs/demo-methods")
    p.add_argument("--methods", default=",".join(VARIANTS))
    p.add_argument("--out", default="docs/DEMO_METHODS.md")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()
    rows = []
    for name in args.methods.split(","):
        run = Path(args.runs) / name
        extra = [x for o in args.overrides for x in ("--set", o)]
        if not (run / "summary.json").exists():
            resume = ["--resume"] if (run / "checkpoints" / "last.pt").exists() else []
            mimkit("pretrain", "--output", str(run), "--no-progress", *VARIANTS[name], *extra, *resume)
        summary = json.loads((run / "summary.json").read_text())
        knn = {}
        for which in ("student", "teacher"):
            if name == "mae" and which == "teacher":
                continue
            out = run / f"knn_{which}"
            if not (out / "eval_knn.json").exists():
                mimkit("eval", "knn", "--checkpoint", str(run / "checkpoints" / "last.pt"), "--which", which,
                       "--output", str(out), "--no-progress")
            knn[which] = json.loads((out / "eval_knn.json").read_text())["knn_top1"]
        rows.append((name, summary, knn))
    lines = ["# The demo recipe with each method", "",
             "Same data (embedded Fashion-MNIST 10k/2k), encoder (ViT 6 x 128, patch 7 at 28 px), epochs, "
             "augmentation and seed; only the method changes. kNN top-1 (k = 20, T = 0.07, mean-pooled features).", "",
             "| method | kNN student | kNN teacher | kNN at init | final loss | wall time (s) | imgs/s |",
             "|---|---|---|---|---|---|---|"]
    for name, s, knn in rows:
        lines.append(f"| {name} | {knn.get('student', float('nan')):.4f} | "
                     + (f"{knn['teacher']:.4f}" if "teacher" in knn else "-")
                     + f" | {s.get('knn_top1_init', float('nan')):.4f} | {s['final_loss']:.4f} | "
                       f"{s['wall_time_s']:.0f} | {s['imgs_per_s_median']:.0f} |")
    lines += ["", f"Command: `python benchmarks/demo_methods.py {' '.join(sys.argv[1:])}`".rstrip(), ""]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

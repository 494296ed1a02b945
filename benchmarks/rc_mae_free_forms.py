"""rc-mae-free's two equal ways to form the correction ``[D_W | D_b] A``, timed against MAE, interleaved.

Rows (one process, one thread unless ``--threads``; every round times each row in turn; medians of the rounds):

* ``mae``: MAE's step (forward, backward, AdamW);
* ``free-auto``: rc-mae-free as it runs (each layer takes the cheaper form: the second-moment ``A`` or the
  per-token product with ``D``);
* ``free-A-everywhere``: every layer accumulates ``A`` (the only form before the direct one existed);
* ``free-4-tokens`` and ``free-head``: the cost knobs ``method.correction_tokens=4`` and
  ``method.correction_scope=head`` (auto forms).

    taskset -c 1 python benchmarks/rc_mae_free_forms.py --size study --rounds 5 --steps 4

``--size study``: the CIFAR-10 study's fair profile (ViT 6 x 128, patch 4 at 32 px, decoder 1 x 96, batch 64);
``--size tiny``: ViT-Tiny/4 at 32 px (12 x 192, decoder 2 x 128), batch 128; ``--size small``: ViT-S/16 at 224 px
with its default decoder (256 x 4, as ``mimkit bench --model vit_small``), batch 32.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mimkit.config import build_config
from mimkit.methods import build_method
from mimkit.train.optim import build_adamw

SIZES = {  # overrides, batch, image side
    "study": (["model.img_size=32", "model.patch_size=4", "model.embed_dim=128", "model.depth=6",
               "model.num_heads=4", "model.decoder_dim=96", "model.decoder_depth=1", "model.decoder_heads=4"], 64, 32),
    "tiny": (["model.img_size=32", "model.patch_size=4", "model.embed_dim=192", "model.depth=12", "model.num_heads=3",
              "model.decoder_dim=128", "model.decoder_depth=2", "model.decoder_heads=4"], 128, 32),
    "small": (["model.name=vit_small", "model.img_size=224", "model.patch_size=16", "model.embed_dim=null",
               "model.depth=null", "model.num_heads=null", "model.decoder_dim=null", "model.decoder_depth=null",
               "model.decoder_heads=null", "model.drop_path=0.0"], 32, 224),
}
ROWS = {"mae": ["method.name=mae"], "free-auto": ["method.name=rc-mae-free"],
        "free-A-everywhere": ["method.name=rc-mae-free"],
        "free-4-tokens": ["method.name=rc-mae-free", "method.correction_tokens=4"],
        "free-head": ["method.name=rc-mae-free", "method.correction_scope=head"]}


class Row:
    def __init__(self, name: str, size: str):
        model, self.batch, side = SIZES[size]
        cfg = build_config(None, [*model, *ROWS[name]])
        torch.manual_seed(0)
        self.method = build_method(cfg, 3)
        if name == "free-A-everywhere":
            for tap in self.method._taps:
                tap.direct = False
        self.opt = build_adamw(self.method.student.named_parameters(), 1e-4, 0.05, (0.9, 0.95))
        self.x = torch.randn(self.batch, 3, side, side)
        self.steps = 0

    def step(self) -> None:
        from mimkit.methods.base import Progress

        self.steps += 1
        prog = Progress(self.steps, 0, 10**6, 10**6, 1)
        self.method(self.x).loss.backward()
        self.method.before_optimizer_step(prog)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.method.after_optimizer_step(prog)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="study")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=4, help="timed steps per row per round")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rows", default=",".join(ROWS), help="comma list of: " + ", ".join(ROWS))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    names = args.rows.split(",")
    rows = {n: Row(n, args.size) for n in names}
    for r in rows.values():  # warm-up
        r.step()
        r.step()
    times: dict[str, list[float]] = {n: [] for n in names}
    for rnd in range(args.rounds):
        for n, r in rows.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                r.step()
            times[n].append((time.perf_counter() - t0) / args.steps)
        print(f"round {rnd + 1}: " + ", ".join(f"{n} {times[n][-1] * 1e3:.0f} ms" for n in names), flush=True)
    print(f"\n| row ({args.size}, batch {rows[names[0]].batch}, {args.threads} thread) | step (ms, median) | "
          f"time / {names[0]} (median of per-round ratios) | range over rounds |\n|---|---|---|---|")
    for n in names:
        ratios = [t / b for t, b in zip(times[n], times[names[0]])]
        print(f"| {n} | {statistics.median(times[n]) * 1e3:.1f} | {statistics.median(ratios):.3f} | "
              f"{min(ratios):.2f}-{max(ratios):.2f} |")


if __name__ == "__main__":
    main()

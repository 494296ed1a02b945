"""Two mimkit jobs on one machine: throughput of each, alone and side by side, per thread setting.

Each job is a separate process running MAE pre-training steps (ViT-Tiny/4 at 32 px, batch 64: forward, backward,
AdamW) for a fixed time after a warm-up, and reports images/s. Scenarios, each on the cores given by ``--cores``
(``taskset``):

* ``solo``: one job alone;
* ``pair``: two jobs started together; each job's rate is compared with the solo rate of the same setting.

Settings: torch intra-op threads (``--threads``, e.g. ``1,2``) x OpenMP wait policy (``ACTIVE``: spin while waiting
for work, GNU OpenMP's behaviour for its spin count; ``PASSIVE``: sleep at once, what mimkit's CLI sets by default).

    python benchmarks/threads.py --cores 1 --threads 1,2 --seconds 20

On a machine where another long job holds some cores, pass only free cores: with ``--cores 1`` both jobs share
one core, so a fair share is 0.5x of solo each; a thread setting that oversubscribes (2 threads on 1 core) shows
what spinning threads cost when they outnumber the cores, which is the two-jobs-on-two-cores case in miniature.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

WORKER = r"""
import json, os, sys, time
import torch
threads, seconds = int(sys.argv[1]), float(sys.argv[2])
torch.set_num_threads(threads)
from mimkit.config import build_config
from mimkit.methods import build_method
from mimkit.train.optim import build_adamw
cfg = build_config(None, ["model.img_size=32", "model.patch_size=4", "model.embed_dim=192", "model.depth=12",
                          "model.num_heads=3", "model.decoder_dim=128", "model.decoder_depth=2",
                          "model.decoder_heads=4", "method.name=mae"])
torch.manual_seed(0)
method = build_method(cfg, 3)
opt = build_adamw(method.student.named_parameters(), 1e-4, 0.05, (0.9, 0.95))
x = torch.randn(64, 3, 32, 32)
def step():
    out = method(x)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
for _ in range(3):
    step()
n, t0 = 0, time.perf_counter()
while time.perf_counter() - t0 < seconds:
    step()
    n += 1
print(json.dumps({"imgs_per_s": n * 64 / (time.perf_counter() - t0), "steps": n}))
"""


def run_jobs(n_jobs: int, threads: int, policy: str, cores: str, seconds: float) -> list[float]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "OMP_WAIT_POLICY": policy, "KMP_BLOCKTIME": "0" if policy == "PASSIVE" else "200"}
    env.pop("GOMP_SPINCOUNT", None)
    procs = [subprocess.Popen(["taskset", "-c", cores, sys.executable, "-c", WORKER, str(threads), str(seconds)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(n_jobs)]
    rates = []
    for p in procs:
        out, err = p.communicate()
        if p.returncode:
            raise SystemExit(f"worker failed: {err[-2000:]}")
        rates.append(json.loads(out.strip().splitlines()[-1])["imgs_per_s"])
    return rates


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cores", default="1", help="taskset core list both jobs run on (default: 1)")
    ap.add_argument("--threads", default="1,2", help="comma-separated intra-op thread counts to compare")
    ap.add_argument("--policies", default="ACTIVE,PASSIVE", help="OpenMP wait policies to compare")
    ap.add_argument("--seconds", type=float, default=20.0, help="timed seconds per job (after 3 warm-up steps)")
    args = ap.parse_args(argv)
    rows = []
    for threads in [int(t) for t in args.threads.split(",")]:
        for policy in args.policies.split(","):
            solo = run_jobs(1, threads, policy, args.cores, args.seconds)[0]
            pair = run_jobs(2, threads, policy, args.cores, args.seconds)
            rows.append({"threads": threads, "policy": policy, "solo": solo, "pair": pair,
                         "ratio": [r / solo for r in pair]})
            print(f"threads={threads} {policy:7s} solo {solo:7.1f} img/s | two jobs {pair[0]:7.1f} + {pair[1]:7.1f} "
                  f"img/s = {pair[0] / solo:.2f}x + {pair[1] / solo:.2f}x of solo", flush=True)
    print(f"\ncores {args.cores}; {time.strftime('%Y-%m-%d %H:%M')}; command: python benchmarks/threads.py "
          + " ".join(argv if argv is not None else sys.argv[1:]))
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

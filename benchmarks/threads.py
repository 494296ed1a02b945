"""Two mimkit jobs on one machine: throughput of each, alone and side by side, per thread setting.

Each job is a separate process running MAE pre-training steps (ViT-Tiny/4 at 32 px, batch 64: forward, backward,
AdamW) for a fixed time after a warm-up, and reports images/s. Scenarios, each on the cores given by ``--cores``
(``taskset``):

* ``solo``: one job alone;
* ``pair``: two jobs started together; each job's rate is compared with the solo rate of the same setting.

Settings: torch intra-op threads (``--threads``, e.g. ``1,2``) x policy (``--policies``): ``ACTIVE`` (OpenMP
threads spin while waiting for work), ``PASSIVE`` (they sleep at once), ``DEFAULT`` (neither variable set: the
runtime decides; GNU OpenMP spins a while, then sleeps), ``SPIN<N>`` (``GOMP_SPINCOUNT=N``) and ``SHARE`` (DEFAULT
plus :class:`mimkit.runtime.CoreShare`, which the training engine uses: live jobs split the threads). With
``--repeats R`` every setting is measured solo and paired in each of R rounds, in turn, and medians are reported.

    python benchmarks/threads.py --cores 0,1 --threads 2 --policies DEFAULT,SHARE,PASSIVE --seconds 12 --repeats 3

On a machine where another long job holds some cores, pass only free cores (``--cores 1``: both jobs share one
core, a fair share is 0.5x of solo each), or pause that job for the measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import statistics
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
share = None
if os.environ.get("MIMKIT_JOBS_DIR"):  # policy SHARE: mimkit's CoreShare, as the training engine calls it
    from mimkit.runtime import CoreShare
    share = CoreShare(every_s=1.0)
for _ in range(3):
    step()
n, t0 = 0, time.perf_counter()
while time.perf_counter() - t0 < seconds:
    step()
    n += 1
    if share is not None:
        share.adjust()
if share is not None:
    share.close()
print(json.dumps({"imgs_per_s": n * 64 / (time.perf_counter() - t0), "steps": n}))
"""


def run_jobs(n_jobs: int, threads: int, policy: str, cores: str, seconds: float) -> list[float]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "OMP_WAIT_POLICY": policy, "KMP_BLOCKTIME": "0" if policy == "PASSIVE" else "200"}
    env.pop("GOMP_SPINCOUNT", None)
    env.pop("MIMKIT_JOBS_DIR", None)
    if policy == "SHARE":  # the runtime's own wait policy, threads shared by mimkit.runtime.CoreShare
        env["MIMKIT_JOBS_DIR"] = tempfile.mkdtemp(prefix="mimkit-jobs-bench-")
    if policy in ("DEFAULT", "SHARE") or policy.startswith("SPIN"):  # the runtime's own behaviour (GNU: spin a while, then sleep)
        for key in ("OMP_WAIT_POLICY", "KMP_BLOCKTIME"):
            env.pop(key)
        if policy.startswith("SPIN"):  # SPIN<N>: GNU OpenMP spins N iterations before it sleeps
            env["GOMP_SPINCOUNT"] = policy[4:]
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
    ap.add_argument("--policies", default="DEFAULT,SHARE,PASSIVE",
                    help="OpenMP wait policies to compare: ACTIVE, PASSIVE, DEFAULT (neither variable set: the runtime's own "
                         "choice), SPIN<N> (GOMP_SPINCOUNT=N: spin N iterations, then sleep), SHARE (DEFAULT plus "
                         "mimkit.runtime.CoreShare, what the training engine does)")
    ap.add_argument("--seconds", type=float, default=20.0, help="timed seconds per job (after 3 warm-up steps)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="rounds; each round measures every setting solo and paired, in turn (interleaved), and the "
                         "table gives medians over rounds")
    args = ap.parse_args(argv)
    settings = [(int(t), policy) for t in args.threads.split(",") for policy in args.policies.split(",")]
    solos: dict = {k: [] for k in settings}
    pairs: dict = {k: [] for k in settings}
    for r in range(args.repeats):
        for threads, policy in settings:
            solos[threads, policy].append(run_jobs(1, threads, policy, args.cores, args.seconds)[0])
            pairs[threads, policy].append(run_jobs(2, threads, policy, args.cores, args.seconds))
            print(f"round {r + 1}: threads={threads} {policy:7s} solo {solos[threads, policy][-1]:7.1f} img/s | two "
                  f"jobs {pairs[threads, policy][-1][0]:7.1f} + {pairs[threads, policy][-1][1]:7.1f} img/s", flush=True)
    best_solo = max(statistics.median(v) for v in solos.values())
    rows = []
    for threads, policy in settings:
        solo = statistics.median(solos[threads, policy])
        each = statistics.median([x for pair in pairs[threads, policy] for x in pair])
        rows.append({"threads": threads, "policy": policy, "solo": solos[threads, policy],
                     "pair": pairs[threads, policy], "solo_median": solo, "pair_each_median": each,
                     "each_vs_own_solo": each / solo, "each_vs_best_solo": each / best_solo})
        print(f"threads={threads} {policy:7s} solo {solo:7.1f} img/s (median) | two jobs {each:7.1f} img/s each "
              f"(median) = {each / solo:.2f}x of this setting's solo, {each / best_solo:.2f}x of the best solo",
              flush=True)
    print(f"\ncores {args.cores}; {time.strftime('%Y-%m-%d %H:%M')}; command: python benchmarks/threads.py "
          + " ".join(argv if argv is not None else sys.argv[1:]))
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

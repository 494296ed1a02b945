"""Small-scale reproduction study on CIFAR-10: do the papers' claims hold, measured honestly?

    python benchmarks/cifar10_study.py --profile fair --jobs 1 --threads 1   # run or continue, write docs/RESULTS.md
    python benchmarks/cifar10_study.py --profile fair --report-only          # rewrite the report from what finished
    python benchmarks/cifar10_study.py --profile fair --estimate             # CPU-hours of the profile, then exit

MAE, RC-MAE-S, RC-MAE-D, SdAE (multifold) and RC-MAE-free are pre-trained with the same encoder, data, schedule and
augmentations, on paired seeds; every run is evaluated with frozen features (kNN and the cached-feature linear
probe, cls and mean pooling, teacher and student) at four points of the run, and its probe classifier under 15
corruptions. docs/RESULTS.md gets the regime check of every teacher, the sanity gates, one table per claim with a
pre-declared verdict rule (Holm-corrected directional tests, TOST equivalence), and the paper's number only where
it is the same metric.

The package ``study/`` beside this file holds the parts: profiles.py (what runs), tasks.py (task graph and
scheduler), evaluate.py (the child processes' measurements), stats.py (the verdict rules), report.py (the page).
Resumable at every level; run it on one core in the background and the report rewrites itself as tasks finish.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from study.profiles import PROFILES  # noqa: E402
from study.tasks import ROOT, Study, Task, run_tasks  # noqa: E402,F401

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cifar10" / "cifar10-jpeg.tar.gz"


def estimate(profile: str, seeds: list[int], repeats: int = 4) -> dict:
    """CPU-hours of a profile on this machine (one thread), from a few interleaved steps of every variant and a
    few encoder forwards; printed before running so a profile can be sized to the budget."""
    import torch

    from mimkit.config import build_config
    from mimkit.methods import Progress, build_method
    from mimkit.train.optim import build_adamw
    from study.profiles import run_sets
    from study.tasks import Study as _S

    torch.set_num_threads(1)
    prof = PROFILES[profile]
    st = _S(argparse.Namespace(profile=profile, runs="unused", seeds=",".join(map(str, seeds)), data="unused"))
    x = torch.randn(prof["batch"], 3, 32, 32)
    step_s, enc = {}, None
    for v in st.variants():
        try:
            cfg = build_config("cifar10-vit-tiny", ["data.path=unused", *run_sets(profile, v)])
        except Exception as e:  # noqa: BLE001 - a variant this mimkit cannot build is reported
            print(f"  {v}: cannot build ({e}); not counted")
            continue
        torch.manual_seed(0)
        m = build_method(cfg, 3)
        enc = enc or m.encoder("student")
        opt = build_adamw(m.student.named_parameters(), 1e-4, 0.05, (0.9, 0.95))
        times = []
        for i in range(repeats + 1):  # CPU time, not wall time: a busy machine does not inflate the estimate
            t = time.process_time()
            m(x).loss.backward()
            if getattr(m, "edits_gradients", False):
                m.before_optimizer_step(Progress(i + 1, 0, 100, 10**6, 1))
            opt.step()
            opt.zero_grad(set_to_none=True)
            m.after_optimizer_step(Progress(i + 1, 0, 100, 10**6, 1))
            times.append(time.process_time() - t)
        step_s[v] = sorted(times[1:])[len(times[1:]) // 2]
    with torch.no_grad():
        enc.eval()
        imgs = torch.randn(256, 3, 32, 32)
        enc.forward_features(imgs)
        t = time.process_time()
        enc.forward_features(imgs)
        fwd = (time.process_time() - t) / 256
    steps = prof["epochs"] * (prof["train_images"] // prof["batch"])
    train_h = {v: len(st.seeds_of(v)) * steps * s * 1.1 / 3600 for v, s in step_s.items()}  # +10 % data, logging
    frozen = [t for t in st.tasks() if t.kind == "frozen"]
    robust = sum("--robust-images" in t.build() for t in frozen)
    bank = prof.get("eval_train_images") or prof["train_images"]
    eval_h = (len(frozen) * ((bank + 10_000) * fwd + 30)  # one forward of bank + test split, two small probes
              + robust * prof["robust_images"] * 76 * fwd * 1.5) / 3600  # 75 corrupted copies + clean
    eval_h += len(st.runs()) * ((prof["train_images"] + 10_000) * fwd) / 3600  # each run's own final kNN
    return {"step_s": step_s, "train_h": train_h, "eval_h": eval_h, "frozen_tasks": len(frozen),
            "total_h": sum(train_h.values()) + eval_h}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_frozen"]:
        from study.evaluate import cmd_frozen
        return cmd_frozen(argv[1:])
    if argv[:1] == ["_cost"]:
        from study.evaluate import cmd_cost
        return cmd_cost(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=os.environ.get("MIMKIT_CIFAR10", str(DEFAULT_DATA)),
                   help="CIFAR-10 folder or archive (default: $MIMKIT_CIFAR10 or ../shared/data/cifar10/...)")
    p.add_argument("--profile", default="fair", choices=sorted(PROFILES))
    p.add_argument("--runs", default=None, help="run folders (default: runs/cifar10-study-<profile>)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds; the profile says how many each variant uses")
    p.add_argument("--jobs", type=int, default=1, help="tasks at a time")
    p.add_argument("--threads", type=int, default=1, help="torch threads per task")
    p.add_argument("--only", default=None, help="comma list of task kinds to run: pretrain,frozen,finetune,cost")
    p.add_argument("--report-only", action="store_true", help="only rewrite the report from finished runs")
    p.add_argument("--estimate", action="store_true", help="print the profile's estimated CPU-hours and exit")
    p.add_argument("--out", default=str(ROOT / "docs" / "RESULTS.md"))
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    args.runs = args.runs or str(ROOT / "runs" / f"cifar10-study-{args.profile}")
    args.out_dir = str(Path(args.out).resolve().parent)
    for name, value in (("--jobs", args.jobs), ("--threads", args.threads)):
        if value < 1:
            p.error(f"{name} must be >= 1, got {value}")
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        p.error(f"--seeds must be integers separated by commas, got {args.seeds!r}")
    if not seeds or len(set(seeds)) != len(seeds):
        p.error(f"--seeds must list distinct seeds, got {args.seeds!r}")
    need = max(PROFILES[args.profile]["seeds"].values())
    if len(seeds) < need:
        p.error(f"profile {args.profile} runs up to {need} seeds; --seeds lists {len(seeds)}")
    kinds = {"pretrain", "frozen", "finetune", "cost"}
    only = set(args.only.split(",")) if args.only else kinds
    if not only <= kinds:
        p.error(f"--only accepts {', '.join(sorted(kinds))}; got {args.only!r}")
    if args.estimate:
        e = estimate(args.profile, seeds)
        print(f"profile {args.profile}: estimated {e['total_h']:.1f} CPU-hours on this machine (one thread)")
        for v, h in e["train_h"].items():
            print(f"  pre-training {v}: {h:.2f} h ({1000 * e['step_s'][v]:.0f} ms/step)")
        print(f"  {e['frozen_tasks']} frozen evaluations: {e['eval_h']:.2f} h")
        return 0
    if not args.report_only and not Path(args.data).exists():
        print(f"error: CIFAR-10 not found at {args.data}; pass --data PATH (folder or .tar.gz) or set MIMKIT_CIFAR10",
              file=sys.stderr)
        return 2
    from study.report import write_report

    study = Study(args)
    study.root.mkdir(parents=True, exist_ok=True)
    figures = Path(args.out_dir) / "images" / "results"
    command = ("python benchmarks/cifar10_study.py " + " ".join(
        a for a in argv if a != "--report-only" and not a.startswith("--no-progress"))).strip()

    def report() -> None:
        write_report(study, Path(args.out), figures, command)

    if args.report_only:
        report()
        print(f"wrote {args.out}")
        return 0
    lock = open(study.root / "study.lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        print(f"error: another cifar10_study.py is running on {study.root}; wait for it or stop it", file=sys.stderr)
        return 2
    logfile = open(study.root / "study.log", "a")

    def log(msg: str) -> None:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}"
        print(line, flush=True)
        logfile.write(line + "\n")
        logfile.flush()

    def stop(signum, frame):  # a service manager's TERM (or a background job's ignored INT) ends it cleanly
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    study.retire_incomplete_cost()
    tasks = study.tasks()
    runnable = {t.key for t in tasks if t.kind in only}
    show = not args.no_progress and sys.stderr.isatty()
    try:
        failed = run_tasks(tasks, args.jobs, args.threads, report, show, log, runnable)
    except KeyboardInterrupt:
        report()
        return 130
    report()
    log(f"report: {args.out}" + (f"; {len(failed)} task(s) failed or skipped: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

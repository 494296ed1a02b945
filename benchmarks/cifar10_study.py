"""Small-scale reproduction study on CIFAR-10: do the papers' claims hold, measured honestly?

    python benchmarks/cifar10_study.py                       # run (or continue) everything, write docs/RESULTS.md
    python benchmarks/cifar10_study.py --jobs 2 --threads 1  # two tasks at a time, one thread each (2-core CPU)
    python benchmarks/cifar10_study.py --report-only         # rewrite docs/RESULTS.md from what has finished
    python benchmarks/cifar10_study.py --profile standard    # ViT-Tiny/4 (12 x 192), ~45 min a run on 2 cores

MAE, RC-MAE-S, RC-MAE-D and SdAE (multifold) are pre-trained with the same encoder, data, epochs and
augmentations, on every seed; the ablations (RC-MAE mask ratio, SdAE teacher input, SdAE per-step EMA) on the
first seed. Every finished pre-training run is evaluated with frozen features (weighted kNN and the cached-feature
linear probe, teacher and student), fine-tuned briefly (teacher and student where a claim needs both), and the
fine-tuned MAE / RC-MAE classifiers are scored under 15 corruptions. docs/RESULTS.md gets one table per claim:
the paper's number, ours (mean over seeds and the spread), and a computed verdict.

Resumable at every level: the work is a list of tasks, each done when its result file exists; an interrupted
pre-training or fine-tuning run continues from its last checkpoint (``--resume``); finished evaluations are never
repeated; the report is rewritten after every finished task, so the study can be run in pieces over several days.
A task that fails is logged (its log file named) and skipped with everything that depends on it; the rest go on,
and the exit status is 1.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cifar10" / "cifar10-jpeg.tar.gz"

# ----------------------------------------------------------------------------------------------- the setup
# Shared by every run of a profile: data, encoder/decoder shape, schedule, augmentation (the preset's MAE recipe:
# RandomResizedCrop 0.2-1 + flip), evaluation pooling. Only the method keys differ between variants.
PROFILES = {
    "quick": {
        "about": "ViT 6 x 128 (4 heads, patch 4 at 32 px: 64 patches), decoder 1 x 96, 10,000 training images, "
                 "8 epochs, batch 128",
        "pretrain": ["data.max_train=10000", "model.embed_dim=128", "model.depth=6", "model.num_heads=4",
                     "model.decoder_dim=96", "model.decoder_depth=1", "model.decoder_heads=4", "train.epochs=8",
                     "train.batch_size=128", "train.blr=1.5e-3", "train.warmup_epochs=1", "train.ckpt_every=2",
                     "train.log_every=20", "eval.knn_every=0", "eval.pool=mean"],
        "epochs": 8, "curve_every": 2, "finetune_epochs": 3, "robust_images": 1000,
    },
    "standard": {
        "about": "ViT-Tiny/4 (12 x 192, 3 heads, 64 patches at 32 px), decoder 4 x 128, 20,000 training images, "
                 "10 epochs, batch 128",
        "pretrain": ["data.max_train=20000", "train.epochs=10", "train.batch_size=128", "train.blr=1.5e-3",
                     "train.warmup_epochs=1", "train.ckpt_every=2", "train.log_every=20", "eval.knn_every=0",
                     "eval.pool=mean"],
        "epochs": 10, "curve_every": 2, "finetune_epochs": 5, "robust_images": 1000,
    },
    "fair": {
        "about": "ViT 6 x 128 (4 heads, patch 4 at 32 px: 64 patches), decoder 1 x 96, all 50,000 training images, "
                 "13 epochs, batch 64: 10,153 optimiser steps",
        "pretrain": ["model.embed_dim=128", "model.depth=6", "model.num_heads=4", "model.decoder_dim=96",
                     "model.decoder_depth=1", "model.decoder_heads=4", "train.epochs=13", "train.batch_size=64",
                     "train.blr=1.5e-3", "train.warmup_epochs=1", "train.ckpt_every=3", "train.log_every=50",
                     "eval.knn_every=0", "eval.pool=mean"],
        # SdAE at the paper's recipe: drop path 0.25 on the encoder, cosine 0.96 -> 0.99 over ~300 updates
        # (supplement: 300 epochs, one update per epoch) = one update every 33 of the 10,153 steps: 307 updates
        "variant_sets": {"sdae": ["model.drop_path=0.25", "method.ema_every_steps=33"]},
        "seeds": {"mae": 3, "rc-mae-s": 3, "rc-mae-d": 2, "sdae": 2, "rc-mae-free": 3},
        "epochs": 13, "curve_epochs": [3, 6, 9, 13], "finetune_epochs": 0, "robust_images": 1000,
    },
}

# name -> (label, method overrides, main: pre-trained on every seed; else on the first seed only)
VARIANTS = {
    "mae": ("MAE", ["method.name=mae"], True),
    "rc-mae-s": ("RC-MAE-S", ["method.name=rc-mae", "method.mask_mode=same"], True),
    "rc-mae-d": ("RC-MAE-D", ["method.name=rc-mae", "method.mask_mode=different"], True),
    "sdae": ("SdAE (multifold)", ["method.name=sdae", "method.teacher_input=multifold"], True),
    "rc-mae-s-m80": ("RC-MAE-S, mask 0.80", ["method.name=rc-mae", "method.mask_mode=same", "method.mask_ratio=0.8"],
                     False),
    "rc-mae-s-m85": ("RC-MAE-S, mask 0.85", ["method.name=rc-mae", "method.mask_mode=same",
                                             "method.mask_ratio=0.85"], False),
    "sdae-full": ("SdAE (full image)", ["method.name=sdae", "method.teacher_input=full"], False),
    "sdae-masked": ("SdAE (only masked)", ["method.name=sdae", "method.teacher_input=masked"], False),
    "sdae-ema-step": ("SdAE (multifold), EMA per step 0.996",
                      ["method.name=sdae", "method.teacher_input=multifold", "method.ema_unit=step",
                       "method.momentum=0.996", "method.momentum_final=0.996", "method.momentum_schedule=constant"],
                      False),
}
DEFAULT_WHICH = {"mae": "student", "rc-mae": "teacher", "sdae": "student"}  # what each paper evaluates
CURVE_ENCODERS = {"mae": ["student"], "rc-mae-s": ["teacher"], "sdae": ["teacher", "student"]}
CURVE_VARIANTS = tuple(CURVE_ENCODERS)  # frozen evaluations every `curve_every` epochs (Fig. 1c, Fig. 4c)
BOTH_ENCODERS = ("rc-mae-s", "sdae")          # fine-tuned from teacher and student on the first seed (Table 12, 4c)
BOTH_FROZEN = ("sdae-ema-step",)              # ablations whose teacher is probed too (Fig. 4c with a per-step EMA)
ROBUSTNESS_VARIANTS = ("mae", "rc-mae-s", "rc-mae-d")  # Table 7


def method_of(variant: str) -> str:
    return next(o.split("=", 1)[1] for o in VARIANTS[variant][1] if o.startswith("method.name="))


def encoders_of(variant: str) -> list[str]:
    return ["student"] if method_of(variant) == "mae" else ["teacher", "student"]


# ----------------------------------------------------------------------------------------------- tasks
@dataclass
class Task:
    key: str
    kind: str                        # pretrain | frozen | finetune | robustness | cost
    done: Path                       # exists = finished
    build: object                    # () -> argv, decided at launch time (resume or not)
    log: Path
    deps: list[str] = field(default_factory=list)


class Study:
    def __init__(self, args):
        self.args = args
        self.profile = PROFILES[args.profile]
        self.root = Path(args.runs).resolve()
        self.seeds = [int(s) for s in args.seeds.split(",")]
        self.py = sys.executable

    # folders
    def run_dir(self, variant: str, seed: int) -> Path:
        return self.root / "pretrain" / f"{variant}-s{seed}"

    def ft_dir(self, variant: str, seed: int, which: str) -> Path:
        return self.root / "finetune" / f"{variant}-s{seed}-{which}"

    def scratch_dir(self, seed: int) -> Path:
        return self.root / "finetune" / f"scratch-s{seed}"

    def frozen_file(self, variant: str, seed: int, epoch: int, which: str) -> Path:
        return self.run_dir(variant, seed) / "study" / f"frozen_e{epoch:04d}_{which}.json"

    def checkpoint(self, variant: str, seed: int, epoch: int) -> Path:
        return self.run_dir(variant, seed) / "checkpoints" / f"epoch_{epoch:04d}.pt"

    def init_file(self) -> Path:
        return self.root / "init" / f"frozen_s{self.seeds[0]}.json"

    def cost_file(self) -> Path:
        return self.root / "cost.json"

    def runs(self) -> list[tuple[str, int]]:
        counts = self.profile.get("seeds")
        if counts is not None:  # the profile says how many seeds each variant gets (the others are not run)
            return [(v, s) for i, s in enumerate(self.seeds) for v in VARIANTS if v in counts and i < counts[v]]
        return [(v, s) for s in self.seeds for v, (_, _, main) in VARIANTS.items() if main or s == self.seeds[0]]

    def curve_epochs(self, variant: str) -> list[int]:
        if variant not in CURVE_VARIANTS:
            return [self.profile["epochs"]]
        if "curve_epochs" in self.profile:
            return list(self.profile["curve_epochs"])
        e, every = self.profile["epochs"], self.profile["curve_every"]
        return sorted({*range(every, e + 1, every), e})

    def frozen_encoders(self, variant: str, epoch: int) -> list[str]:
        """Both encoders of a main run at the end; the evaluated one of an ablation; along the curves, the ones the
        figures show (MAE, the RC-MAE-S teacher, both SdAE encoders for Fig. 4c)."""
        if epoch == self.profile["epochs"]:
            both = VARIANTS[variant][2] or variant in BOTH_FROZEN
            return encoders_of(variant) if both else [DEFAULT_WHICH[method_of(variant)]]
        return CURVE_ENCODERS[variant]

    def finetunes(self) -> list[tuple[str, int, str]]:
        out = []
        for v, s in self.runs():
            both = v in BOTH_ENCODERS and s == self.seeds[0]  # teacher vs student: first seed (CPU budget)
            whichs = encoders_of(v) if both else [DEFAULT_WHICH[method_of(v)]]
            out += [(v, s, w) for w in whichs]
        return out

    def data_path(self) -> str:
        return str(Path(self.args.data).resolve())

    # commands
    def _mimkit(self, *a: str) -> list[str]:
        return [self.py, "-m", "mimkit", *a, "--no-progress"]

    def _clear_unfinished(self, run: Path) -> None:
        """A run stopped before its first checkpoint leaves logs but nothing to resume from, and `mimkit` refuses a
        non-empty folder without --resume: move it aside (kept under aborted/, nothing is deleted)."""
        if run.is_dir() and any(run.iterdir()) and not (run / "checkpoints" / "last.pt").exists():
            dest = self.root / "aborted" / f"{run.name}-{time.strftime('%Y%m%d-%H%M%S')}"
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(run, dest)

    def pretrain_argv(self, variant: str, seed: int) -> list[str]:
        run = self.run_dir(variant, seed)
        self._clear_unfinished(run)
        sets = [f"data.path={self.data_path()}", *self.profile["pretrain"], *VARIANTS[variant][1],
                *self.profile.get("variant_sets", {}).get(variant, []), f"train.seed={seed}"]
        argv = self._mimkit("pretrain", "--config", "cifar10-vit-tiny", "--output", str(run),
                            *[x for o in sets for x in ("--set", o)])
        if (run / "checkpoints" / "last.pt").exists():
            argv.append("--resume")
        return argv

    def finetune_argv(self, out: Path, checkpoint: Path, which: str | None, seed: int) -> list[str]:
        self._clear_unfinished(out)
        if (out / "checkpoints" / "last.pt").exists():
            return self._mimkit("finetune", "--resume", "--output", str(out))
        sets = [f"train.epochs={self.profile['finetune_epochs']}", "train.warmup_epochs=1", f"train.seed={seed}",
                f"data.path={self.data_path()}", "train.ckpt_every=0"]
        init = ["--which", which] if which else ["--from-scratch"]
        return self._mimkit("finetune", "--config", "finetune-cifar10", "--checkpoint", str(checkpoint), *init,
                            "--output", str(out), *[x for o in sets for x in ("--set", o)])

    def tasks(self) -> list[Task]:
        """In priority order: every seed-0 pre-training first, then its evaluations, then the other seeds."""
        tasks: list[Task] = []
        logs = self.root / "logs"
        for v, s in self.runs():
            run = self.run_dir(v, s)
            tasks.append(Task(f"pretrain {v} s{s}", "pretrain", run / "summary.json",
                              lambda v=v, s=s: self.pretrain_argv(v, s), logs / f"pretrain-{v}-s{s}.log"))
        for v, s in self.runs():
            for epoch in self.curve_epochs(v):
                for w in self.frozen_encoders(v, epoch):
                    out = self.frozen_file(v, s, epoch, w)
                    ckpt = self.checkpoint(v, s, epoch)
                    tasks.append(Task(
                        f"frozen {v} s{s} e{epoch} {w}", "frozen", out,
                        lambda ckpt=ckpt, w=w, out=out: [self.py, str(Path(__file__).resolve()), "_frozen",
                                                         "--checkpoint", str(ckpt), "--which", w, "--out", str(out)],
                        logs / f"frozen-{v}-s{s}-e{epoch}-{w}.log", [f"pretrain {v} s{s}"]))
        s0 = self.seeds[0]
        init_ckpt = self.run_dir("mae", s0) / "checkpoints" / "last.pt"
        tasks.append(Task(f"frozen init s{s0}", "frozen", self.init_file(),
                          lambda: [self.py, str(Path(__file__).resolve()), "_frozen", "--checkpoint", str(init_ckpt),
                                   "--which", "student", "--random-init", str(s0), "--out", str(self.init_file())],
                          logs / f"frozen-init-s{s0}.log", [f"pretrain mae s{s0}"]))
        scratch = self.scratch_dir(s0)
        tasks.append(Task(f"finetune scratch s{s0}", "finetune", scratch / "eval_finetune.json",
                          lambda: self.finetune_argv(scratch, self.run_dir("mae", s0) / "checkpoints" / "last.pt",
                                                     None, s0),
                          logs / f"finetune-scratch-s{s0}.log", [f"pretrain mae s{s0}"]))
        for v, s, w in sorted(self.finetunes(), key=lambda t: (t[1] != s0, t[1])):
            out = self.ft_dir(v, s, w)
            ckpt = self.run_dir(v, s) / "checkpoints" / "last.pt"
            tasks.append(Task(f"finetune {v} s{s} {w}", "finetune", out / "eval_finetune.json",
                              lambda out=out, ckpt=ckpt, w=w, s=s: self.finetune_argv(out, ckpt, w, s),
                              logs / f"finetune-{v}-s{s}-{w}.log", [f"pretrain {v} s{s}"]))
            if v in ROBUSTNESS_VARIANTS and w == DEFAULT_WHICH[method_of(v)]:
                tasks.append(self._robustness_task(f"{v} s{s} {w}", out, f"finetune {v} s{s} {w}"))
        tasks.append(self._robustness_task(f"scratch s{s0}", scratch, f"finetune scratch s{s0}"))
        tasks.append(Task(f"cost s{s0}", "cost", self.cost_file(),
                          lambda: [self.py, str(Path(__file__).resolve()), "_cost", "--profile", self.args.profile,
                                   "--out", str(self.cost_file())], logs / "cost.log"))
        # Priority: what every verdict needs first. Pre-training and frozen evaluations of all seeds (the seed
        # noise that every threshold uses), the step costs, then the main fine-tunes (first seed, then the
        # others) with their robustness scores, then the ablation and second-encoder fine-tunes.
        def seed_of(t: Task) -> int:
            return int(next(p for p in t.key.split() if p[0] == "s" and p[1:].isdigit())[1:])

        def main_default_finetune(t: Task) -> bool:
            parts = t.key.split()
            if parts[1] == "scratch":
                return True
            return VARIANTS[parts[1]][2] and parts[3] == DEFAULT_WHICH[method_of(parts[1])]

        def rank(t: Task) -> tuple:
            seed_rank = self.seeds.index(seed_of(t))
            if t.kind in ("pretrain", "frozen"):
                return (0, seed_rank, t.kind != "pretrain")
            if t.kind == "cost":
                return (1,)
            if t.kind == "finetune" and main_default_finetune(t):
                return (2, seed_rank)
            if t.kind == "robustness":
                return (3, seed_rank)
            return (4, seed_rank)

        return sorted(tasks, key=rank)  # stable: the construction order within a rank

    def _robustness_task(self, name: str, ft: Path, dep: str) -> Task:
        return Task(f"robustness {name}", "robustness", ft / "eval_robustness.json",
                    lambda: self._mimkit("eval", "robustness", "--checkpoint", str(ft / "checkpoints" / "last.pt"),
                                         "--max-images", str(self.profile["robust_images"]), "--seed", "0",
                                         "--output", str(ft)),
                    self.root / "logs" / f"robustness-{name.replace(' ', '-')}.log", [dep])


# ----------------------------------------------------------------------------------------------- scheduler
def run_tasks(tasks: list[Task], jobs: int, threads: int, on_done, show_progress: bool, log,
              runnable: set[str] | None = None) -> list[str]:
    """Run ``tasks`` (priority order) with at most ``jobs`` at a time; returns the keys that failed or were skipped.

    ``runnable``: the keys this invocation may start (``--only``); a task outside it counts as finished only if its
    result exists, so nothing starts from a half-made input. Whatever happens (a failure, Ctrl-C, SIGTERM, an
    error in ``on_done``), running children are stopped before this returns or raises: they resume next time.
    """
    by_key = {t.key: t for t in tasks}
    finished = {t.key for t in tasks if t.done.exists()}
    failed: set[str] = set()
    pending = [t for t in tasks if t.key not in finished and (runnable is None or t.key in runnable)]
    blocked = {t.key for t in tasks if t.key not in finished and runnable is not None and t.key not in runnable}
    running: dict[str, tuple[subprocess.Popen, float, object]] = {}
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    total = len(pending)
    bar = None
    if show_progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, desc="study tasks", unit="task")
    log(f"{len(finished)} of {len(tasks)} tasks already done; {total} to run, {jobs} at a time, {threads} thread(s) each")
    try:
        while pending or running:
            for t in list(pending):
                if len(running) >= jobs:
                    break
                missing = [d for d in t.deps if d in failed or d in blocked or d not in by_key]
                if missing:
                    pending.remove(t)
                    failed.add(t.key)
                    log(f"skip {t.key}: it needs {', '.join(missing)}")
                    continue
                if not all(d in finished for d in t.deps):
                    continue
                pending.remove(t)
                t.log.parent.mkdir(parents=True, exist_ok=True)
                argv = t.build()
                fh = open(t.log, "a")
                fh.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n")
                fh.flush()
                try:
                    proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
                except OSError as e:
                    fh.close()
                    failed.add(t.key)
                    log(f"FAILED {t.key}: could not start {argv[0]} ({e})")
                    continue
                running[t.key] = (proc, time.time(), fh)
                log(f"start {t.key}")
            time.sleep(1.0)
            for key, (proc, t0, fh) in list(running.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                fh.close()
                del running[key]
                t = by_key[key]
                if rc == 0 and t.done.exists():
                    finished.add(key)
                    log(f"done  {key} ({time.time() - t0:.0f} s)")
                    try:
                        on_done()
                    except Exception as e:  # a report problem must not orphan the running tasks
                        log(f"warning: could not rewrite the report after {key}: {type(e).__name__}: {e}")
                else:
                    failed.add(key)
                    log(f"FAILED {key} (exit {rc}); see {t.log}")
                if bar is not None:
                    bar.update(1)
    finally:
        if running:
            previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
            for proc, _, _ in running.values():
                proc.terminate()
            for proc, _, fh in running.values():
                proc.wait()
                fh.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            log(f"stopped {len(running)} running task(s): {', '.join(running)}; run the same command again to "
                "continue")
        if bar is not None:
            bar.close()
    return sorted(failed)


# ----------------------------------------------------------------------------------------------- frozen eval
def cmd_frozen(argv: list[str]) -> int:
    """kNN and linear probe of one encoder of one checkpoint from the same extracted (mean-pooled) features."""
    p = argparse.ArgumentParser(prog="cifar10_study.py _frozen")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--which", required=True, choices=("teacher", "student"))
    p.add_argument("--out", required=True)
    p.add_argument("--pool", default="mean", choices=("mean", "cls"))
    p.add_argument("--random-init", type=int, default=None, metavar="SEED",
                   help="evaluate a freshly initialised encoder of the checkpoint's config instead of its weights")
    a = p.parse_args(argv)
    import torch

    from mimkit.config import config_from_dict
    from mimkit.eval.knn import extract_features, knn_accuracy
    from mimkit.eval.linprobe import build_linprobe_config, run_linprobe
    from mimkit.eval.loading import checkpoint_in_chans, load_pretrained_encoder, read_pretraining_checkpoint
    from mimkit.methods import build_method
    from mimkit.runtime import datamodule_from_config
    from mimkit.train.runlog import write_json

    t0 = time.time()
    ckpt = read_pretraining_checkpoint(a.checkpoint)
    if a.random_init is not None:  # the reference point: what pre-training has to beat
        cfg = config_from_dict(ckpt["config"])
        torch.manual_seed(a.random_init)
        enc, method_name, saved = build_method(cfg, checkpoint_in_chans(ckpt)).encoder("student"), "init", ckpt["config"]
        ckpt = {**ckpt, "epoch": 0}
    else:
        pre = load_pretrained_encoder(a.checkpoint, a.which, ckpt)
        cfg, enc, method_name, saved = config_from_dict(pre.config), pre.encoder, pre.method, pre.config
    data = datamodule_from_config(cfg)
    device = torch.device("cpu")
    enc = enc.eval().to(device)
    train = extract_features(enc, data.eval_batches("train", 256, device), a.pool)
    test = extract_features(enc, data.eval_batches("test", 256, device), a.pool)
    knn = knn_accuracy(*train, *test, k=cfg.eval.knn_k, temperature=cfg.eval.knn_t)
    lp_cfg = build_linprobe_config(None, [f"eval.pool={a.pool}"], saved)
    lp = run_linprobe(enc, data, lp_cfg, device=device, features=(*train, *test))
    res = {"checkpoint": a.checkpoint, "which": a.which, "method": method_name, "epoch": int(ckpt["epoch"]),
           "pool": a.pool, "knn_top1": knn["knn_top1"], "linprobe_top1": lp["linprobe_top1"],
           "linprobe_best_top1": lp["best_top1"], "linprobe_blr": lp["blr"], "linprobe_epochs": lp["epochs"],
           "train_images": int(train[1].shape[0]), "test_images": int(test[1].shape[0]),
           "wall_time_s": time.time() - t0}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(Path(a.out), res)
    print(json.dumps({k: res[k] for k in ("which", "epoch", "knn_top1", "linprobe_top1", "wall_time_s")}))
    return 0


def cmd_cost(argv: list[str]) -> int:
    """Median training-step time of every variant, measured interleaved (round-robin) in one process.

    The runs' own wall-clock times depend on what else shared the machine while they ran; interleaving the
    variants' steps makes every row see the same conditions, so the ratios are fair (as in `mimkit bench`).
    """
    p = argparse.ArgumentParser(prog="cifar10_study.py _cost")
    p.add_argument("--profile", default="quick", choices=sorted(PROFILES))
    p.add_argument("--out", required=True)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=9)
    a = p.parse_args(argv)
    import torch

    from mimkit.config import build_config
    from mimkit.methods import Progress, build_method
    from mimkit.train.optim import build_adamw
    from mimkit.train.runlog import write_json

    prof = PROFILES[a.profile]
    batch = int(_profile_value(prof, "train.batch_size"))
    rows = {}
    for v, (_, sets, _) in VARIANTS.items():
        cfg = build_config("cifar10-vit-tiny", ["data.path=unused", *prof["pretrain"], *sets])
        torch.manual_seed(0)
        method = build_method(cfg, 3)
        opt = build_adamw(method.student.named_parameters(), 1e-4, 0.05, (0.9, 0.95))
        rows[v] = (method, opt, [])
    images = torch.randn(batch, 3, 32, 32)

    def step(method, opt, i):
        method(images).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        method.after_optimizer_step(Progress(i + 1, 0, 10**6, 10**6, 1))

    for i in range(a.warmup):
        for method, opt, _ in rows.values():
            step(method, opt, i)
    for i in range(a.repeats):
        for method, opt, times in rows.values():
            t = time.perf_counter()
            step(method, opt, a.warmup + i)
            times.append(time.perf_counter() - t)
    res = {"batch": batch, "threads": torch.get_num_threads(), "repeats": a.repeats,
           "step_s": {v: statistics.median(t) for v, (_, _, t) in rows.items()}}
    write_json(Path(a.out), res)
    print(json.dumps(res["step_s"]))
    return 0


# ----------------------------------------------------------------------------------------------- report
def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class Results:
    """Every number the report needs, read from the run folders (missing = not run yet)."""

    def __init__(self, study: Study):
        self.s = study

    def frozen(self, v: str, seed: int, which: str, epoch: int | None = None) -> dict | None:
        return _read(self.s.frozen_file(v, seed, epoch or self.s.profile["epochs"], which))

    def summary(self, v: str, seed: int) -> dict | None:
        return _read(self.s.run_dir(v, seed) / "summary.json")

    def finetune(self, v: str, seed: int, which: str) -> dict | None:
        return _read(self.s.ft_dir(v, seed, which) / "eval_finetune.json")

    def robustness(self, v: str, seed: int, which: str) -> dict | None:
        return _read(self.s.ft_dir(v, seed, which) / "eval_robustness.json")

    def value(self, v: str, which: str, metric: str, seed: int) -> float | None:
        which = DEFAULT_WHICH[method_of(v)] if which == "default" else which
        if metric in ("knn", "linprobe"):
            r = self.frozen(v, seed, which)
            return None if r is None else r[f"{metric}_top1"]
        if metric == "finetune":
            r = self.finetune(v, seed, which)
            return None if r is None else r["top1"]
        if metric == "mce":
            r = self.robustness(v, seed, which)
            return None if r is None else r["mean_corruption_error"]
        if metric == "wall":
            r = self.summary(v, seed)
            return None if r is None else r["wall_time_s"]
        if metric == "step":  # interleaved step time, one measurement (not per seed)
            r = _read(self.s.cost_file())
            return None if r is None or seed != self.s.seeds[0] else r["step_s"].get(v)
        if metric == "curve_knn":  # mean kNN over the curve's checkpoints (area under the curve / epochs)
            vals = [self.frozen(v, seed, which, e) for e in self.s.curve_epochs(v)]
            return None if any(x is None for x in vals) else statistics.fmean(x["knn_top1"] for x in vals)
        raise KeyError(metric)

    def planned_seeds(self, v: str, which: str, metric: str) -> list[int]:
        """The seeds the study produces this number for (ablations, costs, non-default fine-tunes: the first)."""
        which = DEFAULT_WHICH[method_of(v)] if which == "default" else which
        first_only = (not VARIANTS[v][2] or metric == "step"
                      or (metric == "finetune" and which != DEFAULT_WHICH[method_of(v)]))
        return self.s.seeds[:1] if first_only else list(self.s.seeds)

    def values(self, v: str, which: str, metric: str) -> dict[int, float]:
        out = {}
        for s in self.planned_seeds(v, which, metric):
            x = self.value(v, which, metric, s)
            if x is not None:
                out[s] = x
        return out

    def n_test(self, metric: str) -> int:
        if metric == "mce":
            return self.s.profile["robust_images"]
        return 10_000  # the CIFAR-10 test split (kNN, probe and fine-tuning are scored on all of it)


def _fmt(x: float | None, pct: bool = True) -> str:
    if x is None:
        return "—"
    return f"{100 * x:.1f}" if pct else f"{x:.0f}"


def _spread(vals: list[float], pct: bool = True) -> str:
    if len(vals) < 2:
        return ""
    k = 100 if pct else 1
    return f" ± {k * (max(vals) - min(vals)) / 2:.1f}"


# Claims: (id, title, source, rows). Row: (metric, arm A, arm B, relation, paper A, paper B, better)
# arm = (variant, which); relation: ">" (A better than B), "=" (A and B equal), "<" (A worse than B), where better
# follows `better`: "high" (accuracies) or "low" (errors, costs: A cheaper than B is A better).
# Paper numbers are ImageNet-1k ViT-B unless noted, in the paper's own units.
CLAIMS = [
    ("rc-s", "RC-MAE-S beats MAE", "rc-mae.txt Table 2 (ViT-B, 1600 ep)", [
        ("finetune", ("rc-mae-s", "default"), ("mae", "default"), ">", 83.6, 83.4, "high"),
        ("linprobe", ("rc-mae-s", "default"), ("mae", "default"), ">", 68.4, 67.3, "high"),
        ("knn", ("rc-mae-s", "default"), ("mae", "default"), ">", None, None, "high")]),
    ("rc-d", "RC-MAE-D beats MAE", "rc-mae.txt Table 2", [
        ("finetune", ("rc-mae-d", "default"), ("mae", "default"), ">", 83.6, 83.4, "high"),
        ("linprobe", ("rc-mae-d", "default"), ("mae", "default"), ">", 68.7, 67.3, "high"),
        ("knn", ("rc-mae-d", "default"), ("mae", "default"), ">", None, None, "high")]),
    ("conv", "RC-MAE converges faster than MAE (mean kNN over the checkpoints of the run)",
     "rc-mae.txt Fig. 1(c) (fine-tuning accuracy vs epochs; 800 ep: 83.4 vs 83.2, Table 3)", [
        ("curve_knn", ("rc-mae-s", "default"), ("mae", "default"), ">", 83.4, 83.2, "high")]),
    ("mask80", "RC-MAE with mask 0.80 matches mask 0.75", "rc-mae.txt Table 3 (800 ep)", [
        ("finetune", ("rc-mae-s-m80", "default"), ("rc-mae-s", "default"), "=", 83.4, 83.4, "high"),
        ("knn", ("rc-mae-s-m80", "default"), ("rc-mae-s", "default"), "=", None, None, "high"),
        ("step", ("rc-mae-s-m80", "default"), ("rc-mae-s", "default"), ">", 142.6, 166.6, "low")]),
    ("mask85", "RC-MAE with mask 0.85 is slightly worse than 0.75", "rc-mae.txt Table 3 (800 ep)", [
        ("finetune", ("rc-mae-s-m85", "default"), ("rc-mae-s", "default"), "<", 83.2, 83.4, "high"),
        ("knn", ("rc-mae-s-m85", "default"), ("rc-mae-s", "default"), "<", None, None, "high"),
        ("step", ("rc-mae-s-m85", "default"), ("rc-mae-s", "default"), ">", 136.4, 166.6, "low")]),
    ("cost", "RC-MAE costs more per epoch than MAE", "rc-mae.txt Table 3 (GPU hours, 800 ep)", [
        ("step", ("rc-mae-s", "default"), ("mae", "default"), "<", 166.6, 125.5, "low"),
        ("step", ("rc-mae-d", "default"), ("mae", "default"), "<", None, None, "low")]),
    ("robust", "Fine-tuned RC-MAE is more robust to corruptions than MAE (mean corruption error)",
     "rc-mae.txt Table 7 (ImageNet-C mCE)", [
        ("mce", ("rc-mae-s", "default"), ("mae", "default"), ">", 49.9, 51.7, "low"),
        ("mce", ("rc-mae-d", "default"), ("mae", "default"), ">", None, 51.7, "low")]),
    ("rc-ts", "RC-MAE: the teacher is slightly better than the student", "rc-mae.txt Table 12", [
        ("finetune", ("rc-mae-s", "teacher"), ("rc-mae-s", "student"), ">", 83.58, 83.48, "high"),
        ("linprobe", ("rc-mae-s", "teacher"), ("rc-mae-s", "student"), ">", 68.41, 68.38, "high"),
        ("knn", ("rc-mae-s", "teacher"), ("rc-mae-s", "student"), ">", None, None, "high")]),
    ("sdae-mae", "SdAE beats MAE at the same number of epochs", "sdae.txt Table 2 (100 ep)", [
        ("finetune", ("sdae", "default"), ("mae", "default"), ">", 83.5, 82.1, "high"),
        ("linprobe", ("sdae", "default"), ("mae", "default"), ">", 60.3, 54.8, "high"),
        ("knn", ("sdae", "default"), ("mae", "default"), ">", None, None, "high")]),
    ("sdae-input", "SdAE teacher input: multifold beats only-masked and full image", "sdae.txt Table 5 (100 ep)", [
        ("finetune", ("sdae", "default"), ("sdae-masked", "default"), ">", 84.1, 83.5, "high"),
        ("finetune", ("sdae", "default"), ("sdae-full", "default"), ">", 84.1, 84.0, "high"),
        ("knn", ("sdae", "default"), ("sdae-masked", "default"), ">", None, None, "high"),
        ("knn", ("sdae", "default"), ("sdae-full", "default"), ">", None, None, "high")]),
    ("sdae-cost", "SdAE teacher input cost: multifold is cheaper than full image and only-masked",
     "sdae.txt Table 1 (s per epoch: MAE 551, full 826, masked 761, multifold 706)", [
        ("step", ("sdae", "default"), ("sdae-full", "default"), ">", 706, 826, "low"),
        ("step", ("sdae", "default"), ("sdae-masked", "default"), ">", 706, 761, "low"),
        ("step", ("sdae", "default"), ("mae", "default"), "<", 706, 551, "low")]),
    ("sdae-ema", "SdAE: EMA once per epoch works better than per step", "sdae.txt Fig. 4(a) (no table)", [
        ("finetune", ("sdae", "default"), ("sdae-ema-step", "default"), ">", None, None, "high"),
        ("knn", ("sdae", "default"), ("sdae-ema-step", "default"), ">", None, None, "high")]),
    ("sdae-ts", "SdAE: teacher and student perform alike", "sdae.txt Fig. 4(c) (no table)", [
        ("finetune", ("sdae", "teacher"), ("sdae", "student"), "=", None, None, "high"),
        ("knn", ("sdae", "teacher"), ("sdae", "student"), "=", None, None, "high"),
        ("knn", ("sdae-ema-step", "teacher"), ("sdae-ema-step", "student"), "=", None, None, "high")]),
]
METRIC_NAMES = {"finetune": "fine-tune top-1 (%)", "linprobe": "linear probe top-1 (%)", "knn": "kNN top-1 (%)",
                "curve_knn": "mean kNN top-1 over epochs (%)", "mce": "mean corruption error (%)",
                "wall": "pre-training wall time (s)", "step": "training-step time (ms, interleaved)"}
WALL_TOLERANCE = 0.03  # wall-time differences under 3 % are treated as machine noise


class Verdicts:
    """Noise model and verdict rule (written out in the report)."""

    def __init__(self, res: Results):
        self.res = res
        self.seed_sd: dict[str, float | None] = {}
        for metric in ("knn", "linprobe", "finetune", "mce", "curve_knn"):
            variances = []
            for v, (_, _, main) in VARIANTS.items():
                if not main or (metric == "curve_knn" and v not in CURVE_VARIANTS):
                    continue
                for w in encoders_of(v):
                    vals = list(res.values(v, w, metric).values())
                    if len(vals) >= 2:
                        variances.append(statistics.variance(vals))
            self.seed_sd[metric] = math.sqrt(statistics.fmean(variances)) if variances else None

    def threshold(self, metric: str, diffs: list[float], mean_level: float) -> float | None:
        """Two standard errors of the mean difference: the largest of test-set sampling noise, pooled seed noise and
        the pair's own spread of per-seed differences (two seeds alone give a weak estimate of the latter)."""
        n_seeds = len(diffs)
        p = min(max(mean_level, 0.01), 0.99)
        se = math.sqrt(2 * p * (1 - p) / self.res.n_test(metric)) / math.sqrt(n_seeds)
        if self.seed_sd.get(metric) is not None:  # the difference of two draws per seed, pooled seed noise
            se = max(se, math.sqrt(2) * self.seed_sd[metric] / math.sqrt(n_seeds))
        if n_seeds >= 2:  # this pair's own spread of per-seed differences
            se = max(se, statistics.stdev(diffs) / math.sqrt(n_seeds))
        return 2 * se

    def row(self, metric, arm_a, arm_b, rel, better):
        va = self.res.values(*arm_a, metric)
        vb = self.res.values(*arm_b, metric)
        common = sorted(set(va) & set(vb))
        if not common:
            return va, vb, None, None, "not run yet"
        va, vb = {s: va[s] for s in common}, {s: vb[s] for s in common}  # what the difference is taken over
        diffs = [va[s] - vb[s] for s in common]
        d = statistics.fmean(diffs)
        if metric in ("wall", "step"):  # costs: lower is better, so A better (">") means a ratio below 1
            ratio = statistics.fmean(va[s] / vb[s] for s in common)
            cheaper, dearer = ratio < 1 - WALL_TOLERANCE, ratio > 1 + WALL_TOLERANCE
            ok = {">": cheaper, "<": dearer, "=": not cheaper and not dearer}[rel]
            return va, vb, ratio, WALL_TOLERANCE, "holds" if ok else "does not hold"
        level = statistics.fmean([*va.values(), *vb.values()])
        thr = self.threshold(metric, diffs, level)
        good = d if better == "high" else -d  # > 0: A is better
        if rel == "=":
            verdict = "holds (no difference beyond noise)" if abs(d) <= thr else "does not hold"
        else:
            want = good if rel == ">" else -good
            verdict = "holds" if want > thr else ("does not hold" if want < -thr else "inconclusive within noise")
        planned = set(self.res.planned_seeds(*arm_a, metric)) & set(self.res.planned_seeds(*arm_b, metric))
        if len(common) < len(planned):
            verdict += f" ({len(common)} of {len(planned)} seeds so far)"
        return va, vb, d, thr, verdict


def _arm_label(arm) -> str:
    v, w = arm
    w = DEFAULT_WHICH[method_of(v)] if w == "default" else w
    return f"{VARIANTS[v][0]} ({w})" if method_of(v) != "mae" else VARIANTS[v][0]


def write_report(study: Study, out: Path, figures: Path, command: str) -> None:
    res = Results(study)
    ver = Verdicts(res)
    prof = study.profile
    figures.mkdir(parents=True, exist_ok=True)
    figs = make_figures(study, res, figures)
    cost_threads = (_read(study.cost_file()) or {}).get("threads", getattr(study.args, "threads", 1))
    L = ["# CIFAR-10 reproduction study: do the papers' claims hold at small scale?", "",
         "Written by `benchmarks/cifar10_study.py` from the runs it finished; re-running the script continues the "
         "study and rewrites this page.", "",
         "**This is a small-scale reproduction.** The papers pre-train ViT-B/L on ImageNet-1k (1.28 M images, "
         "224 px, 100-1600 epochs on 8+ GPUs). Here every pre-training run sees "
         f"{int(_profile_value(prof, 'data.max_train')) * prof['epochs']:,} images (CIFAR-10, 32 px, "
         f"{prof['epochs']} epochs of a {int(_profile_value(prof, 'data.max_train')):,}-image subset) on a 2-core CPU, "
         "about 0.01 % of the compute of the papers' shortest schedule. The verdicts say whether the *direction* "
         "of each claim shows up at this scale, within measured noise; they cannot confirm or refute the "
         "ImageNet numbers, and a claim about long schedules (convergence speed over hundreds of epochs, "
         "per-epoch EMA \"benefiting from long training\") is only probed at its very beginning.", "",
         "## Setup", "",
         f"- Profile `{study.args.profile}`: {prof['about']}; AdamW (0.9, 0.95), wd 0.05, blr 1.5e-3 "
         "(lr = blr x 128 / 256), 1 warm-up epoch then cosine, RandomResizedCrop(0.2-1) + flip, mask 0.75, "
         "norm_pix targets — identical for every method; only the `method.*` keys differ.",
         "- Methods at their papers' defaults: RC-MAE EMA 0.996 per step, gamma 1; SdAE multifold (3 folds), EMA "
         "once per epoch with momentum cosine 0.96 -> 0.99, student evaluated (RC-MAE: teacher evaluated).",
         "- Data: CIFAR-10 (`../shared/data/cifar10/cifar10-jpeg.tar.gz`, JPEG-re-encoded official split); the "
         "training subset is drawn with the run's seed (`data.max_train`, subset seed = `train.seed`), so every "
         "method of a seed sees the same images and the seeds differ in data as well as initialisation; the "
         "subset is also the kNN bank and the probe's training set. All scores on the full 10,000-image test split "
         "(robustness: a fixed 1,000 of them x 15 corruptions x 5 severities).",
         "- Frozen evaluations use **mean-pooled** patch tokens (the cls token gets no direct signal from the MAE loss "
         "and is uninformative after short runs, docs/EVALUATION.md): weighted kNN (k 20, T 0.07) with the "
         "training subset as the bank, and the cached-feature linear probe (LARS, 90 epochs, blr auto).",
         f"- Fine-tuning: the `finetune-cifar10` recipe (AdamW, layer decay 0.75, RandAugment, mixup/cutmix, "
         f"label smoothing, drop path 0.1) shortened to {prof['finetune_epochs']} epochs (1 warm-up); last-epoch "
         "top-1 (no selection on the test set). From-scratch baseline: the same recipe from random init.",
         f"- Seeds: {', '.join(map(str, study.seeds))} for MAE, RC-MAE-S, RC-MAE-D and SdAE (the seed sets the "
         "training subset, initialisation, data order, crops and masks); ablations on the first seed only.", "",
         "### Verdict rule", "",
         "For a claim \"A better than B\" (better = higher accuracy, lower error, lower cost): the difference "
         "d = A - B is averaged over the seeds both arms have. The noise threshold is two standard errors of that "
         "mean, the largest of (i) test-set sampling noise, sqrt(2 p (1 - p) / n) / sqrt(seeds); (ii) seed noise, "
         "sqrt(2) x the seed standard deviation pooled over the main runs / sqrt(seeds); (iii) with two or more "
         "seeds, the standard deviation of this pair's per-seed differences / sqrt(seeds). "
         "Verdict: **holds** if d is beyond the threshold in the claimed "
         "direction, **does not hold** if it is beyond the threshold the other way, **inconclusive within noise** "
         "otherwise. \"A equals B\" holds when |d| <= threshold. \"ours\" columns: mean over seeds ± half their "
         "range. Costs: the ratio A / B of the median training-step "
         f"times measured interleaved (round-robin in one process, {cost_threads} thread(s), batch 128: every variant under the same "
         f"machine conditions); differences under {100 * WALL_TOLERANCE:.0f} % count as equal. The runs' own "
         "wall-clock times are listed under \"All runs\" but depend on what shared the machine at the time.", ""]
    pooled = ", ".join(f"{METRIC_NAMES[m].split(' (')[0]} {100 * sd:.2f} points" for m, sd in ver.seed_sd.items()
                       if sd is not None)
    if pooled:
        L += [f"Measured seed standard deviation (pooled over the main runs): {pooled}.", ""]
    L += ["## Claims", "",
          "Paper columns are in the paper's own units (ImageNet top-1 %, GPU hours, seconds per epoch, "
          "AlexNet-normalised mCE); ours are CIFAR-10 numbers. Compare directions and ratios, not values. "
          "\"ours\" and A - B use the seeds both arms have.", ""]
    verdict_summary = []
    for cid, title, source, rows in CLAIMS:
        L += [f"### {title}", "", f"Paper: {source}.", "",
              "| metric | A | B | paper A | paper B | ours A | ours B | A - B | threshold | verdict |",
              "|---|---|---|---|---|---|---|---|---|---|"]
        for metric, arm_a, arm_b, rel, pa, pb, better in rows:
            va, vb, d, thr, verdict = ver.row(metric, arm_a, arm_b, rel, better)
            pct = metric not in ("wall", "step")
            k = 1000 if metric == "step" else 1
            ours_a = _fmt(k * statistics.fmean(va.values()) if va else None, pct) + _spread([k * x for x in va.values()], pct)
            ours_b = _fmt(k * statistics.fmean(vb.values()) if vb else None, pct) + _spread([k * x for x in vb.values()], pct)
            if not pct:
                ds = "—" if d is None else f"x {d:.3f}"
                ts = f"± {100 * thr:.0f} %" if thr is not None else "—"
                paper_ratio = f" (x {pa / pb:.3f})" if pa and pb else ""
                pas, pbs = (f"{pa:g}{paper_ratio}" if pa else "—"), (f"{pb:g}" if pb else "—")
            else:
                ds = "—" if d is None else f"{100 * d:+.1f}"
                ts = "—" if thr is None else f"{100 * thr:.1f}"
                pas, pbs = (f"{pa:g}" if pa is not None else "—"), (f"{pb:g}" if pb is not None else "—")
            L.append(f"| {METRIC_NAMES[metric]} | {_arm_label(arm_a)} | {_arm_label(arm_b)} | {pas} | {pbs} | "
                     f"{ours_a} | {ours_b} | {ds} | {ts} | {verdict} |")
            verdict_summary.append((title, METRIC_NAMES[metric], verdict))
        if cid == "conv" and "convergence" in figs:
            L += ["", f"![kNN top-1 during pre-training]({figs['convergence']})"]
        if cid == "sdae-ts" and "sdae_teacher_student" in figs:
            L += ["", f"![SdAE teacher vs student]({figs['sdae_teacher_student']})"]
        L.append("")
    L += ["## All runs", "",
          f"Pre-training wall time on this machine ({getattr(study.args, 'jobs', 2)} runs at a time, "
          f"{getattr(study.args, 'threads', 1)} thread(s) each, on {os.cpu_count()} cores), final "
          "training loss, frozen evaluations of both encoders, fine-tuning top-1.", "",
          "| run | seed | wall (s) | imgs/s | final loss | kNN teacher | kNN student | probe teacher | probe student "
          "| fine-tune teacher | fine-tune student | mean corruption error |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for v, s in study.runs():
        summ = res.summary(v, s)
        cells = [VARIANTS[v][0], str(s), _fmt(summ["wall_time_s"], False) if summ else "not run yet",
                 f"{summ['imgs_per_s_median']:.0f}" if summ else "—",
                 f"{summ['final_loss']:.4f}" if summ and "final_loss" in summ else "—"]
        for metric in ("knn", "linprobe", "finetune"):
            for w in ("teacher", "student"):
                if w == "teacher" and method_of(v) == "mae":
                    cells.append("—")
                    continue
                cells.append(_fmt(res.value(v, w, metric, s)))
        rob = res.robustness(v, s, DEFAULT_WHICH[method_of(v)])
        cells.append(_fmt(rob["mean_corruption_error"]) if rob else "—")
        L.append("| " + " | ".join(cells) + " |")
    s0 = study.seeds[0]
    init = _read(study.init_file())
    L += ["", f"Encoder at initialisation (the runs' shape and data, random weights, seed {s0}): "
          + (f"kNN {_fmt(init['knn_top1'])}, linear probe {_fmt(init['linprobe_top1'])}." if init else "not run yet.")]
    scratch = _read(study.scratch_dir(s0) / "eval_finetune.json")
    scratch_rob = _read(study.scratch_dir(s0) / "eval_robustness.json")
    mae_ft = res.value("mae", "default", "finetune", s0)
    L += ["", f"From-scratch baseline (same fine-tuning recipe, seed {s0}): top-1 "
          f"{_fmt(scratch['top1']) if scratch else 'not run yet'}"
          + (f" (MAE pre-training: {_fmt(mae_ft)})" if scratch and mae_ft is not None else "")
          + (f", mean corruption error {_fmt(scratch_rob['mean_corruption_error'])}" if scratch_rob else "") + ".", ""]
    mce_rows = mce_table(study, res)
    if mce_rows:
        L += ["### Robustness per corruption (first seed; error %, mean over severities 1-5)", "", *mce_rows, ""]
    L += ["## Summary of verdicts", "", "| claim | metric | verdict |", "|---|---|---|"]
    L += [f"| {t} | {m} | {v} |" for t, m, v in verdict_summary]
    notes = Path(study.args.out_dir) / "RESULTS_NOTES.md"
    if notes.exists():  # interpretation written by a person after reading the numbers above; kept apart from them
        L += ["", "## Reading the results (written by hand from the numbers above, not computed)", "",
              f"From [{notes.name}]({notes.name}); it was written for the runs listed here and may lag a re-run.", "",
              notes.read_text().strip()]
    L += ["", "## What cannot be concluded from this study", "",
          "- Absolute accuracies: they are far below any CIFAR-10 number in the literature because the runs are "
          "minutes long; only differences between methods under identical budgets are meaningful, and only "
          "those larger than the threshold column.",
          "- Claims about long schedules: per-epoch EMA (SdAE) updates the teacher once per epoch, so in a few "
          "epochs its teacher stays close to its initialisation; the paper's setting (300 epochs) is not probed.",
          "- Dense prediction (COCO, ADE20K) and ImageNet-A/-R/-Sketch are out of scope; robustness is our "
          "CIFAR-scale ImageNet-C analogue (docs/EVALUATION.md), compared between our models only.",
          "- Costs are CPU step times of a small ViT; the papers' costs are GPU hours of ViT-B/L, where memory "
          "bandwidth, kernel launch and data loading weigh differently. Only the direction compares.", "",
          "## Reproduce", "", "```bash", command, "```", "",
          f"Machine: {platform.machine()} CPU, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"torch {_torch_version()}. Run folders: `{_shown(study.root)}` (logs in `logs/`, one per task).", ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text("\n".join(L))
    os.replace(tmp, out)


def mce_table(study: Study, res: Results) -> list[str]:
    s0 = study.seeds[0]
    cols = [(VARIANTS[v][0], res.robustness(v, s0, DEFAULT_WHICH[method_of(v)])) for v in ROBUSTNESS_VARIANTS]
    cols.append(("from scratch", _read(study.scratch_dir(s0) / "eval_robustness.json")))
    cols = [(n, r) for n, r in cols if r is not None]
    if not cols:
        return []
    rows = ["| corruption | " + " | ".join(n for n, _ in cols) + " |", "|---|" + "---|" * len(cols)]
    for name in cols[0][1]["corruption_error"]:
        rows.append(f"| {name} | " + " | ".join(_fmt(r["corruption_error"][name]) for _, r in cols) + " |")
    rows.append("| clean error | " + " | ".join(_fmt(r["clean_error"]) for _, r in cols) + " |")
    base = dict(cols).get("MAE")
    if base is not None:
        ratios = []
        for n, r in cols:
            ce = [sum(r["errors"][c]) / sum(base["errors"][c]) for c in base["errors"]]
            ratios.append(f"{100 * statistics.fmean(ce):.1f}")
        rows.append("| mCE vs MAE (= 100) | " + " | ".join(ratios) + " |")
    return rows


def _profile_value(prof: dict, key: str) -> str:
    return next(o.split("=", 1)[1] for o in prof["pretrain"] if o.startswith(key + "="))


def _shown(path: Path) -> str:
    """A path inside the repository relative to it (what a reader can find), others as given."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def _torch_version() -> str:
    try:
        import torch
        return torch.__version__
    except ImportError:
        return "?"


def make_figures(study: Study, res: Results, folder: Path) -> dict[str, str]:
    """Small PNGs next to the report; returns name -> path relative to docs/."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: dict[str, str] = {}

    def curve(v: str, w: str, seed: int) -> tuple[list[int], list[float]]:
        xs, ys = [], []
        for e in study.curve_epochs(v):
            r = res.frozen(v, seed, w, e)
            if r is not None:
                xs.append(e)
                ys.append(100 * r["knn_top1"])
        return xs, ys

    panels = {
        "convergence": [("mae", "student", "MAE", "C0"), ("rc-mae-s", "teacher", "RC-MAE-S (teacher)", "C3")],
        "sdae_teacher_student": [("sdae", "student", "SdAE student", "C2"), ("sdae", "teacher", "SdAE teacher", "C4"),
                                 ("mae", "student", "MAE", "C0")],
    }
    for name, lines in panels.items():
        fig, ax = plt.subplots(figsize=(4.2, 3.0), dpi=110)
        drawn = False
        for v, w, label, color in lines:
            for i, s in enumerate(study.seeds):
                xs, ys = curve(v, w, s)
                if xs:
                    ax.plot(xs, ys, "o-", color=color, alpha=1.0 if i == 0 else 0.5, ms=3, lw=1.2,
                            label=label if i == 0 else None)
                    drawn = True
        if not drawn:
            plt.close(fig)
            continue
        ax.set_xlabel("pre-training epoch")
        ax.set_ylabel("kNN top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_title("CIFAR-10, mean-pooled features (pale: other seeds)", fontsize=8)
        fig.tight_layout()
        path = folder / f"{name}.png"
        fig.savefig(path)
        plt.close(fig)
        out[name] = os.path.relpath(path, study.args.out_dir)
    return out


# ----------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_frozen"]:
        return cmd_frozen(argv[1:])
    if argv[:1] == ["_cost"]:
        return cmd_cost(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=os.environ.get("MIMKIT_CIFAR10", str(DEFAULT_DATA)),
                   help="CIFAR-10 folder or archive (default: $MIMKIT_CIFAR10 or ../shared/data/cifar10/...)")
    p.add_argument("--profile", default="quick", choices=sorted(PROFILES))
    p.add_argument("--runs", default=None, help="run folders (default: runs/cifar10-study-<profile>)")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds (main runs use all, ablations the first)")
    p.add_argument("--jobs", type=int, default=2, help="tasks at a time")
    p.add_argument("--threads", type=int, default=1, help="torch threads per task")
    p.add_argument("--only", default=None, help="comma list of task kinds to run: pretrain,frozen,finetune,robustness,cost")
    p.add_argument("--report-only", action="store_true", help="only rewrite the report from finished runs")
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
    kinds = {"pretrain", "frozen", "finetune", "robustness", "cost"}
    only = set(args.only.split(",")) if args.only else kinds
    if not only <= kinds:
        p.error(f"--only accepts {', '.join(sorted(kinds))}; got {args.only!r}")
    if not args.report_only and not Path(args.data).exists():
        print(f"error: CIFAR-10 not found at {args.data}; pass --data PATH (folder or .tar.gz) or set MIMKIT_CIFAR10",
              file=sys.stderr)
        return 2
    study = Study(args)
    study.root.mkdir(parents=True, exist_ok=True)
    figures = Path(args.out_dir) / "images" / "results"
    command = "python benchmarks/cifar10_study.py " + " ".join(
        a for a in argv if not a.startswith("--report-only")).strip()
    command = command.strip()

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

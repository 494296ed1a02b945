"""The study's work as a task graph, and the scheduler that runs it.

A task is done when its result file exists; an interrupted pre-training or fine-tuning run continues from its
last checkpoint (``--resume``); finished evaluations are never repeated. Priority: each run is evaluated right
after it finishes (so the report fills in run by run), the seeds in order, MAE and RC-MAE-S first within a seed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from study.profiles import (CURVE_VARIANTS, PROFILES, ROBUSTNESS_VARIANTS, default_which, encoders_of,
                            run_sets)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
ENTRY = HERE.parent / "cifar10_study.py"
#: within a seed, the pairs every main claim needs first
ORDER = ("mae", "rc-mae-s", "rc-mae-free", "rc-mae-d", "sdae", "rc-mae-s-m80", "rc-mae-s-m85", "sdae-full",
         "sdae-masked", "sdae-ema-step")


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

    # what runs
    def variants(self) -> list[str]:
        return [v for v in ORDER if v in self.profile["seeds"]]

    def seeds_of(self, variant: str) -> list[int]:
        return self.seeds[:self.profile["seeds"].get(variant, 0)]

    def runs(self) -> list[tuple[str, int]]:
        return [(v, s) for s in self.seeds for v in self.variants() if s in self.seeds_of(v)]

    def curve_epochs(self, variant: str) -> list[int]:
        return list(self.profile["curve_epochs"]) if variant in CURVE_VARIANTS else [self.profile["epochs"]]

    def finetunes(self) -> list[tuple[str, int, str]]:
        if not self.profile.get("finetune_epochs"):
            return []
        out = []
        for v, s in self.runs():
            both = v in ("rc-mae-s", "sdae") and s == self.seeds[0]  # teacher vs student: first seed
            out += [(v, s, w) for w in (encoders_of(v) if both else [default_which(v)])]
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

    def retire_incomplete_cost(self) -> None:
        """A cost measurement that lacks a variant of the profile (e.g. made by a mimkit that could not build it)
        is moved aside, so the cost task measures every variant again, interleaved."""
        import json

        try:
            measured = set(json.loads(self.cost_file().read_text())["step_s"])
        except (OSError, ValueError, KeyError):
            return
        if set(self.variants()) - measured:
            os.replace(self.cost_file(), self.cost_file().with_name(f"cost-{time.strftime('%Y%m%d-%H%M%S')}.json"))

    def pretrain_argv(self, variant: str, seed: int) -> list[str]:
        run = self.run_dir(variant, seed)
        self._clear_unfinished(run)
        sets = [f"data.path={self.data_path()}", *run_sets(self.args.profile, variant), f"train.seed={seed}"]
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

    def frozen_argv(self, ckpt: Path, which: str, out: Path, robust: bool, random_init: int | None = None) -> list[str]:
        argv = [self.py, str(ENTRY), "_frozen", "--checkpoint", str(ckpt), "--which", which, "--out", str(out)]
        if robust:
            argv += ["--robust-images", str(self.profile["robust_images"])]
        if self.profile.get("eval_train_images"):
            argv += ["--eval-train", str(self.profile["eval_train_images"])]
        if random_init is not None:
            argv += ["--random-init", str(random_init)]
        return argv

    def tasks(self) -> list[Task]:
        """In priority order: per seed, per variant, its pre-training then its frozen evaluations; the
        initialisation reference and the step costs after the first MAE run; fine-tunes (when the profile has
        them) after everything frozen."""
        tasks: list[Task] = []
        logs = self.root / "logs"
        final = self.profile["epochs"]
        s0 = self.seeds[0]
        for v, s in self.runs():
            run_key = f"pretrain {v} s{s}"
            tasks.append(Task(run_key, "pretrain", self.run_dir(v, s) / "summary.json",
                              lambda v=v, s=s: self.pretrain_argv(v, s), logs / f"pretrain-{v}-s{s}.log"))
            for epoch in self.curve_epochs(v):
                for w in encoders_of(v):
                    out, ckpt = self.frozen_file(v, s, epoch, w), self.checkpoint(v, s, epoch)
                    robust = epoch == final and v in ROBUSTNESS_VARIANTS and (
                        w == default_which(v) or v == "rc-mae-s")  # both RC-MAE-S encoders: its claim has both
                    tasks.append(Task(f"frozen {v} s{s} e{epoch} {w}", "frozen", out,
                                      lambda c=ckpt, w=w, o=out, r=robust: self.frozen_argv(c, w, o, r),
                                      logs / f"frozen-{v}-s{s}-e{epoch}-{w}.log", [run_key]))
            if (v, s) == ("mae", s0):
                init_ckpt = self.run_dir("mae", s0) / "checkpoints" / "last.pt"
                tasks.append(Task(f"frozen init s{s0}", "frozen", self.init_file(),
                                  lambda c=init_ckpt: self.frozen_argv(c, "student", self.init_file(), True, s0),
                                  logs / f"frozen-init-s{s0}.log", [run_key]))
                tasks.append(Task(f"cost s{s0}", "cost", self.cost_file(),
                                  lambda: [self.py, str(ENTRY), "_cost", "--profile", self.args.profile,
                                           "--variants", ",".join(self.variants()), "--out", str(self.cost_file())],
                                  logs / "cost.log"))
        ft = self.finetunes()
        if ft:
            scratch = self.scratch_dir(s0)
            mae0 = self.run_dir("mae", s0) / "checkpoints" / "last.pt"
            tasks.append(Task(f"finetune scratch s{s0}", "finetune", scratch / "eval_finetune.json",
                              lambda: self.finetune_argv(scratch, mae0, None, s0),
                              logs / f"finetune-scratch-s{s0}.log", [f"pretrain mae s{s0}"]))
            for v, s, w in ft:
                out = self.ft_dir(v, s, w)
                ckpt = self.run_dir(v, s) / "checkpoints" / "last.pt"
                tasks.append(Task(f"finetune {v} s{s} {w}", "finetune", out / "eval_finetune.json",
                                  lambda out=out, ckpt=ckpt, w=w, s=s: self.finetune_argv(out, ckpt, w, s),
                                  logs / f"finetune-{v}-s{s}-{w}.log", [f"pretrain {v} s{s}"]))
        return tasks


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

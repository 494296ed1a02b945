"""GPU acceptance check: one CUDA GPU, under 8 minutes, writes a CUDA section in docs/PERFORMANCE.md.

    python benchmarks/gpu_check.py                        # on a machine with one CUDA GPU
    python benchmarks/gpu_check.py --device cpu --tiny --out /tmp/PERF.md   # the CPU path CI runs (tiny sizes)

What it does, each part timed and reported:

1. every method (MAE, RC-MAE-S, RC-MAE-D, SdAE, RC-MAE-free) pre-trains for ``--steps`` optimiser steps on the
   embedded demo data in bf16 autocast, eager and with ``train.compile=true``: images/s, final loss (finite?), peak
   GPU memory (``torch.cuda.max_memory_allocated``) per run;
2. step-checkpoint resume on the device: a run with ``train.ckpt_every_steps`` is SIGKILLed after a step checkpoint
   and resumed; its logged losses are compared with an uninterrupted run (identical, or the largest difference);
3. ``mimkit bench`` at vit_base/16 @ 224 (bf16, batch 64) with Hugging Face's ViTMAE side by side.

The section goes between ``<!-- gpu_check:start -->`` and ``<!-- gpu_check:end -->`` of ``--out`` (appended the
first time). Nothing is measured on a machine without CUDA unless ``--device cpu`` is given.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- gpu_check:start -->", "<!-- gpu_check:end -->"

#: (row name, --set items) of every method
METHOD_ROWS = [
    ("MAE", ["method.name=mae"]),
    ("RC-MAE-S", ["method.name=rc-mae", "method.mask_mode=same"]),
    ("RC-MAE-D", ["method.name=rc-mae", "method.mask_mode=different"]),
    ("SdAE", ["method.name=sdae"]),
    ("RC-MAE-free", ["method.name=rc-mae-free"]),
]

#: model and data per size: ViT-Tiny/4 on the 28 px demo images (GPU), a 2-block toy (CPU path)
SIZES = {
    "full": ["model.img_size=28", "model.patch_size=4", "model.embed_dim=192", "model.depth=12", "model.num_heads=3",
             "model.decoder_dim=128", "model.decoder_depth=2", "model.decoder_heads=4", "train.batch_size=256"],
    "tiny": ["model.img_size=16", "model.patch_size=4", "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
             "model.decoder_dim=32", "model.decoder_depth=1", "model.decoder_heads=2", "train.batch_size=32",
             "data.max_train=256", "data.max_test=64"],
}

#: SIGKILL the process right after metrics line ``step == argv[1]`` (once), then run the mimkit CLI
KILL_DRIVER = '''
import os, signal, sys
from mimkit.train import runlog
kill_at = int(sys.argv[1])
original = runlog.RunLog.metrics
def metrics(self, record):
    original(self, record)
    if record.get("step") == kill_at and "loss" in record:
        os.kill(os.getpid(), signal.SIGKILL)
runlog.RunLog.metrics = metrics
from mimkit.cli import main
sys.exit(main(sys.argv[2:]))
'''


def _sets(items: list[str]) -> list[str]:
    return [x for item in items for x in ("--set", item)]


def _epochs_for(steps: int, size: str) -> tuple[int, int]:
    """(epochs, steps per epoch) giving at least ``steps`` optimiser steps on the demo data."""
    from mimkit.config import build_config
    from mimkit.runtime import datamodule_from_config

    cfg = build_config(None, SIZES[size])
    per_epoch = datamodule_from_config(cfg).steps_per_epoch(cfg.train.batch_size)
    return max(1, math.ceil(steps / per_epoch)), per_epoch


def pretrain_rows(args, work: Path) -> list[dict]:
    """Part 1: every method, eager and compiled, ``--steps`` steps each (in this process: peak memory per run)."""
    import torch

    from mimkit.config import build_config
    from mimkit.api import pretrain

    epochs, per_epoch = _epochs_for(args.steps, args.size)
    rows = []
    for compiled in args.compile_modes:
        for name, items in METHOD_ROWS:
            overrides = [*SIZES[args.size], *items, f"train.epochs={epochs}", "train.warmup_epochs=1",
                         f"train.precision={args.precision}", f"train.device={args.device}", "eval.knn_init=false",
                         f"train.compile={'true' if compiled else 'false'}", f"train.log_every={max(1, per_epoch // 2)}"]
            cfg = build_config(None, overrides)
            if args.device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.time()
            error = None
            try:
                summary = pretrain(cfg, work / f"{name}-{'compiled' if compiled else 'eager'}", show_progress=False,
                                   echo=False)
            except Exception as e:  # noqa: BLE001 - a failing method is a result of the check, not its end
                summary, error = {}, f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            wall = time.time() - t0
            peak = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None
            loss = summary.get("final_loss")
            rows.append({"method": name, "compile": compiled, "steps": summary.get("steps"), "wall_s": wall,
                         "imgs_per_s": summary.get("imgs_per_s_median"), "final_loss": loss,
                         "finite": loss is not None and math.isfinite(loss), "knn_top1": summary.get("knn_top1"),
                         "peak_gib": peak, "error": error})
            print(f"{name:12s} compile={compiled!s:5s} {rows[-1]['steps']} steps {wall:6.1f}s "
                  f"loss {loss} peak {peak if peak is None else round(peak, 2)} GiB {error or ''}", flush=True)
    return rows


def resume_check(args, work: Path) -> dict:
    """Part 2: SIGKILL after a step checkpoint, resume, compare the logged losses with an uninterrupted run."""
    steps = max(8, min(args.steps, 60))
    epochs, per_epoch = _epochs_for(steps, args.size)
    every = max(2, per_epoch // 3)
    kill = every + 1 if every + 1 < per_epoch else every
    items = [*SIZES[args.size], "method.name=rc-mae", f"train.epochs={epochs}", "train.warmup_epochs=1",
             "train.log_every=1", f"train.ckpt_every_steps={every}", "train.deterministic=true",
             f"train.precision={args.precision}", f"train.device={args.device}", "eval.knn_init=false"]
    cli = ["pretrain", "--no-progress", *_sets(items)]
    full, cut = work / "resume-full", work / "resume-cut"
    driver = work / "kill_driver.py"
    driver.write_text(KILL_DRIVER)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = lambda cmd: subprocess.run(cmd, env=env, capture_output=True, text=True)  # noqa: E731
    t0 = time.time()
    a = run([sys.executable, "-m", "mimkit", *cli, "--output", str(full)])
    b = run([sys.executable, str(driver), str(kill), *cli, "--output", str(cut)])
    c = run([sys.executable, "-m", "mimkit", *cli, "--output", str(cut), "--resume"])
    result = {"ckpt_every_steps": every, "killed_at_step": kill, "killed": b.returncode == -9,
              "wall_s": time.time() - t0}
    if a.returncode or c.returncode:
        result["error"] = (a.stderr or c.stderr)[-300:]
        return result

    def losses(run_dir: Path) -> list[tuple[int, float]]:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return [(r["step"], r["loss"]) for r in map(json.loads, lines) if "loss" in r]

    la, lb = losses(full), losses(cut)
    result["steps_equal"] = [s for s, _ in la] == [s for s, _ in lb]
    result["max_abs_loss_diff"] = max((abs(x - y) for (_, x), (_, y) in zip(la, lb)), default=None)
    result["identical"] = result["steps_equal"] and la == lb
    result["resumed_mid_epoch"] = "micro-batch" in (cut / "train.log").read_text()
    return result


def bench_rows(args, work: Path) -> dict:
    """Part 3: ``mimkit bench`` (vit_base/16 @ 224 on CUDA) with HF ViTMAE beside MAE / RC-MAE / SdAE."""
    if args.size == "full":
        shape = ["--model", "vit_base", "--patch", "16", "--img", "224", "--batch", "64", "--repeats", "10"]
    else:
        shape = ["--model", "vit_tiny", "--patch", "4", "--img", "16", "--batch", "8", "--repeats", "2",
                 "--warmup", "1", "--no-memory", "--no-gemm-profile"]
    methods = "mae,rc-mae,sdae,hf" if args.size == "full" else "mae,hf"
    out = work / "bench.json"
    cmd = [sys.executable, "-m", "mimkit", "bench", *shape, "--methods", methods,
           "--device", args.device, "--precision", args.precision if args.device == "cuda" else "fp32",
           "--no-write", "--json", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=work)
    result = {"command": "mimkit " + " ".join(cmd[3:-2]), "wall_s": time.time() - t0}
    if proc.returncode or not out.is_file():
        result["error"] = proc.stderr[-300:]
        return result
    result["rows"] = json.loads(out.read_text())["rows"]
    return result


def section(args, device_name: str, rows: list[dict], resume: dict, bench: dict, total_s: float) -> str:
    f = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
    lines = [START, f"### CUDA acceptance check ({device_name})", "",
             f"`python benchmarks/gpu_check.py {' '.join(args.argv)}` on {time.strftime('%Y-%m-%d')}, "
             f"{total_s / 60:.1f} min in all. Pre-training: demo data, {args.size} model, {args.precision} autocast, "
             f"{args.steps}+ steps per run.", "",
             "| method | torch.compile | steps | img/s | final loss | finite | peak GPU memory (GiB) | wall (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {'yes' if r['compile'] else 'no'} | {f(r['steps'], 'd')} | "
                     f"{f(r['imgs_per_s'], '.0f')} | {f(r['final_loss'], '.4f')} | {'yes' if r['finite'] else 'NO'} | "
                     f"{f(r['peak_gib'], '.2f')} | {r['wall_s']:.0f} |" + (f" {r['error']}" if r["error"] else ""))
    lines += ["", f"Step-checkpoint resume (RC-MAE, `train.ckpt_every_steps={resume.get('ckpt_every_steps')}`, "
                  f"SIGKILL after step {resume.get('killed_at_step')}): "
              + ("error: " + resume["error"] if "error" in resume else
                 f"resumed mid-epoch: {'yes' if resume.get('resumed_mid_epoch') else 'no'}; logged losses identical "
                 f"to the uninterrupted run: {'yes' if resume.get('identical') else 'NO'} (largest difference "
                 f"{resume.get('max_abs_loss_diff')})"), ""]
    if "rows" in bench:
        lines += [f"`{bench['command']}`:", "", "| row | img/s | step (ms) | peak memory (MiB) | time vs MAE |",
                  "|---|---|---|---|---|"]
        for r in bench["rows"]:
            lines.append(f"| {r['row']} | {f(r.get('imgs_per_s'), '.1f')} | {f(1000 * r['step_s'], '.1f')} | "
                         f"{f(r.get('peak_mib'), '.0f')} | {f(r.get('time_ratio'), '.2f')} |")
    else:
        lines.append(f"`mimkit bench` failed: {bench.get('error')}")
    lines.append(END)
    return "\n".join(lines) + "\n"


def write_section(page: Path, text: str) -> None:
    old = page.read_text() if page.is_file() else "# Performance\n"
    if START in old and END in old:
        new = re.sub(re.escape(START) + ".*?" + re.escape(END) + "\n?", lambda _: text, old, flags=re.S)
    else:
        new = old.rstrip("\n") + "\n\n" + text
    tmp = page.with_suffix(".md.tmp")
    tmp.write_text(new)
    os.replace(tmp, page)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--tiny", action="store_true", help="tiny model and short runs (the CPU path CI runs)")
    ap.add_argument("--steps", type=int, default=None, help="optimiser steps per pre-training run (default 300; tiny 16)")
    ap.add_argument("--precision", default=None, help="autocast dtype (default bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--no-compile", action="store_true", help="skip the train.compile runs (default on CPU --tiny)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "PERFORMANCE.md"), help="page that gets the CUDA section")
    ap.add_argument("--work", default=None, help="folder for the runs (default: a temporary folder)")
    args = ap.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing measured (the CPU path: --device cpu --tiny)", file=sys.stderr)
        return 2
    args.size = "tiny" if args.tiny else "full"
    args.steps = args.steps or (16 if args.tiny else 300)
    args.precision = args.precision or ("bf16" if args.device == "cuda" else "fp32")
    args.compile_modes = [False] if args.no_compile or (args.tiny and args.device == "cpu") else [False, True]
    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU"
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        rows = pretrain_rows(args, work)
        resume = resume_check(args, work)
        print(f"resume: {resume}", flush=True)
        bench = bench_rows(args, work)
        print(f"bench: {bench.get('wall_s', 0):.0f}s {bench.get('error', '')}", flush=True)
    text = section(args, device_name, rows, resume, bench, time.time() - t0)
    write_section(Path(args.out), text)
    print(text)
    print(f"wrote the section into {args.out}")
    ok = all(r["finite"] and not r["error"] for r in rows) and resume.get("identical") and "rows" in bench
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Training-step throughput, FLOPs and EMA cost of each method, side by side in one process.

    python benchmarks/throughput.py                       # vit_tiny/4 @ 32 px, batch 128, CPU
    python benchmarks/throughput.py --model vit_small --patch 16 --img 224 --batch 32 --repeats 5

A "step" is what the trainer does per optimiser step: forward, backward, AdamW step and the method's
after-step hook (the EMA update for teacher methods). Times are medians over ``--repeats`` timed steps
after ``--warmup`` steps; all rows are measured in the same run, interleaved round-robin so machine
noise hits every row alike. FLOPs per step come from ``torch.utils.flop_counter`` (forward + backward).
Results are appended to docs/PERFORMANCE.md (section per configuration) unless --no-write.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from mimkit.config import build_config
from mimkit.methods import Progress, build_method
from mimkit.train.optim import build_adamw

ROWS = {
    "MAE": ["method.name=mae"],
    "RC-MAE-S": ["method.name=rc-mae", "method.mask_mode=same"],
    "RC-MAE-D": ["method.name=rc-mae", "method.mask_mode=different"],
}


def sdae_rows() -> dict[str, list[str]]:
    return {f"SdAE ({mode})": ["method.name=sdae", f"method.teacher_input={mode}", "method.ema_unit=step"]
            for mode in ("full", "masked", "crop", "multifold")}


def build(args, overrides: list[str]):
    base = [f"model.name={args.model}", f"model.patch_size={args.patch}", f"model.img_size={args.img}",
            f"train.batch_size={args.batch}", "model.drop_path=0.0"]
    cfg = build_config("demo", base + overrides)
    method = build_method(cfg, args.chans).to(args.device)
    opt = build_adamw(method.student.named_parameters(), 1e-4, 0.05, (0.9, 0.95))
    return method, opt


def one_step(method, opt, images, step: int):
    out = method(images)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    method.after_optimizer_step(Progress(step, 0, 1000, 1000, 1))


def flops_per_step(method, images) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        out = method(images)
        out.loss.backward()
    method.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure_gemm_peak(device, n: int = 2048, repeats: int = 5) -> float:
    """Achievable fp32 GEMM FLOP/s on this machine (median of ``repeats``), the MFU denominator."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_tiny")
    p.add_argument("--patch", type=int, default=4)
    p.add_argument("--img", type=int, default=32)
    p.add_argument("--chans", type=int, default=3)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--methods", default="mae,rc-mae", help="comma list of mae, rc-mae, sdae")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "PERFORMANCE.md"))
    p.add_argument("--json", default=None, help="also write the raw numbers to this JSON file")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    args.device = torch.device(args.device)
    torch.manual_seed(0)

    wanted = set(args.methods.split(","))
    rows = {k: v for k, v in ROWS.items() if (k == "MAE" and "mae" in wanted) or (k.startswith("RC") and "rc-mae" in wanted)}
    if "sdae" in wanted:
        rows.update(sdae_rows())
    images = torch.randn(args.batch, args.chans, args.img, args.img, device=args.device)
    built = {name: build(args, ov) for name, ov in rows.items()}
    flops = {name: flops_per_step(m, images) for name, (m, _) in built.items()}
    times: dict[str, list[float]] = {name: [] for name in built}
    ema: dict[str, list[float]] = {name: [] for name in built}
    for name, (m, opt) in built.items():
        for i in range(args.warmup):
            one_step(m, opt, images, i + 1)
    for r in range(args.repeats):
        for name, (m, opt) in built.items():
            sync(args.device)
            t = time.perf_counter()
            one_step(m, opt, images, args.warmup + r + 1)
            sync(args.device)
            times[name].append(time.perf_counter() - t)
            if hasattr(m, "teacher"):
                sync(args.device)
                t = time.perf_counter()
                m.update_teacher(0.996)
                sync(args.device)
                ema[name].append(time.perf_counter() - t)
    peak = measure_gemm_peak(args.device)

    base = statistics.median(times["MAE"]) if "MAE" in times else None
    results = []
    for name in built:
        t = statistics.median(times[name])
        row = {
            "method": name, "step_s": t, "imgs_per_s": args.batch / t, "gflops_per_img": flops[name] / args.batch / 1e9,
            "achieved_gflops": flops[name] / t / 1e9, "mfu": flops[name] / t / peak,
            "ema_ms": statistics.median(ema[name]) * 1e3 if ema[name] else None,
        }
        if base is not None:
            row["time_ratio"] = t / base
            row["flop_ratio"] = flops[name] / flops["MAE"]
        results.append(row)

    header = (f"### {args.model}/{args.patch} @ {args.img} px, batch {args.batch}, {args.device.type}, "
              f"{time.strftime('%Y-%m-%d')}")
    machine = (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
               if args.device.type == "cpu" else torch.cuda.get_device_name(args.device))
    lines = [header, "", f"Machine: {machine}; measured fp32 GEMM peak {peak / 1e9:.1f} GFLOP/s (2048^3 matmul). "
             f"Median of {args.repeats} steps after {args.warmup} warm-up steps, rows interleaved.", "",
             "| method | step (ms) | imgs/s | GFLOPs/img (fwd+bwd) | achieved GFLOP/s | MFU | EMA update (ms, % of step) "
             "| time ratio vs MAE | FLOP ratio vs MAE | time ratio / FLOP ratio |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        ema_txt = f"{r['ema_ms']:.2f} ({100 * r['ema_ms'] / 1e3 / r['step_s']:.1f}%)" if r["ema_ms"] is not None else "-"
        ratio = r.get("time_ratio")
        lines.append(
            f"| {r['method']} | {1e3 * r['step_s']:.1f} | {r['imgs_per_s']:.0f} | {r['gflops_per_img']:.3f} | "
            f"{r['achieved_gflops']:.1f} | {100 * r['mfu']:.1f}% | {ema_txt} | "
            f"{ratio:.3f} | {r['flop_ratio']:.3f} | {ratio / r['flop_ratio']:.3f} |" if ratio else "")
    cmd = "python benchmarks/throughput.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines += ["", f"Command: `{cmd.strip()}`", ""]
    text = "\n".join(lines)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"config": vars(args) | {"device": str(args.device)}, "rows": results,
                                               "gemm_peak_flops": peak}, indent=2, default=str))
    if not args.no_write:
        out = Path(args.out)
        existing = out.read_text() if out.exists() else "# Performance\n\nWritten by `benchmarks/throughput.py`.\n\n"
        start = existing.find(header.split(", 20")[0])
        if start >= 0:  # replace this configuration's previous section
            end = existing.find("\n### ", start + 1)
            existing = existing[:start] + (existing[end + 1:] if end >= 0 else "")
        out.write_text(existing.rstrip() + "\n\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Training-step throughput, FLOPs, MFU, EMA cost and peak memory of each method, side by side.

    mimkit bench                                    # vit_tiny/4 @ 32 px, batch 128, MAE + RC-MAE + SdAE + HF
    mimkit bench --model vit_small --patch 16 --img 224 --batch 32 --repeats 5
    python benchmarks/throughput.py ...             # the same

A "step" is what the trainer does per optimiser step: forward, backward, AdamW step and the method's
after-step hook (the EMA update for teacher methods; SdAE rows use per-step EMA so its cost is in the
step). Times are medians over ``--repeats`` timed steps after ``--warmup`` steps; all rows are built in
one process and timed interleaved (round-robin), so machine noise hits every row alike. FLOPs per step
(forward + backward) come from ``torch.utils.flop_counter``; MFU divides the achieved FLOP/s by the fp32
GEMM peak measured in the same run. Peak memory is measured for each row in a fresh subprocess (peak RSS
on CPU, max allocated on CUDA). Hugging Face ``ViTMAEForPreTraining`` with identical dimensions, mask
ratio and norm_pix is a row when ``transformers`` is installed (``pip install '.[bench]'``), twice: with torch's
default AdamW (what HF's Trainer uses by default, ``adamw_torch``) and with the fused AdamW our trainer uses, so
the table separates what the model code costs from what the optimiser costs.
Results go to docs/PERFORMANCE.md (one section per configuration, replaced on re-run) unless --no-write.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from mimkit.config import build_config
from mimkit.methods import Progress, build_method
from mimkit.models.vit import DECODER_SIZES, VIT_SIZES, compile_blocks
from mimkit.train.optim import build_adamw

METHOD_ROWS = {
    "MAE": ["method.name=mae"],
    "RC-MAE-S": ["method.name=rc-mae", "method.mask_mode=same"],
    "RC-MAE-D": ["method.name=rc-mae", "method.mask_mode=different"],
    "RC-MAE-free": ["method.name=rc-mae-free"],   # no teacher: the consistency correction inside the step (issue 15)
    "RC-MAE-free (4 tokens)": ["method.name=rc-mae-free", "method.correction_tokens=4"],  # curvature from 4 tokens/image
    "RC-MAE-free (head only)": ["method.name=rc-mae-free", "method.correction_scope=head"],
    **{f"SdAE ({mode})": ["method.name=sdae", f"method.teacher_input={mode}", "method.ema_unit=step"]
       for mode in ("full", "masked", "crop", "multifold")},
}
HF_ROW = "HF ViTMAE"                          # with torch's default AdamW (foreach), as HF's Trainer "adamw_torch"
HF_FUSED_ROW = "HF ViTMAE + fused AdamW"      # the same model with our optimiser: what the model code alone costs
HF_ROWS = (HF_ROW, HF_FUSED_ROW)
COMPILED_ROW = "MAE + torch.compile"
GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def select_rows(methods: str) -> list[str]:
    wanted = set(methods.split(","))
    rows = [r for r in METHOD_ROWS if ("mae" in wanted and r == "MAE") or ("rc-mae" in wanted and r.startswith("RC"))
            or ("rc-mae-free" in wanted and r.startswith("RC-MAE-free"))
            or ("sdae" in wanted and r.startswith("SdAE"))]
    if "hf" in wanted:
        rows += list(HF_ROWS)
    return rows


def config_overrides(args) -> list[str]:
    """The named size with its default decoder (ViT-Ti 128x4, ViT-S 256x4, ViT-B/L 512x8)."""
    return [f"model.name={args.model}", f"model.patch_size={args.patch}", f"model.img_size={args.img}",
            f"train.batch_size={args.batch}", "model.drop_path=0.0", "model.embed_dim=null", "model.depth=null",
            "model.num_heads=null", "model.decoder_dim=null", "model.decoder_depth=null", "model.decoder_heads=null",
            f"method.mask_ratio={args.mask_ratio}"]


class Row:
    """One benchmarked model: ``step(i)`` runs one full training step."""

    def __init__(self, name: str, args):
        self.name = name
        device = args.device
        fused = None  # ours: fused AdamW where supported, as the trainer
        if name in HF_ROWS:
            self.model = build_hf_mae(args).to(device)
            self.method = None
            params = self.model.named_parameters()
            fused = name == HF_FUSED_ROW
        else:
            cfg = build_config("demo", config_overrides(args) + METHOD_ROWS["MAE" if name == COMPILED_ROW else name])
            self.method = build_method(cfg, args.chans).to(device)
            if name == COMPILED_ROW:
                compile_blocks(self.method)
            self.model = self.method
            params = self.method.student.named_parameters()
        self.opt = build_adamw(params, 1e-4, 0.05, (0.9, 0.95), fused=fused)
        self.amp = args.amp

    def loss(self, images):
        with torch.autocast(images.device.type, dtype=self.amp) if self.amp else _null():
            if self.method is None:
                return self.model(pixel_values=images).loss
            return self.method(images).loss

    def step(self, images, i: int) -> None:
        self.loss(images).backward()
        if self.method is not None and self.method.edits_gradients:  # rc-mae-free: correction before the step
            self.method.before_optimizer_step(Progress(i, 0, 10**6, 10**6, 1))
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.method is not None:
            self.method.after_optimizer_step(Progress(i, 0, 10**6, 10**6, 1))

    def flops(self, images) -> int:
        counter = FlopCounterMode(display=False)
        with counter:
            self.loss(images).backward()
        self.opt.zero_grad(set_to_none=True)
        return counter.get_total_flops()

    def ema_time(self, device) -> float | None:
        if self.method is None or not hasattr(self.method, "update_teacher"):
            return None
        sync(device)
        t = time.perf_counter()
        self.method.update_teacher(0.996)
        sync(device)
        return time.perf_counter() - t


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def build_hf_mae(args):
    """Hugging Face ViTMAEForPreTraining with our dimensions, mask ratio and norm_pix."""
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    dim, depth, heads = VIT_SIZES[args.model]
    ddim, ddepth, dheads = DECODER_SIZES[args.model]
    cfg = ViTMAEConfig(
        hidden_size=dim, num_hidden_layers=depth, num_attention_heads=heads, intermediate_size=4 * dim,
        decoder_hidden_size=ddim, decoder_num_hidden_layers=ddepth, decoder_num_attention_heads=dheads,
        decoder_intermediate_size=4 * ddim, image_size=args.img, patch_size=args.patch, num_channels=args.chans,
        mask_ratio=args.mask_ratio, norm_pix_loss=True, qkv_bias=True, layer_norm_eps=1e-6,
        attn_implementation="sdpa",
    )
    return ViTMAEForPreTraining(cfg)


def _gemm_flops(name: str, shapes: list) -> float:
    """FLOPs of one matrix-multiply call from its recorded input shapes."""
    dims = [tuple(x) for x in shapes if isinstance(x, (list, tuple)) and len(x) >= 2]
    if name in ("aten::addmm", "aten::baddbmm"):
        dims = dims[-2:]  # (bias/input, a, b): the last two are the factors
    if len(dims) < 2:
        return 0.0
    a, b = dims[0], dims[1]
    batch = a[0] if len(a) == 3 else 1
    return 2.0 * batch * a[-2] * a[-1] * b[-1]


def gemm_profile(row: "Row", images, i: int, device, peak: float) -> dict[str, float]:
    """Where a step's time goes: the share spent in matrix multiplies and the FLOP rate they reach (vs ``peak``).

    The MFU of a step cannot exceed (GEMM efficiency) / (GEMM FLOPs / all FLOPs) even if everything else took no time,
    so a GEMM efficiency below a target MFU shows the target is out of reach for these shapes on this machine.
    """
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with profile(activities=acts, record_shapes=True) as prof:
        t = time.perf_counter()
        row.step(images, i)
        sync(device)
        wall = time.perf_counter() - t
    gemm_us, gemm_flops = 0.0, 0.0
    for evt in prof.key_averages(group_by_input_shape=True):
        if evt.key not in GEMM_OPS:
            continue
        us = evt.self_device_time_total if device.type == "cuda" else evt.self_cpu_time_total
        gemm_us += us
        gemm_flops += _gemm_flops(evt.key, evt.input_shapes) * evt.count
    gemm_s = gemm_us / 1e6
    return {"gemm_share": gemm_s / wall, "gemm_efficiency": gemm_flops / gemm_s / peak if gemm_s else 0.0,
            "gemm_gflop": gemm_flops / 1e9}


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure_gemm_peak(device, n: int = 2048, repeats: int = 7) -> float:
    """Achievable fp32 GEMM FLOP/s on this machine (median), the MFU denominator."""
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


def peak_memory(name: str, argv: list[str]) -> float | None:
    """Peak memory (MiB) of two training steps of one row, in a fresh process."""
    cmd = [sys.executable, "-m", "mimkit.bench", *argv, "--memory-row", name]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return None
    return float(proc.stdout.strip().splitlines()[-1])


def _memory_row(args) -> None:
    row = Row(args.memory_row, args)
    images = torch.randn(args.batch, args.chans, args.img, args.img, device=args.device)
    if args.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(2):
        row.step(images, i + 1)
    sync(args.device)
    if args.device.type == "cuda":
        print(torch.cuda.max_memory_allocated() / 2**20)
    else:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                print(int(line.split()[1]) / 1024)


def input_pipeline_rate(data_path: str, batch: int, img: int, repeats: int = 20) -> float:
    """Images/s of the in-memory CIFAR-10 pipeline (gather + batched crop/flip + normalise) on the CPU."""
    from mimkit.data import build_datamodule

    dm = build_datamodule("cifar10", data_path, img)
    it = dm.train_batches(0, batch, 0, "cpu")
    next(it)
    t = time.perf_counter()
    n = 0
    for _ in range(repeats):
        n += next(it).shape[0]
    return n / (time.perf_counter() - t)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="vit_tiny", choices=sorted(VIT_SIZES), help="encoder size (default vit_tiny)")
    p.add_argument("--patch", type=int, default=4, help="patch size in pixels (default 4)")
    p.add_argument("--img", type=int, default=32, help="image side in pixels (default 32)")
    p.add_argument("--chans", type=int, default=3, help="image channels (default 3)")
    p.add_argument("--batch", type=int, default=128, help="images per training step (default 128)")
    p.add_argument("--mask-ratio", type=float, default=0.75, help="fraction of patches masked (default 0.75)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per row before measuring (default 3)")
    p.add_argument("--repeats", type=int, default=10, help="timed steps per row; the median is reported (default 10)")
    p.add_argument("--methods", default="mae,rc-mae,sdae,hf", help="comma list of mae, rc-mae (includes rc-mae-free), rc-mae-free, sdae, hf")
    p.add_argument("--device", dest="bench_device", default="auto", choices=("cpu", "cuda", "auto"),
                   help="where to measure (default: auto = CUDA when available)")
    p.add_argument("--bench-device", dest="bench_device", choices=("cpu", "cuda", "auto"), help=argparse.SUPPRESS)
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"), help="autocast dtype (CUDA)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--data-path", default=None, help="CIFAR-10 source: also time the in-memory input pipeline")
    p.add_argument("--no-memory", action="store_true", help="skip the per-row peak-memory subprocesses")
    p.add_argument("--compile", action="store_true", help="add a row: MAE with torch.compile'd blocks (train.compile)")
    p.add_argument("--no-gemm-profile", dest="gemm_profile", action="store_false",
                   help="skip the per-row profile of matrix-multiply time and efficiency")
    p.add_argument("--out", default=None, metavar="PAGE.md",
                   help="add (or replace) this configuration's section in a Markdown page, e.g. docs/PERFORMANCE.md "
                        "(default: print only)")
    p.add_argument("--json", default=None, help="also write the raw numbers to this JSON file")
    p.add_argument("--no-write", action="store_true", help="do not write --out (kept for scripts)")
    p.add_argument("--memory-row", default=None, help=argparse.SUPPRESS)


def run(args, argv: list[str]) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.bench_device
    args.device = torch.device("cuda" if dev == "auto" and torch.cuda.is_available() else ("cpu" if dev == "auto" else dev))
    args.amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    if args.device.type != "cuda":
        args.amp = None
    torch.manual_seed(0)
    if args.memory_row:
        _memory_row(args)
        return 0
    names = select_rows(args.methods)
    if args.compile and "MAE" in names:
        names.insert(names.index("MAE") + 1, COMPILED_ROW)
    if HF_ROW in names:
        try:
            import transformers  # noqa: F401
        except ImportError:
            print("transformers not installed: skipping the HF ViTMAE rows (pip install '.[bench]')")
            names = [n for n in names if n not in HF_ROWS]
    images = torch.randn(args.batch, args.chans, args.img, args.img, device=args.device)
    rows = {name: Row(name, args) for name in names}
    flops = {name: r.flops(images) for name, r in rows.items()}
    times: dict[str, list[float]] = {n: [] for n in rows}
    ema: dict[str, list[float]] = {n: [] for n in rows}
    for name, r in rows.items():
        for i in range(args.warmup):
            r.step(images, i + 1)
    for k in range(args.repeats):
        for name, r in rows.items():
            sync(args.device)
            t = time.perf_counter()
            r.step(images, args.warmup + k + 1)
            sync(args.device)
            times[name].append(time.perf_counter() - t)
            e = r.ema_time(args.device)
            if e is not None:
                ema[name].append(e)
    peak = measure_gemm_peak(args.device)
    gemm = {name: gemm_profile(r, images, args.warmup + args.repeats + 1, args.device, peak)
            for name, r in rows.items()} if args.gemm_profile else {}
    child_argv = [a for a in argv if a not in ("--no-write",)] + ["--no-write", "--no-memory"]
    memory = {n: None for n in rows} if args.no_memory else {n: peak_memory(n, child_argv) for n in rows}
    pipeline = input_pipeline_rate(args.data_path, args.batch, args.img) if args.data_path else None

    base = statistics.median(times["MAE"]) if "MAE" in times else None
    results = []
    for name in rows:
        t = statistics.median(times[name])
        row = {"row": name, "step_s": t, "imgs_per_s": args.batch / t, "gflops_per_img": flops[name] / args.batch / 1e9,
               "achieved_gflops": flops[name] / t / 1e9, "mfu": flops[name] / t / peak,
               "ema_ms": statistics.median(ema[name]) * 1e3 if ema[name] else None, "peak_mib": memory[name],
               **gemm.get(name, {})}
        if base is not None:
            row["time_ratio"] = t / base
            row["flop_ratio"] = flops[name] / flops["MAE"]
            if memory.get("MAE") and memory[name]:
                row["memory_ratio"] = memory[name] / memory["MAE"]
        results.append(row)
    text = render(args, argv, results, peak, pipeline)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"argv": argv, "rows": results, "gemm_peak_flops": peak,
                                               "pipeline_imgs_per_s": pipeline}, indent=2))
    if args.out and not args.no_write:
        write_section(Path(args.out), text)
        print(f"wrote this section into {Path(args.out).resolve()}")
    elif not args.no_write:
        print("printed only: --out docs/PERFORMANCE.md adds this section to a page")
    if args.json:
        print(f"raw numbers: {Path(args.json).resolve()}")
    return 0


def render(args, argv, results, peak, pipeline) -> str:
    title = f"### {args.model}/{args.patch} @ {args.img} px, batch {args.batch}, {args.device.type} {args.precision}"
    if args.device.type == "cpu":
        machine = f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"
        mem = "peak RSS of a fresh process (MiB)"
    else:
        machine = f"{torch.cuda.get_device_name(args.device)}, torch {torch.__version__}"
        mem = "max allocated (MiB)"
    lines = [title, "",
             f"{time.strftime('%Y-%m-%d')}; {machine}; measured fp32 GEMM peak {peak / 1e9:.1f} GFLOP/s (2048^3 matmul). "
             f"Median of {args.repeats} steps after {args.warmup} warm-up steps, rows interleaved. Memory: {mem}. "
             "GEMM columns: one extra step under torch.profiler; the share of its time in mm/addmm/bmm and the FLOP "
             "rate those reach as a fraction of the peak (the MFU a step could reach if nothing else took time).", "",
             "| row | step (ms) | imgs/s | GFLOP/img (fwd+bwd) | GFLOP/s | MFU | GEMM % of step | GEMM efficiency | "
             "EMA (ms, % of step) | peak mem | time / MAE | FLOPs / MAE | time ratio / FLOP ratio | mem / MAE |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        ema = f"{r['ema_ms']:.2f} ({100 * r['ema_ms'] / 1e3 / r['step_s']:.2f}%)" if r["ema_ms"] is not None else "-"
        mem = f"{r['peak_mib']:.0f}" if r["peak_mib"] else "-"
        tr, fr, mr = r.get("time_ratio"), r.get("flop_ratio"), r.get("memory_ratio")
        lines.append(
            f"| {r['row']} | {1e3 * r['step_s']:.1f} | {r['imgs_per_s']:.1f} | {r['gflops_per_img']:.3f} | "
            f"{r['achieved_gflops']:.1f} | {r['mfu']:.2f} | "
            + (f"{100 * r['gemm_share']:.0f} | {r['gemm_efficiency']:.2f} | " if "gemm_share" in r else "- | - | ")
            + f"{ema} | {mem} | "
            + (f"{tr:.3f} | {fr:.3f} | {tr / fr:.3f} | " if tr else "- | - | - | ")
            + (f"{mr:.3f} |" if mr else "- |"))
    if pipeline:
        best = max(r["imgs_per_s"] for r in results)
        lines += ["", f"CIFAR-10 in-memory input pipeline: {pipeline:.0f} imgs/s on the CPU "
                      f"({pipeline / best:.1f} x the fastest row above)."]
    lines += ["", f"Command: `mimkit bench {' '.join(argv)}`".replace("  ", " "), ""]
    return "\n".join(lines)


def write_section(out: Path, text: str) -> None:
    """Replace this configuration's section of the performance page (or append it)."""
    title = text.splitlines()[0]
    existing = out.read_text() if out.exists() else "# Performance\n\nSections written by `mimkit bench`.\n"
    start = existing.find(title + "\n")
    if start >= 0:
        end = existing.find("\n### ", start + 1)
        existing = existing[:start] + (existing[end + 1:] if end >= 0 else "")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(existing.rstrip() + "\n\n" + text)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return run(build_parser().parse_args(argv), argv)


def register(groups, common) -> None:
    p = groups["top"].add_parser("bench", help="throughput / FLOPs / MFU / memory of every method side by side",
                                 description="Time the training step of every method (and Hugging Face's ViTMAE) on "
                                             "random images; prints a Markdown table, --out PAGE.md also writes it.")
    add_arguments(p)
    p.set_defaults(func=lambda args: run(args, [a for a in sys.argv[2:]]))


if __name__ == "__main__":
    raise SystemExit(main())

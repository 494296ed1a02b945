"""Loading a trained checkpoint for evaluation, pictures and export (shared by the CLI commands)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mimkit.config import Config, config_from_dict, parse_override, set_value
from mimkit.errors import MimkitError
from mimkit.methods import Method, build_method
from mimkit.train.checkpoint import load_checkpoint
from mimkit.runtime import datamodule_from_config, resolve_device


@dataclass
class Loaded:
    cfg: Config
    method: Method
    encoder: nn.Module
    which: str
    data: object
    device: torch.device


def load_method(checkpoint: str | Path, overrides=(), device: str | None = None, *, need_data: bool = True):
    """Rebuild the method of a checkpoint with its weights; overrides apply to the saved config."""
    ckpt = load_checkpoint(checkpoint)
    cfg = config_from_dict(ckpt["config"])
    for item in overrides:
        set_value(cfg, *parse_override(item))
    if device:
        cfg.train.device = device
    dev = resolve_device(cfg.train.device)
    data = datamodule_from_config(cfg) if need_data else None
    in_chans = data.in_chans if data is not None else ckpt["student"]["encoder.patch_embed.proj.weight"].shape[1]
    method = build_method(cfg, in_chans)
    method.student.load_state_dict(ckpt["student"])
    method.load_teacher_state_dict(ckpt["teacher"])
    method.to(dev).eval()
    return cfg, method, data, dev


def load_for_eval(checkpoint, overrides=(), device: str | None = None, which: str | None = None) -> Loaded:
    cfg, method, data, dev = load_method(checkpoint, overrides, device)
    which = which or cfg.eval.which or method.default_which
    return Loaded(cfg, method, method.encoder(which), which, data, dev)


def result_path(checkpoint: str | Path, output: str | None, filename: str) -> Path:
    """Where an evaluation writes its JSON: ``--output`` if given, else the checkpoint's run folder."""
    if output:
        out = Path(output)
        out.mkdir(parents=True, exist_ok=True)
        return out / filename
    ckpt = Path(checkpoint).resolve()
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    if not run_dir.is_dir():
        raise MimkitError(f"cannot find a folder for {filename} next to {checkpoint}; pass --output DIR")
    return run_dir / filename

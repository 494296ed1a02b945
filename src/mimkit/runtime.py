"""Small helpers shared by the trainer and the evaluation/export commands: device and data from a config."""

from __future__ import annotations

import torch

from mimkit.errors import MimkitError


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; an unavailable CUDA request is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise MimkitError("device 'cuda' requested but no CUDA device is available; accepted here: cpu, auto")
    return torch.device(name)


def datamodule_from_config(cfg, log=None):
    """The :class:`mimkit.data.DataModule` described by ``cfg.data`` at ``cfg.model.img_size``."""
    from mimkit.data import build_datamodule

    d = cfg.data
    in_memory = {"auto": "auto", "true": True, "false": False}[d.in_memory]
    return build_datamodule(
        d.name, d.path, cfg.model.img_size, cache_dir=d.cache_dir, strict=d.strict, in_memory=in_memory,
        num_workers=d.num_workers, mean=d.mean, std=d.std, channels=d.channels, log=log,
        max_train=d.max_train, max_test=d.max_test, subset_seed=cfg.train.seed,
        crop_scale=(d.crop_min_scale, 1.0), hflip_p=0.5 if d.hflip else 0.0,
        image_key=d.image_key, label_key=d.label_key, in_memory_budget_gb=d.in_memory_budget_gb,
        decode_size=cfg.model.img_size if d.in_memory_resize else None,
    )

"""Small helpers shared by the trainer and the evaluation/export commands: threads, device and data from a config.

This module does not import torch at import time, so :func:`configure_threads` can run before torch starts its
OpenMP thread pool (the wait policy is read once, when the OpenMP runtime loads).
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from typing import TYPE_CHECKING

from mimkit.errors import MimkitError

if TYPE_CHECKING:  # pragma: no cover
    import torch

#: what the ``mimkit`` command sets before torch loads, unless the variable is already set (issue 14 item 8):
#: OpenMP threads that run out of work sleep at once instead of spinning, so two jobs sharing cores do not burn
#: each other's time (GNU OpenMP: OMP_WAIT_POLICY; Intel OpenMP: KMP_BLOCKTIME)
THREAD_ENV_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}


def configure_threads(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Apply :data:`THREAD_ENV_DEFAULTS` to ``environ`` (default ``os.environ``) where unset; returns what was set.

    Must run before ``import torch`` to take effect. Override by setting the variables yourself (e.g.
    ``OMP_WAIT_POLICY=ACTIVE`` for a machine the job has to itself); ``MIMKIT_THREAD_DEFAULTS=0`` sets nothing.
    The number of intra-op threads stays torch's default (the physical cores) unless ``OMP_NUM_THREADS`` is set.
    """
    environ = os.environ if environ is None else environ
    if environ.get("MIMKIT_THREAD_DEFAULTS", "1") == "0":
        return {}
    applied = {k: v for k, v in THREAD_ENV_DEFAULTS.items() if k not in environ}
    environ.update(applied)
    return applied


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; an unavailable CUDA request is a user error."""
    import torch

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

"""torch.distributed helpers: torchrun environment, rank-0-only work, metric reduction.

The same code path runs single-process (no process group, every helper a no-op) and under
``torchrun --nproc_per_node=N -m mimkit ...`` (gloo on CPU, NCCL on CUDA).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from mimkit.errors import MimkitError

T = TypeVar("T")


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> tuple[DistEnv, torch.device]:
    """Join the torchrun process group when ``WORLD_SIZE`` > 1; returns the env and this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv(), device
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=60),
                                device_id=device if device.type == "cuda" else None)
    return DistEnv(rank, world, local), device


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()


def on_main(env: DistEnv, fn: Callable[[], T]) -> T | None:
    """Run ``fn`` on rank 0 only; a MimkitError there is raised on every rank (same message)."""
    result, message = None, None
    if env.is_main:
        try:
            result = fn()
        except MimkitError as e:
            message = str(e)
    if env.enabled:
        box = [message]
        dist.broadcast_object_list(box, src=0)
        message = box[0]
    if message is not None:
        raise MimkitError(message)
    return result


def mean_over_ranks(values: dict[str, float], env: DistEnv, device: torch.device) -> dict[str, float]:
    """Average logged scalars over the ranks (each rank saw a different part of the global batch)."""
    if not env.enabled or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, (t / env.world_size).tolist()))


def gather_tensors(x: torch.Tensor, env: DistEnv) -> list[torch.Tensor]:
    """All ranks' CPU tensors (of any first-dimension size), in rank order."""
    if not env.enabled:
        return [x]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, x.cpu())
    return out


def spread_over_ranks(x: float, env: DistEnv) -> float:
    """max - min of a scalar over ranks (0 when every rank holds the same value)."""
    if not env.enabled:
        return 0.0
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, float(x))
    return max(out) - min(out)

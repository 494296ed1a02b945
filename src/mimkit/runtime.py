"""Small helpers shared by the trainer and the evaluation/export commands: threads shared between jobs, the device
and the data from a config. It does not import torch at import time.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from typing import TYPE_CHECKING

from mimkit.errors import MimkitError

if TYPE_CHECKING:  # pragma: no cover
    import torch

class CoreShare:
    """Intra-op threads shared among the mimkit jobs that run on this machine at the same time (issue 14 item 8).

    Each job registers a file named by its pid in a directory every job on the machine sees
    (``$MIMKIT_JOBS_DIR``, default ``<tmp>/mimkit-jobs-<uid>``); :meth:`adjust`, called by the training engine
    between steps (at most every ``every_s`` seconds), counts the live jobs and sets torch's intra-op threads to
    ``max(1, base // jobs)``, where ``base`` is the count the job started with: a job alone keeps all its threads,
    two jobs on a 2-core machine get one thread each, and the threads come back when the other job ends. Measured
    (docs/PERFORMANCE.md, "Two jobs on one machine"): with two threads each, two jobs slow each other to 0.2-0.35x of
    a solo job, spinning OpenMP threads fighting for the cores; with one thread each they keep 0.64x of the best solo
    rate, while a solo job keeps its two threads. Sleeping idle threads (``OMP_WAIT_POLICY=PASSIVE``) helped pairs
    but made a solo 2-thread job 2.3x slower, so the wait policy is left to the OpenMP runtime.

    Off when the thread count was chosen by the user (``OMP_NUM_THREADS`` set, as torchrun sets it) or with
    ``MIMKIT_SHARE_CORES=0``; :meth:`create` returns None then.
    """

    def __init__(self, directory: str | os.PathLike | None = None, base: int | None = None, every_s: float = 5.0):
        import tempfile
        from pathlib import Path

        import torch

        self.base = int(base or torch.get_num_threads())
        self.current = torch.get_num_threads()
        self.every_s = every_s
        default = Path(tempfile.gettempdir()) / f"mimkit-jobs-{os.getuid()}"
        self.dir = Path(directory or os.environ.get("MIMKIT_JOBS_DIR") or default)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.file = self.dir / str(os.getpid())
        self.file.write_text(str(self.base))
        self._last = float("-inf")

    @classmethod
    def create(cls, device, environ: MutableMapping[str, str] | None = None, **kwargs) -> CoreShare | None:
        """A share for a CPU job whose threads are mimkit's to choose, else None."""
        environ = os.environ if environ is None else environ
        if getattr(device, "type", device) != "cpu" or "OMP_NUM_THREADS" in environ \
                or environ.get("MIMKIT_SHARE_CORES", "1") == "0":
            return None
        try:
            return cls(**kwargs)
        except OSError:  # an unwritable temp dir: no sharing, no failure
            return None

    def jobs(self) -> int:
        """Live mimkit jobs registered here (this one included); files of dead processes are removed."""
        n = 0
        for entry in self.dir.iterdir():
            try:
                pid = int(entry.name)
                os.kill(pid, 0)
            except ValueError:
                continue
            except ProcessLookupError:
                entry.unlink(missing_ok=True)
                continue
            except PermissionError:  # alive, another user's
                pass
            n += 1
        return max(n, 1)

    def adjust(self) -> int | None:
        """Re-count the jobs (at most every ``every_s`` seconds); returns the new thread count when it changed."""
        import time

        import torch

        now = time.monotonic()
        if now - self._last < self.every_s:
            return None
        self._last = now
        want = max(1, self.base // self.jobs())
        if want == self.current:
            return None
        torch.set_num_threads(want)
        self.current = want
        return want

    def close(self) -> None:
        self.file.unlink(missing_ok=True)


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

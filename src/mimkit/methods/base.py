"""The contract between a pre-training method and the (method-agnostic) training loop.

A method turns a batch of images into a loss and metrics, and says what must happen after a real
optimiser step or an epoch (e.g. the EMA teacher update). The loop knows nothing else about it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from mimkit.masking import PatchMask, mask_from_noise
from mimkit.progress import Progress

Which = Literal["student", "teacher"]


class StepRandom:
    """Random numbers for one training step that do not depend on how the batch is split.

    Each draw is made for the *global* batch (``batch * world_size`` rows) from one seeded CPU
    generator, and this process keeps its own rows, so masks are the same whether a global batch of
    64 runs in one process or as 2 x 32 under DDP (and every rank stays in step).
    """

    def __init__(self, seed: int, rank: int = 0, world_size: int = 1):
        self.generator = torch.Generator().manual_seed(seed)
        self.rank, self.world_size = rank, world_size

    def rand(self, batch: int, n: int, device: torch.device | str) -> Tensor:
        """U(0, 1) noise of shape (batch, n) on ``device``: this rank's rows of a global draw."""
        full = torch.rand(batch * self.world_size, n, generator=self.generator)
        return full[self.rank * batch:(self.rank + 1) * batch].to(device, non_blocking=True)


@dataclass
class StepOutput:
    """A scalar loss to back-propagate and metrics to log (tensors are detached by the loop)."""

    loss: Tensor
    metrics: dict[str, Tensor | float] = field(default_factory=dict)


class Method(nn.Module):
    """Base class of the pre-training methods (MAE, RC-MAE, SdAE)."""

    name: str = "method"
    #: which encoder evaluation/export uses when the user does not say (paper defaults)
    default_which: Which = "student"

    #: set by the training loop before each micro-step (None: the global torch RNG is used)
    step_random: StepRandom | None = None
    mask_ratio: float
    num_patches: int

    def forward(self, images: Tensor) -> StepOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def noise(self, batch: int, n: int, device: torch.device | str) -> Tensor:
        """U(0, 1) noise (batch, n) from :attr:`step_random` when set, else the global RNG."""
        if self.step_random is not None:
            return self.step_random.rand(batch, n, device)
        return torch.rand(batch, n, device=device)

    def sample_mask(self, images: Tensor) -> PatchMask:
        """A fresh random MAE mask per image (noise -> argsort, ``mask_ratio`` of the patches removed)."""
        return mask_from_noise(self.noise(images.shape[0], self.num_patches, images.device), self.mask_ratio)

    def student_parameters(self):
        """Parameters the optimiser trains (never the teacher)."""
        return (p for p in self.student.parameters() if p.requires_grad)

    #: True when :meth:`before_optimizer_step` changes the gradients (the loop then unscales them first)
    edits_gradients: bool = False

    def before_optimizer_step(self, progress: Progress) -> None:
        """Called once per real optimiser step when :attr:`edits_gradients` is True: the student's ``.grad`` are
        final (accumulated, all-reduced across processes, unscaled), before clipping and the optimiser step;
        ``progress.step`` is the number the step being taken will have."""

    def after_optimizer_step(self, progress: Progress) -> dict[str, float]:
        """Called once after each real optimiser step (not on accumulation micro-steps)."""
        return {}

    def after_epoch(self, progress: Progress) -> dict[str, float]:
        """Called once at the end of each epoch."""
        return {}

    def encoder(self, which: Which = "student") -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def reset_teacher(self) -> None:
        """Make the teacher an exact copy of the student again (no-op without a teacher)."""

    def load_initial_weights(self, state: dict[str, Tensor]) -> dict[str, list[str]]:
        """Initialise the student from another checkpoint's student state (e.g. ``mimkit import``).

        Tensors whose name and shape match are loaded; the rest keep their fresh initialisation and are
        reported by name. The teacher is then reset to the student.
        """
        own = self.student.state_dict()
        usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        self.student.load_state_dict(usable, strict=False)
        self.reset_teacher()
        return {"loaded": sorted(usable), "missing": sorted(set(own) - set(state)),
                "unexpected": sorted(set(state) - set(own)),
                "shape_mismatch": sorted(k for k in state if k in own and own[k].shape != state[k].shape)}

    def teacher_state_dict(self) -> dict[str, Tensor] | None:
        """State of the teacher for checkpoints (None when the method has no teacher)."""
        return None

    def load_teacher_state_dict(self, state: dict[str, Tensor] | None) -> None:
        if state is not None:
            raise ValueError(f"method {self.name} has no teacher to load")

    def method_state_dict(self) -> dict:
        """Everything besides the student/teacher weights that a resumed run needs to continue exactly
        (tensors and plain Python values only: e.g. the momentum last used, monitor counters, optimiser-side
        buffers). Saved in checkpoints under ``method_state``; empty by default."""
        return {}

    def load_method_state_dict(self, state: dict) -> None:
        """Restore :meth:`method_state_dict` (``{}`` for checkpoints written before it existed)."""

    def on_train_end(self, run_dir) -> dict[str, float]:
        """Called once after the last epoch (e.g. to draw a histogram from metrics.jsonl)."""
        return {}

    @torch.no_grad()
    def reconstruct(self, images: Tensor, noise: Tensor) -> dict[str, Tensor] | None:
        """Pixel predictions for pictures (None when the method does not predict pixels)."""
        return None

"""Where training stands: the positions every schedule (learning rate, EMA momentum, monitors) is a function of.

It sits below the teacher and the methods, which read it, and the training engine, which makes it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Progress:
    """Where training stands, as global positions so every schedule survives resume.

    ``step`` counts optimiser steps already taken (>= 1 inside ``after_optimizer_step``). ``epoch`` is
    the 0-based index of the running epoch during the epoch, and the number of finished epochs when
    passed to :meth:`Method.after_epoch`.
    """

    step: int
    epoch: int
    steps_per_epoch: int
    total_steps: int
    epochs: int

    @property
    def epoch_progress(self) -> float:
        """Fractional epoch position, e.g. 3.25 a quarter into the 4th epoch."""
        return self.step / max(self.steps_per_epoch, 1)

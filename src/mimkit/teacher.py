"""The exponential-moving-average ("mean") teacher shared by the teacher-student methods.

rc-mae.txt Eq. (2): after every optimiser step the teacher's weights become
``T <- m * T + (1 - m) * S``, with the student's weights ``S`` and a momentum ``m`` close to 1.

Two pieces:

* :class:`MomentumSchedule` gives ``m`` as a function of the *global* training position
  (optimiser steps or finished epochs), so a resumed run continues with exactly the momenta an
  uninterrupted run would have used.
* :class:`EMATeacher` holds a frozen, always-eval copy of the student module and applies the
  update with fused ``torch._foreach_*`` kernels over all parameters at once.

Departure from the RC-MAE reference code (see ``REFERENCE_NOTES.md``): the reference indexes its
cosine schedule (0.996 -> 1) by the iteration *within the epoch*, so the momentum effectively stays
at 0.996 for the whole run, and it also updates the teacher on gradient-accumulation micro-steps.
Here a cosine schedule is indexed by the global optimiser step (or finished epoch) and the teacher
is updated only after real optimiser steps; ``MomentumSchedule(0.996)`` (constant, the default)
reproduces the published runs.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mimkit.errors import MimkitError
from mimkit.progress import Progress

MOMENTUM_KINDS = ("constant", "cosine")
MOMENTUM_UNITS = ("step", "epoch")


def _check_momentum(name: str, value) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= float(value) <= 1.0
    if not ok:
        raise MimkitError(f"teacher momentum {name} must be a number in [0, 1], got {value!r}")


@dataclass(frozen=True)
class MomentumSchedule:
    """EMA momentum over training.

    Attributes:
        base: momentum of the first update (and of every update when ``kind="constant"``).
        final: momentum of the last update (``kind="cosine"`` only; ignored when constant).
        kind: ``"constant"`` or ``"cosine"`` (half-cosine from ``base`` up to ``final``).
        unit: ``"step"`` (update after optimiser steps) or ``"epoch"`` (after every epoch).
        every: with ``unit="step"``, update after every ``every``-th optimiser step (``method.ema_every_steps``;
            1 = every step). ``every = steps per epoch`` is the per-epoch schedule counted in steps, which lets a
            short run give the teacher the paper's number of updates (sdae: 100-300) at any epoch count.

    The cosine runs over the schedule's updates ``0 .. U - 1`` as ``cos(pi * i / U)`` (``U`` = number of
    updates), as the official SdAE scheduler does (its length is the epoch count), so the last update sits just
    below ``final``.
    """

    base: float = 0.996
    final: float | None = None
    kind: str = "constant"
    unit: str = "step"
    every: int = 1

    def __post_init__(self) -> None:
        _check_momentum("base", self.base)
        if self.final is not None:
            _check_momentum("final", self.final)
        if self.kind not in MOMENTUM_KINDS:
            raise MimkitError(f"unknown momentum schedule kind {self.kind!r}; accepted: {', '.join(MOMENTUM_KINDS)}")
        if self.unit not in MOMENTUM_UNITS:
            raise MimkitError(f"unknown momentum schedule unit {self.unit!r}; accepted: {', '.join(MOMENTUM_UNITS)}")
        if self.kind == "cosine" and self.final is None:
            raise MimkitError("momentum schedule kind 'cosine' needs a final momentum, got final=None")
        if not (isinstance(self.every, int) and not isinstance(self.every, bool) and self.every >= 1):
            raise MimkitError(f"method.ema_every_steps must be an integer >= 1, got {self.every!r}")
        if self.every > 1 and self.unit != "step":
            raise MimkitError(f"method.ema_every_steps={self.every} counts optimiser steps; it cannot be combined "
                              "with method.ema_unit=epoch (use ema_unit=step, or leave ema_every_steps unset)")

    def value(self, index: int, total: int) -> float:
        """Momentum of the ``index``-th update (from 0) out of updates ``0 .. total``.

        cosine: ``final - (final - base) * (cos(pi * index / total) + 1) / 2``, so index 0 gives
        ``base`` and index ``total`` gives ``final``; index is clamped to ``[0, total]``.
        """
        if self.kind == "constant":
            return float(self.base)
        total = max(int(total), 1)
        index = min(max(int(index), 0), total)
        base, final = float(self.base), float(self.final)
        return final - (final - base) * (math.cos(math.pi * index / total) + 1.0) / 2.0

    def num_updates(self, total_steps: int, epochs: int) -> int:
        """How many EMA updates a run of ``total_steps`` optimiser steps in ``epochs`` epochs makes."""
        return epochs if self.unit == "epoch" else total_steps // self.every

    def due(self, progress: Progress) -> bool:
        """Whether an update happens after the optimiser step ``progress.step`` (unit ``step``)."""
        return self.unit == "step" and progress.step % self.every == 0

    def position(self, progress: Progress) -> tuple[int, int]:
        """(index, total) of the update that happens now, from the global training position.

        unit ``step`` (called after an optimiser step that is :meth:`due`): ``progress.step`` optimiser steps
        are done, so this is update ``step // every - 1`` of ``U = total_steps // every``.
        unit ``epoch`` (called after an epoch, when ``progress.epoch`` = epochs finished): update ``epoch - 1``
        of ``U = epochs``.
        """
        if self.unit == "step":
            return progress.step // self.every - 1, max(progress.total_steps // self.every, 1)
        return progress.epoch - 1, max(progress.epochs, 1)

    def momentum_for(self, progress: Progress) -> float:
        """Momentum for the update made now (see :meth:`position`); a pure function of the
        global position, so resume continues the schedule exactly."""
        return self.value(*self.position(progress))

    def momenta(self, total_steps: int, epochs: int) -> list[float]:
        """The momentum of every update of a whole run, in order."""
        total = max(self.num_updates(total_steps, epochs), 1)
        return [self.value(i, total) for i in range(self.num_updates(total_steps, epochs))]


@dataclass(frozen=True)
class TeacherRegime:
    """Whether an EMA teacher had time to become an average of the student (rc-mae Sec. 3, sdae Fig. 4).

    Attributes:
        updates: EMA updates over the run.
        horizon_steps: ``every / (1 - m_last)`` optimiser steps, the averaging window at the end of the run.
        horizon_fraction: ``horizon_steps / total_steps`` (the paper runs: RC-MAE 0.05-0.1 %, SdAE 33-100 %).
        init_share: share of the teacher's initial weights left in the final teacher, the product of the momenta.
    """

    updates: int
    horizon_steps: float
    horizon_fraction: float
    init_share: float

    def line(self) -> str:
        return (f"teacher regime: {self.updates} EMA updates, horizon {self.horizon_steps:,.0f} steps = "
                f"{100 * self.horizon_fraction:.2f} % of the run, initial weights left {100 * self.init_share:.3g} %")


def teacher_regime(schedule: MomentumSchedule, total_steps: int, steps_per_epoch: int, epochs: int) -> TeacherRegime:
    """The :class:`TeacherRegime` of ``schedule`` over a run (pure arithmetic, nothing is trained)."""
    momenta = schedule.momenta(total_steps, epochs)
    every = steps_per_epoch if schedule.unit == "epoch" else schedule.every
    last = momenta[-1] if momenta else float(schedule.base)
    horizon = every / max(1.0 - last, 1e-12)
    share = math.exp(sum(math.log(m) if m > 0 else -math.inf for m in momenta)) if momenta else 1.0
    return TeacherRegime(len(momenta), horizon, horizon / max(total_steps, 1), share)


def momentum_schedule_from(method_cfg) -> MomentumSchedule:
    """The schedule of ``cfg.method`` (momentum, momentum_final, momentum_schedule, ema_unit, ema_every_steps),
    whose unset fields ``config.validate`` has filled with the method's published defaults."""
    m = method_cfg
    every = getattr(m, "ema_every_steps", None)
    return MomentumSchedule(m.momentum, m.momentum_final, m.momentum_schedule, m.ema_unit,
                            1 if every is None else every)


class EMATeacher(nn.Module):
    """A frozen copy of ``student_module`` updated by EMA (rc-mae Eq. 2).

    * initialised as a deep copy of the student (same weights at step 0);
    * every parameter has ``requires_grad=False``; it must never be given to the optimiser
      (``Method.student_parameters`` only yields the student's);
    * always in eval mode: :meth:`train` is overridden, so ``method.train()`` cannot switch the
      teacher's dropout / drop path on;
    * :meth:`forward` runs under ``torch.no_grad()`` (no graph, no saved activations).

    The (teacher, student) parameter lists are built once and cached. They stay valid after
    ``load_state_dict`` (which copies in place); the cache is dropped anyway after any
    ``load_state_dict`` through the teacher, after ``.to()/.cuda()/.half()`` and when a different
    student object is passed. Call :meth:`refresh` after replacing the *student's* parameter objects
    (e.g. ``student.load_state_dict(..., assign=True)``).
    """

    def __init__(self, student_module: nn.Module):
        super().__init__()
        self.module = copy.deepcopy(student_module)
        self.module.requires_grad_(False)
        self._cache: tuple | None = None
        # any load_state_dict that reaches the copy (directly or through a parent) drops the cache
        self.module.register_load_state_dict_post_hook(self._on_load)
        super().train(False)

    # -- mode -------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> EMATeacher:
        """Always eval: the teacher's forward is deterministic whatever the method's mode."""
        return super().train(False)

    # -- cache ------------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Forget the cached parameter lists (rebuilt on the next :meth:`update`)."""
        self._cache = None

    def _on_load(self, module: nn.Module, incompatible_keys) -> None:
        self.refresh()

    def _apply(self, fn, recurse: bool = True):
        self.refresh()
        return super()._apply(fn, recurse)

    def __getstate__(self):
        # copies / pickles never carry the cache (it references the student module)
        state = dict(self.__dict__)
        state["_cache"] = None
        return state

    def _build_cache(self, student_module: nn.Module) -> tuple:
        t_params = dict(self.module.named_parameters())
        s_params = dict(student_module.named_parameters())
        t_bufs = dict(self.module.named_buffers())
        s_bufs = dict(student_module.named_buffers())
        if t_params.keys() != s_params.keys() or t_bufs.keys() != s_bufs.keys():
            diff = sorted((t_params.keys() ^ s_params.keys()) | (t_bufs.keys() ^ s_bufs.keys()))
            raise MimkitError(f"EMA teacher and student have different structures; differing names: {diff[:5]}")
        lerp_t, lerp_s, copy_t, copy_s = [], [], [], []
        for name, t in t_params.items():
            s = s_params[name]
            if t.shape != s.shape:
                raise MimkitError(f"EMA teacher parameter {name} has shape {tuple(t.shape)}, student {tuple(s.shape)}")
            if t.is_floating_point():
                lerp_t.append(t)
                lerp_s.append(s)
            else:
                copy_t.append(t)
                copy_s.append(s)
        for name, t in t_bufs.items():
            copy_t.append(t)
            copy_s.append(s_bufs[name])
        return (student_module, lerp_t, lerp_s, copy_t, copy_s)

    # -- update / forward -------------------------------------------------------------------------
    @torch.no_grad()
    def update(self, student_module: nn.Module, momentum: float) -> None:
        """``T <- m * T + (1 - m) * S`` for every floating parameter (Eq. 2); buffers (and any
        non-floating parameter) are copied from the student.

        One fused ``_foreach_lerp_`` over all parameters: ``T + (1 - m) * (S - T)``.
        """
        _check_momentum("value", momentum)
        if self._cache is None or self._cache[0] is not student_module:
            self._cache = self._build_cache(student_module)
        _, lerp_t, lerp_s, copy_t, copy_s = self._cache
        weight = 1.0 - float(momentum)
        if lerp_t and weight != 0.0:
            torch._foreach_lerp_(lerp_t, lerp_s, weight)
        if copy_t:
            torch._foreach_copy_(copy_t, copy_s)

    @torch.no_grad()
    def forward(self, *args, **kwargs):
        """The teacher's forward, without autograd."""
        return self.module(*args, **kwargs)


class TeacherHooks:
    """What RC-MAE and SdAE share about their EMA teacher: the update hooks, reset and checkpoint state.

    A method mixing this in has ``self.teacher`` (an :class:`EMATeacher`), ``self.momentum`` (a
    :class:`MomentumSchedule`) and says which student module the teacher mirrors in :meth:`ema_source`.
    """

    teacher: EMATeacher
    momentum: MomentumSchedule
    _last_momentum: float

    def ema_source(self) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def teacher_regime(self, total_steps: int, steps_per_epoch: int, epochs: int) -> TeacherRegime:
        """EMA updates, horizon and initial-weight share of this method's teacher over a run."""
        return teacher_regime(self.momentum, total_steps, steps_per_epoch, epochs)

    def update_teacher(self, momentum: float) -> None:
        """One EMA step T <- m T + (1 - m) S (rc-mae Eq. 2, sdae Eq. 7)."""
        self.teacher.update(self.ema_source(), momentum)
        self._last_momentum = float(momentum)

    def reset_teacher(self) -> None:
        """Teacher := student (T <- 0 T + 1 S), e.g. after the student was initialised from a checkpoint."""
        self.teacher.update(self.ema_source(), 0.0)

    def after_optimizer_step(self, progress: Progress) -> dict[str, float]:
        return self._scheduled_update("step", progress)

    def after_epoch(self, progress: Progress) -> dict[str, float]:
        return self._scheduled_update("epoch", progress)  # progress.epoch = finished epochs

    def _scheduled_update(self, unit: str, progress: Progress) -> dict[str, float]:
        if self.momentum.unit != unit or (unit == "step" and not self.momentum.due(progress)):
            return {}
        m = self.momentum.momentum_for(progress)
        self.update_teacher(m)
        return {"momentum": m}

    def method_state_dict(self) -> dict:
        """The momentum of the last EMA update (logged with every step until the next one): a resumed run logs
        what the uninterrupted run logs (issue 14 item 7)."""
        return {"last_momentum": float(self._last_momentum)}

    def load_method_state_dict(self, state: dict) -> None:
        if "last_momentum" in state:  # absent in checkpoints written before method_state existed
            self._last_momentum = float(state["last_momentum"])

    def teacher_state_dict(self) -> dict[str, Tensor]:
        """The teacher's state, with the same keys as :meth:`ema_source`'s."""
        return self.teacher.module.state_dict()

    def load_teacher_state_dict(self, state: dict[str, Tensor] | None) -> None:
        if state is None:
            raise MimkitError(f"checkpoint has no teacher state, which method {self.name} needs to resume")
        expected = set(self.teacher.module.state_dict())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise MimkitError(
                f"teacher state does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        try:
            self.teacher.module.load_state_dict(state)
        except RuntimeError as err:
            first = str(err).strip().splitlines()
            detail = next((line.strip() for line in first[1:] if line.strip()), first[0] if first else "")
            raise MimkitError(f"teacher state does not match the model: {detail}") from None

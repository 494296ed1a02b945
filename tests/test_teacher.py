"""EMA teacher and momentum schedule (rc-mae Eq. 2)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from mimkit.errors import MimkitError
from mimkit.methods.base import Progress
from mimkit.teacher import EMATeacher, MomentumSchedule


class Tiny(nn.Module):
    """Linear + LayerNorm + dropout, a float buffer and an integer buffer."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.norm = nn.LayerNorm(3)
        self.drop = nn.Dropout(0.5)
        self.register_buffer("stat", torch.zeros(3))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        return self.drop(self.norm(self.lin(x))) + self.stat


def _params(module):
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def _randomize(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))


def _progress(step=0, epoch=0, steps_per_epoch=10, total_steps=100, epochs=10):
    return Progress(step=step, epoch=epoch, steps_per_epoch=steps_per_epoch, total_steps=total_steps, epochs=epochs)


# -- EMA update ---------------------------------------------------------------------------------------
def test_initialised_as_copy_of_student():
    torch.manual_seed(0)
    student = Tiny()
    teacher = EMATeacher(student)
    for (name, s), t in zip(student.named_parameters(), teacher.module.parameters()):
        assert torch.equal(s, t), name
        assert s.data_ptr() != t.data_ptr()


def test_constant_momentum_matches_closed_form():
    torch.manual_seed(0)
    student = Tiny().double()
    teacher = EMATeacher(student)
    t0 = _params(teacher.module)
    _randomize(student, 1)  # a fixed student S != T_0
    s = _params(student)
    m, k = 0.9, 7
    for _ in range(k):
        teacher.update(student, m)
    for name, t in teacher.module.named_parameters():
        expected = m**k * t0[name] + (1 - m**k) * s[name]  # T_k = m^k T_0 + (1 - m^k) S
        torch.testing.assert_close(t, expected, rtol=0, atol=1e-12)


def test_changing_student_and_cosine_momentum_match_hand_loop():
    torch.manual_seed(0)
    student = Tiny().double()
    teacher = EMATeacher(student)
    ref = _params(teacher.module)
    schedule = MomentumSchedule(0.5, final=0.99, kind="cosine")
    total = 6
    for step in range(1, total + 1):
        _randomize(student, 100 + step)  # the student moves every step
        m = schedule.momentum_for(_progress(step=step, total_steps=total))
        teacher.update(student, m)
        for name, p in student.named_parameters():
            ref[name] = m * ref[name] + (1 - m) * p.detach()
    for name, t in teacher.module.named_parameters():
        torch.testing.assert_close(t, ref[name], rtol=0, atol=1e-12)


def test_float32_update_close_to_float64_reference():
    torch.manual_seed(0)
    student = Tiny()
    teacher = EMATeacher(student)
    ref = {k: v.double() for k, v in _params(teacher.module).items()}
    for step in range(5):
        _randomize(student, step)
        teacher.update(student, 0.996)
        for name, p in student.named_parameters():
            ref[name] = 0.996 * ref[name] + 0.004 * p.detach().double()
    for name, t in teacher.module.named_parameters():
        torch.testing.assert_close(t.double(), ref[name], rtol=0, atol=1e-6)


def test_momentum_one_keeps_teacher_and_zero_copies_student():
    torch.manual_seed(0)
    student = Tiny()
    teacher = EMATeacher(student)
    t0 = _params(teacher.module)
    _randomize(student, 3)
    teacher.update(student, 1.0)
    for name, t in teacher.module.named_parameters():
        assert torch.equal(t, t0[name])
    teacher.update(student, 0.0)
    for (name, s), t in zip(student.named_parameters(), teacher.module.parameters()):
        assert torch.equal(t, s), name


def test_buffers_copied_from_student():
    student = Tiny()
    teacher = EMATeacher(student)
    student.stat.fill_(2.5)
    student.count.fill_(7)
    teacher.update(student, 0.9)
    assert torch.equal(teacher.module.stat, student.stat)
    assert teacher.module.count.item() == 7


def test_teacher_frozen_and_always_eval():
    student = Tiny()
    teacher = EMATeacher(student)
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in student.parameters())  # the student is untouched
    teacher.train()
    assert not teacher.training and not teacher.module.training
    assert not any(m.training for m in teacher.modules())
    parent = nn.ModuleDict({"student": student, "teacher": teacher})
    parent.train()
    assert student.training and not teacher.module.drop.training
    x = torch.randn(8, 4)
    out = teacher(x)
    assert not out.requires_grad and out.grad_fn is None
    torch.testing.assert_close(out, teacher(x))  # dropout off: deterministic


def test_forward_builds_no_graph_even_with_grad_enabled():
    student = Tiny()
    teacher = EMATeacher(student)
    x = torch.randn(2, 4, requires_grad=True)
    with torch.enable_grad():
        out = teacher(x)
    assert out.grad_fn is None


def test_cache_survives_load_state_dict_and_assign():
    torch.manual_seed(0)
    student = Tiny().double()
    teacher = EMATeacher(student)
    teacher.update(student, 0.5)  # builds the cache
    other = Tiny().double()
    _randomize(other, 9)
    # plain load (in place) and assign=True (new parameter objects) both keep updates correct
    for assign in (False, True):
        teacher.module.load_state_dict(other.state_dict(), assign=assign)
        teacher.module.requires_grad_(False)
        t0 = _params(teacher.module)
        teacher.update(student, 0.25)
        for name, p in student.named_parameters():
            torch.testing.assert_close(teacher.module.get_parameter(name), 0.25 * t0[name] + 0.75 * p.detach(),
                                       rtol=0, atol=1e-12)
    # loading through the EMATeacher (state dict keys 'module.*') too
    teacher.load_state_dict({"module." + k: v for k, v in other.state_dict().items()}, assign=True)
    teacher.module.requires_grad_(False)
    teacher.update(student, 0.0)
    for name, p in student.named_parameters():
        assert torch.equal(teacher.module.get_parameter(name), p)


def test_deepcopy_of_teacher_is_independent():
    student = Tiny()
    teacher = EMATeacher(student)
    teacher.update(student, 0.5)
    clone = copy.deepcopy(teacher)
    _randomize(student, 4)
    clone.update(student, 0.0)
    assert not torch.equal(teacher.module.lin.weight, clone.module.lin.weight)
    assert torch.equal(clone.module.lin.weight, student.lin.weight)


def test_structure_mismatch_is_a_user_error():
    teacher = EMATeacher(Tiny())
    with pytest.raises(MimkitError, match="different structures"):
        teacher.update(nn.Linear(4, 3), 0.9)
    with pytest.raises(MimkitError, match=r"\[0, 1\]"):
        teacher.update(Tiny(), 1.5)


# -- momentum schedule --------------------------------------------------------------------------------
def test_cosine_values():
    s = MomentumSchedule(0.996, final=1.0, kind="cosine")
    assert s.value(0, 100) == pytest.approx(0.996, abs=1e-15)
    assert s.value(50, 100) == pytest.approx(0.998, abs=1e-12)
    assert s.value(100, 100) == pytest.approx(1.0, abs=1e-15)
    assert s.value(250, 100) == s.value(100, 100)  # clamped
    assert s.value(-3, 100) == s.value(0, 100)
    assert s.value(25, 100) == pytest.approx(1.0 - 0.004 * (math.cos(math.pi / 4) + 1) / 2)
    values = [s.value(i, 100) for i in range(101)]
    assert values == sorted(values)


def test_constant_value():
    s = MomentumSchedule()
    assert (s.base, s.final, s.kind, s.unit) == (0.996, None, "constant", "step")
    assert s.value(0, 10) == s.value(7, 10) == 0.996


def test_momentum_for_step_unit_uses_global_step():
    s = MomentumSchedule(0.9, final=1.0, kind="cosine", unit="step")
    # update i of U = total_steps runs cos(pi * i / U) (the official SdAE scheduler's convention): the first
    # optimiser step gives base, the middle one the midpoint, the last one just below final
    assert s.momentum_for(_progress(step=1, total_steps=10)) == pytest.approx(0.9)
    assert s.momentum_for(_progress(step=6, total_steps=10)) == pytest.approx(0.95)
    assert s.momentum_for(_progress(step=10, total_steps=10)) == pytest.approx(1.0 - 0.1 * (math.cos(0.9 * math.pi) + 1) / 2)
    # independent of the epoch / steps-per-epoch split (the reference restarts every epoch)
    a = s.momentum_for(_progress(step=6, epoch=0, steps_per_epoch=11, total_steps=11, epochs=1))
    b = s.momentum_for(_progress(step=6, epoch=2, steps_per_epoch=2, total_steps=11, epochs=6))
    assert a == b
    assert s.momentum_for(_progress(step=1, total_steps=1)) == pytest.approx(0.9)  # one-step run


def test_momentum_for_epoch_unit_counts_finished_epochs():
    s = MomentumSchedule(0.96, final=0.99, kind="cosine", unit="epoch")
    # official SdAE scheduler: epoch e of a schedule of length E gets cos(pi * e / E) (not / (E - 1))
    official = [0.99 - 0.03 * (math.cos(math.pi * e / 4) + 1) / 2 for e in range(4)]
    assert [s.momentum_for(_progress(epoch=e + 1, epochs=4)) for e in range(4)] == pytest.approx(official)
    assert s.momentum_for(_progress(epoch=3, epochs=4)) == pytest.approx(0.975)


def test_every_k_steps_is_the_epoch_schedule_counted_in_steps():
    per_epoch = MomentumSchedule(0.96, final=0.99, kind="cosine", unit="epoch")
    every = MomentumSchedule(0.96, final=0.99, kind="cosine", unit="step", every=7)
    epochs, spe = 5, 7
    by_steps = [every.momentum_for(_progress(step=t, steps_per_epoch=spe, total_steps=spe * epochs, epochs=epochs))
                for t in range(1, spe * epochs + 1) if every.due(_progress(step=t))]
    by_epochs = [per_epoch.momentum_for(_progress(epoch=e, epochs=epochs)) for e in range(1, epochs + 1)]
    assert by_steps == pytest.approx(by_epochs) and len(by_steps) == 5
    assert every.num_updates(35, 5) == 5 and every.num_updates(41, 5) == 5
    assert [t for t in range(1, 30) if every.due(_progress(step=t))] == [7, 14, 21, 28]
    with pytest.raises(MimkitError, match="ema_every_steps"):
        MomentumSchedule(0.9, unit="epoch", every=3)
    with pytest.raises(MimkitError, match="ema_every_steps"):
        MomentumSchedule(0.9, every=0)


def test_teacher_regime_figures():
    from mimkit.teacher import teacher_regime

    # RC-MAE at 0.996 per step: horizon 250 steps; initial share 0.996 ** steps
    r = teacher_regime(MomentumSchedule(0.996), total_steps=10_000, steps_per_epoch=500, epochs=20)
    assert r.updates == 10_000
    assert r.horizon_steps == pytest.approx(250.0)
    assert r.horizon_fraction == pytest.approx(0.025)
    assert r.init_share == pytest.approx(0.996 ** 10_000, rel=1e-9)
    # the old quick study: 624 steps keep 8 % of the initial weights, horizon 40 % of the run
    q = teacher_regime(MomentumSchedule(0.996), total_steps=624, steps_per_epoch=78, epochs=8)
    assert q.init_share == pytest.approx(0.082, abs=1e-3) and q.horizon_fraction == pytest.approx(0.4006, abs=1e-3)
    # SdAE per epoch (8 updates) vs every 30 steps: the product of the momenta, horizon at the last momentum
    e = teacher_regime(MomentumSchedule(0.96, 0.99, "cosine", "epoch"), total_steps=624, steps_per_epoch=78, epochs=8)
    assert e.updates == 8
    assert e.init_share == pytest.approx(math.prod(MomentumSchedule(0.96, 0.99, "cosine", "epoch").momenta(624, 8)))
    last = 0.99 - 0.03 * (math.cos(math.pi * 7 / 8) + 1) / 2
    assert e.horizon_steps == pytest.approx(78 / (1 - last))
    k = teacher_regime(MomentumSchedule(0.96, 0.99, "cosine", "step", every=30), total_steps=9000, steps_per_epoch=900,
                       epochs=10)
    assert k.updates == 300 and k.init_share < 0.01
    assert "300 EMA updates" in k.line()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"base": 1.2}, "base"),
        ({"base": -0.1}, "base"),
        ({"base": "0.9"}, "base"),
        ({"final": 2.0, "kind": "cosine"}, "final"),
        ({"kind": "linear"}, "linear"),
        ({"unit": "iter"}, "iter"),
        ({"kind": "cosine"}, "final"),
    ],
)
def test_schedule_validation(kwargs, match):
    with pytest.raises(MimkitError, match=match) as info:
        MomentumSchedule(**kwargs)
    assert "\n" not in str(info.value)


def test_teacher_not_in_student_parameters():
    from mimkit.methods.rc_mae import RCMAE
    from mimkit.models.vit import EncoderSpec, ModelSpec

    spec = ModelSpec(EncoderSpec(img_size=16, patch_size=4, in_chans=3, embed_dim=32, depth=2, num_heads=2), 32, 1, 2)
    method = RCMAE(spec)
    trained = {id(p) for p in method.student_parameters()}
    teacher = {id(p) for p in method.teacher.parameters()}
    assert trained and teacher and not trained & teacher
    assert trained == {id(p) for p in method.student.parameters() if p.requires_grad}
    # every trainable parameter of the whole method is the student's
    assert {id(p) for p in method.parameters() if p.requires_grad} == trained

"""RC-MAE-S / RC-MAE-D (rc-mae Sec. 5, Eq. 2, 3, 6)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from mimkit.errors import MimkitError
from mimkit.losses import masked_mse
from mimkit.methods.base import Progress
from mimkit.methods.rc_mae import RCMAE, save_grad_alignment_histogram
from mimkit.models.vit import EncoderSpec, ModelSpec
from mimkit.teacher import MomentumSchedule


def _spec(drop_path: float = 0.0) -> ModelSpec:
    enc = EncoderSpec(img_size=16, patch_size=4, in_chans=3, embed_dim=32, depth=2, num_heads=2, drop_path=drop_path)
    return ModelSpec(enc, decoder_dim=32, decoder_depth=1, decoder_heads=2)


def _method(seed: int = 0, drop_path: float = 0.0, **kwargs) -> RCMAE:
    torch.manual_seed(seed)
    method = RCMAE(_spec(drop_path), **kwargs)
    method.train()
    return method


def _images(seed: int = 1, batch: int = 4) -> torch.Tensor:
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def _progress(step: int, total: int = 10, epoch: int = 0, epochs: int = 5) -> Progress:
    return Progress(step=step, epoch=epoch, steps_per_epoch=2, total_steps=total, epochs=epochs)


def _sgd_step(method: RCMAE, images: torch.Tensor, opt: torch.optim.Optimizer) -> dict:
    out = method(images)
    opt.zero_grad()
    out.loss.backward()
    opt.step()
    return out.metrics


def _teacher_params(method):
    return [p.detach().clone() for p in method.teacher.module.parameters()]


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


class _Spy:
    """Wrap a module's forward and record its (ids_keep, ids_restore) and output."""

    def __init__(self, module):
        self.calls = []
        self._forward = module.forward

    def __call__(self, images, ids_keep, ids_restore):
        out = self._forward(images, ids_keep, ids_restore)
        self.calls.append((ids_keep.clone(), ids_restore.clone(), out))
        return out


def _spy(monkeypatch, module) -> _Spy:
    spy = _Spy(module)
    monkeypatch.setattr(module, "forward", spy)
    return spy


def test_defaults_and_names():
    method = _method()
    assert method.name == "rc-mae" and method.default_which == "teacher"
    assert method.mask_mode == "same" and method.gamma == 1.0
    assert method.momentum == MomentumSchedule(0.996) and method.grad_align_every == 0


def test_no_gradient_reaches_teacher():
    method = _method(mask_mode="different")
    out = method(_images())
    out.loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in method.teacher.parameters())
    assert all(p.grad is not None for p in method.student_parameters())


def test_same_mask_gives_teacher_student_indices(monkeypatch):
    method = _method(mask_mode="same")
    s_spy, t_spy = _spy(monkeypatch, method.student), _spy(monkeypatch, method.teacher.module)
    method(_images())
    (s_keep, s_restore, _), (t_keep, t_restore, t_out) = s_spy.calls[0], t_spy.calls[0]
    assert torch.equal(s_keep, t_keep) and torch.equal(s_restore, t_restore)
    assert t_out.grad_fn is None and not t_out.requires_grad  # no autograd in the teacher


def test_different_mask_uses_student_mask_for_loss(monkeypatch):
    method = _method(mask_mode="different", gamma=0.5)
    s_spy, t_spy = _spy(monkeypatch, method.student), _spy(monkeypatch, method.teacher.module)
    images = _images()
    out = method(images)
    (s_keep, _, s_pred), (t_keep, _, t_pred) = s_spy.calls[0], t_spy.calls[0]
    assert s_keep.shape == t_keep.shape
    assert not torch.equal(s_keep.sort(dim=1).values, t_keep.sort(dim=1).values)
    # hand computation: per-patch MSE averaged over the *student's* removed patches (Eq. 3 / 6)
    B, N = s_keep.shape[0], method.num_patches
    student_mask = torch.ones(B, N)
    student_mask.scatter_(1, s_keep, 0.0)
    per_patch = ((s_pred.detach() - t_pred) ** 2).mean(dim=-1)
    expected = (per_patch * student_mask).sum() / student_mask.sum()
    torch.testing.assert_close(out.metrics["loss_cons"], expected, rtol=1e-6, atol=0)
    teacher_mask = torch.ones(B, N).scatter_(1, t_keep, 0.0)
    wrong = (per_patch * teacher_mask).sum() / teacher_mask.sum()
    assert not torch.isclose(wrong, expected)
    torch.testing.assert_close(out.metrics["loss_rec"], masked_mse(s_pred.detach(), method.targets(images),
                                                                     student_mask))


def test_consistency_zero_at_step0_for_same_positive_for_different():
    same = _method(mask_mode="same")  # drop path off: student forward deterministic
    assert same(_images()).metrics["loss_cons"].item() < 1e-12
    diff = _method(mask_mode="different")
    assert diff(_images()).metrics["loss_cons"].item() > 1e-4


def test_consistency_nonzero_at_step0_with_drop_path():
    # the student's drop path makes its forward stochastic; the teacher is in eval mode
    method = _method(mask_mode="same", drop_path=0.5)
    assert method(_images()).metrics["loss_cons"].item() > 0


@pytest.mark.parametrize("gamma", [1.0, 0.3, 0.0])
def test_total_loss_is_rec_plus_gamma_cons(gamma):
    method = _method(mask_mode="different", gamma=gamma)
    out = method(_images())
    m = out.metrics
    torch.testing.assert_close(out.loss.detach(), m["loss_rec"] + gamma * m["loss_cons"])
    assert m["momentum"] == 0.996


def test_teacher_updates_only_after_optimizer_step():
    method = _method(momentum=MomentumSchedule(0.9))
    opt = torch.optim.SGD(method.student_parameters(), lr=0.1)
    t0 = _teacher_params(method)
    # micro-steps: forward/backward (and even an optimiser step) without the hook leave it unchanged
    for _ in range(2):
        method(_images()).loss.backward()
    opt.step()
    assert _same(t0, _teacher_params(method))
    student = [p.detach().clone() for p in method.student.parameters()]
    logged = method.after_optimizer_step(_progress(step=1))
    assert logged == {"momentum": 0.9}
    t1 = _teacher_params(method)
    assert not _same(t0, t1)
    for a, s, t in zip(t0, student, t1):
        torch.testing.assert_close(t, 0.9 * a + 0.1 * s)
    assert method(_images()).metrics["momentum"] == 0.9


def test_cosine_momentum_follows_global_step():
    sched = MomentumSchedule(0.9, final=1.0, kind="cosine")
    method = _method(momentum=sched)
    assert method.after_optimizer_step(_progress(step=1, total=11))["momentum"] == pytest.approx(0.9)
    assert method.after_optimizer_step(_progress(step=6, total=10))["momentum"] == pytest.approx(0.95)
    assert method.after_optimizer_step(_progress(step=11, total=11))["momentum"] == pytest.approx(
        1.0 - 0.1 * (math.cos(math.pi * 10 / 11) + 1) / 2)


def test_epoch_unit_updates_only_after_epoch():
    method = _method(momentum=MomentumSchedule(0.5, final=0.9, kind="cosine", unit="epoch"))
    opt = torch.optim.SGD(method.student_parameters(), lr=0.1)
    t0 = _teacher_params(method)
    _sgd_step(method, _images(), opt)
    assert method.after_optimizer_step(_progress(step=1)) == {}
    assert _same(t0, _teacher_params(method))
    logged = method.after_epoch(_progress(step=2, epoch=1, epochs=5))
    assert logged["momentum"] == pytest.approx(0.5)
    assert not _same(t0, _teacher_params(method))
    # update 4 of a 5-update schedule: cos(pi * 4 / 5), just below the final 0.9 (official SdAE convention)
    assert method.after_epoch(_progress(step=10, epoch=5, epochs=5))["momentum"] == pytest.approx(
        0.9 - 0.4 * (math.cos(math.pi * 4 / 5) + 1) / 2)


def test_step_unit_ignores_after_epoch():
    method = _method()
    t0 = _teacher_params(method)
    with torch.no_grad():
        for p in method.student.parameters():
            p.add_(1.0)
    assert method.after_epoch(_progress(step=2, epoch=1)) == {}
    assert _same(t0, _teacher_params(method))


def test_resume_continues_exactly():
    sched = MomentumSchedule(0.8, final=0.99, kind="cosine")

    def run(method, opt, steps):
        for step in steps:
            torch.manual_seed(100 + step)
            _sgd_step(method, _images(step), opt)
            method.after_optimizer_step(_progress(step=step, total=4))

    full = _method(momentum=sched)
    opt = torch.optim.SGD(full.student_parameters(), lr=0.05, momentum=0.9)
    run(full, opt, [1, 2])
    ckpt = {
        "student": {k: v.clone() for k, v in full.student.state_dict().items()},
        "teacher": {k: v.clone() for k, v in full.teacher_state_dict().items()},
        "opt": copy.deepcopy(opt.state_dict()),  # live momentum buffers otherwise
    }
    run(full, opt, [3, 4])

    resumed = _method(seed=123, momentum=sched)  # different init, overwritten by the checkpoint
    resumed.student.load_state_dict(ckpt["student"])
    resumed.load_teacher_state_dict(ckpt["teacher"])
    opt2 = torch.optim.SGD(resumed.student_parameters(), lr=0.05, momentum=0.9)
    opt2.load_state_dict(ckpt["opt"])
    run(resumed, opt2, [3, 4])
    for a, b in zip(_teacher_params(full), _teacher_params(resumed)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_encoder_which():
    method = _method(momentum=MomentumSchedule(0.0))
    opt = torch.optim.SGD(method.student_parameters(), lr=0.5)
    _sgd_step(method, _images(), opt)  # student moves, teacher not yet
    s_w = method.encoder("student").patch_embed.proj.weight
    t_w = method.encoder("teacher").patch_embed.proj.weight
    assert method.encoder("teacher") is method.teacher.module.encoder
    assert method.encoder("student") is method.student.encoder
    assert t_w is method.teacher.module.encoder.patch_embed.proj.weight
    assert not torch.equal(s_w, t_w)
    method.after_optimizer_step(_progress(step=1))  # momentum 0: teacher = student
    assert torch.equal(method.encoder("teacher").patch_embed.proj.weight, s_w)
    assert method.teacher_model() is method.teacher.module
    with pytest.raises(MimkitError, match="accepted: student, teacher"):
        method.encoder("ema")


def test_reconstruct_with_teacher():
    method = _method()
    noise = torch.rand(2, method.num_patches)
    out = method.reconstruct(_images(batch=2), noise, which="teacher")
    assert out["pred"].shape == out["target"].shape == (2, 16, 48)


def test_teacher_state_dict_roundtrip_and_errors():
    a, b = _method(seed=0), _method(seed=1)
    state = a.teacher_state_dict()
    assert set(state) == set(a.student.state_dict())
    b.load_teacher_state_dict(state)
    assert _same(_teacher_params(a), _teacher_params(b))
    with pytest.raises(MimkitError, match="no teacher state"):
        b.load_teacher_state_dict(None)
    with pytest.raises(MimkitError, match="missing"):
        b.load_teacher_state_dict({k: v for k, v in state.items() if not k.startswith("decoder")})
    bad = dict(state)
    bad["decoder.pred.bias"] = torch.zeros(5)
    with pytest.raises(MimkitError) as info:
        b.load_teacher_state_dict(bad)
    assert "\n" not in str(info.value)


def test_teacher_stays_eval_when_method_trains():
    method = _method(drop_path=0.3)
    method.train()
    assert method.student.training and not method.teacher.training
    assert not any(m.training for m in method.teacher.modules())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mask_mode": "both"}, "mask mode"),
        ({"gamma": -1.0}, "gamma"),
        ({"gamma": float("nan")}, "gamma"),
        ({"grad_align_every": -2}, "grad_align_every"),
        ({"momentum": 0.99}, "MomentumSchedule"),
    ],
)
def test_validation(kwargs, match):
    with pytest.raises(MimkitError, match=match):
        RCMAE(_spec(), **kwargs)


# -- gradient alignment monitor ----------------------------------------------------------------------
def test_grad_cos_logged_on_multiples_of_k():
    method = _method(mask_mode="different", grad_align_every=2)
    opt = torch.optim.SGD(method.student_parameters(), lr=0.05)
    seen = []
    for step in range(5):  # counter = optimiser steps done before this forward
        metrics = _sgd_step(method, _images(step), opt)  # backward still works after autograd.grad
        seen.append("grad_cos" in metrics)
        if "grad_cos" in metrics:
            assert -1.0 <= float(metrics["grad_cos"]) <= 1.0
        method.after_optimizer_step(_progress(step=step + 1))
    assert seen == [True, False, True, False, True]
    method.eval()
    assert "grad_cos" not in method(_images()).metrics
    assert "grad_cos" not in _method(grad_align_every=0)(_images()).metrics


def test_grad_cos_does_not_change_gradients():
    images = _images()
    grads = []
    for k in (0, 1):
        method = _method(seed=3, mask_mode="same", grad_align_every=k)
        torch.manual_seed(7)
        method(images).loss.backward()
        grads.append([p.grad.clone() for p in method.student_parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_gradient_cosine_values():
    method = _method()
    params = list(method.student_parameters())
    base = sum((p * torch.linspace(-1, 1, p.numel()).reshape(p.shape)).sum() for p in params)
    assert float(method.gradient_cosine(base, 2 * base)) == pytest.approx(1.0, abs=1e-6)
    assert float(method.gradient_cosine(base, -base)) == pytest.approx(-1.0, abs=1e-6)
    assert float(method.gradient_cosine(base, 0 * base)) == 0.0
    # L_c of RC-MAE-S at step 0 is identically 0 -> zero gradient -> cosine 0
    m0 = _method(mask_mode="same", grad_align_every=1)
    assert float(m0(_images()).metrics["grad_cos"]) == pytest.approx(0.0, abs=1e-6)


def test_histogram_from_metrics_file(tmp_path):
    values = [0.5, -0.25, 0.25, 0.1, -0.6]
    lines = [json.dumps({"step": i, "loss": 1.0, "grad_cos": v}) for i, v in enumerate(values)]
    lines.insert(2, json.dumps({"step": 99, "loss": 0.5}))  # a record without the metric
    lines.append(json.dumps({"step": 7, "train/grad_cos": 0.2}))
    lines.append('{"step": 8, "grad_c')  # torn last line of an interrupted run
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(lines) + "\n")
    out = tmp_path / "plots" / "hist.png"
    summary = save_grad_alignment_histogram(metrics, out)
    allv = values + [0.2]
    assert summary["n"] == 6
    assert summary["grad_cos_mean"] == pytest.approx(sum(allv) / 6)
    assert summary["grad_cos_frac_negative"] == pytest.approx(2 / 6)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_histogram_without_values(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"loss": 1.0}) + "\n")
    summary = save_grad_alignment_histogram(metrics, tmp_path / "h.png")
    assert summary["n"] == 0 and math.isnan(summary["grad_cos_mean"])
    assert not (tmp_path / "h.png").exists()


def test_on_train_end(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps({"grad_cos": v}) for v in (0.1, 0.3)) + "\n")
    assert _method(grad_align_every=0).on_train_end(tmp_path) == {}
    assert not (tmp_path / "grad_alignment.png").exists()
    summary = _method(grad_align_every=5).on_train_end(tmp_path)
    assert summary["n"] == 2 and summary["grad_cos_mean"] == pytest.approx(0.2)
    assert (tmp_path / "grad_alignment.png").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _method(grad_align_every=5).on_train_end(empty) == {}

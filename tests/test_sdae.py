"""SdAE (sdae Sec. 2.1-2.3, Eq. 3, 4, 7; multi-fold masking, teacher-input modes, EMA per epoch/step)."""

from __future__ import annotations

import math
import pytest
import torch

from mimkit.config import build_config
from mimkit.errors import MimkitError
from mimkit.masking import gather_tokens, mask_from_noise, split_folds
from mimkit.methods import build_method
from mimkit.methods.base import Progress
from mimkit.methods.sdae import SdAE, build_sdae, cosine_loss, normalize_features, spread
from mimkit.models.vit import EncoderSpec, ModelSpec, resolve_model_spec
from mimkit.teacher import MomentumSchedule

MODES = ("full", "masked", "crop", "multifold")


def _spec(img_size: int = 16, drop_path: float = 0.0) -> ModelSpec:
    enc = EncoderSpec(img_size=img_size, patch_size=4, in_chans=3, embed_dim=32, depth=2, num_heads=2,
                      drop_path=drop_path)
    return ModelSpec(enc, decoder_dim=32, decoder_depth=1, decoder_heads=2)


def _method(seed: int = 0, img_size: int = 16, drop_path: float = 0.0, **kwargs) -> SdAE:
    torch.manual_seed(seed)
    method = SdAE(_spec(img_size, drop_path), **kwargs)
    method.train()
    return method


def _images(seed: int = 1, batch: int = 4, img_size: int = 16) -> torch.Tensor:
    return torch.randn(batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(seed))


def _mask(method: SdAE, batch: int = 4, seed: int = 2):
    noise = torch.rand(batch, method.num_patches, generator=torch.Generator().manual_seed(seed))
    return mask_from_noise(noise, method.mask_ratio)


def _progress(step: int = 1, epoch: int = 0, epochs: int = 5, total: int = 10) -> Progress:
    return Progress(step=step, epoch=epoch, steps_per_epoch=2, total_steps=total, epochs=epochs)


def _teacher_params(method: SdAE):
    return [p.detach().clone() for p in method.teacher.module.parameters()]


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


# -- split_folds (masking.py) -------------------------------------------------------------------------
def test_split_folds_disjoint_equal_and_cover():
    mask = mask_from_noise(torch.rand(5, 16, generator=torch.Generator().manual_seed(0)), 0.75)  # 12 masked
    folds = split_folds(mask.ids_masked, 3)
    assert folds.shape == (5, 3, 4)
    for b in range(5):
        flat = folds[b].flatten()
        assert flat.unique().numel() == 12  # disjoint
        assert torch.equal(flat.sort().values, mask.ids_masked[b].sort().values)  # cover the masked set
        assert not set(flat.tolist()) & set(mask.ids_keep[b].tolist())


def test_split_folds_drop_policy():
    # 49 patches at ratio 0.75: 12 visible, 37 masked; 3 folds of 12 -> 1 masked patch left out
    mask = mask_from_noise(torch.rand(2, 49, generator=torch.Generator().manual_seed(0)), 0.75)
    assert mask.ids_masked.shape == (2, 37)
    folds = split_folds(mask.ids_masked, 3)
    assert folds.shape == (2, 3, 12)
    assert torch.equal(folds.flatten(1), mask.ids_masked[:, :36])
    assert split_folds(mask.ids_masked, 3, fold_size=5).shape == (2, 3, 5)


def test_split_folds_errors():
    ids = torch.arange(12).reshape(1, 12)
    with pytest.raises(MimkitError, match="at least one"):
        split_folds(ids, 13)
    with pytest.raises(MimkitError, match="needs 15"):
        split_folds(ids, 3, fold_size=5)
    with pytest.raises(MimkitError, match="folds"):
        split_folds(ids, 0)


# -- construction / sizes -----------------------------------------------------------------------------
def test_defaults_and_names():
    method = _method()
    assert method.name == "sdae" and method.default_which == "student"
    assert method.teacher_input == "multifold" and method.folds == 3 and method.cosine_dim == "token"
    assert method.momentum == MomentumSchedule(0.96, 0.99, "cosine", "epoch")
    assert method.num_patches == 16 and method.patch_size == 4
    assert (method.num_visible, method.num_masked, method.fold_size, method.targets_dropped) == (4, 12, 4, 0)
    assert method.student.decoder.pred.out_features == 32  # predicts teacher-width features


def test_multifold_drop_policy_in_method():
    method = _method(img_size=28)  # 49 patches, 12 visible, 37 masked
    assert (method.fold_size, method.num_targets, method.targets_dropped) == (12, 36, 1)
    out = method(_images(img_size=28, batch=2))
    assert out.metrics["targets_dropped"] == 1.0
    # fold size capped by the number of visible tokens: 16 patches at ratio 0.5 -> 8 visible, 8 masked
    capped = _method(mask_ratio=0.5, folds=1)
    assert (capped.fold_size, capped.targets_dropped) == (8, 0)
    capped = _method(mask_ratio=0.25, folds=2)  # 12 visible, 4 masked -> 2 folds of 2
    assert (capped.fold_size, capped.targets_dropped) == (2, 0)
    capped = _method(mask_ratio=0.75, folds=2)  # 4 visible, 12 masked -> 2 folds of 4, 4 dropped
    assert (capped.fold_size, capped.targets_dropped) == (4, 4)


def test_multifold_too_many_folds_is_an_error():
    with pytest.raises(MimkitError, match=r"mask ratio 0\.75 on 16 patches.*folds=13"):
        _method(folds=13)


@pytest.mark.parametrize("kwargs, match", [
    ({"teacher_input": "half"}, "teacher input"),
    ({"cosine_dim": "channel"}, "cosine_dim"),
    ({"folds": 0}, "folds"),
    ({"crop_ratio": 0.0}, "crop_ratio"),
    ({"crop_ratio": 1.5}, "crop_ratio"),
    ({"momentum": 0.99}, "MomentumSchedule"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(MimkitError, match=match):
        _method(**kwargs)


# -- teacher ------------------------------------------------------------------------------------------
def test_teacher_initialised_as_student_encoder():
    method = _method()
    s = method.student.encoder.state_dict()
    t = method.teacher.module.state_dict()
    assert s.keys() == t.keys()
    assert all(torch.equal(s[k], t[k]) for k in s)
    assert method.encoder("student") is method.student.encoder
    assert method.encoder("teacher") is method.teacher.module
    assert not method.teacher.training
    with pytest.raises(MimkitError):
        method.encoder("decoder")


def _patch_pixels(images: torch.Tensor, patch: int, p: int = 4) -> torch.Tensor:
    """Perturb the pixels of one patch of sample 0 only."""
    grid = images.shape[-1] // p
    r, c = divmod(int(patch), grid)
    out = images.clone()
    out[0, :, r * p:(r + 1) * p, c * p:(c + 1) * p] += 5.0 * torch.randn(3, p, p)
    return out


def test_attention_stays_inside_a_fold():
    method = _method(drop_path=0.3)  # drop path must be off in the teacher (eval)
    images = _images()
    mask = _mask(method)
    ids = method.target_ids(mask)  # (B, 3 * 4), fold-major
    n = method.fold_size
    before = method.teacher_features(images, ids)
    torch.manual_seed(5)
    after = method.teacher_features(_patch_pixels(images, ids[0, n + 1]), ids)  # a patch of fold 2, sample 0
    torch.testing.assert_close(after[0, :n], before[0, :n], rtol=0, atol=1e-6)   # fold 1 untouched
    torch.testing.assert_close(after[0, 2 * n:], before[0, 2 * n:], rtol=0, atol=1e-6)  # fold 3 untouched
    assert (after[0, n:2 * n] - before[0, n:2 * n]).abs().amax(dim=-1).min() > 1e-4  # all of fold 2 changed
    torch.testing.assert_close(after[1:], before[1:], rtol=0, atol=1e-6)  # other samples untouched

    # contrast: with all masked patches as one sequence the same perturbation reaches every token
    single = _method(teacher_input="masked")
    ids = single.target_ids(mask)
    before = single.teacher_features(images, ids)
    after = single.teacher_features(_patch_pixels(images, ids[0, n + 1]), ids)
    assert (after[0] - before[0]).abs().amax(dim=-1).min() > 1e-4


def test_multifold_is_one_batched_teacher_forward(monkeypatch):
    method = _method()
    calls = []
    enc = method.teacher.module
    original = enc.encode_tokens

    def spy(tokens):
        calls.append((tuple(tokens.shape), torch.is_grad_enabled()))
        return original(tokens)

    monkeypatch.setattr(enc, "encode_tokens", spy)
    method(_images())
    assert calls == [((4 * 3, 4, 32), False)]  # (B * folds, n, D), no autograd


def test_multifold_tokens_are_the_folds_with_their_positions():
    method = _method()
    images, mask = _images(), _mask(method)
    enc = method.teacher.module
    ids = method.target_ids(mask)
    folds = split_folds(mask.ids_masked, 3, 4)
    assert torch.equal(ids, folds.flatten(1))
    expected = torch.stack([enc.encode_tokens(gather_tokens(enc.patch_tokens(images), folds[:, j]))[:, 1:]
                            for j in range(3)], dim=1).reshape(4, 12, 32)
    torch.testing.assert_close(method.teacher_features(images, ids), expected, rtol=1e-5, atol=1e-5)


def test_full_mode_uses_whole_image_at_masked_positions():
    method = _method(teacher_input="full")
    images, mask = _images(), _mask(method)
    ids = method.target_ids(mask)
    assert torch.equal(ids, mask.ids_masked)
    feats = method.teacher.module.forward_features(images)[:, 1:]
    torch.testing.assert_close(method.teacher_features(images, ids), gather_tokens(feats, ids))


@pytest.mark.parametrize("mode, crop_ratio, expected", [
    ("full", 0.33, 12), ("masked", 0.33, 12), ("crop", 0.33, 4), ("crop", 0.5, 6), ("crop", 0.01, 1),
    ("multifold", 0.33, 12),
])
def test_number_of_target_tokens(mode, crop_ratio, expected):
    method = _method(teacher_input=mode, crop_ratio=crop_ratio)
    mask = _mask(method)
    target, ids = method.targets(_images(), mask)
    assert method.num_targets == expected and method.targets_dropped == 12 - expected
    assert target.shape == (4, expected, 32) and ids.shape == (4, expected)
    for b in range(4):  # targets only at masked positions, each once
        assert set(ids[b].tolist()) <= set(mask.ids_masked[b].tolist())
        assert ids[b].unique().numel() == expected


def test_targets_normalised_per_token():
    method = _method()
    target, _ = method.targets(_images(), _mask(method))
    assert target.dtype == torch.float32 and not target.requires_grad
    torch.testing.assert_close(target.mean(-1), torch.zeros(4, 12), rtol=0, atol=1e-5)
    torch.testing.assert_close(target.var(-1, unbiased=False), torch.ones(4, 12), rtol=0, atol=1e-3)
    x = torch.randn(3, 5, 8) * 4 + 2
    manual = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-6)
    torch.testing.assert_close(normalize_features(x), manual)


# -- loss ---------------------------------------------------------------------------------------------
def test_cosine_loss_values():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 8, generator=g)
    assert cosine_loss(3.0 * x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert cosine_loss(-x, x).item() == pytest.approx(2.0, abs=1e-6)
    assert cosine_loss(3.0 * x, x, "reference", 3).item() == pytest.approx(0.0, abs=1e-6)
    assert cosine_loss(-x, x, "reference", 3).item() == pytest.approx(2.0, abs=1e-6)
    y = torch.randn(2, 6, 8, generator=g)
    token = cosine_loss(y, x)
    manual = 1 - (y * x).sum(-1) / (y.norm(dim=-1) * x.norm(dim=-1))
    torch.testing.assert_close(token, manual.mean())
    ref = cosine_loss(y, x, "reference", 3)
    yr, xr = y.reshape(4, 3, 8), x.reshape(4, 3, 8)
    manual_ref = 1 - (yr * xr).sum(1) / (yr.norm(dim=1) * xr.norm(dim=1))  # across tokens, per channel
    torch.testing.assert_close(ref, manual_ref.mean())
    assert abs(ref.item() - token.item()) > 1e-3
    with pytest.raises(MimkitError):
        cosine_loss(y, x, "reference", 4)


def test_loss_matches_hand_computation(monkeypatch):
    method = _method()
    images, mask = _images(), _mask(method)
    monkeypatch.setattr(method, "sample_mask", lambda imgs: mask)
    out = method(images)
    pred_all = method.student(images, mask.ids_keep, mask.ids_restore).detach()
    target, ids = method.targets(images, mask)
    pred = gather_tokens(pred_all, ids)
    expected = (1 - torch.nn.functional.cosine_similarity(pred, target, dim=-1)).mean()
    torch.testing.assert_close(out.loss.detach(), expected, rtol=1e-5, atol=1e-6)
    m = out.metrics
    assert m["loss_cos"] == m["loss"] and m["momentum"] == pytest.approx(0.96)
    torch.testing.assert_close(m["target_std"], target.reshape(-1, 32).std(0, unbiased=False).mean())
    assert 0 < m["pred_std"] < 1 and 0.05 < m["target_std"] <= 1.01
    assert all(not (torch.is_tensor(v) and v.requires_grad) for v in m.values())


def test_reference_cosine_dim_groups_by_fold(monkeypatch):
    method = _method(cosine_dim="reference")
    images, mask = _images(), _mask(method)
    monkeypatch.setattr(method, "sample_mask", lambda imgs: mask)
    out = method(images)
    pred = gather_tokens(method.student(images, mask.ids_keep, mask.ids_restore).detach(), method.target_ids(mask))
    target, _ = method.targets(images, mask)
    cos = torch.nn.functional.cosine_similarity(pred.reshape(12, 4, 32), target.reshape(12, 4, 32), dim=1)
    torch.testing.assert_close(out.loss.detach(), (1 - cos).mean(), rtol=1e-5, atol=1e-6)
    token = cosine_loss(pred, target)
    assert abs(out.loss.item() - token.item()) > 1e-4


def test_reference_cosine_dim_is_per_token_for_the_full_image_teacher(monkeypatch):
    """The official full-image path flattens (B * |M|, D) before the cosine: one cosine per token."""
    method = _method(teacher_input="full", cosine_dim="reference")
    images, mask = _images(), _mask(method)
    monkeypatch.setattr(method, "sample_mask", lambda imgs: mask)
    out = method(images)
    pred = gather_tokens(method.student(images, mask.ids_keep, mask.ids_restore).detach(), method.target_ids(mask))
    target, _ = method.targets(images, mask)
    flat = torch.nn.functional.cosine_similarity(pred.reshape(-1, 32), target.reshape(-1, 32), dim=1)
    torch.testing.assert_close(out.loss.detach(), (1 - flat).mean(), rtol=1e-5, atol=1e-6)
    across = cosine_loss(pred, target, "reference", pred.shape[1])  # what the across-tokens rule would give
    assert abs(out.loss.item() - across.item()) > 1e-4


def test_spread_is_a_collapse_indicator():
    assert spread(torch.ones(2, 5, 8)).item() == 0.0
    assert spread(torch.randn(2, 5, 8)).item() > 0.5
    assert torch.isfinite(spread(torch.randn(1, 1, 8)))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cosine_dim", ["token", "reference"])
def test_end_to_end_forward_backward(mode, cosine_dim):
    method = _method(teacher_input=mode, cosine_dim=cosine_dim, drop_path=0.1)
    out = method(_images())
    assert out.loss.ndim == 0 and torch.isfinite(out.loss) and 0 <= out.loss.item() <= 2
    out.loss.backward()
    assert all(p.grad is not None for p in method.student_parameters())
    assert all(p.grad is None and not p.requires_grad for p in method.teacher.parameters())
    assert method.reconstruct(_images(), torch.rand(4, 16)) is None


# -- EMA ----------------------------------------------------------------------------------------------
def _sgd_step(method: SdAE) -> None:
    opt = torch.optim.SGD(method.student_parameters(), lr=0.5)
    method(_images()).loss.backward()
    opt.step()


def test_epoch_ema_updates_only_after_epoch():
    method = _method()  # default: cosine 0.96 -> 0.99, per epoch
    t0 = _teacher_params(method)
    _sgd_step(method)
    assert method.after_optimizer_step(_progress(step=1)) == {}
    assert _same(t0, _teacher_params(method))
    student = [p.detach().clone() for p in method.student.encoder.parameters()]
    logged = method.after_epoch(_progress(step=2, epoch=1, epochs=5))
    assert logged["momentum"] == pytest.approx(0.96)
    for a, s, t in zip(t0, student, _teacher_params(method)):
        torch.testing.assert_close(t, 0.96 * a + 0.04 * s)
    # official scheduler: update e of a 5-epoch schedule is cos(pi * e / 5)
    assert method.after_epoch(_progress(step=6, epoch=3, epochs=5))["momentum"] == pytest.approx(
        0.99 - 0.03 * (math.cos(math.pi * 2 / 5) + 1) / 2)
    assert method.after_epoch(_progress(step=10, epoch=5, epochs=5))["momentum"] == pytest.approx(
        0.99 - 0.03 * (math.cos(math.pi * 4 / 5) + 1) / 2)
    assert method(_images()).metrics["momentum"] == pytest.approx(0.99 - 0.03 * (math.cos(math.pi * 4 / 5) + 1) / 2)


def test_step_ema_updates_only_after_optimizer_step():
    method = _method(momentum=MomentumSchedule(0.96, 0.99, "cosine", "step"))
    t0 = _teacher_params(method)
    _sgd_step(method)
    assert method.after_epoch(_progress(step=2, epoch=1)) == {}
    assert _same(t0, _teacher_params(method))
    student = [p.detach().clone() for p in method.student.encoder.parameters()]
    assert method.after_optimizer_step(_progress(step=1, total=10))["momentum"] == pytest.approx(0.96)
    for a, s, t in zip(t0, student, _teacher_params(method)):
        torch.testing.assert_close(t, 0.96 * a + 0.04 * s)
    assert method.after_optimizer_step(_progress(step=10, total=10))["momentum"] == pytest.approx(
        0.99 - 0.03 * (math.cos(math.pi * 9 / 10) + 1) / 2)


def test_teacher_state_roundtrip_and_errors():
    a, b = _method(seed=0), _method(seed=1)
    state = a.teacher_state_dict()
    assert "cls_token" in state and "pos_embed" in state  # timm key names, no prefix
    b.load_teacher_state_dict(state)
    assert _same(_teacher_params(a), _teacher_params(b))
    with pytest.raises(MimkitError, match="no teacher state"):
        b.load_teacher_state_dict(None)
    with pytest.raises(MimkitError, match="missing"):
        b.load_teacher_state_dict({k: v for k, v in state.items() if k != "cls_token"})
    bad = dict(state, cls_token=torch.zeros(1, 1, 8))
    with pytest.raises(MimkitError, match="does not match"):
        b.load_teacher_state_dict(bad)


# -- config -------------------------------------------------------------------------------------------
TINY = ["model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.decoder_dim=32",
        "model.decoder_depth=1", "model.decoder_heads=2"]


def test_build_sdae_from_config():
    cfg = build_config("demo", ["method.name=sdae", *TINY, "model.img_size=28", "model.patch_size=4"])
    assert (cfg.method.momentum, cfg.method.momentum_final) == (0.96, 0.99)
    spec = resolve_model_spec(cfg.model, 1)
    method = build_sdae(cfg, spec)
    assert isinstance(method, SdAE)
    assert method.momentum == MomentumSchedule(0.96, 0.99, "cosine", "epoch")
    # 28 px / patch 4 = 49 patches, 12 visible, 37 masked -> 3 folds of 12, one dropped
    assert (method.num_patches, method.fold_size, method.targets_dropped) == (49, 12, 1)
    out = method(torch.randn(2, 1, 28, 28))
    out.loss.backward()
    assert out.metrics["targets_dropped"] == 1.0

    cfg = build_config("demo", ["method.name=sdae", *TINY, "method.teacher_input=crop", "method.crop_ratio=0.5",
                                "method.cosine_dim=reference", "method.ema_unit=step", "method.momentum=0.9",
                                "model.drop_path=0.25", "model.img_size=28", "model.patch_size=4"])
    method = build_method(cfg, in_chans=1)
    assert isinstance(method, SdAE) and method.teacher_input == "crop" and method.cosine_dim == "reference"
    assert method.num_targets == round(0.5 * 37) and method.momentum.unit == "step" and method.momentum.base == 0.9
    assert method.student.encoder.blocks[-1].drop_path1.drop_prob == pytest.approx(0.25)

import math

import pytest
import torch

from mimkit.errors import MimkitError
from mimkit.losses import masked_mse, normalize_patches
from mimkit.masking import random_mask
from mimkit.models.vit import (EncoderSpec, MaskedAutoencoder, ModelSpec, ViTEncoder, patchify, sincos_2d,
                               unpatchify)

TINY = ModelSpec(EncoderSpec(img_size=16, patch_size=4, in_chans=3, embed_dim=32, depth=2, num_heads=2), 32, 1, 2)


def test_patchify_round_trip_and_layout():
    x = torch.randn(2, 3, 16, 16)
    p = patchify(x, 4)
    assert p.shape == (2, 16, 48)
    assert torch.equal(unpatchify(p, 4, 3), x)
    # patch 1 is the second patch of the first row; inside it pixels are (row, col, channel)
    assert torch.equal(p[0, 1].view(4, 4, 3), x[0, :, 0:4, 4:8].permute(1, 2, 0))
    # patch 4 starts the second row
    assert torch.equal(p[0, 4].view(4, 4, 3), x[0, :, 4:8, 0:4].permute(1, 2, 0))


def test_sincos_position_embedding_values():
    D, g = 16, 4
    pe = sincos_2d(D, g)
    assert pe.shape == (1 + g * g, D)
    assert torch.all(pe[0] == 0)  # cls row
    # token for row r, column c sits at 1 + r*g + c; first half encodes the column, second the row
    r, c = 2, 3
    tok = pe[1 + r * g + c]
    quarter = D // 4
    omega = [1.0 / 10000 ** (i / quarter) for i in range(quarter)]
    assert tok[:quarter].tolist() == pytest.approx([math.sin(c * w) for w in omega], abs=1e-6)
    assert tok[quarter:2 * quarter].tolist() == pytest.approx([math.cos(c * w) for w in omega], abs=1e-6)
    assert tok[2 * quarter:3 * quarter].tolist() == pytest.approx([math.sin(r * w) for w in omega], abs=1e-6)
    assert tok[3 * quarter:].tolist() == pytest.approx([math.cos(r * w) for w in omega], abs=1e-6)


def test_encoder_pos_embed_is_fixed_and_keys_are_timm_names():
    enc = ViTEncoder(TINY.encoder)
    assert not enc.pos_embed.requires_grad
    keys = set(enc.state_dict())
    for k in ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight",
              "blocks.1.mlp.fc2.bias", "norm.weight"):
        assert k in keys
    assert not any("mask_token" in k for k in keys)


def test_masked_encoder_sees_only_visible_tokens():
    mae = MaskedAutoencoder(TINY)
    x = torch.randn(2, 3, 16, 16)
    m = random_mask(2, 16, 0.75, generator=torch.Generator().manual_seed(0))
    latent = mae.encoder.forward_visible(x, m.ids_keep)
    assert latent.shape == (2, 1 + 4, 32)
    # changing a masked patch's pixels does not change the encoder output
    x2 = x.clone()
    r, c = divmod(m.ids_masked[0, 0].item(), 4)
    x2[0, :, 4 * r:4 * r + 4, 4 * c:4 * c + 4] += 5
    assert torch.allclose(mae.encoder.forward_visible(x2, m.ids_keep), latent, atol=1e-6)
    assert mae(x, m.ids_keep, m.ids_restore).shape == (2, 16, 48)


def test_loss_counts_only_masked_patches():
    pred = torch.zeros(1, 4, 2)
    target = torch.tensor([[[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [4.0, 4.0]]])
    mask = torch.tensor([[0.0, 1.0, 0.0, 1.0]])
    assert masked_mse(pred, target, mask).item() == pytest.approx((4 + 16) / 2)
    # errors on visible patches do not count
    target2 = target.clone()
    target2[0, 0] = 100
    assert masked_mse(pred, target2, mask).item() == pytest.approx(10.0)


def test_norm_pix_normalises_each_patch():
    patches = torch.randn(3, 5, 48) * 4 + 2
    t, mean, var = normalize_patches(patches)
    assert torch.allclose(t.mean(-1), torch.zeros(3, 5), atol=1e-5)
    assert torch.allclose(t.var(-1, unbiased=True), torch.ones(3, 5), atol=1e-4)
    assert torch.allclose(t * (var + 1e-6) ** 0.5 + mean, patches, atol=1e-5)


def test_image_not_divisible_by_patch_is_a_user_error():
    with pytest.raises(MimkitError, match="not divisible by patch size"):
        ViTEncoder(EncoderSpec(img_size=30, patch_size=4, in_chans=1, embed_dim=32, depth=1, num_heads=2))

"""Last-layer attention maps and the attention / reconstruction pictures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from helpers import TINY
from mimkit import cli
from mimkit.viz.attention import (
    block_attention,
    cls_attention,
    default_query,
    figure_size_px,
    last_layer_attention,
    mass_threshold,
    query_attention,
    save_attention_figure,
)
from mimkit.config import build_config
from mimkit.errors import MimkitError
from mimkit.methods import build_method
from mimkit.models.vit import EncoderSpec, ViTEncoder
from mimkit.train.checkpoint import atomic_save, make_checkpoint


def encoder(in_chans: int = 1, seed: int = 0) -> ViTEncoder:
    torch.manual_seed(seed)
    enc = ViTEncoder(EncoderSpec(img_size=16, patch_size=4, in_chans=in_chans, embed_dim=32, depth=2, num_heads=2))
    with torch.no_grad():
        for p in enc.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return enc.eval()


@pytest.fixture
def run_cli(monkeypatch):
    if "mimkit.commands.interop" not in cli.COMMAND_MODULES:
        monkeypatch.setattr(cli, "COMMAND_MODULES", [*cli.COMMAND_MODULES, "mimkit.commands.interop"])
    return cli.main


def write_checkpoint(path: Path, method: str) -> Path:
    cfg = build_config(None, [*TINY, f"method.name={method}", "data.max_train=128", "data.max_test=64"])
    torch.manual_seed(0)
    m = build_method(cfg, in_chans=1)
    with torch.no_grad():
        for p in m.student.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    atomic_save(make_checkpoint(method_name=m.name, config=cfg.to_dict(), student=m.student.state_dict(),
                                teacher=m.teacher_state_dict(), optimizer=None, scaler=None, global_step=0, epoch=0),
                path)
    return path


# ------------------------------------------------------------------------------------------ maths
def test_block_attention_reproduces_timms_fused_attention():
    enc = encoder()
    block = enc.blocks[-1]
    x = torch.randn(2, 17, 32)
    with torch.no_grad():
        normed = block.norm1(x)
        attn = block_attention(block, normed)                       # (B, H, T, T)
        a = block.attn
        v = a.qkv(normed).reshape(2, 17, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)[2]
        out = a.proj((attn @ v).transpose(1, 2).reshape(2, 17, 32))
        torch.testing.assert_close(out, a(normed), atol=1e-5, rtol=0)   # timm's own (fused) forward
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 2, 17))


def test_last_layer_attention_shapes_and_hook_cleanup():
    enc = encoder()
    attn = last_layer_attention(enc, torch.randn(3, 1, 16, 16))
    assert attn.shape == (3, 2, 17, 17)
    assert not enc.blocks[-1].norm1._forward_hooks
    q = query_attention(attn, default_query(4))
    assert q.shape == (3, 16) and torch.allclose(q.sum(-1), torch.ones(3))
    assert cls_attention(attn).shape == (3, 2, 16)
    with pytest.raises(MimkitError, match="0 .. 15"):
        query_attention(attn, 16)


def test_mass_threshold_keeps_the_smallest_top_set():
    w = torch.tensor([[0.1, 0.5, 0.1, 0.3], [0.25, 0.25, 0.25, 0.25]])
    assert mass_threshold(w, 0.1).tolist() == [[False, True, False, False], [True, False, False, False]]
    assert mass_threshold(w, 0.8).tolist()[0] == [False, True, False, True]      # 0.5 + 0.3 reaches 0.8
    kept = mass_threshold(w, 0.81)[0]                                            # + one of the tied 0.1s
    assert kept.sum() == 3 and kept[1] and kept[3]
    assert mass_threshold(w, 1.0).sum(-1).tolist() == [4, 4]
    with pytest.raises(MimkitError):
        mass_threshold(w, 0.0)


# ------------------------------------------------------------------------------------------ pictures
@pytest.mark.parametrize("style,in_chans,cols", [("rcmae", 1, 5), ("sdae", 3, 1 + 2 * (2 + 1))])
def test_attention_figure_size(tmp_path, style, in_chans, cols):
    encoders = {"student": encoder(in_chans, 0), "teacher": encoder(in_chans, 1)}
    png = save_attention_figure(encoders, torch.randn(3, in_chans, 16, 16), tmp_path / "a.png",
                                (0.5,) * in_chans, (0.25,) * in_chans, style=style, query=5)
    assert Image.open(png).size == figure_size_px(3, cols)


def test_picture_commands(tmp_path, run_cli, capsys):
    rc = write_checkpoint(tmp_path / "rc.pt", "rc-mae")
    out = tmp_path / "pics"
    assert run_cli(["visualize", "attention", "--checkpoint", str(rc), "--out", str(out / "att.png"),
                    "--num-images", "2", "--both", "--no-progress"]) == 0
    assert Image.open(out / "att.png").size == figure_size_px(2, 5)
    assert run_cli(["visualize", "attention", "--checkpoint", str(rc), "--out", str(out / "sdae.png"),
                    "--style", "sdae", "--num-images", "3", "--which", "student"]) == 0
    assert Image.open(out / "sdae.png").size == figure_size_px(3, 1 + 2 + 1)       # image, 2 heads, mean
    assert run_cli(["visualize", "reconstruction-compare", "--checkpoint", str(rc), "--out", str(out / "rec.png"),
                    "--num-images", "2"]) == 0
    assert Image.open(out / "rec.png").size == figure_size_px(2, 6)

    mae = write_checkpoint(tmp_path / "mae.pt", "mae")
    capsys.readouterr()
    assert run_cli(["visualize", "attention", "--checkpoint", str(mae), "--out", str(out / "x.png"), "--both"]) == 2
    assert run_cli(["visualize", "reconstruction-compare", "--checkpoint", str(mae), "--out", str(out / "y.png")]) == 2
    assert run_cli(["visualize", "attention", "--checkpoint", str(rc), "--out", str(out / "z.png"),
                    "--query-patch", "99"]) == 2
    err = capsys.readouterr().err
    assert "no 'teacher'" in err and "0 .. 15" in err
    assert not any((out / n).exists() for n in ("x.png", "y.png", "z.png"))

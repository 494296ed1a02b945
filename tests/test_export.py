"""timm / Hugging Face exports and imports of foreign (official-layout) checkpoints."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import TINY
from mimkit import cli
from mimkit.config import build_config
from mimkit.errors import MimkitError
from mimkit.interop.export import check_export, export_hf_mae, export_hf_vit, export_timm
from mimkit.interop import import_checkpoint
from mimkit.interop import keys as K
from mimkit.interop.foreign import imported_checkpoint
from mimkit.losses import masked_mse
from mimkit.masking import mask_from_noise
from mimkit.methods import build_method
from mimkit.methods.mae import MAE
from mimkit.models.vit import EncoderSpec, MaskedAutoencoder, ModelSpec, pool_features
from mimkit.train.checkpoint import atomic_save, load_checkpoint, make_checkpoint

MEAN1, STD1 = (0.5,), (0.25,)
MEAN3, STD3 = (0.4, 0.45, 0.5), (0.2, 0.25, 0.3)


# ------------------------------------------------------------------------------------------ helpers
def perturb(module: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """Move trainable weights away from their initialisation (zero biases, unit norms)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))
    return module.eval()


def tiny_mae(in_chans=3, embed=32, heads=2, dec=(24, 1, 2), seed=0, out_dim=None) -> MaskedAutoencoder:
    torch.manual_seed(seed)
    spec = ModelSpec(EncoderSpec(img_size=16, patch_size=4, in_chans=in_chans, embed_dim=embed, depth=2,
                                 num_heads=heads), *dec)
    return perturb(MaskedAutoencoder(spec, out_dim=out_dim), seed)


def official_state(mae: MaskedAutoencoder, with_decoder: bool = True) -> dict:
    """Our MAE's weights under the official MAE code's names (timm encoder keys + top-level decoder)."""
    state = dict(mae.encoder.state_dict())
    if with_decoder:
        state.update(K.decoder_to_official(mae.decoder.state_dict()))
    return state


@pytest.fixture
def run_cli(monkeypatch):
    """``mimkit`` main with this module's commands registered (whether or not cli.py lists them yet)."""
    if "mimkit.commands.interop" not in cli.COMMAND_MODULES:
        monkeypatch.setattr(cli, "COMMAND_MODULES", [*cli.COMMAND_MODULES, "mimkit.commands.interop"])
    return cli.main


def write_tiny_checkpoint(path: Path, method: str = "rc-mae", *extra: str) -> Path:
    """A mimkit checkpoint of a tiny model on the demo data, weights perturbed (student != teacher)."""
    cfg = build_config(None, [*TINY, f"method.name={method}", "data.max_train=256", "data.max_test=128", *extra])
    torch.manual_seed(0)
    m = build_method(cfg, in_chans=1)
    perturb(m.student, 1)
    ckpt = make_checkpoint(method_name=m.name, config=cfg.to_dict(), student=m.student.state_dict(),
                           teacher=m.teacher_state_dict(), optimizer=None, scaler=None, global_step=0, epoch=0)
    atomic_save(ckpt, path)
    return path


# ------------------------------------------------------------------------------------------ key maps
def test_expected_keys_match_the_models():
    mae = tiny_mae()
    assert sorted(K.encoder_keys(2)) == sorted(mae.encoder.state_dict())
    assert sorted(K.decoder_keys(1)) == sorted(mae.decoder.state_dict())


def test_hf_key_maps_round_trip():
    mae = tiny_mae()
    enc, dec = mae.encoder.state_dict(), mae.decoder.state_dict()
    hf = K.encoder_to_hf(enc, "vit.")
    hf.update(K.decoder_to_hf(dec))
    back_enc, back_dec = K.encoder_from_hf(hf, "vit."), K.decoder_from_hf(hf)
    assert hf == {}  # every key was understood
    assert all(torch.equal(back_enc[k], v) for k, v in enc.items()) and back_enc.keys() == enc.keys()
    assert all(torch.equal(back_dec[k], v) for k, v in dec.items()) and back_dec.keys() == dec.keys()


# ------------------------------------------------------------------------------------------ timm
@pytest.mark.parametrize("in_chans,pool", [(1, "cls"), (3, "mean")])
def test_timm_export_matches_our_features(tmp_path, in_chans, pool):
    import timm

    enc = tiny_mae(in_chans=in_chans).encoder
    mean, std = (MEAN1, STD1) if in_chans == 1 else (MEAN3, STD3)
    out = export_timm(enc, tmp_path / "timm", mean=mean, std=std, pool=pool)
    weights = load_file(str(out / "model.safetensors"))
    assert "mask_token" not in weights and not any(k.startswith(("decoder", "head")) for k in weights)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_classes"] == 0 and cfg["pretrained_cfg"]["mean"] == list(mean)
    assert cfg["pretrained_cfg"]["input_size"] == [in_chans, 16, 16]

    x = torch.randn(3, in_chans, 16, 16)
    with torch.no_grad():
        ours = enc.forward_features(x)
        model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
        torch.testing.assert_close(model.forward_features(x), ours, atol=1e-5, rtol=0)
        torch.testing.assert_close(model(x), pool_features(ours, pool), atol=1e-5, rtol=0)
        # the other documented form: VisionTransformer(**model_args) + load_state_dict (strict)
        vt = timm.models.VisionTransformer(**cfg["model_args"]).eval()
        vt.load_state_dict(weights)
        torch.testing.assert_close(vt.forward_features(x), ours, atol=1e-5, rtol=0)
    assert tuple(timm.data.resolve_data_config({}, model=model)["mean"]) == tuple(mean)


# ------------------------------------------------------------------------------------------ Hugging Face
@pytest.mark.parametrize("norm_pix,in_chans", [(True, 3), (False, 1)])
def test_hf_mae_loss_equals_ours_on_the_same_mask(tmp_path, norm_pix, in_chans):
    transformers = pytest.importorskip("transformers")
    mae = tiny_mae(in_chans=in_chans)
    method = MAE(mae.spec, mask_ratio=0.75, norm_pix_loss=norm_pix)
    method.student.load_state_dict(mae.state_dict())
    method.eval()
    out = export_hf_mae(method.student, tmp_path / "hf", norm_pix_loss=norm_pix, mask_ratio=0.75,
                        mean=(0.5,) * in_chans, std=(0.25,) * in_chans)
    hf = transformers.ViTMAEForPreTraining.from_pretrained(out).eval()
    assert hf.config.norm_pix_loss is norm_pix

    x = torch.randn(4, in_chans, 16, 16)
    noise = torch.rand(4, 16)
    mask = mask_from_noise(noise, 0.75)
    with torch.no_grad():
        pred = method.student(x, mask.ids_keep, mask.ids_restore)
        ours = masked_mse(pred, method.targets(x), mask.mask)
        theirs = hf(pixel_values=x, noise=noise)
    torch.testing.assert_close(theirs.mask, mask.mask)
    torch.testing.assert_close(theirs.logits, pred, atol=1e-5, rtol=0)
    torch.testing.assert_close(theirs.loss, ours, atol=1e-5, rtol=0)


def test_hf_sincos_layout_equals_ours():
    """HF builds ViT-MAE's fixed position embeddings in the MAE layout, the same as ours."""
    transformers = pytest.importorskip("transformers")
    from mimkit.models.vit import sincos_2d

    cfg = transformers.ViTMAEConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                    image_size=16, patch_size=4, decoder_hidden_size=24, decoder_num_hidden_layers=1,
                                    decoder_num_attention_heads=2, decoder_intermediate_size=48)
    decoder = transformers.ViTMAEForPreTraining(cfg).decoder
    if not hasattr(decoder, "initialize_weights"):
        pytest.skip("this transformers version has no ViTMAEDecoder.initialize_weights")
    decoder.initialize_weights(16)
    torch.testing.assert_close(decoder.decoder_pos_embed[0].detach(), sincos_2d(24, 4), atol=1e-6, rtol=0)


def test_hf_vit_features_equal_ours(tmp_path):
    transformers = pytest.importorskip("transformers")
    enc = tiny_mae(in_chans=3).encoder
    out = export_hf_vit(enc, tmp_path / "vit", mean=MEAN3, std=STD3)
    model = transformers.ViTModel.from_pretrained(out, add_pooling_layer=False).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=x).last_hidden_state, enc.forward_features(x), atol=1e-5, rtol=0)
    assert check_export(out, "hf-vit", enc) < 1e-5


@pytest.mark.slow
def test_exports_load_without_mimkit(tmp_path):
    """A fresh interpreter in which ``import mimkit`` fails loads all three folders."""
    pytest.importorskip("transformers")
    mae = tiny_mae(in_chans=1)
    export_timm(mae.encoder, tmp_path / "timm", mean=MEAN1, std=STD1)
    export_hf_vit(mae.encoder, tmp_path / "vit", mean=MEAN1, std=STD1)
    export_hf_mae(mae, tmp_path / "mae", norm_pix_loss=True, mask_ratio=0.75, mean=MEAN1, std=STD1)
    x = torch.randn(2, 1, 16, 16)
    torch.save(x, tmp_path / "x.pt")
    code = f"""
import sys
sys.modules["mimkit"] = None  # any import of mimkit now fails
import torch, timm
from transformers import ViTMAEForPreTraining, ViTModel
d = {str(tmp_path)!r}
x = torch.load(d + "/x.pt")
with torch.no_grad():
    out = {{
        "timm": timm.create_model("local-dir:" + d + "/timm", pretrained=True).eval().forward_features(x),
        "vit": ViTModel.from_pretrained(d + "/vit", add_pooling_layer=False).eval()(pixel_values=x).last_hidden_state,
        "mae": ViTMAEForPreTraining.from_pretrained(d + "/mae").eval().vit.embeddings.position_embeddings,
    }}
torch.save(out, d + "/out.pt")
"""
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, capture_output=True, timeout=120)
    out = torch.load(tmp_path / "out.pt")
    with torch.no_grad():
        ours = mae.encoder.forward_features(x)
    torch.testing.assert_close(out["timm"], ours, atol=1e-5, rtol=0)
    torch.testing.assert_close(out["vit"], ours, atol=1e-5, rtol=0)
    torch.testing.assert_close(out["mae"], mae.encoder.pos_embed.detach())


# ------------------------------------------------------------------------------------------ import
def test_import_official_mae_layout(tmp_path):
    mae = tiny_mae(in_chans=3, embed=192, heads=3, dec=(128, 1, 4))   # widths of the standard head table
    args = argparse.Namespace(model="mae_vit_tiny_patch4", norm_pix_loss=False, mask_ratio=0.6, input_size=16)
    state = {f"module.{k}": v for k, v in official_state(mae).items()}  # saved from a DDP wrapper
    state["head.weight"] = torch.zeros(10, 192)                        # classifier keys are dropped
    path = tmp_path / "checkpoint-799.pth"
    torch.save({"model": state, "optimizer": {"state": {}}, "epoch": 799, "args": args}, path)

    imp = import_checkpoint(path)   # no trust needed: the argparse Namespace is allowed data
    assert imp.source == "official" and imp.entry == "model" and imp.which == "student"
    assert (imp.spec.embed_dim, imp.spec.depth, imp.spec.num_heads, imp.spec.in_chans) == (192, 2, 3, 3)
    assert (imp.spec.img_size, imp.spec.patch_size, imp.spec.mlp_ratio) == (16, 4, 4.0)
    assert imp.decoder_shape == (128, 1, 4)
    assert imp.hints == {"method.norm_pix_loss": False, "method.mask_ratio": 0.6}
    assert any("head.weight" in n for n in imp.notes)
    for k, v in mae.encoder.state_dict().items():
        assert torch.equal(imp.encoder[k], v)
    for k, v in mae.decoder.state_dict().items():
        assert torch.equal(imp.decoder[k], v)

    # -> a mimkit checkpoint whose MAE predicts exactly what the original does
    cfg = build_config(None, ["data.name=cifar10"], imp.config_values())
    ckpt, _ = imported_checkpoint(imp, cfg)
    method = build_method(cfg, 3)
    method.student.load_state_dict(ckpt["student"])
    method.eval()
    assert method.norm_pix_loss is False and method.mask_ratio == 0.6
    x, noise = torch.randn(2, 3, 16, 16), torch.rand(2, 16)
    mask = mask_from_noise(noise, 0.6)
    with torch.no_grad():
        torch.testing.assert_close(method.student(x, mask.ids_keep, mask.ids_restore),
                                   mae(x, mask.ids_keep, mask.ids_restore), atol=1e-6, rtol=0)


@pytest.mark.parametrize("layout", ["model+teacher", "rc-mae code"])
def test_import_rc_mae_and_sdae_layouts_pick_the_right_network(tmp_path, layout):
    student, teacher = tiny_mae(seed=1), tiny_mae(seed=2)
    rc = tmp_path / "rcmae.pth"
    s, t = official_state(student), official_state(teacher)
    if layout == "model+teacher":
        torch.save({"model": s, "teacher": t, "epoch": 1}, rc)
        entries = ("teacher", "model")
    else:  # what the RC-MAE code's save_model_distill writes
        ddp = {f"module.{k}": v for k, v in s.items()}
        torch.save({"student": ddp, "teacher": t, "student_without_ddp": s, "teacher_without_ddp": t,
                    "optimizer": {}, "epoch": 1, "args": argparse.Namespace(model="rc_vit_tiny_patch16")}, rc)
        entries = ("teacher_without_ddp", "student_without_ddp")
    imp = import_checkpoint(rc, num_heads=2, decoder_heads=2)       # width 32: heads given explicitly
    assert imp.which == "teacher" and imp.entry == entries[0]       # RC-MAE: the teacher by default
    assert torch.equal(imp.encoder["blocks.1.attn.qkv.weight"], teacher.encoder.blocks[1].attn.qkv.weight)
    assert torch.equal(imp.decoder["pred.weight"], teacher.decoder.pred.weight)
    imp = import_checkpoint(rc, which="student", num_heads=2, decoder_heads=2)
    assert imp.entry == entries[1]
    assert torch.equal(imp.encoder["blocks.1.attn.qkv.weight"], student.encoder.blocks[1].attn.qkv.weight)

    sd_student = tiny_mae(seed=3, out_dim=32)                        # SdAE: the decoder predicts features
    sd = tmp_path / "sdae.pth"
    torch.save({"model": official_state(sd_student), "model_teacher": teacher.encoder.state_dict()}, sd)
    imp = import_checkpoint(sd, num_heads=2, decoder_heads=2)
    assert imp.which == "student" and imp.entry == "model" and imp.decoder is None
    assert any("feature decoder" in n for n in imp.notes)
    imp = import_checkpoint(sd, which="teacher", num_heads=2)
    assert imp.entry == "model_teacher"
    assert torch.equal(imp.encoder["norm.weight"], teacher.encoder.norm.weight)


def test_import_reports_bad_keys_by_name(tmp_path):
    mae = tiny_mae()
    state = official_state(mae, with_decoder=False)
    state["blocks.0.attn.rel_pos_bias"] = torch.zeros(3)
    del state["blocks.1.mlp.fc2.bias"]
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(MimkitError) as err:
        import_checkpoint(path, num_heads=2)
    assert "blocks.1.mlp.fc2.bias" in str(err.value) and "blocks.0.attn.rel_pos_bias" in str(err.value)
    good = tmp_path / "good.pth"
    torch.save(official_state(mae, with_decoder=False), good)
    with pytest.raises(MimkitError, match="model.num_heads"):   # width 32 is not in the head table
        import_checkpoint(good)
    with pytest.raises(MimkitError, match="no teacher"):
        import_checkpoint(good, which="teacher")


def test_import_refuses_a_pickle_that_runs_code(tmp_path):
    marker = tmp_path / "side_effect"

    class Payload:
        def __reduce__(self):
            return os.mkdir, (str(marker),)

    path = tmp_path / "evil.pth"
    torch.save({"model": official_state(tiny_mae(), with_decoder=False), "args": Payload()}, path)
    with pytest.raises(MimkitError) as err:
        import_checkpoint(path, num_heads=2)
    assert "--trust-checkpoint" in str(err.value) and "mkdir" in str(err.value)
    assert not marker.exists()


def test_import_round_trips_our_own_exports(tmp_path):
    mae = tiny_mae(in_chans=1)
    export_timm(mae.encoder, tmp_path / "timm", mean=MEAN1, std=STD1)
    export_hf_mae(mae, tmp_path / "hf", norm_pix_loss=True, mask_ratio=0.75, mean=MEAN1, std=STD1)
    for folder, source in (("timm", "timm"), ("hf", "hf vit_mae")):
        imp = import_checkpoint(tmp_path / folder)
        assert imp.source == source and imp.spec == mae.encoder.spec
        assert all(torch.equal(imp.encoder[k], v) for k, v in mae.encoder.state_dict().items())
    assert all(torch.equal(imp.decoder[k], v) for k, v in mae.decoder.state_dict().items())
    assert imp.decoder_shape == (24, 1, 2)
    imp = import_checkpoint(tmp_path / "timm" / "model.safetensors")   # the file alone, config.json beside it
    assert imp.source == "timm"


# ------------------------------------------------------------------------------------------ commands
def test_export_commands_end_to_end(tmp_path, run_cli, capsys):
    pytest.importorskip("transformers")
    ckpt = write_tiny_checkpoint(tmp_path / "rc.pt", "rc-mae")
    for fmt in ("timm", "hf", "hf-vit"):
        assert run_cli(["export", "--format", fmt, "--checkpoint", str(ckpt), "--out", str(tmp_path / fmt),
                        "--check"]) == 0
    text = capsys.readouterr().out
    assert "exported the teacher encoder as timm" in text and "0.00e+00" in text
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "vit_mae"

    # the HF teacher MAE comes back through `mimkit import` as a checkpoint every eval command reads
    out = tmp_path / "imported.pt"
    assert run_cli(["import", "--checkpoint", str(tmp_path / "hf"), "--out", str(out),
                    "--set", "data.max_train=256", "--set", "data.max_test=128"]) == 0
    from mimkit.api import load_for_eval

    original, imported = load_for_eval(ckpt, which="teacher"), load_for_eval(out)
    assert imported.cfg.method.name == "mae" and load_checkpoint(out)["extra"]["import_source"] == "hf vit_mae"
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(imported.encoder.forward_features(x), original.encoder.forward_features(x),
                                   atol=1e-6, rtol=0)
    assert run_cli(["eval", "knn", "--checkpoint", str(out), "--output", str(tmp_path / "knn"), "--no-progress"]) == 0
    assert (tmp_path / "knn" / "eval_knn.json").is_file()


def test_command_errors_are_one_line(tmp_path, run_cli, capsys):
    sd = write_tiny_checkpoint(tmp_path / "sdae.pt", "sdae")
    assert run_cli(["export", "--format", "hf", "--checkpoint", str(sd), "--out", str(tmp_path / "x")]) == 2
    assert "hf-vit" in capsys.readouterr().err

    mae = tiny_mae(in_chans=3)                       # 3-channel weights, the demo data is grey
    path = tmp_path / "rgb.pth"
    torch.save({"model": official_state(mae)}, path)
    argv = ["import", "--checkpoint", str(path), "--out", str(tmp_path / "o.pt"), "--set", "model.num_heads=2",
            "--set", "model.decoder_heads=2"]
    assert run_cli(argv) == 2
    assert "data.channels=3" in capsys.readouterr().err
    assert run_cli([*argv, "--set", "model.embed_dim=64"]) == 2
    assert "model.embed_dim" in capsys.readouterr().err
    assert run_cli([*argv, "--set", "data.channels=3"]) == 0
    assert not (tmp_path / "o.pt.tmp").exists() and (tmp_path / "o.pt").is_file()

    assert run_cli(["import", "--checkpoint", str(sd), "--out", str(tmp_path / "again.pt")]) == 2
    assert "already a mimkit checkpoint" in capsys.readouterr().err

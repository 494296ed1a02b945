import pytest

from mimkit.config import build_config, config_from_dict, preset_names
from mimkit.errors import MimkitError


def test_presets_resolve():
    assert {"demo", "cifar10-vit-tiny", "in1k-vit-base-mae"} <= set(preset_names())
    for name in preset_names("pretrain"):
        cfg = build_config(name)
        assert cfg.model.img_size % cfg.model.patch_size == 0


def test_paper_recipe_values():
    cfg = build_config("in1k-vit-base-mae")
    assert (cfg.model.name, cfg.model.patch_size, cfg.model.img_size) == ("vit_base", 16, 224)
    assert cfg.train.blr == 1.5e-4 and cfg.train.warmup_epochs == 40 and cfg.train.weight_decay == 0.05
    assert cfg.train.betas == [0.9, 0.95] and cfg.method.mask_ratio == 0.75 and cfg.method.norm_pix_loss
    assert cfg.train.batch_size * cfg.train.accum_steps * 8 == 4096


def test_overrides_are_typed_and_round_trip():
    cfg = build_config("demo", ["train.epochs=3", "train.blr=1e-3", "train.betas=[0.9,0.99]", "data.path=null",
                                "train.deterministic=true"])
    assert cfg.train.epochs == 3 and cfg.train.blr == 1e-3 and cfg.train.betas == [0.9, 0.99]
    assert cfg.train.deterministic is True
    assert config_from_dict(cfg.to_dict()) == cfg


def test_method_defaults_are_filled():
    assert build_config("demo", ["method.name=rc-mae"]).method.momentum == 0.996
    sd = build_config("demo", ["method.name=sdae"]).method
    assert (sd.momentum, sd.momentum_final, sd.ema_unit) == (0.96, 0.99, "epoch")


@pytest.mark.parametrize("item,msg", [
    ("train.lr_scale=2", "unknown config key 'train.lr_scale'"),
    ("epochs=2", "unknown config key 'epochs'"),
    ("train.epochs=0", "train.epochs must be >= 1"),
    ("eval.pool=max", "accepted: cls, mean"),
    ("train.deterministic=maybe", "true or false"),
])
def test_bad_overrides(item, msg):
    with pytest.raises(MimkitError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        build_config("demo", [item])


def test_teacher_method_recipes():
    rc = build_config("in1k-vit-base-rc-mae")
    assert rc.method.name == "rc-mae" and rc.method.momentum == 0.996 and rc.method.mask_mode == "same"
    assert rc.train.epochs == 1600 and rc.train.blr == 1.5e-4 and rc.train.warmup_epochs == 40
    assert rc.train.batch_size * rc.train.accum_steps * 8 == 4096
    small, large = build_config("in1k-vit-small-rc-mae"), build_config("in1k-vit-large-rc-mae")
    assert (small.model.name, small.model.decoder_dim, small.model.decoder_depth) == ("vit_small", 256, 4)
    assert (large.model.name, large.model.decoder_dim, large.model.decoder_depth) == ("vit_large", 512, 8)
    sd = build_config("in1k-vit-base-sdae")
    assert sd.method.name == "sdae" and sd.method.folds == 3 and sd.model.drop_path == 0.25
    assert (sd.method.momentum, sd.method.momentum_final, sd.method.ema_unit) == (0.96, 0.99, "epoch")
    assert sd.train.epochs == 300 and sd.train.warmup_epochs == 60
    assert sd.train.blr * sd.train.batch_size * 8 / 256 == pytest.approx(8e-4)

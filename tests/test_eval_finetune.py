"""Fine-tuning (rc-mae.txt Table 10): layer-decay groups, mixup targets, exact resume, the CLI and its errors."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import sets
from mimkit import cli
from mimkit.config.finetune import build_finetune_config
from mimkit.finetune import Init, finetune
from mimkit.models.classifier import ViTClassifier, layer_decay_groups
from mimkit.finetune.trainer import build_mixup
from mimkit.models.vit import EncoderSpec, ViTEncoder

if "mimkit.commands.eval" not in cli.COMMAND_MODULES:
    cli.COMMAND_MODULES.append("mimkit.commands.eval")

TINY_FT = ["train.epochs=3", "train.batch_size=32", "train.warmup_epochs=1", "train.log_every=2", "train.blr=2e-3",
           "data.max_train=128", "data.max_test=64", "eval.batch_size=64", "aug.crop_scale=[0.5,1]"]


def ft_sets(*items: str) -> list[str]:
    return [x for item in (*TINY_FT, *items) for x in ("--set", item)]


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A tiny MAE pre-training run on the demo data (one epoch)."""
    run = tmp_path_factory.mktemp("mae") / "run"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    assert cli.main(["pretrain", "--output", str(run), "--no-progress", *sets("train.epochs=1")]) == 0
    torch.set_num_threads(before)
    return run / "checkpoints" / "last.pt"


def test_layer_decay_scales_follow_the_layer_index():
    enc = ViTEncoder(EncoderSpec(img_size=16, patch_size=4, in_chans=3, embed_dim=32, depth=3, num_heads=2))
    model = ViTClassifier(enc, 10)
    names = {id(p): n for n, p in model.named_parameters()}
    scale, decay = {}, {}
    for group in layer_decay_groups(model, weight_decay=0.05, layer_decay=0.5):
        for p in group["params"]:
            scale[names[id(p)]], decay[names[id(p)]] = group["lr_scale"], group["weight_decay"]
    L = 3  # scale = decay^(L + 1 - layer): stem layer 0, block i layer i + 1, head L + 1
    for name in ("encoder.cls_token", "encoder.pos_embed", "encoder.patch_embed.proj.weight"):
        assert scale[name] == pytest.approx(0.5 ** (L + 1)), name
    for i in range(L):
        assert scale[f"encoder.blocks.{i}.attn.qkv.weight"] == pytest.approx(0.5 ** (L - i))
    for name in ("head.weight", "head.bias", "fc_norm.weight"):
        assert scale[name] == 1.0
    assert decay["head.weight"] == 0.05 and decay["encoder.blocks.0.mlp.fc1.weight"] == 0.05
    for name in ("head.bias", "fc_norm.weight", "encoder.cls_token", "encoder.pos_embed", "encoder.blocks.1.norm1.weight"):
        assert decay[name] == 0.0, name
    assert "encoder.norm.weight" not in scale  # unused by global average pooling
    assert model.head.weight.std() < 1e-4     # head init std 2e-5


def test_gap_head_pools_patch_tokens_before_the_final_norm():
    enc = ViTEncoder(EncoderSpec(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2)).eval()
    model = ViTClassifier(enc, 5).eval()
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        tokens = enc.patch_tokens(x)
        seq = torch.cat([(enc.cls_token + enc.pos_embed[:, :1]).expand(3, -1, -1), tokens], 1)
        want = model.head(model.fc_norm(enc.blocks(seq)[:, 1:].mean(1)))
        torch.testing.assert_close(model(x), want)


def test_mixup_cutmix_targets_sum_to_one():
    cfg = build_finetune_config(None, ["aug.mixup=0.8", "aug.cutmix=1.0", "aug.label_smoothing=0.1"])
    mix = build_mixup(cfg, 10)
    x, y = torch.rand(8, 3, 16, 16), torch.arange(8) % 10
    for seed in range(6):  # both mixup and cutmix batches
        np.random.seed(seed)
        mixed, target = mix(x.clone(), y)
        assert target.shape == (8, 10) and (target >= 0).all()
        torch.testing.assert_close(target.sum(1), torch.ones(8))
        assert not torch.equal(mixed, x)
    cfg = build_finetune_config(None, ["aug.mixup=0", "aug.cutmix=0"])
    assert build_mixup(cfg, 10) is None
    with pytest.raises(Exception, match="even"):
        build_finetune_config(None, ["train.batch_size=33"])


def test_resumed_finetuning_equals_uninterrupted(tmp_path, pretrained):
    ckpt = torch.load(pretrained, weights_only=True)
    cfg = build_finetune_config(None, TINY_FT + ["train.deterministic=true", "train.log_every=1"], ckpt["config"])
    init = Init(str(pretrained), None, False)
    full = finetune(cfg, tmp_path / "full", init=init, show_progress=False, echo=False)

    class Stop(Exception):
        pass

    def stop_after_first(done: int) -> None:
        if done == 1:
            raise Stop

    with pytest.raises(Stop):
        finetune(cfg, tmp_path / "cut", init=init, show_progress=False, echo=False, after_epoch=stop_after_first)
    with (tmp_path / "cut" / "metrics.jsonl").open("a") as f:  # a line logged after the checkpoint by the "killed" run
        f.write(json.dumps({"step": 5, "epoch": 1, "loss": 9.0}) + "\n")
    resumed = finetune(None, tmp_path / "cut", resume=True, show_progress=False, echo=False)
    a = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    b = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    strip = lambda lines: [{k: v for k, v in json.loads(x).items() if k != "imgs_per_s"} for x in lines]  # noqa: E731
    assert strip(a) == strip(b)
    assert full["history"] == resumed["history"] and full["best_epoch"] == resumed["best_epoch"]
    wa = torch.load(tmp_path / "full" / "checkpoints" / "last.pt", weights_only=True)["student"]
    wb = torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=True)["student"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_cli_finetune_linprobe_robustness(tmp_path, pretrained, capsys):
    run_dir = pretrained.parent.parent
    # linear probe, fast path: eval_linprobe.json next to the checkpoint's run
    assert cli.main(["eval", "linprobe", "--checkpoint", str(pretrained), "--no-progress",
                     "--set", "aug.augment=false", "--set", "train.epochs=3", "--set", "train.batch_size=128",
                     "--set", "train.blr=2.0", "--set", "train.warmup_epochs=1"]) == 0
    res = json.loads((run_dir / "eval_linprobe.json").read_text())
    assert 0.0 <= res["linprobe_top1"] <= 1.0 and res["which"] == "student" and len(res["history"]) == 3
    assert "linear probe top-1" in capsys.readouterr().out
    # fine-tuning from the checkpoint, and the from-scratch baseline with the same shapes
    ft, scratch = tmp_path / "ft", tmp_path / "scratch"
    assert cli.main(["finetune", "--checkpoint", str(pretrained), "--output", str(ft), "--no-progress",
                     *ft_sets("train.epochs=2")]) == 0
    assert cli.main(["finetune", "--checkpoint", str(pretrained), "--from-scratch", "--output", str(scratch),
                     "--no-progress", *ft_sets("train.epochs=1")]) == 0
    summary = json.loads((ft / "eval_finetune.json").read_text())
    assert summary["init"]["which"] == "student" and not summary["init"]["from_scratch"] and len(summary["history"]) == 2
    assert json.loads((scratch / "eval_finetune.json").read_text())["init"]["from_scratch"]
    assert (ft / "checkpoints" / "best.pt").is_file() and (ft / "config.yaml").is_file()
    # robustness of the fine-tuned classifier: its clean accuracy is the fine-tuning run's best top-1
    best = ["eval", "robustness", "--checkpoint", str(ft / "checkpoints" / "best.pt"), "--no-progress"]
    assert cli.main([*best, "--corruptions", "contrast", "--severities", "5"]) == 0
    rob = json.loads((ft / "eval_robustness.json").read_text())
    assert rob["num_images"] == 64 and rob["clean_top1"] == pytest.approx(summary["best_top1"])
    # a subset, then against a baseline (itself: mCE 100)
    args = [*best, "--max-images", "40", "--corruptions", "gaussian_noise,contrast,frost", "--severities", "1,5"]
    assert cli.main(args) == 0
    rob = json.loads((ft / "eval_robustness.json").read_text())
    assert rob["num_images"] == 40 and set(rob["errors"]) == {"gaussian_noise", "contrast", "frost"}
    base = tmp_path / "base.json"
    base.write_text((ft / "eval_robustness.json").read_text())
    assert cli.main([*args, "--baseline", str(base), "--output", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "eval_robustness.json").read_text())
    assert again["errors"] == rob["errors"]  # same seed: the same corrupted images
    if all(v is not None for v in again["ce_normalized"].values()):
        assert again["mCE"] == pytest.approx(100.0)


def test_bad_input_is_one_line_and_status_2(tmp_path, pretrained, capsys):
    def fails(argv, match):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("mimkit: error:") and match in err and "\n" not in err, err

    fails(["eval", "linprobe", "--checkpoint", str(pretrained), "--which", "teacher"], "has no teacher")
    fails(["eval", "linprobe", "--checkpoint", str(pretrained), "--set", "model.depth=3"], "depth=2")
    fails(["finetune", "--checkpoint", str(pretrained), "--config", "cifar10-vit-tiny", "--output", str(tmp_path / "x")],
          "pre-training config")
    fails(["finetune", "--output", str(tmp_path / "y")], "--from-scratch")
    out = tmp_path / "w"
    fails(["finetune", "--checkpoint", str(pretrained), "--which", "teacher", "--output", str(out)], "has no teacher")
    assert not out.exists() or not any(out.iterdir())  # nothing written: the same --output works next time
    fails(["eval", "robustness", "--checkpoint", str(pretrained)], "pre-training checkpoint")
    fails(["finetune", "--checkpoint", str(pretrained), "--output", str(tmp_path / "z"), "--set", "aug.remode=zero"],
          "aug.remode")
    loose = tmp_path / "unlabelled"
    loose.mkdir()
    from PIL import Image
    for i in range(4):
        Image.new("L", (16, 16), color=i * 40).save(loose / f"{i}.png")
    fails(["eval", "linprobe", "--checkpoint", str(pretrained), "--set", "data.name=imagefolder",
           "--set", f"data.path={loose}", "--set", "data.channels=1"], "labels")


def test_finetune_presets_are_table_10():
    from mimkit.config import preset_names

    names = [n for n in preset_names() if n.startswith("finetune-")]
    assert {"finetune-vit-s", "finetune-vit-b", "finetune-vit-l", "finetune-cifar10"} <= set(names)
    for name in names:
        cfg = build_finetune_config(name)
        assert cfg.model.img_size % cfg.model.patch_size == 0
        assert cfg.train.betas == [0.9, 0.999] and cfg.train.weight_decay == 0.05
        assert cfg.aug.rand_augment == "rand-m9-mstd0.5-inc1" and cfg.aug.mixup == 0.8 and cfg.aug.cutmix == 1.0
        assert cfg.aug.label_smoothing == 0.1 and cfg.aug.reprob == 0.25 and cfg.head.global_pool == "avg"
    table = {"finetune-vit-s": ("vit_small", 0.75, 0.1, 300), "finetune-vit-b": ("vit_base", 0.65, 0.1, 100),
             "finetune-vit-l": ("vit_large", 0.65, 0.2, 100)}
    for name, (model, decay, drop_path, epochs) in table.items():
        cfg = build_finetune_config(name)
        assert (cfg.model.name, cfg.train.layer_decay, cfg.model.drop_path, cfg.train.epochs) == (model, decay, drop_path,
                                                                                                   epochs)
        assert cfg.train.blr == 5e-4 and cfg.train.warmup_epochs == 5
        assert cfg.train.batch_size * cfg.train.accum_steps == 1024


def test_finetuning_resumes_exactly_from_a_step_checkpoint_inside_an_epoch(tmp_path, pretrained, monkeypatch):
    """``train.ckpt_every_steps``: a run stopped right after the mid-epoch checkpoint of step 6 (epoch 2, micro-batch
    2 of 4) and resumed gives the uninterrupted run's metrics lines and weights (mixup, random erasing, drop path:
    the RNG states travel in the checkpoint; the batches are functions of (seed, epoch, index))."""
    from mimkit.train.engine import Engine

    ckpt = torch.load(pretrained, weights_only=True)
    cfg = build_finetune_config(None, TINY_FT + ["train.deterministic=true", "train.log_every=1",
                                                 "train.ckpt_every_steps=3", "model.drop_path=0.1"], ckpt["config"])
    init = Init(str(pretrained), None, False)
    full = finetune(cfg, tmp_path / "full", init=init, show_progress=False, echo=False)

    class Stop(Exception):
        pass

    original = Engine._step_checkpoint

    def stop_after_step_6(self, epoch, next_micro, step, *rest):
        original(self, epoch, next_micro, step, *rest)
        if step == 6:
            raise Stop

    monkeypatch.setattr(Engine, "_step_checkpoint", stop_after_step_6)
    with pytest.raises(Stop):
        finetune(cfg, tmp_path / "cut", init=init, show_progress=False, echo=False)
    monkeypatch.setattr(Engine, "_step_checkpoint", original)
    state = torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=True)
    assert (state["epoch"], state["global_step"], state["epoch_micro"]) == (1, 6, 2)
    with (tmp_path / "cut" / "metrics.jsonl").open("a") as f:  # a line the "killed" run logged after the checkpoint
        f.write(json.dumps({"step": 7, "epoch": 1, "loss": 9.0}) + "\n")
    resumed = finetune(None, tmp_path / "cut", resume=True, show_progress=False, echo=False)
    assert "at epoch 1 (micro-batch 2 of epoch 2), step 6" in (tmp_path / "cut" / "train.log").read_text()
    strip = lambda path: [{k: v for k, v in json.loads(x).items() if k != "imgs_per_s"}  # noqa: E731
                          for x in (path / "metrics.jsonl").read_text().splitlines()]
    assert strip(tmp_path / "full") == strip(tmp_path / "cut")
    assert full["history"] == resumed["history"]
    wa = torch.load(tmp_path / "full" / "checkpoints" / "last.pt", weights_only=True)["student"]
    wb = torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=True)["student"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)

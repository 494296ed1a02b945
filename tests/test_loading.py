"""The one checkpoint reader (open_checkpoint): every kind of checkpoint, every command, uniform errors;
evaluation of the encoder at initialisation (--random-init)."""

import json
from pathlib import Path

import pytest
import torch

from helpers import sets
from mimkit import cli
from mimkit.config import config_from_dict
from mimkit.eval.knn import evaluate_knn
from mimkit.interop.loading import open_checkpoint, random_init_encoder
from mimkit.methods import build_method
from mimkit.runtime import datamodule_from_config

for _m in ("mimkit.commands.eval", "mimkit.commands.interop"):
    if _m not in cli.COMMAND_MODULES:
        cli.COMMAND_MODULES.append(_m)

FT = ["train.epochs=1", "train.batch_size=32", "train.warmup_epochs=0", "train.log_every=2", "train.blr=2e-3",
      "data.max_train=128", "data.max_test=64", "eval.batch_size=64", "aug.crop_scale=[0.5,1]"]


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A tiny MAE pre-training run (1 epoch, kNN at initialisation measured) and a 1-epoch fine-tune of it."""
    root = tmp_path_factory.mktemp("loading")
    torch.set_num_threads(1)
    pre = root / "pre"
    assert cli.main(["pretrain", "--output", str(pre), "--no-progress",
                     *sets("train.epochs=1", "eval.knn_init=true", "eval.pool=mean")]) == 0
    ckpt = pre / "checkpoints" / "last.pt"
    ft = root / "ft"
    assert cli.main(["finetune", "--checkpoint", str(ckpt), "--output", str(ft), "--no-progress",
                     *[x for item in FT for x in ("--set", item)]]) == 0
    return {"pre": ckpt, "ft": ft / "checkpoints" / "last.pt", "root": root}


def _one_line(capsys, argv, *needles):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("mimkit: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)
    return err


def test_random_init_knn_equals_the_study_initialisation_reference(runs, tmp_path):
    ckpt = runs["pre"]
    out = tmp_path / "e"
    assert cli.main(["eval", "knn", "--checkpoint", str(ckpt), "--random-init", "3", "--output", str(out),
                     "--no-progress"]) == 0
    res = json.loads((out / "eval_knn-init3.json").read_text())
    # the study's recipe (benchmarks/cifar10_study.py _frozen --random-init): seed, build from the saved config
    saved = torch.load(ckpt, weights_only=True)
    cfg = config_from_dict(saved["config"])
    torch.manual_seed(3)
    study = build_method(cfg, 1).encoder("student").eval()
    lib = random_init_encoder(cfg, 1, 3)
    assert all(torch.equal(a, b) for a, b in zip(study.state_dict().values(), lib.state_dict().values()))
    ref = evaluate_knn(study, datamodule_from_config(cfg), device=torch.device("cpu"), pool=cfg.eval.pool,
                       k=cfg.eval.knn_k, temperature=cfg.eval.knn_t)
    assert res["knn_top1"] == pytest.approx(ref["knn_top1"], abs=1e-6)
    assert res["which"] == "init" and res["random_init_seed"] == 3 and res["pool"] == "mean"
    # without a seed: the run's train.seed, i.e. the weights the run started from (its own kNN at initialisation)
    assert cli.main(["eval", "knn", "--checkpoint", str(ckpt), "--random-init", "--output", str(out),
                     "--no-progress"]) == 0
    at_init = json.loads((ckpt.parent.parent / "summary.json").read_text())["knn_top1_init"]
    assert json.loads((out / "eval_knn-init0.json").read_text())["knn_top1"] == pytest.approx(at_init, abs=1e-6)
    # the trained encoder's result has its own file; every result is in the history
    assert cli.main(["eval", "knn", "--checkpoint", str(ckpt), "--output", str(out), "--no-progress"]) == 0
    trained = json.loads((out / "eval_knn.json").read_text())
    assert trained["which"] == "student" and trained["checkpoint_epoch"] == 1
    history = [json.loads(line) for line in (out / "eval_history.jsonl").read_text().splitlines()]
    assert [h["file"] for h in history] == ["eval_knn-init3.json", "eval_knn-init0.json", "eval_knn.json"]


def test_random_init_linear_probe(runs, tmp_path):
    out = tmp_path / "lp"
    args = ["eval", "linprobe", "--checkpoint", str(runs["pre"]), "--output", str(out), "--no-progress",
            "--set", "train.epochs=2", "--set", "train.warmup_epochs=0"]
    assert cli.main([*args, "--random-init", "0"]) == 0
    assert cli.main(args) == 0
    init = json.loads((out / "eval_linprobe-init0.json").read_text())
    trained = json.loads((out / "eval_linprobe.json").read_text())
    assert init["which"] == "init" and trained["which"] == "student"
    # one pooling rule for frozen evaluations: the run's eval.pool (mean here), not the probe's own default (cls)
    assert init["pool"] == trained["pool"] == "mean"


def test_settings_that_change_the_measurement_get_their_own_file(runs, tmp_path):
    out = tmp_path / "s"
    base = ["eval", "knn", "--checkpoint", str(runs["pre"]), "--output", str(out), "--no-progress"]
    assert cli.main(base) == 0
    assert cli.main([*base, "--set", "data.max_test=100"]) == 0
    full = json.loads((out / "eval_knn.json").read_text())
    cut = json.loads((out / "eval_knn-max_test100.json").read_text())
    assert full["max_test"] == 256 and cut["max_test"] == 100 and cut["overrides"] == ["data.max_test=100"]


def test_every_kind_reads_into_one_typed_object(runs, tmp_path):
    pre = open_checkpoint(runs["pre"])
    assert pre.kind == "pretrain" and pre.method_name == "mae" and pre.epoch == 1 and pre.in_chans == 1
    assert pre.encoder() is pre.method.student.encoder
    ft = open_checkpoint(runs["ft"])
    assert ft.kind == "finetune" and ft.method is None and ft.classifier is not None
    assert ft.config.eval.pool == "mean" and ft.finetune_config().train.layer_decay > 0  # head avg -> mean pool
    assert ft.encoder() is ft.classifier.encoder
    with pytest.raises(Exception, match="one encoder"):
        ft.encoder("teacher")
    # an export folder reads back with the same encoder
    exp = tmp_path / "timm"
    assert cli.main(["export", "--format", "timm", "--checkpoint", str(runs["pre"]), "--out", str(exp)]) == 0
    back = open_checkpoint(exp, overrides=["data.channels=1"])
    assert back.kind == "export"
    x = torch.randn(2, 1, 16, 16)
    assert torch.allclose(back.encoder().forward_features(x), pre.encoder().forward_features(x), atol=1e-5)
    # ... and is itself a checkpoint for every command, e.g. exported again (model card included)
    again = tmp_path / "again"
    assert cli.main(["export", "--format", "hf-vit", "--checkpoint", str(exp), "--out", str(again),
                     "--set", "data.channels=1"]) == 0
    assert (again / "model.safetensors").is_file() and (again / "README.md").is_file()


def test_fine_tuned_checkpoint_evaluates_exports_and_draws(runs, tmp_path, capsys):
    ft = runs["ft"]
    out = tmp_path / "ftk"
    assert cli.main(["eval", "knn", "--checkpoint", str(ft), "--output", str(out), "--no-progress"]) == 0
    res = json.loads((out / "eval_knn.json").read_text())
    loaded = open_checkpoint(ft)
    ref = evaluate_knn(loaded.classifier.encoder, loaded.datamodule(), device=torch.device("cpu"), pool="mean")
    assert res["knn_top1"] == pytest.approx(ref["knn_top1"]) and res["checkpoint_kind"] == "finetune"
    # timm export with its head: timm predicts the same logits
    exp = tmp_path / "timm-ft"
    assert cli.main(["export", "--format", "timm", "--checkpoint", str(ft), "--out", str(exp), "--check"]) == 0
    assert "classifier" in capsys.readouterr().out
    import timm

    model = timm.create_model(f"local-dir:{exp.resolve()}", pretrained=True).eval()
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model(x), loaded.classifier(x), atol=1e-5)
    assert cli.main(["visualize", "attention", "--checkpoint", str(ft), "--out", str(tmp_path / "a.png"),
                     "--num-images", "2"]) == 0
    _one_line(capsys, ["visualize", "reconstruction", "--checkpoint", str(ft), "--out", str(tmp_path / "r.png")],
              "fine-tuned classifier", "no decoder")
    _one_line(capsys, ["export", "--format", "hf", "--checkpoint", str(ft), "--out", str(tmp_path / "hf")],
              "fine-tuned classifier", "hf-vit")


@pytest.mark.parametrize("command", [
    ["eval", "knn"], ["eval", "linprobe"], ["eval", "robustness"],
    ["export", "--format", "timm", "--out", "OUT"], ["visualize", "attention", "--out", "OUT.png"],
    ["finetune", "--output", "OUT"],
])
def test_bad_checkpoint_paths_are_one_line_and_exit_2(tmp_path, capsys, command):
    folder = tmp_path / "a-folder"
    folder.mkdir()
    text = tmp_path / "notes.pt"
    text.write_text("hello, this is a text file\n")
    good = tmp_path / "good.pt"
    torch.save({"format": "mimkit-checkpoint-v1", "w": torch.zeros(4096)}, good)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    argv = [a.replace("OUT", str(tmp_path / "out")) for a in command]
    _one_line(capsys, [*argv, "--checkpoint", str(folder)], str(folder), "is a folder")
    _one_line(capsys, [*argv, "--checkpoint", str(text)], str(text), "cannot be read")
    err = _one_line(capsys, [*argv, "--checkpoint", str(cut)], str(cut), "cannot be read")
    assert err.rstrip().endswith(")")  # the reason is whole, not cut mid-sentence
    _one_line(capsys, [*argv, "--checkpoint", str(tmp_path / "missing.pt")], "does not exist")

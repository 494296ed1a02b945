"""Frozen features and the linear probe (rc-mae.txt Table 11)."""

import pytest
import torch

from mimkit.data.memory import InMemoryDataModule
from mimkit.errors import MimkitError
from mimkit.data.sources import ImageSplit, InMemoryData
from mimkit.eval.knn import extract_features
from mimkit.config.linprobe import build_linprobe_config
from mimkit.eval.linprobe import LinearProbe, auto_blr, lars_for_probe, run_linprobe
from mimkit.models.vit import EncoderSpec, ViTEncoder


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def separable(n_per_class: int, seed: int) -> ImageSplit:
    """Four classes told apart by brightness and stripe direction, with pixel noise."""
    g = torch.Generator().manual_seed(seed)
    images, labels = [], []
    rows = torch.arange(16).view(16, 1).expand(16, 16)
    for k in range(4):
        base = 60.0 + 120.0 * (k % 2) + 40.0 * torch.sin((rows if k < 2 else rows.T).float() * 1.3)
        noise = 12 * torch.randn((n_per_class, 1, 16, 16), generator=g)
        images.append((base + noise).clamp(0, 255).to(torch.uint8))
        labels.append(torch.full((n_per_class,), k))
    return ImageSplit(torch.cat(images), torch.cat(labels))


@pytest.fixture
def data() -> InMemoryDataModule:
    d = InMemoryData(separable(64, 0), separable(32, 1), ["a", "b", "c", "d"], (0.5,), (0.25,))
    return InMemoryDataModule(d, 16, name="synthetic")


def encoder() -> ViTEncoder:
    torch.manual_seed(0)
    return ViTEncoder(EncoderSpec(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2,
                                  drop_path=0.2))


def test_features_are_identical_across_calls_and_unmasked(data):
    enc = encoder().train()  # drop path on: extraction must switch it off
    a, la = extract_features(enc, data.eval_batches("test", 50, "cpu"), "cls")
    b, lb = extract_features(enc, data.eval_batches("test", 32, "cpu"), "cls")
    assert enc.training  # mode restored
    assert torch.equal(la, lb) and a.shape == (128, 32)
    torch.testing.assert_close(a, b)
    m, _ = extract_features(enc, data.eval_batches("test", 50, "cpu"), "mean")
    with torch.no_grad():
        tokens = enc.eval().forward_features(next(iter(data.eval_batches("test", 4, "cpu")))[0])
    assert tokens.shape[1] == 1 + 16  # every patch, no masking
    torch.testing.assert_close(m[:4], tokens[:, 1:].mean(1))


def test_probe_learns_a_separable_problem_and_the_encoder_stays_frozen(data):
    enc = encoder()
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    cfg = build_linprobe_config(None, ["aug.augment=false", "train.epochs=30", "train.batch_size=64",
                                       "train.warmup_epochs=2", "train.blr=4.0"])
    res = run_linprobe(enc, data, cfg, device=torch.device("cpu"))
    assert res["linprobe_top1"] >= 0.95, res["history"][-3:]
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())
    assert not any(p.requires_grad for p in enc.parameters())
    # the augmented (paper) path runs through the frozen encoder every epoch
    cfg = build_linprobe_config(None, ["aug.augment=true", "train.epochs=2", "train.batch_size=64",
                                       "train.warmup_epochs=0", "eval.batch_size=24", "aug.crop_scale=[0.5,1]"])
    res = run_linprobe(enc, data, cfg, device=torch.device("cpu"))
    assert len(res["history"]) == 2 and 0 <= res["linprobe_top1"] <= 1
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())


def test_precomputed_features_give_the_same_probe_as_extracting_them(data):
    enc = encoder()
    cfg = build_linprobe_config(None, ["train.epochs=5", "train.batch_size=64", "train.warmup_epochs=1",
                                       "train.blr=4.0", "eval.pool=mean"])
    ref = run_linprobe(enc, data, cfg, device=torch.device("cpu"))
    train = extract_features(enc, data.eval_batches("train", 50, "cpu"), "mean")
    test = extract_features(enc, data.eval_batches("test", 50, "cpu"), "mean")
    res = run_linprobe(enc, data, cfg, device=torch.device("cpu"), features=(*train, *test))
    assert [h["test_top1"] for h in res["history"]] == [h["test_top1"] for h in ref["history"]]
    assert res["linprobe_top1"] == ref["linprobe_top1"] and res["test_images"] == 128
    # features of another encoder change the result: they are really used, not re-extracted
    other = extract_features(ViTEncoder(EncoderSpec(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=2,
                                                    num_heads=2)), data.eval_batches("train", 50, "cpu"), "mean")
    res2 = run_linprobe(enc, data, cfg, device=torch.device("cpu"), features=(*other, *test))
    assert [h["train_loss"] for h in res2["history"]] != [h["train_loss"] for h in ref["history"]]
    aug = build_linprobe_config(None, ["aug.augment=true"])
    with pytest.raises(MimkitError, match="aug.augment=true"):
        run_linprobe(enc, data, aug, device=torch.device("cpu"), features=(*train, *test))


def test_probe_head_and_lars_groups():
    probe = LinearProbe(8, 3)
    assert not probe.bn.affine and probe.bn.eps == 1e-6 and probe.fc.bias.abs().sum() == 0
    opt = lars_for_probe(probe, 0.1, 0.0, 0.9)
    weight, bias = opt.param_groups
    assert weight["always_adapt"] and not bias["always_adapt"] and bias["weight_decay"] == 0.0


def test_default_blr_is_table_11_rescaled_to_the_data_set():
    assert auto_blr(1_281_167) == pytest.approx(0.1)       # ImageNet-1k: the paper's value
    assert auto_blr(10_000) == pytest.approx(12.8116, rel=1e-4)
    assert auto_blr(100) == 32.0                           # capped
    cfg = build_linprobe_config(None)
    assert cfg.train.blr is None and cfg.train.weight_decay == 0.0 and cfg.train.warmup_epochs == 10
    assert cfg.train.epochs == 90 and cfg.eval.pool == "cls" and not cfg.aug.augment


def test_labelled_batches_are_reproducible_and_independent_of_chunking(data):
    from mimkit.eval.labelled import LabelledBatches, train_transform

    tf = train_transform(16, data.mean, crop_scale=(0.3, 1.0), rand_augment="rand-m9-mstd0.5-inc1")
    batches = LabelledBatches(data, tf)
    whole = list(batches.epoch(0, 32, seed=3, device="cpu"))
    pieces = list(batches.chunks(0, 32, seed=3, device="cpu", chunk=12))
    assert len(whole) == 256 // 32 and [b for b, _, _ in pieces][:3] == [0, 0, 0]
    torch.testing.assert_close(torch.cat([x for x, _ in whole]), torch.cat([x for _, x, _ in pieces]), rtol=0, atol=0)
    assert torch.equal(torch.cat([y for _, y in whole]), torch.cat([y for _, _, y in pieces]))
    state = torch.get_rng_state()
    again = next(iter(batches.epoch(0, 32, seed=3, device="cpu")))
    assert torch.equal(state, torch.get_rng_state())  # the caller's RNG is untouched
    assert torch.equal(again[0], whole[0][0])
    other = next(iter(batches.epoch(1, 32, seed=3, device="cpu")))
    assert not torch.equal(other[0], whole[0][0])

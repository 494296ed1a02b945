"""The 15 corruptions: deterministic given the seed, they change the image, and the damage grows with severity."""

import pytest
import torch
import torch.nn.functional as F

from mimkit.data.sources import load_demo
from mimkit.errors import MimkitError
from mimkit.eval.corruptions import CORRUPTIONS, GROUPS, corrupt, frost_texture, psnr
from mimkit.eval.robustness import compare_with_baseline, corruption_generator, subset_mask


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors: intra-op threads only add overhead (a lot of it on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def images() -> dict[str, torch.Tensor]:
    grey = load_demo().test.images[:12].float() / 255                                  # 28 px, one channel
    rgb = F.interpolate(grey, size=32, mode="bilinear").repeat(1, 3, 1, 1) * torch.tensor([1.0, 0.8, 0.6]).view(1, 3, 1, 1)
    return {"grey28": grey, "rgb32": rgb.clamp(0, 1)}


def test_fifteen_corruptions_in_four_groups():
    assert len(CORRUPTIONS) == 15
    assert sorted(c for group in GROUPS.values() for c in group) == sorted(CORRUPTIONS)


@pytest.mark.parametrize("kind", ["grey28", "rgb32"])
def test_deterministic_changing_and_growing_with_severity(images, kind):
    x = images[kind]
    for name in CORRUPTIONS:
        out = [corrupt(x, name, s, torch.Generator().manual_seed(7)) for s in range(1, 6)]
        again = corrupt(x, name, 3, torch.Generator().manual_seed(7))
        assert torch.equal(out[2], again), name                                  # same seed, same images
        assert out[0].shape == x.shape and out[0].min() >= 0 and out[0].max() <= 1, name
        assert torch.equal(out[0], (out[0] * 255).round() / 255), name           # 8-bit values
        quality = [psnr(x, y).mean().item() for y in out]
        assert quality[0] < 60, name                                             # severity 1 changes the image
        assert all(a > b for a, b in zip(quality, quality[1:])), (name, quality)  # PSNR falls with severity


def test_random_corruptions_depend_on_the_seed(images):
    x = images["rgb32"]
    deterministic = {"defocus_blur", "zoom_blur", "brightness", "contrast", "pixelate", "jpeg_compression"}
    for name in set(CORRUPTIONS) - deterministic:
        a = corrupt(x, name, 3, torch.Generator().manual_seed(1))
        b = corrupt(x, name, 3, torch.Generator().manual_seed(2))
        assert not torch.equal(a, b), name


def test_block_generators_are_stable_and_distinct():
    a = torch.rand(5, generator=corruption_generator(0, "fog", 2, 3))
    assert torch.equal(a, torch.rand(5, generator=corruption_generator(0, "fog", 2, 3)))
    for other in (corruption_generator(1, "fog", 2, 3), corruption_generator(0, "snow", 2, 3),
                  corruption_generator(0, "fog", 3, 3), corruption_generator(0, "fog", 2, 4)):
        assert not torch.equal(a, torch.rand(5, generator=other))


def test_procedural_frost_texture():
    t = frost_texture(4, 3, 32, 32, torch.Generator().manual_seed(0))
    assert t.shape == (4, 3, 32, 32) and 0.2 < t.mean() < 0.6 and t.std() > 0.1
    assert (t[:, 2] >= t[:, 0]).all()  # bluish white


def test_bad_names_and_severities_are_one_line_errors(images):
    with pytest.raises(MimkitError, match="unknown corruption 'rain'"):
        corrupt(images["grey28"], "rain", 1, torch.Generator())
    with pytest.raises(MimkitError, match="severity must be one of 1..5"):
        corrupt(images["grey28"], "fog", 6, torch.Generator())


def test_mce_against_a_baseline():
    def result(clean, errs):
        return {"clean_error": clean, "errors": errs, "severities": [1, 2], "seed": 0, "num_images": 10,
                "corruptions": list(errs)}

    base = result(0.1, {"fog": [0.2, 0.4], "snow": [0.3, 0.3]})
    better = result(0.1, {"fog": [0.15, 0.3], "snow": [0.3, 0.3]})
    same = compare_with_baseline(base, base, "b.json")
    assert same["mCE"] == pytest.approx(100.0) and same["relative_mCE"] == pytest.approx(100.0)
    cmp = compare_with_baseline(better, base, "b.json")
    assert cmp["ce_normalized"]["fog"] == pytest.approx(0.75) and cmp["mCE"] == pytest.approx(87.5)
    assert cmp["relative_ce"]["fog"] == pytest.approx(0.25 / 0.4)
    with pytest.raises(MimkitError, match="num_images"):
        compare_with_baseline(result(0.1, {"fog": [0.2, 0.4]}) | {"num_images": 5}, base, "b.json")


def test_max_images_keeps_a_fixed_random_subset():
    keep = subset_mask(1000, 100)
    assert keep.sum() == 100 and torch.equal(keep, subset_mask(1000, 100))
    assert keep[:500].sum() not in (0, 100)  # not the first N (folder test splits are sorted by class)
    assert subset_mask(1000, None) is None and subset_mask(50, 100) is None

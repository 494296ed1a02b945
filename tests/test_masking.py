import pytest
import torch

from mimkit.errors import MimkitError
from mimkit.masking import gather_tokens, mask_from_noise, num_visible, random_mask


@pytest.mark.parametrize("N,ratio", [(49, 0.75), (64, 0.75), (196, 0.75), (64, 0.85), (16, 0.5)])
def test_keep_and_masked_partition_the_patches(N, ratio):
    m = random_mask(8, N, ratio, generator=torch.Generator().manual_seed(0))
    n_keep = int(N * (1 - ratio))
    assert m.ids_keep.shape == (8, n_keep)
    assert m.ids_masked.shape == (8, N - n_keep)
    both = torch.cat([m.ids_keep, m.ids_masked], 1).sort(1).values
    assert torch.equal(both, torch.arange(N).expand(8, N))
    # the binary mask marks exactly the masked indices
    assert torch.equal(m.mask.sum(1), torch.full((8,), float(N - n_keep)))
    assert torch.all(torch.gather(m.mask, 1, m.ids_masked) == 1)
    assert torch.all(torch.gather(m.mask, 1, m.ids_keep) == 0)


def test_restore_inverts_the_shuffle():
    m = random_mask(4, 49, 0.75, generator=torch.Generator().manual_seed(1))
    x = torch.randn(4, 49, 3)
    shuffled = gather_tokens(x, m.ids_shuffle)
    assert torch.equal(gather_tokens(shuffled, m.ids_restore), x)


def test_same_noise_gives_same_mask_and_lowest_noise_is_kept():
    noise = torch.rand(2, 16)
    a, b = mask_from_noise(noise, 0.75), mask_from_noise(noise.clone(), 0.75)
    assert torch.equal(a.ids_keep, b.ids_keep)
    assert torch.equal(a.ids_keep, noise.argsort(1)[:, :4])


def test_ratio_is_honoured_on_average():
    m = random_mask(2000, 64, 0.75, generator=torch.Generator().manual_seed(2))
    assert m.mask.mean().item() == pytest.approx(48 / 64)
    # every position is masked about 75% of the time (uniform masks)
    assert torch.allclose(m.mask.mean(0), torch.full((64,), 0.75), atol=0.05)


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5, 0.999])
def test_bad_ratio_is_a_user_error(ratio):
    with pytest.raises(MimkitError, match="mask ratio"):
        num_visible(64, ratio)

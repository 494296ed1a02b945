"""Random patch masking (MAE Sec. 3 / rc-mae.txt Sec. 3) and helpers to gather tokens by index.

Convention (as in the MAE reference): per-sample noise ~ U(0, 1) over the N patches,
``ids_shuffle = argsort(noise)``, the first ``n_keep = int(N * (1 - ratio))`` are visible, the rest are
masked; ``ids_restore = argsort(ids_shuffle)`` undoes the shuffle; the binary mask is 1 where a patch is
removed. Passing the same noise to two models gives them the same mask (RC-MAE-S).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mimkit.errors import MimkitError


@dataclass(frozen=True)
class PatchMask:
    """Indices describing one random mask per sample.

    Attributes:
        ids_keep: (B, n_keep) indices of visible patches, in shuffle order.
        ids_masked: (B, N - n_keep) indices of removed patches, in shuffle order.
        ids_restore: (B, N) inverse permutation: ``shuffled[ids_restore] == original order``.
        mask: (B, N) float, 1 = removed, 0 = visible, in the original patch order.
    """

    ids_keep: Tensor
    ids_masked: Tensor
    ids_restore: Tensor
    mask: Tensor

    @property
    def ids_shuffle(self) -> Tensor:
        """(B, N) the full shuffle: visible first, then masked."""
        return torch.cat([self.ids_keep, self.ids_masked], dim=1)

    @property
    def num_keep(self) -> int:
        return self.ids_keep.shape[1]


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """Number of visible patches, ``int(N * (1 - ratio))`` as in the MAE reference."""
    check_mask_ratio(mask_ratio)
    n_keep = int(num_patches * (1 - mask_ratio))
    if n_keep < 1 or n_keep >= num_patches:
        raise MimkitError(
            f"mask ratio {mask_ratio} leaves {n_keep} of {num_patches} patches visible; "
            "choose a ratio that keeps at least one patch visible and masks at least one"
        )
    return n_keep


def check_mask_ratio(mask_ratio: float) -> None:
    if not (isinstance(mask_ratio, (int, float)) and 0.0 < float(mask_ratio) < 1.0):
        raise MimkitError(f"mask ratio must be a number in the open interval (0, 1), got {mask_ratio!r}")


def mask_from_noise(noise: Tensor, mask_ratio: float) -> PatchMask:
    """Build a :class:`PatchMask` from per-sample noise of shape (B, N): lowest noise is kept."""
    B, N = noise.shape
    n_keep = num_visible(N, mask_ratio)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(B, N, device=noise.device)
    mask[:, :n_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return PatchMask(ids_shuffle[:, :n_keep], ids_shuffle[:, n_keep:], ids_restore, mask)


def random_mask(
    batch: int, num_patches: int, mask_ratio: float, device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> PatchMask:
    """Sample one uniformly random mask per sample (MAE ``random_masking``)."""
    noise = torch.rand(batch, num_patches, device=device, generator=generator)
    return mask_from_noise(noise, mask_ratio)


def gather_tokens(x: Tensor, ids: Tensor) -> Tensor:
    """Select tokens: x (B, N, D), ids (B, K) -> (B, K, D)."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def split_folds(ids_masked: Tensor, folds: int, fold_size: int | None = None) -> Tensor:
    """Split each sample's masked indices into ``folds`` disjoint folds of equal size (SdAE multi-fold).

    Args:
        ids_masked: (B, M) indices of the removed patches, in shuffle order (a random permutation per
            sample, as :func:`mask_from_noise` returns them), so consecutive chunks are random folds.
        folds: number of folds ``t`` (>= 1).
        fold_size: tokens per fold ``n`` (>= 1); default ``M // t``.

    Returns:
        (B, t, n) indices; fold ``j`` of sample ``b`` is ``ids_masked[b, j*n:(j+1)*n]``.

    Drop policy: only the first ``t * n`` masked indices are used; the remaining ``M - t * n`` are left out
    of every fold (the caller gives them no loss). Raises :class:`MimkitError` when ``t * n > M`` or when a
    fold would be empty.
    """
    if ids_masked.dim() != 2:
        raise MimkitError(f"split_folds expects ids_masked of shape (B, M), got {tuple(ids_masked.shape)}")
    if not isinstance(folds, int) or isinstance(folds, bool) or folds < 1:
        raise MimkitError(f"number of folds must be an integer >= 1, got {folds!r}")
    B, M = ids_masked.shape
    n = M // folds if fold_size is None else fold_size
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise MimkitError(
            f"cannot split {M} masked patches into {folds} folds of size {n!r}: every fold needs at least one patch"
        )
    if folds * n > M:
        raise MimkitError(f"cannot split {M} masked patches into {folds} folds of {n} (needs {folds * n})")
    return ids_masked[:, : folds * n].reshape(B, folds, n)

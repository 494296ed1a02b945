"""SdAE (Chen et al. 2022): a masked autoencoder that regresses an EMA teacher's features.

sdae.txt Sec. 2.1-2.3 and the supplement. For a random student mask with visible set ``V`` and masked
set ``M`` (``ids_masked``, in random shuffle order):

* **student** ``f_theta``: an MAE encoder on the visible patches and a decoder whose head predicts a
  ``embed_dim``-wide feature (the teacher's width) for every patch;
* **teacher** ``f_phi``: a plain ViT encoder (no decoder), an EMA of the student's encoder (Eq. 7), run
  without autograd and in eval mode (no drop path);
* **targets**: the teacher's output tokens after its final LayerNorm, cls token(s) dropped, normalised
  per token over channels, ``(x - mean) / sqrt(var + 1e-6)`` with the biased variance and no affine
  (Eq. 3);
* **loss**: ``1 - cos(pred_i, target_i)`` per target token over channels, averaged over the target
  tokens (Eq. 4). Only target tokens get a loss.

What the teacher sees (``teacher_input``, sdae Fig. 3 / Table 1 / Table 5):

* ``full``: the whole image (all N patches, one sequence); targets at every masked position ``M``.
* ``masked``: all masked patches as one sequence (its own cls token, their position embeddings).
* ``crop``: ``max(1, round(crop_ratio * |M|))`` masked patches drawn at random, one sequence; only
  those are targets (the other masked patches get no loss).
* ``multifold`` (paper default): the masked patches are split at random into ``folds`` disjoint folds
  of ``n`` patches; each fold is its own sequence with its own cls token, and all ``B * folds``
  sequences go through the teacher in one batched forward (so attention never crosses folds).

Multi-fold fold size and drop policy: ``n = min(n_visible, |M| // folds)``. With the paper's setting
(224 px, patch 16, ratio 0.75: 196 patches, 49 visible, 147 masked, 3 folds) this is ``3 x 49`` and uses
every masked patch. When ``|M|`` is not ``folds * n_visible`` the leftover ``|M| - folds * n`` masked
patches (a random subset, since ``ids_masked`` is a random permutation) are dropped from the targets and
get no loss; their number is constant for a given config and is reported as the ``targets_dropped``
metric (for every mode: the masked patches that get no loss). ``|M| // folds == 0`` is an error.

``cosine_dim``: ``"token"`` (default) is Eq. (4), a cosine per token over the channels. ``"reference"``
is a compatibility switch reproducing the official code's multi-fold loss, where the cosine is taken
over dim 1 of a (B * folds, n, D) tensor, i.e. across the tokens of a teacher sequence, per channel,
then ``1 - cos`` is averaged over (sequence, channel). In the ``masked`` and ``crop`` modes the same rule is
applied to the (B, K, D) targets of the single teacher sequence per image. With ``full`` the official code
flattens the targets to (B * |M|, D), so its cosine is per token there: ``reference`` equals ``token``.

Departure from the reference code (REFERENCE_NOTES.md): the reference starts from a randomly
initialised teacher, so early targets come from a random network; here the teacher starts as a copy of
the student's encoder (as RC-MAE does), so the first targets are those of the student's own encoder.

EMA: a :class:`~mimkit.teacher.MomentumSchedule`, by default cosine 0.96 -> 0.99 with one update per
epoch (supplement; Fig. 4a). Per-step updates (``unit="step"``) are supported for the Fig. 4a ablation.
Downstream evaluation uses the student's encoder by default (Sec. 4.4, "we follow most previous works").
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from mimkit.errors import MimkitError
from mimkit.masking import PatchMask, gather_tokens, num_visible, split_folds
from mimkit.methods.base import Method, StepOutput, Which
from mimkit.models.vit import MaskedAutoencoder, ModelSpec
from mimkit.teacher import EMATeacher, MomentumSchedule, TeacherHooks

TEACHER_INPUTS = ("full", "masked", "crop", "multifold")
COSINE_DIMS = ("token", "reference")
#: supplement: cosine 0.96 -> 0.99 over epochs, one EMA update per epoch
DEFAULT_MOMENTUM = MomentumSchedule(0.96, 0.99, "cosine", "epoch")
TARGET_EPS = 1e-6


def normalize_features(x: Tensor, eps: float = TARGET_EPS) -> Tensor:
    """Eq. (3): each token (..., D) normalised over its channels, ``(x - mean) / sqrt(var + eps)``,
    biased variance, no affine; computed in float32."""
    return F.layer_norm(x.float(), x.shape[-1:], eps=eps)


def cosine_loss(pred: Tensor, target: Tensor, cosine_dim: str = "token", seq_len: int | None = None) -> Tensor:
    """``1 - cos`` between predictions and targets, both (B, K, D).

    ``cosine_dim="token"`` (Eq. 4): the cosine of each token's D channels, averaged over the B*K tokens.
    ``cosine_dim="reference"`` (official code): the tokens are regrouped into teacher sequences of
    ``seq_len`` tokens, (B * K / seq_len, seq_len, D), and the cosine is taken over the token axis per
    channel, averaged over (sequence, channel). ``seq_len`` defaults to K (one sequence per image).
    """
    pred, target = pred.float(), target.float()
    if cosine_dim == "token":
        return (1.0 - F.cosine_similarity(pred, target, dim=-1)).mean()
    if cosine_dim == "reference":
        B, K, D = target.shape
        L = K if seq_len is None else seq_len
        if L < 1 or K % L:
            raise MimkitError(f"cannot group {K} target tokens into teacher sequences of {L}")
        cos = F.cosine_similarity(pred.reshape(-1, L, D), target.reshape(-1, L, D), dim=1)
        return (1.0 - cos).mean()
    raise MimkitError(f"unknown cosine_dim {cosine_dim!r}; accepted: {', '.join(COSINE_DIMS)}")


def spread(x: Tensor) -> Tensor:
    """Collapse indicator: std of each channel across all tokens and samples, averaged over channels.

    x: (..., D). Goes to 0 when every token carries the same feature. Population std (no NaN for a
    single token)."""
    return x.detach().float().reshape(-1, x.shape[-1]).std(dim=0, unbiased=False).mean()


class SdAE(TeacherHooks, Method):
    name = "sdae"
    #: sdae Sec. 4.4: "We follow most previous works to use the student model as the final model."
    default_which: Which = "student"

    def __init__(
        self,
        spec: ModelSpec,
        mask_ratio: float = 0.75,
        teacher_input: str = "multifold",
        folds: int = 3,
        crop_ratio: float = 0.33,
        cosine_dim: str = "token",
        momentum: MomentumSchedule = DEFAULT_MOMENTUM,
    ):
        super().__init__()
        if teacher_input not in TEACHER_INPUTS:
            raise MimkitError(f"unknown SdAE teacher input {teacher_input!r}; accepted: {', '.join(TEACHER_INPUTS)}")
        if cosine_dim not in COSINE_DIMS:
            raise MimkitError(f"unknown SdAE cosine_dim {cosine_dim!r}; accepted: {', '.join(COSINE_DIMS)}")
        if not (isinstance(folds, int) and not isinstance(folds, bool) and folds >= 1):
            raise MimkitError(f"SdAE folds must be an integer >= 1, got {folds!r}")
        if not (isinstance(crop_ratio, (int, float)) and not isinstance(crop_ratio, bool)
                and math.isfinite(crop_ratio) and 0.0 < crop_ratio <= 1.0):
            raise MimkitError(f"SdAE crop_ratio must be a number in (0, 1], got {crop_ratio!r}")
        if not isinstance(momentum, MomentumSchedule):
            raise MimkitError(f"SdAE momentum must be a MomentumSchedule, got {type(momentum).__name__}")

        # student: MAE encoder + decoder predicting teacher features (teacher width = student width)
        self.student = MaskedAutoencoder(spec, out_dim=spec.encoder.embed_dim)
        self.mask_ratio = mask_ratio
        self.teacher_input = teacher_input
        self.folds = folds
        self.crop_ratio = float(crop_ratio)
        self.cosine_dim = cosine_dim
        self.momentum = momentum
        self.patch_size = spec.encoder.patch_size
        self.num_patches = self.student.encoder.num_patches
        self.num_visible = num_visible(self.num_patches, mask_ratio)  # validates the ratio
        self.num_masked = self.num_patches - self.num_visible

        # target tokens per image (constant per config) and target tokens per teacher sequence (the
        # grouping of cosine_dim="reference"; for "full" the whole image is the one sequence)
        self.fold_size: int | None = None
        if teacher_input == "multifold":
            per_fold = self.num_masked // folds
            if per_fold == 0:
                raise MimkitError(
                    f"SdAE multi-fold: mask ratio {mask_ratio} on {self.num_patches} patches masks "
                    f"{self.num_masked}, fewer than folds={folds}; lower method.folds or raise method.mask_ratio"
                )
            self.fold_size = min(self.num_visible, per_fold)
            self.num_targets = folds * self.fold_size
            self.seq_len = self.fold_size
        elif teacher_input == "crop":
            self.num_targets = min(self.num_masked, max(1, round(self.crop_ratio * self.num_masked)))
            self.seq_len = self.num_targets
        else:  # full, masked
            self.num_targets = self.num_masked
            self.seq_len = self.num_masked
        self.targets_dropped = self.num_masked - self.num_targets
        # the official full-image path flattens its targets to (B * |M|, D) before the cosine, so "reference" is a
        # cosine per token there; its masked-token paths reshape to (sequences, tokens, D) and take dim=1
        self.loss_cosine_dim = "token" if teacher_input == "full" else cosine_dim

        # Encoder only, a copy of the freshly initialised student encoder. The reference code starts
        # from an independently random teacher instead (early targets from a random network).
        self.teacher = EMATeacher(self.student.encoder)
        self._last_momentum = float(momentum.base)

    # -- masks and targets --------------------------------------------------------------------------

    def target_ids(self, mask: PatchMask) -> Tensor:
        """(B, K) patch indices that get a loss, in the order the teacher's tokens come out
        (multi-fold: fold-major, K = folds * fold_size)."""
        if self.teacher_input == "multifold":
            return split_folds(mask.ids_masked, self.folds, self.fold_size).flatten(1)
        if self.teacher_input == "crop":
            return mask.ids_masked[:, : self.num_targets]  # a random subset: ids_masked is shuffled
        return mask.ids_masked

    @torch.no_grad()
    def teacher_features(self, images: Tensor, ids: Tensor) -> Tensor:
        """Raw teacher tokens (after the final norm, no cls) at ``ids`` (B, K): -> (B, K, D).

        One teacher forward in every mode; in multi-fold mode the (B, folds * n) tokens are reshaped to
        (B * folds, n, D) so each fold is a separate sequence with its own cls token.
        """
        enc = self.teacher.module
        B, K = ids.shape
        if self.teacher_input == "full":
            return gather_tokens(enc.forward_features(images)[:, 1:], ids)
        tokens = gather_tokens(enc.patch_tokens(images), ids)  # (B, K, D), position embeddings included
        D = tokens.shape[-1]
        L = self.seq_len
        out = enc.encode_tokens(tokens.reshape(B * (K // L), L, D))[:, 1:]  # drop each sequence's cls
        return out.reshape(B, K, D)

    def targets(self, images: Tensor, mask: PatchMask) -> tuple[Tensor, Tensor]:
        """(normalised targets (B, K, D) float32, their patch indices (B, K))."""
        ids = self.target_ids(mask)
        return normalize_features(self.teacher_features(images, ids)), ids

    # -- loss ---------------------------------------------------------------------------------------
    def forward(self, images: Tensor) -> StepOutput:
        mask = self.sample_mask(images)
        target, ids = self.targets(images, mask)                 # no autograd (teacher)
        pred_all = self.student(images, mask.ids_keep, mask.ids_restore)  # (B, N, D)
        pred = gather_tokens(pred_all, ids)                      # same order as the teacher's tokens
        loss = cosine_loss(pred, target, self.loss_cosine_dim, self.seq_len)  # Eq. (4)
        metrics: dict[str, Tensor | float] = {
            "loss": loss.detach(),
            "loss_cos": loss.detach(),
            "momentum": self._last_momentum,
            "target_std": spread(target),
            "pred_std": spread(F.normalize(pred.detach().float(), dim=-1)),
            "targets_dropped": float(self.targets_dropped),
        }
        return StepOutput(loss, metrics)

    # -- teacher updates ----------------------------------------------------------------------------
    def ema_source(self):
        return self.student.encoder  # the teacher is an encoder only

    # -- encoders / checkpoints ---------------------------------------------------------------------
    def encoder(self, which: Which = "student"):
        if which == "student":
            return self.student.encoder
        if which == "teacher":
            return self.teacher.module
        raise MimkitError(f"method {self.name} has no {which!r} encoder; accepted: student, teacher")

    @torch.no_grad()
    def reconstruct(self, images: Tensor, noise: Tensor, which: Which = "student") -> None:
        """SdAE predicts features, not pixels: nothing to draw."""
        return None


def build_sdae(cfg, spec: ModelSpec) -> SdAE:
    """SdAE from ``cfg.method`` (mask_ratio, teacher_input, folds, crop_ratio, cosine_dim, EMA schedule).

    Drop path comes with ``spec`` (``model.drop_path``; the paper recipe uses 0.25 on the encoder, set by
    the preset, not forced here). Unset EMA fields fall back to the SdAE defaults (cosine 0.96 -> 0.99
    per epoch), which ``config.validate`` normally fills already.
    """
    m = cfg.method
    d = DEFAULT_MOMENTUM
    schedule = MomentumSchedule(
        m.momentum if m.momentum is not None else d.base,
        m.momentum_final if m.momentum_final is not None else d.final,
        m.momentum_schedule if m.momentum_schedule is not None else d.kind,
        m.ema_unit if m.ema_unit is not None else d.unit,
        m.ema_every_steps if getattr(m, "ema_every_steps", None) is not None else 1,
    )
    return SdAE(spec, mask_ratio=m.mask_ratio, teacher_input=m.teacher_input, folds=m.folds,
                crop_ratio=m.crop_ratio, cosine_dim=m.cosine_dim, momentum=schedule)


__all__ = ["SdAE", "build_sdae", "cosine_loss", "normalize_features", "spread", "TEACHER_INPUTS", "COSINE_DIMS"]

"""MAE (He et al. 2022): reconstruct the pixels of masked patches from the visible ones.

rc-mae.txt Sec. 3 writes the objective as L_r = ||M ⊙ (x - f_S(x ⊙ (1 - M)))||^2 (Eq. 1): here
``masked_mse`` over the removed patches, optionally against per-patch normalised targets.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mimkit.errors import MimkitError
from mimkit.losses import masked_mse, normalize_patches
from mimkit.masking import mask_from_noise, num_visible
from mimkit.methods.base import Method, StepOutput, Which
from mimkit.models.vit import MaskedAutoencoder, ModelSpec, patchify


class MAE(Method):
    name = "mae"
    default_which: Which = "student"

    def __init__(self, spec: ModelSpec, mask_ratio: float = 0.75, norm_pix_loss: bool = True):
        super().__init__()
        self.student = MaskedAutoencoder(spec)
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.patch_size = spec.encoder.patch_size
        self.num_patches = self.student.encoder.num_patches
        num_visible(self.num_patches, mask_ratio)  # validates the ratio against the patch count

    def targets(self, images: Tensor) -> Tensor:
        """Pixel targets per patch (B, N, p*p*C), normalised per patch when ``norm_pix_loss``."""
        patches = patchify(images, self.patch_size)
        return normalize_patches(patches)[0] if self.norm_pix_loss else patches

    def forward(self, images: Tensor) -> StepOutput:
        mask = self.sample_mask(images)
        pred = self.student(images, mask.ids_keep, mask.ids_restore)
        loss = masked_mse(pred, self.targets(images), mask.mask)  # Eq. (1)
        return StepOutput(loss, {"loss_rec": loss.detach()})

    def encoder(self, which: Which = "student"):
        if which != "student":
            raise MimkitError(f"method {self.name} has no {which!r} encoder; accepted: student")
        return self.student.encoder

    @torch.no_grad()
    def reconstruct(self, images: Tensor, noise: Tensor, which: Which = "student") -> dict[str, Tensor]:
        """Predictions in pixel space (norm_pix undone with the target patches' own statistics).

        Returns dict with ``pred`` (B, N, P) pixels, ``mask`` (B, N), ``target`` (B, N, P) pixels.
        """
        mask = mask_from_noise(noise, self.mask_ratio)
        model = self.student if which == "student" else self.teacher_model()
        pred = model(images, mask.ids_keep, mask.ids_restore)
        patches = patchify(images, self.patch_size)
        if self.norm_pix_loss:
            _, mean, var = normalize_patches(patches)
            pred = pred * (var + 1e-6) ** 0.5 + mean
        return {"pred": pred, "mask": mask.mask, "target": patches}

    def teacher_model(self) -> MaskedAutoencoder:
        raise MimkitError(f"method {self.name} has no teacher; accepted: --which student")

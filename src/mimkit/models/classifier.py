"""The fine-tuning classifier (MAE's recipe) and its layer-wise lr decay groups.

``ViTClassifier`` wraps a :class:`~mimkit.models.vit.ViTEncoder`:

- ``global_pool="avg"`` (MAE fine-tuning): run the blocks, average the *patch* tokens (before the encoder's
  final norm, which is unused), ``fc_norm`` (LayerNorm, eps 1e-6), ``head``;
- ``global_pool="cls"``: the encoder's final norm, cls token, ``head``.

The head is initialised with ``trunc_normal(std=2e-5)`` and zero bias (MAE). The position embeddings become
trainable for fine-tuning, as in the MAE reference (timm's ViT there holds a learnable ``pos_embed``
initialised from the fixed sin-cos one).
"""

from __future__ import annotations

import torch
from timm.layers import trunc_normal_
from timm.optim import param_groups_layer_decay
from torch import Tensor, nn

from mimkit.errors import MimkitError
from mimkit.models.vit import LayerNorm, ViTEncoder

NO_WEIGHT_DECAY = ("encoder.cls_token", "encoder.pos_embed")


class ViTClassifier(nn.Module):
    """Encoder + (GAP + fc_norm | cls) + linear head. Parameter names: ``encoder.*``, ``fc_norm.*``, ``head.*``."""

    def __init__(self, encoder: ViTEncoder, num_classes: int, global_pool: str = "avg", init_std: float = 2e-5):
        super().__init__()
        if global_pool not in ("avg", "cls"):
            raise MimkitError(f"unknown head.global_pool {global_pool!r}; accepted: avg, cls")
        self.encoder = encoder
        self.global_pool = global_pool
        dim = encoder.embed_dim
        self.fc_norm = LayerNorm(dim) if global_pool == "avg" else nn.Identity()
        self.head = nn.Linear(dim, num_classes)
        trunc_normal_(self.head.weight, std=init_std)
        nn.init.zeros_(self.head.bias)
        encoder.pos_embed.requires_grad_(True)
        if global_pool == "avg":  # the encoder's final norm is not on the GAP path
            encoder.norm.requires_grad_(False)

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    def features(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> pooled (B, D) features that enter the head."""
        enc = self.encoder
        if self.global_pool == "cls":
            return enc.forward_features(images)[:, 0]
        tokens = enc.patch_tokens(images)
        cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
        x = enc.blocks(torch.cat([cls, tokens], dim=1))
        return self.fc_norm(x[:, 1:].mean(dim=1))

    def forward(self, images: Tensor) -> Tensor:
        """-> logits (B, num_classes)."""
        return self.head(self.features(images))

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's layer grouping: cls/pos/patch-embed = layer 0, block i = layer i + 1, the rest (norms, head) last."""
        return {"stem": r"^encoder\.(?:cls_token|pos_embed|patch_embed)",
                "blocks": r"^encoder\.blocks\.(\d+)" if coarse else [(r"^encoder\.blocks\.(\d+)", None)]}


def layer_decay_groups(model: ViTClassifier, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW groups with ``lr_scale = layer_decay ** (L + 1 - layer)`` (timm's ``param_groups_layer_decay``).

    No weight decay on 1-D parameters (biases, norms) and the cls/position embeddings, as in MAE.
    """
    return param_groups_layer_decay(model, weight_decay=weight_decay, no_weight_decay_list=NO_WEIGHT_DECAY,
                                    layer_decay=layer_decay)

"""ViT encoder with timm's parameter names, MAE decoder, fixed 2-D sin-cos position embeddings.

Built from timm's ``PatchEmbed`` and ``Block`` (fused scaled-dot-product attention). The encoder's
state dict uses timm ``VisionTransformer`` key names (``cls_token``, ``pos_embed``,
``patch_embed.proj``, ``blocks.i.*``, ``norm``) so an export is a plain ``load_state_dict`` in timm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from mimkit.errors import MimkitError
from mimkit.masking import gather_tokens

#: (embed_dim, depth, num_heads) of the named encoder sizes (ViT paper / timm)
VIT_SIZES: dict[str, tuple[int, int, int]] = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
    "vit_huge": (1280, 32, 16),
}

#: default MAE decoders (dim, depth, heads): rc-mae.txt App. E.2 (S 256x4, B/L 512x8), MAE (H 512x8);
#: the tiny one is ours (no paper value): 128 x 4, sized for CIFAR-scale runs.
DECODER_SIZES: dict[str, tuple[int, int, int]] = {
    "vit_tiny": (128, 4, 4),
    "vit_small": (256, 4, 8),
    "vit_base": (512, 8, 16),
    "vit_large": (512, 8, 16),
    "vit_huge": (512, 8, 16),
}

LayerNorm = partial(nn.LayerNorm, eps=1e-6)


def sincos_1d(embed_dim: int, positions: Tensor) -> Tensor:
    """1-D sin-cos embedding: positions (M,) -> (M, embed_dim), [sin(p w_i) ..., cos(p w_i) ...],
    w_i = 10000^(-2i/embed_dim)."""
    if embed_dim % 2:
        raise MimkitError(f"sin-cos position embedding needs an even dimension, got {embed_dim}")
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = positions.double().reshape(-1, 1) * omega.reshape(1, -1)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(embed_dim: int, grid_size: int, cls_token: bool = True) -> Tensor:
    """Fixed 2-D sin-cos position embedding, (1 + g*g, D) with a zero row for the cls token.

    Patches are in row-major order; as in the MAE reference, the first half of the channels encodes
    the column (x) index and the second half the row (y) index.
    """
    if embed_dim % 4:
        raise MimkitError(f"2-D sin-cos position embedding needs a dimension divisible by 4, got {embed_dim}")
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    emb = torch.cat([sincos_1d(embed_dim // 2, cols.flatten()), sincos_1d(embed_dim // 2, rows.flatten())], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """(B, C, H, W) -> (B, N, p*p*C), patches row-major, pixels (row, col, channel) inside a patch."""
    B, C, H, W = images.shape
    p = patch_size
    h, w = H // p, W // p
    x = images.reshape(B, C, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(B, h * w, p * p * C)


def unpatchify(patches: Tensor, patch_size: int, channels: int) -> Tensor:
    """Inverse of :func:`patchify`: (B, N, p*p*C) -> (B, C, H, W) for a square grid."""
    B, N, _ = patches.shape
    p = patch_size
    g = int(math.isqrt(N))
    if g * g != N:
        raise ValueError(f"unpatchify expects a square number of patches, got {N}")
    x = patches.reshape(B, g, g, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(B, channels, g * p, g * p)


def _init_weights(module: nn.Module) -> None:
    """MAE initialisation: xavier-uniform linears with zero bias, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def _blocks(dim: int, depth: int, heads: int, mlp_ratio: float, drop_path: float) -> nn.Sequential:
    if dim % heads:
        raise MimkitError(f"embedding dimension {dim} is not divisible by the number of heads {heads}")
    rates = torch.linspace(0, drop_path, depth).tolist() if depth else []
    return nn.Sequential(*[
        Block(dim, heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=LayerNorm, drop_path=r) for r in rates
    ])


@dataclass(frozen=True)
class EncoderSpec:
    """Everything needed to rebuild an encoder (saved with exports and checkpoints)."""

    img_size: int
    patch_size: int
    in_chans: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    drop_path: float = 0.0


class ViTEncoder(nn.Module):
    """ViT encoder. Keys match timm ``VisionTransformer(class_token=True, global_pool='token')``."""

    def __init__(self, spec: EncoderSpec):
        super().__init__()
        if spec.img_size % spec.patch_size:
            raise MimkitError(
                f"image size {spec.img_size} is not divisible by patch size {spec.patch_size}; "
                "choose model.img_size as a multiple of model.patch_size"
            )
        self.spec = spec
        self.patch_embed = PatchEmbed(spec.img_size, spec.patch_size, spec.in_chans, spec.embed_dim)
        self.num_patches = self.patch_embed.num_patches
        self.grid_size = spec.img_size // spec.patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, spec.embed_dim))
        pos = sincos_2d(spec.embed_dim, self.grid_size).unsqueeze(0)
        self.pos_embed = nn.Parameter(pos, requires_grad=False)  # fixed (MAE); a parameter for timm's keys
        self.blocks = _blocks(spec.embed_dim, spec.depth, spec.num_heads, spec.mlp_ratio, spec.drop_path)
        self.norm = LayerNorm(spec.embed_dim)
        self.apply(_init_weights)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a linear layer (MAE)
        nn.init.normal_(self.cls_token, std=0.02)

    @property
    def embed_dim(self) -> int:
        return self.spec.embed_dim

    def patch_tokens(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, N, D) patch embeddings plus their position embeddings (no cls)."""
        return self.patch_embed(images) + self.pos_embed[:, 1:]

    def encode_tokens(self, tokens: Tensor) -> Tensor:
        """Prepend the cls token (+ its position) to position-embedded tokens (B, K, D), run the
        blocks and the final norm: -> (B, 1 + K, D)."""
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
        x = torch.cat([cls, tokens], dim=1)
        return self.norm(self.blocks(x))

    def forward_visible(self, images: Tensor, ids_keep: Tensor) -> Tensor:
        """MAE encoder on the visible patches only: -> (B, 1 + K, D)."""
        return self.encode_tokens(gather_tokens(self.patch_tokens(images), ids_keep))

    def forward_features(self, images: Tensor) -> Tensor:
        """Whole image, no masking: (B, C, H, W) -> (B, 1 + N, D) after the final norm."""
        return self.encode_tokens(self.patch_tokens(images))

    def forward(self, images: Tensor, pool: str = "cls") -> Tensor:
        """Pooled features of unmasked images: ``cls`` token or ``mean`` of the patch tokens."""
        return pool_features(self.forward_features(images), pool)


def pool_features(tokens: Tensor, pool: str) -> Tensor:
    """(B, 1 + N, D) -> (B, D): the cls token or the mean of the patch tokens."""
    if pool == "cls":
        return tokens[:, 0]
    if pool == "mean":
        return tokens[:, 1:].mean(dim=1)
    raise MimkitError(f"unknown pooling {pool!r}; accepted: cls, mean")


class MAEDecoder(nn.Module):
    """MAE decoder: embed -> append mask tokens -> unshuffle -> + pos -> blocks -> norm -> head.

    Returns predictions for every patch (B, N, out_dim); the cls position is dropped.
    """

    def __init__(self, num_patches: int, encoder_dim: int, dim: int, depth: int, heads: int, out_dim: int,
                 mlp_ratio: float = 4.0):
        super().__init__()
        grid = int(math.isqrt(num_patches))
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(sincos_2d(dim, grid).unsqueeze(0), requires_grad=False)
        self.blocks = _blocks(dim, depth, heads, mlp_ratio, 0.0)
        self.norm = LayerNorm(dim)
        self.pred = nn.Linear(dim, out_dim)
        self.apply(_init_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, latent: Tensor, ids_restore: Tensor) -> Tensor:
        x = self.embed(latent)
        B, K1, D = x.shape
        N = ids_restore.shape[1]
        masks = self.mask_token.expand(B, N + 1 - K1, -1)
        patches = torch.cat([x[:, 1:], masks], dim=1)            # shuffled order: visible, then masked
        patches = gather_tokens(patches, ids_restore)            # back to the image's patch order
        x = torch.cat([x[:, :1], patches], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.pred(x)[:, 1:]


@dataclass(frozen=True)
class ModelSpec:
    encoder: EncoderSpec
    decoder_dim: int
    decoder_depth: int
    decoder_heads: int


def resolve_model_spec(model_cfg, in_chans: int) -> ModelSpec:
    """Turn ``model.*`` config (named size + optional overrides) into concrete shapes."""
    if model_cfg.name not in VIT_SIZES:
        raise MimkitError(f"unknown model {model_cfg.name!r}; accepted: {', '.join(VIT_SIZES)}")
    dim, depth, heads = VIT_SIZES[model_cfg.name]
    ddim, ddepth, dheads = DECODER_SIZES[model_cfg.name]
    enc = EncoderSpec(
        img_size=model_cfg.img_size,
        patch_size=model_cfg.patch_size,
        in_chans=in_chans,
        embed_dim=model_cfg.embed_dim or dim,
        depth=model_cfg.depth if model_cfg.depth is not None else depth,
        num_heads=model_cfg.num_heads or heads,
        mlp_ratio=model_cfg.mlp_ratio,
        drop_path=model_cfg.drop_path,
    )
    return ModelSpec(
        encoder=enc,
        decoder_dim=model_cfg.decoder_dim or ddim,
        decoder_depth=model_cfg.decoder_depth if model_cfg.decoder_depth is not None else ddepth,
        decoder_heads=model_cfg.decoder_heads or dheads,
    )


class MaskedAutoencoder(nn.Module):
    """Encoder on visible patches + decoder predicting ``out_dim`` values for every patch."""

    def __init__(self, spec: ModelSpec, out_dim: int | None = None):
        super().__init__()
        e = spec.encoder
        self.spec = spec
        self.encoder = ViTEncoder(e)
        out = out_dim if out_dim is not None else e.patch_size**2 * e.in_chans
        self.decoder = MAEDecoder(self.encoder.num_patches, e.embed_dim, spec.decoder_dim, spec.decoder_depth,
                                  spec.decoder_heads, out, e.mlp_ratio)

    def forward(self, images: Tensor, ids_keep: Tensor, ids_restore: Tensor) -> Tensor:
        """-> (B, N, out_dim) predictions for all patches in image order."""
        return self.decoder(self.encoder.forward_visible(images, ids_keep), ids_restore)


def compile_blocks(module: nn.Module) -> int:
    """``torch.compile`` every transformer block inside ``module`` in place; returns how many.

    Only the blocks are compiled: masking, gathers and the losses stay eager, so the random streams (and therefore
    exact resume) are those of an eager run, and parameter names do not change (``nn.Module.compile`` keeps them).
    Inductor fuses each block's LayerNorm, bias, GELU and residual adds around the GEMMs.
    """
    n = 0
    for m in module.modules():
        if isinstance(m, Block):
            m.compile()
            n += 1
    return n

"""Key-name maps between our state dicts and timm, Hugging Face and the official MAE code.

Our encoder (:class:`mimkit.models.vit.ViTEncoder`) already uses timm ``VisionTransformer`` names, so
timm <-> ours is the identity on the encoder. The maps here are pure functions on ``{name: tensor}``
dicts; the ``*_from_*`` ones *pop* the keys they understand from their input, so whatever is left in it
afterwards is, by construction, a key nobody understood (reported by name by the caller).

Names, per block ``i`` (ours = timm):

======================  ==============================================  ================================
ours / timm             Hugging Face ``ViTModel`` / ``ViTMAEModel``     official MAE decoder
======================  ==============================================  ================================
cls_token               embeddings.cls_token
pos_embed               embeddings.position_embeddings
patch_embed.proj        embeddings.patch_embeddings.projection
blocks.i.norm1          encoder.layer.i.layernorm_before
blocks.i.attn.qkv       encoder.layer.i.attention.attention.{query,key,value}  (split in three)
blocks.i.attn.proj      encoder.layer.i.attention.output.dense
blocks.i.norm2          encoder.layer.i.layernorm_after
blocks.i.mlp.fc1        encoder.layer.i.intermediate.dense
blocks.i.mlp.fc2        encoder.layer.i.output.dense
norm                    layernorm
decoder.embed           decoder.decoder_embed                           decoder_embed
decoder.mask_token      decoder.mask_token                              mask_token
decoder.pos_embed       decoder.decoder_pos_embed                       decoder_pos_embed
decoder.blocks.i.*      decoder.decoder_layers.i.* (as encoder layers)  decoder_blocks.i.* (timm names)
decoder.norm            decoder.decoder_norm                            decoder_norm
decoder.pred            decoder.decoder_pred                            decoder_pred
======================  ==============================================  ================================
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

State = dict[str, Tensor]

#: block sub-module names, ours (timm) -> Hugging Face; qkv is handled separately (one fused vs three)
BLOCK_TO_HF: dict[str, str] = {
    "norm1": "layernorm_before",
    "attn.proj": "attention.output.dense",
    "norm2": "layernorm_after",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
}
QKV_HF = ("query", "key", "value")
WB = ("weight", "bias")

#: official MAE decoder names -> ours (inside ``decoder.``); blocks keep timm names
OFFICIAL_DECODER: dict[str, str] = {
    "decoder_embed.weight": "embed.weight",
    "decoder_embed.bias": "embed.bias",
    "mask_token": "mask_token",
    "decoder_pos_embed": "pos_embed",
    "decoder_norm.weight": "norm.weight",
    "decoder_norm.bias": "norm.bias",
    "decoder_pred.weight": "pred.weight",
    "decoder_pred.bias": "pred.bias",
}
BLOCK_KEYS = tuple(f"{m}.{t}" for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2") for t in WB)


# --------------------------------------------------------------------------------------- expected keys
def encoder_keys(depth: int) -> list[str]:
    """The state-dict keys of a :class:`ViTEncoder` with ``depth`` blocks (timm names)."""
    keys = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    keys += [f"blocks.{i}.{k}" for i in range(depth) for k in BLOCK_KEYS]
    return keys + ["norm.weight", "norm.bias"]


def decoder_keys(depth: int) -> list[str]:
    """The state-dict keys of an :class:`MAEDecoder` with ``depth`` blocks (without ``decoder.``)."""
    keys = ["embed.weight", "embed.bias", "mask_token", "pos_embed"]
    keys += [f"blocks.{i}.{k}" for i in range(depth) for k in BLOCK_KEYS]
    return keys + ["norm.weight", "norm.bias", "pred.weight", "pred.bias"]


def count_blocks(keys, prefix: str) -> int:
    """Number of consecutive blocks ``prefix0.``, ``prefix1.``, ... present among ``keys``."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    n = 0
    while n in found:
        n += 1
    return n


def with_prefix(state: State, prefix: str) -> State:
    return {prefix + k: v for k, v in state.items()}


def take_prefix(state: State, prefix: str) -> State:
    """Pop every ``prefix*`` key from ``state``; return them without the prefix."""
    out = {k[len(prefix):]: state.pop(k) for k in [k for k in state if k.startswith(prefix)]}
    return out


# ------------------------------------------------------------------------------------------ blocks
def blocks_to_hf(state: State, src: str, dst: str) -> State:
    """Our/timm blocks under ``src`` (e.g. ``blocks.``) -> HF layers under ``dst`` (``encoder.layer.``)."""
    out: State = {}
    for i in range(count_blocks(state, src)):
        s, d = f"{src}{i}.", f"{dst}{i}."
        for t in WB:
            for name, part in zip(QKV_HF, state[f"{s}attn.qkv.{t}"].chunk(3, dim=0), strict=True):
                out[f"{d}attention.attention.{name}.{t}"] = part.clone()
            for ours, hf in BLOCK_TO_HF.items():
                out[f"{d}{hf}.{t}"] = state[f"{s}{ours}.{t}"]
    return out


def blocks_from_hf(state: State, src: str, dst: str) -> State:
    """Inverse of :func:`blocks_to_hf`; pops the HF keys it converts from ``state``."""
    out: State = {}
    for i in range(count_blocks(state, src)):
        s, d = f"{src}{i}.", f"{dst}{i}."
        for t in WB:
            parts = [state.pop(f"{s}attention.attention.{name}.{t}", None) for name in QKV_HF]
            if all(p is not None for p in parts):
                out[f"{d}attn.qkv.{t}"] = torch.cat(parts, dim=0)
            for ours, hf in BLOCK_TO_HF.items():
                if f"{s}{hf}.{t}" in state:
                    out[f"{d}{ours}.{t}"] = state.pop(f"{s}{hf}.{t}")
    return out


# -------------------------------------------------------------------------------------- Hugging Face
def encoder_to_hf(encoder: State, prefix: str = "") -> State:
    """Our encoder state -> HF ``ViTModel`` names (``prefix="vit."`` inside ``ViTMAEForPreTraining``)."""
    out = {
        "embeddings.cls_token": encoder["cls_token"],
        "embeddings.position_embeddings": encoder["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": encoder["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": encoder["patch_embed.proj.bias"],
        "layernorm.weight": encoder["norm.weight"],
        "layernorm.bias": encoder["norm.bias"],
    }
    out.update(blocks_to_hf(encoder, "blocks.", "encoder.layer."))
    return with_prefix(out, prefix)


def encoder_from_hf(state: State, prefix: str = "") -> State:
    """HF ``ViTModel`` / ``ViTMAEModel`` names under ``prefix`` -> our encoder state (pops from ``state``)."""
    simple = {
        "embeddings.cls_token": "cls_token",
        "embeddings.position_embeddings": "pos_embed",
        "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
        "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
        "layernorm.weight": "norm.weight",
        "layernorm.bias": "norm.bias",
    }
    out = {ours: state.pop(prefix + hf) for hf, ours in simple.items() if prefix + hf in state}
    out.update(blocks_from_hf(state, f"{prefix}encoder.layer.", "blocks."))
    return out


def decoder_to_hf(decoder: State) -> State:
    """Our decoder state (keys without ``decoder.``) -> HF ``ViTMAEForPreTraining`` ``decoder.*`` names."""
    out = {f"decoder.{off}": decoder[ours] for off, ours in OFFICIAL_DECODER.items()}
    out.update(blocks_to_hf(decoder, "blocks.", "decoder.decoder_layers."))
    return out


def decoder_from_hf(state: State) -> State:
    """HF ``decoder.*`` names -> our decoder state (keys without ``decoder.``); pops from ``state``."""
    out = {ours: state.pop(f"decoder.{off}") for off, ours in OFFICIAL_DECODER.items() if f"decoder.{off}" in state}
    out.update(blocks_from_hf(state, "decoder.decoder_layers.", "blocks."))
    return out


# ---------------------------------------------------------------------------------- official MAE code
def decoder_to_official(decoder: State) -> State:
    """Our decoder state -> the official MAE model's top-level decoder names (used to build test files)."""
    out = {off: decoder[ours] for off, ours in OFFICIAL_DECODER.items()}
    out.update({f"decoder_{k}": v for k, v in decoder.items() if k.startswith("blocks.")})
    return out


def decoder_from_official(state: State) -> State:
    """Official MAE decoder names (``decoder_embed``, ``mask_token``, ``decoder_blocks.i`` ...) -> ours;
    pops them from ``state``."""
    out = {ours: state.pop(off) for off, ours in OFFICIAL_DECODER.items() if off in state}
    out.update(with_prefix(take_prefix(state, "decoder_blocks."), "blocks."))
    return out

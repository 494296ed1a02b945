"""Export a checkpoint's networks to folders that timm and Hugging Face load without mimkit installed.

Three formats (``mimkit export --format ...``):

* ``timm`` — the encoder only, timm ``VisionTransformer`` key names (ours already are), no ``mask_token``
  (timm reads a top-level ``mask_token`` as a DINOv2 checkpoint) and no decoder: ``model.safetensors`` +
  a timm Hub-style ``config.json`` (``architecture``, ``model_args`` with every shape, ``pretrained_cfg``
  with input size, mean/std, ``num_classes: 0``). Loads with ``timm.create_model("local-dir:DIR",
  pretrained=True)`` or ``timm.models.VisionTransformer(**config["model_args"])`` + ``load_state_dict``.
  ``pool="cls"`` exports ``global_pool="token"`` (the cls token after the final norm); ``pool="mean"``
  exports ``global_pool="avg", fc_norm=False`` (mean of the normalised patch tokens), i.e. the same
  features as ``eval.pool`` here.
* ``hf`` — a Hugging Face ``ViTMAEForPreTraining`` folder (encoder + pixel decoder, ``norm_pix_loss``
  and ``mask_ratio`` of the run) for MAE and RC-MAE (student or teacher MAE). Our fixed 2-D sin-cos
  position embeddings equal those HF builds for ViT-MAE (HF rotates its canonical layout to the MAE
  one); they are written into the file anyway, so nothing depends on it.
* ``hf-vit`` — a Hugging Face ``ViTModel`` folder with any encoder (also SdAE's); features without the
  random masking that ``ViTMAEModel`` applies on every forward. Load with ``add_pooling_layer=False``
  (HF's pooler is a dense + tanh layer that MAE-style encoders never trained).

Files are written next to their final names and renamed into place, so an interrupted export never
leaves a half-written ``model.safetensors`` where a good one was.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mimkit import __version__
from mimkit.errors import MimkitError
from mimkit.interop import keys as K
from mimkit.models.vit import VIT_SIZES, EncoderSpec

FORMATS = ("timm", "hf", "hf-vit")
POOLS = {"cls": "token", "mean": "avg"}
#: timm registry names whose defaults we override entirely with model_args (any ViT works)
TIMM_ARCHITECTURES = {
    "vit_tiny": "vit_tiny_patch16_224",
    "vit_small": "vit_small_patch16_224",
    "vit_base": "vit_base_patch16_224",
    "vit_large": "vit_large_patch16_224",
    "vit_huge": "vit_huge_patch14_224",
}
LAYER_NORM_EPS = 1e-6


# ------------------------------------------------------------------------------------------ configs
def timm_architecture(spec: EncoderSpec) -> str:
    """A registered timm ViT name of the nearest standard width (its defaults are all overridden)."""
    name = min(VIT_SIZES, key=lambda n: abs(VIT_SIZES[n][0] - spec.embed_dim))
    return TIMM_ARCHITECTURES[name]


def timm_model_args(spec: EncoderSpec, pool: str = "cls") -> dict[str, Any]:
    """Keyword arguments of ``timm.models.VisionTransformer`` that rebuild our encoder exactly."""
    if pool not in POOLS:
        raise MimkitError(f"unknown pooling {pool!r}; accepted: {', '.join(POOLS)}")
    return {
        "img_size": spec.img_size, "patch_size": spec.patch_size, "in_chans": spec.in_chans,
        "embed_dim": spec.embed_dim, "depth": spec.depth, "num_heads": spec.num_heads,
        "mlp_ratio": spec.mlp_ratio, "qkv_bias": True, "class_token": True,
        "global_pool": POOLS[pool], "fc_norm": False, "num_classes": 0,
    }


def timm_config(spec: EncoderSpec, *, mean, std, pool: str = "cls", crop_pct: float = 1.0) -> dict[str, Any]:
    """timm Hub-style ``config.json`` (what ``local-dir:`` / ``hf-hub:`` loading reads)."""
    args = timm_model_args(spec, pool)
    return {
        "architecture": timm_architecture(spec),
        "num_classes": 0,
        "num_features": spec.embed_dim,
        "global_pool": args["global_pool"],
        "model_args": args,
        "pretrained_cfg": {
            "input_size": [spec.in_chans, spec.img_size, spec.img_size],
            "fixed_input_size": True,
            "interpolation": "bicubic",
            "crop_pct": crop_pct,
            "crop_mode": "center",
            "mean": list(mean),
            "std": list(std),
            "num_classes": 0,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        },
    }


def _hf_common(spec: EncoderSpec) -> dict[str, Any]:
    return {
        "hidden_size": spec.embed_dim, "num_hidden_layers": spec.depth, "num_attention_heads": spec.num_heads,
        "intermediate_size": round(spec.embed_dim * spec.mlp_ratio), "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02,
        "layer_norm_eps": LAYER_NORM_EPS, "image_size": spec.img_size, "patch_size": spec.patch_size,
        "num_channels": spec.in_chans, "qkv_bias": True, "torch_dtype": "float32",
    }


def hf_vit_config(spec: EncoderSpec) -> dict[str, Any]:
    """``config.json`` of a Hugging Face ``ViTModel``."""
    return {"architectures": ["ViTModel"], "model_type": "vit", **_hf_common(spec),
            "encoder_stride": spec.patch_size}


def hf_mae_config(spec: EncoderSpec, decoder: tuple[int, int, int], *, norm_pix_loss: bool,
                  mask_ratio: float) -> dict[str, Any]:
    """``config.json`` of a Hugging Face ``ViTMAEForPreTraining``; ``decoder`` = (dim, depth, heads)."""
    dim, depth, heads = decoder
    return {
        "architectures": ["ViTMAEForPreTraining"], "model_type": "vit_mae", **_hf_common(spec),
        "decoder_hidden_size": dim, "decoder_num_hidden_layers": depth, "decoder_num_attention_heads": heads,
        "decoder_intermediate_size": round(dim * spec.mlp_ratio), "mask_ratio": float(mask_ratio),
        "norm_pix_loss": bool(norm_pix_loss),
    }


def hf_preprocessor_config(spec: EncoderSpec, mean, std) -> dict[str, Any]:
    """``preprocessor_config.json`` for ``ViTImageProcessor``: resize to the model's size, rescale, normalise."""
    return {
        "image_processor_type": "ViTImageProcessor", "do_resize": True,
        "size": {"height": spec.img_size, "width": spec.img_size}, "resample": 3, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(mean), "image_std": list(std),
    }


# ------------------------------------------------------------------------------------------ writing
def _plain(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Contiguous CPU float copies that do not share memory (what safetensors requires)."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def _replace_into(out_dir: Path, name: str, write) -> None:
    final = out_dir / name
    tmp = out_dir / f".{name}.{os.getpid()}.tmp"
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # some writers create private files; exports are meant to be shared
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_folder(out_dir: str | Path, weights: dict[str, Tensor], jsons: dict[str, dict],
                 metadata: dict[str, str] | None = None) -> Path:
    """Write ``model.safetensors`` and the JSON files into ``out_dir`` (created if needed)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise MimkitError(f"export destination {out_dir} exists and is not a folder; pass a folder path to --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", "mimkit_version": __version__, **(metadata or {})}
    _replace_into(out_dir, "model.safetensors", lambda p: save_file(_plain(weights), str(p), metadata=meta))
    for name, content in jsons.items():
        _replace_into(out_dir, name, lambda p, c=content: p.write_text(json.dumps(c, indent=2) + "\n"))
    return out_dir


def encoder_state(encoder: nn.Module) -> dict[str, Tensor]:
    """The encoder's weights in timm names, checked: exactly a ViT encoder's keys (no ``mask_token``)."""
    state = encoder.state_dict()
    expected = K.encoder_keys(encoder.spec.depth)
    if sorted(state) != sorted(expected):
        raise MimkitError(f"encoder state has unexpected keys {sorted(set(state) ^ set(expected))[:5]}")
    return state


def export_timm(encoder: nn.Module, out_dir: str | Path, *, mean, std, pool: str = "cls", crop_pct: float = 1.0,
                metadata: dict[str, str] | None = None) -> Path:
    """Encoder -> timm folder (``model.safetensors`` + ``config.json``)."""
    cfg = timm_config(encoder.spec, mean=mean, std=std, pool=pool, crop_pct=crop_pct)
    return write_folder(out_dir, encoder_state(encoder), {"config.json": cfg}, metadata)


def export_hf_vit(encoder: nn.Module, out_dir: str | Path, *, mean, std,
                  metadata: dict[str, str] | None = None) -> Path:
    """Encoder -> Hugging Face ``ViTModel`` folder."""
    spec = encoder.spec
    jsons = {"config.json": hf_vit_config(spec), "preprocessor_config.json": hf_preprocessor_config(spec, mean, std)}
    return write_folder(out_dir, K.encoder_to_hf(encoder_state(encoder)), jsons, metadata)


def export_hf_mae(mae: nn.Module, out_dir: str | Path, *, norm_pix_loss: bool, mask_ratio: float, mean, std,
                  metadata: dict[str, str] | None = None) -> Path:
    """A :class:`MaskedAutoencoder` with a pixel decoder -> Hugging Face ``ViTMAEForPreTraining`` folder."""
    spec, mspec = mae.encoder.spec, mae.spec
    out_dim = mae.decoder.pred.out_features
    if out_dim != spec.patch_size**2 * spec.in_chans:
        raise MimkitError(
            f"this decoder predicts {out_dim} features per patch, not pixels; ViTMAEForPreTraining needs a pixel "
            "decoder: export the encoder with --format hf-vit or --format timm"
        )
    state = K.encoder_to_hf(encoder_state(mae.encoder), prefix="vit.")
    state.update(K.decoder_to_hf(mae.decoder.state_dict()))
    dshape = (mspec.decoder_dim, mspec.decoder_depth, mspec.decoder_heads)
    jsons = {"config.json": hf_mae_config(spec, dshape, norm_pix_loss=norm_pix_loss, mask_ratio=mask_ratio),
             "preprocessor_config.json": hf_preprocessor_config(spec, mean, std)}
    return write_folder(out_dir, state, jsons, metadata)


# ------------------------------------------------------------------------------------------ from a checkpoint
def data_normalisation(cfg, in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The per-channel mean/std the checkpoint's encoder saw, without reading the data set when possible."""
    from mimkit.data import sources as S

    if cfg.data.mean is not None and cfg.data.std is not None:
        return tuple(cfg.data.mean), tuple(cfg.data.std)
    name = S.canonical_source_name(cfg.data.name)
    known = {
        "demo": (S.FASHION_MNIST_MEAN, S.FASHION_MNIST_STD),
        "fashion-mnist": (S.FASHION_MNIST_MEAN, S.FASHION_MNIST_STD),
        "cifar10": (S.CIFAR10_MEAN, S.CIFAR10_STD),
    }
    mean, std = known.get(name, S.default_mean_std(in_chans))
    if len(mean) == in_chans:
        return tuple(mean), tuple(std)
    if len(mean) == 1 and in_chans == 3:  # grey converted to RGB: the channel is repeated
        return tuple(mean) * 3, tuple(std) * 3
    from mimkit.runtime import datamodule_from_config  # RGB converted to grey: statistics of the data

    dm = datamodule_from_config(cfg)
    return tuple(dm.mean), tuple(dm.std)


def export_timm_classifier(classifier: nn.Module, out_dir: str | Path, *, mean, std, crop_pct: float = 1.0,
                           metadata: dict[str, str] | None = None) -> Path:
    """A fine-tuned :class:`~mimkit.models.classifier.ViTClassifier` -> timm folder with its head: ``global_pool="avg",
    fc_norm=True`` (timm then has no final ``norm``: patch-token mean, ``fc_norm``, ``head``, as ours) or ``"token"``
    (final norm, cls token, head). ``timm.create_model("local-dir:DIR", pretrained=True)`` predicts the classes."""
    encoder = classifier.encoder
    avg = classifier.global_pool == "avg"
    state = {k: v for k, v in encoder_state(encoder).items() if not (avg and k.startswith("norm."))}
    state.update({f"fc_norm.{k}": v for k, v in classifier.fc_norm.state_dict().items()})
    state.update({f"head.{k}": v for k, v in classifier.head.state_dict().items()})
    cfg = timm_config(encoder.spec, mean=mean, std=std, pool="mean" if avg else "cls", crop_pct=crop_pct)
    num_classes = classifier.num_classes
    cfg["model_args"].update(fc_norm=avg, num_classes=num_classes)
    cfg["num_classes"] = cfg["pretrained_cfg"]["num_classes"] = num_classes
    return write_folder(out_dir, state, {"config.json": cfg}, metadata)


def export_checkpoint(checkpoint: str | Path, fmt: str, out_dir: str | Path, *, which: str | None = None,
                      overrides=(), pool: str | None = None) -> tuple[Path, str, nn.Module]:
    """Export a mimkit checkpoint (pre-training, imported or fine-tuned; read by
    :func:`mimkit.interop.loading.open_checkpoint`); returns (folder, which network was exported, that network: the
    encoder, the whole MAE for ``hf``, or the classifier for a fine-tuned checkpoint in ``timm``)."""
    from mimkit.interop.loading import open_checkpoint

    if fmt not in FORMATS:
        raise MimkitError(f"unknown export format {fmt!r}; accepted: {', '.join(FORMATS)}")
    loaded = open_checkpoint(checkpoint, overrides=overrides, device="cpu")
    cfg, method = loaded.config, loaded.method
    which = which or loaded.default_which
    encoder = loaded.encoder(which)
    mean, std = data_normalisation(cfg, encoder.spec.in_chans)
    meta = {"mimkit_method": loaded.method_name, "mimkit_which": which, "mimkit_checkpoint": Path(checkpoint).name}
    crop = 0.875 if cfg.data.name == "imagefolder" else 1.0
    if fmt == "timm" and loaded.classifier is not None:
        if pool is not None and pool != cfg.eval.pool:
            raise MimkitError(f"--pool {pool}: the fine-tuned classifier in {checkpoint} pools with "
                              f"{cfg.eval.pool} (its head.global_pool); leave --pool out")
        path = export_timm_classifier(loaded.classifier, out_dir, mean=mean, std=std, crop_pct=crop, metadata=meta)
        return path, "classifier", loaded.classifier
    if fmt == "timm":
        path = export_timm(encoder, out_dir, mean=mean, std=std, pool=pool or cfg.eval.pool, crop_pct=crop,
                           metadata=meta)
        return path, which, encoder
    if fmt == "hf-vit":
        return export_hf_vit(encoder, out_dir, mean=mean, std=std, metadata=meta), which, encoder
    if method is None or not hasattr(method, "norm_pix_loss"):
        name = "a fine-tuned classifier" if method is None else f"method {method.name}"
        raise MimkitError(
            f"--format hf writes a ViTMAEForPreTraining (pixel decoder); {name} has none. "
            "Accepted here: --format hf-vit or --format timm"
        )
    mae = method.student if which == "student" else method.teacher_model()
    path = export_hf_mae(mae, out_dir, norm_pix_loss=method.norm_pix_loss, mask_ratio=method.mask_ratio,
                         mean=mean, std=std, metadata=meta)
    return path, which, mae


@torch.no_grad()
def check_export(folder: str | Path, fmt: str, source: nn.Module, *, samples: int = 2, seed: int = 0) -> float:
    """Load an export back with timm / transformers and return the largest absolute difference to ``source``
    (a :class:`ViTEncoder`, or the :class:`MaskedAutoencoder` for ``hf``) on random images:
    ``forward_features`` for timm and hf-vit, decoder predictions on the same masks for hf."""
    from mimkit.masking import mask_from_noise

    folder = Path(folder).resolve()
    spec = source.encoder.spec if fmt == "hf" or hasattr(source, "head") else source.spec
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, spec.in_chans, spec.img_size, spec.img_size, generator=g)
    source = source.eval().cpu()
    if fmt == "timm":
        import timm

        model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
        if hasattr(source, "head"):  # a fine-tuned classifier: compare the logits
            return (model(x) - source(x)).abs().max().item()
        return (model.forward_features(x) - source.forward_features(x)).abs().max().item()
    try:
        import transformers
    except ImportError:
        raise MimkitError("checking a Hugging Face export needs transformers: pip install transformers") from None
    if fmt == "hf-vit":
        model = transformers.ViTModel.from_pretrained(folder, add_pooling_layer=False).eval()
        return (model(pixel_values=x).last_hidden_state - source.forward_features(x)).abs().max().item()
    model = transformers.ViTMAEForPreTraining.from_pretrained(folder).eval()
    noise = torch.rand(samples, source.encoder.num_patches, generator=g)
    mask = mask_from_noise(noise, model.config.mask_ratio)
    ours = source(x, mask.ids_keep, mask.ids_restore)
    return (model(pixel_values=x, noise=noise).logits - ours).abs().max().item()

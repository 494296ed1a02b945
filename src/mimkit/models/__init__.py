from mimkit.models.vit import (
    DECODER_SIZES,
    VIT_SIZES,
    EncoderSpec,
    MAEDecoder,
    MaskedAutoencoder,
    ModelSpec,
    ViTEncoder,
    patchify,
    pool_features,
    resolve_model_spec,
    sincos_2d,
    unpatchify,
)

__all__ = [
    "DECODER_SIZES", "VIT_SIZES", "EncoderSpec", "MAEDecoder", "MaskedAutoencoder", "ModelSpec", "ViTEncoder",
    "patchify", "pool_features", "resolve_model_spec", "sincos_2d", "unpatchify",
]

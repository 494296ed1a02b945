"""Shared settings for end-to-end tests: a tiny ViT on a slice of the embedded demo data."""

TINY = [
    "method.name=mae", "data.crop_min_scale=0.2",
    "model.img_size=16", "model.patch_size=4", "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
    "model.decoder_dim=32", "model.decoder_depth=1", "model.decoder_heads=2",
    "data.max_train=512", "data.max_test=256", "train.batch_size=64", "train.epochs=3", "train.warmup_epochs=1",
    "train.log_every=2", "train.blr=1e-2", "eval.batch_size=256", "eval.knn_init=false",
]


def sets(*items: str) -> list[str]:
    out = []
    for item in (*TINY, *items):
        out += ["--set", item]
    return out

"""Settings of ``mimkit eval linprobe`` (rc-mae.txt Table 11, MAE's protocol): sections data, model, train, aug, eval.

``data`` and ``model`` come from the pre-training checkpoint's run, and ``eval.pool`` too (every frozen
evaluation pools as the run did unless told otherwise). The defaults are Table 11's optimiser and schedule with a
CPU-sized batch; see :mod:`mimkit.eval.linprobe` for the probe itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mimkit.config.mechanism import check_choices, check_positive, resolve
from mimkit.config.pretrain import CHOICES as PRETRAIN_CHOICES
from mimkit.config.pretrain import DataConfig, ModelConfig
from mimkit.errors import MimkitError


@dataclass
class LinprobeTrainConfig:
    epochs: int = 90                   # probe training epochs (Table 11: 90)
    batch_size: int = 256              # probe batch size
    blr: float | None = None           # lr = blr * batch_size / 256; None: auto_blr(train images), 0.1 on ImageNet
    lr: float | None = None            # absolute lr; overrides blr when set
    min_lr: float = 0.0                # learning rate at the end of the half-cosine schedule
    warmup_epochs: float = 10          # linear warm-up length in epochs
    weight_decay: float = 0.0          # LARS weight decay (Table 11: 0)
    momentum: float = 0.9              # LARS momentum
    seed: int = 0                      # seed of the head's initialisation and the batch order
    device: str = "auto"               # auto | cpu | cuda


@dataclass
class LinprobeAugConfig:
    augment: bool = False              # true: RandomResizedCrop + flip every epoch (the paper); false: cached features
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # RandomResizedCrop area range (aug.augment=true)
    hflip: float = 0.5                 # horizontal flip probability (aug.augment=true)
    interpolation: str = "bicubic"     # resize interpolation (aug.augment=true)


@dataclass
class LinprobeEvalConfig:
    batch_size: int = 256              # feature extraction / test batches
    pool: str = "cls"                  # cls (MAE's probe) | mean of the patch tokens; default: the checkpoint's eval.pool
    which: str | None = None           # student | teacher (None = the method's own)


@dataclass
class LinprobeConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: LinprobeTrainConfig = field(default_factory=LinprobeTrainConfig)
    aug: LinprobeAugConfig = field(default_factory=LinprobeAugConfig)
    eval: LinprobeEvalConfig = field(default_factory=LinprobeEvalConfig)


CHOICES = {
    **{k: v for k, v in PRETRAIN_CHOICES.items() if k.split(".")[0] in ("data", "model")},
    "train.device": ("auto", "cpu", "cuda"),
    "aug.interpolation": ("bicubic", "bilinear", "nearest"),
    "eval.pool": ("cls", "mean"),
    "eval.which": ("student", "teacher"),
}


def build_linprobe_config(source: str | None = None, overrides=(),
                          checkpoint_config: dict | None = None) -> LinprobeConfig:
    """defaults (Table 11, batch 256) < the checkpoint's data/model and ``eval.pool`` < preset/file < ``--set``."""
    cfg = resolve(LinprobeConfig, "linprobe", source, overrides, checkpoint_config,
                           also_from_checkpoint=("eval.pool",))
    check_choices(cfg, CHOICES)
    check_positive(cfg, "train.epochs", "train.batch_size", "eval.batch_size")
    t, a = cfg.train, cfg.aug
    if t.warmup_epochs < 0 or t.weight_decay < 0 or t.momentum < 0:
        raise MimkitError("train.warmup_epochs, train.weight_decay and train.momentum must be >= 0, got "
                          f"{t.warmup_epochs}, {t.weight_decay}, {t.momentum}")
    if (t.blr is not None and t.blr <= 0) or (t.lr is not None and t.lr <= 0):
        raise MimkitError(f"train.blr / train.lr must be > 0 (or null for the default), got {t.blr} / {t.lr}")
    if len(a.crop_scale) != 2 or not 0 < a.crop_scale[0] <= a.crop_scale[1] <= 1:
        raise MimkitError(f"aug.crop_scale must be [low, high] with 0 < low <= high <= 1, got {a.crop_scale}")
    return cfg

"""Settings of ``mimkit finetune`` (rc-mae.txt Table 10): sections data, model, train, aug, head, eval.

``data`` and ``model`` come from the pre-training checkpoint's run (so the encoder and its images are the ones
pre-trained), except ``model.drop_path``, which is the *fine-tuning* drop path of Table 10. The defaults of
the other sections are the paper's ViT-B recipe; presets ``finetune-vit-s``/``-b``/``-l`` and
``finetune-cifar10`` hold the others. Resolution: defaults < checkpoint < ``--config`` < ``--set``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mimkit.config.mechanism import check_choices, check_loggers, check_positive, from_dict, resolve
from mimkit.config.pretrain import CHOICES as PRETRAIN_CHOICES
from mimkit.config.pretrain import LOGGERS, DataConfig, ModelConfig
from mimkit.errors import MimkitError


@dataclass
class FinetuneTrainConfig:
    epochs: int = 100                  # fine-tuning epochs
    batch_size: int = 64               # per optimiser micro-step; effective = batch_size x accum_steps
    accum_steps: int = 1               # micro-batches accumulated into one optimiser step
    blr: float = 5e-4                  # lr = blr * effective_batch / 256
    lr: float | None = None            # absolute lr; overrides blr when set
    min_lr: float = 1e-6               # learning rate at the end of the half-cosine schedule
    warmup_epochs: float = 5           # linear warm-up length in epochs
    weight_decay: float = 0.05         # AdamW weight decay (none on biases, norms, cls/position embeddings)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW betas
    layer_decay: float = 0.65          # lr scale decay^(L+1-layer): 0.75 (ViT-S), 0.65 (ViT-B/L)
    clip_grad: float | None = None     # clip the gradient norm to this value (null = no clipping)
    seed: int = 0                      # seed of the head, data order, augmentation, mixup and drop path
    deterministic: bool = False        # deterministic algorithms (bit-exact replays; slower on CUDA)
    precision: str = "auto"            # auto | fp32 | bf16 | fp16 (autocast on CUDA only)
    log_every: int = 10                # optimiser steps between metrics.jsonl lines
    ckpt_every: int = 0                # epochs between kept epoch_XXXX.pt (0: only last.pt and best.pt)
    ckpt_every_steps: int = 0          # also last.pt every N optimiser steps, resumable mid-epoch (0 = off)
    device: str = "auto"               # auto | cpu | cuda
    loggers: list[str] = field(default_factory=lambda: ["tensorboard"])  # tensorboard, wandb, mlflow, csv (several: a,b)


@dataclass
class AugConfig:
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])   # RandomResizedCrop area range
    hflip: float = 0.5                 # horizontal flip probability
    rand_augment: str | None = "rand-m9-mstd0.5-inc1"   # timm RandAugment string: RandAug(9, 0.5); null = off
    interpolation: str = "bicubic"     # resize interpolation
    reprob: float = 0.25               # random erasing probability
    remode: str = "pixel"              # const | rand | pixel
    mixup: float = 0.8                 # mixup alpha (0 = off)
    cutmix: float = 1.0                # cutmix alpha (0 = off)
    mixup_prob: float = 1.0            # probability of mixing a batch at all
    mixup_switch_prob: float = 0.5     # probability of cutmix instead of mixup when both are on
    label_smoothing: float = 0.1       # label smoothing of the targets


@dataclass
class HeadConfig:
    global_pool: str = "avg"           # avg: patch-token mean + fc_norm (MAE fine-tuning) | cls: final norm, cls
    init_std: float = 2e-5             # head weights ~ trunc_normal(std)


@dataclass
class FinetuneEvalConfig:
    batch_size: int = 256              # batch size of the test-split evaluation
    which: str | None = None           # student | teacher encoder of the checkpoint (None = the method's own)


@dataclass
class FinetuneConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=lambda: ModelConfig(drop_path=0.1))
    train: FinetuneTrainConfig = field(default_factory=FinetuneTrainConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    eval: FinetuneEvalConfig = field(default_factory=FinetuneEvalConfig)


CHOICES = {
    **{k: v for k, v in PRETRAIN_CHOICES.items() if k.split(".")[0] in ("data", "model")},
    "train.precision": ("auto", "fp32", "bf16", "fp16"),
    "train.device": ("auto", "cpu", "cuda"),
    "aug.interpolation": ("bicubic", "bilinear", "nearest"),
    "aug.remode": ("const", "rand", "pixel"),
    "head.global_pool": ("avg", "cls"),
    "eval.which": ("student", "teacher"),
}


def validate(cfg: FinetuneConfig) -> FinetuneConfig:
    check_choices(cfg, CHOICES)
    check_positive(cfg, "train.epochs", "train.batch_size", "train.accum_steps", "train.log_every",
                            "eval.batch_size")
    t, a = cfg.train, cfg.aug
    if t.warmup_epochs < 0 or t.ckpt_every < 0:
        raise MimkitError(f"train.warmup_epochs and train.ckpt_every must be >= 0, "
                          f"got {t.warmup_epochs}, {t.ckpt_every}")
    if t.ckpt_every_steps < 0:
        raise MimkitError(f"train.ckpt_every_steps must be an integer >= 0 (0 = checkpoints at epoch ends only), "
                          f"got {t.ckpt_every_steps!r}")
    if not 0.0 < t.layer_decay <= 1.0:
        raise MimkitError(f"train.layer_decay must be in (0, 1] (1 = no decay), got {t.layer_decay}")
    if len(t.betas) != 2:
        raise MimkitError(f"train.betas must be two numbers, got {t.betas}")
    check_loggers(t.loggers, LOGGERS)
    if not 0.0 <= cfg.model.drop_path < 1.0:
        raise MimkitError(f"model.drop_path must be in [0, 1), got {cfg.model.drop_path}")
    if len(a.crop_scale) != 2 or not 0 < a.crop_scale[0] <= a.crop_scale[1] <= 1:
        raise MimkitError(f"aug.crop_scale must be [low, high] with 0 < low <= high <= 1, got {a.crop_scale}")
    for key in ("hflip", "reprob", "mixup_prob", "mixup_switch_prob", "label_smoothing"):
        if not 0.0 <= getattr(a, key) <= 1.0:
            raise MimkitError(f"aug.{key} must be in [0, 1], got {getattr(a, key)}")
    if a.mixup < 0 or a.cutmix < 0:
        raise MimkitError(f"aug.mixup and aug.cutmix are Beta alphas >= 0 (0 = off), got {a.mixup}, {a.cutmix}")
    if mixing(cfg) and t.batch_size % 2:
        raise MimkitError(f"mixup/cutmix pair each image with another: train.batch_size must be even, "
                          f"got {t.batch_size}")
    return cfg


def mixing(cfg: FinetuneConfig) -> bool:
    return cfg.aug.mixup_prob > 0 and (cfg.aug.mixup > 0 or cfg.aug.cutmix > 0)


def build_finetune_config(source: str | None = None, overrides=(),
                          checkpoint_config: dict | None = None) -> FinetuneConfig:
    """defaults < the checkpoint's data/model (not drop_path) < preset/file < ``--set``."""
    cfg = resolve(FinetuneConfig, "finetune", source, overrides, checkpoint_config,
                           keep_from_defaults=("model.drop_path",))
    return validate(cfg)


def finetune_config_from_dict(mapping: dict) -> FinetuneConfig:
    return validate(from_dict(FinetuneConfig, mapping, "finetune"))

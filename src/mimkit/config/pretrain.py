"""Settings of ``mimkit pretrain``: sections data, model, method, train, eval.

Resolution (:func:`mimkit.config.mechanism.resolve`): dataclass defaults < preset or YAML file (``--config``;
the ``demo`` preset when none is given) < ``--set key=value`` < explicit flags (``--method``). ``data`` and
``model`` are also the first two sections of the downstream commands' settings (linear probe, fine-tuning), which
take them from the checkpoint's run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from mimkit.config.mechanism import check_choices, check_loggers, from_dict, preset_names, resolve
from mimkit.errors import MimkitError


@dataclass
class DataConfig:
    name: str = "demo"                 # demo | fashion-mnist | cifar10 | imagefolder | hf | webdataset
    path: str | None = None            # folder / archive for every source but demo
    cache_dir: str | None = None       # decoded-array cache (default $MIMKIT_CACHE or ~/.cache/mimkit)
    strict: bool = False               # fail on an unreadable image instead of skipping it
    in_memory: str = "auto"            # auto: in memory when it fits in_memory_budget_gb (image folders: one image size) | true | false: read from disk
    in_memory_budget_gb: float = 2.0   # decoded size (GB) up to which in_memory=auto holds an image folder in memory
    in_memory_resize: bool = False     # image folders held in memory: resize every image to model.img_size on decode
    num_workers: int | None = None     # DataLoader workers for folder-backed data
    channels: int | None = None        # 1 or 3 for imagefolder (default 3)
    crop_min_scale: float = 0.2        # RandomResizedCrop area range (crop_min_scale, 1), MAE recipe 0.2
    hflip: bool = True                 # random horizontal flips
    max_train: int | None = None       # keep a fixed random subset of the training images
    max_test: int | None = None        # keep a fixed random subset of the held-out images
    mean: list[float] | None = None    # per-channel normalisation mean in [0, 1] units (default: the source's own)
    std: list[float] | None = None     # per-channel normalisation std (default: the source's own)
    image_key: str | None = None       # hf column / webdataset member(s) of the image (default: detected)
    label_key: str | None = None       # hf column / webdataset member of the label (default: detected)


@dataclass
class ModelConfig:
    name: str = "vit_tiny"             # vit_tiny | vit_small | vit_base | vit_large | vit_huge
    patch_size: int = 16               # patch side in pixels (model.img_size must be a multiple of it)
    img_size: int = 224                # side of the square images the encoder takes
    embed_dim: int | None = None       # overrides of the named size
    depth: int | None = None           # transformer blocks (overrides the named size)
    num_heads: int | None = None       # attention heads (overrides the named size)
    mlp_ratio: float = 4.0             # MLP hidden width / embed_dim
    drop_path: float = 0.0             # stochastic depth rate of the student's encoder
    decoder_dim: int | None = None     # MAE decoder width (default: per model size)
    decoder_depth: int | None = None   # MAE decoder blocks (default: per model size)
    decoder_heads: int | None = None   # MAE decoder attention heads (default: per model size)


@dataclass
class MethodConfig:
    name: str = "mae"                  # mae | rc-mae | sdae
    mask_ratio: float = 0.75           # fraction of the patches hidden from the student
    norm_pix_loss: bool = True         # per-patch normalised pixel targets (the MAE recipe)
    # EMA teacher (rc-mae, sdae). None = the method's published default.
    momentum: float | None = None      # EMA teacher momentum (rc-mae, sdae; null = the method's published default)
    momentum_final: float | None = None  # final momentum of a cosine schedule (null = the method's default)
    momentum_schedule: str | None = None   # constant | cosine
    ema_unit: str | None = None            # step | epoch
    ema_every_steps: int | None = None     # EMA update every K optimiser steps (implies ema_unit=step)
    # rc-mae
    mask_mode: str = "same"            # same (RC-MAE-S) | different (RC-MAE-D)
    gamma: float = 1.0                 # weight of RC-MAE's consistency loss L_c (Eq. 6)
    grad_align_every: int = 0          # 0 = off; K = log cos(grad L_r, grad L_c) every K steps
    # rc-mae-free (also uses gamma and the EMA keys): tokens per image for each layer's curvature (0 = all)
    correction_tokens: int = 0
    correction_scope: str = "all"      # rc-mae-free: all (every linear map) | head (the prediction head only)
    output_factor: str = "isotropic"   # rc-mae-free inner layers' output side: isotropic | fisher (per-image, experimental)
    # sdae
    teacher_input: str = "multifold"   # full | masked | crop | multifold
    folds: int = 3                     # SdAE: folds of masked tokens the teacher encodes (multifold)
    crop_ratio: float = 0.33           # SdAE teacher_input=crop: share of the masked patches the teacher sees
    cosine_dim: str = "token"          # token (Eq. 4) | reference (the official code's dim=1)


@dataclass
class TrainConfig:
    epochs: int = 100                  # training epochs
    batch_size: int = 64               # per process, per micro-step
    accum_steps: int = 1               # micro-batches accumulated into one optimiser step
    blr: float = 1.5e-4                # lr = blr * effective_batch / 256
    lr: float | None = None            # absolute lr; overrides blr when set
    min_lr: float = 0.0                # learning rate at the end of the half-cosine schedule
    warmup_epochs: float = 10          # linear warm-up length in epochs (fractions allowed)
    weight_decay: float = 0.05         # AdamW weight decay (none on biases, norms and tokens)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # AdamW betas
    clip_grad: float | None = None     # clip the gradient norm to this value (null = no clipping)
    init_from: str | None = None       # a mimkit checkpoint (e.g. from `mimkit import`) to start the student from
    seed: int = 0                      # seed of the initialisation, data order, crops and masks
    deterministic: bool = False        # deterministic algorithms (bit-exact replays; slower on CUDA)
    ckpt_every: int = 20               # epochs between kept checkpoints (last.pt is written every epoch)
    ckpt_every_steps: int = 0          # also last.pt every N optimiser steps, resumable mid-epoch (0 = off)
    precision: str = "auto"            # auto | fp32 | bf16 | fp16 (autocast on CUDA only)
    log_every: int = 10                # optimiser steps between metrics.jsonl lines
    pictures_every: int = 0            # epochs between reconstruction PNGs (0 = only at the end)
    device: str = "auto"               # auto | cpu | cuda
    compile: bool = False              # torch.compile every transformer block (student and teacher)
    loggers: list[str] = field(default_factory=lambda: ["tensorboard"])  # tensorboard, wandb, mlflow, csv (several: a,b)


@dataclass
class EvalConfig:
    knn_k: int = 20                    # kNN: neighbours that vote
    knn_t: float = 0.07                # kNN: temperature T of the exp(similarity / T) vote weights
    pool: str = "cls"                  # cls | mean
    knn_every: int = 0                 # epochs between kNN evaluations during training (0 = end only)
    knn_init: bool = False             # also measure the encoder at initialisation
    batch_size: int = 256              # batch size of feature extraction
    which: str | None = None           # student | teacher (None = the method's default)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


LOGGERS = ("tensorboard", "wandb", "mlflow", "csv")  # train.loggers (train/trackers.py)

CHOICES: dict[str, tuple[str, ...]] = {
    "data.name": ("demo", "fashion-mnist", "cifar10", "imagefolder", "hf", "webdataset"),
    "data.in_memory": ("auto", "true", "false"),
    "model.name": ("vit_tiny", "vit_small", "vit_base", "vit_large", "vit_huge"),
    "method.name": ("mae", "rc-mae", "sdae", "rc-mae-free"),
    "method.mask_mode": ("same", "different"),
    "method.correction_scope": ("all", "head"),
    "method.output_factor": ("isotropic", "fisher"),
    "method.momentum_schedule": ("constant", "cosine"),
    "method.ema_unit": ("step", "epoch"),
    "method.teacher_input": ("full", "masked", "crop", "multifold"),
    "method.cosine_dim": ("token", "reference"),
    "train.precision": ("auto", "fp32", "bf16", "fp16"),
    "train.device": ("auto", "cpu", "cuda"),
    "eval.pool": ("cls", "mean"),
    "eval.which": ("student", "teacher"),
}


def build_config(source: str | None = None, overrides: list[str] | tuple[str, ...] = (),
                 extra: dict[str, Any] | None = None) -> Config:
    """Resolve defaults < preset/file (default: the demo preset) < ``--set`` < ``extra`` (dotted keys from explicit
    CLI flags such as ``--method``, the most specific)."""
    if source is not None and source in preset_names("finetune"):
        raise MimkitError(f"preset {source!r} is a fine-tuning recipe: use it with `mimkit finetune --config {source}`; "
                          f"pre-training presets: {', '.join(preset_names('pretrain'))}")
    cfg = resolve(Config, "pretrain", source or "demo", overrides, extra=extra)
    validate(cfg)
    return cfg


def config_from_dict(mapping: dict[str, Any]) -> Config:
    """Rebuild a config saved in a checkpoint or run folder."""
    cfg = from_dict(Config, mapping, "pretrain")
    validate(cfg)
    return cfg


# ---------------------------------------------------------------------------------------- validation
METHOD_EMA_DEFAULTS = {
    # rc-mae: published runs use a constant 0.996 updated every step (REFERENCE_NOTES, App. E.2)
    "rc-mae": {"momentum": 0.996, "momentum_final": None, "momentum_schedule": "constant", "ema_unit": "step"},
    # rc-mae-free: the same teacher schedule, kept as the difference S - T (methods/rc_mae_free.py)
    "rc-mae-free": {"momentum": 0.996, "momentum_final": None, "momentum_schedule": "constant", "ema_unit": "step"},
    # sdae: supplement, cosine 0.96 -> 0.99 over epochs, one update per epoch
    "sdae": {"momentum": 0.96, "momentum_final": 0.99, "momentum_schedule": "cosine", "ema_unit": "epoch"},
}


def validate(cfg: Config) -> None:
    """Check choices and ranges; fill method-dependent defaults (so the saved config is concrete)."""
    check_choices(cfg, CHOICES)
    m, t, mo = cfg.method, cfg.train, cfg.model
    if not (0.0 < m.mask_ratio < 1.0):
        raise MimkitError(f"method.mask_ratio must be in the open interval (0, 1), got {m.mask_ratio}")
    if mo.patch_size < 1 or mo.img_size < 1 or mo.img_size % mo.patch_size:
        raise MimkitError(
            f"model.img_size {mo.img_size} is not divisible by model.patch_size {mo.patch_size}; "
            "choose an image size that is a multiple of the patch size"
        )
    for key in ("epochs", "batch_size", "accum_steps", "ckpt_every", "log_every"):
        if getattr(t, key) < 1:
            raise MimkitError(f"train.{key} must be >= 1, got {getattr(t, key)}")
    if t.warmup_epochs < 0:
        raise MimkitError(f"train.warmup_epochs must be >= 0, got {t.warmup_epochs}")
    if isinstance(t.ckpt_every_steps, bool) or not isinstance(t.ckpt_every_steps, int) or t.ckpt_every_steps < 0:
        raise MimkitError(f"train.ckpt_every_steps must be an integer >= 0 (0 = checkpoints at epoch ends only), "
                          f"got {t.ckpt_every_steps!r}")
    if len(t.betas) != 2:
        raise MimkitError(f"train.betas must be two numbers, got {t.betas}")
    if cfg.data.in_memory_budget_gb < 0:
        raise MimkitError(f"data.in_memory_budget_gb must be >= 0 (0 = never hold an image folder in memory), "
                          f"got {cfg.data.in_memory_budget_gb}")
    if not 0.0 < cfg.data.crop_min_scale <= 1.0:
        raise MimkitError(f"data.crop_min_scale must be in (0, 1], got {cfg.data.crop_min_scale}")
    check_loggers(t.loggers, LOGGERS)
    if cfg.eval.knn_k < 1:
        raise MimkitError(f"eval.knn_k must be >= 1, got {cfg.eval.knn_k}")
    if m.ema_every_steps is not None:
        if m.ema_every_steps < 1:
            raise MimkitError(f"method.ema_every_steps must be an integer >= 1, got {m.ema_every_steps}")
        if m.ema_unit == "epoch":
            raise MimkitError(f"method.ema_every_steps={m.ema_every_steps} counts optimiser steps and cannot be "
                              "combined with method.ema_unit=epoch; use method.ema_unit=step or drop one of them")
        m.ema_unit = "step"
    for key, default in METHOD_EMA_DEFAULTS.get(m.name, {}).items():
        if getattr(m, key) is None:
            setattr(m, key, default)
    if m.momentum is not None and not (0.0 <= m.momentum <= 1.0):
        raise MimkitError(f"method.momentum must be in [0, 1], got {m.momentum}")
    if m.name == "rc-mae-free":
        if m.mask_mode != "same":
            raise MimkitError(f"method.mask_mode={m.mask_mode} is not available with rc-mae-free, which models "
                              "RC-MAE-S only (the teacher sees the student's mask); accepted: same")
        if m.correction_tokens < 0:
            raise MimkitError(f"method.correction_tokens must be an integer >= 0 (0 = every token), "
                              f"got {m.correction_tokens}")
        if m.output_factor == "fisher" and m.correction_tokens:
            raise MimkitError(f"method.output_factor=fisher uses every token (a per-image product of two token "
                              f"sums); got method.correction_tokens={m.correction_tokens}; accepted: 0")
        if t.compile:
            raise MimkitError("train.compile=true is not available with rc-mae-free (its per-layer hooks run "
                              "eagerly); accepted: train.compile=false")

"""End-to-end fine-tuning of pre-trained (or random) ViT encoders: ``mimkit finetune``."""

from mimkit.finetune.config import FinetuneConfig, build_finetune_config, finetune_config_from_dict
from mimkit.finetune.model import ViTClassifier, layer_decay_groups
from mimkit.finetune.trainer import Init, finetune, load_classifier

__all__ = [
    "FinetuneConfig", "Init", "ViTClassifier", "build_finetune_config", "finetune", "finetune_config_from_dict",
    "layer_decay_groups", "load_classifier",
]

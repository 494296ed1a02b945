"""End-to-end fine-tuning of pre-trained (or random) ViT encoders: ``mimkit finetune``, on the training engine.

Its settings are :mod:`mimkit.config.finetune`; the classifier is :mod:`mimkit.models.classifier`.
"""

from mimkit.finetune.trainer import Init, finetune

__all__ = ["Init", "finetune"]

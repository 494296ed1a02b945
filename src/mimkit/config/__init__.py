"""Typed settings of every command, resolved by one mechanism (:mod:`mimkit.config.mechanism`).

- :mod:`~mimkit.config.pretrain`: ``mimkit pretrain`` (:class:`Config`, :func:`build_config`).
- :mod:`~mimkit.config.linprobe`: ``mimkit eval linprobe`` (:class:`~mimkit.config.linprobe.LinprobeConfig`).
- :mod:`~mimkit.config.finetune`: ``mimkit finetune`` (:class:`~mimkit.config.finetune.FinetuneConfig`).

Presets ship in :mod:`mimkit.presets`; YAML files and ``--set section.key=value`` overrides go through the same
coercion and error messages for all three.
"""

from mimkit.config.mechanism import (
    FINETUNE_PREFIX,
    apply_mapping,
    load_source,
    parse_override,
    preset_description,
    preset_names,
    set_value,
    to_dict,
)
from mimkit.config.pretrain import (
    CHOICES,
    LOGGERS,
    METHOD_EMA_DEFAULTS,
    Config,
    DataConfig,
    EvalConfig,
    MethodConfig,
    ModelConfig,
    TrainConfig,
    build_config,
    config_from_dict,
    validate,
)

__all__ = [
    "CHOICES", "FINETUNE_PREFIX", "LOGGERS", "METHOD_EMA_DEFAULTS", "Config", "DataConfig", "EvalConfig",
    "MethodConfig", "ModelConfig", "TrainConfig", "apply_mapping", "build_config", "config_from_dict",
    "load_source", "parse_override", "preset_description", "preset_names", "set_value", "to_dict", "validate",
]

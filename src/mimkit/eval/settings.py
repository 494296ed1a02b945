"""Sectioned settings for the downstream commands (linear probe, fine-tuning), with the pre-training conventions.

The downstream commands have their own schedules, so they cannot share :class:`mimkit.config.Config`; they use
small dataclasses of sections instead, resolved the same way as pre-training:

    dataclass defaults < the checkpoint's ``data`` / ``model`` sections < ``--config`` preset or YAML < ``--set``

``data`` and ``model`` are the pre-training classes (:class:`~mimkit.config.DataConfig`,
:class:`~mimkit.config.ModelConfig`): they describe which images and which encoder, and by default come from
the checkpoint's run, so ``--set data.path=...`` works as it does for ``mimkit pretrain``. Values are type
checked with the pre-training coercion (:func:`mimkit.config._coerce`), so ``--set train.blr=1e-3`` and
``--set aug.crop_scale=[0.2,1]`` behave identically everywhere.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from mimkit.config import CHOICES as PRETRAIN_CHOICES
from mimkit.config import apply_mapping as config_apply_mapping
from mimkit.config import load_source, parse_override, set_value
from mimkit.errors import MimkitError
from mimkit.models.vit import EncoderSpec, resolve_model_spec

#: the encoder-shape keys of ``model.*`` (everything but ``drop_path`` and the decoder)
ENCODER_KEYS = ("name", "patch_size", "img_size", "embed_dim", "depth", "num_heads", "mlp_ratio")


def section_names(cfg_cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cfg_cls)]


def set_key(cfg, dotted: str, value: Any) -> None:
    """Set ``section.key`` on a sectioned config with the pre-training type coercion."""
    set_value(cfg, dotted, value)


def apply_mapping(cfg, mapping: dict[str, Any], origin: str, kind: str) -> None:
    """Apply ``{section: {key: value}}`` onto ``cfg``; a pre-training file is named as such."""
    sections = section_names(type(cfg))
    if "method" in mapping and "method" not in sections:
        raise MimkitError(
            f"{origin} is a pre-training config (it has a 'method' section); {kind} takes a {kind}-* preset "
            f"or a YAML file with sections {', '.join(sections)}"
        )
    config_apply_mapping(cfg, mapping, origin)


def to_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def resolve(cfg_cls, kind: str, source: str | None, overrides=(), checkpoint_config: dict | None = None,
            keep_from_defaults: tuple[str, ...] = (), also_from_checkpoint: tuple[str, ...] = ()):
    """Build a ``cfg_cls`` instance: defaults < checkpoint data/model < preset/file < ``--set``.

    Args:
        cfg_cls: a dataclass of sections (with ``data`` and ``model`` among them).
        kind: ``linprobe`` or ``finetune`` (for messages).
        source: preset name or YAML path (``None``: defaults only).
        overrides: ``key=value`` strings.
        checkpoint_config: the pre-training config dict saved in a checkpoint, if any.
        keep_from_defaults: dotted keys the checkpoint must not set (e.g. ``model.drop_path``, which is a
            fine-tuning setting, not the pre-training one).
        also_from_checkpoint: dotted keys outside data/model taken from the checkpoint too (``eval.pool``: every
            frozen evaluation pools as the run did unless told otherwise).
    """
    cfg = cfg_cls()
    if checkpoint_config is not None:
        for sec in ("data", "model"):
            for key, value in (checkpoint_config.get(sec) or {}).items():
                if f"{sec}.{key}" not in keep_from_defaults:
                    set_key(cfg, f"{sec}.{key}", value)
        for dotted in also_from_checkpoint:
            sec, key = dotted.split(".")
            value = (checkpoint_config.get(sec) or {}).get(key)
            if value is not None:
                set_key(cfg, dotted, value)
    if source is not None:
        apply_mapping(cfg, load_source(source), f"preset {source}" if "." not in source else source, kind)
    for item in overrides:
        set_key(cfg, *parse_override(item))
    return cfg


def from_dict(cfg_cls, mapping: dict[str, Any], kind: str):
    """Rebuild a saved config (run folder / checkpoint)."""
    cfg = cfg_cls()
    apply_mapping(cfg, mapping, f"saved {kind} config", kind)
    return cfg


def check_choices(cfg, choices: dict[str, tuple[str, ...]]) -> None:
    """Check enumerated values, with the pre-training choices for ``data.*`` / ``model.*``."""
    merged = {k: v for k, v in PRETRAIN_CHOICES.items() if k.split(".")[0] in ("data", "model")}
    merged.update(choices)
    for dotted, accepted in merged.items():
        sec, key = dotted.split(".")
        if not hasattr(cfg, sec):
            continue
        value = getattr(getattr(cfg, sec), key)
        if value is not None and value not in accepted:
            raise MimkitError(f"unknown value {value!r} for {dotted}; accepted: {', '.join(accepted)}")


def check_positive(cfg, *dotted: str) -> None:
    for d in dotted:
        sec, key = d.split(".")
        value = getattr(getattr(cfg, sec), key)
        if value is None or value < 1:
            raise MimkitError(f"{d} must be >= 1, got {value}")


def encoder_spec(model_cfg, in_chans: int) -> EncoderSpec:
    """The encoder shape a ``model`` section describes."""
    return resolve_model_spec(model_cfg, in_chans).encoder


def check_same_encoder(model_cfg, saved_model: dict, in_chans: int, checkpoint: str) -> None:
    """The encoder the settings describe must be the checkpoint's, else one line naming the difference."""
    from mimkit.config import ModelConfig

    saved = ModelConfig()
    for key, value in saved_model.items():
        if hasattr(saved, key):
            setattr(saved, key, value)
    want, have = encoder_spec(model_cfg, in_chans), encoder_spec(saved, in_chans)
    for field in ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio"):
        a, b = getattr(want, field), getattr(have, field)
        if a != b:
            raise MimkitError(
                f"the encoder in {checkpoint} has {field}={b} but the settings ask for {field}={a} "
                f"(model.* from --config/--set); drop that setting or use a checkpoint with that encoder"
            )

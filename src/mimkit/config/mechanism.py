"""The one config mechanism of every command: sectioned dataclasses filled from defaults, a checkpoint's run, a
preset or YAML file, and ``--set`` overrides, with one type coercion and one set of error messages.

Resolution (:func:`resolve`), least to most specific::

    dataclass defaults < the checkpoint's data/model sections (downstream commands) < --config preset/YAML < --set
    < explicit flags (``--method``, ``--device``)

Each command's sections live beside this module: :mod:`~mimkit.config.pretrain` (``mimkit pretrain``),
:mod:`~mimkit.config.linprobe` and :mod:`~mimkit.config.finetune`. Unknown sections or keys and ill-typed values
raise :class:`MimkitError` naming the key and what is accepted.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from mimkit.errors import MimkitError

# --------------------------------------------------------------------------------------------- presets
FINETUNE_PREFIX = "finetune-"


def preset_names(kind: str | None = None) -> list[str]:
    """Shipped presets: ``kind="pretrain"`` / ``"finetune"`` (names starting with ``finetune-``) or all."""
    names = sorted(p.name[:-5] for p in resources.files("mimkit.presets").iterdir() if p.name.endswith(".yaml"))
    if kind == "finetune":
        return [n for n in names if n.startswith(FINETUNE_PREFIX)]
    if kind == "pretrain":
        return [n for n in names if not n.startswith(FINETUNE_PREFIX)]
    return names


def preset_description(name: str) -> str:
    text = resources.files("mimkit.presets").joinpath(f"{name}.yaml").read_text()
    first = text.splitlines()[0] if text else ""
    return first.lstrip("# ").strip()


def _read_yaml(text: str, origin: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise MimkitError(f"{origin} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise MimkitError(f"{origin} must hold a mapping of sections (data, model, method, train, eval)")
    return data


def load_source(name_or_file: str | None) -> dict[str, Any]:
    """The raw mapping of a preset name or a YAML file (``None`` = the demo preset)."""
    if name_or_file is None:
        name_or_file = "demo"
    if name_or_file.endswith((".yaml", ".yml")) or Path(name_or_file).is_file():
        path = Path(name_or_file)
        if not path.is_file():
            raise MimkitError(f"config file {name_or_file} does not exist")
        return _read_yaml(path.read_text(), str(path))
    if name_or_file not in preset_names():
        raise MimkitError(
            f"unknown preset {name_or_file!r}; pre-training presets: {', '.join(preset_names('pretrain'))}; "
            f"fine-tuning presets (mimkit finetune): {', '.join(preset_names('finetune'))}; or a path to a .yaml file"
        )
    text = resources.files("mimkit.presets").joinpath(f"{name_or_file}.yaml").read_text()
    return _read_yaml(text, f"preset {name_or_file}")


# ----------------------------------------------------------------------------------------- overrides
def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check/convert ``value`` for a field annotated ``tp`` (str, int, float, bool, list, Optional)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(key, value, args[0])
    if origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if isinstance(value, str) and inner is str:  # --set train.loggers=tensorboard,mlflow
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise MimkitError(f"{key} must be a list, e.g. {key}=[0.5,0.5], got {value!r}")
        return [_coerce(key, v, inner) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise MimkitError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise MimkitError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise MimkitError(f"{key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, bool):
            value = str(value).lower()
        if not isinstance(value, (str, int, float)):
            raise MimkitError(f"{key} must be a string, got {value!r}")
        return str(value)
    return value


def _section_types(section_cls) -> dict[str, Any]:
    return typing.get_type_hints(section_cls)


def apply_mapping(cfg, mapping: dict[str, Any], origin: str) -> None:
    """Apply a nested mapping {section: {key: value}} onto a sectioned config (``Config`` or the downstream
    commands' settings) with type checks."""
    sections = {f.name: f for f in dataclasses.fields(type(cfg))}
    for sec, values in mapping.items():
        if sec not in sections:
            raise MimkitError(f"unknown config section {sec!r} in {origin}; accepted: {', '.join(sections)}")
        if not isinstance(values, dict):
            raise MimkitError(f"config section {sec!r} in {origin} must be a mapping of keys")
        for key, value in values.items():
            set_value(cfg, f"{sec}.{key}", value)


def set_value(cfg, dotted: str, value: Any) -> None:
    """Set ``section.key`` on a sectioned config, type-checked against the field's annotation."""
    parts = dotted.split(".")
    sections = {f.name for f in dataclasses.fields(type(cfg))}
    if len(parts) != 2 or parts[0] not in sections:
        raise MimkitError(
            f"unknown config key {dotted!r}; keys look like section.name with section one of {', '.join(sorted(sections))}"
        )
    sec, key = parts
    section = getattr(cfg, sec)
    types_ = _section_types(type(section))
    if key not in types_:
        raise MimkitError(f"unknown config key {dotted!r}; accepted keys in {sec}: {', '.join(types_)}")
    setattr(section, key, _coerce(dotted, value, types_[key]))


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` with the value parsed as YAML (numbers, booleans, lists, null)."""
    if "=" not in text:
        raise MimkitError(f"--set expects key=value (e.g. train.epochs=10), got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


# ------------------------------------------------------------------------------------------ resolution
def section_names(cfg_cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cfg_cls)]


def to_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _check_kind(cfg, mapping: dict[str, Any], origin: str, kind: str) -> None:
    """A pre-training file given to a downstream command is named as such (not as an unknown section)."""
    sections = section_names(type(cfg))
    if kind != "pretrain" and "method" in mapping and "method" not in sections:
        raise MimkitError(
            f"{origin} is a pre-training config (it has a 'method' section); {kind} takes a {kind}-* preset "
            f"or a YAML file with sections {', '.join(sections)}"
        )


def resolve(cfg_cls, kind: str, source: str | None = None, overrides=(), checkpoint_config: dict | None = None,
            keep_from_defaults: tuple[str, ...] = (), also_from_checkpoint: tuple[str, ...] = (),
            extra: dict[str, Any] | None = None):
    """Build a ``cfg_cls`` instance: defaults < checkpoint data/model < preset/file < ``--set`` < ``extra``.

    Args:
        cfg_cls: a dataclass of sections.
        kind: ``pretrain``, ``linprobe`` or ``finetune`` (for messages).
        source: preset name or YAML path (``None``: defaults only).
        overrides: ``key=value`` strings.
        checkpoint_config: the pre-training config dict saved in a checkpoint, if any (its ``data`` and ``model``
            sections describe which images and which encoder).
        keep_from_defaults: dotted keys the checkpoint must not set (e.g. ``model.drop_path``, which is a
            fine-tuning setting, not the pre-training one).
        also_from_checkpoint: dotted keys outside data/model taken from the checkpoint too (``eval.pool``: every
            frozen evaluation pools as the run did unless told otherwise).
        extra: dotted keys from explicit CLI flags such as ``--method`` (the most specific).
    """
    cfg = cfg_cls()
    if checkpoint_config is not None:
        for sec in ("data", "model"):
            for key, value in (checkpoint_config.get(sec) or {}).items():
                if f"{sec}.{key}" not in keep_from_defaults:
                    set_value(cfg, f"{sec}.{key}", value)
        for dotted in also_from_checkpoint:
            sec, key = dotted.split(".")
            value = (checkpoint_config.get(sec) or {}).get(key)
            if value is not None:
                set_value(cfg, dotted, value)
    if source is not None:
        mapping = load_source(source)
        origin = f"preset {source}" if source in preset_names() else source
        _check_kind(cfg, mapping, origin, kind)
        apply_mapping(cfg, mapping, origin)
    for item in overrides:
        set_value(cfg, *parse_override(item))
    for key, value in (extra or {}).items():
        set_value(cfg, key, value)
    return cfg


def from_dict(cfg_cls, mapping: dict[str, Any], kind: str):
    """Rebuild a saved config (run folder / checkpoint)."""
    cfg = cfg_cls()
    _check_kind(cfg, mapping, f"saved {kind} config", kind)
    apply_mapping(cfg, mapping, f"saved {kind} config" if kind != "pretrain" else "saved config")
    return cfg


# ---------------------------------------------------------------------------------------- validation
def check_choices(cfg, choices: dict[str, tuple[str, ...]]) -> None:
    """Enumerated values: one message for every command."""
    for dotted, accepted in choices.items():
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


def check_loggers(loggers: list[str], accepted: tuple[str, ...]) -> None:
    unknown = [name for name in loggers if name not in accepted]
    if unknown:
        raise MimkitError(f"unknown logger(s) {', '.join(map(repr, unknown))} in train.loggers; accepted: "
                          f"{', '.join(accepted)} (several separated by commas, or [] for none)")

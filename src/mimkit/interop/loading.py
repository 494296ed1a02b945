"""The one way to read a checkpoint: :func:`open_checkpoint`.

Every command that takes ``--checkpoint`` reads it here, whatever wrote it:

- ``pretrain``: a ``mimkit pretrain`` checkpoint (MAE, RC-MAE, SdAE, ...);
- ``imported``: a checkpoint written by ``mimkit import`` (our format, epoch 0);
- ``finetune``: a ``mimkit finetune`` checkpoint (a classifier: encoder + head);
- ``export``: a folder written by ``mimkit export --format timm|hf|hf-vit`` (or any timm / Hugging Face ViT
  folder), read back through :func:`mimkit.interop.import_checkpoint`.

The result, :class:`LoadedCheckpoint`, carries the typed pre-training view of the config (``config``: data,
model, method, train, eval sections; for a fine-tuned classifier its data/model sections with the evaluation
defaults), the method with its weights (``method``; a fine-tuned checkpoint has ``classifier`` instead) and
``encoder(which)``. A path that is not a readable checkpoint gives one :class:`MimkitError` line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mimkit.config import Config, apply_mapping, config_from_dict, parse_override, set_value, validate
from mimkit.errors import MimkitError
from mimkit.methods import Method, build_method
from mimkit.models.vit import ViTEncoder
from mimkit.runtime import resolve_device
from mimkit.train.checkpoint import load_checkpoint

FINETUNE_METHOD = "finetune"  #: the ``method`` field of a fine-tuning checkpoint
KINDS = ("pretrain", "imported", "finetune", "export")
EXPORT_FILES = ("model.safetensors", "pytorch_model.bin")


# ------------------------------------------------------------------------------------------------ reading
def is_export_folder(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / "config.json").is_file() and any((path / f).is_file() for f in EXPORT_FILES)


def checkpoint_in_chans(ckpt: dict) -> int:
    weight = (ckpt.get("student") or {}).get("encoder.patch_embed.proj.weight")
    if weight is None:
        raise MimkitError("checkpoint has no encoder.patch_embed.proj.weight in its student; not a mimkit encoder")
    return int(weight.shape[1])


def checkpoint_kind(ckpt: dict) -> str:
    if ckpt.get("method") == FINETUNE_METHOD:
        return "finetune"
    return "imported" if (ckpt.get("extra") or {}).get("import_source") else "pretrain"


# ------------------------------------------------------------------------------------------------ the result
@dataclass
class LoadedCheckpoint:
    """A checkpoint read by :func:`open_checkpoint`.

    Attributes:
        path: what was given.
        kind: ``pretrain`` | ``imported`` | ``finetune`` | ``export``.
        method_name: the pre-training method (``mae``, ``rc-mae``, ...) or ``finetune``.
        config: the typed pre-training config (``--set`` overrides applied). For a fine-tuned classifier: its
            data and model sections, evaluation defaults, ``eval.pool`` matching its head (avg -> mean).
        saved_config: the config dict as saved (a fine-tuning config for ``finetune``).
        in_chans: image channels the encoder takes.
        method: the pre-training method with its weights, eval mode (None for a fine-tuned classifier).
        classifier: the fine-tuned :class:`~mimkit.models.classifier.ViTClassifier` (None otherwise).
        epoch: finished epochs when the checkpoint was written (0 for imports and exports).
        device: where the networks are.
        raw: the checkpoint dict (for an export folder: the converted one).
    """

    path: str
    kind: str
    method_name: str
    config: Config
    saved_config: dict
    in_chans: int
    method: Method | None
    classifier: nn.Module | None
    epoch: int
    device: torch.device
    raw: dict
    ft_config: Any = field(default=None, repr=False)  # the typed fine-tuning config (``finetune`` only)

    @property
    def default_which(self) -> str:
        """The encoder downstream commands use by default: ``eval.which``, else the method's own."""
        if self.method is None:
            return "student"
        return self.config.eval.which or self.method.default_which

    def encoder(self, which: str | None = None) -> ViTEncoder:
        """The ``student`` or ``teacher`` encoder (None = :attr:`default_which`), eval mode; a fine-tuned
        classifier has one encoder, its ``student``."""
        which = which or self.default_which
        if self.method is None:
            if which != "student":
                raise MimkitError(f"{self.path} is a fine-tuned classifier with one encoder; accepted --which: student")
            return self.classifier.encoder.eval()
        if which == "teacher" and self.raw.get("teacher") is None:
            raise MimkitError(f"checkpoint {self.path} has no teacher (method {self.method_name} keeps no 'teacher' "
                              "encoder); accepted --which: student")
        return self.method.encoder(which).eval()

    def finetune_config(self):
        """The typed fine-tuning config of a ``finetune`` checkpoint (``--set`` overrides applied)."""
        if self.kind != "finetune":
            what = {"pretrain": "pre-training", "imported": "imported pre-training", "export": "exported"}[self.kind]
            raise MimkitError(f"{self.path} is a {what} checkpoint (method {self.method_name}), not a fine-tuned "
                              "classifier: run `mimkit finetune --checkpoint ...` first")
        return self.ft_config

    def datamodule(self, log=None):
        """The data of :attr:`config` (``data.*``), checked to have the encoder's channel count."""
        from mimkit.runtime import datamodule_from_config

        data = datamodule_from_config(self.config, log=log)
        check_data_channels(self.in_chans, data, self.path)
        return data


def random_init_encoder(config: Config, in_chans: int, seed: int) -> ViTEncoder:
    """The encoder at initialisation: ``torch.manual_seed(seed); build_method(config, in_chans).encoder("student")``.

    With ``seed = config.train.seed`` this is the encoder a run of ``config`` starts from (the reference every
    self-supervised result is read against). Eval mode, on the CPU.
    """
    torch.manual_seed(seed)
    return build_method(config, in_chans).encoder("student").eval()


# ------------------------------------------------------------------------------------------------ loading
def _apply_overrides(targets: list, overrides) -> None:
    """Apply ``key=value`` items to every config in ``targets`` that has the key; one line when none has it."""
    for item in overrides:
        key, value = parse_override(item)
        applied, first_error = False, None
        for cfg in targets:
            try:
                set_value(cfg, key, value)
                applied = True
            except MimkitError as e:
                if not str(e).startswith("unknown config key"):
                    raise
                first_error = first_error or e
        if not applied:
            raise first_error


def _load_weights(module: nn.Module, state: dict, path, what: str) -> None:
    try:
        module.load_state_dict(state)
    except RuntimeError as e:  # shapes that disagree with the saved config: a damaged or foreign file
        lines = str(e).splitlines()
        first = (lines[1] if len(lines) > 1 else lines[0]).strip()
        raise MimkitError(f"the {what} weights in {path} do not match its own saved config: {first[:200]}") from None


def _export_to_checkpoint(path: Path, which: str | None) -> dict:
    """An export folder (timm / Hugging Face) -> our checkpoint dict, as ``mimkit import`` would write it."""
    from mimkit.config import build_config
    from mimkit.interop.foreign import import_checkpoint, imported_checkpoint

    imported = import_checkpoint(path, which=None if which == "student" else which)
    cfg = build_config(None, ["method.name=mae"], imported.config_values())
    cfg.data.channels = imported.spec.in_chans
    ckpt, _ = imported_checkpoint(imported, cfg, origin=str(path))
    ckpt["extra"]["export_folder"] = True
    return ckpt


def _finetune_view(ft_cfg) -> Config:
    cfg = Config()
    apply_mapping(cfg, {"data": vars(ft_cfg.data).copy(), "model": vars(ft_cfg.model).copy()}, "fine-tuning config")
    cfg.eval.pool = "mean" if ft_cfg.head.global_pool == "avg" else "cls"
    cfg.eval.batch_size = ft_cfg.eval.batch_size
    cfg.train.device = ft_cfg.train.device
    validate(cfg)
    return cfg


def open_checkpoint(path: str | Path, *, overrides=(), device: str | None = "cpu", which: str | None = None,
                    ckpt: dict | None = None) -> LoadedCheckpoint:
    """Read any checkpoint (see the module docstring) into a :class:`LoadedCheckpoint`.

    Args:
        path: a ``.pt`` file, or an export folder.
        overrides: ``--set key=value`` items applied to the saved config (e.g. ``data.path`` when the data moved);
            for a fine-tuned classifier to its fine-tuning config and to the pre-training view, whichever has the key.
        device: ``cpu`` | ``cuda`` | ``auto``; None = the config's ``train.device``.
        which: for an export folder, the network to read (exports hold one).
        ckpt: the already-read checkpoint dict of ``path`` (avoids a second read).
    """
    p = Path(path)
    if ckpt is None:
        if p.is_dir() and not is_export_folder(p):
            raise MimkitError(f"checkpoint {p} is a folder, not a checkpoint file; accepted: a mimkit .pt file "
                              f"(e.g. {p / 'checkpoints' / 'last.pt'}) or an export folder holding model.safetensors")
        ckpt = _export_to_checkpoint(p, which) if is_export_folder(p) else load_checkpoint(p)
    kind = "export" if (ckpt.get("extra") or {}).get("export_folder") else checkpoint_kind(ckpt)
    in_chans = checkpoint_in_chans(ckpt)
    method = classifier = ft_cfg = None
    if kind == "finetune":
        from mimkit.config.finetune import finetune_config_from_dict, validate as validate_finetune
        from mimkit.models.classifier import ViTClassifier
        from mimkit.models.vit import resolve_model_spec

        ft_cfg = finetune_config_from_dict(ckpt["config"])
        cfg = _finetune_view(ft_cfg)
        _apply_overrides([cfg, ft_cfg], overrides)
        validate(cfg)
        validate_finetune(ft_cfg)
        if device:
            cfg.train.device = ft_cfg.train.device = device
        state = ckpt["student"]
        encoder = ViTEncoder(resolve_model_spec(ft_cfg.model, in_chans).encoder)
        classifier = ViTClassifier(encoder, int(state["head.weight"].shape[0]), ft_cfg.head.global_pool,
                                   ft_cfg.head.init_std)
        _load_weights(classifier, state, path, "classifier")
    else:
        cfg = config_from_dict(ckpt["config"])
        _apply_overrides([cfg], overrides)
        validate(cfg)
        if device:
            cfg.train.device = device
        method = build_method(cfg, in_chans)
        _load_weights(method.student, ckpt["student"], path, "student")
        try:
            method.load_teacher_state_dict(ckpt["teacher"])
        except RuntimeError as e:
            raise MimkitError(f"the teacher weights in {path} do not match its own saved config: "
                              f"{str(e).splitlines()[0][:200]}") from None
    dev = resolve_device(cfg.train.device)
    for module in (method, classifier):
        if module is not None:
            module.to(dev).eval()
    return LoadedCheckpoint(str(path), kind, str(ckpt.get("method")), cfg, ckpt["config"], in_chans, method,
                            classifier, int(ckpt.get("epoch") or 0), dev, ckpt, ft_cfg)


# ------------------------------------------------------------------------------------------------ checks
def check_data_channels(in_chans: int, data, checkpoint: str) -> None:
    if data.in_chans != in_chans:
        raise MimkitError(
            f"the encoder in {checkpoint} takes {in_chans}-channel images but the data ({data.name}) has "
            f"{data.in_chans}; pass --set data.channels={in_chans}"
        )


def check_same_encoder(model_cfg, saved_model: dict, in_chans: int, checkpoint: str) -> None:
    """The encoder a command's ``model.*`` settings describe must be the checkpoint's, else one line naming the
    difference."""
    from mimkit.config import ModelConfig
    from mimkit.models.vit import resolve_model_spec

    saved = ModelConfig()
    for key, value in saved_model.items():
        if hasattr(saved, key):
            setattr(saved, key, value)
    want, have = resolve_model_spec(model_cfg, in_chans).encoder, resolve_model_spec(saved, in_chans).encoder
    for field_ in ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio"):
        a, b = getattr(want, field_), getattr(have, field_)
        if a != b:
            raise MimkitError(
                f"the encoder in {checkpoint} has {field_}={b} but the settings ask for {field_}={a} "
                f"(model.* from --config/--set); drop that setting or use a checkpoint with that encoder"
            )


def check_labelled(data, command: str) -> None:
    """Downstream training needs class labels on both splits: one line otherwise."""
    if data.classes is None:
        raise MimkitError(f"{command} needs class labels, but the training split of {data.name} has none "
                          "(an image folder needs one sub-folder per class)")
    if not data.has_test:
        raise MimkitError(f"{command} needs a labelled test split, but {data.name} has none "
                          "(an image folder needs a val/ or test/ folder next to train/)")


# ------------------------------------------------------------------------------------------------ older names
@dataclass
class PretrainedEncoder:
    encoder: ViTEncoder          # on the CPU, eval mode
    which: str                   # student | teacher
    method: str                  # mae | rc-mae | sdae
    config: dict                 # the pre-training config saved in the checkpoint
    checkpoint: str
    in_chans: int


def read_pretraining_checkpoint(path: str | Path) -> dict:
    """Load a pre-training (or imported) checkpoint dict; a fine-tuned one is refused with a pointer to what
    takes it (fine-tuning starts from pre-trained encoders)."""
    ckpt = load_checkpoint(path)
    if ckpt.get("method") == FINETUNE_METHOD:
        raise MimkitError(
            f"{path} is a fine-tuned classifier; this command takes a pre-training checkpoint "
            "(a fine-tuned one goes to `mimkit eval knn|robustness`, `mimkit export` or `mimkit finetune --resume`)"
        )
    return ckpt


def load_pretrained_encoder(path: str | Path, which: str | None = None, ckpt: dict | None = None) -> PretrainedEncoder:
    """The ``which`` encoder (default: the method's own, e.g. the teacher for RC-MAE) of a pre-training checkpoint,
    through :func:`open_checkpoint`."""
    ckpt = ckpt if ckpt is not None else read_pretraining_checkpoint(path)
    loaded = open_checkpoint(path, ckpt=ckpt)
    which = which or loaded.default_which
    return PretrainedEncoder(loaded.encoder(which), which, loaded.method_name, ckpt["config"], str(path),
                             loaded.in_chans)

"""The pre-trained encoder of a checkpoint, for the downstream commands (any method, student or teacher)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mimkit.config import config_from_dict
from mimkit.errors import MimkitError
from mimkit.methods import build_method
from mimkit.models.vit import ViTEncoder
from mimkit.train.checkpoint import load_checkpoint

FINETUNE_METHOD = "finetune"  #: the ``method`` field of a fine-tuning checkpoint


@dataclass
class PretrainedEncoder:
    encoder: ViTEncoder          # on the CPU, eval mode
    which: str                   # student | teacher
    method: str                  # mae | rc-mae | sdae
    config: dict                 # the pre-training config saved in the checkpoint
    checkpoint: str
    in_chans: int


def read_pretraining_checkpoint(path: str | Path) -> dict:
    """Load a pre-training checkpoint; a fine-tuned one is refused with a pointer to what takes it."""
    ckpt = load_checkpoint(path)
    if ckpt.get("method") == FINETUNE_METHOD:
        raise MimkitError(
            f"{path} is a fine-tuned classifier; this command takes a pre-training checkpoint "
            "(a fine-tuned one goes to `mimkit eval robustness` or `mimkit finetune --resume`)"
        )
    return ckpt


def checkpoint_in_chans(ckpt: dict) -> int:
    weight = ckpt["student"].get("encoder.patch_embed.proj.weight")
    if weight is None:
        raise MimkitError("checkpoint has no encoder.patch_embed.proj.weight in its student; not a mimkit encoder")
    return int(weight.shape[1])


def load_pretrained_encoder(path: str | Path, which: str | None = None, ckpt: dict | None = None) -> PretrainedEncoder:
    """The ``which`` encoder (default: the method's own, e.g. the teacher for RC-MAE) of a pre-training checkpoint."""
    ckpt = ckpt if ckpt is not None else read_pretraining_checkpoint(path)
    cfg = config_from_dict(ckpt["config"])
    in_chans = checkpoint_in_chans(ckpt)
    method = build_method(cfg, in_chans)
    try:
        method.student.load_state_dict(ckpt["student"])
        method.load_teacher_state_dict(ckpt["teacher"])
    except RuntimeError as e:  # shapes that disagree with the saved config: a damaged or foreign file
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise MimkitError(f"the weights in {path} do not match its own saved config: {first[:200]}") from None
    which = which or cfg.eval.which or method.default_which
    if which == "teacher" and ckpt.get("teacher") is None:
        raise MimkitError(f"checkpoint {path} (method {method.name}) has no teacher; accepted --which: student")
    encoder = method.encoder(which)  # MimkitError for a method without that encoder
    encoder.eval()
    return PretrainedEncoder(encoder, which, method.name, ckpt["config"], str(path), in_chans)


def check_data_channels(in_chans: int, data, checkpoint: str) -> None:
    if data.in_chans != in_chans:
        raise MimkitError(
            f"the encoder in {checkpoint} takes {in_chans}-channel images but the data ({data.name}) has "
            f"{data.in_chans}; set data.channels={in_chans}"
        )


def check_labelled(data, command: str) -> None:
    """Downstream training needs class labels on both splits: one line otherwise."""
    if data.classes is None:
        raise MimkitError(f"{command} needs class labels, but the training split of {data.name} has none "
                          "(an image folder needs one sub-folder per class)")
    if not data.has_test:
        raise MimkitError(f"{command} needs a labelled test split, but {data.name} has none "
                          "(an image folder needs a val/ or test/ folder next to train/)")

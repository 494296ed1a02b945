"""The Python API the commands share: pre-training with the evaluation suite's kNN monitor, and loading a trained
checkpoint for evaluation, pictures and export.

:func:`pretrain` wires :func:`mimkit.eval.knn.evaluate_knn` into the training engine (which does not import the
evaluations); :func:`load_method` and :func:`load_for_eval` are thin users of
:func:`mimkit.interop.loading.open_checkpoint`, the one checkpoint reader.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mimkit.config import Config
from mimkit.errors import MimkitError
from mimkit.interop.loading import LoadedCheckpoint, open_checkpoint
from mimkit.methods import Method


def pretrain(cfg: Config, output, *, resume: bool | str = False, overrides: tuple[str, ...] = (),
             show_progress: bool | None = None, echo: bool = True, notes: tuple[str, ...] = ()) -> dict:
    """Pre-train per ``cfg`` into ``output`` with the kNN monitor (``eval.knn_every``, ``eval.knn_init`` and the
    final kNN of ``summary.json``); see :func:`mimkit.train.loop.pretrain` for the arguments."""
    from mimkit.eval.knn import evaluate_knn
    from mimkit.train.loop import pretrain as run_pretraining

    return run_pretraining(cfg, output, resume=resume, overrides=overrides, show_progress=show_progress, echo=echo,
                           knn=evaluate_knn, notes=notes)


@dataclass
class Loaded:
    cfg: Config
    method: Method | None           # None for a fine-tuned classifier (see ``checkpoint.classifier``)
    encoder: nn.Module
    which: str
    data: object
    device: torch.device
    checkpoint: LoadedCheckpoint | None = None

    def need_method(self, what: str) -> Method:
        """The pre-training method, or one line saying a fine-tuned classifier has none (no decoder, no teacher)."""
        if self.method is None:
            raise MimkitError(f"{self.checkpoint.path} is a fine-tuned classifier (encoder + head, no decoder): "
                              f"{what} needs a pre-training checkpoint")
        return self.method


def load_method(checkpoint: str | Path, overrides=(), device: str | None = None, *, need_data: bool = True):
    """Rebuild the method of a checkpoint with its weights; overrides apply to the saved config.

    Returns ``(cfg, method, data, device)``; ``method`` is None for a fine-tuned classifier."""
    loaded = open_checkpoint(checkpoint, overrides=overrides, device=device)
    data = loaded.datamodule() if need_data else None
    return loaded.config, loaded.method, data, loaded.device


def load_for_eval(checkpoint, overrides=(), device: str | None = None, which: str | None = None) -> Loaded:
    loaded = open_checkpoint(checkpoint, overrides=overrides, device=device)
    which = which or loaded.default_which
    encoder = loaded.encoder(which)
    return Loaded(loaded.config, loaded.method, encoder, which, loaded.datamodule(), loaded.device, loaded)


def result_path(checkpoint: str | Path, output: str | None, filename: str) -> Path:
    """Where an evaluation writes its JSON: ``--output`` if given, else the checkpoint's run folder."""
    if output:
        out = Path(output)
        out.mkdir(parents=True, exist_ok=True)
        return out / filename
    ckpt = Path(checkpoint).resolve()
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    if not run_dir.is_dir():
        raise MimkitError(f"cannot find a folder for {filename} next to {checkpoint}; pass --output DIR")
    return run_dir / filename


#: evaluation keys that change what is measured (and so get their own result file)
NAMING_EVAL_KEYS = ("eval.pool", "eval.knn_k", "eval.knn_t")


def eval_result_name(kind: str, *, which: str, default_which: str, random_init: int | None = None,
                     overrides=()) -> str:
    """``eval_<kind>.json`` for the checkpoint's own settings; other settings get their own file, e.g.
    ``eval_knn-init0.json`` (random init, seed 0), ``eval_knn-student.json`` (not the default encoder),
    ``eval_knn-max_test1000.json`` (``--set data.max_test=1000``): what is measured (encoder, data, pooling, k) names
    the file, so those never overwrite each other; how a probe is trained (``train.*``, ``aug.*``) is recorded in the
    JSON and in ``eval_history.jsonl`` only."""
    import re

    from mimkit.config import parse_override

    tags = []
    if random_init is not None:
        tags.append(f"init{random_init}")
    elif which != default_which:
        tags.append(which)
    for item in sorted(overrides):
        key, value = parse_override(item)
        if not (key.startswith(("data.", "model.")) or key in NAMING_EVAL_KEYS) or key == "data.num_workers":
            continue
        text = f"{key.split('.')[-1]}{value if not isinstance(value, list) else '-'.join(map(str, value))}"
        tags.append(re.sub(r"[^A-Za-z0-9_.+-]", "", text.replace("/", "_"))[:40])
    return f"eval_{kind}" + "".join(f"-{t}" for t in tags) + ".json"


def record_evaluation(out: Path, result: dict) -> Path:
    """Write ``result`` to ``out`` and append it to ``eval_history.jsonl`` next to it (every evaluation, in order)."""
    import json
    import time

    from mimkit.train.runlog import write_json

    write_json(out, result)
    history = out.parent / "eval_history.jsonl"
    with history.open("a") as f:
        f.write(json.dumps({"file": out.name, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **result}) + "\n")
    return history


def evaluation_settings(loaded, data, *, which: str, random_init: int | None, overrides=()) -> dict:
    """What an evaluation result depends on, recorded in its JSON."""
    d = loaded.config.data
    return {
        "checkpoint": str(loaded.path), "checkpoint_kind": loaded.kind, "checkpoint_epoch": loaded.epoch,
        "method": loaded.method_name, "which": "init" if random_init is not None else which,
        "random_init_seed": random_init, "data": d.name, "data_path": d.path, "max_train": d.max_train,
        "max_test": d.max_test, "train_images": data.num_train, "overrides": list(overrides),
    }

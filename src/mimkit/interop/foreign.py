"""Import weights from elsewhere: official MAE / RC-MAE / SdAE checkpoints, timm and Hugging Face folders.

:func:`import_checkpoint` reads a foreign file or folder **without executing pickled code**, finds the
state dict of the requested network (student or teacher), renames it to our keys, checks it against the
keys a :class:`~mimkit.models.vit.ViTEncoder` of the inferred shape has (missing and unexpected keys are
reported by name), and infers the shapes (image and patch size, channels, width, depth, MLP ratio) from
the tensors. The result goes into any method with :func:`apply_import`; ``mimkit import`` writes it as a
mimkit checkpoint, so every ``eval`` / ``visualize`` / ``export`` command can use it.

Accepted inputs:

* ``.pth`` / ``.pt`` dicts as the official codes save them: ``model`` (the student MAE: timm-named
  encoder keys plus a top-level decoder ``decoder_embed``, ``mask_token``, ``decoder_pos_embed``,
  ``decoder_blocks.i``, ``decoder_norm``, ``decoder_pred``), ``teacher`` (RC-MAE: a full MAE),
  ``model_teacher`` / ``model_ema`` (SdAE and others: an encoder), ``args`` (an argparse Namespace),
  optimiser state and so on. A bare state dict works too; ``module.`` prefixes (DDP) are removed.
* a timm folder or file (``config.json`` + ``model.safetensors``, e.g. our ``--format timm`` export), or
  any ``.safetensors`` / ``.pth`` holding timm ``VisionTransformer`` keys (``head`` / ``fc_norm`` ignored).
* a Hugging Face ``ViTMAEForPreTraining`` / ``ViTMAEModel`` / ``ViTModel`` folder (``config.json`` +
  ``model.safetensors`` or ``pytorch_model.bin``).

Safety: pickles load with ``torch.load(weights_only=True)``, which constructs tensors and plain Python
containers only. ``argparse.Namespace`` (the ``args`` entry of every official checkpoint) is allowed as
well: it is a plain attribute bag, its contents still go through the same restricted unpickler. Any
other global is refused with a message naming it, unless the caller passes ``trust=True``
(``--trust-checkpoint``), which unpickles with full Python and can run arbitrary code.

Attention heads cannot be read off the weights. They come from, in order: the caller, the file's own
metadata (HF / timm ``config.json``, the ``model`` name in ``args``), the standard ViT table (64-wide heads:
192 -> 3, 384 -> 6, 768 -> 12, 1024 -> 16, 1280 -> 16; MAE decoders 512 -> 16, 256 -> 8, 128 -> 4).
"""

from __future__ import annotations

import argparse
import json
import math
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mimkit.errors import MimkitError
from mimkit.interop import keys as K
from mimkit.models.vit import VIT_SIZES, EncoderSpec

State = dict[str, Tensor]

#: classes a checkpoint may contain beyond tensors and containers, safe to construct (data only)
SAFE_GLOBALS: list[type] = [argparse.Namespace]
#: where the official codes keep their networks: MAE ``model``; RC-MAE ``student[_without_ddp]`` and
#: ``teacher[_without_ddp]`` (full MAEs); SdAE ``model`` and ``model_teacher`` (an encoder); timm ``state_dict``
STUDENT_ENTRIES = ("model", "student_without_ddp", "student", "state_dict", "model_state_dict")
TEACHER_ENTRIES = ("teacher_without_ddp", "teacher", "model_teacher", "model_ema", "teacher_model", "ema")
RC_MAE_TEACHERS = ("teacher_without_ddp", "teacher")
#: classifier parts of fine-tuned / timm checkpoints: not part of a pre-trained encoder, dropped with a note
IGNORED_PREFIXES = ("head.", "fc_norm.", "head_dist.", "classifier.", "pooler.")
#: standard heads by width (ViT: 64-wide heads, ViT-H 80); MAE decoders
ENCODER_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}
DECODER_HEADS = {512: 16, 256: 8, 128: 4}
MAX_NAMES = 8


@dataclass
class ImportedWeights:
    """A foreign network in our terms.

    Attributes:
        encoder: state dict in :class:`ViTEncoder` (timm) key names.
        spec: the encoder's shapes, inferred from the weights (and heads as described above).
        decoder: MAE pixel decoder state in :class:`MAEDecoder` key names (no ``decoder.`` prefix), or None
            when the file has none, or one that does not predict pixels (SdAE), or with unknown heads.
        decoder_shape: (dim, depth, heads) of ``decoder``.
        source: the layout that was recognised, e.g. ``"official"``, ``"timm"``, ``"hf vit_mae"``.
        entry: the checkpoint entry the weights came from (``model``, ``teacher`` ...; None for folders).
        which: ``student`` or ``teacher``.
        hints: config values found in the file (``method.norm_pix_loss``, ``method.mask_ratio``).
        notes: one line per thing the user should know (ignored keys, inferred heads, dropped decoder).
    """

    encoder: State
    spec: EncoderSpec
    decoder: State | None = None
    decoder_shape: tuple[int, int, int] | None = None
    source: str = ""
    entry: str | None = None
    which: str = "student"
    hints: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def config_values(self) -> dict[str, Any]:
        """Dotted config keys describing these weights (for :func:`mimkit.config.build_config`'s ``extra``)."""
        s = self.spec
        name = min(VIT_SIZES, key=lambda n: abs(VIT_SIZES[n][0] - s.embed_dim))
        out: dict[str, Any] = {
            "model.name": name, "model.img_size": s.img_size, "model.patch_size": s.patch_size,
            "model.embed_dim": s.embed_dim, "model.depth": s.depth, "model.num_heads": s.num_heads,
            "model.mlp_ratio": s.mlp_ratio,
        }
        if self.decoder_shape is not None:
            dim, depth, heads = self.decoder_shape
            out.update({"model.decoder_dim": dim, "model.decoder_depth": depth, "model.decoder_heads": heads})
        out.update(self.hints)
        return out


# ------------------------------------------------------------------------------------------ reading
def _names(items, limit: int = MAX_NAMES) -> str:
    items = sorted(items)
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _unsafe_globals(path: Path) -> list[str]:
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # older torch, or a legacy (non-zip) file: the error message is all we have
        return []
    allowed = {f"{c.__module__}.{c.__qualname__}" for c in SAFE_GLOBALS}
    return [g for g in found if g not in allowed]


def read_foreign_file(path: str | Path, trust: bool = False) -> Any:
    """Load a ``.safetensors`` file or a torch pickle without running code (see the module docstring).

    ``trust=True`` falls back to a full unpickling when the restricted one refuses the file.
    """
    path = Path(path)
    if not path.is_file():
        raise MimkitError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # safetensors raises its own error types
            raise MimkitError(f"{path} is not a readable .safetensors file ({str(e).splitlines()[0][:120]})") from None
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if trust:
            return torch.load(path, map_location="cpu", weights_only=False)
        names = _unsafe_globals(path)
        if not names:
            m = re.search(r"GLOBAL ([\w.]+)", str(e))
            names = [m.group(1)] if m else ["an object that is not a tensor"]
        raise MimkitError(
            f"{path} needs Python objects beyond tensors to load ({_names(names, 4)}); unpickling them can run "
            "arbitrary code, so it was refused. If you trust where the file comes from, pass --trust-checkpoint "
            "(import_checkpoint(..., trust=True))"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise MimkitError(f"{path} cannot be read as a torch checkpoint ({reason[:160]})") from None


def _read_weights_in(folder: Path, trust: bool) -> State:
    for name in ("model.safetensors", "pytorch_model.bin", "model.pth", "model.pt"):
        if (folder / name).is_file():
            state = read_foreign_file(folder / name, trust)
            if not isinstance(state, dict):
                raise MimkitError(f"{folder / name} does not hold a state dict")
            return state
    raise MimkitError(
        f"folder {folder} has no weights; accepted: model.safetensors or pytorch_model.bin next to config.json"
    )


# ------------------------------------------------------------------------------------------ layouts
def _is_state(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, Tensor) for v in obj.values())


def _strip_wrappers(state: State) -> State:
    """Remove the ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes of the keys."""
    out = {}
    for k, v in state.items():
        for prefix in ("module.", "_orig_mod."):
            k = k.removeprefix(prefix)
        out[k] = v
    return out


def _pick_entry(obj: dict, which: str | None, path: Path) -> tuple[State, str | None, str]:
    """(state dict, entry name, which) from a checkpoint dict."""
    if _is_state(obj):
        if which == "teacher":
            raise MimkitError(f"{path} holds a single state dict, no teacher; accepted: --which student")
        return obj, None, "student"
    student = next((e for e in STUDENT_ENTRIES if _is_state(obj.get(e))), None)
    teacher = next((e for e in TEACHER_ENTRIES if _is_state(obj.get(e))), None)
    found = [k for k, v in obj.items() if _is_state(v)]
    if which is None:
        # RC-MAE files (``teacher``): the teacher is the downstream model (rc-mae App. F.1);
        # SdAE and others (``model_teacher``, ``model_ema``): the student (sdae Sec. 4.4).
        which = "teacher" if teacher in RC_MAE_TEACHERS or student is None else "student"
    entry = teacher if which == "teacher" else student
    if entry is None:
        raise MimkitError(
            f"{path} has no {which} weights; entries holding tensors: {_names(found) or 'none'}; "
            f"accepted entry names: {', '.join(TEACHER_ENTRIES if which == 'teacher' else STUDENT_ENTRIES)}"
        )
    return obj[entry], entry, which


def _split_layout(state: State) -> tuple[str, State, State]:
    """Recognise the key layout; -> (source name, encoder state in our names, decoder state in ours).

    Keys that were understood are removed from ``state``; what remains is unexpected.
    """
    if any(k.startswith(("vit.embeddings.", "embeddings.patch_embeddings.")) for k in state):
        prefix = "vit." if any(k.startswith("vit.") for k in state) else ""
        return "hf", K.encoder_from_hf(state, prefix), K.decoder_from_hf(state)
    if any(k.startswith("encoder.") for k in state):  # our own MaskedAutoencoder layout
        return "mimkit", K.take_prefix(state, "encoder."), K.take_prefix(state, "decoder.")
    decoder = K.decoder_from_official(state)
    encoder = {k: state.pop(k) for k in K.encoder_keys(K.count_blocks(state, "blocks.")) if k in state}
    return ("official" if decoder else "timm"), encoder, decoder


def _heads(dim: int, given: int | None, meta: int | None, table: dict[int, int]) -> tuple[int | None, str]:
    if given:
        return given, "given"
    if meta:
        return meta, "from the file"
    return table.get(dim), "standard for this width"


def _args_dict(obj: Any) -> dict:
    args = obj.get("args") if isinstance(obj, dict) else None
    if isinstance(args, argparse.Namespace):
        return vars(args)
    return args if isinstance(args, dict) else {}


def _infer_spec(enc: State, heads: int | None, heads_origin: str, notes: list[str], path: Path) -> EncoderSpec:
    w = enc["patch_embed.proj.weight"]
    dim, in_chans, p = w.shape[0], w.shape[1], w.shape[-1]
    n = enc["pos_embed"].shape[1] - 1
    grid = math.isqrt(n)
    if grid * grid != n or w.shape[-1] != w.shape[-2]:
        raise MimkitError(f"{path}: {n} position embeddings (+ cls) and patch {tuple(w.shape[-2:])} are not a "
                          "square grid of square patches; only square images are supported")
    depth = K.count_blocks(enc, "blocks.")
    mlp_ratio = enc["blocks.0.mlp.fc1.weight"].shape[0] / dim if depth else 4.0
    if heads is None:
        raise MimkitError(
            f"{path}: cannot tell the number of attention heads of a {dim}-wide encoder; "
            f"pass --set model.num_heads=N (N divides {dim})"
        )
    if dim % heads:
        raise MimkitError(f"{path}: model.num_heads={heads} does not divide the encoder width {dim}")
    if heads_origin == "standard for this width":
        notes.append(f"encoder heads: {heads} ({heads_origin}; override with --set model.num_heads=N)")
    return EncoderSpec(img_size=grid * p, patch_size=p, in_chans=in_chans, embed_dim=dim, depth=depth,
                       num_heads=heads, mlp_ratio=mlp_ratio)


def _check_encoder(enc: State, leftover: State, notes: list[str], path: Path) -> None:
    ignored = [k for k in leftover if k.startswith(IGNORED_PREFIXES)]
    for k in ignored:
        leftover.pop(k)
    if ignored:
        notes.append(f"ignored keys (classifier / pooler heads): {_names(ignored)}")
    if "patch_embed.proj.weight" not in enc or "pos_embed" not in enc:
        missing = [k for k in ("patch_embed.proj.weight", "pos_embed") if k not in enc]
        raise MimkitError(
            f"{path} does not look like a ViT encoder: missing {_names(missing)}; "
            f"keys found: {_names(list(enc) + list(leftover))}"
        )
    missing = [k for k in K.encoder_keys(K.count_blocks(enc, "blocks.")) if k not in enc]
    if missing or leftover:
        parts = ([f"missing keys: {_names(missing)}"] if missing else []) + (
            [f"unexpected keys: {_names(leftover)}"] if leftover else [])
        if "norm.weight" in missing and "fc_norm.weight" in ignored:
            parts.append("the file normalises after pooling (fc_norm), the encoders here normalise every token (norm)")
        raise MimkitError(f"{path}: the weights do not match a ViT encoder with timm names; {'; '.join(parts)}")


def _take_decoder(dec: State, spec: EncoderSpec, heads: int | None, heads_origin: str, notes: list[str]):
    """-> (decoder state, (dim, depth, heads)) or (None, None) with a note saying why."""
    if not dec:
        return None, None
    depth = K.count_blocks(dec, "blocks.")
    missing = [k for k in K.decoder_keys(depth) if k not in dec]
    unexpected = [k for k in dec if k not in set(K.decoder_keys(depth))]
    if missing or unexpected:
        notes.append(f"decoder not imported: missing {_names(missing) or 'nothing'}, "
                     f"unexpected {_names(unexpected) or 'nothing'}")
        return None, None
    dim = dec["embed.weight"].shape[0]
    out_dim = dec["pred.weight"].shape[0]
    pixels = spec.patch_size**2 * spec.in_chans
    if out_dim != pixels:
        notes.append(f"decoder not imported: it predicts {out_dim} values per patch, not {pixels} pixels "
                     "(a feature decoder, e.g. SdAE's); a fresh pixel decoder is used")
        return None, None
    if depth and dec["blocks.0.mlp.fc1.weight"].shape[0] != round(dim * spec.mlp_ratio):
        notes.append("decoder not imported: its MLP ratio differs from the encoder's (one ratio for both here)")
        return None, None
    if heads is None or dim % heads:
        notes.append(f"decoder not imported: unknown attention heads for width {dim}; "
                     "pass --set model.decoder_heads=N to keep it")
        return None, None
    if heads_origin == "standard for this width":
        notes.append(f"decoder heads: {heads} ({heads_origin}; override with --set model.decoder_heads=N)")
    return dec, (dim, depth, heads)


# ------------------------------------------------------------------------------------------ import
def import_checkpoint(path: str | Path, *, which: str | None = None, trust: bool = False,
                      num_heads: int | None = None, decoder_heads: int | None = None) -> ImportedWeights:
    """Read a foreign checkpoint file or folder; see the module docstring.

    Args:
        path: ``.pth``/``.pt``/``.bin``/``.safetensors`` file, or a timm / Hugging Face folder.
        which: ``student`` or ``teacher``; None = ``teacher`` for RC-MAE-style files (a ``teacher`` entry),
            else ``student``.
        trust: allow full unpickling of files the restricted loader refuses (can run code).
        num_heads, decoder_heads: attention heads when the file does not say (see the module docstring).
    """
    if which not in (None, "student", "teacher"):
        raise MimkitError(f"unknown --which {which!r}; accepted: student, teacher")
    path = Path(path)
    notes: list[str] = []
    hints: dict[str, Any] = {}
    meta_heads = meta_dec_heads = None
    folder = path if path.is_dir() else (path.parent if path.suffix == ".safetensors"
                                         and (path.parent / "config.json").is_file() else None)
    if folder is not None:
        cfg_file = folder / "config.json"
        if not cfg_file.is_file():
            raise MimkitError(f"folder {folder} has no config.json; accepted: a timm or Hugging Face model folder")
        try:
            cfg = json.loads(cfg_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise MimkitError(f"{cfg_file} is not valid JSON ({e})") from None
        state = read_foreign_file(path, trust) if path.is_file() else _read_weights_in(folder, trust)
        if which == "teacher":
            raise MimkitError(f"{path} holds one network; accepted: --which student")
        entry, chosen = None, "student"
        if "model_type" in cfg:  # Hugging Face
            if cfg["model_type"] not in ("vit", "vit_mae"):
                raise MimkitError(
                    f"{cfg_file}: model_type {cfg['model_type']!r} is not supported; accepted: vit, vit_mae")
            meta_heads, meta_dec_heads = cfg.get("num_attention_heads"), cfg.get("decoder_num_attention_heads")
            if cfg.get("hidden_act", "gelu") != "gelu":
                raise MimkitError(f"{cfg_file}: hidden_act {cfg['hidden_act']!r} is not supported; accepted: gelu")
            if cfg.get("layer_norm_eps", 1e-6) != 1e-6:
                notes.append(f"LayerNorm eps {cfg['layer_norm_eps']} in the file, 1e-6 here (tiny numerical change)")
            if cfg["model_type"] == "vit_mae":
                hints.update({"method.norm_pix_loss": bool(cfg.get("norm_pix_loss", False)),
                              "method.mask_ratio": float(cfg.get("mask_ratio", 0.75))})
        else:  # timm
            meta_heads = (cfg.get("model_args") or {}).get("num_heads")
    else:
        obj = read_foreign_file(path, trust)
        if not isinstance(obj, dict):
            raise MimkitError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict or state dict")
        if str(obj.get("format", "")).startswith("mimkit-checkpoint"):
            raise MimkitError(f"{path} is already a mimkit checkpoint; use it directly with --checkpoint")
        state, entry, chosen = _pick_entry(obj, which, path)
        args = _args_dict(obj)
        if isinstance(args.get("norm_pix_loss"), bool):
            hints["method.norm_pix_loss"] = args["norm_pix_loss"]
        if isinstance(args.get("mask_ratio"), (int, float)) and not isinstance(args["mask_ratio"], bool):
            hints["method.mask_ratio"] = float(args["mask_ratio"])

    leftover = _strip_wrappers(dict(state))
    source, enc, dec = _split_layout(leftover)
    if source == "hf" and folder is not None:
        source = f"hf {cfg['model_type']}"
    _check_encoder(enc, leftover, notes, path)
    dim = enc["patch_embed.proj.weight"].shape[0]
    spec = _infer_spec(enc, *_heads(dim, num_heads, meta_heads, ENCODER_HEADS), notes, path)
    ddim = dec["embed.weight"].shape[0] if "embed.weight" in dec else 0
    decoder, dshape = _take_decoder(dec, spec, *_heads(ddim, decoder_heads, meta_dec_heads, DECODER_HEADS), notes)
    if decoder is not None and "method.norm_pix_loss" not in hints:
        notes.append("the file does not say whether its decoder was trained with norm_pix_loss; the config value "
                     "is kept (default true): pass --set method.norm_pix_loss=false if it was not")
    return ImportedWeights(encoder=enc, spec=spec, decoder=decoder, decoder_shape=dshape, source=source,
                           entry=entry, which=chosen, hints=hints, notes=notes)


# ------------------------------------------------------------------------------------------ apply
def _load_strict(module: torch.nn.Module, state: State, what: str) -> None:
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    bad = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
           if k in state and state[k].shape != v.shape]
    if missing or unexpected or bad:
        parts = ([f"missing keys: {_names(missing)}"] if missing else []) + (
            [f"unexpected keys: {_names(unexpected)}"] if unexpected else []) + (
            [f"shape mismatch: {_names(bad, 4)}"] if bad else [])
        raise MimkitError(f"imported {what} does not fit the configured model ({'; '.join(parts)}); "
                          "do not override model shapes that the weights fix")
    module.load_state_dict(state)


def apply_import(method, imported: ImportedWeights) -> list[str]:
    """Load imported weights into a method built for ``imported.spec``: the student's encoder, its
    decoder when the import has a compatible one (else the fresh one stays), and the EMA teacher (if
    any) as a copy of the student, as at the start of a run. Returns notes (one line each)."""
    notes: list[str] = []
    _load_strict(method.student.encoder, imported.encoder, "encoder")
    if imported.decoder is not None:
        want, have = method.student.decoder.pred.out_features, imported.decoder["pred.weight"].shape[0]
        if want != have:  # e.g. SdAE's decoder predicts features, the imported one pixels
            notes.append(f"decoder: freshly initialised (method {method.name}'s predicts {want} values per patch, "
                         f"the imported one {have})")
        else:
            _load_strict(method.student.decoder, imported.decoder, "decoder")
    else:
        notes.append("decoder: freshly initialised (none imported)")
    teacher = method.teacher_state_dict()
    if teacher is not None:
        src = method.student.state_dict()
        if set(teacher) != set(src):
            src = method.student.encoder.state_dict()
        method.load_teacher_state_dict({k: src[k].clone() for k in teacher})
        notes.append(f"teacher: a copy of the imported {imported.which} (method {method.name})")
    return notes


def imported_checkpoint(imported: ImportedWeights, cfg, origin: str = "") -> tuple[dict, list[str]]:
    """A mimkit checkpoint (dict, epoch 0, no optimiser) holding ``imported`` in the method of ``cfg``."""
    from mimkit.methods import build_method
    from mimkit.train.checkpoint import make_checkpoint

    method = build_method(cfg, imported.spec.in_chans)
    notes = apply_import(method, imported)
    ckpt = make_checkpoint(
        method_name=method.name, config=cfg.to_dict(), student=method.student.state_dict(),
        teacher=method.teacher_state_dict(), optimizer=None, scaler=None, global_step=0, epoch=0,
        extra={"imported_from": origin, "import_source": imported.source, "import_entry": imported.entry,
               "import_which": imported.which},
    )
    return ckpt, notes

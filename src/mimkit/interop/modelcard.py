"""Model cards: the ``README.md`` that ``mimkit export`` writes into timm and Hugging Face export folders.

The Hub's model-card format: YAML metadata between ``---`` lines (``library_name``, ``pipeline_tag``,
``tags``; ``license`` when given) followed by Markdown: the method
and its paper (with BibTeX), the architecture, the pre-training data and schedule, the run's kNN / probe
numbers (``summary.json`` and ``eval_*.json`` of the checkpoint's run folder, when there) and how to load
the folder with timm or transformers. The folder is then ready for ``huggingface-cli upload``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from mimkit import __version__

PAPERS: dict[str, tuple[str, str]] = {
    "mae": ("He et al., *Masked Autoencoders Are Scalable Vision Learners*, CVPR 2022",
            "@inproceedings{he2022masked,\n  title={Masked Autoencoders Are Scalable Vision Learners},\n"
            "  author={He, Kaiming and Chen, Xinlei and Xie, Saining and Li, Yanghao and Doll{\\'a}r, Piotr and "
            "Girshick, Ross},\n  booktitle={CVPR},\n  year={2022}\n}"),
    "rc-mae": ("Lee et al., *Exploring the Role of Mean Teachers in Self-Supervised Masked Auto-Encoders*, ICLR 2023",
               "@inproceedings{lee2023exploring,\n  title={Exploring the Role of Mean Teachers in Self-Supervised "
               "Masked Auto-Encoders},\n  author={Lee, Youngwan and Willette, Jeffrey and Kim, Jonghee and Lee, Juho "
               "and Hwang, Sung Ju},\n  booktitle={ICLR},\n  year={2023}\n}"),
    "sdae": ("Chen et al., *SdAE: Self-distillated Masked Autoencoder*, ECCV 2022",
             "@inproceedings{chen2022sdae,\n  title={SdAE: Self-distillated Masked Autoencoder},\n  author={Chen, "
             "Yabo and Liu, Yuchen and Jiang, Dongsheng and Zhang, Xiaopeng and Dai, Wenrui and Xiong, Hongkai and "
             "Tian, Qi},\n  booktitle={ECCV},\n  year={2022}\n}"),
}
PAPERS["rc-mae-free"] = PAPERS["rc-mae"]  # a teacher-free variant of RC-MAE (methods/rc_mae_free.py)
NAMES = {"mae": "MAE", "rc-mae": "RC-MAE", "sdae": "SdAE", "rc-mae-free": "RC-MAE (teacher-free variant)"}


def run_results(checkpoint: str | Path) -> list[tuple[str, str, float]]:
    """(file, key, value) of the accuracy numbers in the checkpoint's run folder: ``summary.json`` and every
    ``eval_*.json`` (top-level numbers whose key holds ``top1`` or ``acc``)."""
    ckpt = Path(checkpoint).resolve()
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    out = []
    for path in [run_dir / "summary.json", *sorted(run_dir.glob("eval_*.json"))]:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict):
            continue
        for key, value in sorted(data.items()):
            if isinstance(value, (int, float)) and not isinstance(value, bool) and ("top1" in key or "acc" in key):
                which = f" ({data['which']})" if isinstance(data.get("which"), str) else ""
                out.append((path.name + which, key, float(value)))
    return out


def model_card(fmt: str, cfg: dict[str, Any], spec, *, which: str, epochs_done: int | None,
               results: list[tuple[str, str, float]], license_id: str | None = None) -> str:
    """The README.md text of an export folder (``fmt`` = ``timm``, ``hf`` or ``hf-vit``)."""
    method = str((cfg.get("method") or {}).get("name", "unknown"))
    name = NAMES.get(method, method)
    paper, bibtex = PAPERS.get(method, ("", ""))
    data, train = cfg.get("data") or {}, cfg.get("train") or {}
    library = "timm" if fmt == "timm" else "transformers"
    meta: dict[str, Any] = {
        "library_name": library,
        "pipeline_tag": "image-feature-extraction",
        "tags": ["mimkit", "vision-transformer", "self-supervised", "masked-image-modeling", method, library],
    }
    if license_id:
        meta["license"] = license_id
    if data.get("name") == "hf" and data.get("path") and not Path(str(data["path"])).exists():
        meta["datasets"] = [data["path"]]  # a Hub data set id
    arch = (f"ViT, {spec.img_size}x{spec.img_size} px, patch {spec.patch_size}, {spec.in_chans} channel(s), width "
            f"{spec.embed_dim}, depth {spec.depth}, {spec.num_heads} heads, MLP ratio {spec.mlp_ratio:g}")
    what = {"timm": "the encoder (timm `VisionTransformer`, no classifier head)",
            "hf": "the masked auto-encoder, encoder + pixel decoder (`ViTMAEForPreTraining`)",
            "hf-vit": "the encoder (`ViTModel`, no pooler)"}[fmt]
    source = str(data.get("name", "?")) + (f" (`{Path(str(data['path'])).name}`)" if data.get("path") else "")
    lines = [
        "---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
        f"# {name} {spec.embed_dim}-d ViT/{spec.patch_size} ({which})", "",
        f"Self-supervised pre-training with **{name}**" + (f" ({paper})" if paper else "") +
        f", trained with mimkit {__version__}. This folder holds {what}; "
        f"weights of the {which} network.", "",
        "## Model", "",
        f"- Architecture: {arch}",
        f"- Method: `{method}`, mask ratio {cfg.get('method', {}).get('mask_ratio')}"
        + (f", mask mode {cfg['method'].get('mask_mode')}" if method.startswith("rc-mae") else ""),
        f"- Data: {source}, images {spec.img_size} px",
        f"- Schedule: {epochs_done if epochs_done is not None else '?'} of {train.get('epochs', '?')} epochs, batch "
        f"{train.get('batch_size', '?')} x {train.get('accum_steps', 1)} accumulation per process, base lr "
        f"{train.get('blr', '?')}, weight decay {train.get('weight_decay', '?')}, seed {train.get('seed', '?')}", "",
        "## Results of this run", "",
    ]
    if results:
        lines += ["| file | metric | value |", "|---|---|---|"]
        lines += [f"| {f} | {k} | {v:.4f} |" for f, k, v in results]
    else:
        lines.append("No evaluation results were found next to the checkpoint (`mimkit eval knn|linprobe` writes them).")
    lines += ["", "## How to load", ""]
    if fmt == "timm":
        lines += ["```python", "import timm", "", 'model = timm.create_model("hf-hub:USER/REPO", pretrained=True)  '
                  '# or "local-dir:PATH/TO/THIS/FOLDER"',
                  "features = model.forward_features(images)  # (B, 1 + patches, width)",
                  "pooled = model.forward_head(features, pre_logits=True)", "```"]
    elif fmt == "hf":
        lines += ["```python", "from transformers import ViTMAEForPreTraining, ViTImageProcessor", "",
                  'model = ViTMAEForPreTraining.from_pretrained("USER/REPO")  # or the local folder',
                  'processor = ViTImageProcessor.from_pretrained("USER/REPO")',
                  "out = model(**processor(images=image, return_tensors=\"pt\"))  # out.loss, out.logits (pixels)",
                  "```"]
    else:
        lines += ["```python", "from transformers import ViTModel, ViTImageProcessor", "",
                  'model = ViTModel.from_pretrained("USER/REPO", add_pooling_layer=False)  # or the local folder',
                  'processor = ViTImageProcessor.from_pretrained("USER/REPO")',
                  'features = model(**processor(images=image, return_tensors="pt")).last_hidden_state', "```"]
    lines += ["", "Upload: `huggingface-cli upload USER/REPO PATH/TO/THIS/FOLDER`.", ""]
    if bibtex:
        lines += ["## Citation", "", "```bibtex", bibtex, "```", ""]
    return "\n".join(lines)


def write_model_card(folder: str | Path, fmt: str, checkpoint: str | Path, which: str,
                     license_id: str | None = None) -> Path:
    """Write ``folder/README.md`` for the export of ``checkpoint``."""
    from mimkit.config import config_from_dict
    from mimkit.interop.loading import is_export_folder, open_checkpoint
    from mimkit.train.checkpoint import load_checkpoint
    from mimkit.interop.export import _replace_into

    # the one checkpoint reader (uniform errors; an export folder is read back through the import path)
    ckpt = open_checkpoint(checkpoint).raw if is_export_folder(checkpoint) else load_checkpoint(checkpoint)
    try:
        cfg = config_from_dict(ckpt["config"]).to_dict()  # pre-training: the resolved, validated config
    except Exception:  # e.g. a fine-tuning checkpoint: its own config sections, used as they are
        cfg = dict(ckpt.get("config") or {})
    spec = _spec_from_folder(Path(folder), fmt)
    text = model_card(fmt, cfg, spec, which=which, epochs_done=ckpt.get("epoch"), results=run_results(checkpoint),
                      license_id=license_id)
    _replace_into(Path(folder), "README.md", lambda p: p.write_text(text))
    return Path(folder) / "README.md"


class _Spec:
    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)


def _spec_from_folder(folder: Path, fmt: str) -> _Spec:
    """The encoder shape from the export's own ``config.json`` (what a reader of the card will load)."""
    c = json.loads((folder / "config.json").read_text())
    if fmt == "timm":
        a = c["model_args"]
        return _Spec(img_size=a["img_size"], patch_size=a["patch_size"], in_chans=a["in_chans"],
                     embed_dim=a["embed_dim"], depth=a["depth"], num_heads=a["num_heads"], mlp_ratio=a["mlp_ratio"])
    return _Spec(img_size=c["image_size"], patch_size=c["patch_size"], in_chans=c["num_channels"],
                 embed_dim=c["hidden_size"], depth=c["num_hidden_layers"], num_heads=c["num_attention_heads"],
                 mlp_ratio=c["intermediate_size"] / c["hidden_size"])

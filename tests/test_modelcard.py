"""`mimkit export` writes a Hub model card (README.md with YAML metadata) into timm and Hugging Face folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import TINY
from mimkit.cli import main
from mimkit.config import build_config
from mimkit.methods import build_method
from mimkit.train.checkpoint import atomic_save, make_checkpoint


def _run_folder(root: Path, method: str) -> Path:
    """A run folder with a tiny checkpoint after 3 epochs, its summary and a linear-probe result."""
    cfg = build_config(None, [*TINY, f"method.name={method}"])
    torch.manual_seed(0)
    m = build_method(cfg, in_chans=1)
    ckpt = make_checkpoint(method_name=m.name, config=cfg.to_dict(), student=m.student.state_dict(),
                           teacher=m.teacher_state_dict(), optimizer=None, scaler=None, global_step=24, epoch=3)
    atomic_save(ckpt, root / "checkpoints" / "last.pt")
    (root / "summary.json").write_text(json.dumps({"knn_top1": 0.4321, "knn_top1_init": 0.25, "final_loss": 0.7}))
    (root / "eval_linprobe.json").write_text(json.dumps({"top1": 0.5678, "which": "teacher"}))
    return root / "checkpoints" / "last.pt"


@pytest.mark.parametrize("fmt,library,method", [("timm", "timm", "rc-mae"), ("hf", "transformers", "mae"),
                                                ("hf-vit", "transformers", "sdae")])
def test_export_writes_a_hub_model_card(tmp_path, capsys, fmt, library, method):
    hub = pytest.importorskip("huggingface_hub")
    ckpt = _run_folder(tmp_path / "run", method)
    out = tmp_path / fmt
    assert main(["export", "--format", fmt, "--checkpoint", str(ckpt), "--out", str(out)]) == 0
    assert f"model card: {out / 'README.md'}" in capsys.readouterr().out
    card = hub.ModelCard.load(out / "README.md")  # the Hub's own parser of the metadata block
    assert card.data.library_name == library and card.data.pipeline_tag == "image-feature-extraction"
    assert method in card.data.tags and "self-supervised" in card.data.tags
    text = card.text
    paper = {"mae": "He et al.", "rc-mae": "Lee et al.", "sdae": "Chen et al."}[method]
    bib = {"mae": "he2022masked", "rc-mae": "lee2023exploring", "sdae": "chen2022sdae"}[method]
    assert paper in text and f"@inproceedings{{{bib}," in text
    assert "| summary.json | knn_top1 | 0.4321 |" in text and "| eval_linprobe.json (teacher) | top1 | 0.5678 |" in text
    assert "3 of 3 epochs" in text and "Data: demo" in text
    # the architecture line is the export's own shape
    config = json.loads((out / "config.json").read_text())
    width = config["model_args"]["embed_dim"] if fmt == "timm" else config["hidden_size"]
    assert f"width {width}, depth 2, 2 heads" in text
    loader = {"timm": 'timm.create_model("hf-hub:USER/REPO"', "hf": "ViTMAEForPreTraining.from_pretrained",
              "hf-vit": "ViTModel.from_pretrained"}[fmt]
    assert loader in text and "huggingface-cli upload" in text

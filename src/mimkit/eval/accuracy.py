"""Top-1 / top-5 accuracy and cross-entropy of a classifier over labelled batches."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm


def topk_correct(logits: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, int]:
    """Number of samples whose label is among the ``k`` highest logits, for each ``k`` (capped at the class count)."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices
    hit = top == labels[:, None]
    return {k: int(hit[:, :min(k, kmax)].any(dim=1).sum()) for k in ks}


@torch.no_grad()
def evaluate_classifier(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], show_progress: bool = False,
                        desc: str = "test") -> dict[str, float]:
    """``{"top1", "top5", "loss", "n"}`` of ``model`` (put in eval mode for the call) over (images, labels) batches."""
    was_training = model.training
    model.eval()
    n, loss, correct = 0, 0.0, {1: 0, 5: 0}
    for images, labels in tqdm(batches, desc=desc, disable=not show_progress, leave=False):
        logits = model(images).float()
        loss += F.cross_entropy(logits, labels, reduction="sum").item()
        for k, c in topk_correct(logits, labels).items():
            correct[k] += c
        n += labels.shape[0]
    model.train(was_training)
    n_ = max(n, 1)
    return {"top1": correct[1] / n_, "top5": correct[5] / n_, "loss": loss / n_, "n": n}

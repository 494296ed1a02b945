"""Weighted k-nearest-neighbour classification of frozen features (Wu et al. 2018, as in DINO).

Features of the *unmasked* image, L2-normalised; cosine similarity; the k nearest training samples vote
with weight exp(sim / T). k = 20, T = 0.07 by default.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from mimkit.models.vit import pool_features


@torch.no_grad()
def extract_features(encoder: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], pool: str = "cls",
                     show_progress: bool = False, desc: str = "features", log: Callable[[str], None] | None = None,
                     total: int | None = None, log_every_s: float = 30.0) -> tuple[Tensor, Tensor]:
    """Run the encoder with masking off over (images, labels) batches -> (features (M, D) fp32 CPU, labels (M,)).

    ``log`` (e.g. a run log, when no progress bar is shown) receives a line with the rate and the time left every
    ``log_every_s`` seconds (``total`` = images expected)."""
    was_training = encoder.training
    encoder.eval()
    feats, labels = [], []
    t0 = last = time.perf_counter()
    done = 0
    for images, y in tqdm(batches, desc=desc, disable=not show_progress, leave=False):
        feats.append(pool_features(encoder.forward_features(images), pool).float().cpu())
        labels.append(y.cpu())
        done += len(y)
        now = time.perf_counter()
        if log is not None and now - last >= log_every_s:
            last, rate = now, done / max(now - t0, 1e-9)
            left = f", about {(total - done) / rate:.0f} s left" if total else ""
            log(f"{desc}: {done}{f'/{total}' if total else ''} images ({rate:.0f} img/s{left})")
    encoder.train(was_training)
    if not feats:  # an empty shard (more processes than batches)
        return torch.empty(0), torch.empty(0, dtype=torch.int64)
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_predict(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, k: int = 20, temperature: float = 0.07,
                num_classes: int | None = None, chunk: int = 1024) -> Tensor:
    """Weighted kNN votes: (M, D), (M,), (Q, D) -> class scores (Q, C)."""
    num_classes = num_classes or int(train_labels.max()) + 1
    bank = F.normalize(train_feats.float(), dim=1)
    k = min(k, bank.shape[0])
    scores = []
    for start in range(0, test_feats.shape[0], chunk):
        q = F.normalize(test_feats[start:start + chunk].float(), dim=1)
        sim, idx = (q @ bank.T).topk(k, dim=1)
        weights = (sim / temperature).exp()
        votes = torch.zeros(q.shape[0], num_classes)
        votes.scatter_add_(1, train_labels[idx], weights)
        scores.append(votes)
    return torch.cat(scores)


def knn_accuracy(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, test_labels: Tensor, k: int = 20,
                 temperature: float = 0.07) -> dict[str, float]:
    """Top-1 (and top-5 when there are > 5 classes) accuracy of weighted kNN."""
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    scores = knn_predict(train_feats, train_labels, test_feats, k, temperature, num_classes)
    out = {"knn_top1": (scores.argmax(1) == test_labels).float().mean().item()}
    if num_classes > 5:
        top5 = scores.topk(5, dim=1).indices
        out["knn_top5"] = (top5 == test_labels[:, None]).any(1).float().mean().item()
    return out


def format_gain(value: float, reference: float, scale: float = 100.0, unit: str = "points") -> str:
    """A signed difference for logs: ``+1.4 points`` / ``-1.4 points`` (never ``+-1.4``)."""
    return f"{scale * (value - reference):+.1f} {unit}"


def evaluate_knn(encoder: nn.Module, data, *, device, k: int = 20, temperature: float = 0.07, pool: str = "cls",
                 batch_size: int = 256, show_progress: bool = False, shard: tuple[int, int] = (0, 1),
                 gather=None, log: Callable[[str], None] | None = None) -> dict[str, float]:
    """kNN of ``encoder`` on a DataModule: train split as the bank, test split as queries.

    Distributed: ``shard=(rank, world_size)`` makes each process embed every world_size-th batch and
    ``gather`` (a callable returning all ranks' tensors) joins the features, so every rank gets the
    same result. ``log``: progress lines every 30 s (for runs whose output is not a terminal).
    """
    rank, world = shard

    def features(split: str, desc: str) -> tuple[Tensor, Tensor]:
        batches = (b for i, b in enumerate(data.eval_batches(split, batch_size, device)) if i % world == rank)
        total = data.num_train if split == "train" else None
        f, y = extract_features(encoder, batches, pool, show_progress, desc, None if show_progress else log,
                                total // world if total else None)
        if gather is not None and world > 1:
            f, y = torch.cat(gather(f)), torch.cat(gather(y))
        return f, y

    return knn_accuracy(*features("train", "kNN bank"), *features("test", "kNN queries"), k=k,
                        temperature=temperature)

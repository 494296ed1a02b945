"""Linear probing of a frozen encoder (rc-mae.txt Table 11, MAE's protocol).

Defaults: Table 11's optimiser and schedule (LARS, weight decay 0, 10 warmup epochs of 90, cls token) with a
CPU-sized batch of 256, the cached-feature path, and ``train.blr`` = :func:`auto_blr` (0.1 on ImageNet-1k, more on
smaller sets). The paper's ImageNet run: ``--set aug.augment=true --set train.batch_size=16384``.

Head: ``BatchNorm1d(D, affine=False, eps=1e-6)`` (a parameter-free normalisation of the features) then
``Linear(D, C)`` with ``trunc_normal(std=0.01)`` weights. Optimiser: LARS (timm's ``Lars``, momentum 0.9,
trust coefficient 0.001; the trust ratio on the weight matrix only, none on the bias, as MAE's LARS), lr =
blr * batch / 256 with per-iteration linear warmup then half-cosine, weight decay 0. The encoder runs in eval
mode under ``no_grad`` and its weights never change.

Two paths:

- ``aug.augment=true`` (the paper): every epoch, RandomResizedCrop + flip of the training images, through the
  frozen encoder, into the head;
- ``aug.augment=false`` (the fast path for CPUs): the features of the un-augmented training and test images
  are extracted once (:func:`mimkit.eval.knn.extract_features`), then the head trains on the cached tensors,
  which costs next to nothing per epoch.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.optim import Lars
from torch import Tensor, nn
from tqdm.auto import tqdm

from mimkit.config.linprobe import LinprobeConfig
from mimkit.errors import MimkitError
from mimkit.eval.knn import extract_features
from mimkit.eval.labelled import LabelledBatches, train_transform
from mimkit.eval.accuracy import topk_correct
from mimkit.models.vit import pool_features
from mimkit.train.optim import effective_lr, lr_at, set_lr


IMAGENET_TRAIN_IMAGES = 1_281_167
MAX_AUTO_BLR = 32.0


def auto_blr(num_train: int) -> float:
    """Table 11's blr 0.1 rescaled to the data set: ``0.1 * 1,281,167 / num_train``, at most 32.

    LARS moves each weight matrix by about ``lr * 0.001`` of its norm per step, so what a probe can learn is set by
    the summed lr, i.e. by blr x images seen / 256. Keeping Table 11's sum for the same number of epochs gives 0.1 on
    ImageNet-1k and 12.8 on 10,000 images (CIFAR-10 subset: 0.1 -> 28 % top-1, 16 -> 44 %, see docs/EVALUATION.md).
    """
    return min(MAX_AUTO_BLR, 0.1 * IMAGENET_TRAIN_IMAGES / max(num_train, 1))


# ------------------------------------------------------------------------------------------------ the probe
class LinearProbe(nn.Module):
    """``BatchNorm1d(affine=False, eps=1e-6)`` + ``Linear``: (B, D) features -> (B, C) logits."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.fc = nn.Linear(dim, num_classes)
        trunc_normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, feats: Tensor) -> Tensor:
        return self.fc(self.bn(feats))


def lars_for_probe(probe: LinearProbe, lr: float, weight_decay: float, momentum: float) -> Lars:
    """LARS as in MAE: layer-wise adaptation and weight decay on the weight matrix, plain momentum SGD on the bias."""
    return Lars([
        {"params": [probe.fc.weight], "weight_decay": weight_decay, "always_adapt": True},
        {"params": [probe.fc.bias], "weight_decay": 0.0, "always_adapt": False},
    ], lr=lr, momentum=momentum, trust_coeff=0.001)


@torch.no_grad()
def probe_accuracy(probe: LinearProbe, feats: Tensor, labels: Tensor, batch_size: int = 4096) -> dict[str, float]:
    """Top-1 / top-5 of the probe on cached features."""
    probe.eval()
    correct = {1: 0, 5: 0}
    for i in range(0, feats.shape[0], batch_size):
        for k, c in topk_correct(probe(feats[i:i + batch_size]), labels[i:i + batch_size]).items():
            correct[k] += c
    probe.train()
    n = max(feats.shape[0], 1)
    return {"top1": correct[1] / n, "top5": correct[5] / n}


@dataclass
class ProbeSchedule:
    epochs: int
    steps_per_epoch: int
    peak_lr: float
    min_lr: float
    warmup_steps: int

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch


def train_probe(probe: LinearProbe, epoch_batches: Callable[[int], Any], schedule: ProbeSchedule,
                weight_decay: float, momentum: float, evaluate: Callable[[], dict[str, float]] | None = None,
                eval_every: int = 1, show_progress: bool = False, log: Callable[[str], None] | None = None
                ) -> list[dict[str, float]]:
    """Train ``probe`` on ``epoch_batches(epoch)`` -> iterable of (features, labels); returns per-epoch records."""
    optimizer = lars_for_probe(probe, schedule.peak_lr, weight_decay, momentum)
    probe.train()
    step, history = 0, []
    for epoch in tqdm(range(schedule.epochs), desc="linear probe", disable=not show_progress, leave=False):
        total, n = 0.0, 0
        for b, (feats, labels) in enumerate(epoch_batches(epoch)):
            if b >= schedule.steps_per_epoch:
                break
            s = schedule
            set_lr(optimizer, lr_at(step, s.total_steps, s.warmup_steps, s.peak_lr, s.min_lr))
            loss = F.cross_entropy(probe(feats), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            total, n = total + loss.item(), n + 1
        record = {"epoch": epoch + 1, "train_loss": total / max(n, 1)}
        if evaluate is not None and ((epoch + 1) % eval_every == 0 or epoch + 1 == schedule.epochs):
            record.update({f"test_{k}": v for k, v in evaluate().items()})
        history.append(record)
        if log is not None and "test_top1" in record:
            log(f"epoch {epoch + 1}/{schedule.epochs} train loss {record['train_loss']:.4f} "
                f"test top-1 {record['test_top1']:.4f}")
    return history


# ------------------------------------------------------------------------------------------------ driver
@contextlib.contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_linprobe(encoder: nn.Module, data, cfg: LinprobeConfig, *, device: torch.device, show_progress: bool = False,
                 log: Callable[[str], None] | None = None,
                 features: tuple[Tensor, Tensor, Tensor, Tensor] | None = None, return_probe: bool = False):
    """Linear-probe ``encoder`` (frozen) on a labelled DataModule; returns the result record.

    ``features``: already extracted ``(train_feats, train_labels, test_feats, test_labels)`` of this encoder with
    ``cfg.eval.pool`` (e.g. shared with a kNN evaluation); the cached-feature path then skips the extraction.
    ``return_probe``: return ``(record, trained LinearProbe)`` (e.g. to score the frozen classifier under
    corruptions) instead of the record alone.
    """
    t0 = time.time()
    if features is not None and cfg.aug.augment:
        raise MimkitError("precomputed features are un-augmented; they cannot be used with aug.augment=true")
    tr, pool = cfg.train, cfg.eval.pool
    encoder.eval().requires_grad_(False)
    num_classes = len(data.classes)
    steps = data.steps_per_epoch(tr.batch_size)  # drop_last, as MAE's loader
    blr = tr.blr if tr.blr is not None else auto_blr(data.num_train)
    peak_lr = tr.lr if tr.lr is not None else effective_lr(blr, tr.batch_size)
    schedule = ProbeSchedule(tr.epochs, steps, peak_lr, tr.min_lr, round(tr.warmup_epochs * steps))
    if features is not None:
        test_feats, test_labels = features[2], features[3]
    else:
        test_feats, test_labels = extract_features(encoder, data.eval_batches("test", cfg.eval.batch_size, device),
                                                   pool, show_progress, "test features")
    test_feats, test_labels = test_feats.to(device), test_labels.to(device)
    torch.manual_seed(tr.seed)
    probe = LinearProbe(test_feats.shape[1], num_classes).to(device)

    def evaluate() -> dict[str, float]:
        return probe_accuracy(probe, test_feats, test_labels)

    if cfg.aug.augment:
        a = cfg.aug
        transform = train_transform(data.img_size, data.mean, crop_scale=a.crop_scale, hflip=a.hflip,
                                    interpolation=a.interpolation)
        batches = LabelledBatches(data, transform, num_workers=cfg.data.num_workers or 0)

        @torch.no_grad()
        def features(images: Tensor) -> Tensor:
            return pool_features(encoder.forward_features(images), pool).float()

        def epoch_batches(epoch: int):  # the encoder sees pieces of eval.batch_size; the head whole batches
            feats, labs, current = [], [], 0
            for b, images, labels in batches.chunks(epoch, tr.batch_size, tr.seed, device, cfg.eval.batch_size):
                if b != current and feats:
                    yield torch.cat(feats), torch.cat(labs)
                    feats, labs = [], []
                current = b
                feats.append(features(images))
                labs.append(labels)
            if feats:
                yield torch.cat(feats), torch.cat(labs)

    else:
        if features is not None:
            train_feats, train_labels = features[0], features[1]
        else:
            train_feats, train_labels = extract_features(encoder, data.eval_batches("train", cfg.eval.batch_size,
                                                                                    device), pool, show_progress,
                                                         "train features")
        train_feats, train_labels = train_feats.to(device), train_labels.to(device)

        def epoch_batches(epoch: int):
            g = torch.Generator().manual_seed(tr.seed * 100003 + epoch)
            order = torch.randperm(train_feats.shape[0], generator=g)
            order = order.to(device)
            for b in range(steps):
                idx = order[b * tr.batch_size:(b + 1) * tr.batch_size]
                yield train_feats[idx], train_labels[idx]
    t_feats = time.time() - t0
    # a head on cached features is a stream of tiny ops: on a CPU, intra-op threads only add synchronisation (on a
    # busy 2-core machine 90 epochs took 196 s with 2 threads and 4 s with one)
    single = not cfg.aug.augment and device.type == "cpu"
    with _threads(1) if single else contextlib.nullcontext():
        history = train_probe(probe, epoch_batches, schedule, tr.weight_decay, tr.momentum, evaluate, 1,
                              show_progress, log)
    final = history[-1]
    record = {
        "linprobe_top1": final["test_top1"], "linprobe_top5": final["test_top5"],
        "best_top1": max(h["test_top1"] for h in history if "test_top1" in h),
        "epochs": tr.epochs, "batch_size": tr.batch_size, "blr": blr, "blr_auto": tr.blr is None, "lr": peak_lr,
        "augment": cfg.aug.augment, "pool": pool, "train_images": data.num_train,
        "test_images": int(test_labels.shape[0]), "feature_dim": int(test_feats.shape[1]),
        "history": history, "wall_time_s": time.time() - t0,
        "feature_time_s": t_feats if not cfg.aug.augment else None,
    }
    return (record, probe) if return_probe else record


class ProbedEncoder(nn.Module):
    """A frozen encoder, its pooling and a trained :class:`LinearProbe` as one image classifier (logits)."""

    def __init__(self, encoder: nn.Module, probe: LinearProbe, pool: str):
        super().__init__()
        self.encoder, self.probe, self.pool = encoder, probe, pool

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        return self.probe(pool_features(self.encoder.forward_features(images), self.pool).float())


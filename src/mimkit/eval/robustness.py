"""Robustness of a fine-tuned classifier to common corruptions (rc-mae.txt Sec. 6.5 / Table 7, ImageNet-C style).

The test split (optionally a fixed random subset of ``max_images`` of it) is corrupted with each of the 15 corruptions of
:mod:`mimkit.eval.corruptions` at severities 1..5. Images are corrupted in fixed blocks of ``BLOCK`` images,
each with a generator seeded by ``mix_seed(seed, crc32(corruption), severity, block)``, on the CPU, so every
model evaluated with the same seed and image count sees the very same corrupted images, whatever its batch size
or device.

Reported (errors are fractions, 1 - top-1):

- ``errors[c]``: the error at each severity; ``corruption_error[c]`` = their mean (unnormalised CE);
  ``mean_corruption_error`` = the mean over corruptions;
- with a baseline result (``--baseline eval_robustness.json`` of another model, e.g. MAE vs RC-MAE), as in
  Hendrycks & Dietterich (2019): ``ce_normalized[c] = sum_s E_s,c / sum_s E_s,c(baseline)``, ``mCE`` = 100 x
  their mean (%, the baseline scores 100), and the relative versions that subtract each model's clean error first
  (``relative_mCE``).
"""

from __future__ import annotations

import json
import time
import zlib
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mimkit.data.augment import normalize
from mimkit.data.module import mix_seed
from mimkit.errors import MimkitError
from mimkit.eval.corruptions import CORRUPTIONS, SEVERITIES, check_names, corrupt

BLOCK = 200  #: images corrupted together with one generator


def corruption_generator(seed: int, name: str, severity: int, block: int) -> torch.Generator:
    """The generator for one block of one corrupted set (stable across runs, machines and models)."""
    return torch.Generator().manual_seed(mix_seed(seed, zlib.crc32(name.encode()), severity, block))


SUBSET_SEED = 0  #: which test images ``max_images`` keeps: one fixed random subset for every model and --seed


def subset_mask(num_test: int, max_images: int | None) -> Tensor | None:
    """Bool ``(num_test,)`` of a fixed random subset of ``max_images`` test images (None: all of them).

    Random rather than the first N: image-folder test splits are ordered by class."""
    if max_images is None or max_images >= num_test:
        return None
    keep = torch.zeros(num_test, dtype=torch.bool)
    keep[torch.randperm(num_test, generator=torch.Generator().manual_seed(SUBSET_SEED))[:max_images]] = True
    return keep


def clean_blocks(data, max_images: int | None):
    """Un-normalised test images in [0, 1] (CPU) and labels, in fixed blocks of ``BLOCK`` (in test-split order,
    restricted to :func:`subset_mask`)."""
    mean = torch.tensor(data.mean).view(1, -1, 1, 1)
    std = torch.tensor(data.std).view(1, -1, 1, 1)
    keep = subset_mask(_num_test(data), max_images)
    start, images_buf, labels_buf = 0, [], []
    for images, labels in data.eval_batches("test", BLOCK, "cpu"):
        if keep is not None:
            sel = keep[start:start + labels.shape[0]]
            start += labels.shape[0]
            images, labels = images[sel], labels[sel]
        images_buf.append((images * std + mean).clamp_(0, 1))
        labels_buf.append(labels)
        while sum(x.shape[0] for x in labels_buf) >= BLOCK:
            x, y = torch.cat(images_buf), torch.cat(labels_buf)
            yield x[:BLOCK], y[:BLOCK]
            images_buf, labels_buf = [x[BLOCK:]], [y[BLOCK:]]
    if labels_buf and sum(x.shape[0] for x in labels_buf):
        yield torch.cat(images_buf), torch.cat(labels_buf)


@torch.no_grad()
def _errors(model: nn.Module, x01: Tensor, labels: Tensor, data, device, batch_size: int) -> int:
    wrong = 0
    for i in range(0, x01.shape[0], batch_size):
        x = normalize(x01[i:i + batch_size], data.mean, data.std).to(device)
        wrong += int((model(x).argmax(dim=1).cpu() != labels[i:i + batch_size]).sum())
    return wrong


def evaluate_robustness(model: nn.Module, data, *, device, corruptions=tuple(CORRUPTIONS), severities=SEVERITIES,
                        seed: int = 0, max_images: int | None = None, batch_size: int = 256,
                        show_progress: bool = False) -> dict[str, Any]:
    """Errors of ``model`` on clean and corrupted test images (see the module docstring)."""
    corruptions = check_names(corruptions)
    severities = [int(s) for s in severities]
    for s in severities:
        if s not in SEVERITIES:
            raise MimkitError(f"severity {s} is not one of 1..5")
    if max_images is not None and max_images < 1:
        raise MimkitError(f"--max-images must be >= 1, got {max_images}")
    t0 = time.time()
    was_training = model.training
    model.eval()
    total = -(-min(max_images or 10**12, _num_test(data)) // BLOCK) * (1 + len(corruptions) * len(severities))
    bar = tqdm(total=total, desc="robustness", disable=not show_progress, leave=False)
    n, clean_wrong = 0, 0
    wrong = {c: [0] * len(severities) for c in corruptions}
    for block, (x01, labels) in enumerate(clean_blocks(data, max_images)):
        n += labels.shape[0]
        clean_wrong += _errors(model, x01, labels, data, device, batch_size)
        bar.update(1)
        for c in corruptions:
            for j, s in enumerate(severities):
                y = corrupt(x01, c, s, corruption_generator(seed, c, s, block))
                wrong[c][j] += _errors(model, y, labels, data, device, batch_size)
                bar.update(1)
    bar.close()
    model.train(was_training)
    if n == 0:
        raise MimkitError(f"the test split of {data.name} is empty; nothing to evaluate")
    errors = {c: [w / n for w in wrong[c]] for c in corruptions}
    ce = {c: sum(e) / len(e) for c, e in errors.items()}
    return {
        "clean_error": clean_wrong / n, "clean_top1": 1 - clean_wrong / n,
        "errors": errors, "corruption_error": ce, "mean_corruption_error": sum(ce.values()) / len(ce),
        "corruptions": corruptions, "severities": severities, "seed": seed, "num_images": n,
        "wall_time_s": time.time() - t0,
    }


def _num_test(data) -> int:
    if hasattr(data, "data") and data.data.test is not None:
        return len(data.data.test)
    if hasattr(data, "listing") and data.listing.test is not None:
        return len(data.listing.test)
    raise MimkitError(f"{data.name} has no test split to corrupt")


def compare_with_baseline(result: dict[str, Any], baseline: dict[str, Any], baseline_name: str) -> dict[str, Any]:
    """Normalised CE / mCE (and the relative ones) of ``result`` against another model's result."""
    for key in ("severities", "seed", "num_images"):
        if result[key] != baseline.get(key):
            raise MimkitError(f"baseline {baseline_name} was measured with {key}={baseline.get(key)!r}, this run with "
                              f"{result[key]!r}; evaluate both with the same --seed, --severities and --max-images")
    missing = [c for c in result["corruptions"] if c not in baseline.get("errors", {})]
    if missing:
        raise MimkitError(f"baseline {baseline_name} has no errors for {', '.join(missing)}; evaluate it on the same "
                          "corruptions")
    norm, rel = {}, {}
    for c, e in result["errors"].items():
        b = baseline["errors"][c]
        norm[c] = sum(e) / sum(b) if sum(b) > 0 else None
        db = sum(x - baseline["clean_error"] for x in b)
        rel[c] = sum(x - result["clean_error"] for x in e) / db if db > 0 else None

    def mean_percent(values: dict) -> float | None:
        vals = [v for v in values.values() if v is not None]
        return 100 * sum(vals) / len(vals) if vals else None

    return {"baseline": baseline_name, "ce_normalized": norm, "mCE": mean_percent(norm),
            "relative_ce": rel, "relative_mCE": mean_percent(rel)}


def read_baseline(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise MimkitError(f"baseline {path} does not exist (give the eval_robustness.json of another model)")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise MimkitError(f"baseline {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or "errors" not in data or "clean_error" not in data:
        raise MimkitError(f"baseline {path} is not an eval_robustness.json (no 'errors' / 'clean_error')")
    return data

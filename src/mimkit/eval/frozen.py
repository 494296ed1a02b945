"""Both frozen scores of one encoder from one feature extraction: weighted kNN and the cached-feature linear probe.

What a run reports "at initialisation" and at the end (issue 17: the linear-probe baseline beside the kNN one):
:func:`frozen_scores` embeds the train and test splits once with ``cfg.eval.pool`` and scores them both ways, the
same computation as ``mimkit eval knn`` plus ``mimkit eval linprobe`` (cached features, the probe's defaults) and as
the CIFAR-10 study's frozen evaluation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from mimkit.eval.knn import extract_features, knn_accuracy


def frozen_scores(encoder: nn.Module, data, cfg, *, device, linprobe: bool = True, show_progress: bool = False,
                  log: Callable[[str], None] | None = None, linprobe_overrides=()) -> dict[str, float]:
    """``{"knn_top1", ["knn_top5"], "linprobe_top1", "linprobe_top5"}`` of a frozen ``encoder`` on ``data``.

    ``cfg``: the pre-training :class:`~mimkit.config.Config` (``eval.pool``, ``eval.knn_k``, ``eval.knn_t``,
    ``eval.batch_size``; its data/model sections seed the probe's settings). ``linprobe_overrides``: ``--set`` items
    for the probe (e.g. ``train.epochs=30``).
    """
    from mimkit.config.linprobe import build_linprobe_config
    from mimkit.eval.linprobe import run_linprobe

    pool, bs = cfg.eval.pool, cfg.eval.batch_size
    train = extract_features(encoder, data.eval_batches("train", bs, device), pool, show_progress, "frozen: train",
                             log=None if show_progress else log, total=data.num_train)
    test = extract_features(encoder, data.eval_batches("test", bs, device), pool, show_progress, "frozen: test",
                            log=None if show_progress else log)
    out = dict(knn_accuracy(*train, *test, k=cfg.eval.knn_k, temperature=cfg.eval.knn_t))
    if linprobe:
        lp_cfg = build_linprobe_config(None, [f"eval.pool={pool}", *linprobe_overrides], cfg.to_dict())
        res = run_linprobe(encoder, data, lp_cfg, device=torch.device(device), features=(*train, *test))
        out.update(linprobe_top1=res["linprobe_top1"], linprobe_top5=res["linprobe_top5"])
    return out

"""The study's measurements that run as child processes: frozen evaluation of one encoder, and step costs.

``_frozen``: one forward pass over the training and test splits gives both poolings (cls token and mean of the
patch tokens); for each, weighted kNN and the cached-feature linear probe. With ``--robust-images N`` the
mean-pooled probe classifier (frozen encoder + trained head) is also scored on N test images under the 15
corruptions x 5 severities: the robustness the encoder's own features give, without a fine-tune.

``_cost``: the median training-step time of every variant of a profile, measured interleaved (round-robin in one
process), so every variant sees the same machine conditions.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

POOLS = ("mean", "cls")
EVAL_SUBSET_SEED = 0  #: which training images --eval-train keeps
PRIMARY_POOL = "mean"  #: what the claims' primary rows use (the cls token gets no direct signal from MAE's loss)


def _features(encoder, batches):
    """(mean-pooled, cls) features and labels of every batch, from one forward pass each."""
    import torch

    from mimkit.models.vit import pool_features

    feats = {p: [] for p in POOLS}
    labels = []
    with torch.no_grad():
        for images, y in batches:
            tokens = encoder.forward_features(images)
            for p in POOLS:
                feats[p].append(pool_features(tokens, p).float())
            labels.append(y)
    return {p: torch.cat(f) for p, f in feats.items()}, torch.cat(labels)


def cmd_frozen(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="cifar10_study.py _frozen")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--which", required=True, choices=("teacher", "student"))
    p.add_argument("--out", required=True)
    p.add_argument("--random-init", type=int, default=None, metavar="SEED",
                   help="evaluate a freshly initialised encoder of the checkpoint's config instead of its weights")
    p.add_argument("--robust-images", type=int, default=0, metavar="N",
                   help="also score the mean-pooled probe classifier under corruptions on N test images")
    p.add_argument("--eval-train", type=int, default=None, metavar="N",
                   help="kNN bank and probe training set: a fixed random N of the training images (subset seed "
                        f"{EVAL_SUBSET_SEED}, the same for every run); default: the run's own training set")
    a = p.parse_args(argv)
    import torch

    from mimkit.config import config_from_dict
    from mimkit.eval.knn import knn_accuracy
    from mimkit.config.linprobe import build_linprobe_config
    from mimkit.eval.linprobe import ProbedEncoder, run_linprobe
    from mimkit.interop.loading import (checkpoint_in_chans, load_pretrained_encoder, random_init_encoder,
                                     read_pretraining_checkpoint)
    from mimkit.eval.robustness import evaluate_robustness
    from mimkit.runtime import datamodule_from_config
    from mimkit.train.runlog import write_json

    t0 = time.time()
    ckpt = read_pretraining_checkpoint(a.checkpoint)
    if a.random_init is not None:  # the reference point: what pre-training has to beat
        cfg = config_from_dict(ckpt["config"])
        enc = random_init_encoder(cfg, checkpoint_in_chans(ckpt), a.random_init)
        method_name, saved = "init", ckpt["config"]
        epoch = 0
    else:
        pre = load_pretrained_encoder(a.checkpoint, a.which, ckpt)
        cfg, enc, method_name, saved = config_from_dict(pre.config), pre.encoder, pre.method, pre.config
        epoch = int(ckpt["epoch"])
    if a.eval_train is not None:  # one fixed subset for every run and seed: paired, and 5 x cheaper than 50,000
        cfg.data.max_train, cfg.train.seed = a.eval_train, EVAL_SUBSET_SEED
    data = datamodule_from_config(cfg)
    device = torch.device("cpu")
    enc = enc.eval().to(device)
    train, train_y = _features(enc, data.eval_batches("train", 256, device))
    test, test_y = _features(enc, data.eval_batches("test", 256, device))
    t_feats = time.time() - t0
    res = {"checkpoint": a.checkpoint, "which": a.which, "method": method_name, "epoch": epoch,
           "train_images": int(train_y.shape[0]), "test_images": int(test_y.shape[0]), "pools": {}}
    probes = {}
    for pool in POOLS:
        knn = knn_accuracy(train[pool], train_y, test[pool], test_y, k=cfg.eval.knn_k, temperature=cfg.eval.knn_t)
        lp_cfg = build_linprobe_config(None, [f"eval.pool={pool}"], saved)
        lp, probes[pool] = run_linprobe(enc, data, lp_cfg, device=device,
                                        features=(train[pool], train_y, test[pool], test_y), return_probe=True)
        res["pools"][pool] = {"knn_top1": knn["knn_top1"], "linprobe_top1": lp["linprobe_top1"],
                              "linprobe_best_top1": lp["best_top1"], "linprobe_blr": lp["blr"],
                              "linprobe_epochs": lp["epochs"]}
    res.update({k: res["pools"][PRIMARY_POOL][k] for k in ("knn_top1", "linprobe_top1")})
    res["pool"] = PRIMARY_POOL
    res["feature_time_s"] = t_feats
    if a.robust_images:
        t1 = time.time()
        clf = ProbedEncoder(enc, probes[PRIMARY_POOL].eval(), PRIMARY_POOL)
        rob = evaluate_robustness(clf, data, device=device, seed=0, max_images=a.robust_images)
        rob["relative_corruption_error"] = rob["mean_corruption_error"] - rob["clean_error"]
        rob["pool"] = PRIMARY_POOL
        rob["wall_time_s"] = time.time() - t1
        res["robustness"] = rob
    res["wall_time_s"] = time.time() - t0
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(Path(a.out), res)
    print(json.dumps({"which": a.which, "epoch": epoch, **res["pools"], "wall_time_s": res["wall_time_s"]}))
    return 0


def cmd_cost(argv: list[str]) -> int:
    from study.profiles import PROFILES, run_sets

    p = argparse.ArgumentParser(prog="cifar10_study.py _cost")
    p.add_argument("--profile", default="fair", choices=sorted(PROFILES))
    p.add_argument("--variants", required=True, help="comma list of the variants to time")
    p.add_argument("--out", required=True)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=15)
    a = p.parse_args(argv)
    import torch

    from mimkit.config import build_config
    from mimkit.methods import Progress, build_method
    from mimkit.train.optim import build_adamw
    from mimkit.train.runlog import write_json

    prof = PROFILES[a.profile]
    batch = prof["batch"]
    rows, skipped = {}, {}
    for v in a.variants.split(","):
        try:
            cfg = build_config("cifar10-vit-tiny", ["data.path=unused", *run_sets(a.profile, v)])
        except Exception as e:  # a variant this version of mimkit cannot build is reported, not fatal
            skipped[v] = f"{type(e).__name__}: {e}"
            continue
        torch.manual_seed(0)
        method = build_method(cfg, 3)
        opt = build_adamw(method.student.named_parameters(), 1e-4, 0.05, (0.9, 0.95))
        rows[v] = (method, opt, [])
    images = torch.randn(batch, 3, 32, 32)

    def step(method, opt, i):
        method.train()
        out = method(images)
        out.loss.backward()
        if getattr(method, "edits_gradients", False):
            method.before_optimizer_step(Progress(i + 1, 0, 10**6, 10**6, 1))
        opt.step()
        opt.zero_grad(set_to_none=True)
        method.after_optimizer_step(Progress(i + 1, 0, 10**6, 10**6, 1))

    for i in range(a.warmup):
        for method, opt, _ in rows.values():
            step(method, opt, i)
    for i in range(a.repeats):
        for method, opt, times in rows.values():
            t = time.perf_counter()
            step(method, opt, a.warmup + i)
            times.append(time.perf_counter() - t)
    res = {"batch": batch, "threads": torch.get_num_threads(), "repeats": a.repeats,
           "step_s": {v: statistics.median(t) for v, (_, _, t) in rows.items()}, "skipped": skipped}
    write_json(Path(a.out), res)
    print(json.dumps(res["step_s"]))
    return 0

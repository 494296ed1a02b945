"""mimkit.analysis: the linear-model experiment (rc-mae Sec. 4, App. B / E.1), its ViT counterpart and Fig. 3b."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from helpers import sets
from mimkit import cli
from mimkit.analysis import linear_model as lm
from mimkit.analysis.trends import trend_verdicts
from mimkit.errors import MimkitError
from mimkit.teacher import EMATeacher

ANALYSIS = "mimkit.commands.analyze"


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matrices and batch-1 passes: one thread avoids hand-off costs that dominate on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def main(monkeypatch):
    """``cli.main`` with the analysis commands registered (whether or not cli.py lists them yet)."""
    if ANALYSIS not in cli.COMMAND_MODULES:
        monkeypatch.setattr(cli, "COMMAND_MODULES", [*cli.COMMAND_MODULES, ANALYSIS])
    return cli.main


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _keep(n, d, seed=0):
    return lm.random_keep(n, d, d // 2, torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------- linear model: maths
def test_linear_grads_match_autograd_and_eq_7c():
    d, B = 6, 5
    P, Q, x, keep = _rand(d, d + 1, seed=1), _rand(d, d + 1, seed=2), _rand(B, d, seed=3), _keep(B, d)
    g_r, g_c = lm.linear_grads(P, Q, x, keep)
    for i in range(B):
        S = P.clone().requires_grad_(True)
        l_r, l_c = lm.losses(S, Q, x[i], keep[i])
        torch.testing.assert_close(torch.autograd.grad(l_r, S, retain_graph=True)[0], g_r[i])
        torch.testing.assert_close(torch.autograd.grad(l_c, S)[0], g_c[i])
    # Eq. (7c) literally, with a zero bias: S x~ x~^T - x x~^T and (S - T) x~ x~^T (no 1/2, no 1/|M|)
    P0, Q0 = P.clone(), Q.clone()
    P0[:, -1], Q0[:, -1] = 0.0, 0.0
    g_r, g_c = lm.linear_grads(P0, Q0, x, keep)
    S, T = P0[:, :-1], Q0[:, :-1]
    for i in range(B):
        xt = (x[i] * keep[i]).unsqueeze(1)                       # column vector x~
        xi = x[i].unsqueeze(1)
        torch.testing.assert_close(g_r[i, :, :-1], S @ xt @ xt.T - xi @ xt.T)
        torch.testing.assert_close(g_c[i, :, :-1], (S - T) @ xt @ xt.T)
        # the bias column is the residual (gradient w.r.t. b of the same losses)
        torch.testing.assert_close(g_r[i, :, -1], (S @ xt - xi).squeeze(1))
        torch.testing.assert_close(g_c[i, :, -1], ((S - T) @ xt).squeeze(1))
    assert torch.equal(keep.sum(1), torch.full((B,), d // 2, dtype=torch.float64))  # exact mask count


def test_training_step_is_sgd_momentum_and_the_teacher_is_the_ema():
    cfg = lm.LinearModelConfig(dim=5, lr=0.01, sgd_momentum=0.97, teacher_momentum=0.9)
    torch.manual_seed(0)
    student = torch.nn.Linear(5, 5).double()
    teacher = EMATeacher(student)
    opt = torch.optim.SGD(student.parameters(), lr=cfg.lr, momentum=cfg.sgd_momentum)
    P = torch.cat([student.weight.detach(), student.bias.detach()[:, None]], 1)
    Q, V = P.clone(), torch.zeros_like(P)
    for step in range(4):
        x, keep = _rand(8, 5, seed=10 + step), _keep(8, 5, seed=20 + step)
        xt = x * keep
        pred = student(xt)
        loss = (0.5 * ((pred - x) ** 2).sum(1) + 0.5 * ((pred - teacher(xt)) ** 2).sum(1)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        teacher.update(student, cfg.teacher_momentum)
        Q_before = Q
        P, Q, V = lm.train_step(P, Q, V, x, keep, cfg)
        torch.testing.assert_close(P, torch.cat([student.weight.detach(), student.bias.detach()[:, None]], 1))
        t = teacher.module
        torch.testing.assert_close(Q, torch.cat([t.weight, t.bias[:, None]], 1))
        torch.testing.assert_close(Q, 0.9 * Q_before + 0.1 * P)  # Eq. (2)


@pytest.mark.parametrize("probe_step", ["sgd", "optimizer"])
def test_probe_matches_autograd(probe_step):
    d, B = 5, 4
    cfg = lm.LinearModelConfig(dim=d, lr=0.02, sgd_momentum=0.9, teacher_momentum=0.8, probe_step=probe_step)
    P, Q, V = _rand(d, d + 1, seed=1), _rand(d, d + 1, seed=2), _rand(d, d + 1, seed=3)
    x1, keep1 = _rand(B, d, seed=4), _keep(B, d, seed=5)
    x2 = torch.stack([x1, _rand(B, d, seed=6), _rand(B, d, seed=7)])
    keep2 = torch.stack([keep1, keep1, _keep(B, d, seed=8)])
    res = lm.probe(P, Q, V, x1, keep1, x2, keep2, cfg)
    for i in range(B):
        S = P.clone().requires_grad_(True)
        l_r, l_c = lm.losses(S, Q, x1[i], keep1[i])
        g = torch.autograd.grad(l_r + l_c, S)[0]
        step = g if probe_step == "sgd" else cfg.sgd_momentum * V + g
        S1 = (P - cfg.lr * step).detach()
        T1 = cfg.teacher_momentum * Q + (1 - cfg.teacher_momentum) * S1
        for t in range(3):
            S1r = S1.clone().requires_grad_(True)
            l_r, l_c = lm.losses(S1r, T1, x2[t, i], keep2[t, i])
            g_r = torch.autograd.grad(l_r, S1r, retain_graph=True)[0]
            g_c = torch.autograd.grad(l_c, S1r)[0]
            assert res["lr_norm"][t, i].item() == pytest.approx(g_r.norm().item(), rel=1e-10)
            assert res["lc_norm"][t, i].item() == pytest.approx(g_c.norm().item(), rel=1e-10)
            cos = (g_r * g_c).sum() / (g_r.norm() * g_c.norm())
            assert res["cos"][t, i].item() == pytest.approx(cos.item(), rel=1e-9, abs=1e-12)
    assert torch.allclose(res["input_cos"][0], torch.ones(B, dtype=torch.float64))


def test_three_sequence_types_are_built_as_specified():
    cfg = lm.LinearModelConfig(dim=8, clusters=4, points_per_cluster=6)
    g = torch.Generator().manual_seed(0)
    X, labels = lm.sample_clusters(cfg, g)
    assert X.shape == (24, 8) and X.dtype == torch.float64
    assert torch.equal(labels, torch.arange(4).repeat_interleave(6))
    first = torch.randint(0, 24, (500,), generator=g)
    same, similar, different = lm.sequence_partners(first, 6, 4, g)
    assert torch.equal(X[same], X[first])                                       # identical vectors
    assert torch.equal(labels[similar], labels[first]) and bool((similar != first).all())
    assert bool((labels[different] != labels[first]).all())
    assert set(labels[different].tolist()) == {0, 1, 2, 3}                      # any other cluster
    # shared masks make "same" exactly the same masked input (case 1: cos(x^, x~) = 1)
    curves = lm.run_linear_model(lm.LinearModelConfig(dim=8, clusters=3, points_per_cluster=5, runs=1,
                                                      iterations=3, probe_batch=4))
    assert np.allclose(curves["input_cos"][..., 0], 1.0)


def test_wishart_covariances_and_the_paper_inconsistencies():
    cfg = lm.LinearModelConfig()
    assert cfg.df == 48 and cfg.clusters * cfg.points_per_cluster == 2000   # 1.5 x 32, 10 x 200
    assert lm.LinearModelConfig(wishart_df=54).df == 54
    X, _ = lm.sample_clusters(cfg, torch.Generator().manual_seed(0))
    var = X.view(10, 200, 32).var(dim=1).mean().item()                      # E[diag] = df * 0.3 = 14.4
    assert 10.0 < var < 19.0
    Xn, _ = lm.sample_clusters(lm.LinearModelConfig(cov_normalize=True), torch.Generator().manual_seed(0))
    assert 0.2 < Xn.view(10, 200, 32).var(dim=1).mean().item() < 0.4          # mean V


# --------------------------------------------------------------------------------------- verdicts
def test_verdicts_are_computed_from_the_numbers():
    holds = trend_verdicts(lc_norm=[[3.0, 2.0, 1.0]] * 4, lr_norm=[[1.0, 2.0, 3.0]] * 4,
                           cos=[[-0.9, -0.4, 0.05]] * 4)
    assert all(v["holds"] and v["fraction"] == 1.0 for v in holds.values())
    fails = trend_verdicts(lc_norm=[[1.0, 2.0, 3.0]], lr_norm=[[1.0, 2.0, 3.0]], cos=[[0.2, -0.5, 0.3]])
    assert not any(v["holds"] for v in fails.values())
    assert fails["lc_norm_order"]["values"]["observed_order"] == "different > similar > same"


# ---------------------------------------------------------------------------------- linear model: command
TINY_LM = ["--runs", "2", "--iterations", "15", "--probe-batch", "6", "--dim", "8", "--clusters", "3",
           "--points-per-cluster", "10", "--batch-size", "8"]


def test_linear_model_command_is_deterministic(tmp_path, main, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["analyze", "linear-model", "--out", str(a), *TINY_LM]) == 0
    assert main(["analyze", "linear-model", "--out", str(b), *TINY_LM]) == 0
    out = capsys.readouterr().out
    assert "lc_norm_order" in out and "cos_different_near_zero" in out
    assert (a / "summary.json").read_text() == (b / "summary.json").read_text()
    tiny = dict(runs=1, iterations=5, probe_batch=4, dim=8, clusters=3, points_per_cluster=10, batch_size=8)
    c0 = lm.run_linear_model(lm.LinearModelConfig(**tiny, seed=0))
    c1 = lm.run_linear_model(lm.LinearModelConfig(**tiny, seed=1))
    assert not np.array_equal(c0["cos"], c1["cos"])
    summary = json.loads((a / "summary.json").read_text())
    assert summary["settings"]["wishart_df"] == 12 and summary["probes"]["iterations"] == 15
    assert set(summary["per_type"]["cos"]) == {"same", "similar", "different"}
    assert set(summary["verdicts"]) == {"lc_norm_order", "lr_norm_reversed", "cos_same_most_negative",
                                        "cos_different_near_zero", "cos_similar_between"}
    assert all(isinstance(v["holds"], bool) for v in summary["verdicts"].values())
    assert (a / "linear_model.png").stat().st_size > 1000
    with np.load(a / "curves.npz") as z:
        assert z["cos"].shape == (2, 15, 3)


@pytest.mark.parametrize("argv, needles", [
    (["--mask-ratio", "1.5"], ["mask_ratio", "1.5"]),
    (["--probe-batch", "0"], ["probe_batch", ">= 1"]),
    (["--wishart-df", "4"], ["wishart_df", ">= dim"]),
    (["--clusters", "1"], ["clusters", ">= 2"]),
])
def test_linear_model_bad_values_are_one_line_errors(tmp_path, main, capsys, argv, needles):
    assert main(["analyze", "linear-model", "--out", str(tmp_path / "o"), *TINY_LM, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("mimkit: error:")
    assert all(n in err for n in needles), err


# ------------------------------------------------------------------------------------ ViT and Fig. 3b
@pytest.fixture(scope="module")
def tiny_rc_mae(tmp_path_factory):
    run = tmp_path_factory.mktemp("rcmae") / "run"
    argv = ["pretrain", "--method", "rc-mae", "--output", str(run), "--no-progress",
            *sets("train.epochs=1", "data.max_train=128", "data.max_test=64", "method.grad_align_every=1",
                  "train.log_every=1")]
    assert cli.main(argv) == 0
    return run


def test_vit_grad_alignment_tiny_run(tiny_rc_mae, tmp_path, main, capsys):
    out = tmp_path / "ga"
    argv = ["analyze", "grad-alignment", "--checkpoint", str(tiny_rc_mae / "checkpoints" / "last.pt"),
            "--out", str(out), "--pairs", "4", "--pool", "64", "--no-progress"]
    assert main(argv) == 0
    assert "grad-alignment: 4 pairs" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["teacher_momentum"] == pytest.approx(0.996)       # the checkpoint's
    assert summary["probes"]["pairs"] == 4 and summary["model"]["method"] == "rc-mae"
    for q in ("lc_norm", "lr_norm", "cos", "input_cos"):
        assert all(math.isfinite(summary["per_type"][q][t]["mean"]) for t in ("same", "similar", "different"))
    assert summary["per_type"]["input_cos"]["same"]["mean"] == pytest.approx(1.0)
    assert (out / "grad_alignment.png").stat().st_size > 1000
    with np.load(out / "pairs.npz") as z:
        idx, lab = z["indices"], z["labels"]
    assert (idx[:, 0] == idx[:, 1]).all() and (idx[:, 2] != idx[:, 0]).all()   # same / another image
    assert (lab[:, 2] == lab[:, 0]).all() and (lab[:, 3] != lab[:, 0]).all()   # same / other class
    # deterministic given the seed
    again = tmp_path / "ga2"
    assert main([*argv[:5], str(again), *argv[6:]]) == 0
    assert (again / "summary.json").read_text().replace(str(again), "") == \
        (out / "summary.json").read_text().replace(str(out), "")


def test_grad_alignment_refuses_a_non_rc_mae_method():
    from mimkit.analysis.vit_alignment import check_rc_mae
    from mimkit.methods.mae import MAE
    from mimkit.models.vit import EncoderSpec, ModelSpec

    spec = ModelSpec(EncoderSpec(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=1, num_heads=2),
                     decoder_dim=32, decoder_depth=1, decoder_heads=2)
    with pytest.raises(MimkitError, match="needs an RC-MAE checkpoint.*'mae'.*accepted: rc-mae"):
        check_rc_mae(MAE(spec), "mae.pt")


def _fake_run(folder, mode, values):
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(f"method:\n  name: rc-mae\n  mask_mode: {mode}\n  grad_align_every: 1\n"
                                        "train:\n  log_every: 1\n")
    lines = [json.dumps({"step": i + 1, "loss": 1.0, "grad_cos": v}) for i, v in enumerate(values)]
    (folder / "metrics.jsonl").write_text("\n".join([*lines, json.dumps({"step": 99, "loss": 1.0})]) + "\n")


def test_grad_hist_side_by_side(tmp_path, main, capsys, tiny_rc_mae):
    _fake_run(tmp_path / "s", "same", [-0.2, 0.1, 0.05, -0.05])
    _fake_run(tmp_path / "d", "different", [0.3, 0.4, 0.2, 0.5])
    png = tmp_path / "fig3b.png"
    assert main(["analyze", "grad-hist", "--runs", str(tmp_path / "s"), str(tmp_path / "d"), "--out", str(png)]) == 0
    summary = json.loads(png.with_suffix(".json").read_text())
    s, d = summary["runs"]
    assert s["label"].startswith("RC-MAE-S") and d["label"].startswith("RC-MAE-D")
    assert s["n"] == 4 and s["mean"] == pytest.approx(-0.025) and d["mean"] == pytest.approx(0.35)
    assert all(v["holds"] for v in summary["verdicts"].values())
    assert png.stat().st_size > 1000
    # a real run's monitor values are read too
    assert main(["analyze", "grad-hist", "--runs", str(tiny_rc_mae), "--out", str(tmp_path / "one.png")]) == 0
    assert json.loads((tmp_path / "one.json").read_text())["runs"][0]["n"] == 2   # 128 images / batch 64
    # a run without the monitor is a one-line error
    capsys.readouterr()
    _fake_run(tmp_path / "none", "same", [])
    assert main(["analyze", "grad-hist", "--runs", str(tmp_path / "none"), "--out", str(png)]) == 2
    assert "grad_align_every" in capsys.readouterr().err

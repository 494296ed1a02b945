"""rc-mae-free: the teacher-free consistency correction (methods/rc_mae_free.py, issue 15)."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import TINY, sets
from mimkit.config import build_config
from mimkit.errors import MimkitError
from mimkit.losses import masked_mse
from mimkit.methods import build_method
from mimkit.methods.base import Progress, StepRandom
from mimkit.train.optim import build_adamw


def _method(name="rc-mae-free", *extra):
    """A tiny-config method, seeded."""
    torch.manual_seed(0)
    return build_method(build_config("demo", TINY + [f"method.name={name}", "model.drop_path=0.0", *extra]), 1)


def _images(n=8, seed=0):
    return torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


def _progress(step):
    return Progress(step, 0, 100, 100, 1)


def _true_consistency_grad(rc, images, seed):
    """gamma * grad_S L_c of RC-MAE-S (Eq. 3) for the mask drawn from StepRandom(seed)."""
    rc.step_random = StepRandom(seed)
    mask = rc.sample_mask(images)
    pred = rc.student(images, mask.ids_keep, mask.ids_restore)
    t_pred = rc.teacher(images, mask.ids_keep, mask.ids_restore)
    named = [(n, p) for n, p in rc.named_parameters() if n.startswith("student.") and p.requires_grad]
    grads = torch.autograd.grad(rc.gamma * masked_mse(pred, t_pred, mask.mask), [p for _, p in named],
                                allow_unused=True)
    return {n: (g if g is not None else torch.zeros_like(p)) for (n, p), g in zip(named, grads)}


def _pair(names):
    """An RC-MAE-S and an rc-mae-free with the same student; the teacher differs from the student by D in
    ``names`` only, and the free method holds that D."""
    free, rc = _method(), _method("rc-mae")
    rc.student.load_state_dict(free.student.state_dict())
    rc.reset_teacher()
    free._ensure_D()
    g = torch.Generator().manual_seed(1)
    teacher = dict(rc.teacher.module.named_parameters())
    for n in names:
        d = torch.randn(free.D[n].shape, generator=g, dtype=torch.float32) * 1e-3
        free.D[n] = d.clone()
        teacher[n[len("student."):]].data -= d
    return free, rc


def _correction(free, images, seed):
    free.step_random = StepRandom(seed)
    free(images).loss.backward()
    return free.correction()


def _step_seeing(method, layer, images, seed=5):
    """Forward + backward with the mask of StepRandom(seed); returns (output, {"a": layer input, "g": dL/d output})."""
    seen = {}

    def tap(module, inputs, out):
        seen["a"] = inputs[0].detach()
        out.register_hook(lambda g: seen.update(g=g.detach()))

    h = layer.register_forward_hook(tap)
    method.step_random = StepRandom(seed)
    out = method(images)
    out.loss.backward()
    h.remove()
    return out, seen


def test_head_correction_is_the_exact_consistency_gradient():
    head = ["student.decoder.pred.weight", "student.decoder.pred.bias"]
    free, rc = _pair(head)
    images = _images()
    true = _true_consistency_grad(rc, images, 5)
    corr = _correction(free, images, 5)
    for n in head:
        assert true[n].abs().max() > 1e-6
        torch.testing.assert_close(corr[n], true[n], rtol=1e-4, atol=1e-7)
    # D is zero elsewhere: no correction there
    assert all(float(c.abs().max()) == 0.0 for n, c in corr.items() if n not in head)


def test_inner_layer_correction_is_the_documented_block_diagonal_form():
    """For an inner layer: gamma * [D_W | D_b] sum_n w_n [a_n; 1][a_n; 1]^T, w_n = |M| P ||dL_r/dy_n||^2 /
    (2 L_r d_out), recomputed here by hand from the layer's input and output gradient."""
    names = ["student.encoder.blocks.1.mlp.fc2.weight", "student.encoder.blocks.1.mlp.fc2.bias"]
    free, rc = _pair(names)
    images = _images()
    layer = free.student.encoder.blocks[1].mlp.fc2
    out, seen = _step_seeing(free, layer, images)
    corr = free.correction()
    m_p = 0.75 * 16 * 8 * 16
    a = seen["a"].reshape(-1, layer.in_features)
    w = seen["g"].pow(2).sum(-1).reshape(-1) * m_p / (2 * float(out.loss.detach()) * layer.out_features)
    aa = torch.cat([a, torch.ones(a.shape[0], 1)], 1)
    A = (aa * w[:, None]).T @ aa
    C = torch.cat([free.D[names[0]], free.D[names[1]][:, None]], 1) @ A
    torch.testing.assert_close(corr[names[0]], C[:, :-1], rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(corr[names[1]], C[:, -1], rtol=1e-4, atol=1e-9)
    # it is an approximation of the true gradient: same direction to a first order, not equal
    true = _true_consistency_grad(rc, images, 5)[names[0]]
    cos = torch.nn.functional.cosine_similarity(true.flatten(), corr[names[0]].flatten(), dim=0)
    assert 0.0 < float(cos) < 0.99


def test_fisher_output_factor_is_the_per_image_empirical_fisher_product():
    """method.output_factor=fisher, inner layer: |M| P / (2 L_r) sum_b <G_b, D> G_b with G_b = sum_n delta_n [a_n; 1]^T
    (every token of image b, cross-token terms included), recomputed by hand."""
    names = ["student.encoder.blocks.1.mlp.fc1.weight", "student.encoder.blocks.1.mlp.fc1.bias"]
    free, _ = _pair(names)
    fisher = _method("rc-mae-free", "method.output_factor=fisher")
    fisher.student.load_state_dict(free.student.state_dict())
    fisher.load_method_state_dict(free.method_state_dict())
    out, seen = _step_seeing(fisher, fisher.student.encoder.blocks[1].mlp.fc1, _images())
    corr = fisher.correction()
    a, g = seen["a"], seen["g"]                                        # (B, n, d_in), (B, n, d_out)
    aa = torch.cat([a, torch.ones(*a.shape[:2], 1)], -1)
    Daug = torch.cat([fisher.D[names[0]], fisher.D[names[1]][:, None]], 1)
    G = torch.einsum("bno,bni->boi", g, aa)                              # per-image gradients
    q = torch.einsum("boi,oi->b", G, Daug)
    C = (0.75 * 16 * 8 * 16) / (2 * float(out.loss.detach())) * torch.einsum("b,boi->oi", q, G)
    torch.testing.assert_close(corr[names[0]], C[:, :-1], rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(corr[names[1]], C[:, -1], rtol=1e-4, atol=1e-9)
    assert all(t.direct for t in fisher._taps)


def _train(method, steps, opt=None, start=0, seed=0):
    opt = opt or build_adamw(method.student.named_parameters(), 1e-2, 0.05, (0.9, 0.95))
    for i in range(start, start + steps):
        method.step_random = StepRandom(seed + i)
        method(_images(8, seed=i)).loss.backward()
        method.before_optimizer_step(_progress(i + 1))
        opt.step()
        opt.zero_grad(set_to_none=True)
        method.after_optimizer_step(_progress(i + 1))
    return opt


def test_difference_buffer_tracks_student_minus_ema_teacher():
    """D_t = m (D_(t-1) + Delta_t) kept inside the step equals S - T of an EMA teacher (weight decay included)."""
    free = _method("rc-mae-free", "method.momentum=0.9")
    params = free.corrected_parameters()
    teacher = {n: p.detach().clone() for n, p in params.items()}
    opt = build_adamw(free.student.named_parameters(), 1e-2, 0.05, (0.9, 0.95))
    for i in range(4):
        _train(free, 1, opt, start=i)
        for n, p in params.items():
            teacher[n] = 0.9 * teacher[n] + 0.1 * p.detach()
    for n, p in params.items():
        torch.testing.assert_close(free.D[n], p.detach() - teacher[n], rtol=0, atol=1e-6)
    assert max(float(d.abs().max()) for d in free.D.values()) > 1e-4


def test_state_round_trip_gives_identical_next_steps():
    a = _method()
    opt_a = _train(a, 3)
    state = {"student": {k: v.clone() for k, v in a.student.state_dict().items()},
             "method": a.method_state_dict(), "opt": copy.deepcopy(opt_a.state_dict())}
    json.dumps({k: v for k, v in state["method"].items() if k != "D"})  # plain values besides tensors
    _train(a, 2, opt_a, start=3)

    b = _method()
    b.student.load_state_dict(state["student"])
    b.load_method_state_dict(state["method"])
    opt_b = build_adamw(b.student.named_parameters(), 1e-2, 0.05, (0.9, 0.95))
    opt_b.load_state_dict(state["opt"])
    _train(b, 2, opt_b, start=3)
    for (n, x), y in zip(a.student.state_dict().items(), b.student.state_dict().values()):
        assert torch.equal(x, y), n
    for n in a.D:
        assert torch.equal(a.D[n], b.D[n]), n


def test_state_errors():
    free = _method()
    with pytest.raises(MimkitError, match="no rc-mae-free difference buffers"):
        free.load_method_state_dict({})
    state = free.method_state_dict()
    state["D"].pop("student.decoder.pred.bias")
    with pytest.raises(MimkitError, match="missing \\['student.decoder.pred.bias'\\]"):
        free.load_method_state_dict(state)


@pytest.mark.parametrize("factor", ["isotropic", "fisher"])
def test_accumulation_gives_the_same_correction(factor):
    """One batch of 16 == two micro-batches of 8 with loss / 2 (the loop's accumulation)."""
    one, two = (_method("rc-mae-free", f"method.output_factor={factor}") for _ in range(2))
    two.student.load_state_dict(one.student.state_dict())
    _train(one, 2)
    _train(two, 2)
    images = _images(16, seed=9)
    one.step_random = StepRandom(3)
    one(images).loss.backward()
    c1 = one.correction()
    for rank in range(2):
        two.step_random = StepRandom(3, rank, 2)
        (two(images[rank * 8:(rank + 1) * 8]).loss / 2).backward()
    c2 = two.correction()
    for n in c1:
        torch.testing.assert_close(c2[n], c1[n], rtol=2e-4, atol=1e-9)


def test_correction_tokens_subsample_is_close_and_head_stays_exact():
    full, sub = _method(), _method("rc-mae-free", "method.correction_tokens=2")
    _train(full, 2)
    sub.student.load_state_dict(full.student.state_dict())
    sub.load_method_state_dict(full.method_state_dict())
    images = _images(8, seed=4)
    cf, cs = _correction(full, images, 1), _correction(sub, images, 1)
    torch.testing.assert_close(cs["student.decoder.pred.weight"], cf["student.decoder.pred.weight"])
    n = "student.decoder.blocks.0.mlp.fc2.weight"
    cos = torch.nn.functional.cosine_similarity(cf[n].flatten(), cs[n].flatten(), dim=0)
    assert 0.3 < float(cos) < 1.0


@pytest.mark.parametrize("items, message", [
    (["method.mask_mode=different"], "method.mask_mode=different is not available with rc-mae-free"),
    (["method.correction_tokens=-1"], "method.correction_tokens must be an integer >= 0"),
    (["train.compile=true"], "train.compile=true is not available with rc-mae-free"),
    (["method.correction_scope=body"], "unknown value 'body' for method.correction_scope; accepted: all, head"),
    (["method.output_factor=fisher", "method.correction_tokens=4"], "method.output_factor=fisher uses every token"),
])
def test_config_errors(items, message):
    with pytest.raises(MimkitError, match=message):
        build_config("demo", TINY + ["method.name=rc-mae-free", *items])


def test_no_teacher_encoder():
    with pytest.raises(MimkitError, match="has no 'teacher' encoder"):
        _method().encoder("teacher")


def _ddp_worker(rank, init_file, state_path, out_path):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        m = _method()
        state = torch.load(state_path, weights_only=True)
        m.student.load_state_dict(state["student"])
        m.load_method_state_dict(state["method"])
        m.step_random = StepRandom(3, rank, 2)             # this rank's rows of the global mask draw
        m(_images(16, seed=9)[rank * 8:(rank + 1) * 8]).loss.backward()
        corr = m.correction()                              # all-reduces the curvature and L_r
        if rank == 0:
            torch.save(corr, out_path)
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_give_the_one_process_correction(tmp_path):
    one = _method()
    _train(one, 2)
    torch.save({"student": one.student.state_dict(), "method": one.method_state_dict()}, tmp_path / "state.pt")
    one.step_random = StepRandom(3)
    one(_images(16, seed=9)).loss.backward()
    expected = one.correction()
    torch.multiprocessing.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(tmp_path / "state.pt"),
                                                   str(tmp_path / "corr.pt")), nprocs=2, join=True)
    got = torch.load(tmp_path / "corr.pt", weights_only=True)
    assert got.keys() == expected.keys()
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], rtol=2e-4, atol=1e-9)


def test_cli_run(tmp_path):
    """A tiny rc-mae-free run through the trainer (accumulation 2): losses logged, momentum reported."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "mimkit", "pretrain", "--method", "rc-mae-free", "--no-progress",
                           "--output", str(out), *sets("data.max_train=128", "data.max_test=64", "train.epochs=1",
                                                       "train.log_every=1", "train.accum_steps=2",
                                                       "train.batch_size=32")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["momentum"] == pytest.approx(0.996) and r["loss"] > 0 for r in records)


def test_linear_model_teacher_free_trajectory_equals_teacher_trajectory():
    """rc-mae Sec. 4 / App. B: with D <- alpha (D + Delta) and grad L_c = D A, the linear model trains exactly as
    with the EMA teacher (same data, batches, masks): weights and probe curves equal to float round-off."""
    from mimkit.analysis import linear_model as lm

    cfg = lm.LinearModelConfig(dim=8, clusters=3, points_per_cluster=10, iterations=60, runs=1, probe_batch=4,
                               lr=0.01, teacher_momentum=0.9).validate()
    t = lm.run_one(cfg, 0, "teacher", keep_weights=True)
    f = lm.run_one(cfg, 0, "free", keep_weights=True)
    moved = (t["weights"][-1] - t["weights"][0]).abs().max()
    assert moved > 1e-2
    torch.testing.assert_close(f["weights"], t["weights"], rtol=0, atol=1e-12)
    for k in ("lc_norm", "lr_norm", "cos"):
        torch.testing.assert_close(f[k], t[k], rtol=1e-9, atol=1e-12)
    with pytest.raises(MimkitError, match="unknown linear-model arm 'x'"):
        lm.run_one(cfg, 0, "x")


def test_fidelity_probe_is_exact_at_the_head_and_command_writes_a_table(tmp_path, capsys):
    """``mimkit analyze teacher-free``: with an RC-MAE teacher that differs from the student in the head only,
    the head's correction is the true consistency gradient (cos 1, norm ratio 1)."""
    from mimkit.analysis.teacher_free import compare_batch, layer_group
    from mimkit.cli import main
    from mimkit.config import build_config
    from mimkit.train.checkpoint import atomic_save, make_checkpoint

    head = ["student.decoder.pred.weight", "student.decoder.pred.bias"]
    free, rc = _pair(head)
    r = compare_batch(rc, free, _images(), seed=2)["head (decoder.pred)"]
    assert r["dot"] / (r["true2"] * r["corr2"]) ** 0.5 == pytest.approx(1.0, abs=1e-5)
    assert r["corr2"] / r["true2"] == pytest.approx(1.0, rel=1e-4)
    assert layer_group("encoder.blocks.3.attn.qkv.weight") == "enc 3 attn"
    assert layer_group("encoder.blocks.0.norm1.weight") == "norms + tokens (no correction)"

    cfg = build_config("demo", TINY + ["method.name=rc-mae", "model.drop_path=0.0"])
    ckpt = make_checkpoint(method_name="rc-mae", config=cfg.to_dict(), student=rc.student.state_dict(),
                           teacher=rc.teacher.module.state_dict(), optimizer=None, scaler=None, global_step=1, epoch=1)
    atomic_save(ckpt, tmp_path / "rc.pt")
    assert main(["analyze", "teacher-free", "--checkpoint", str(tmp_path / "rc.pt"), "--out", str(tmp_path / "tf"),
                 "--batches", "1", "--batch-size", "8", "--device", "cpu"]) == 0
    summary = json.loads((tmp_path / "tf" / "summary.json").read_text())
    row = summary["results"]["rc-mae epoch 1"]["head (decoder.pred)"]
    assert row["cos"] == pytest.approx(1.0, abs=1e-5) and row["norm_ratio"] == pytest.approx(1.0, rel=1e-4)
    assert (tmp_path / "tf" / "teacher_free.png").stat().st_size > 1000
    assert "| head (decoder.pred) |" in capsys.readouterr().out


def test_bench_has_rc_mae_free_rows(tmp_path):
    from mimkit.bench import main as bench_main, select_rows

    assert select_rows("rc-mae-free") == ["RC-MAE-free", "RC-MAE-free (4 tokens)", "RC-MAE-free (head only)"]
    out = tmp_path / "bench.json"
    assert bench_main(["--img", "16", "--patch", "4", "--batch", "4", "--repeats", "1", "--warmup", "1",
                       "--methods", "mae,rc-mae-free", "--no-memory", "--no-gemm-profile", "--no-write",
                       "--json", str(out)]) == 0
    rows = {r["row"]: r for r in json.loads(out.read_text())["rows"]}
    # the curvature statistics are counted FLOPs (in the backward), fewer with 4 tokens per image
    assert rows["RC-MAE-free"]["flop_ratio"] > rows["RC-MAE-free (4 tokens)"]["flop_ratio"] > 1.0


def test_resume_through_the_trainer_is_exact(tmp_path):
    """Checkpoints hold D (method_state); 1 epoch + --resume to 2 == 2 epochs straight (losses, weights, D)."""
    from mimkit.api import pretrain

    items = TINY + ["method.name=rc-mae-free", "data.max_train=128", "data.max_test=64", "train.batch_size=32",
                    "train.log_every=1", "train.deterministic=true", "train.warmup_epochs=0",
                    "train.lr=1e-3", "train.min_lr=1e-3"]  # constant lr: the 1-epoch run is a prefix of the 2-epoch one
    full, cut = tmp_path / "full", tmp_path / "cut"
    pretrain(build_config("demo", items + ["train.epochs=2"]), full, show_progress=False, echo=False)
    pretrain(build_config("demo", items + ["train.epochs=1"]), cut, show_progress=False, echo=False)
    pretrain(build_config("demo", items + ["train.epochs=1"]), cut, resume=True, overrides=("train.epochs=2",),
             show_progress=False, echo=False)
    a = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (cut / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 9))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    ca = torch.load(full / "checkpoints" / "last.pt", weights_only=True)
    cb = torch.load(cut / "checkpoints" / "last.pt", weights_only=True)
    assert all(torch.equal(ca["student"][k], cb["student"][k]) for k in ca["student"])
    Da, Db = ca["method_state"]["D"], cb["method_state"]["D"]
    assert max(float(v.abs().max()) for v in Da.values()) > 0
    assert all(torch.equal(Da[k], Db[k]) for k in Da)


def test_head_scope_keeps_only_the_exact_part():
    full, head = _method(), _method("rc-mae-free", "method.correction_scope=head")
    _train(full, 2)
    names = ["student.decoder.pred.weight", "student.decoder.pred.bias"]
    head.student.load_state_dict(full.student.state_dict())
    head.load_method_state_dict({"D": {n: full.D[n] for n in names}})
    assert sorted(head.corrected_parameters()) == sorted(names)
    images = _images(8, seed=4)
    cf, ch = _correction(full, images, 1), _correction(head, images, 1)
    assert sorted(ch) == sorted(names)
    for n in names:
        torch.testing.assert_close(ch[n], cf[n])


def test_direct_and_second_moment_forms_give_the_same_correction():
    """Each tap forms [D_W | D_b] A either by accumulating A or by multiplying by D per token (the cheaper one);
    forcing every tap into the other form changes the correction by float round-off only."""
    a, b = _method(), _method()
    _train(a, 2)
    b.student.load_state_dict(a.student.state_dict())
    b.load_method_state_dict(a.method_state_dict())
    kinds = {tap.name: tap.direct for tap in a._taps}
    assert kinds["decoder.pred"] and kinds["encoder.blocks.0.mlp.fc2"] and not kinds["encoder.blocks.0.attn.qkv"]
    for tap in b._taps:
        tap.direct = not tap.direct
    images = _images(8, seed=4)
    ca, cb = _correction(a, images, 1), _correction(b, images, 1)
    assert ca.keys() == cb.keys() and len(ca) == 2 * len(a._taps)
    for n in ca:
        assert float(ca[n].abs().max()) > 0, n
        torch.testing.assert_close(cb[n], ca[n], rtol=1e-4, atol=1e-9)


def test_curvature_sums_stay_float32_under_autocast():
    """The head's tap runs inside the (bf16) autocast forward: its sums must not be computed in bf16."""
    free = _method()
    _train(free, 1)
    w = torch.rand(4, 9, generator=torch.Generator().manual_seed(1))
    for tap in (free._taps[0], next(t for t in free._taps if t.direct)):
        x = torch.randn(4, 9, tap.in_dim(), generator=torch.Generator().manual_seed(0))
        tap.acc = None
        tap.add(x, w)
        plain = tap.acc
        tap.acc = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            tap.add(x, w)
        assert tap.acc.dtype == torch.float32 and torch.equal(tap.acc, plain), tap.name

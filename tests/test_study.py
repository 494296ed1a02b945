"""benchmarks/cifar10_study.py: task graph, resume, scheduler, verdict rule, report, frozen evaluation."""

import argparse
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from helpers import sets
from mimkit.cli import main as mimkit_main

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("cifar10_study", ROOT / "benchmarks" / "cifar10_study.py")
cs = importlib.util.module_from_spec(_spec)
sys.modules["cifar10_study"] = cs
_spec.loader.exec_module(cs)


def make_study(tmp_path: Path, seeds: str = "0,1") -> "cs.Study":
    args = argparse.Namespace(profile="quick", runs=str(tmp_path / "runs"), seeds=seeds, data=str(tmp_path / "c10"),
                              out_dir=str(tmp_path / "docs"))
    return cs.Study(args)


def put(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def put_run(st, variant, seed, knn, probe=0.4, wall=1000.0, ft=None, epoch=None):
    """Fabricated results of one run: ``knn`` / ``probe`` / ``ft`` are dicts which -> value or one value for all."""
    final = st.profile["epochs"]
    for w in cs.encoders_of(variant):
        k = knn[w] if isinstance(knn, dict) else knn
        p = probe[w] if isinstance(probe, dict) else probe
        put(st.frozen_file(variant, seed, epoch or final, w), {"knn_top1": k, "linprobe_top1": p})
        if ft is not None:
            put(st.ft_dir(variant, seed, w) / "eval_finetune.json", {"top1": ft[w] if isinstance(ft, dict) else ft})
    if epoch is None:
        put(st.run_dir(variant, seed) / "summary.json",
            {"wall_time_s": wall, "imgs_per_s_median": 300.0, "final_loss": 0.5})


def claim_rows(st):
    res = cs.Results(st)
    ver = cs.Verdicts(res)
    out = {}
    for cid, _, _, rows in cs.CLAIMS:
        for metric, a, b, rel, _, _, better in rows:
            out.setdefault((cid, metric), []).append(ver.row(metric, a, b, rel, better))
    return ver, out


def test_task_graph_covers_every_run_once_in_priority_order(tmp_path):
    st = make_study(tmp_path)
    tasks = st.tasks()
    keys = [t.key for t in tasks]
    assert len(keys) == len(set(keys))
    assert all(d in keys for t in tasks for d in t.deps)
    pre = [t.key for t in tasks if t.kind == "pretrain"]
    main = [v for v, (_, _, m) in cs.VARIANTS.items() if m]
    assert len(pre) == len(cs.VARIANTS) + len(main)  # ablations on the first seed only
    assert all(not k.endswith("s1") or k.split()[1] in main for k in pre)
    # priority: every seed-0 pre-training first; all pre-training and frozen evaluations (the seed noise every
    # threshold needs) before the costs, the main fine-tunes, their robustness, then the ablation fine-tunes
    assert keys[:len(cs.VARIANTS)] == [f"pretrain {v} s0" for v in cs.VARIANTS]
    kinds = [t.kind for t in tasks]
    last_frozen = max(i for i, k in enumerate(kinds) if k in ("pretrain", "frozen"))
    assert kinds.index("cost") == last_frozen + 1 and kinds.index("finetune") == last_frozen + 2
    main_ft = [i for i, k in enumerate(keys) if k.startswith("finetune") and (k.split()[1] == "scratch" or (
        cs.VARIANTS[k.split()[1]][2] and k.split()[3] == cs.DEFAULT_WHICH[cs.method_of(k.split()[1])]))]
    other_ft = [i for i, k in enumerate(keys) if k.startswith("finetune") and i not in main_ft]
    assert len(main_ft) == 1 + 4 * 2 and max(main_ft) < min(i for i, k in enumerate(kinds) if k == "robustness")
    assert max(i for i, k in enumerate(kinds) if k == "robustness") < min(other_ft)
    assert "finetune rc-mae-s s0 student" in keys and "finetune rc-mae-s s1 student" not in keys
    # a task starts only after its dependencies in this order
    pos = {k: i for i, k in enumerate(keys)}
    assert all(pos[d] < pos[t.key] for t in tasks for d in t.deps)
    # curves: every `curve_every` epochs for MAE / RC-MAE-S / SdAE, the final epoch only for the others
    frozen = [t.key for t in tasks if t.kind == "frozen"]
    assert {k.split()[3] for k in frozen if k.startswith("frozen mae s0")} == {"e2", "e4", "e6", "e8"}
    assert [k for k in frozen if k.startswith("frozen rc-mae-d s0")] == ["frozen rc-mae-d s0 e8 teacher",
                                                                         "frozen rc-mae-d s0 e8 student"]
    assert [k for k in frozen if k.startswith("frozen sdae-full")] == ["frozen sdae-full s0 e8 student"]
    init = next(t for t in tasks if t.key == "frozen init s0")
    assert init.deps == ["pretrain mae s0"] and "--random-init" in init.build()


def test_commands_resume_what_was_interrupted(tmp_path):
    st = make_study(tmp_path)
    argv = st.pretrain_argv("rc-mae-d", 1)
    assert "--resume" not in argv
    assert "method.mask_mode=different" in argv and "train.seed=1" in argv and "model.embed_dim=128" in argv
    ckpt = st.run_dir("rc-mae-d", 1) / "checkpoints" / "last.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"x")
    assert st.pretrain_argv("rc-mae-d", 1)[-1] == "--resume"
    out = st.ft_dir("mae", 0, "student")
    first = st.finetune_argv(out, ckpt, "student", 0)
    assert first[first.index("--which") + 1] == "student" and "train.epochs=3" in first
    assert "--from-scratch" in st.finetune_argv(out, ckpt, None, 0)
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "last.pt").write_bytes(b"x")
    again = st.finetune_argv(out, ckpt, "student", 0)
    assert again[again.index("finetune"):] == ["finetune", "--resume", "--output", str(out), "--no-progress"]


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_scheduler_skips_what_depends_on_a_failure_and_never_reruns_finished_work(tmp_path):
    d = tmp_path
    (d / "e.done").write_text("")
    T = cs.Task
    tasks = [
        T("A", "x", d / "a.done", lambda: _py(f"open(r'{d / 'a.done'}', 'w')"), d / "a.log"),
        T("B", "x", d / "b.done", lambda: _py("import sys; print('boom'); sys.exit(3)"), d / "b.log"),
        T("C", "x", d / "c.done", lambda: _py(f"open(r'{d / 'c.done'}', 'w')"), d / "c.log", ["B"]),
        T("D", "x", d / "d.done", lambda: _py(f"open(r'{d / 'd.done'}', 'w')"), d / "d.log", ["A", "E"]),
        T("E", "x", d / "e.done", lambda: _py(f"open(r'{d / 'e_ran'}', 'w')"), d / "e.log"),
        T("F", "x", d / "f.done", lambda: _py("pass"), d / "f.log"),  # exits 0 without its result: a failure
    ]
    done_calls, lines = [], []
    failed = cs.run_tasks(tasks, 2, 1, lambda: done_calls.append(1), False, lines.append)
    assert failed == ["B", "C", "F"]
    assert (d / "a.done").exists() and (d / "d.done").exists() and not (d / "c.done").exists()
    assert not (d / "e_ran").exists()  # already finished: not launched again
    assert len(done_calls) == 2
    assert "boom" in (d / "b.log").read_text()
    assert any(line.startswith("FAILED B (exit 3)") and str(d / "b.log") in line for line in lines)
    assert any(line.startswith("skip C") for line in lines)


def test_only_never_starts_from_unfinished_inputs_and_report_errors_do_not_stop_the_run(tmp_path):
    d = tmp_path
    T = cs.Task
    tasks = [
        T("pre", "pretrain", d / "pre.done", lambda: _py(f"open(r'{d / 'pre.done'}', 'w')"), d / "pre.log"),
        T("ft", "finetune", d / "ft.done", lambda: _py(f"open(r'{d / 'ft.done'}', 'w')"), d / "ft.log", ["pre"]),
        T("ev", "frozen", d / "ev.done", lambda: _py(f"open(r'{d / 'ev.done'}', 'w')"), d / "ev.log"),
    ]
    lines = []
    failed = cs.run_tasks(tasks, 2, 1, lambda: None, False, lines.append, runnable={"ft", "ev"})
    assert failed == ["ft"] and not (d / "pre.done").exists() and not (d / "ft.done").exists()
    assert any(line.startswith("skip ft: it needs pre") for line in lines)

    def broken_report():
        raise ValueError("bad number")

    (d / "ev.done").unlink()
    failed = cs.run_tasks(tasks, 1, 1, broken_report, False, lines.append)
    assert failed == [] and (d / "ft.done").exists() and (d / "ev.done").exists()
    assert any("could not rewrite the report" in line and "bad number" in line for line in lines)


def test_a_run_stopped_before_its_first_checkpoint_is_moved_aside(tmp_path):
    st = make_study(tmp_path)
    run = st.run_dir("mae", 0)
    run.mkdir(parents=True)
    (run / "train.log").write_text("started\n")
    argv = st.pretrain_argv("mae", 0)
    assert "--resume" not in argv and not run.exists()
    (moved,) = (st.root / "aborted").iterdir()
    assert moved.name.startswith("mae-s0-") and (moved / "train.log").read_text() == "started\n"


def test_verdicts_follow_the_documented_rule(tmp_path):
    st = make_study(tmp_path)
    put_run(st, "mae", 0, 0.30, probe=0.405, ft=0.40)
    put_run(st, "mae", 1, 0.31, probe=0.40, ft=0.41)
    put_run(st, "rc-mae-s", 0, {"teacher": 0.36, "student": 0.35}, probe=0.40, ft=0.30, wall=1000)
    put_run(st, "rc-mae-s", 1, {"teacher": 0.37, "student": 0.36}, probe=0.41, ft=0.31, wall=1000)
    put_run(st, "rc-mae-d", 0, 0.36)
    put_run(st, "rc-mae-s-m80", 0, 0.365, wall=900)
    ver, rows = claim_rows(st)

    va, vb, d, thr, verdict = rows[("rc-s", "knn")][0]
    assert va == {0: 0.36, 1: 0.37} and vb == {0: 0.30, 1: 0.31}
    assert d == pytest.approx(0.06)
    # identical per-seed differences: the larger of test-set noise and the pooled seed noise sets the threshold
    p = (0.30 + 0.31 + 0.36 + 0.37) / 4
    pooled = math.sqrt(0.00005)  # every main run's two seeds differ by one point
    assert ver.seed_sd["knn"] == pytest.approx(pooled)
    binom = math.sqrt(2 * p * (1 - p) / 10_000) / math.sqrt(2)
    assert thr == pytest.approx(2 * max(binom, math.sqrt(2) * pooled / math.sqrt(2)))
    assert verdict == "holds"
    _, _, d, thr, verdict = rows[("rc-s", "linprobe")][0]  # +0.25 points with a seed spread of 1.5
    assert d == pytest.approx(0.0025) and thr == pytest.approx(2 * 0.015 / 2) and verdict == "inconclusive within noise"
    assert rows[("rc-s", "finetune")][0][4] == "does not hold"
    # one seed of RC-MAE-D so far
    assert rows[("rc-d", "knn")][0][4] == "holds (1 of 2 seeds so far)"
    # single-seed ablation: threshold from the pooled seed standard deviation of the main runs; the main arm is
    # compared on the shared seed only
    va, vb, d, thr, verdict = rows[("mask80", "knn")][0]
    assert va == {0: 0.365} and vb == {0: 0.36}
    assert d == pytest.approx(0.005) and thr == pytest.approx(2 * math.sqrt(2) * math.sqrt(0.00005))
    assert verdict == "holds (no difference beyond noise)"
    # costs: interleaved step times, one measurement
    put(st.cost_file(), {"step_s": {"mae": 0.30, "rc-mae-s": 0.40, "rc-mae-s-m80": 0.39, "rc-mae-d": 0.41}})
    _, rows = claim_rows(st)
    _, _, ratio, _, verdict = rows[("mask80", "step")][0]
    assert ratio == pytest.approx(0.975) and verdict == "does not hold"  # 2.5 % faster: within the 3 % tolerance
    va, vb, ratio, _, verdict = rows[("cost", "step")][0]
    assert va == {0: 0.40} and ratio == pytest.approx(4 / 3) and verdict == "holds"
    assert rows[("sdae-mae", "knn")][0][4] == "not run yet"
    # robustness: a lower mean corruption error is better, so RC-MAE below MAE is the claim holding
    for v, seed, err in (("mae", 0, 0.50), ("mae", 1, 0.51), ("rc-mae-s", 0, 0.40), ("rc-mae-s", 1, 0.41)):
        put(st.ft_dir(v, seed, cs.DEFAULT_WHICH[cs.method_of(v)]) / "eval_robustness.json",
            {"mean_corruption_error": err})
    _, rows = claim_rows(st)
    _, _, d, _, verdict = rows[("robust", "mce")][0]
    assert d == pytest.approx(-0.10) and verdict == "holds"


def test_report_has_one_table_per_claim_and_figures(tmp_path):
    st = make_study(tmp_path, seeds="0")
    put_run(st, "mae", 0, 0.30, ft=0.40)
    put_run(st, "rc-mae-s", 0, 0.36, ft=0.41)
    for e in (2, 4, 6):
        put_run(st, "mae", 0, 0.2 + e / 100, epoch=e)
        put(st.frozen_file("rc-mae-s", 0, e, "teacher"), {"knn_top1": 0.25 + e / 100, "linprobe_top1": 0.3})
    out = tmp_path / "docs" / "RESULTS.md"
    out.parent.mkdir(parents=True)
    (out.parent / "RESULTS_NOTES.md").write_text("The teacher lags the student.\n")
    cs.write_report(st, out, tmp_path / "docs" / "images" / "results", "python benchmarks/cifar10_study.py")
    text = out.read_text()
    assert "## Reading the results (written by hand" in text and "The teacher lags the student." in text
    assert text.count("\n### ") >= len(cs.CLAIMS)
    for _, title, _, _ in cs.CLAIMS:
        assert f"### {title}" in text
    assert "small-scale reproduction" in text and "not run yet" in text
    row = next(line for line in text.splitlines() if line.startswith("| kNN top-1 (%) | RC-MAE-S (teacher) | MAE |"))
    assert "| 36.0 | 30.0 | +6.0 |" in row
    assert "(images/results/convergence.png)" in text
    assert (tmp_path / "docs" / "images" / "results" / "convergence.png").stat().st_size > 1000
    # the convergence claim uses the mean over the curve's checkpoints
    conv = next(line for line in text.splitlines() if line.startswith("| mean kNN"))
    mae_mean = 100 * (0.22 + 0.24 + 0.26 + 0.30) / 4
    assert f"| {mae_mean:.1f} |" in conv


def test_cli_rejects_bad_arguments_with_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cs.main(["--jobs", "0"])
    assert e.value.code == 2 and "--jobs must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cs.main(["--only", "pretrain,nothing"])
    assert "--only accepts" in capsys.readouterr().err
    assert cs.main(["--data", str(tmp_path / "missing"), "--runs", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "CIFAR-10 not found" in err and len(err.strip().splitlines()) == 1
    out = tmp_path / "R.md"
    assert cs.main(["--report-only", "--runs", str(tmp_path / "r"), "--out", str(out)]) == 0
    assert "not run yet" in out.read_text()


def test_frozen_evaluation_matches_the_library_knn_and_probe(tmp_path):
    from mimkit.config import config_from_dict
    from mimkit.eval.knn import evaluate_knn
    from mimkit.eval.linprobe import build_linprobe_config, run_linprobe
    from mimkit.eval.loading import load_pretrained_encoder
    from mimkit.runtime import datamodule_from_config

    run = tmp_path / "rc"
    assert mimkit_main(["pretrain", "--output", str(run), "--no-progress", "--method", "rc-mae",
                        *sets("train.epochs=1", "eval.pool=mean")]) == 0
    ckpt = run / "checkpoints" / "last.pt"
    out = tmp_path / "frozen.json"
    assert cs.main(["_frozen", "--checkpoint", str(ckpt), "--which", "student", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["which"] == "student" and res["method"] == "rc-mae" and res["epoch"] == 1
    pre = load_pretrained_encoder(ckpt, "student")
    data = datamodule_from_config(config_from_dict(pre.config))
    ref = evaluate_knn(pre.encoder, data, device=torch.device("cpu"), pool="mean")
    assert res["knn_top1"] == pytest.approx(ref["knn_top1"])
    lp = run_linprobe(pre.encoder, data, build_linprobe_config(None, ["eval.pool=mean"], pre.config),
                      device=torch.device("cpu"))
    assert res["linprobe_top1"] == pytest.approx(lp["linprobe_top1"])
    assert res["train_images"] == 512 and res["test_images"] == 256
    # the reference point: the same shape and data with fresh weights
    init = tmp_path / "init.json"
    assert cs.main(["_frozen", "--checkpoint", str(ckpt), "--which", "student", "--random-init", "0",
                    "--out", str(init)]) == 0
    r0 = json.loads(init.read_text())
    torch.manual_seed(0)
    from mimkit.methods import build_method
    fresh = build_method(config_from_dict(pre.config), 1).encoder("student").eval()
    assert r0["method"] == "init" and r0["epoch"] == 0
    assert r0["knn_top1"] == pytest.approx(evaluate_knn(fresh, data, device=torch.device("cpu"), pool="mean")["knn_top1"])

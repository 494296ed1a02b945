"""benchmarks/cifar10_study.py and benchmarks/study/: task graph, resume, scheduler, gates and verdicts, report,
frozen evaluation."""

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
from study import profiles, report  # noqa: E402  (importable once the entry point has put benchmarks/ on the path)


def make_study(tmp_path: Path, profile: str = "fair", seeds: str = "0,1,2") -> "cs.Study":
    args = argparse.Namespace(profile=profile, runs=str(tmp_path / "runs"), seeds=seeds, data=str(tmp_path / "c10"),
                              out_dir=str(tmp_path / "docs"))
    return cs.Study(args)


def put(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def frozen_record(knn: float, probe: float, cls_shift: float = -0.05, rel_ce: float | None = None) -> dict:
    r = {"pools": {"mean": {"knn_top1": knn, "linprobe_top1": probe},
                   "cls": {"knn_top1": knn + cls_shift, "linprobe_top1": probe + cls_shift}},
         "knn_top1": knn, "linprobe_top1": probe, "pool": "mean"}
    if rel_ce is not None:
        r["robustness"] = {"relative_corruption_error": rel_ce, "mean_corruption_error": 0.5 + rel_ce}
    return r


def put_run(st, variant, seed, knn, probe=0.40, rel_ce=None, epochs=None):
    """Fabricated results of one run at its final epoch (or ``epochs``); dict values give per-encoder numbers."""
    for e in epochs or [st.profile["epochs"]]:
        for w in profiles.encoders_of(variant):
            k = knn[w] if isinstance(knn, dict) else knn
            p = probe[w] if isinstance(probe, dict) else probe
            put(st.frozen_file(variant, seed, e, w), frozen_record(k, p, rel_ce=rel_ce))
    put(st.run_dir(variant, seed) / "summary.json", {"wall_time_s": 1000.0, "imgs_per_s_median": 300.0,
                                                     "final_loss": 0.5})


def rows_of(ver, cid):
    claim = next(c for c in ver.claims() if c.cid == cid)
    return [(row, ver.outcomes[(cid, i)]) for i, row in enumerate(claim.rows)]


def find(ver, cid, metric, a, b=None):
    for row, out in rows_of(ver, cid):
        if row.metric == metric and row.a == a and (b is None or row.b == b):
            return out
    raise KeyError((cid, metric, a, b))


def test_task_graph_evaluates_each_run_right_after_it_in_priority_order(tmp_path):
    st = make_study(tmp_path)
    tasks = st.tasks()
    keys = [t.key for t in tasks]
    assert len(keys) == len(set(keys)) and all(d in keys for t in tasks for d in t.deps)
    pre = [k for k in keys if k.startswith("pretrain")]
    assert pre == ["pretrain mae s0", "pretrain rc-mae-s s0", "pretrain rc-mae-free s0", "pretrain rc-mae-d s0",
                   "pretrain sdae s0", "pretrain mae s1", "pretrain rc-mae-s s1", "pretrain rc-mae-free s1",
                   "pretrain rc-mae-d s1", "pretrain sdae s1", "pretrain mae s2", "pretrain rc-mae-s s2",
                   "pretrain rc-mae-free s2"]
    # each run's frozen evaluations follow it; MAE gets the initialisation reference and the costs after it
    i = keys.index("pretrain rc-mae-s s0")
    assert keys[i + 1:i + 9] == [f"frozen rc-mae-s s0 e{e} {w}" for e in (3, 6, 9, 13) for w in ("teacher", "student")]
    assert keys[1:7] == [*[f"frozen mae s0 e{e} student" for e in (3, 6, 9, 13)], "frozen init s0", "cost s0"]
    assert [k for k in keys if k.startswith("frozen rc-mae-d s0")] == ["frozen rc-mae-d s0 e13 teacher",
                                                                       "frozen rc-mae-d s0 e13 student"]
    assert not any(t.kind == "finetune" for t in tasks)  # no CPU fine-tune in the fair profile
    robust = {t.key for t in tasks if "--robust-images" in t.build()}
    assert "frozen mae s0 e13 student" in robust and "frozen init s0" in robust
    assert {"frozen rc-mae-s s0 e13 teacher", "frozen rc-mae-s s0 e13 student", "frozen rc-mae-d s0 e13 teacher",
            "frozen sdae s0 e13 student"} <= robust
    assert "frozen rc-mae-d s0 e13 student" not in robust and "frozen sdae s0 e13 teacher" not in robust
    assert not any(" e3 " in k or " e6 " in k for k in robust)
    assert [k for k in keys if k.startswith("frozen sdae s0")] == ["frozen sdae s0 e13 teacher",
                                                                   "frozen sdae s0 e13 student"]
    frozen_argv = [t.build() for t in tasks if t.kind == "frozen"]
    assert all(a[a.index("--eval-train") + 1] == "10000" for a in frozen_argv)
    # the first study's profile: ablations on the first seed, fine-tunes after every frozen evaluation
    q = make_study(tmp_path / "q", profile="quick", seeds="0,1").tasks()
    qk = [t.key for t in q]
    assert "pretrain sdae-full s0" in qk and "pretrain sdae-full s1" not in qk
    kinds = [t.kind for t in q]
    assert kinds.index("finetune") > max(i for i, k in enumerate(kinds) if k == "frozen")


def test_commands_resume_what_was_interrupted(tmp_path):
    st = make_study(tmp_path)
    argv = st.pretrain_argv("sdae", 1)
    assert "--resume" not in argv and "train.seed=1" in argv and "model.embed_dim=128" in argv
    assert "model.drop_path=0.25" in argv and "method.ema_every_steps=33" in argv  # SdAE's own recipe
    assert "model.drop_path=0.25" not in st.pretrain_argv("mae", 1)
    ckpt = st.run_dir("sdae", 1) / "checkpoints" / "last.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"x")
    assert st.pretrain_argv("sdae", 1)[-1] == "--resume"
    q = make_study(tmp_path / "q", profile="quick", seeds="0,1")
    out = q.ft_dir("mae", 0, "student")
    first = q.finetune_argv(out, ckpt, "student", 0)
    assert first[first.index("--which") + 1] == "student" and "train.epochs=3" in first
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "last.pt").write_bytes(b"x")
    again = q.finetune_argv(out, ckpt, "student", 0)
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


def test_a_cost_measurement_missing_a_variant_is_measured_again(tmp_path):
    st = make_study(tmp_path)
    put(st.cost_file(), {"step_s": {v: 0.3 for v in st.variants()}})
    st.retire_incomplete_cost()
    assert st.cost_file().exists()
    put(st.cost_file(), {"step_s": {"mae": 0.3}, "skipped": {"rc-mae-free": "unknown method"}})
    st.retire_incomplete_cost()
    assert not st.cost_file().exists() and len(list(st.root.glob("cost-*.json"))) == 1


def test_a_run_stopped_before_its_first_checkpoint_is_moved_aside(tmp_path):
    st = make_study(tmp_path)
    run = st.run_dir("mae", 0)
    run.mkdir(parents=True)
    (run / "train.log").write_text("started\n")
    argv = st.pretrain_argv("mae", 0)
    assert "--resume" not in argv and not run.exists()
    (moved,) = (st.root / "aborted").iterdir()
    assert moved.name.startswith("mae-s0-") and (moved / "train.log").read_text() == "started\n"


def _fill_main(st, mae_probe=(0.50, 0.51, 0.52)):
    """Three MAE / RC-MAE-S seeds with a 1-point seed spread; RC-MAE-free equal to RC-MAE-S's student + 0.1."""
    put(st.init_file(), frozen_record(0.30, 0.35))
    for s in (0, 1, 2):
        put_run(st, "mae", s, 0.40 + s / 100, probe=mae_probe[s], rel_ce=0.20 + s / 100)
        put_run(st, "rc-mae-s", s, {"teacher": 0.45 + s / 100, "student": 0.44 + s / 100},
                probe={"teacher": mae_probe[s] + 0.005, "student": mae_probe[s]}, rel_ce=0.15 + s / 100)
        put_run(st, "rc-mae-free", s, 0.441 + s / 100, probe=mae_probe[s])


def test_verdicts_follow_the_declared_rules(tmp_path):
    from scipy import stats as sst

    st = make_study(tmp_path)
    _fill_main(st)
    ver = report.Verdicts(report.Results(st))
    assert ver.sanity["state"] == "passed" and ver.sanity["gain"] == pytest.approx(0.16)
    # kNN: every run has a 1-point seed spread -> pooled sd 0.01 with 2 df per variant (MAE, RC-S, free); an
    # RC-MAE run's student is not a second replicate of its teacher, so it adds no degrees of freedom
    pooled = ver.pooled_for("knn@mean")
    assert pooled.sd == pytest.approx(0.01) and pooled.df == 6
    se = math.sqrt(2) * 0.01 / math.sqrt(3)
    out = find(ver, "rc-mae-s-mae", "knn@mean", ("rc-mae-s", "teacher"))
    assert out.va == pytest.approx({0: 0.45, 1: 0.46, 2: 0.47}) and out.d == pytest.approx(0.05)
    assert out.noise.se == pytest.approx(se) and out.noise.df == 6
    assert out.test.p == pytest.approx(2 * sst.t.sf(0.05 / se, 6)) and out.verdict == "holds"
    # +0.5 points of probe: far inside the noise
    assert find(ver, "rc-mae-s-mae", "linprobe@mean", ("rc-mae-s", "teacher")).verdict == "inconclusive"
    # teacher vs student +1 point with se 0.8: inconclusive, not "does not hold"
    assert find(ver, "rc-ts", "knn@mean", ("rc-mae-s", "teacher")).verdict == "inconclusive"
    # equivalence within 1 point: 0.1 points apart, but 3 seeds with a 1-point spread cannot show it (TOST)
    eq = find(ver, "free-eq", "knn@mean", ("rc-mae-free", "student"), ("rc-mae-s", "student"))
    assert eq.d == pytest.approx(0.001) and eq.test.outcome == "holds" and eq.verdict == "inconclusive"
    assert eq.test.p == pytest.approx(sst.t.sf((0.01 - 0.001) / se, 6))
    # lower relative corruption error is better: RC-MAE-S's 5 points less holds
    rob = find(ver, "robust", "rel_ce", ("rc-mae-s", "teacher"))
    assert rob.d == pytest.approx(-0.05) and rob.verdict == "holds"
    # cls pooling is secondary: tested, labelled uncorrected, outside the Holm family
    sec = find(ver, "rc-mae-s-mae", "knn@cls", ("rc-mae-s", "teacher"))
    assert sec.verdict == "holds (uncorrected)"
    primary_tested = [o for (cid, i), o in ver.outcomes.items()
                      if o.test is not None and ver._claim(cid).rows[i].primary]
    assert ver.family_size == len(primary_tested) > 0
    # rows whose arms have not run: RC-MAE-D, SdAE
    assert find(ver, "rc-mae-d-mae", "knn@mean", ("rc-mae-d", "teacher")).verdict == "not run yet"
    # costs: one interleaved measurement, ratios against a 3 % tolerance
    put(st.cost_file(), {"step_s": {"mae": 0.23, "rc-mae-s": 0.34, "rc-mae-free": 0.24}, "threads": 1, "batch": 64})
    ver = report.Verdicts(report.Results(st))
    assert find(ver, "cost", "step", ("rc-mae-s", "default")).verdict == "holds"
    free_vs_mae = find(ver, "cost", "step", ("rc-mae-free", "default"), ("mae", "default"))
    assert free_vs_mae.d == pytest.approx(0.24 / 0.23) and free_vs_mae.verdict == "does not hold"  # 4.3 % dearer
    assert find(ver, "cost", "step", ("rc-mae-free", "default"), ("rc-mae-s", "default")).verdict == "holds"


def test_gates_say_not_tested_and_pending(tmp_path):
    # a MAE probe only 5 points above initialisation: no accuracy verdict, costs still judged
    st = make_study(tmp_path)
    _fill_main(st, mae_probe=(0.40, 0.40, 0.40))
    put(st.cost_file(), {"step_s": {"mae": 0.23, "rc-mae-s": 0.34}})
    ver = report.Verdicts(report.Results(st))
    assert ver.sanity["state"] == "failed"
    assert find(ver, "rc-mae-s-mae", "knn@mean", ("rc-mae-s", "teacher")).verdict == \
        "not tested: representation not learned"
    assert find(ver, "cost", "step", ("rc-mae-s", "default")).verdict == "holds"
    # the first study's profile: RC-MAE's teacher after 624 steps is outside its regime, whatever the numbers
    q = make_study(tmp_path / "q", profile="quick", seeds="0,1")
    for s in (0, 1):
        put_run(q, "mae", s, 0.30 + s / 100)
        put_run(q, "rc-mae-s", s, 0.40 + s / 100)
    ver = report.Verdicts(report.Results(q))
    assert not ver.regimes["rc-mae-s"][2] and not ver.regimes["sdae"][2]
    assert find(ver, "rc-mae-s-mae", "knn@mean", ("rc-mae-s", "teacher")).verdict == \
        "not tested: teacher outside its regime"
    # one seed each: no seed-noise estimate, no verdict
    one = make_study(tmp_path / "one")
    put(one.init_file(), frozen_record(0.30, 0.35))
    put_run(one, "mae", 0, 0.40, probe=0.60)
    put_run(one, "rc-mae-s", 0, 0.45, probe=0.61)
    out = find(report.Verdicts(report.Results(one)), "rc-mae-s-mae", "knn@mean", ("rc-mae-s", "teacher"))
    assert out.verdict.startswith("pending: the seed noise has 0 of the 2 degrees of freedom") and out.test is None


def test_report_has_the_regime_table_gates_rules_claims_and_figures(tmp_path):
    st = make_study(tmp_path)
    _fill_main(st)
    for s in (0, 1, 2):
        put_run(st, "mae", s, 0.40 + s / 100, probe=0.50, rel_ce=0.2, epochs=[3, 6, 9, 13])
        put_run(st, "rc-mae-s", s, 0.42 + s / 100, probe=0.51, rel_ce=0.2, epochs=[3, 6, 9, 13])
    out = tmp_path / "docs" / "RESULTS.md"
    out.parent.mkdir(parents=True)
    (out.parent / "RESULTS_NOTES.md").write_text("The teacher is in its regime.\n")
    report.write_report(st, out, out.parent / "images" / "results", "python benchmarks/cifar10_study.py")
    text = out.read_text()
    for heading in ("## Teacher regime", "## Sanity gates", "## Verdict rules", "## Claims", "## All runs"):
        assert heading in text
    assert "| RC-MAE-S | 10,153 | 250 | 2.46 % | 2.5 % |" in text
    assert "| SdAE (multifold) | 307 | 3,300 | 32.50 % | 33.3 % |" in text
    assert "**passed**" in text and "Holm" in text and "TOST" in text
    ver = report.Verdicts(report.Results(st))
    assert f"this family has **{ver.family_size} rows** now" in text
    for claim in ver.claims():
        assert f"### {claim.title}" in text
    assert "Not in this profile" in text and "RC-MAE with mask 0.80 matches mask 0.75" in text
    assert "The teacher is in its regime." in text
    assert (out.parent / "images" / "results" / "convergence.png").stat().st_size > 1000
    # paper numbers only on the paper's own metric: the RC-MAE teacher's linear probe row, not kNN
    probe_row = next(line for line in text.splitlines()
                     if line.startswith("| linear probe top-1 (%), mean pool | RC-MAE-S (teacher) | MAE |"))
    knn_row = next(line for line in text.splitlines()
                   if line.startswith("| kNN top-1 (%), mean pool | RC-MAE-S (teacher) | MAE |"))
    assert "| 68.4 | 67.3 |" in probe_row and "| — | — |" in knn_row
    conv = next(line for line in text.splitlines() if line.startswith("| mean kNN over the run (%), mean pool |"))
    assert "| — | — |" in conv  # Fig. 1(c) is fine-tuning accuracy: no paper column


def test_cli_rejects_bad_arguments_with_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cs.main(["--jobs", "0"])
    assert e.value.code == 2 and "--jobs must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cs.main(["--only", "pretrain,nothing"])
    assert "--only accepts" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cs.main(["--seeds", "0"])
    assert "runs up to 3 seeds" in capsys.readouterr().err
    assert cs.main(["--data", str(tmp_path / "missing"), "--runs", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "CIFAR-10 not found" in err and len(err.strip().splitlines()) == 1
    out = tmp_path / "R.md"
    assert cs.main(["--report-only", "--runs", str(tmp_path / "r"), "--out", str(out)]) == 0
    assert "not run yet" in out.read_text()


def test_frozen_evaluation_matches_the_library(tmp_path):
    from mimkit.config import config_from_dict
    from mimkit.eval.knn import evaluate_knn
    from mimkit.config.linprobe import build_linprobe_config
    from mimkit.eval.linprobe import ProbedEncoder, run_linprobe
    from mimkit.interop.loading import load_pretrained_encoder
    from mimkit.eval.robustness import evaluate_robustness
    from mimkit.methods import build_method
    from mimkit.runtime import datamodule_from_config

    run = tmp_path / "rc"
    assert mimkit_main(["pretrain", "--output", str(run), "--no-progress", "--method", "rc-mae",
                        *sets("train.epochs=1", "eval.pool=mean")]) == 0
    ckpt = run / "checkpoints" / "last.pt"
    out = tmp_path / "frozen.json"
    assert cs.main(["_frozen", "--checkpoint", str(ckpt), "--which", "student", "--out", str(out),
                    "--robust-images", "40", "--eval-train", "300"]) == 0
    res = json.loads(out.read_text())
    assert res["which"] == "student" and res["method"] == "rc-mae" and res["epoch"] == 1
    assert res["train_images"] == 300 and res["test_images"] == 256
    pre = load_pretrained_encoder(ckpt, "student")
    cfg = config_from_dict(pre.config)
    cfg.data.max_train, cfg.train.seed = 300, 0  # --eval-train: a fixed subset, the same whatever the run's seed
    data = datamodule_from_config(cfg)
    cpu = torch.device("cpu")
    for pool in ("mean", "cls"):  # both poolings come from one forward pass and equal the library's
        ref = evaluate_knn(pre.encoder, data, device=cpu, pool=pool)
        assert res["pools"][pool]["knn_top1"] == pytest.approx(ref["knn_top1"])
    lp, probe = run_linprobe(pre.encoder, data, build_linprobe_config(None, ["eval.pool=mean"], pre.config),
                             device=cpu, return_probe=True)
    assert res["linprobe_top1"] == pytest.approx(lp["linprobe_top1"]) == res["pools"]["mean"]["linprobe_top1"]
    rob = evaluate_robustness(ProbedEncoder(pre.encoder, probe.eval(), "mean"), data, device=cpu, seed=0,
                              max_images=40)
    assert res["robustness"]["mean_corruption_error"] == pytest.approx(rob["mean_corruption_error"])
    assert res["robustness"]["relative_corruption_error"] == pytest.approx(
        rob["mean_corruption_error"] - rob["clean_error"])
    # the reference point: the same shape and data with fresh weights
    init = tmp_path / "init.json"
    assert cs.main(["_frozen", "--checkpoint", str(ckpt), "--which", "student", "--random-init", "0",
                    "--out", str(init), "--eval-train", "300"]) == 0
    r0 = json.loads(init.read_text())
    torch.manual_seed(0)
    fresh = build_method(config_from_dict(pre.config), 1).encoder("student").eval()
    assert r0["method"] == "init" and r0["epoch"] == 0 and "robustness" not in r0
    assert r0["knn_top1"] == pytest.approx(evaluate_knn(fresh, data, device=cpu, pool="mean")["knn_top1"])

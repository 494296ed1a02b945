"""train.loggers: TensorBoard, wandb (offline), MLflow (local file store) and CSV get the same scalars,
the resolved config and the run's artifacts; all written locally, no network."""

from __future__ import annotations

import csv
import glob
import json
import struct
import sys
from pathlib import Path

import pytest

from helpers import sets
from mimkit.cli import main
from mimkit.errors import MimkitError
from mimkit.train.trackers import CSVTracker, build_trackers


def _wandb_records(run_dir: Path) -> list:
    """The protobuf records of an offline wandb run file (a LevelDB-style log: 7-byte file header, 32 KiB
    blocks, each chunk with a 7-byte header crc32 / length / type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    data = Path(path).read_bytes()
    pos, block, out, buf = 7, 32768, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
    return out


def test_every_tracker_writes_the_same_scalars_config_and_artifacts(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = tmp_path / "run"
    assert main(["pretrain", "--no-progress", *sets("train.epochs=2", "train.loggers=tensorboard,wandb,mlflow,csv"),
                 "--output", str(run)]) == 0
    jsonl = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    expected = {(r["step"], f"train/{k}"): v for r in jsonl for k, v in r.items()
                if k not in ("step", "epoch") and isinstance(v, (int, float))}
    summary = json.loads((run / "summary.json").read_text())
    expected[(summary["steps"], "eval/knn_top1")] = summary["knn_top1"]
    assert any(name == "train/loss" for _, name in expected) and len(expected) > 20

    # csv: exact values
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {(int(r["step"]), r["name"]): float(r["value"]) for r in rows} == expected

    # TensorBoard: the same tags and steps (float32 values)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb")).Reload()
    tb = {(e.step, tag): e.value for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)}
    assert tb.keys() == expected.keys()
    assert all(tb[k] == pytest.approx(v, rel=1e-6, abs=1e-7) for k, v in expected.items())

    # MLflow: a local file store ./mlruns; metrics, flattened config params and artifacts
    from mlflow.tracking import MlflowClient

    ids = json.loads((run / "trackers.json").read_text())
    assert ids["mlflow"]["tracking_uri"] == (tmp_path / "mlruns").as_uri()
    client = MlflowClient(tracking_uri=ids["mlflow"]["tracking_uri"])
    mrun = client.get_run(ids["mlflow"]["run_id"])
    assert mrun.info.status == "FINISHED" and mrun.info.run_name == "run"
    got = {(m.step, name): m.value for name in mrun.data.metrics for m in client.get_metric_history(mrun.info.run_id, name)}
    assert got == expected
    assert mrun.data.params["method.name"] == "mae" and mrun.data.params["train.epochs"] == "2"
    artifacts = {a.path for a in client.list_artifacts(mrun.info.run_id)}
    assert {"summary.json", "config.yaml", "reconstructions"} <= artifacts
    assert [a.path for a in client.list_artifacts(mrun.info.run_id, "reconstructions")] == ["reconstructions/final.png"]

    # wandb: an offline run in RUN/wandb with the same history, the config and the files
    records = _wandb_records(run)
    history = {}
    for rec in records:
        if rec.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            history.update({(items["_step"], k): v for k, v in items.items() if not k.startswith("_")})
    assert history.keys() == expected.keys()
    assert all(history[k] == pytest.approx(v, rel=1e-12) for k, v in expected.items())
    config = {i.key: json.loads(i.value_json) for rec in records if rec.WhichOneof("record_type") == "run"
              for i in rec.run.config.update}
    assert config["method"]["name"] == "mae" and config["train"]["loggers"] == ["tensorboard", "wandb", "mlflow", "csv"]
    saved = {f.path for rec in records if rec.WhichOneof("record_type") == "files" for f in rec.files.files}
    assert {"summary.json", "config.yaml", "reconstructions/final.png"} <= saved
    assert ids["wandb"] and (run / "wandb").is_dir()


def test_csv_drops_rows_after_the_resumed_checkpoint(tmp_path):
    t = CSVTracker(tmp_path, None)
    for step in range(1, 6):
        t.scalars({"train/loss": step / 10, "train/lr": 1e-3}, step)
    t.close()
    t = CSVTracker(tmp_path, purge_step=4)  # resumed from the checkpoint of step 3
    t.scalars({"train/loss": 0.45}, 4)
    t.close()
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = [(int(r["step"]), r["name"], float(r["value"])) for r in csv.DictReader(f)]
    assert [r for r in rows if r[1] == "train/loss"] == [(1, "train/loss", 0.1), (2, "train/loss", 0.2),
                                                          (3, "train/loss", 0.3), (4, "train/loss", 0.45)]


@pytest.mark.parametrize("name,extra", [("wandb", "wandb"), ("mlflow", "mlflow")])
def test_a_missing_tracker_package_names_its_extra(tmp_path, monkeypatch, name, extra):
    monkeypatch.setitem(sys.modules, name, None)  # import fails as if not installed
    with pytest.raises(MimkitError) as e:
        build_trackers([name], tmp_path, {}, None, lambda _: None)
    assert str(e.value) == f"train.loggers={name} needs the `{name}` package: pip install 'mimkit[{extra}]'"

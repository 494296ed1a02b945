"""Experiment trackers beside TensorBoard: ``train.loggers`` = any of ``tensorboard, wandb, mlflow, csv``.

:class:`mimkit.train.runlog.RunLog` owns them: every scalar it sends to TensorBoard (``train/<key>`` of each
metrics record, ``eval/knn_top1``, ...) goes to each tracker with the same tag and step; the resolved config
is logged once as parameters; at the end of the run ``summary.json``, ``config.yaml`` and the reconstruction
PNGs are logged as artifacts.

- ``wandb``: a Weights & Biases run in ``RUN/wandb/``. Online when ``WANDB_MODE`` says so, or when it is
  unset and an API key is configured and the server answers within 3 s; otherwise offline (sync later with
  ``wandb sync RUN/wandb/offline-run-*``). Project ``$WANDB_PROJECT`` or ``mimkit``.
- ``mlflow``: ``$MLFLOW_TRACKING_URI`` when set, else a local file store ``./mlruns`` (``mlflow ui`` in that
  folder shows it); experiment ``$MLFLOW_EXPERIMENT_NAME`` or ``mimkit``. MLflow 3 keeps the file store
  only behind ``MLFLOW_ALLOW_FILE_STORE=true``, which is set for that case (no database needed).
- ``csv``: ``RUN/metrics.csv``, long format ``step,name,value`` (one row per scalar).

A resumed run continues the same wandb / MLflow run (ids in ``RUN/trackers.json``); rows that the
interrupted run logged after its last checkpoint are dropped from ``metrics.csv`` (as from ``metrics.jsonl``);
wandb and MLflow keep theirs (the replayed steps are logged again).
"""

from __future__ import annotations

import csv
import json
import os
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from mimkit.errors import MimkitError

IDS_FILE = "trackers.json"


def _require(module: str, extra: str, logger: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MimkitError(f"train.loggers={logger} needs the `{module}` package: pip install 'mimkit[{extra}]'") from None


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}``."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


class Tracker:
    """What RunLog calls; each method is a no-op unless a tracker needs it."""

    def scalars(self, values: dict[str, float], step: int) -> None: ...

    def params(self, config: dict[str, Any]) -> None: ...

    def artifact(self, path: Path, folder: str | None = None) -> None: ...

    def close(self) -> None: ...


class CSVTracker(Tracker):
    def __init__(self, run_dir: Path, purge_step: int | None) -> None:
        self.path = run_dir / "metrics.csv"
        if purge_step is not None and self.path.is_file():
            with open(self.path, newline="") as f:
                rows = [r for r in csv.reader(f)]
            keep = rows[:1] + [r for r in rows[1:] if len(r) == 3 and int(r[0]) < purge_step]
            tmp = self.path.with_suffix(".csv.tmp")
            with open(tmp, "w", newline="") as f:
                csv.writer(f).writerows(keep)
            os.replace(tmp, self.path)
        new = not self.path.is_file()
        self._file = open(self.path, "a", newline="", buffering=1)
        self._csv = csv.writer(self._file)
        if new:
            self._csv.writerow(["step", "name", "value"])

    def scalars(self, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self._csv.writerow([step, name, repr(float(value))])

    def close(self) -> None:
        self._file.close()


def _wandb_mode(log) -> str:
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return mode
    if not os.environ.get("WANDB_API_KEY") and not (Path.home() / ".netrc").is_file():
        log("wandb: no API key configured: offline run (sync later with `wandb sync`)")
        return "offline"
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        socket.create_connection((host, 443), timeout=3).close()
        return "online"
    except OSError:
        log(f"wandb: {host} unreachable: offline run (sync later with `wandb sync`)")
        return "offline"


class WandbTracker(Tracker):
    def __init__(self, run_dir: Path, config: dict[str, Any], run_id: str | None, log) -> None:
        wandb = _require("wandb", "wandb", "wandb")
        self.run_dir = run_dir
        mode = _wandb_mode(log)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "mimkit"), name=run_dir.name, dir=str(run_dir),
                              config=config, mode=mode, id=run_id, resume="allow" if run_id else None,
                              settings=wandb.Settings(console="off", silent=True))
        self.id = self.run.id
        log(f"wandb: {mode} run {self.id} in {run_dir / 'wandb'}")

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log(dict(values), step=step)

    def artifact(self, path: Path, folder: str | None = None) -> None:
        self.run.save(str(path), base_path=str(self.run_dir), policy="now")

    def close(self) -> None:
        self.run.finish()


class MLflowTracker(Tracker):
    def __init__(self, run_dir: Path, saved: dict[str, str] | None, log) -> None:
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            uri = Path("mlruns").resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3: the file store is opt-in
        if saved and saved.get("tracking_uri"):
            uri = saved["tracking_uri"]
        _require("mlflow", "mlflow", "mlflow")
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        self._Metric, self._Param = Metric, Param
        self.client = MlflowClient(tracking_uri=uri)
        if saved and saved.get("run_id"):
            self.run_id = saved["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "mimkit")
            exp = self.client.get_experiment_by_name(name)
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(name)
            self.run_id = self.client.create_run(exp_id, run_name=run_dir.name,
                                                 tags={"mimkit.run_dir": str(run_dir.resolve())}).info.run_id
        self.uri = uri
        log(f"mlflow: run {self.run_id} at {uri}")

    def scalars(self, values: dict[str, float], step: int) -> None:
        import time

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[self._Metric(k, float(v), now, step) for k, v in values.items()])

    def params(self, config: dict[str, Any]) -> None:
        done = self.client.get_run(self.run_id).data.params
        todo = [self._Param(k, str(v)[:6000]) for k, v in flatten(config).items() if k not in done]
        for i in range(0, len(todo), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=todo[i : i + 100])
        changed = sorted(k for k, v in flatten(config).items() if k in done and done[k] != str(v)[:6000])
        if changed:  # a resume that changed values (e.g. more epochs): params are immutable in MLflow
            self.client.set_tag(self.run_id, "mimkit.changed_on_resume", ", ".join(changed)[:5000])

    def artifact(self, path: Path, folder: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path=folder)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def build_trackers(names: Sequence[str], run_dir: Path, config: dict[str, Any] | None, purge_step: int | None,
                   log) -> list[Tracker]:
    """The trackers of ``names`` other than ``tensorboard`` (RunLog writes that one itself)."""
    ids_path = run_dir / IDS_FILE
    ids = json.loads(ids_path.read_text()) if purge_step is not None and ids_path.is_file() else {}
    out: list[Tracker] = []
    for name in dict.fromkeys(names):
        if name == "csv":
            out.append(CSVTracker(run_dir, purge_step))
        elif name == "wandb":
            t = WandbTracker(run_dir, config or {}, ids.get("wandb"), log)
            ids["wandb"] = t.id
            out.append(t)
        elif name == "mlflow":
            t = MLflowTracker(run_dir, ids.get("mlflow"), log)
            ids["mlflow"] = {"run_id": t.run_id, "tracking_uri": t.uri}
            out.append(t)
        elif name != "tensorboard":
            raise MimkitError(f"unknown logger {name!r}; accepted: tensorboard, wandb, mlflow, csv")
    if ids:
        ids_path.write_text(json.dumps(ids, indent=2) + "\n")
    if config is not None:
        for t in out:
            t.params(config)
    return out

"""Experiment loggers (trainer/loggers.py) read back with each tool's own reader, and what happens without them.

One sweep of two jobs with every logger selected: each job's TensorBoard events, W&B offline run and
MLflow run hold the same train/val losses as its metrics.csv (1e-6 rel: float32 in event files), and
the sweep's jobs share one W&B group and one MLflow experiment.
"""

import csv
import glob
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY, train

pytest.importorskip("tensorboard")
wandb_pb = pytest.importorskip("wandb.proto.wandb_internal_pb2")
pytest.importorskip("mlflow")

BLOCKER = '''
# Makes packages look uninstalled: no module to import, no distribution metadata (what availability checks read).
import importlib.metadata as md
import os
import sys

BLOCKED = set(os.environ["PARATRAIN_TEST_BLOCK"].split(","))


class _Missing:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


sys.meta_path.insert(0, _Missing())
_discover = md.Distribution.discover.__func__


def _visible(cls, **kwargs):
    for dist in _discover(cls, **kwargs):
        if (dist.metadata["Name"] or "").lower().replace("-", "_").split("_skinny")[0] not in BLOCKED:
            yield dist


md.Distribution.discover = classmethod(_visible)
'''


def metrics_of(run_dir: Path) -> dict[str, dict[int, float]]:
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return {key: {int(r["step"]): float(r[key]) for r in rows if r[key]} for key in ("train/loss", "val/loss")}


def wandb_history(run_file: str) -> tuple[dict, dict[str, dict[int, float]]]:
    """W&B's offline .wandb file: a LevelDB-style log of protobuf Records (7-byte file header, 32 KiB blocks,
    each chunk: crc32 (4), length (2), type (1: full, 2: first, 3: middle, 4: last))."""
    import json

    data = Path(run_file).read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending, records = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if kind == 0:
            pos += block - pos % block  # zero padding to the end of the block
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(pending)
            pending = b""
    run, history = {}, {}
    for raw in records:
        record = wandb_pb.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "run":
            run = {"group": record.run.run_group, "name": record.run.display_name, "project": record.run.project}
        elif record.WhichOneof("record_type") == "history":
            items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item}
            step = items.get("trainer/global_step")
            for key in ("train/loss", "val/loss"):
                if key in items:
                    history.setdefault(key, {})[int(step)] = float(items[key])
    return run, history


@pytest.mark.slow
def test_every_logger_gets_the_metrics_and_a_sweep_shares_one_group(tmp_path):
    sweep_dir = tmp_path / "multirun" / "day" / "time"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}  # no account: W&B must stay offline
    cmd = [sys.executable, "-m", "paratrain.trainer.cli", "-m", *TINY, "logger=[csv,tensorboard,wandb,mlflow]",
           "optimizer.lr=1e-3,2e-3", f"hydra.sweep.dir={sweep_dir}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**env, "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]

    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=f"file:{tmp_path / 'mlruns'}")
    experiment = client.get_experiment_by_name("sweep-day_time")
    assert experiment is not None, [e.name for e in client.search_experiments()]
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs.values()), runs
    groups = set()
    for job in ("0", "1"):
        run_dir = sweep_dir / job
        want = metrics_of(run_dir)
        assert sorted(want["train/loss"]) == [1, 2, 3, 4, 5, 6] and sorted(want["val/loss"]) == [3, 6]

        events = EventAccumulator(str(run_dir / "tensorboard"))
        events.Reload()
        for key, points in want.items():
            got = {e.step: e.value for e in events.Scalars(key)}
            assert got == pytest.approx(points, rel=1e-6), (key, got, points)

        offline = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
        assert len(offline) == 1, offline
        run, history = wandb_history(offline[0])
        groups.add(run["group"])
        assert run["project"] == "paratrain"
        for key, points in want.items():
            assert history[key] == pytest.approx(points, rel=1e-6), key

        name = f"job{job} optimizer.lr={'0.001' if job == '0' else '0.002'}"  # named by what the sweep varies
        assert run["name"] == name and name in runs, (run["name"], list(runs))
        for key, points in want.items():
            got = {m.step: m.value for m in client.get_metric_history(runs[name].info.run_id, key)}
            assert got == pytest.approx(points, rel=1e-6), key
        assert runs[name].data.params["optimizer.lr"] in ("0.001", "0.002")
    assert groups == {"sweep-day_time"}


def test_core_train_needs_no_optional_package_and_a_missing_logger_exits_2(tmp_path):
    """With transformers, tokenizers, tensorboard, wandb and mlflow unimportable (a meta-path finder that says
    they do not exist, as for an uninstalled package): the default run trains; logger=tensorboard exits 2 naming
    the extra, before anything is spawned."""
    (tmp_path / "block").mkdir()
    (tmp_path / "block" / "sitecustomize.py").write_text(BLOCKER)
    env = {"PYTHONPATH": str(tmp_path / "block"), "PARATRAIN_TEST_BLOCK": "transformers,tokenizers,tensorboard,tensorboardX,wandb,mlflow"}
    done = train([*TINY, "trainer.max_steps=2", "trainer.val_check_interval=2"], tmp_path / "core", env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "core" / "summary.json").exists()
    # One spawn for the three (each is the same check): the first missing one is named.
    done = train([*TINY, "logger=[csv,tensorboard,wandb,mlflow]", "strategy=ddp", "trainer.devices=2"],
                 tmp_path / "loggers", env=env, timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "logger=tensorboard needs the `tensorboard` package" in done.stderr
    assert "pip install 'paratrain[tensorboard]'" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "loggers" / "metrics.csv").exists()


@pytest.mark.parametrize("logger", ["tensorboard", "wandb", "mlflow"])
def test_missing_logger_package_names_its_extra(logger, monkeypatch):
    from omegaconf import OmegaConf

    from paratrain.trainer import loggers, schema

    cfg = OmegaConf.structured(schema.RunConfig).logger
    option = {"tensorboard": schema.TensorBoardLoggerConfig, "wandb": schema.WandbLoggerConfig, "mlflow": schema.MLflowLoggerConfig}
    cfg[logger] = OmegaConf.structured(option[logger])
    loggers.check_packages(cfg)  # installed here
    real = loggers.importlib.util.find_spec
    monkeypatch.setattr(loggers.importlib.util, "find_spec", lambda name: None if name == logger else real(name))
    from paratrain.trainer.errors import ConfigError

    with pytest.raises(ConfigError, match=rf"logger={logger} needs the `{logger}` package.*paratrain\[{logger}\]"):
        loggers.check_packages(cfg)

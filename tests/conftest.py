"""Shared helpers: compose the real config, and run the real `train` command in a subprocess."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# A model and run small enough for 2 CPU cores: seconds per run.
TINY = [
    "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.ffn_dim=64",
    "data.batch_size=8", "data.seq_len=32", "data.val_batches=2",
    "trainer.max_steps=6", "trainer.log_every_n_steps=1", "trainer.val_check_interval=3",
    "trainer.checkpoint_every_n_steps=3", "trainer.enable_progress_bar=false", "optimizer.warmup_steps=2",
]
TINY_MOE = ["+recipe=moe_8x", *TINY, "model.moe.expert_ffn_dim=32", "model.moe.num_experts=4"]


@pytest.fixture(scope="module")
def compose_run():
    """compose_run("+recipe=moe_8x", "strategy=ddp"): the real config tree, composed as `train` would."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from paratrain.trainer.recipes import register_recipes
    from paratrain.trainer.schema import register_configs

    register_configs()
    register_recipes()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        yield lambda *overrides: compose(config_name="config", overrides=list(overrides))
    GlobalHydra.instance().clear()


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny tensors in-process: a second intra-op thread only adds contention on a busy 2-core machine.
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def token_cache(tmp_path_factory):
    """One token cache for the whole session, outside the user's home."""
    path = os.environ.setdefault("PARATRAIN_CACHE", str(tmp_path_factory.mktemp("token-cache")))
    return Path(path)


def train(args, run_dir: Path, timeout: float = 300, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    """Run `train ARGS hydra.run.dir=RUN_DIR` as a user would; returns the finished process."""
    cmd = [sys.executable, "-m", "paratrain.trainer.cli", *args, f"hydra.run.dir={run_dir}"]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd or run_dir.parent)


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def metrics(run_dir: Path) -> list[dict]:
    import csv

    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def train_losses(run_dir: Path) -> list[float]:
    return [float(r["train/loss"]) for r in metrics(run_dir) if r["train/loss"]]


# Under pytest-xdist (addopts in pyproject.toml) each file runs whole on one worker, handed out in
# collection order: the longest files go first, so that the workers finish together instead of
# one starting test_readme.py (7 minutes on 2 cores) last. Order from --durations of whole suites.
LONGEST_FIRST = ["test_readme.py", "test_zero.py", "test_tensor.py", "test_checkpoint.py", "test_pipeline.py",
                 "test_cli.py", "test_expert_hybrid.py", "test_stop.py", "test_slurm.py", "test_moe_designs.py",
                 "test_hf.py", "test_plan.py", "test_sweep.py"]


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file keeps its order

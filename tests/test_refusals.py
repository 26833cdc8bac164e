"""Tier 4: every input a run depends on is resolved before anything is spawned or written.

Each refused input exits 2 with one paragraph naming the key, no traceback, and nothing in the run
directory beyond Hydra's own .hydra/ and train.log. Where a real size limit or a read-only disk is
needed, a tmpfs is mounted (root with CAP_SYS_ADMIN; skipped, saying so, where mounting is refused).
A disk that fills while a checkpoint is written keeps the previous checkpoint and publishes nothing.
"""

import re
import subprocess
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY, summary, train
from test_checkpoint import ARGS, checkpoints, snapshot
from paratrain.strategies import portable_state as ckpt


@contextmanager
def tmpfs(path: Path, size: str, readonly: bool = False):
    """A real size limit (or a read-only disk) at `path`, for the duration of the block."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if readonly else "")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN): {done.stderr.strip() or done.returncode}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def assert_refused(done, run_dir: Path, pattern: str) -> None:
    assert done.returncode == 2, (done.returncode, done.stderr[-3000:])
    assert re.search(pattern, done.stderr, re.S), done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    if run_dir.exists():
        assert snapshot(run_dir) == {}, "only Hydra's .hydra/ and train.log may be in the run directory"


TARGETS = [
    pytest.param(["optimizer._target_=torch.optim.AdamX"],
                 r"optimizer\._target_='torch\.optim\.AdamX' cannot be resolved: torch\.optim has no attribute 'AdamX'.*"
                 r"Did you mean torch\.optim\.Adam", id="optimizer-typo"),
    pytest.param(["optimizer._target_=torch.nn.Linear"], r"optimizer\._target_='torch\.nn\.Linear' is not a torch\.optim\.Optimizer",
                 id="optimizer-not-an-optimizer"),
    pytest.param(["optimizer=sgd", "optimizer.betas=[0.9,0.95]"], r"optimizer\.betas=\[0\.9, 0\.95\] is not accepted by torch\.optim\.SGD",
                 id="optimizer-argument"),
    pytest.param(["strategy._target_=paratrain.strategies.MeshStrategyy"],
                 r"strategy\._target_='paratrain\.strategies\.MeshStrategyy' cannot be resolved.*Did you mean paratrain\.strategies\.MeshStrategy",
                 id="strategy-typo"),
    pytest.param(["strategy._target_=no_such_package.Strategy"], r"strategy\._target_=.*no module 'no_such_package' is installed",
                 id="strategy-missing-package"),
]


@pytest.mark.parametrize("args,pattern", TARGETS)
def test_a_target_that_does_not_resolve_exits_2_naming_the_key(args, pattern, tmp_path):
    run_dir = tmp_path / "run"
    assert_refused(train([*TINY, *args], run_dir, timeout=120), run_dir, pattern)


@pytest.mark.parametrize("size,pattern", [(20_001, r"is 20001 bytes, not a whole number of 2-byte tokens"), (0, r"is empty")],
                         ids=["odd-size", "empty"])
def test_a_token_file_that_is_not_whole_tokens_exits_2(size, pattern, tmp_path):
    path = tmp_path / "ids.u16"
    path.write_bytes(bytes(range(256)) * (size // 256) + bytes(size % 256))
    run_dir = tmp_path / "run"
    done = train([*TINY, "data=tokens", f"data.path={path}", f"data.cache_dir={tmp_path / 'cache'}"], run_dir, timeout=120)
    assert_refused(done, run_dir, rf"data\.path='{re.escape(str(path))}' {pattern}: data\.source=tokens reads a flat file of uint16")
    assert not list((tmp_path / "cache").glob("tokens-*")), "no cache was built from it"


def test_a_read_only_checkpoint_directory_exits_2(tmp_path):
    run_dir = tmp_path / "run"
    with tmpfs(run_dir / "checkpoints", "1m", readonly=True):
        done = train([*TINY, "resume=auto"], run_dir, timeout=120)
    assert_refused(done, run_dir, rf"hydra\.run\.dir={re.escape(str(run_dir))} cannot be written: .*checkpoints: Read-only file system")


def test_a_read_only_token_cache_exits_2(tmp_path):
    run_dir = tmp_path / "run"
    with tmpfs(tmp_path / "cache", "1m", readonly=True) as cache:
        done = train([*TINY, f"data.cache_dir={cache}"], run_dir, timeout=120)
    assert_refused(done, run_dir, rf"data\.cache_dir={re.escape(str(cache))} cannot be written: .*Read-only file system")


def test_a_disk_too_small_for_one_checkpoint_exits_2(tmp_path):
    with tmpfs(tmp_path / "small", "512k") as small:
        run_dir = small / "run"
        done = train(ARGS, run_dir, timeout=120)
        assert_refused(done, run_dir, rf"hydra\.run\.dir={re.escape(str(run_dir))} has [\d,]+ bytes free on its disk, but "
                                      rf"one checkpoint of this run needs about [\d,]+ bytes")


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path):
    # One checkpoint of this model is ~930 kB: 1400 kB hold the first (step 3) but not the second (step 6).
    with tmpfs(tmp_path / "small", "1400k") as small:
        run_dir = small / "run"
        done = train([*ARGS, "trainer.max_steps=12", "trainer.keep_last_checkpoints=1"], run_dir, timeout=300)
        assert done.returncode == 1, done.stderr[-3000:]
        message = re.search(r"the checkpoint of step 6 does not fit in (\S+): the disk is full \(about ([\d,]+) bytes needed",
                            done.stderr)
        assert message and message.group(1) == str(run_dir / "checkpoints"), done.stderr[-3000:]
        assert int(message.group(2).replace(",", "")) > 500_000
        assert "step000003 is intact" in done.stderr
        assert "Traceback" not in done.stderr and re.search(r"^Error: the checkpoint of step 6", done.stderr, re.M)
        assert checkpoints(run_dir) == ["step000003"]  # nothing partial published or left behind
        assert ckpt.verify(run_dir / "checkpoints" / "step000003")["global_step"] == 3
        weights = ckpt.consolidated_model_state(run_dir / "checkpoints" / "step000003")
        assert weights and all(np.isfinite(w.numpy()).all() for w in weights.values())
        s = summary(run_dir)
        assert s["status"] == "failed" and "does not fit" in s["error"]


def test_a_step_that_cannot_fit_memory_exits_2_before_spawning(tmp_path):
    # The case: the default model with a long data.seq_len grew until the kernel's OOM killer
    # ended it. The memory plan (trainer/plan.py) refuses it before any tensor exists.
    run_dir = tmp_path / "run"
    done = train(["data.seq_len=1000000"], run_dir, timeout=120)
    assert_refused(done, run_dir, r"the plan needs [\d.]+ GiB for 1 ranks on this node.*activations.*host RAM.*"
                                  r"Lower data\.batch_size or data\.seq_len")

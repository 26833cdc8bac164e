"""Tier 4: a run stopped by SIGTERM or SIGINT loses nothing, and exits by the README's exit-status table.

A signal is sent from outside, as a scheduler or a shell would, once the run has logged step 2 (so it
is mid-training: the runs are 24 steps long). Where it lands is up to the machine; the tests read the
step the run stopped at from summary.json and check everything against it. Periodic checkpoints are
off (every 50 steps), so the stop's checkpoint is the only one. Same strategy, fp32: resume is bitwise.
"""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, TINY, summary, train, train_losses
from test_checkpoint import ARGS, EXPERT2, checkpoints, run_ok, steps, val_losses
from paratrain.strategies import portable_state as ckpt

STEPS = "trainer.max_steps=24"
STOP_ARGS = [*ARGS, STEPS, "trainer.checkpoint_every_n_steps=50"]


def start(args, run_dir: Path, env=None, new_session=False) -> subprocess.Popen:
    """`train ARGS` in the background, as conftest.train runs it."""
    cmd = [sys.executable, "-m", "paratrain.trainer.cli", *args, f"hydra.run.dir={run_dir}"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=run_dir.parent,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, start_new_session=new_session)


def wait_for_log(proc: subprocess.Popen, run_dir: Path, pattern: str, timeout: float = 240) -> None:
    log = run_dir / "train.log"
    deadline = time.monotonic() + timeout
    while not (log.exists() and re.search(pattern, log.read_text())):
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before logging {pattern!r}:\n"
                                 f"{proc.stdout.read()[-3000:]}")
        assert time.monotonic() < deadline, f"no {pattern!r} in train.log after {timeout} s"
        time.sleep(0.02)


def interrupt(args, run_dir: Path, signum=signal.SIGTERM, every_rank=False, env=None) -> tuple[int, str]:
    """Start a run, signal it after step 2 (rank 0 only, or its whole process group), wait; (exit status, output)."""
    proc = start(args, run_dir, env=env, new_session=every_rank)
    try:
        wait_for_log(proc, run_dir, r" - step=2 ")
        if every_rank:
            os.killpg(proc.pid, signum)  # the ranks Lightning launched share rank 0's process group
        else:
            proc.send_signal(signum)
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, out


def assert_stopped_with_checkpoint(run_dir: Path, code: int, out: str, name="SIGTERM") -> int:
    """The stop contract; returns the step the run stopped after."""
    s = summary(run_dir)
    assert code == 128 + getattr(signal, name), out[-3000:]
    assert s["status"] == "interrupted" and s["signal"] == name, s
    stopped = s["steps"]
    assert 2 <= stopped < 24, s
    assert checkpoints(run_dir) == [f"step{stopped:06d}"]  # the current step's, published, nothing partial
    assert ckpt.verify(run_dir / "checkpoints" / f"step{stopped:06d}")["global_step"] == stopped
    assert steps(run_dir) == list(range(1, stopped + 1))  # metrics cover every step up to the checkpoint
    assert f"Stopped by {name} after step {stopped}" in out and "Traceback" not in out
    return stopped


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("stop") / "straight"
    run_ok(STOP_ARGS, run_dir)
    return run_dir


def test_sigterm_stops_after_the_step_with_its_checkpoint_and_resume_is_bitwise(straight, tmp_path):
    run_dir = tmp_path / "run"
    code, out = interrupt(STOP_ARGS, run_dir)
    stopped = assert_stopped_with_checkpoint(run_dir, code, out)
    run_ok([*STOP_ARGS, "resume=auto"], run_dir)
    s = summary(run_dir)
    assert s["status"] == "completed" and s["steps"] == 24 and s["resumed_from_step"] == stopped
    assert steps(run_dir) == list(range(1, 25))
    assert train_losses(run_dir) == train_losses(straight)  # bitwise, every step
    assert val_losses(run_dir) == val_losses(straight)
    assert s["final_loss"] == summary(straight)["final_loss"]


@pytest.mark.parametrize("every_rank", [False, True], ids=["rank0-only", "every-rank"])
def test_sigterm_to_a_two_process_expert_run_stops_every_rank_at_one_step(every_rank, tmp_path_factory, tmp_path):
    """Rank 0 only (`kill PID`): rank 1 never sees the signal and must stop at the same step; every rank
    (a scheduler): the ranks see it at different instants. Either way one checkpoint, then resume."""
    args = [*STOP_ARGS, *EXPERT2]
    reference = tmp_path_factory.getbasetemp() / "stop-expert2-straight"
    if not (reference / "summary.json").exists():
        run_ok(args, reference)
    run_dir = tmp_path / "run"
    code, out = interrupt(args, run_dir, every_rank=every_rank)
    stopped = assert_stopped_with_checkpoint(run_dir, code, out)
    assert summary(run_dir)["world_size"] == 2
    manifest = ckpt.verify(run_dir / "checkpoints" / f"step{stopped:06d}")
    assert manifest["paratrain"]["world_size"] == 2  # both ranks wrote their experts
    run_ok([*args, "resume=auto"], run_dir)
    assert summary(run_dir)["resumed_from_step"] == stopped
    assert train_losses(run_dir) == pytest.approx(train_losses(reference), rel=1e-6)
    assert summary(run_dir)["final_loss"] == pytest.approx(summary(reference)["final_loss"], rel=1e-6)


def test_a_second_sigterm_exits_at_once(tmp_path):
    # The first SIGTERM's stop stalls for 120 s before its checkpoint (a test hook), so only an
    # immediate exit on the second one explains an exit without that checkpoint.
    run_dir = tmp_path / "run"
    proc = start(STOP_ARGS, run_dir, env={"PARATRAIN_FAULT": "stall_in_stop@*"})
    try:
        wait_for_log(proc, run_dir, r" - step=2 ")
        proc.send_signal(signal.SIGTERM)
        wait_for_log(proc, run_dir, r"stalls 120 s in stop")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, out[-3000:]
    assert "second stop signal (SIGTERM): stopping at once" in out
    s = summary(run_dir)
    assert s["status"] == "interrupted" and "stopped at once by a second SIGTERM" in s["error"], s
    assert not (run_dir / "checkpoints").exists() or checkpoints(run_dir) == []  # none written, none partial


def readme_exit_table() -> dict[str, str]:
    """{exit status: the status summary.json gives, or "none"} from the README's exit-status table."""
    section = (REPO / "README.md").read_text().split("## Exit status", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1:-1] for line in section.splitlines() if line.startswith("| `")]
    return {code.strip(" `"): "none" if said.strip().startswith("none") else re.search(r'"status": "(\w+)"', said).group(1)
            for code, _, said in rows}


def test_every_row_of_the_readme_exit_status_table(tmp_path):
    table = readme_exit_table()
    assert set(table) == {"0", "1", "2", "128+N"}, table
    seen = {}
    done = train(TINY, tmp_path / "ok")
    seen["0"] = (done.returncode, summary(tmp_path / "ok")["status"])
    done = train([*TINY, "trainer.max_steps=12"], tmp_path / "crash", env={"PARATRAIN_FAULT": "nan@2"})
    seen["1"] = (done.returncode, summary(tmp_path / "crash")["status"])
    done = train([*TINY, "optimizer.lr=-1"], tmp_path / "refused")
    assert "Traceback" not in done.stderr
    seen["2"] = (done.returncode, "written" if (tmp_path / "refused" / "summary.json").exists() else "none")
    code, _ = interrupt([*TINY, STEPS], tmp_path / "sigint", signum=signal.SIGINT)
    seen["128+N"] = (code, summary(tmp_path / "sigint")["status"])
    assert seen == {"0": (0, table["0"]), "1": (1, table["1"]), "2": (2, table["2"]),
                    "128+N": (128 + signal.SIGINT, table["128+N"])}, seen

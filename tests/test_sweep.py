"""Local sweeps (`train -m`): one process tree per job, failures reported per job, the sweep summary.

Tier 4 (the real command in a subprocess) for the sweeps; tier 1 for the summary helpers.
"""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY_MOE, summary

from paratrain.trainer.launch import sweep


def train_multirun(args, sweep_dir: Path, timeout: float = 400) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "paratrain.trainer.cli", "-m", *args, f"hydra.sweep.dir={sweep_dir}"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=sweep_dir.parent,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def read_table(sweep_dir: Path) -> list[dict]:
    with open(sweep_dir / "sweep_summary.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_expert_parallel_sweep_runs_each_job_and_writes_the_summary(tmp_path):
    # Two values: the README's three-job expert sweep runs as printed in tests/test_readme.py.
    sweep_dir = tmp_path / "sweep"
    done = train_multirun([*TINY_MOE, "strategy=expert", "trainer.devices=2", "model.moe.num_experts=2,8"], sweep_dir)
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    for job, experts in enumerate([2, 8]):
        s = summary(sweep_dir / str(job))
        assert s["status"] == "completed" and s["steps"] == 6, s
        assert s["world_size"] == 2 and s["mesh"] == {"dp": 1, "ep": 2}
        assert f"; {experts // 2} expert" in s["layout"]
        assert (sweep_dir / str(job) / "console.log").read_text().count("Trainer.fit") == 1
    rows = read_table(sweep_dir)
    assert [r["overrides"] for r in rows] == [f"model.moe.num_experts={n}" for n in (2, 8)]
    assert [r["status"] for r in rows] == ["completed"] * 2
    assert [float(r["final_loss"]) for r in rows] == pytest.approx([summary(sweep_dir / str(j))["final_loss"] for j in range(2)])
    assert int(rows[1]["params_total"]) > int(rows[0]["params_total"])
    assert rows[0]["params_active_per_token"] and rows[0]["peak_rss_mb"] and float(rows[0]["tokens_per_s"]) > 0
    md = (sweep_dir / "sweep_summary.md").read_text()
    assert "2 jobs: 2 completed, 0 failed" in md and "| model.moe.num_experts=8 | completed |" in md
    assert (sweep_dir / "sweep_summary.png").stat().st_size > 5000
    # Each job ran in its own process tree: the sweep process never initialised a process group.
    assert "[job 0] " in done.stdout and "[job 1] " in done.stdout


@pytest.mark.slow
def test_a_failed_job_is_reported_and_the_others_still_run(tmp_path, capsys):
    sweep_dir = tmp_path / "sweep"
    # lr=1e30 passes validation but its loss turns non-finite at step 3: job 0 crashes (exit 1), job 1 trains.
    # (A job the config rules refuse stops the whole sweep before it starts: tests/test_new_user.py.)
    done = train_multirun([*TINY_MOE, "optimizer.lr=1e30,3e-3"], sweep_dir)
    assert done.returncode == 1, done.stderr[-3000:]
    bad, good = summary(sweep_dir / "0"), summary(sweep_dir / "1")
    assert bad["status"] == "failed" and bad["exit_code"] == 1
    assert "NonFiniteLossError: the loss of step 3 is not finite" in bad["error"]
    assert "Traceback" not in bad["error"]
    assert good["status"] == "completed" and good["steps"] == 6
    rows = read_table(sweep_dir)
    assert [r["status"] for r in rows] == ["failed", "completed"]
    assert rows[0]["overrides"] == "optimizer.lr=1e+30" and "NonFiniteLossError" in rows[0]["error"]  # as Hydra writes it
    assert "1 failed" in (sweep_dir / "sweep_summary.md").read_text()
    assert "NonFiniteLossError" in done.stdout  # the sweep's own log names the failed job and why

    # The same summary, rebuilt from the directory alone (e.g. a sweep whose jobs ran on SLURM).
    for name in ("sweep_summary.csv", "sweep_summary.md", "sweep_summary.png"):
        (sweep_dir / name).unlink()
    sweep.main([str(sweep_dir)])  # `paratrain-sweep-summary SWEEP_DIR`
    assert "| optimizer.lr=0.003 | completed |" in capsys.readouterr().out
    assert read_table(sweep_dir) == rows and (sweep_dir / "sweep_summary.png").exists()


def test_sweep_summary_command_on_a_directory_without_jobs_exits_2(tmp_path):
    done = subprocess.run([sys.executable, "-m", "paratrain.trainer.launch.sweep", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "holds no sweep job" in done.stderr and "Traceback" not in done.stderr


def fake_job(root: Path, num: int, overrides: list[str], status="completed", loss=None, curve=()):
    d = root / str(num)
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    s = {"status": status, "final_loss": loss, "steps": len(curve)}
    if status == "failed":
        s["error"] = "boom | with a pipe"
    (d / "summary.json").write_text(json.dumps(s))
    if curve:
        (d / "metrics.csv").write_text("step,train/loss\n" + "".join(f"{i + 1},{v}\n" for i, v in enumerate(curve)))


def test_summary_of_a_sweep_directory(tmp_path):
    fake_job(tmp_path, 10, ["+recipe=moe_8x", "optimizer.lr=0.01"], loss=2.0, curve=[3.0, 2.0])
    fake_job(tmp_path, 2, ["+recipe=moe_8x", "optimizer.lr=0.001"], loss=2.5, curve=[3.0, 2.5])
    fake_job(tmp_path, 3, ["+recipe=moe_8x", "optimizer.lr=0.1"], status="failed")
    (tmp_path / ".submitit").mkdir()
    rows = sweep.write_sweep_summary(tmp_path)
    assert [r["job"] for r in rows] == ["2", "3", "10"]  # numeric job order
    assert [r["overrides"] for r in rows] == ["optimizer.lr=0.001", "optimizer.lr=0.1", "optimizer.lr=0.01"]
    md = (tmp_path / "sweep_summary.md").read_text()
    assert "Common overrides: `+recipe=moe_8x`" in md and "boom \\| with a pipe" in md
    assert (tmp_path / "sweep_summary.png").stat().st_size > 5000


def test_error_of_a_failed_job_is_its_error_paragraph_or_last_exception():
    assert sweep.error_from_output(["noise\n", "Error: model.x=1 is bad. Use 2.\n"], 2) == "model.x=1 is bad. Use 2."
    lines = ["Traceback (most recent call last):\n", '  File "x.py"\n', "RuntimeError: out of memory\n"]
    assert sweep.error_from_output(lines, 1) == "RuntimeError: out of memory"
    assert sweep.error_from_output([], -9) == "exit status -9"

"""cluster=slurm against a real SLURM controller: a single-node cluster on this machine.

`.ci/run` starts it with .ci/slurm-up.sh; the `slurm_cluster` fixture starts it too when it is not up
(root and Debian's packages needed) and otherwise skips the tests that need it, saying why. The bad-input
tests need no cluster: they must fail before anything is submitted.
"""

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, TINY_MOE, summary, train, train_losses

# 60 steps, a checkpoint every 10: a job requeued right after its first checkpoint still has most of its
# run ahead of it. Shared by the sweep and the requeue test, whose job 0 is the uninterrupted reference.
LONGER = ["trainer.max_steps=60", "trainer.checkpoint_every_n_steps=10", "trainer.val_check_interval=30"]
EXPERT_2 = ["strategy=expert", "trainer.devices=2"]
# The cluster has 2 CPUs: let the two 2-task jobs of the sweep share them.
SHARE = ["cluster.sbatch=[--oversubscribe]"]


def _cluster_up() -> bool:
    if not shutil.which("sinfo"):
        return False
    state = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], capture_output=True, text=True, timeout=30).stdout
    return any(s.strip().rstrip("*") in ("idle", "mix", "alloc") for s in state.split())


@pytest.fixture(scope="session")
def slurm_cluster():
    if not _cluster_up():
        up = subprocess.run(["bash", str(REPO / ".ci" / "slurm-up.sh")], capture_output=True, text=True, timeout=600)
        if up.returncode != 0 or not _cluster_up():
            pytest.skip(f"no local SLURM cluster: .ci/slurm-up.sh said: {(up.stderr or up.stdout).strip()[-500:]}")
    return True


def train_multirun(args, sweep_dir: Path, timeout: float = 300, env=None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "paratrain.trainer.cli", "-m", *args, f"hydra.sweep.dir={sweep_dir}"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=sweep_dir.parent,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


@pytest.fixture(scope="module")
def slurm_sweep(slurm_cluster, tmp_path_factory):
    """`train -m +recipe=moe_8x cluster=slurm strategy=expert trainer.devices=2 model.moe.num_experts=4,8`."""
    sweep_dir = tmp_path_factory.mktemp("slurm") / "sweep"
    done = train_multirun([*TINY_MOE, *LONGER, *EXPERT_2, "cluster=slurm", *SHARE, "model.moe.num_experts=4,8"], sweep_dir)
    assert done.returncode == 0, done.stderr[-4000:]
    return sweep_dir


@pytest.mark.slurm
@pytest.mark.slow
def test_sweep_runs_one_two_task_slurm_job_per_value(slurm_sweep):
    for job, experts in ((0, 4), (1, 8)):
        s = summary(slurm_sweep / str(job))
        assert s["status"] == "completed" and s["steps"] == 60, s
        assert s["world_size"] == 2 and s["mesh"] == {"dp": 1, "ep": 2}
        assert f"; {experts // 2} expert" in s["layout"]
    # Two tasks per job, each a rank that Lightning found in the SLURM environment (nothing launched locally).
    script = next((slurm_sweep / ".submitit").glob("*/*_submission.sh")).read_text()
    assert "#SBATCH --ntasks-per-node=2" in script and "#SBATCH --nodes=1" in script
    assert "#SBATCH --oversubscribe" in script and "#SBATCH --signal=USR2@" in script
    # Each task's stdout holds its log lines, Lightning's among them (trainer/cli.py: quiet_lightning).
    logs = sorted((slurm_sweep / ".submitit").glob("*_0/*_0_[01]_log.out"))
    assert len(logs) == 2 and all("GLOBAL_RANK" in p.read_text() for p in logs)
    rows = (slurm_sweep / "sweep_summary.csv").read_text().splitlines()
    assert len(rows) == 3 and "model.moe.num_experts=8" in rows[2] and ",completed," in rows[2]
    assert (slurm_sweep / "sweep_summary.png").exists()


def job_state(job_id: str) -> str:
    return subprocess.run(["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T"],
                          capture_output=True, text=True, timeout=30).stdout.strip()


@pytest.mark.slurm
@pytest.mark.slow
def test_requeued_job_resumes_from_its_checkpoint_and_ends_like_an_uninterrupted_one(slurm_sweep, tmp_path):
    run_dir = tmp_path / "requeued"
    cmd = [sys.executable, "-m", "paratrain.trainer.cli", *TINY_MOE, *LONGER, *EXPERT_2, "cluster=slurm",
           "model.moe.num_experts=4", f"hydra.run.dir={run_dir}"]
    follow = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        first = run_dir / "checkpoints" / "step000010"
        deadline = time.monotonic() + 240
        while not first.exists() and time.monotonic() < deadline and follow.poll() is None:
            time.sleep(0.05)
        assert first.exists(), "the job wrote no checkpoint"
        job_id = next(p.name for p in (run_dir / ".submitit").iterdir() if p.name.isdigit())
        subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=30)
        # SLURM holds a requeued job for a while (cred_expire); release it as soon as it is pending again.
        while job_state(job_id) != "PENDING" and time.monotonic() < deadline:
            time.sleep(0.2)
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], timeout=30)
        out, _ = follow.communicate(timeout=240)
    finally:
        if follow.poll() is None:
            follow.kill()
    assert follow.returncode == 0, out[-4000:]
    assert f"submitted SLURM job {job_id}" in out and f"SLURM job {job_id}: completed" in out  # train followed it
    assert "DUE TO JOB REQUEUE" in out and "requeued (restart 1): resume=auto" in out
    resumed_from = int(re.search(r"resuming from \S+step(\d+)", out).group(1))
    assert 10 <= resumed_from < 60, resumed_from  # it was interrupted mid-run, not after the end
    s = summary(run_dir)
    assert s["status"] == "completed" and s["steps"] == 60
    reference = slurm_sweep / "0"  # the same run, never interrupted
    assert s["final_loss"] == pytest.approx(summary(reference)["final_loss"], rel=1e-5)
    # The steps after the resume retrace the uninterrupted run (fp32, same layout: rel 1e-5).
    assert train_losses(run_dir)[-20:] == pytest.approx(train_losses(reference)[-20:], rel=1e-5)


@pytest.mark.slurm
@pytest.mark.slow
def test_a_killed_sweep_job_fails_alone_and_the_sweep_finishes(slurm_cluster, tmp_path):
    """SIGKILL leaves no result and, on a cluster without accounting, no sacct state: the sweep still ends."""
    sweep_dir = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "paratrain.trainer.cli", "-m", *TINY_MOE, *LONGER, *EXPERT_2, "cluster=slurm", *SHARE,
           "model.moe.num_experts=4,8", f"hydra.sweep.dir={sweep_dir}"]
    sweep = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        training = sweep_dir / "1" / "checkpoints" / "step000010"
        deadline = time.monotonic() + 240
        while not training.exists() and time.monotonic() < deadline and sweep.poll() is None:
            time.sleep(0.05)
        assert training.exists(), "job 1 wrote no checkpoint"
        victim = next(p.name for p in (sweep_dir / ".submitit").iterdir() if p.name.endswith("_1"))
        subprocess.run(["scancel", "--signal=KILL", victim], check=True, timeout=30)
        out, _ = sweep.communicate(timeout=240)
    finally:
        if sweep.poll() is None:
            sweep.kill()
    assert sweep.returncode == 1, out[-4000:]  # a sweep with a failed job
    assert summary(sweep_dir / "0")["status"] == "completed" and summary(sweep_dir / "0")["steps"] == 60
    killed = summary(sweep_dir / "1")
    assert killed["status"] == "failed" and f"SLURM job {victim} ended without a result" in killed["error"], killed
    rows = (sweep_dir / "sweep_summary.csv").read_text().splitlines()
    assert len(rows) == 3 and ",completed," in rows[1] and ",failed," in rows[2], rows


# --- bad input: exit 2 before anything is submitted (no cluster needed) ------------------------------
def path_without_sbatch() -> str:
    """This Python's directory only: no sbatch (nor any other SLURM command)."""
    return str(Path(sys.executable).parent)


@pytest.mark.slow
def test_missing_sbatch_exits_2_naming_the_fix(tmp_path):
    run_dir = tmp_path / "run"
    done = train([*TINY_MOE, "cluster=slurm"], run_dir, timeout=120, env={"PATH": path_without_sbatch()})
    assert done.returncode == 2, (done.returncode, done.stderr[-3000:])
    assert re.search(r"cluster=slurm submits jobs with sbatch, but sbatch is not on PATH.*add their directory to PATH, "
                     r"or use cluster=local", done.stderr, re.S), done.stderr[-3000:]
    assert "Traceback" not in done.stderr and not (run_dir / ".submitit").exists()


@pytest.mark.slow
def test_sweep_with_tasks_per_node_not_devices_exits_2_before_submitting(tmp_path):
    sweep_dir = tmp_path / "sweep"
    done = train_multirun([*TINY_MOE, *EXPERT_2, "cluster=slurm", "cluster.tasks_per_node=4", "model.moe.num_experts=4,8"],
                          sweep_dir, timeout=120)
    assert done.returncode == 2, (done.returncode, done.stderr[-3000:])
    assert re.search(r"cluster\.tasks_per_node=4 differs from trainer\.devices=2.*SLURM_NTASKS_PER_NODE.*"
                     r"Drop the cluster\.tasks_per_node override", done.stderr, re.S), done.stderr[-3000:]
    assert "Traceback" not in done.stderr and not (sweep_dir / ".submitit").exists()


@pytest.fixture(scope="module")
def compose_slurm():
    """Compose like `train -m ... OVERRIDES` would, with the hydra node (what the sweep callback receives)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from paratrain.trainer.recipes import register_recipes
    from paratrain.trainer.schema import register_configs

    register_configs()
    register_recipes()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        yield lambda *overrides: compose("config", overrides=["cluster=slurm", *overrides], return_hydra_config=True)
    GlobalHydra.instance().clear()


SWEEP_RULES = [
    (["trainer.devices=2", "cluster.nodes=2"], [], r"cluster\.nodes=2 differs from trainer\.num_nodes=1.*Drop the cluster\.nodes override"),
    (["trainer.accelerator=gpu", "trainer.devices=4", "cluster.gpus_per_node=2"], [],
     r"cluster\.gpus_per_node=2 differs from trainer\.devices=4.*Drop the cluster\.gpus_per_node override"),
    (["cluster.sbatch=[exclusive]"], [], r"cluster\.sbatch entry 'exclusive' is not a long sbatch option.*--mail-type END"),
    ([], ["trainer.devices=1,2"], r"trainer\.devices=1,2 sweeps a key that shapes the SLURM allocation.*one sweep per value"),
    (["hydra.launcher.tasks_per_node=4"], [],
     r"hydra\.launcher\.tasks_per_node is filled from cluster\.tasks_per_node.*Set cluster\.tasks_per_node instead"),
]


@pytest.mark.parametrize("overrides,swept,pattern", SWEEP_RULES, ids=[" ".join(o + s) for o, s, _ in SWEEP_RULES])
def test_slurm_sweep_rules_name_the_key_and_the_fix(overrides, swept, pattern, compose_slurm, monkeypatch, tmp_path):
    from omegaconf import open_dict, read_write

    from paratrain.trainer.errors import ConfigError
    from paratrain.trainer.launch.slurm import prepare_sweep

    fake = tmp_path / "sbatch"  # an sbatch on PATH, so that only the rule under test can fail; never run
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    cfg = compose_slurm(*overrides)
    with read_write(cfg.hydra), open_dict(cfg.hydra):
        cfg.hydra.overrides.task = [*cfg.hydra.overrides.task, *swept]
    with pytest.raises(ConfigError, match=re.compile(pattern, re.S)):
        prepare_sweep(cfg)


def test_slurm_parameters_follow_the_trainer(compose_slurm, monkeypatch, tmp_path):
    from paratrain.trainer.launch.slurm import launcher_parameters, prepare_sweep

    fake = tmp_path / "sbatch"  # asked only `sbatch --test-only` (would it accept the job?): yes
    fake.write_text("#!/bin/sh\n[ \"$1\" = --test-only ] || exit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")

    cfg = compose_slurm("trainer.devices=8", "trainer.num_nodes=2", "trainer.accelerator=gpu", "cluster.partition=gpu",
                        "cluster.sbatch=[--mail-type END,--exclusive]", "cluster.setup=[source $HOME/venv/bin/activate]")
    params = launcher_parameters(cfg)
    assert (params["tasks_per_node"], params["nodes"], params["gpus_per_node"]) == (8, 2, 8)
    assert params["partition"] == "gpu" and params["setup"] == ["source $HOME/venv/bin/activate"]
    assert params["additional_parameters"] == {"mail-type": "END", "exclusive": True}
    assert launcher_parameters(compose_slurm("trainer.devices=2"))["gpus_per_node"] is None  # CPU: no GPUs asked
    prepare_sweep(cfg)  # fills the submitit launcher from cluster.*
    assert cfg.hydra.launcher.tasks_per_node == 8 and cfg.hydra.launcher.additional_parameters.exclusive is True

"""What a new user meets (issue 18): commands typed into a shell, as printed, and what they must show.

Every command here goes through bash (`shell=True`), so quoting is the shell's, as for a user.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, TINY, TINY_MOE, metrics, summary

SHORT = " ".join(TINY)  # tiny model, 6 steps, no progress bar
BIN = str(Path(sys.executable).parent)  # `train`, `paratrain-export`: the console scripts of this venv


def sh(command: str, cwd: Path, timeout: float = 600, **env) -> subprocess.CompletedProcess:
    """Run COMMAND as a user types it, in bash; stdout and stderr apart."""
    full_env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(command, shell=True, executable="/bin/bash", cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def have_slurm() -> bool:
    return shutil.which("sbatch") is not None and subprocess.run(
        ["sinfo", "-h"], capture_output=True, timeout=30).returncode == 0


# --- one run of our own corpus, then its resume (items 1, 5, 6, 8, 9, 11) ----------------------------
@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """`train data=text data.path='~/corpus/**/*.txt'` as the README prints it, resume=auto on a new directory,
    shorter than val_check_interval; then the resume command the run printed, 3 steps further."""
    home = tmp_path_factory.mktemp("home")
    for name in ("a/one.txt", "a/b/two.txt", "three.txt"):
        path = home / "corpus" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text((REPO / "trainer" / "cli.py").read_text() * 3)
    run_dir = home / "run"
    first = sh(f"train data=text data.path='~/corpus/**/*.txt' {SHORT} trainer.max_steps=5 "
               f"trainer.val_check_interval=100 trainer.enable_progress_bar=true resume=auto hydra.run.dir={run_dir}",
               cwd=home, HOME=str(home))
    first_summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
    first_val_steps = [int(r["step"]) for r in metrics(run_dir) if r["val/loss"]] if first_summary else []
    resume = re.search(r"^  resume with +(.+)$", first.stdout, re.M)
    again = sh(resume.group(1).replace("trainer.max_steps=5", "trainer.max_steps=8"), cwd=home, HOME=str(home)) \
        if resume else None
    return {"home": home, "run_dir": run_dir, "first": first, "first_summary": first_summary,
            "first_val_steps": first_val_steps, "again": again}


def test_text_glob_with_a_home_path_runs_as_printed(text_run):
    first = text_run["first"]
    assert first.returncode == 0, first.stderr[-3000:]
    assert "LexerNoViableAltException" not in first.stderr
    config = (text_run["run_dir"] / ".hydra" / "config.yaml").read_text()
    assert "path: ~/corpus/**/*.txt" in config


def test_resume_auto_without_a_checkpoint_warns_loudly_before_training(text_run):
    out = text_run["first"].stdout
    warning = re.search(r"\[WARNING\] - resume=auto found no complete checkpoint in (\S+): this starts a FRESH run", out)
    assert warning, out[-3000:]
    assert warning.group(1) == str(text_run["run_dir"] / "checkpoints")
    assert warning.start() < out.index("step=1 ")


def test_a_run_shorter_than_val_check_interval_still_validates_at_its_end(text_run):
    s = text_run["first_summary"]
    assert s["steps"] == 5 and s["final_val_loss"] is not None
    assert text_run["first_val_steps"] == [5]
    assert text_run["again"] is not None and text_run["again"].returncode == 0, text_run["again"].stderr[-3000:]
    resumed = summary(text_run["run_dir"])
    assert resumed["steps"] == 8 and resumed["resumed_from_step"] == 5
    val = {int(r["step"]): float(r["val/loss"]) for r in metrics(text_run["run_dir"]) if r["val/loss"]}
    assert sorted(val) == [5, 8] and resumed["final_val_loss"] == pytest.approx(val[8], rel=1e-6)


def test_a_run_ends_with_a_block_saying_how_it_went(text_run):
    out, s = text_run["first"].stdout, text_run["first_summary"]
    both = out + text_run["first"].stderr
    block = out[out.index("run completed: 5/5 steps"):]
    train_loss, train_bits = map(float, re.search(r"final loss +train ([\d.]+) nats = ([\d.]+) bits/byte", block).groups())
    val_loss, val_bits = map(float, re.search(r"val ([\d.]+) nats = ([\d.]+) bits/byte", block).groups())
    assert train_loss == pytest.approx(s["final_loss"], abs=1e-4) and val_loss == pytest.approx(s["final_val_loss"], abs=1e-4)
    assert train_bits == pytest.approx(train_loss / 0.693147, abs=2e-3) and val_bits == pytest.approx(val_loss / 0.693147, abs=2e-3)
    assert re.search(r"throughput +[\d,]+ tokens/s", block) and re.search(r"wall time +[\d.]+ s", block)
    assert re.search(r"peak memory +[\d,]+ MB", block)
    assert re.search(rf"run directory +{re.escape(str(text_run['run_dir']))}$", block, re.M)
    assert "litlogger" not in both and "💡" not in both  # Lightning's advertisement
    assert len(re.findall(r"run directory: ", out)) == 1


def test_the_printed_resume_command_continues_the_run(text_run):
    again = text_run["again"]
    assert again is not None and again.returncode == 0
    assert "run completed: 8/8 steps (resumed from step 5)" in again.stdout


def test_a_resumed_run_shows_its_true_progress(text_run):
    bar = (text_run["again"].stdout + text_run["again"].stderr).replace("\r", "\n")  # Lightning's bar: stdout
    states = re.findall(r"^train: .*?\| *(\d+)/(\S+) \[[^,\]]+(?:, *([\d.]+)it/s)?", bar, re.M)
    assert states, bar[-2000:]
    assert {total for _, total, _ in states} == {"8"}  # not "?"
    assert int(states[0][0]) >= 5  # starts at the checkpoint's step, not 0
    assert "/?" not in "".join(line for line in bar.splitlines() if line.startswith("train:"))


def test_export_writes_a_file_others_can_read(text_run):
    done = sh(f"umask 022 && paratrain-export {text_run['run_dir']} model.safetensors", cwd=text_run["home"])
    assert done.returncode == 0, done.stderr
    assert oct((text_run["home"] / "model.safetensors").stat().st_mode & 0o777) == oct(0o644)
    assert oct((text_run["home"] / "model.json").stat().st_mode & 0o777) == oct(0o644)


# --- misspelt keys (item 4) and HYDRA_FULL_ERROR (item 13) -------------------------------------------
@pytest.mark.parametrize("command, suggestion", [
    ("train +recipe=moe_8x +model.moe.num_expert=4", "model.moe.num_experts"),
    ("train +recipe=moe_8x model.moe.num_expert=4", "model.moe.num_experts"),
    ("train +trainer.max_step=20", "trainer.max_steps"),
])
def test_a_misspelt_key_fails_with_or_without_plus(command, suggestion, tmp_path):
    done = sh(f"{command} hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert re.search(rf"did you mean {re.escape(suggestion)}\?", done.stderr), done.stderr
    assert "To append to your config use +" not in done.stderr
    assert not (tmp_path / "run" / "metrics.csv").exists()


@pytest.mark.parametrize("command, pattern", [
    ("train model.nm_layers=3", r"did you mean model\.n_layers\?"),
    ("train optimizer.lr=-1", r"Error: optimizer\.lr=-1\.0 must be positive"),
])
def test_hydra_full_error_shows_a_traceback_and_keeps_exit_2(command, pattern, tmp_path):
    done = sh(f"HYDRA_FULL_ERROR=1 {command} hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback (most recent call last)" in done.stderr and re.search(pattern, done.stderr), done.stderr[-2000:]


# --- strategy=auto (item 2), one rank's logs (items 6, 7) ---------------------------------------------
@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("auto")
    done = sh(f"train {' '.join(TINY_MOE)} trainer.devices=2 hydra.run.dir={root}/run", cwd=root)
    return root / "run", done


def test_auto_uses_every_device_asked_for_and_says_what_it_picked(two_process_run):
    run_dir, done = two_process_run
    assert done.returncode == 0, done.stderr[-3000:]
    assert "strategy=auto -> strategy=expert (dp=1 x ep=2 over 2 processes" in done.stdout
    s = summary(run_dir)
    assert s["strategy"] == "expert" and s["world_size"] == 2 and s["mesh"] == {"dp": 1, "ep": 2}


def test_a_multi_process_run_prints_its_directory_and_block_once(two_process_run):
    _, done = two_process_run
    assert done.stdout.count("run directory: ") == 1 and done.stdout.count("run completed: ") == 1
    assert done.stdout.count("strategy=auto -> ") == 1


def test_the_readme_lists_every_file_of_a_run_directory(two_process_run):
    run_dir, _ = two_process_run
    readme = (REPO / "README.md").read_text()
    listing = readme[readme.index("```\n.hydra/"):]
    listing = listing[:listing.index("```", 4)]
    documented = [re.escape(line.split()[0].rstrip("/")).replace("_N\\.log", r"_\d+\.log")
                  for line in listing.splitlines()[1:] if line.strip()]
    for entry in run_dir.iterdir():
        assert any(re.fullmatch(pattern, entry.name) for pattern in documented), (entry.name, documented)
    assert any(p.name.startswith("train_ddp_process_") for p in run_dir.iterdir())


@pytest.mark.parametrize("overrides, picked", [
    ([], ("single", 1, 1)),
    (["trainer.devices=2"], ("ddp", 2, 1)),
    (["+recipe=moe_8x", "trainer.devices=2"], ("expert", 1, 2)),
    (["+recipe=moe_8x", "trainer.num_nodes=2", "trainer.devices=8"], ("hybrid", 2, 8)),
    (["+recipe=moe_8x", "model.moe.num_experts=6", "trainer.devices=4"], ("hybrid", 2, 2)),
    (["+recipe=moe_8x", "model.moe.num_experts=3", "trainer.devices=2"], ("ddp", 2, 1)),
])
def test_auto_resolution(overrides, picked):
    from hydra import compose, initialize_config_dir

    from paratrain.trainer.recipes import register_recipes
    from paratrain.trainer.schema import register_configs
    from paratrain.trainer.validate import validate

    register_configs()
    register_recipes()
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides)
    dims = validate(cfg, announce=False)
    assert (cfg.strategy.name, dims.dp, dims.ep) == picked


# --- SLURM: the README's examples validate; sbatch's refusal is shown (items 2, 3, 12) ----------------
needs_slurm = pytest.mark.skipif(not have_slurm(), reason="no SLURM cluster answers here (sudo bash .ci/slurm-up.sh)")


def submitted(directory: Path) -> bool:
    """Whether submitit submitted anything for this run or sweep (it keeps each job's files in .submitit/).
    (squeue cannot tell: other people's jobs come and go on a shared cluster.)"""
    return (directory / ".submitit").exists()


@needs_slurm
def test_readme_slurm_example_passes_validation_and_meets_sbatch(tmp_path):
    """`train +recipe=moe_8x cluster=slurm trainer.num_nodes=2 trainer.devices=8`: no longer refused by our
    rules (strategy=auto); the one-node cluster here refuses 2 nodes, and says so through sbatch."""
    done = sh(f"train +recipe=moe_8x cluster=slurm trainer.num_nodes=2 trainer.devices=8 hydra.run.dir={tmp_path}/run",
              cwd=tmp_path)
    assert "strategy=single runs one process" not in done.stderr
    assert "strategy=auto -> strategy=hybrid (dp=2 x ep=8 over 16 processes" in done.stdout
    assert done.returncode == 2 and re.search(r"sbatch refused the job: '[^']+'", done.stderr), done.stderr[-2000:]
    assert "--nodes=2 (from trainer.num_nodes" in done.stderr and "Traceback" not in done.stderr
    assert not submitted(tmp_path / "run")


@needs_slurm
def test_sbatch_refusal_of_a_sweep_shows_its_message_and_options(tmp_path):
    done = sh("train -m +recipe=moe_8x cluster=slurm trainer.accelerator=gpu trainer.devices=8 "
              f"model.moe.num_experts=8,16 hydra.sweep.dir={tmp_path}/sweep", cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    assert re.search(r"sbatch refused the job: 'sbatch: error: [^']+'", done.stderr)
    assert "--gpus-per-node=8 (from trainer.devices with trainer.accelerator=gpu" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) <= 3
    assert not submitted(tmp_path / "sweep")


def test_a_local_sweep_with_an_invalid_job_starts_none(tmp_path):
    done = sh(f"train -m {' '.join(TINY_MOE)} strategy=expert trainer.devices=2 model.moe.num_experts=4,5 "
              f"hydra.sweep.dir={tmp_path}/sweep", cwd=tmp_path)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert re.search(r"job 1 \([^)]*model\.moe\.num_experts=5[^)]*\): model\.moe\.num_experts=5 is not divisible",
                     done.stderr), done.stderr
    assert "job 0 (" not in done.stderr  # the valid job is not blamed
    assert not (tmp_path / "sweep" / "0").exists()  # and did not run


@needs_slurm
def test_a_slurm_sweep_with_an_invalid_job_submits_none(tmp_path):
    done = sh(f"train -m {' '.join(TINY_MOE)} cluster=slurm strategy=expert trainer.devices=2 "
              f"model.moe.num_experts=4,5 +model.moe.top_kk=1 hydra.sweep.dir={tmp_path}/sweep", cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert re.search(r"job 0 \([^)]*\): model\.moe\.top_kk is not a config key", done.stderr)
    assert re.search(r"job 1 \([^)]*model\.moe\.num_experts=5[^)]*\):", done.stderr)
    assert not submitted(tmp_path / "sweep")


# --- a local SLURM cluster, for a new user (item 10) ---------------------------------------------------
def test_readme_says_how_to_get_a_local_slurm_cluster_and_the_script_points_at_files_that_exist():
    readme = (REPO / "README.md").read_text()
    assert re.search(r"```bash\nsudo bash \.ci/slurm-up\.sh", readme)
    header = [line for line in (REPO / ".ci" / "slurm-up.sh").read_text().splitlines()[1:12] if line.startswith("#")]
    for name in re.findall(r"\b([\w./-]+\.(?:md|py|sh))\b", "\n".join(header)):
        assert (REPO / name).exists() or list(REPO.rglob(Path(name).name)), f".ci/slurm-up.sh names {name}, not in the checkout"


@needs_slurm
def test_slurm_up_leaves_a_running_cluster_alone():
    done = sh("bash .ci/slurm-up.sh", cwd=REPO)
    assert done.returncode == 0 and "cluster already up" in done.stdout, done.stdout + done.stderr

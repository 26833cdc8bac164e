"""Tier 4: the real `train` command in a subprocess; the run directory read back."""

import shutil
import subprocess
import sys

import pytest

from conftest import TINY, TINY_MOE, metrics, summary, train, train_losses


def test_dense_run_writes_a_consistent_run_directory(tmp_path):
    run_dir = tmp_path / "dense"
    done = train(TINY, run_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    s = summary(run_dir)
    rows = metrics(run_dir)
    assert s["status"] == "completed" and s["steps"] == 6 and s["world_size"] == 1
    assert [int(r["step"]) for r in rows if r["train/loss"]] == [1, 2, 3, 4, 5, 6]
    assert s["final_loss"] == pytest.approx(float(rows[-1]["train/loss"]))
    assert s["final_val_loss"] == pytest.approx(float([r for r in rows if r["val/loss"]][-1]["val/loss"]))
    assert s["tokens"] == 6 * 8 * 32 and s["tokens_per_s"] > 0
    assert s["params_total"] == s["params_active_per_token"] == s["params_per_rank"]
    assert {"step", "train/loss", "val/loss", "tokens_per_s"} <= set(rows[0])
    assert train_losses(run_dir)[-1] < train_losses(run_dir)[0]
    assert (run_dir / ".hydra" / "config.yaml").exists()
    assert (run_dir / "plots" / "loss.png").stat().st_size > 1000
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    # The greppable log: each step's values once, equal to metrics.csv (steps 3 and 6 are validated
    # and checkpointed, so their rows are re-opened for val/loss).
    logged = [dict(kv.split("=", 1) for kv in line.split(" - ", 1)[1].split())
              for line in (run_dir / "train.log").read_text().splitlines() if " - step=" in line]
    by_step = {}
    for entry in logged:
        step = int(entry.pop("step"))
        assert not set(entry) & set(by_step.get(step, {})), (step, entry)
        by_step.setdefault(step, {}).update(entry)
    assert sorted(by_step) == [1, 2, 3, 4, 5, 6]
    for r in rows:
        for key in ("train/loss", "val/loss"):
            if r[key]:
                assert float(by_step[int(r["step"])][key]) == pytest.approx(float(r[key]), rel=1e-4)


def test_metrics_csv_keeps_its_header_when_the_first_row_gains_a_validation_loss(tmp_path):
    """The first logged row is step 3, where validation also runs: the row is re-opened for val/loss
    (truncated back to the empty file) and must be written again under its header."""
    run_dir = tmp_path / "run"
    done = train([*TINY, "trainer.max_steps=3", "trainer.log_every_n_steps=3"], run_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (run_dir / "metrics.csv").read_text().startswith("step,train/loss,val/loss,")
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == ["3"] and rows[0]["train/loss"] and rows[0]["val/loss"]


def test_moe_run_reports_sparse_parameters_and_expert_load(tmp_path):
    run_dir = tmp_path / "moe"
    done = train(TINY_MOE, run_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    s = summary(run_dir)
    # 2 layers x 3 matrices x d=32 x h=32 x (4 experts - top 2) are stored but not active per token
    assert s["params_total"] - s["params_active_per_token"] == 2 * 3 * 32 * 32 * (4 - 2)
    rows = metrics(run_dir)
    for key in ("train/load_balancing_loss", "train/z_loss", "moe/layer0/imbalance", "moe/layer1/dead_experts"):
        assert rows[0][key] != "", key
    assert float(rows[0]["moe/layer0/imbalance"]) >= 1.0
    assert (run_dir / "plots" / "expert_load.png").stat().st_size > 1000


def test_console_script_runs_from_any_directory(tmp_path):
    exe = shutil.which("train") or str((__import__("pathlib").Path(sys.executable).parent / "train"))
    elsewhere = tmp_path / "somewhere"
    elsewhere.mkdir()
    done = subprocess.run([exe, "--cfg", "job", "+recipe=moe_8x"], cwd=elsewhere, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "num_experts: 8" in done.stdout and "top_k: 2" in done.stdout


def test_help_lists_groups_recipes_and_examples():
    done = subprocess.run([sys.executable, "-m", "paratrain.trainer.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    # Every option on disk is listed: the help reads the config tree, not a hand-kept list.
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    strategies = ", ".join(sorted(p.stem for p in (root / "conf" / "strategy").glob("*.yaml")))
    recipes = ", ".join(sorted(p.stem for p in (root / "recipes").glob("*.yaml")))
    assert f"recipe: {recipes}" in done.stdout and f"strategy: {strategies}" in done.stdout, done.stdout
    assert "train +recipe=moe_8x strategy=expert trainer.devices=2" in done.stdout


BAD = [
    (["model.nm_layers=3"], r"nm_layers"),
    (["strategy=exprt"], r"strategy.*exprt|exprt.*strategy"),
    (["+recipe=moe_8x", "model.moe.top_k=9"], r"model\.moe\.top_k=9.*num_experts=8"),
    (["optimizer.lr=-1"], r"optimizer\.lr=-1.*positive"),
    (["data.batch_size=30", "strategy=ddp", "trainer.devices=4"], r"data\.batch_size=30.*divisible.*4"),
    (["data=text", "data.path=/nonexistent/*.txt"], r"data\.path='/nonexistent/\*\.txt'.*matches no file"),
    (["data=tokens", "data.path=/nonexistent.u16"], r"data\.path='/nonexistent\.u16'.*does not exist"),
    (["data=text"], r"data\.path is missing.*data\.source=text"),
    (["strategy=expert", "trainer.devices=2"], r"dense.*no experts to shard"),
    (["trainer.accelerator=tpu"], r"trainer\.accelerator='tpu' is not supported.*cpu, gpu, cuda, auto"),
    (["model.moe.num_experts=4"], r"model\.moe\.num_experts=4 sets a key inside model\.moe.*dense.*`train model=moe "),
    (["strategy=single", "trainer.devices=2"], r"strategy=single runs one process.*strategy=ddp"),
    (["+recipe=moe_8x", "strategy=expert", "trainer.devices=3"],
     r"model\.moe\.num_experts=8 is not divisible by strategy\.mesh\.ep=3"),
    (["+recipe=moe_8x", "strategy=hybrid", "strategy.mesh.ep=4", "trainer.devices=2"], r"strategy\.mesh\.ep=4.*2"),
    (["+recipe=moe_8x", "strategy=hybrid", "strategy.mesh.dp=2", "strategy.mesh.ep=3", "trainer.devices=4"],
     r"strategy\.mesh\.dp=2.*strategy\.mesh\.ep=3"),
]


@pytest.mark.parametrize("args,pattern", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_config_exits_2_naming_the_key(args, pattern, tmp_path):
    import re

    run_dir = tmp_path / "bad"
    done = train(args, run_dir, timeout=120)
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert re.search(pattern, done.stderr, re.S), done.stderr
    assert "Traceback" not in done.stderr
    assert not (run_dir / "summary.json").exists()


def test_refused_config_exits_before_importing_lightning(tmp_path):
    # Lightning (with the torchmetrics and transformers it imports) is seconds of start-up: a config
    # the checks refuse must not wait for it. PYTHONPROFILEIMPORTTIME lists every import on stderr.
    done = train(["strategy=ddp", "trainer.devices=2", "strategy.zero_stage=5"], tmp_path / "bad", timeout=120,
                 env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert done.returncode == 2 and "strategy.zero_stage=5 is not a ZeRO stage" in done.stderr, done.stderr[-2000:]
    imported = {line.rpartition("|")[2].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" in imported and "lightning" not in imported and "paratrain.trainer.module" not in imported


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_gpu_accelerator_without_a_gpu_exits_2(tmp_path):
    done = train(TINY + ["trainer.accelerator=gpu"], tmp_path / "run", timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "trainer.accelerator=gpu, but this machine has no CUDA GPU" in done.stderr and "Traceback" not in done.stderr


def test_token_file_with_ids_beyond_the_vocabulary_exits_2(tmp_path):
    import numpy as np

    (np.arange(20_000) % 300).astype(np.uint16).tofile(tmp_path / "ids.u16")
    run_dir = tmp_path / "bad"
    done = train(TINY + ["data=tokens", f"data.path={tmp_path / 'ids.u16'}", f"data.cache_dir={tmp_path / 'c'}"],
                 run_dir, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "token id 299, but model.vocab_size=256" in done.stderr and "Traceback" not in done.stderr
    assert not (run_dir / "summary.json").exists()


def test_wheel_ships_configs_and_recipes(tmp_path):
    """Configs and recipes are package data: `train` composes from an unpacked wheel, not the checkout."""
    import zipfile
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(repo)],
                   check=True, capture_output=True, timeout=300)
    wheel = next(tmp_path.glob("paratrain-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "paratrain/conf/config.yaml" in names and "paratrain/recipes/moe_8x.yaml" in names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = "import sys; sys.argv[0] = 'train'; from paratrain.trainer.cli import main; main()"
    done = subprocess.run([sys.executable, "-c", code, "--cfg", "job", "+recipe=moe_8x", "strategy=expert", "trainer.devices=2"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "PYTHONPATH": str(site), "PYTHONSAFEPATH": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "num_experts: 8" in done.stdout and "name: expert" in done.stdout


def test_fresh_run_into_an_earlier_run_directory_exits_2_and_keeps_it(tmp_path):
    run_dir = tmp_path / "run"
    assert train(TINY, run_dir).returncode == 0
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and ".hydra" not in p.parts
              and p.suffix != ".log"}
    done = train(TINY, run_dir, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "already holds an earlier run" in done.stderr and "resume=auto" in done.stderr
    assert {p: p.read_bytes() for p in before} == before


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_bf16_precision_trains_close_to_fp32(precision, tmp_path):
    runs = {}
    for p in ("32-true", precision):
        run_dir = tmp_path / p
        done = train([*TINY_MOE, f"trainer.precision={p}"], run_dir)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[p] = train_losses(run_dir)
    # bf16 keeps ~3 significant digits: the first loss agrees to 1e-2, and training still learns.
    assert runs[precision][0] == pytest.approx(runs["32-true"][0], rel=1e-2)
    assert runs[precision][-1] < runs[precision][0]

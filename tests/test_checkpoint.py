"""Tier 4: checkpoints that survive anything: exact resume, resharding, export, faults, bad input.

Every run here uses a learning-rate schedule that depends on the step only (warm-up over 8 steps,
then constant: optimizer.min_lr_ratio=1), so a 6-step run resumed to 12 follows the same schedule
as the straight 12-step run; resuming inside the warm-up checks that the schedule's position is
restored. Tolerances (fp32, CPU): same strategy bitwise; another mesh 1e-5 relative per step (the
order of floating-point sums in all-reduce and all-to-all differs), the reference being
`strategy=single`.
"""

import hashlib
import json
import math
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import TINY_MOE, metrics, summary, train, train_losses
from paratrain.strategies import portable_state as ckpt

ARGS = [*TINY_MOE, "optimizer.warmup_steps=8", "optimizer.min_lr_ratio=1.0", "strategy.timeout_s=60"]
EXPERT2 = ["strategy=expert", "trainer.devices=2"]
HYBRID = ["strategy=hybrid", "strategy.mesh.dp=2", "strategy.mesh.ep=2", "trainer.devices=4"]
STEPS12, STEPS6 = "trainer.max_steps=12", "trainer.max_steps=6"


def run_ok(args, run_dir, env=None):
    done = train(args, run_dir, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def val_losses(run_dir):
    return {int(r["step"]): float(r["val/loss"]) for r in metrics(run_dir) if r["val/loss"]}


def steps(run_dir):
    return [int(r["step"]) for r in metrics(run_dir)]


def checkpoints(run_dir):
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


def assert_matches_reference(run_dir, reference, rel):
    assert steps(run_dir) == list(range(1, 13)), "one row per step, no duplicates"
    got, want = train_losses(run_dir), train_losses(reference)
    if rel == 0:
        assert got == want and val_losses(run_dir) == val_losses(reference)
    else:
        assert got == pytest.approx(want, rel=rel), (got, want)
        assert val_losses(run_dir) == pytest.approx(val_losses(reference), rel=rel)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The straight 12-step single-process reference and a 6-step run to resume (never modified)."""
    root = tmp_path_factory.mktemp("ckpt")
    run_ok([*ARGS, STEPS12], root / "straight")
    run_ok([*ARGS, STEPS6], root / "first6")
    return {"straight": root / "straight", "first6": root / "first6"}


# --- the state itself: by name and global expert, any subset of parameters per optimizer -------


def test_state_is_keyed_by_global_expert_and_loads_into_another_layout(tmp_path):
    """In one process, no process group: a ZeRO-like optimizer holding some parameters saves;
    a model holding only experts [2, 4) loads its experts' weights and the state that exists."""
    from paratrain.trainer.models.transformer import Transformer, build_model, materialize
    from paratrain.trainer.schema import ModelConfig, MoEConfig

    cfg = ModelConfig(d_model=16, n_layers=1, n_heads=2, ffn_dim=32, moe=MoEConfig(num_experts=4, expert_ffn_dim=8))
    saver = torch.nn.Module()
    saver.model = build_model(cfg, seed=1)
    experts = saver.model.layers[0].ffn.experts
    owned = [experts.w1, saver.model.head.weight]  # this "rank" owns two parameters' optimizer state
    opt = torch.optim.AdamW(owned, lr=0.1)
    for p in saver.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    state = ckpt.model_state(saver)
    assert "model.layers.0.ffn.experts.w1/expert/3" in state and state["model.layers.0.ffn.experts.w1/expert/3"].shape == (16, 8)
    ckpt.save(tmp_path / "c", {"state_dict": state, "optimizer_states": [ckpt.optimizer_state(saver, opt)], "global_step": 1})
    assert ckpt.verify(tmp_path / "c")["global_step"] == 1

    loader = torch.nn.Module()
    with torch.device("meta"):
        loader.model = Transformer(cfg)
    loader.model.layers[0].ffn.experts.keep_experts(2, 2)  # an ep rank holding experts 2 and 3
    materialize(loader.model, seed=99)
    opt2 = torch.optim.AdamW(loader.parameters(), lr=0.5)
    ckpt.load(tmp_path / "c", loader, [opt2])
    torch.testing.assert_close(loader.model.layers[0].ffn.experts.w2, experts.w2[2:4], rtol=0, atol=0)
    torch.testing.assert_close(loader.model.tok_emb.weight, saver.model.tok_emb.weight, rtol=0, atol=0)
    w1 = loader.model.layers[0].ffn.experts.w1
    torch.testing.assert_close(opt2.state[w1]["exp_avg"], opt.state[experts.w1]["exp_avg"][2:4], rtol=0, atol=0)
    assert opt2.state[w1]["step"].item() == 1 and opt2.param_groups[0]["lr"] == 0.1
    assert loader.model.tok_emb.weight not in opt2.state  # no state was saved for it: it starts fresh


# --- 1. exact resume --------------------------------------------------------------------------


def test_resume_same_strategy_is_bitwise(runs, tmp_path):
    run_dir = copy_run(runs["first6"], tmp_path / "run")
    run_ok([*ARGS, STEPS12, "resume=auto"], run_dir)
    assert_matches_reference(run_dir, runs["straight"], rel=0)
    s = summary(run_dir)
    assert s["status"] == "completed" and s["steps"] == 12 and s["resumed_from_step"] == 6
    assert s["final_loss"] == train_losses(runs["straight"])[-1]
    assert checkpoints(run_dir) == ["step000009", "step000012"]  # keep_last_checkpoints=2


# --- 2. resharding: a checkpoint of one mesh continues on another ----------------------------


# expert 2 -> single is test_killed_rank_ends_the_job_and_resume_finishes: its run dies after the
# step-6 checkpoint of `strategy=expert trainer.devices=2` and finishes under `strategy=single`.
@pytest.mark.parametrize("first,then", [
    pytest.param(None, EXPERT2, id="single-to-expert2"),
    pytest.param(HYBRID, EXPERT2, id="hybrid2x2-to-expert2"),
    # ZeRO-1: each rank saved only its shard of the optimizer state; one process loads all of it.
    pytest.param([*HYBRID, "strategy.zero_stage=1"], [], id="hybrid2x2-zero1-to-single"),
])
def test_resume_on_another_mesh(first, then, runs, tmp_path):
    run_dir = tmp_path / "run"
    if first is None:
        copy_run(runs["first6"], run_dir)
    else:
        run_ok([*ARGS, STEPS6, *first], run_dir)
    run_ok([*ARGS, STEPS12, "resume=auto", *then], run_dir)
    assert_matches_reference(run_dir, runs["straight"], rel=1e-5)
    assert summary(run_dir)["world_size"] == (2 if then else 1)


# --- 3. faults --------------------------------------------------------------------------------


def test_killed_rank_ends_the_job_and_resume_finishes(runs, tmp_path):
    run_dir = tmp_path / "run"
    start = time.monotonic()
    done = train([*ARGS, STEPS12, *EXPERT2], run_dir, env={"PARATRAIN_FAULT": "kill@7:1"})  # rank 1 dies in step 8
    elapsed = time.monotonic() - start
    assert done.returncode != 0
    assert elapsed < 60, f"the job took {elapsed:.0f}s to end after a rank died (strategy.timeout_s=60)"
    assert checkpoints(run_dir) == ["step000003", "step000006"]
    ckpt.verify(run_dir / "checkpoints" / "step000006")
    run_ok([*ARGS, STEPS12, "resume=auto"], run_dir)  # and on another mesh: strategy=single
    assert_matches_reference(run_dir, runs["straight"], rel=1e-5)
    assert summary(run_dir)["resumed_from_step"] == 6 and summary(run_dir)["world_size"] == 1


def test_kill_while_writing_a_checkpoint_resumes_from_the_previous_one(runs, tmp_path):
    run_dir = copy_run(runs["first6"], tmp_path / "run")
    done = train([*ARGS, STEPS12, "resume=auto"], run_dir, env={"PARATRAIN_FAULT": "kill_in_save@9"})
    assert done.returncode == -9
    assert checkpoints(run_dir) == [".tmp-step000009", "step000003", "step000006"]
    done = run_ok([*ARGS, STEPS12, "resume=auto"], run_dir)
    out = done.stdout + done.stderr
    assert "ignoring partial checkpoint" in out and ".tmp-step000009" in out
    assert "checkpoints/step000006" in out  # restored from the previous complete one
    assert_matches_reference(run_dir, runs["straight"], rel=0)


def test_nonfinite_loss_stops_before_the_update(tmp_path):
    run_dir = tmp_path / "run"
    done = train([*ARGS, STEPS12], run_dir, env={"PARATRAIN_FAULT": "nan@4"})
    assert done.returncode == 1
    assert "loss of step 4 is not finite" in done.stderr
    s = summary(run_dir)
    assert s["status"] == "failed" and "NonFiniteLossError" in s["error"]
    assert checkpoints(run_dir) == ["step000003"]  # nothing saved at or after the NaN step
    weights = ckpt.consolidated_model_state(run_dir / "checkpoints" / "step000003")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_nonfinite_loss_on_one_rank_is_skipped_on_every_rank(tmp_path):
    run_dir = tmp_path / "run"
    run_ok([*ARGS, STEPS6, "strategy=ddp", "trainer.devices=2", "trainer.on_nonfinite_loss=skip"], run_dir,
           env={"PARATRAIN_FAULT": "nan@4:1"})
    losses = train_losses(run_dir)
    # Had any rank applied the NaN gradients, its weights and every later loss would be NaN.
    assert math.isnan(losses[3]) and all(math.isfinite(x) for i, x in enumerate(losses) if i != 3)
    weights = ckpt.consolidated_model_state(run_dir / "checkpoints" / "step000006")
    assert all(torch.isfinite(w).all() for w in weights.values())


# --- 4. export --------------------------------------------------------------------------------


@torch.no_grad()
def validation_loss(model, cfg) -> float:
    """What LanguageModelTask.validation_step logs, on one process: the mean CE over val batches."""
    from paratrain.trainer.data import ValBatches, token_files

    _, val_path = token_files(cfg.data)
    batches = ValBatches(val_path, cfg.data.seq_len, cfg.data.batch_size, cfg.data.val_batches, cfg.seed)
    model.eval()
    losses = [torch.nn.functional.cross_entropy(model(x).flatten(0, 1).float(), y.flatten())
              for x, y in (batches[i] for i in range(len(batches)))]
    return torch.stack(losses).mean().item()


def test_export_gives_the_checkpoints_validation_loss(runs, tmp_path):
    from omegaconf import OmegaConf
    from paratrain.trainer.export import load_exported

    out = tmp_path / "export" / "model.safetensors"
    done = subprocess.run([sys.executable, "-m", "paratrain.trainer.export", str(runs["straight"]), str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    model, model_cfg = load_exported(out)  # a fresh single-process model
    run_cfg = OmegaConf.create(json.loads(out.with_suffix(".json").read_text())["config"])
    assert model_cfg.moe.num_experts == 4 and model.layers[0].ffn.experts.w1.shape[0] == 4
    # The step-12 checkpoint holds the weights the step-12 validation ran on.
    assert validation_loss(model, run_cfg) == pytest.approx(val_losses(runs["straight"])[12], rel=1e-6)


# --- 5. bad input: exit 2, the problem named, the run directory untouched --------------------


def snapshot(run_dir: Path) -> dict:
    # .hydra/ and the Hydra log are Hydra's, rewritten before any paratrain code runs.
    return {str(p.relative_to(run_dir)): hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and ".hydra" not in p.parts and p.suffix != ".log"}


def corrupt(run_dir: Path) -> None:
    data = run_dir / "checkpoints" / "step000006" / "__0_0.distcp"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))


@pytest.mark.parametrize("args,damage,message", [
    pytest.param(["resume=/no/such/checkpoint"], None, r"resume='/no/such/checkpoint' does not exist", id="missing"),
    pytest.param(["resume=auto", "model.d_model=64"], None,
                 r"holds another model.*model\.head\.weight: checkpoint \(256, 32\) vs model \(256, 64\).*"
                 r"model\.d_model=32 \(this run: 64\)", id="other-shape"),
    pytest.param(["resume=auto"], corrupt, r"step000006 is corrupt: __0_0\.distcp fails its CRC-32 check", id="corrupt"),
])
def test_bad_resume_input_exits_2_and_changes_nothing(args, damage, message, runs, tmp_path):
    import re

    run_dir = copy_run(runs["first6"], tmp_path / "run")
    if damage:
        damage(run_dir)
    before = snapshot(run_dir)
    done = train([*ARGS, STEPS12, *args], run_dir)
    assert done.returncode == 2, done.stderr[-2000:]
    assert re.search(message, done.stderr), done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert snapshot(run_dir) == before


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch /tmp/paratrain-pwned",))


def test_checkpoint_metadata_is_never_unpickled_with_code(runs, tmp_path):
    path = shutil.copytree(runs["first6"] / "checkpoints" / "step000006", tmp_path / "step000006")
    (path / ".metadata").write_bytes(pickle.dumps(_Payload()))
    with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
        ckpt.tensor_metadata(path)
    with pytest.raises(ckpt.CheckpointError, match="corrupt"):
        ckpt.verify(path)  # the manifest catches it first
    assert not Path("/tmp/paratrain-pwned").exists()

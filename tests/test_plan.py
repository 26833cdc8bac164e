"""Plans (trainer/plan.py): parameter counts of the real-size recipes against their published totals;
planned per-rank bytes against a measured training step on every layout; dry_run; refusal.

Measured, per rank, after one forward/backward/optimizer step laid out by the real strategy code
(apply_layout, GradientSync, ZeRO-1 OptimizerStateSharding, AdamW): bytes of the distinct storages
of the parameters, of the gradients (after the sync: the flat buckets when world > 1), of the
optimizer state (strategies/zero.py:optimizer_state_bytes), and of the activations: the distinct
storages autograd saved in the forward (saved-tensor hooks) plus the logits. Planned bytes of
parameters, gradients and optimizer state must equal the measured ones within 5%, activations
within 30% (the issue's margins; they agree to ~0% and ~6% today).
"""

import json
import time

import pytest
import torch

from conftest import train
from distributed import run_on_ranks
from paratrain.trainer.plan import plan_run


# Published totals (and active parameters per token) and where they are stated.
PUBLISHED = {
    # Mistral AI, "Mixtral of experts" (2023-12-11) and arXiv:2401.04088 sec. 2: 46.7B total, 12.9B active.
    "mixtral_8x7b": (46.7e9, 12.9e9),
    # Meta, Llama 3 model card / HF meta-llama/Meta-Llama-3-8B: 8.03B parameters (dense: all active).
    "llama3_8b": (8.03e9, 8.03e9),
    # Qwen team, "Qwen1.5-MoE: Matching 7B Model Performance with 1/3 Activated Parameters" (2024-03-28):
    # 14.3B total, 2.7B activated.
    "qwen_moe": (14.3e9, 2.7e9),
    # DeepSeek-AI, DeepSeek-V3 Technical Report, arXiv:2412.19437: 671B total, 37B activated per token.
    "deepseek_v3": (671e9, 37e9),
}
# DeepSeek-V3's multi-head latent attention is plain attention here (205M instead of 187M parameters
# per layer, 61 layers): +0.2% on the total but +4.5% on the 37B active (+3% on the 37.55B its
# config gives), so the active count of that one recipe is held to 5%.
ACTIVE_REL = {"deepseek_v3": 0.05}


@pytest.mark.parametrize("recipe", list(PUBLISHED))
def test_real_size_parameter_counts_match_published(recipe, compose_run):
    total, active = PUBLISHED[recipe]
    started = time.process_time()
    plan = plan_run(compose_run(f"+recipe={recipe}"))
    print(f"{recipe}: {plan['params_total'] / 1e9:.3f}B total, {plan['params_active_per_token'] / 1e9:.3f}B active, "
          f"planned in {time.process_time() - started:.2f} s CPU")
    assert plan["params_total"] == pytest.approx(total, rel=0.01)
    assert plan["params_active_per_token"] == pytest.approx(active, rel=ACTIVE_REL.get(recipe, 0.01))


# --- planned vs measured bytes per rank, on the tiny recipes and every layout that exists ----------

TINY_RECIPES = ["mixtral_8x7b_tiny", "deepseek_v3_tiny", "qwen_moe_tiny", "llama3_8b_tiny"]
LAYOUTS = {  # name: (world, overrides); expert layouts apply to the MoE recipes only
    "single": (1, ["strategy=single"]),
    "ddp2": (2, ["strategy=ddp", "trainer.devices=2"]),
    "expert2": (2, ["strategy=expert", "trainer.devices=2"]),
    "ddp2-zero1": (2, ["strategy=ddp", "trainer.devices=2", "strategy.zero_stage=1"]),
    "hybrid2x2-zero1": (4, ["strategy=hybrid", "strategy.mesh.dp=2", "strategy.mesh.ep=2", "trainer.devices=4",
                            "strategy.zero_stage=1"]),
}


def _storages(tensors) -> int:
    seen = {}
    for t in tensors:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def measure_step(rank, world_size, cfg, dp, ep, shard_optimizer):
    """One laid-out training step of cfg on this rank; the bytes it holds."""
    import torch.nn.functional as F

    from paratrain.strategies.grad_sync import GradientSync
    from paratrain.strategies.layout import apply_layout
    from paratrain.strategies.mesh import ParallelDims, build_mesh
    from paratrain.strategies.zero import OptimizerStateSharding, optimizer_state_bytes
    from paratrain.trainer.models.transformer import build_model
    from paratrain.trainer.module import build_optimizer

    dims = ParallelDims(dp=dp, ep=ep, world_size=world_size)
    model = build_model(cfg.model, cfg.seed, device="meta")
    mesh = build_mesh(dims, "cpu") if world_size > 1 else None
    groups = apply_layout(model, dims, mesh, cfg.seed, torch.device("cpu"))
    sync = GradientSync(groups, cfg.strategy.bucket_size_mb) if groups else None
    optimizer = build_optimizer(cfg.optimizer, model.named_parameters())
    zero = None
    if shard_optimizer:
        zero = OptimizerStateSharding(groups)
        zero.shard(optimizer)

    micro = cfg.data.batch_size // world_size
    g = torch.Generator().manual_seed(rank)
    tokens = torch.randint(0, 256, (micro, cfg.data.seq_len + 1), generator=g)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        try:
            s = t.untyped_storage()
            key, size = s.data_ptr(), s.nbytes()
        except RuntimeError:  # a wrapper subclass (the all-to-all's async result): count its elements
            key, size = id(t), t.numel() * t.element_size()
        if key not in params:
            saved[key] = size
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()) + model.aux_loss()
    saved[logits.untyped_storage().data_ptr()] = logits.untyped_storage().nbytes()
    loss.backward()
    if sync:
        sync.finish()
    grads = _storages(p.grad for p in model.parameters() if p.grad is not None)
    optimizer.step()
    if zero:
        zero.gather_params()
    return {"params": _storages(model.parameters()), "grads": grads,
            "optimizer_state": optimizer_state_bytes(optimizer), "activations": sum(saved.values())}


def _cases(compose_run, layout):
    world, overrides = LAYOUTS[layout]
    cases = []
    for recipe in TINY_RECIPES:
        cfg = compose_run(f"+recipe={recipe}", *overrides)
        if cfg.model.moe is None and layout in ("expert2", "hybrid2x2-zero1"):
            continue
        plan = plan_run(cfg)
        cases.append((recipe, cfg, plan))
    return world, cases


def _measure_all(rank, world_size, cases):
    return {recipe: measure_step(rank, world_size, cfg, plan["mesh"]["dp"], plan["mesh"]["ep"],
                                 cfg.strategy.zero_stage == 1) for recipe, cfg, plan in cases}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_planned_bytes_per_rank_equal_measured(layout, compose_run):
    world, cases = _cases(compose_run, layout)
    if world == 1:
        results = [_measure_all(0, 1, cases)]
    else:
        results = run_on_ranks(_measure_all, world, cases, timeout_s=240)
    for recipe, cfg, plan in cases:
        planned = plan["bytes_per_rank"]
        # The plan is per rank and, where ranks differ (ZeRO-1's whole-parameter split), the largest.
        measured = {key: max(r[recipe][key] for r in results) for key in planned if key != "total"}
        print(layout, recipe, {k: (planned[k], measured[k]) for k in measured})
        for key in ("params", "grads", "optimizer_state"):
            assert planned[key] == pytest.approx(measured[key], rel=0.05), (layout, recipe, key, planned[key], measured[key])
        assert planned["activations"] == pytest.approx(measured["activations"], rel=0.30), (layout, recipe)


# --- the command: dry_run plans and spawns nothing; a run that cannot fit exits 2 -----------------

def test_dry_run_writes_the_plan_and_runs_nothing(tmp_path):
    run_dir = tmp_path / "plan"
    started = time.monotonic()
    done = train(["+recipe=mixtral_8x7b", "strategy=expert", "trainer.devices=8", "dry_run=true"], run_dir)
    wall = time.monotonic() - started
    assert done.returncode == 0, done.stderr[-3000:]
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["params_total"] == pytest.approx(46.7e9, rel=0.01) and plan["mesh"] == {"dp": 1, "ep": 8}
    experts = plan["params_experts"]
    assert plan["params_per_rank"] == plan["params_total"] - experts + experts // 8
    assert plan["a2a_bytes_per_step"] > 0 and plan["bytes_per_rank"]["activations"] > 0
    assert "46.703 B total" in done.stdout and "plan written to" in done.stdout
    # Nothing ran: no metrics, no summary, no checkpoints (Hydra's own train.log and .hydra/ only).
    assert sorted(p.name for p in run_dir.iterdir() if not p.name.startswith(".")) == ["plan.json", "train.log"]
    assert "rank" not in (run_dir / "train.log").read_text()
    print(f"dry_run of mixtral_8x7b: {wall:.1f} s wall, including the interpreter and imports")


def test_run_whose_plan_does_not_fit_exits_2_before_spawning(tmp_path):
    run_dir = tmp_path / "too-big"
    done = train(["+recipe=llama3_8b", "strategy=ddp", "trainer.devices=2", "data.batch_size=2"], run_dir)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    msg = done.stderr
    assert "needs" in msg and "GiB for 2 ranks on this node" in msg and "host RAM" in msg, msg
    for key in ("data.batch_size", "data.seq_len", "strategy.mesh.ep", "strategy.zero_stage", "trainer.precision"):
        assert key in msg, (key, msg)
    assert not (run_dir / "metrics.csv").exists() and not (run_dir / "summary.json").exists()
    assert not (run_dir / "checkpoints").exists()


def test_tiny_recipe_run_writes_its_plan(tmp_path):
    run_dir = tmp_path / "tiny"
    done = train(["+recipe=qwen_moe_tiny", "trainer.max_steps=2", "trainer.log_every_n_steps=1",
                  "trainer.enable_progress_bar=false", "data.val_batches=1", "trainer.val_check_interval=2"], run_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    plan = json.loads((run_dir / "plan.json").read_text())
    s = json.loads((run_dir / "summary.json").read_text())
    assert plan["params_total"] == s["params_total"] and plan["params_per_rank"] == s["params_per_rank"]
    assert plan["bytes_per_rank"]["optimizer_state"] == s["optimizer_state_bytes_per_rank"]
    assert plan["memory"]["fits"] is True

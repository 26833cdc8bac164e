"""Plans (trainer/plan.py): parameter counts of the real-size recipes against their published totals;
planned per-rank bytes against a measured training step on every layout; dry_run; refusal.

Measured, per rank, after one forward/backward/optimizer step laid out by the real strategy code
(apply_layout: pipeline split, tp, experts, FSDP2 or GradientSync + ZeRO-1; the pipeline schedule
under pp; AdamW), as summary.json measures it (strategies/zero.py): bytes of the distinct storages of
the parameters, of the gradients (after the sync), of the optimizer state, and the peak of the
storages autograd holds for backward (saved-tensor hooks, live count) plus the logits. Every layout
that exists (20) on the tiny recipes, in one spawned job per world size (2 and 4 processes). Planned
parameters, gradients and optimizer state must equal the measured ones within 5%, activations within
30% (the issue's margins; they agree exactly and within -5%..+20% today). Under pp each stage is
compared, at step 2: the first step of a schedule also holds a metadata-inference forward.
"""

import json
import time
from contextlib import nullcontext
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch.distributed.tensor.parallel import loss_parallel

from conftest import train
from distributed import run_on_ranks
# Imported here, not in the ranks' function: the ranks fork from a server that has imported this
# module (tests/distributed.py), so they start with Lightning and the strategies already loaded.
from paratrain.strategies.fsdp import shard_stage_root
from paratrain.strategies.grad_sync import EDGE_BUCKET_MB, GradientSync
from paratrain.strategies.layout import apply_layout
from paratrain.strategies.mesh import ParallelDims, build_mesh
from paratrain.strategies.pipeline_parallel import Pipeline
from paratrain.strategies.tensor_parallel import parallel_cross_entropy
from paratrain.strategies.zero import OptimizerStateSharding, grad_bytes, held_bytes, optimizer_state_bytes
from paratrain.trainer.models.transformer import build_model
from paratrain.trainer.module import build_optimizer
from paratrain.trainer.plan import plan_run
from paratrain.trainer.schema import PipelineConfig


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
# DeepSeek-V3's multi-head latent attention is plain attention here (205.5M instead of 187.1M
# parameters per layer, 61 layers): +0.2% on the total but +4.5% on the 37B active. No attention
# width this model family expresses brings both within 1% (recipes/deepseek_v3.yaml: GQA 2:1 gives
# -3.9%, and MLA's exact count is 37.55B, +1.5%), so the active count of that one recipe is held to 5%.
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


def test_real_size_plans_follow_the_layout(compose_run):
    """The layout arithmetic at real size, no spawn: pp stages partition the model (embedding first,
    head last), tp splits every matrix but the norms, ZeRO-3 divides by the data ranks."""
    base = ["+recipe=llama3_8b", "data.batch_size=64"]
    whole = plan_run(compose_run(*base, "strategy=single"))
    total, d, layers = whole["params_total"], 4096, 32
    norms = (2 * layers + 1) * d

    pp = plan_run(compose_run(*base, "strategy=pipeline", "strategy.mesh.pp=4", "trainer.devices=4"))
    stages = pp["pipeline"]["stages"]
    assert [s["layers"] for s in stages] == [list(range(8 * i, 8 * i + 8)) for i in range(4)]
    assert sum(s["params"] for s in stages) == total
    embed = 128256 * d
    assert stages[0]["params"] - stages[1]["params"] == embed and stages[3]["params"] - stages[1]["params"] == embed + d
    # 1F1B with 8 micro-batches: pp - rank in flight; the plan reports the largest stage.
    assert [s["in_flight"] for s in stages] == [4, 3, 2, 1]
    assert pp["bytes_per_rank"] == max((s["bytes"] for s in stages), key=lambda b: b["total"])

    tp = plan_run(compose_run(*base, "strategy=tensor", "strategy.mesh.tp=8", "trainer.devices=8"))
    assert tp["params_per_rank"] == (total - norms) // 8 + norms
    # The same per-rank batch: heads, hidden units and vocabulary / 8; sequence-parallel norms keep a
    # whole gathered copy of their output for the matrices after them.
    assert tp["bytes_per_rank"]["activations"] < whole["bytes_per_rank"]["activations"] / 3

    z3 = plan_run(compose_run(*base, "strategy=fsdp", "trainer.devices=8"))
    assert z3["params_per_rank"] == pytest.approx(total / 8, rel=1e-4)
    b = z3["bytes_per_rank"]
    assert b["grads"] == b["params"] and b["optimizer_state"] == 2 * b["params"] and b["fsdp_gathered"] > 0


# --- planned vs measured bytes per rank, on the tiny recipes and every layout that exists ----------

TINY_RECIPES = ["mixtral_8x7b_tiny", "deepseek_v3_tiny", "qwen_moe_tiny", "llama3_8b_tiny"]
MOE = TINY_RECIPES[:3]
TP_RECIPES = ["mixtral_8x7b_tiny", "deepseek_v3_tiny", "llama3_8b_tiny"]  # qwen's gated shared expert: no tp plan
PP = ["strategy.pipeline.schedule=1f1b"]
# name: (world, overrides, recipes). Every layout that exists, each axis and the compositions with
# their own parameter placement: ZeRO-1/2/3 under tp (MoE experts over dp x tp, the router over the
# stage), ZeRO-2 and tp under pp.
LAYOUTS = {
    "single": (1, ["strategy=single"], TINY_RECIPES),
    "ddp2": (2, ["strategy=ddp"], TINY_RECIPES),
    "expert2": (2, ["strategy=expert"], MOE),
    "ddp2-zero1": (2, ["strategy=ddp", "strategy.zero_stage=1"], TINY_RECIPES),
    "ddp2-zero2": (2, ["strategy=ddp", "strategy.zero_stage=2"], TINY_RECIPES),
    "expert2-zero3": (2, ["strategy=expert", "strategy.zero_stage=3"], MOE),
    "tp2": (2, ["strategy=tensor", "strategy.mesh.tp=2", "strategy.mesh.dp=1"], TP_RECIPES),
    "pp2": (2, ["strategy=pipeline", "strategy.mesh.pp=2", "strategy.mesh.dp=1", *PP], TINY_RECIPES),
    "hybrid2x2-zero1": (4, ["strategy=hybrid", "strategy.mesh.dp=2", "strategy.mesh.ep=2", "strategy.zero_stage=1"], MOE),
    "hybrid2x2-zero3": (4, ["strategy=hybrid", "strategy.mesh.dp=2", "strategy.mesh.ep=2", "strategy.zero_stage=3"], MOE),
    "dp2xtp2": (4, ["strategy=tensor", "strategy.mesh.tp=2", "strategy.mesh.dp=2"], TP_RECIPES),
    "dp2xtp2-zero3": (4, ["strategy=tensor", "strategy.mesh.tp=2", "strategy.mesh.dp=2", "strategy.zero_stage=3"],
                      ["llama3_8b_tiny"]),
    "ep2xtp2": (4, ["strategy=tensor", "strategy.mesh.tp=2", "strategy.mesh.dp=1", "strategy.mesh.ep=2"], TP_RECIPES[:2]),
    "pp2xdp2-zero1": (4, ["strategy=pipeline", "strategy.mesh.pp=2", "strategy.mesh.dp=2", "strategy.zero_stage=1", *PP],
                      TINY_RECIPES),
    "pp2xep2": (4, ["strategy=pipeline", "strategy.mesh.pp=2", "strategy.mesh.dp=1", "strategy.mesh.ep=2",
                    "strategy.pipeline.schedule=gpipe"], MOE),
    "dp2xtp2-zero1": (4, ["strategy=tensor", "strategy.mesh.tp=2", "strategy.mesh.dp=2", "strategy.zero_stage=1"],
                      ["mixtral_8x7b_tiny", "llama3_8b_tiny"]),
    "dp2xtp2-zero3-moe": (4, ["strategy=tensor", "strategy.mesh.tp=2", "strategy.mesh.dp=2", "strategy.zero_stage=3"],
                          TP_RECIPES[:2]),
    "ep2xtp2-zero2": (4, ["strategy=tensor", "strategy.mesh.tp=2", "strategy.mesh.dp=1", "strategy.mesh.ep=2",
                          "strategy.zero_stage=2"], ["mixtral_8x7b_tiny"]),
    "pp2xdp2-zero2": (4, ["strategy=pipeline", "strategy.mesh.pp=2", "strategy.mesh.dp=2", "strategy.zero_stage=2", *PP],
                      ["mixtral_8x7b_tiny", "llama3_8b_tiny"]),
    "pp2xtp2": (4, ["strategy=pipeline", "strategy.mesh.pp=2", "strategy.mesh.dp=1", "strategy.mesh.tp=2", *PP],
                ["llama3_8b_tiny"]),
}
SMALL = ["data.seq_len=64", "trainer.max_steps=2"]  # a shorter sequence: the same layouts, faster steps


class SavedPeak:
    """Saved-tensor hooks that track the bytes autograd holds for backward, live, and their peak:
    each distinct storage counted once while any saved reference to it exists (DTensors: the local
    shard; parameters, FSDP's gathered ones included, are not activations)."""

    def __init__(self, params):
        self.params = {(p.to_local() if hasattr(p, "to_local") else p).untyped_storage().data_ptr() for p in params}
        self.refs, self.live, self.peak = {}, 0, 0

    def pack(self, t):
        # A weight, or a view of one (linear saves weight.t()); FSDP's gathered weights are Parameters too.
        if isinstance(t, torch.nn.Parameter) or isinstance(t._base, torch.nn.Parameter):
            return t
        local = t.to_local() if hasattr(t, "to_local") else t
        try:
            s = local.untyped_storage()
            key, size = s.data_ptr(), s.nbytes()
        except RuntimeError:  # a wrapper subclass (the all-to-all's async result): count its elements
            key, size = id(local), local.numel() * local.element_size()
        if key in self.params:
            return t
        return _Held(self, key, size, t)

    @staticmethod
    def unpack(held):
        return held.t if isinstance(held, _Held) else held


class _Held:
    def __init__(self, peak: SavedPeak, key, size, t):
        self.peak, self.key, self.size, self.t = peak, key, size, t
        refs = peak.refs.get(key, 0)
        peak.refs[key] = refs + 1
        if refs == 0:
            peak.live += size
            peak.peak = max(peak.peak, peak.live)

    def __del__(self):
        p = self.peak
        p.refs[self.key] -= 1
        if p.refs[self.key] == 0:
            del p.refs[self.key]
            p.live -= self.size


def measure_step(rank, world_size, cfg, mesh):
    """One training step of cfg laid out by the real strategy code (apply_layout: pipeline split, tp,
    experts, FSDP2 or GradientSync + ZeRO-1; the pipeline schedule under pp) on this rank; the bytes
    it holds, measured as summary.json measures them (strategies/zero.py)."""
    s = cfg.strategy
    dims = ParallelDims(dp=mesh["dp"], ep=mesh["ep"], tp=mesh.get("tp", 1), pp=mesh.get("pp", 1), world_size=world_size)
    pipeline_cfg = PipelineConfig(**s.pipeline)
    model = build_model(cfg.model, cfg.seed, device="meta", max_seq_len=cfg.data.seq_len)
    device_mesh = build_mesh(dims, "cpu") if world_size > 1 else None
    groups = apply_layout(model, dims, device_mesh, cfg.seed, torch.device("cpu"), zero_stage=s.zero_stage,
                          sequence_parallel=s.sequence_parallel, pipeline=pipeline_cfg)
    sync = GradientSync(groups, s.bucket_size_mb, first_bucket_mb=EDGE_BUCKET_MB, last_bucket_mb=EDGE_BUCKET_MB) if groups else None
    micro = cfg.data.batch_size // dims.data_ranks
    g = torch.Generator().manual_seed(dims.data_rank(rank))  # tp ranks and stages share their data slice
    tokens = torch.randint(0, cfg.model.vocab_size, (micro, cfg.data.seq_len + 1), generator=g)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    if dims.pp > 1:
        pipe = Pipeline(model, dims, device_mesh, torch.device("cpu"), pipeline_cfg.schedule, pipeline_cfg.microbatches,
                        pipeline_cfg.stages_per_rank, pipeline_cfg.split_points,
                        no_sync=sync.no_sync if sync else nullcontext,
                        shard_stage=partial(shard_stage_root, mesh=device_mesh, zero_stage=s.zero_stage)
                        if groups == [] else None, sequence_parallel=s.sequence_parallel)
    # After the stages: a stage's FSDP root replaces the parameters it holds (MeshStrategy.setup
    # builds the optimizer after the Pipeline too).
    optimizer = build_optimizer(cfg.optimizer, model.named_parameters())
    zero = None
    if s.zero_stage == 1 and groups:
        zero = OptimizerStateSharding(groups)
        zero.shard(optimizer)
    if dims.pp > 1:
        # The first step of a schedule also runs (and, on the first stage, holds until its backward
        # metadata comes back) one metadata-inference forward: the plan is the steady state, step 2.
        pipe.train_step((inputs, targets))
        pipe.release_grads()
        if sync:
            sync.finish()
        model.zero_grad(set_to_none=True)
    saved = SavedPeak(model.parameters())
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
        if dims.pp > 1:
            pipe.train_step((inputs, targets))
            pipe.release_grads()
            activations = saved.peak
        else:
            logits = model(inputs)
            ce = (parallel_cross_entropy if dims.tp > 1 else F.cross_entropy)(logits.flatten(0, 1).float(), targets.flatten())
            loss = ce + model.aux_loss()
            local = logits.to_local() if hasattr(logits, "to_local") else logits
            activations = saved.peak + local.untyped_storage().nbytes()  # and the logits, alive until backward
            with loss_parallel() if dims.tp > 1 else nullcontext():
                loss.backward()
    if sync:
        sync.finish()
    grads = grad_bytes(model)
    optimizer.step()
    if zero:
        zero.gather_params()
    return {"params": held_bytes(model.parameters()), "grads": grads, "optimizer_state": optimizer_state_bytes(optimizer),
            "activations": activations, "pp_rank": dims.coordinate(rank).get("pp", 0)}


def measure_layouts(rank, world_size, cases):
    out = {}
    for layout, recipe, cfg, plan in cases:
        started = time.perf_counter()
        out[(layout, recipe)] = measure_step(rank, world_size, cfg, plan["mesh"])
        out[(layout, recipe)]["wall_s"] = time.perf_counter() - started
    return out


def _cases(compose_run, world):
    cases = []
    for layout, (w, overrides, recipes) in LAYOUTS.items():
        if w != world:
            continue
        for recipe in recipes:
            args = [f"+recipe={recipe}", *overrides, f"trainer.devices={world}", *SMALL]
            cfg = compose_run(*args)
            if "strategy.mesh.tp=2" in overrides and cfg.model.get("n_kv_heads") == 1:
                cfg = compose_run(*args, "model.n_kv_heads=2")  # kv heads are split over tp too
            cases.append((layout, recipe, cfg, plan_run(cfg)))
    return cases


@pytest.fixture(scope="module")
def measured(compose_run):
    """Every layout of one world size in one spawned job: {world: (cases, results by rank)}."""
    cache = {}

    def get(world):
        if world not in cache:
            started = time.perf_counter()
            cases = _cases(compose_run, world)
            planned = time.perf_counter()
            results = [measure_layouts(0, 1, cases)] if world == 1 else \
                run_on_ranks(measure_layouts, world, cases, timeout_s=420)
            print(f"{len(cases)} cases on {world} process(es): composed and planned in {planned - started:.1f} s, "
                  f"measured in {time.perf_counter() - planned:.1f} s")
            cache[world] = (cases, results)
        return cache[world]

    return get


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_planned_bytes_per_rank_equal_measured(layout, measured):
    cases, results = measured(LAYOUTS[layout][0])
    cases = [c for c in cases if c[0] == layout]
    assert cases
    for _, recipe, cfg, plan in cases:
        stages = [st["bytes"] for st in plan["pipeline"]["stages"]] if "pipeline" in plan else [plan["bytes_per_rank"]]
        for pp_rank, planned in enumerate(stages):
            ranks = [r[(layout, recipe)] for r in results if r[(layout, recipe)]["pp_rank"] == pp_rank]
            # The plan is per rank and, where ranks differ (ZeRO-1's whole-parameter split, FSDP's last
            # shard), the largest; under pp per stage.
            got = {key: max(r[key] for r in ranks) for key in ("params", "grads", "optimizer_state", "activations")}
            print(layout, recipe, f"stage {pp_rank}", f"{ranks[0]['wall_s']:.1f} s",
                  {k: (planned[k], got[k], f"{planned[k] / got[k] - 1:+.1%}") for k in got})
            for key in ("params", "grads", "optimizer_state"):
                assert planned[key] == pytest.approx(got[key], rel=0.05), (layout, recipe, pp_rank, key, planned[key], got[key])
            assert planned["activations"] == pytest.approx(got["activations"], rel=0.30), (layout, recipe, pp_rank)


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

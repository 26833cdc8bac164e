"""Pipeline parallelism (strategy.mesh.pp): equal to the single-process run, gradients first.

Tier 3 (in-process ranks): after one pipeline step (forward + backward of every micro-batch) and
the gradient sync, every parameter a rank holds has the single-process gradient of the global-batch
loss (cross-entropy + MoE auxiliary losses), rtol 1e-5 / atol 1e-6 in fp32, for every schedule,
dense and MoE, and composed with dp and ep. A wrong micro-batch scaling gives 4x gradients while
the loss moves by ~1e-6 (DESIGN.md facts), which is why gradients are compared.
Tier 4 (`train` in a subprocess): losses over 6 steps equal `single` to 1e-5 relative.
"""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from distributed import run_on_ranks
from paratrain.trainer.models.transformer import build_model
from paratrain.trainer.schema import ModelConfig, MoEConfig, PipelineConfig

SEED = 11


def model_cfg(moe=True, n_layers=4):
    moe_cfg = MoEConfig(num_experts=4, top_k=2, expert_ffn_dim=16) if moe else None
    return OmegaConf.structured(ModelConfig(d_model=32, n_layers=n_layers, n_heads=2, ffn_dim=32, moe=moe_cfg))


def global_batch(batch=8, seq=16):
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, 256, (batch, seq + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def reference(cfg):
    model = build_model(cfg, SEED)
    x, y = global_batch()
    ce = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    (ce + model.aux_loss()).backward()
    return ce.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def pipelined_grads(rank, world_size, cfg, mesh_degrees, layouts):
    """Every layout in `layouts` (schedule, microbatches, stages_per_rank) on one process group."""
    from paratrain.strategies.grad_sync import GradientSync
    from paratrain.strategies.layout import apply_layout
    from paratrain.strategies.mesh import ParallelDims, build_mesh
    from paratrain.strategies.pipeline_parallel import Pipeline

    dims = ParallelDims(world_size=world_size, **mesh_degrees)
    mesh = build_mesh(dims, "cpu")
    out = []
    for schedule, microbatches, stages_per_rank in layouts:
        pcfg = PipelineConfig(schedule=schedule, microbatches=microbatches, stages_per_rank=stages_per_rank)
        model = build_model(cfg, SEED, device="meta")
        groups = apply_layout(model, dims, mesh, SEED, torch.device("cpu"), pcfg)
        sync = GradientSync(groups, bucket_size_mb=0.01) if groups else None
        pipe = Pipeline(model, dims, mesh, torch.device("cpu"), schedule, microbatches, stages_per_rank,
                        no_sync=sync.no_sync if sync else contextlib.nullcontext)
        x, y = global_batch()
        local = x.shape[0] // dims.data_ranks
        rows = slice((rank % dims.data_ranks) * local, (rank % dims.data_ranks + 1) * local)
        ce, aux = pipe.train_step((x[rows], y[rows]))
        if sync:
            sync.finish()
        offsets = {n: m.expert_offset for n, m in model.named_modules() if hasattr(m, "expert_offset")}
        grads = {n: (p.grad.clone(), offsets.get(n.rsplit(".", 1)[0])) for n, p in model.named_parameters()}
        out.append((ce.item(), grads))
    return out


def check(results, ref, layouts, ep=1, data_ranks=1):
    ref_ce, ref_grads = ref
    for i, layout in enumerate(layouts):
        seen = set()
        ces = []
        for rank, per_layout in enumerate(results):
            ce, grads = per_layout[i]
            ces.append(ce)
            for name, (grad, offset) in grads.items():
                expected = ref_grads[name]
                if offset is not None and ep > 1:
                    expected = expected[offset: offset + grad.shape[0]]
                torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6, msg=f"{layout} rank {rank} {name}")
                seen.add(name)
        assert seen == set(ref_grads), f"{layout}: parameters held by no stage: {set(ref_grads) - seen}"
        # The last stage's ranks hold the loss of their data slice; their mean is the global loss.
        last = [c for c in ces if c != 0.0]
        assert len(last) == data_ranks and sum(last) / data_ranks == pytest.approx(ref_ce, rel=1e-5), layout


SCHEDULES = [("gpipe", 4, 1), ("1f1b", 4, 1), ("interleaved_1f1b", 4, 2), ("zero_bubble", 4, 2)]


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_pp2_gradients_equal_single_process_for_every_schedule(moe):
    cfg = model_cfg(moe=moe)
    results = run_on_ranks(pipelined_grads, 2, cfg, {"dp": 1, "ep": 1, "pp": 2}, SCHEDULES, timeout_s=240)
    check(results, reference(cfg), SCHEDULES)

"""Tier 3: a whole MoE transformer laid out on a mesh gives the single-process gradients.

Each rank takes its slice of one global batch; after backward and our gradient sync, every dense
gradient must equal the single-process gradient of the global-batch loss, and every expert shard's
gradient the matching slice of it (this is where 1/ep or ep-times scaling bugs would show).
Tolerance (fp32): rtol 1e-5, atol 1e-6.
"""

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from distributed import run_on_ranks
from paratrain.trainer.models.transformer import build_model
from paratrain.trainer.schema import ModelConfig, MoEConfig

SEED = 11


def model_cfg(capacity_factor=None, num_shared_experts=0, num_experts=4):
    moe = MoEConfig(num_experts=num_experts, top_k=2, expert_ffn_dim=16, capacity_factor=capacity_factor,
                    num_shared_experts=num_shared_experts)
    return OmegaConf.structured(ModelConfig(d_model=32, n_layers=2, n_heads=2, ffn_dim=32, moe=moe))


def global_batch(batch=8, seq=16):
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, 256, (batch, seq + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def loss_of(model, x, y):
    logits = model(x)
    return F.cross_entropy(logits.flatten(0, 1), y.flatten()) + model.aux_loss()


def reference_grads(cfg):
    model = build_model(cfg, SEED)
    x, y = global_batch()
    loss_of(model, x, y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def laid_out_grads(rank, world_size, cfg, dp, ep):
    from paratrain.strategies.grad_sync import GradientSync
    from paratrain.strategies.layout import apply_layout
    from paratrain.strategies.mesh import ParallelDims, build_mesh

    dims = ParallelDims(dp=dp, ep=ep, world_size=world_size)
    model = build_model(cfg, SEED, device="meta")
    mesh = build_mesh(dims, "cpu")
    sync = GradientSync(apply_layout(model, dims, mesh, SEED, torch.device("cpu")), bucket_size_mb=0.01)
    x, y = global_batch()
    local = x.shape[0] // world_size
    rows = slice(rank * local, (rank + 1) * local)
    loss_of(model, x[rows], y[rows]).backward()
    sync.finish()
    offsets = {n: m.expert_offset for n, m in model.named_modules() if hasattr(m, "expert_offset")}
    return {n: (p.grad.clone(), offsets.get(n.rsplit(".", 1)[0])) for n, p in model.named_parameters()}


@pytest.mark.parametrize("dp,ep,cfg_kwargs", [
    (1, 2, {}),
    (1, 2, {"capacity_factor": 1.0}),
    (1, 2, {"num_shared_experts": 1}),
    (2, 1, {}),
    (1, 4, {}),
    (2, 2, {"capacity_factor": 1.25}),
], ids=["ep2", "ep2-capacity", "ep2-shared", "dp2", "ep4", "dp2xep2-capacity"])
def test_laid_out_gradients_equal_single_process(dp, ep, cfg_kwargs):
    cfg = model_cfg(**cfg_kwargs)
    ref = reference_grads(cfg)
    results = run_on_ranks(laid_out_grads, dp * ep, cfg, dp, ep, timeout_s=120)
    for rank, grads in enumerate(results):
        assert grads.keys() == ref.keys()
        for name, (grad, offset) in grads.items():
            expected = ref[name]
            if offset is not None and ep > 1:
                expected = expected[offset : offset + grad.shape[0]]
            torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6, msg=f"rank {rank} {name}")

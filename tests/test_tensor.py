"""Tensor parallelism: every tp layout reproduces the single-process run on the same global batch.

Tier 3 (gradients): the model laid out by `apply_layout` on a dp x ep x tp mesh, our gradient sync
and AdamW, 6 steps; per-step losses to rel 1e-5 and every gradient, gathered whole (DTensor slices
with full_tensor, expert shards by their global index), to rtol 1e-5 / atol 1e-6 at the first and
the last step, against one process. Tier 4: the real `train` command under strategy=tensor.
"""

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from distributed import run_on_ranks
from paratrain.trainer.models.transformer import build_model
from paratrain.trainer.schema import ModelConfig, MoEConfig

SEED = 11
STEPS = 6
BATCH, SEQ = 8, 16
RTOL, ATOL = 1e-5, 1e-6


def model_cfg(moe=False, num_shared_experts=0, capacity_factor=None):
    moe_cfg = MoEConfig(num_experts=4, top_k=2, expert_ffn_dim=16, num_shared_experts=num_shared_experts,
                        capacity_factor=capacity_factor) if moe else None
    return OmegaConf.structured(ModelConfig(d_model=32, n_layers=2, n_heads=4, ffn_dim=64, moe=moe_cfg))


def batch(step):
    g = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(0, 256, (BATCH, SEQ + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def _train(model, rows, cross_entropy, sync=None, backward_context=None, clip=None):
    """STEPS AdamW steps on `rows` of each global batch; (losses, grads of step 0, grads of the last step)."""
    from contextlib import nullcontext

    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    losses, grads = [], []
    for step in range(STEPS):
        x, y = batch(step)
        logits = model(x[rows])
        loss = cross_entropy(logits.flatten(0, 1), y[rows].flatten()) + model.aux_loss()
        with backward_context() if backward_context else nullcontext():
            loss.backward()
        if sync is not None:
            sync.finish()
        if clip is not None:
            clip(model)
        losses.append(loss.detach().clone())
        if step in (0, STEPS - 1):
            grads.append({n: p.grad.clone() for n, p in model.named_parameters()})  # sync reuses its buffers
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses, grads


def reference(cfg):
    model = build_model(cfg, SEED)
    losses, grads = _train(model, slice(None), F.cross_entropy, clip=_clip_single)
    return [float(v) for v in losses], grads


def _clip_single(model):
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)


def laid_out(rank, world_size, cfg, dp, ep, tp, sequence_parallel):
    from paratrain.strategies.grad_norm import clip_grad_norm_
    from paratrain.strategies.grad_sync import GradientSync
    from paratrain.strategies.layout import apply_layout
    from paratrain.strategies.mesh import ParallelDims, build_mesh
    from torch.distributed.tensor.parallel import loss_parallel

    from paratrain.strategies.tensor_parallel import parallel_cross_entropy

    dims = ParallelDims(dp=dp, ep=ep, tp=tp, world_size=world_size)
    mesh = build_mesh(dims, "cpu")
    model = build_model(cfg, SEED, device="meta")
    sync = GradientSync(apply_layout(model, dims, mesh, SEED, torch.device("cpu"), sequence_parallel), bucket_size_mb=0.01)
    local = BATCH // dims.data_ranks
    data_rank = dims.data_rank(rank)
    rows = slice(data_rank * local, (data_rank + 1) * local)
    ce = parallel_cross_entropy if tp > 1 else F.cross_entropy
    losses, grads = _train(model, rows, ce, sync, loss_parallel if tp > 1 else None,
                           clip=lambda m: clip_grad_norm_(m, 1.0, mesh))
    offsets = {n: m.expert_offset for n, m in model.named_modules() if hasattr(m, "expert_offset")}
    # Gradients were kept as DTensors: gather slices (a collective, the same order on every rank).
    whole = [{n: (g.full_tensor() if hasattr(g, "full_tensor") else g, offsets.get(n.rsplit(".", 1)[0]))
              for n, g in step.items()} for step in grads]
    local_bytes = sum((p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size()
                      for p in model.parameters())
    return [float(v) for v in losses], whole, local_bytes


LAYOUTS = {  # name: (cfg kwargs, dp, ep, tp, sequence_parallel)
    "dense-tp2-sp": ({}, 1, 1, 2, True),
    "dense-tp2": ({}, 1, 1, 2, False),
    "dense-dp2xtp2": ({}, 2, 1, 2, True),
    "moe-tp2": ({"moe": True}, 1, 1, 2, True),
    "moe-tp2-shared-capacity-nosp": ({"moe": True, "num_shared_experts": 1, "capacity_factor": 1.0}, 1, 1, 2, False),
    "moe-ep2xtp2-shared": ({"moe": True, "num_shared_experts": 1}, 1, 2, 2, True),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_tp_gradients_equal_single_process(name):
    cfg_kwargs, dp, ep, tp, sp = LAYOUTS[name]
    cfg = model_cfg(**cfg_kwargs)
    ref_losses, ref_grads = reference(cfg)
    results = run_on_ranks(laid_out, dp * ep * tp, cfg, dp, ep, tp, sp, timeout_s=180)
    # Each rank's loss is the mean over its data rank's slice (equal slices): their mean is the global one.
    mean_losses = [sum(r[0][step] for r in results) / len(results) for step in range(STEPS)]
    assert mean_losses == pytest.approx(ref_losses, rel=1e-5), (mean_losses, ref_losses)
    for rank, (losses, grads, _) in enumerate(results):
        if dp * ep == 1:
            assert losses == pytest.approx(ref_losses, rel=1e-5), (rank, losses, ref_losses)
        for step, (got, want) in enumerate(zip(grads, ref_grads)):
            assert got.keys() == want.keys()
            for n, (g, offset) in got.items():
                expected = want[n]
                if offset is not None and ep > 1:
                    expected = expected[offset: offset + g.shape[0]]
                torch.testing.assert_close(g, expected, rtol=RTOL, atol=ATOL, msg=f"rank {rank} step {step} {n}")

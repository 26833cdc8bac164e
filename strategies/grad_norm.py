"""Gradient clipping by the norm of the whole, unsharded gradient, whatever the layout."""

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from .expert_parallel import dense_params, expert_params
from .mesh import axis_size, ep_group


def _squares(grads, device) -> torch.Tensor:
    if not grads:
        return torch.zeros((), device=device)
    return torch.stack(torch._foreach_norm(grads)).float().square().sum()


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float, mesh=None) -> torch.Tensor:
    """Clip by the norm of the whole (unsharded) gradient.

    ZeRO-0/1: dense gradients are whole on every rank; expert shards' squares are summed over ep.
    ZeRO-2/3 (FSDP2): every gradient is a DTensor of which each rank holds a disjoint piece (dense
    shards over all data ranks, expert slices over dp, other experts on other ep ranks), so the
    squares of the local pieces are summed over the world: one all-reduce of one scalar."""
    device = next(model.parameters()).device
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros((), device=device)
    if any(isinstance(g, DTensor) for g in grads):
        assert all(isinstance(g, DTensor) and all(pl.is_shard() for pl in g.placements) for g in grads), \
            "a sharded layout with replicated gradients: their squares would be counted more than once"
        local = [g.to_local() for g in grads]
        total_sq = _squares(local, device)
        dist.all_reduce(total_sq)
    else:
        local = grads
        dense, experts = dense_params(model), expert_params(model)
        expert_sq = _squares([p.grad for p in experts if p.grad is not None], device)
        if mesh is not None and axis_size(mesh, "ep") > 1:
            dist.all_reduce(expert_sq, group=ep_group(mesh))  # other ranks hold other experts
        total_sq = _squares([p.grad for p in dense if p.grad is not None], device) + expert_sq
    total = total_sq.sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(local, coef.to(local[0].dtype))
    return total

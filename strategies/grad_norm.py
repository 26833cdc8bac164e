"""Gradient clipping by the norm of the whole, unsharded gradient, whatever the layout."""

import math

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from .expert_parallel import dense_params, expert_params
from .mesh import axis_group, axis_size, ep_group, tp_group
from .tensor_parallel import is_tp_sharded


def _local(g: torch.Tensor) -> torch.Tensor:
    return g.to_local() if isinstance(g, DTensor) else g


def _squares(grads, device) -> torch.Tensor:
    if not grads:
        return torch.zeros((), device=device)
    return torch.stack(torch._foreach_norm(grads)).float().square().sum()


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float, mesh=None) -> torch.Tensor:
    """Clip by the norm of the whole (unsharded) gradient.

    ZeRO-0/1: dense gradients are whole on every rank, or (tp) split over the tp group; expert
    shards' squares are summed over ep, tp slices' over tp; replicas are counted once; under pp every
    stage's squares are summed over pp (each stage holds other layers).
    ZeRO-2/3 (FSDP2): every gradient is a DTensor of which each rank holds a disjoint piece (dense
    shards over all data ranks, expert slices over dp, other experts on other ep ranks), except
    along a Replicate axis (tp, for norms and plain tensors of a tp layout): the squares of the local
    pieces, divided by those copies, are summed over the world: one all-reduce of one scalar."""
    device = next(model.parameters()).device
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros((), device=device)
    local = [_local(g) for g in grads]
    if isinstance(model, FSDPModule) or any(isinstance(m, FSDPModule) for m in model.modules()):
        copies = [math.prod(g.device_mesh.size(i) for i, pl in enumerate(g.placements) if pl.is_replicate())
                  if isinstance(g, DTensor) else 1 for g in grads]
        total_sq = sum(_squares([t], device) / c for t, c in zip(local, copies)) if max(copies) > 1 \
            else _squares(local, device)
        dist.all_reduce(total_sq)
    else:
        dense, experts = dense_params(model), expert_params(model)
        expert_sq = _squares([_local(p.grad) for p in experts if p.grad is not None], device)
        if mesh is not None and axis_size(mesh, "ep") > 1:
            dist.all_reduce(expert_sq, group=ep_group(mesh))  # other ranks hold other experts
        sliced = [_local(p.grad) for p in dense if p.grad is not None and is_tp_sharded(p)]
        sliced_sq = _squares(sliced, device)
        if sliced:
            dist.all_reduce(sliced_sq, group=tp_group(mesh))  # other tp ranks hold the other slices
        whole = [_local(p.grad) for p in dense if p.grad is not None and not is_tp_sharded(p)]
        total_sq = _squares(whole, device) + sliced_sq + expert_sq
        if mesh is not None and "pp" in mesh.mesh_dim_names:
            dist.all_reduce(total_sq, group=axis_group(mesh, "pp"))  # other stages hold other layers
    total = total_sq.sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(local, coef.to(local[0].dtype))
    return total

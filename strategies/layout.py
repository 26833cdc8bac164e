"""Lay a plain model out over the mesh: the few `apply_*` steps every strategy runs, in order.

Order matters: experts are sharded on the meta device first (so only this rank's experts are ever
allocated), then weights materialise (seeded by name and expert index, so they equal the
single-process weights), then dispatch and gradient sync attach to the real parameters.
"""

import torch
import torch.distributed as dist
from torch import nn

from ..trainer.model import materialize
from ..trainer.moe import GroupedExperts
from .grad_sync import reduction_groups_for
from .mesh import ParallelDims, axis_size, ep_group, ep_rank
from .token_dispatch import AllToAllTokenDispatcher


def expert_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in model.modules() if isinstance(m, GroupedExperts) for p in m.parameters()]


def dense_params(model: nn.Module) -> list[nn.Parameter]:
    experts = {id(p) for p in expert_params(model)}
    return [p for p in model.parameters() if id(p) not in experts]


def apply_expert_sharding(model: nn.Module, dims: ParallelDims, ep_rank: int) -> None:
    """Keep experts [ep_rank * E/ep, (ep_rank + 1) * E/ep) of every MoE layer."""
    for moe in model.moe_layers():
        per_rank = moe.experts.num_experts // dims.ep
        moe.experts.keep_experts(ep_rank * per_rank, per_rank)


def apply_token_dispatch(model: nn.Module, mesh) -> None:
    """Route every MoE layer's tokens to their expert shards by all-to-all over the ep group.

    After `apply_expert_sharding`: the dispatcher checks that each layer holds this ep rank's shard.
    """
    group = ep_group(mesh)
    for moe in model.moe_layers():
        moe.dispatcher = AllToAllTokenDispatcher(group)


def apply_layout(model: nn.Module, dims: ParallelDims, mesh, seed: int, device: torch.device) -> list | None:
    """Shard, materialise, attach dispatch; returns the gradient reduction groups (None on one process)."""
    rank_on_ep = ep_rank(mesh) if mesh is not None and dims.ep > 1 else 0
    if dims.ep > 1:
        apply_expert_sharding(model, dims, rank_on_ep)
    materialize(model, seed, device)
    if dims.ep > 1:
        apply_token_dispatch(model, mesh)
    if dims.world_size == 1:
        return None
    return reduction_groups_for(model.parameters(), expert_params(model), mesh)


def clip_grad_norm_(model: nn.Module, max_norm: float, mesh=None) -> torch.Tensor:
    """Clip by the norm of the whole (unsharded) gradient: expert shards' squares summed over ep."""
    def squares(params):
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return torch.zeros((), device=next(model.parameters()).device)
        return torch.stack(torch._foreach_norm(grads)).float().square().sum()

    dense, experts = dense_params(model), expert_params(model)
    expert_sq = squares(experts)
    if mesh is not None and axis_size(mesh, "ep") > 1:
        dist.all_reduce(expert_sq, group=ep_group(mesh))  # other ranks hold other experts
    total = (squares(dense) + expert_sq).sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    grads = [p.grad for p in dense + experts if p.grad is not None]
    torch._foreach_mul_(grads, coef.to(grads[0].dtype))
    return total

"""Gradient clipping by the norm of the whole, unsharded gradient, whatever the layout."""

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from .expert_parallel import dense_params, expert_params
from .mesh import axis_size, ep_group, tp_group
from .tensor_parallel import is_tp_sharded


def _local(g: torch.Tensor) -> torch.Tensor:
    return g.to_local() if isinstance(g, DTensor) else g


def clip_grad_norm_(model: nn.Module, max_norm: float, mesh=None) -> torch.Tensor:
    """Clip by the norm of the whole (unsharded) gradient: squares of the pieces other ranks hold
    summed over their group (expert shards over ep, tp slices over tp); replicas counted once."""
    def squares(params):
        grads = [_local(p.grad) for p in params if p.grad is not None]
        if not grads:
            return torch.zeros((), device=next(model.parameters()).device)
        return torch.stack(torch._foreach_norm(grads)).float().square().sum()

    dense, experts = dense_params(model), expert_params(model)
    expert_sq = squares(experts)
    if mesh is not None and axis_size(mesh, "ep") > 1:
        dist.all_reduce(expert_sq, group=ep_group(mesh))  # other ranks hold other experts
    sliced = [p for p in dense if is_tp_sharded(p)]
    sliced_sq = squares(sliced)
    if sliced:
        dist.all_reduce(sliced_sq, group=tp_group(mesh))  # other tp ranks hold the other slices
    total = (squares([p for p in dense if not is_tp_sharded(p)]) + sliced_sq + expert_sq).sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    grads = [_local(p.grad) for p in dense + experts if p.grad is not None]
    torch._foreach_mul_(grads, coef.to(grads[0].dtype))
    return total

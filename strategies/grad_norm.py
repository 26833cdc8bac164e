"""Gradient clipping by the norm of the whole, unsharded gradient, whatever the layout."""

import torch
import torch.distributed as dist
from torch import nn

from .expert_parallel import dense_params, expert_params
from .mesh import axis_group, axis_size, ep_group


def clip_grad_norm_(model: nn.Module, max_norm: float, mesh=None) -> torch.Tensor:
    """Clip by the norm of the whole (unsharded) gradient: expert shards' squares summed over ep,
    every stage's squares over pp (each stage holds other layers)."""
    def squares(params):
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return torch.zeros((), device=next(model.parameters()).device)
        return torch.stack(torch._foreach_norm(grads)).float().square().sum()

    dense, experts = dense_params(model), expert_params(model)
    expert_sq = squares(experts)
    if mesh is not None and axis_size(mesh, "ep") > 1:
        dist.all_reduce(expert_sq, group=ep_group(mesh))  # other ranks hold other experts
    total = squares(dense) + expert_sq
    if mesh is not None and "pp" in mesh.mesh_dim_names:
        dist.all_reduce(total, group=axis_group(mesh, "pp"))
    total = total.sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    grads = [p.grad for p in dense + experts if p.grad is not None]
    torch._foreach_mul_(grads, coef.to(grads[0].dtype))
    return total

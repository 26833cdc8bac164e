"""Expert parallelism: each MoE layer keeps experts E/ep of its experts; tokens reach them by all-to-all.

Gradient rule (written beside the code that applies it, strategies/grad_sync.py): an expert shard's
gradient is summed over its dp group only (the all-to-all backward already brought every ep rank's
contribution), scaled by 1/world like every other gradient.
"""

from torch import nn

from ..trainer.models.moe import GroupedExperts
from .mesh import ParallelDims, ep_group
from .token_dispatch import AllToAllTokenDispatcher


def expert_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in model.modules() if isinstance(m, GroupedExperts) for p in m.parameters()]


def dense_params(model: nn.Module) -> list[nn.Parameter]:
    experts = {id(p) for p in expert_params(model)}
    return [p for p in model.parameters() if id(p) not in experts]


def apply_expert_sharding(model: nn.Module, dims: ParallelDims, ep_rank: int) -> None:
    """Keep experts [ep_rank * E/ep, (ep_rank + 1) * E/ep) of every MoE layer (on the meta device)."""
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

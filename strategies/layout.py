"""Lay a plain model out over the mesh: the `apply_*` steps, in the one order they may run.

Each parallel axis is one `apply_*` step in a file of its own; this function only orders them
(as torchtitan's `parallelize_*` functions do). The order, and why:

1. split into pipeline stages   (pp)  - first: every later step sees only this stage's blocks
2. tensor-parallel plan         (tp)  - before experts, so the expert step sees the final module tree
3. shard experts                (ep)  - on the meta device, so only this rank's experts are allocated
4. materialise                        - seeded by name and expert index: equal to single-process weights
5. attach token dispatch        (ep)  - needs the real, sharded expert parameters
6. activation checkpointing           - wraps finished blocks
7. FSDP, or our gradient sync   (dp)  - last: it must see every parameter in its final form

Steps 2, 6 and FSDP join as those axes land; today's layouts run 1, 3, 4, 5 and the gradient sync.
Under pp the gradient sync covers one stage's data ranks (`data_mesh`): the other stages hold other layers.
"""

import torch
from torch import nn

from ..trainer.models.transformer import materialize
from .expert_parallel import apply_expert_sharding, apply_token_dispatch, expert_params
from .grad_sync import reduction_groups_for
from .mesh import ParallelDims, data_mesh, ep_rank, pp_rank
from .pipeline_parallel import apply_pipeline_split


def apply_layout(model: nn.Module, dims: ParallelDims, mesh, seed: int, device: torch.device,
                 pipeline=None) -> list | None:
    """Split, shard, materialise, attach dispatch; returns the gradient reduction groups (None when
    no other rank holds the same parameters). `pipeline`: the strategy.pipeline config (pp > 1)."""
    if dims.pp > 1:
        apply_pipeline_split(model, dims, pp_rank(mesh), pipeline.stages_per_rank, pipeline.split_points)
    if dims.ep > 1:
        apply_expert_sharding(model, dims, ep_rank(mesh))
    materialize(model, seed, device)
    if dims.ep > 1:
        apply_token_dispatch(model, mesh)
    if dims.data_ranks == 1:
        return None
    return reduction_groups_for(model.parameters(), expert_params(model), data_mesh(mesh))

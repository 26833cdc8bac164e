"""Lay a plain model out over the mesh: the `apply_*` steps, in the one order they may run.

Each parallel axis is one `apply_*` step in a file of its own; this function only orders them
(as torchtitan's `parallelize_*` functions do). The order, and why:

1. split into pipeline stages   (pp)  - first: every later step sees only this stage's blocks
2. tensor-parallel plan         (tp)  - before experts, so the expert step sees the final module tree
3. shard experts                (ep)  - on the meta device, so only this rank's experts are allocated
4. materialise                        - seeded by name and expert index: equal to single-process weights
5. attach token dispatch        (ep)  - needs the real, sharded expert parameters; then (tp) each tp
                                        rank's chunk of the tokens is what it dispatches
6. activation checkpointing           - wraps finished blocks
7. FSDP, or our gradient sync   (dp)  - last: it must see every parameter in its final form

Step 7 is FSDP2 for ZeRO-2/3 (strategies/fsdp.py: it reduce-scatters gradients itself, so there
is no gradient sync to register) and our all-reduce for ZeRO-0/1 (strategies/grad_sync.py; ZeRO-1
shards optimizer state on top of it, strategies/zero.py). Under pp the gradient sync covers one
stage's ranks (`stage_mesh`): the other stages hold other layers.
"""

from contextlib import nullcontext

import torch
from torch import nn
from torch.distributed.tensor.experimental import implicit_replication

from ..trainer.models.transformer import materialize
from .activation_checkpointing import apply_activation_checkpointing
from .expert_parallel import apply_expert_sharding, apply_token_dispatch, expert_params
from .fsdp import apply_fsdp
from .grad_sync import reduction_groups_for
from .mesh import ParallelDims, ep_rank, pp_rank, stage_mesh, tp_mesh
from .pipeline_parallel import apply_pipeline_split
from .tensor_parallel import apply_tensor_parallel, apply_tp_token_split, tp_partial_params


def apply_layout(model: nn.Module, dims: ParallelDims, mesh, seed: int, device: torch.device, zero_stage: int = 0,
                 activation_checkpointing: str = "none", mp_policy=None, sequence_parallel: bool = True,
                 pipeline=None) -> list | None:
    """Split into stages, split over tp, shard experts, materialise, attach dispatch, checkpoint, then
    FSDP or gradient sync. `pipeline`: the strategy.pipeline config (pp > 1).

    Returns the gradient reduction groups for our all-reduce: None when no other rank holds the same
    parameters, [] under FSDP."""
    if dims.pp > 1:
        apply_pipeline_split(model, dims, pp_rank(mesh), pipeline.stages_per_rank, pipeline.split_points)
    if dims.tp > 1:
        apply_tensor_parallel(model, tp_mesh(mesh), sequence_parallel)
    if dims.ep > 1:
        apply_expert_sharding(model, dims, ep_rank(mesh))
    # Init draws each whole tensor from its name's seed; a DTensor parameter keeps its slice of it.
    with implicit_replication() if dims.tp > 1 else nullcontext():
        materialize(model, seed, device)
    if dims.ep > 1:
        apply_token_dispatch(model, mesh)
    if dims.tp > 1:
        apply_tp_token_split(model, tp_mesh(mesh))
    apply_activation_checkpointing(model, activation_checkpointing)
    if dims.world_size == dims.pp:  # every rank of a stage is alone with its parameters
        return None
    if zero_stage >= 2:
        # Under pp each stage's module is the root group (fsdp.shard_stage_root, called by the Pipeline).
        apply_fsdp(model, mesh, zero_stage, mp_policy, root=dims.pp == 1)
        return []
    return reduction_groups_for(model.parameters(), expert_params(model), stage_mesh(mesh),
                                tp_partial_params(model) if dims.tp > 1 else ())

"""ZeRO-2 and ZeRO-3: FSDP2 `fully_shard` over the data ranks; each expert shard over its dp group.

ZeRO-2 = `reshard_after_forward=False` (parameters stay gathered from forward to backward; gradients
and optimizer state sharded), ZeRO-3 = `reshard_after_forward=True` (parameters gathered per block,
freed after use). One FSDP group per transformer block, one per MoE layer's experts, and the root
(embedding, final norm, head), as torchtitan groups them. Under pp the root is each pipeline stage's
module (`shard_stage_root`, called by strategies/pipeline_parallel.py), over the stage's data ranks;
ZeRO-3 then all-gathers every block once per micro-batch in forward and again in backward (the
schedules keep a stage unsharded between its backwards), which is why torchtitan defaults to
reshard_after_forward=False (ZeRO-2) with pp.

Which group reduces which gradient (the rule of strategies/grad_sync.py, applied by FSDP's
reduce-scatter instead of our all-reduce):
- dense parameters are replicated on every data rank, so they are sharded over all of them
  (dp x ep, one flattened axis): reduce-scatter SUM, then / W. That is FSDP's default (AVG over W).
- an expert shard lives on the ranks of one dp group (the ep ranks hold other experts), so with
  ep > 1 it is sharded over that group only, in an FSDP group of its own. The all-to-all backward has already brought every ep rank's
  contribution here, so SUM over dp, then / W, not / dp: FSDP's default would divide by dp and give
  ep-times too large expert gradients. The divide factor is set to W; gloo refuses the PREMUL_SUM
  op FSDP would use for a custom factor, so it is told to SUM and divide afterwards.
- under tp (strategies/tensor_parallel.py) the router and the experts are replicated over tp and
  each tp rank dispatches its own share of the tokens, so their gradients are partial sums over tp:
  tp is one more data axis for them. Experts are sharded over dp x tp (`expert_replica_mesh`), the
  router over every rank (`replica_mesh`); both in FSDP groups of their own (the block's group is
  on the data ranks of one tp slice), SUM, then / W with W still the data ranks (dp x ep), whose
  losses each cover 1/W of the global batch.

Expert stacks (E_local, d, h) and (E_local, h, d) are sharded on dim 0, whole experts per rank, when
E_local divides by the ranks holding them (`expert_shard_dim`), as for every other parameter; else on
dim 1, so that E_local need not divide (d and h must then: validate.py). Dim 0 is the cheaper one: a
dim-1 shard costs FSDP a strided copy into and out of every all-gather and reduce-scatter (bench_zero
moe_8x, ZeRO-3 / Lightning's FSDP2 step time: 1.16x on dim 1, 0.95-0.99x on dim 0). Either way a
checkpoint holds each expert by its global index (strategies/portable_state.py).
"""

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Shard

from ..trainer.models.moe import GroupedExperts
from .mesh import axis_size, data_mesh, expert_replica_mesh, replica_mesh

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def expert_shard_dim(num_local_experts: int, ranks: int) -> int:
    """The dim FSDP shards an expert stack on, over the `ranks` that hold it (dp, x tp under tp)."""
    return 0 if num_local_experts % ranks == 0 else 1


def mixed_precision_policy(precision: str, reduce_dtype: str = "float32") -> MixedPrecisionPolicy:
    """bf16-mixed: bf16 compute (parameters gathered in bf16), fp32 master shards, reduce in `reduce_dtype`."""
    if precision == "bf16-mixed":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=DTYPES[reduce_dtype])
    return MixedPrecisionPolicy(reduce_dtype=DTYPES[reduce_dtype] if reduce_dtype != "float32" else None)


def _kwargs(zero_stage: int, mp_policy: MixedPrecisionPolicy | None) -> dict:
    assert zero_stage in (2, 3), zero_stage
    return {"reshard_after_forward": zero_stage == 3, "mp_policy": mp_policy or MixedPrecisionPolicy()}


def apply_fsdp(model: nn.Module, mesh, zero_stage: int, mp_policy: MixedPrecisionPolicy | None = None,
               root: bool = True) -> None:
    """Shard `model` (materialised, experts already split over ep) for ZeRO `zero_stage` 2 or 3.
    `root=False` (pp): leave the root group to `shard_stage_root`, once per stage module."""
    kwargs = _kwargs(zero_stage, mp_policy)
    dense_mesh, expert_mesh = data_mesh(mesh), expert_replica_mesh(mesh)
    world = dense_mesh.size()  # the data ranks
    experts = [m for m in model.modules() if isinstance(m, GroupedExperts)]
    expert_dim = {id(p): expert_shard_dim(m.num_local_experts, expert_mesh.size()) for m in experts for p in m.parameters()}

    def placement(param: nn.Parameter) -> Shard:
        return Shard(expert_dim.get(id(param), 0))

    tp = axis_size(mesh, "tp")
    if axis_size(mesh, "ep") > 1 or tp > 1:
        # ep > 1 (over its dp group) or tp > 1 (over dp x tp): each expert shard is sharded over a
        # mesh other than the dense parameters', so it needs an FSDP group of its own (innermost
        # first: a module's group holds the parameters no inner group took). With ep = tp = 1 the
        # experts share their block's group: one all-gather and one reduce-scatter per block, not two.
        for module in experts:
            _shard_summed(module, expert_mesh, world, kwargs, shard_placement_fn=placement)
    if tp > 1:
        for moe in model.moe_layers():
            _shard_summed(moe.router, replica_mesh(mesh), world, kwargs)
    for block in model.layers:
        fully_shard(block, mesh=dense_mesh, shard_placement_fn=placement, **kwargs)
    if root:
        fully_shard(model, mesh=dense_mesh, **kwargs)


def shard_stage_root(stage: nn.Module, mesh, zero_stage: int, mp_policy: MixedPrecisionPolicy | None = None) -> None:
    """The root FSDP group of one pipeline stage's module (its blocks are sharded already): the
    embedding, final norm and head it holds, if any; the stage's schedule drives its reduce-scatter."""
    fully_shard(stage, mesh=data_mesh(mesh), **_kwargs(zero_stage, mp_policy))


def _shard_summed(module: nn.Module, mesh, world: int, kwargs: dict, **more) -> None:
    """fully_shard `module` over `mesh`, its gradients summed there and divided by the `world` data ranks."""
    fully_shard(module, mesh=mesh, **kwargs, **more)
    module.set_gradient_divide_factor(float(world))  # / W over a replica group (see above)
    # Over one rank FSDP skips the collective and divides in its copy; forcing SUM there
    # would divide a second time (torch 2.13), so only a real reduce-scatter gets it.
    module.set_force_sum_reduction_for_comms(mesh.size() > 1)

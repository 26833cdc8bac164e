"""`MeshStrategy`: one Lightning Strategy plugin for every layout over a {dp, ep, tp} device mesh.

`single` is the mesh {1, 1, 1}, `ddp` {N, 1, 1}, `expert` {1, N, 1}, `hybrid` {a, b, 1}, `tensor`
{1, 1, N} (or any product): the same code, so the layouts cannot drift apart. The strategy receives the LightningModule's plain model (built on the meta
device) and lays it out in `setup()`: keep this rank's experts, materialise the weights, swap in
the all-to-all dispatcher, checkpoint activations, and shard with FSDP2 (ZeRO-2/3) or register our
bucketed gradient synchronisation (ZeRO-0/1). With pp > 1 the model is split into stages first and
`self.pipeline` runs each step's micro-batch schedule.
"""

from contextlib import contextmanager, nullcontext
from datetime import timedelta
from functools import partial

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.strategies.strategy import Strategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from . import portable_state
from .grad_sync import EDGE_BUCKET_MB, GradientSync
from .grad_norm import clip_grad_norm_
from .fsdp import mixed_precision_policy, shard_stage_root
from .layout import apply_layout
from .mesh import ParallelDims, build_mesh
from .pipeline_parallel import Pipeline
from .tensor_parallel import parallel_cross_entropy
from .zero import OptimizerStateSharding, describe_stage
from ..trainer.schema import PipelineConfig


class MeshStrategy(ModelParallelStrategy):
    """Lay a plain model out over the mesh {dp, ep}; ZeRO-0/1 synced by our all-reduce, ZeRO-2/3 by FSDP2."""

    def __init__(self, name: str = "single", mesh=None, bucket_size_mb: float = 25.0, zero_stage: int = 0,
                 reduce_dtype: str = "float32", activation_checkpointing: str = "none", timeout_s: float = 600.0,
                 process_group_backend: str | None = None, shard_optimizer: bool | None = None,
                 sequence_parallel: bool = True, pipeline=None):
        super().__init__(process_group_backend=process_group_backend, timeout=timedelta(seconds=timeout_s))
        if shard_optimizer is not None:  # validate.py says the same before anything starts
            raise ValueError("strategy.shard_optimizer was removed: use strategy.zero_stage=1")
        self.name = name
        self.sequence_parallel = sequence_parallel
        self.mesh_degrees = dict(mesh or {"dp": 1, "ep": 1})
        self.bucket_size_mb, self.zero_stage, self.reduce_dtype = bucket_size_mb, zero_stage, reduce_dtype
        self.activation_checkpointing = activation_checkpointing
        self.dims: ParallelDims | None = None
        self.mesh = None  # DeviceMesh, built in setup_environment when world_size > 1
        self.grad_sync = None
        self.reduction_groups = None  # [(params, process group, scale, name)] from the layout; [] under FSDP
        self.zero = None  # OptimizerStateSharding at ZeRO-1
        self.pipeline_cfg = PipelineConfig(**(pipeline or {}))  # strategy.pipeline: used when mesh pp > 1
        self.pipeline: Pipeline | None = None  # the task's training/validation step delegates to it when set
        self._sync_blocked = False

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def distributed_sampler_kwargs(self) -> dict:
        # Every (dp, ep) coordinate reads its own slice of the global batch; its tp ranks share it.
        if self.dims is None:
            return {"num_replicas": self.world_size, "rank": self.global_rank}
        return {"num_replicas": self.dims.data_ranks, "rank": self.dims.data_rank(self.global_rank)}

    def setup_environment(self) -> None:
        Strategy.setup_environment(self)
        self.dims = ParallelDims(world_size=self.world_size, **self.mesh_degrees)  # pp outermost: rank % data_ranks
        if self.world_size > 1:
            self._setup_distributed()  # process group with our timeout
            self.mesh = build_mesh(self.dims, self.root_device.type)

    def setup(self, trainer) -> None:
        self.accelerator.setup(trainer)
        module = self.lightning_module
        precision = getattr(self.precision_plugin, "precision", "32-true")
        mp_policy = mixed_precision_policy(precision, self.reduce_dtype)
        self.reduction_groups = apply_layout(
            module.model, self.dims, self.mesh, module.seed, self.root_device, zero_stage=self.zero_stage,
            activation_checkpointing=self.activation_checkpointing, mp_policy=mp_policy,
            sequence_parallel=self.sequence_parallel, pipeline=self.pipeline_cfg)
        if self.dims.tp > 1:
            module.cross_entropy = parallel_cross_entropy  # on vocab-sharded logits
        if self.reduction_groups:
            self.grad_sync = GradientSync(self.reduction_groups, self.bucket_size_mb, first_bucket_mb=EDGE_BUCKET_MB,
                                          last_bucket_mb=EDGE_BUCKET_MB)
        if self.dims.pp > 1:
            c = self.pipeline_cfg
            fsdp = self.reduction_groups == []  # the layout sharded the blocks with FSDP2 (ZeRO-2/3)
            self.pipeline = Pipeline(module.model, self.dims, self.mesh, self.root_device, c.schedule, c.microbatches,
                                     c.stages_per_rank, c.split_points,
                                     no_sync=self.grad_sync.no_sync if self.grad_sync else _nothing,
                                     accumulate=trainer.accumulate_grad_batches,
                                     shard_stage=partial(shard_stage_root, mesh=self.mesh, zero_stage=self.zero_stage,
                                                         mp_policy=mp_policy) if fsdp else None,
                                     sequence_parallel=self.sequence_parallel)
        if self.global_rank == 0:
            rank_zero_info(f"[paratrain] layout: {self.describe()}")
        self.model = self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        self.barrier()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()

    def setup_optimizers(self, trainer) -> None:
        super().setup_optimizers(trainer)
        if self.zero_stage == 1 and self.reduction_groups:
            self.zero = OptimizerStateSharding(self.reduction_groups)
            for optimizer in self.optimizers:
                self.zero.shard(optimizer)

    def optimizer_step(self, optimizer, closure, model=None, **kwargs):
        output = super().optimizer_step(optimizer, closure, model, **kwargs)
        if self.zero is not None:
            self.zero.gather_params()  # owners send the parameters they just updated
        if self.pipeline is not None:
            # Lightning's own zero_grad ran before the gradients were released (see backward): the
            # next step's schedule must start from none.
            self.lightning_module.model.zero_grad(set_to_none=True)
        return output

    def describe(self) -> str:
        model = self.lightning_module.model
        moe = [m for m in model.moe_layers()]
        held = [p.to_local() if isinstance(p, DTensor) else p for p in model.parameters()]
        mib = sum(t.numel() * t.element_size() for t in held) / 2**20
        layout = describe_stage(self.dims.describe(moe[0].experts.num_experts if moe else None), self.zero_stage)
        return f"{layout}; {mib:.2f} MiB of parameters on rank 0"

    # --- gradient synchronisation -----------------------------------------------------------
    @contextmanager
    def block_backward_sync(self):
        """Gradient accumulation: micro-steps before the last keep their gradients local."""
        self._sync_blocked = True
        # Under pp the schedule reduce-scatters each pipeline step's FSDP gradients itself, and
        # Pipeline.release_grads sums the steps' shards: there is no root FSDP module to pause.
        fsdp = self.zero_stage >= 2 and self.world_size > 1 and self.pipeline is None
        try:
            if fsdp:  # FSDP2 keeps the unsharded gradients and reduce-scatters after the last micro-step
                self.lightning_module.model.set_requires_gradient_sync(False)
            with self.grad_sync.no_sync() if self.grad_sync else _nothing():
                yield
        finally:
            if fsdp:
                self.lightning_module.model.set_requires_gradient_sync(True)
            self._sync_blocked = False

    def backward(self, closure_loss, optimizer, *args, **kwargs):
        if self.pipeline is None:
            # The vocab-parallel loss's backward must run inside loss_parallel() as its forward did.
            with loss_parallel() if self.dims is not None and self.dims.tp > 1 else nullcontext():
                return super().backward(closure_loss, optimizer, *args, **kwargs)
        # The pipeline schedule already ran backward inside training_step; keep the hooks around it
        # (callbacks' on_before_backward, e.g. the NaN guard; post_backward finishes the gradient sync).
        self.pre_backward(closure_loss)
        closure_loss = self.precision_plugin.pre_backward(closure_loss, self.lightning_module)
        self.pipeline.release_grads()
        closure_loss = self.precision_plugin.post_backward(closure_loss, self.lightning_module)
        self.post_backward(closure_loss)
        return closure_loss

    def post_backward(self, closure_loss) -> None:
        # Before clipping and the optimizer step: they must see the synchronised gradients.
        if self.grad_sync is not None and not self._sync_blocked:
            self.grad_sync.finish()

    def clip_grad_norm_(self, model, max_norm: float) -> torch.Tensor:
        return clip_grad_norm_(model, max_norm, self.mesh)

    def reduce(self, tensor, group=None, reduce_op="mean"):
        if self.world_size == 1 or not isinstance(tensor, torch.Tensor):
            return tensor
        return super().reduce(tensor, group=group, reduce_op=reduce_op)

    # --- checkpoints: every rank saves and loads what it holds, keyed by parameter name and ---
    # global expert index (strategies/portable_state.py), so a checkpoint loads under any mesh.
    @property
    def lightning_restore_optimizer(self) -> bool:
        return False  # load_checkpoint fills the optimizers in place (each rank: the params it holds)

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True  # load into the laid-out model and the (possibly sharded) optimizer

    def lightning_module_state_dict(self):
        return portable_state.model_state(self.lightning_module)

    def load_model_state_dict(self, checkpoint, strict: bool = True) -> None:
        pass  # load_checkpoint has loaded the weights

    def optimizer_state(self, optimizer):
        index = next(i for i, o in enumerate(self.optimizers) if o is optimizer)
        return portable_state.optimizer_state(self.lightning_module, optimizer, index)

    def load_optimizer_state_dict(self, checkpoint) -> None:
        pass  # load_checkpoint has loaded the optimizer state

    def save_checkpoint(self, checkpoint_dict, filepath, storage_options=None) -> None:
        portable_state.save(filepath, checkpoint_dict)  # collective: every rank writes its shards

    def load_checkpoint(self, checkpoint_path, weights_only=None):
        path = self.broadcast(str(checkpoint_path))  # every rank reads the directory rank 0 chose
        return portable_state.load(path, self.lightning_module, self.optimizers)


@contextmanager
def _nothing():
    yield

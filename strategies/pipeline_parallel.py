"""Pipeline parallelism: split the plain model into stages, run them with torch.distributed.pipelining.

`apply_pipeline_split` (layout step 1, on the meta device) keeps only this pp rank's stages in the
model: the embedding on the first stage, final norm and head on the last, the blocks in between
divided evenly (or at `strategy.pipeline.split_points`). The kept blocks stay under their own
names (`layers.5...` stays `layers.5...`), so the optimizer, gradient sync and checkpoints see
parameter names as on any other layout, and a checkpoint reshards between pipelined and not.

`Pipeline` builds one manual `PipelineStage` per local stage and one of PyTorch's schedules:

    gpipe             ScheduleGPipe              all forwards, then all backwards
    1f1b              Schedule1F1B               one forward, one backward in steady state
    interleaved_1f1b  ScheduleInterleaved1F1B    stages_per_rank stages per rank, looped
    zero_bubble       ScheduleInterleavedZeroBubble (ZB1P): backward split into input and weight
                                                 gradients, weight gradients fill the bubble

Stage s lives on pp rank s % pp (the "loop" placement every schedule above uses).

Scaling: the schedule's loss of a micro-batch is its mean cross-entropy / (m x A), for m
micro-batches per step and A = trainer.accumulate_grad_batches steps per optimizer step, and
`scale_grads=False`: gradients only ever add up, so after A steps `.grad` holds the gradient of
the per-rank batch mean, whatever was in `.grad` before a step (the schedule's own scaling,
`scale_grads=True`, divides every `.grad` of its stages by m at the end of each step, earlier
accumulation steps' and FSDP's reduce-scattered shards included). MoE auxiliary losses never
reach the loss function (only the last stage has one), so each stage attaches its layers'
auxiliary loss to its output with `_AttachAux`: the output passes unchanged, and backward adds
d(aux)/d(params) / (m x A) on that stage, whichever stage it is.

ZeRO-2/3 (FSDP2): strategies/fsdp.py shards the blocks (layout step 7); each `StageModule` is then
its own FSDP root (the embedding, final norm and head it holds), as torchtitan shards each stage's
model part. The schedules see an `FSDPModule` stage: they keep gradients unreduced over the
micro-batches and reduce-scatter once, after the last one (`perform_reduce_grad`).

Tensor parallel inside a stage: activations cross stage boundaries as each tp rank's local tensor
(a slice of the sequence under sequence parallelism), sent between the ranks of one tp coordinate;
the last stage's vocab-sharded logits meet the loss under `loss_parallel`, forward and backward.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B,
                                          ScheduleInterleavedZeroBubble)
from torch.distributed.tensor.parallel import loss_parallel

from ..trainer.models.moe import MoE
from .mesh import ParallelDims, axis_group

SCHEDULES = {
    "gpipe": ScheduleGPipe,
    "1f1b": Schedule1F1B,
    "interleaved_1f1b": ScheduleInterleaved1F1B,
    "zero_bubble": ScheduleInterleavedZeroBubble,
}
MULTI_STAGE = ("interleaved_1f1b", "zero_bubble")
"""Schedules that run several stages per rank (the others take exactly one)."""


def stage_layers(n_layers: int, num_stages: int, split_points: Sequence[int] | None = None) -> list[range]:
    """The blocks of each stage: at the given first layers of stages 1.., or evenly (earlier stages
    get the remainder). `validate.py` checks split_points before anything runs."""
    if split_points:
        bounds = [0, *split_points, n_layers]
    else:
        size, extra = divmod(n_layers, num_stages)
        bounds = [0]
        for s in range(num_stages):
            bounds.append(bounds[-1] + size + (1 if s < extra else 0))
    return [range(bounds[s], bounds[s + 1]) for s in range(num_stages)]


def local_stages(pp_rank: int, pp: int, stages_per_rank: int) -> list[int]:
    """Global indices of the stages on `pp_rank`: loop placement, stage s on rank s % pp."""
    return [pp_rank + i * pp for i in range(stages_per_rank)]


def apply_pipeline_split(model: nn.Module, dims: ParallelDims, pp_rank: int, stages_per_rank: int = 1,
                         split_points: Sequence[int] | None = None) -> None:
    """Keep this rank's stages of `model` (in place; before materialising, on the meta device)."""
    num_stages = dims.pp * stages_per_rank
    mine = local_stages(pp_rank, dims.pp, stages_per_rank)
    ranges = stage_layers(model.n_layers, num_stages, split_points)
    kept = [i for s in mine for i in ranges[s]]
    model.layers = StageBlocks({str(i): model.layers[i] for i in kept})
    if 0 not in mine:
        model.tok_emb = None
    if num_stages - 1 not in mine:
        model.norm = model.head = None


class StageBlocks(nn.ModuleDict):
    """The blocks a pp rank keeps, keyed by their index in the whole model, so every parameter keeps
    its name ("layers.5.attn.wq.weight"). Iterates over, and indexes by position into, the kept
    blocks, as the ModuleList it replaces does for the layout steps after the split (tp, FSDP,
    activation checkpointing); a str key is a model-wide block index."""

    def __iter__(self):
        return iter(self.values())

    def __getitem__(self, key):
        return list(self.values())[key] if isinstance(key, int) else super().__getitem__(key)


class _AttachAux(torch.autograd.Function):
    """Identity on `x`; in backward, gradient `scale` for `aux`: adds scale x aux to the loss this stage feeds."""

    @staticmethod
    def forward(ctx, x, aux, scale):
        ctx.scale = scale
        return x  # the same tensor: no copy of the activation

    @staticmethod
    def backward(ctx, grad):
        return grad, torch.full((), ctx.scale, dtype=torch.float32, device=grad.device), None


class StageModule(nn.Module):
    """One stage of a split Transformer: [embedding] blocks [final norm, head], as the model composes them."""

    def __init__(self, model: nn.Module, layers: range, first: bool, last: bool, num_moe_layers: int, on_moe,
                 loss_scale: float = 1.0, seq_shards: int = 1):
        super().__init__()
        self.tok_emb = model.tok_emb if first else None
        self.rotary = model.rotary  # buffers only: shared by a rank's stages
        self.blocks = nn.ModuleList(model.layers[str(i)] for i in layers)
        self.norm, self.head = (model.norm, model.head) if last else (None, None)
        self.moe = [m for m in self.blocks.modules() if isinstance(m, MoE)]
        self.lb_weight, self.z_weight = model.lb_weight, model.z_weight
        self.num_moe_layers = num_moe_layers
        self.on_moe = on_moe  # records this micro-batch's MoE losses and statistics
        self.loss_scale = loss_scale  # 1 / (micro-batches x accumulation steps): see the module doc
        self.seq_shards = seq_shards  # sequence parallel: a boundary activation holds 1/tp of each sequence

    def forward(self, x):
        seq_len = x.shape[1] * (1 if self.tok_emb is not None else self.seq_shards)
        if self.tok_emb is not None:
            x = self.tok_emb(x)  # (B, T) -> (B, T, d), or (B, T/tp, d) under sequence parallel
        rope = self.rotary(seq_len, x.dtype)
        for block in self.blocks:
            x = block(x, rope)
        if self.moe:
            # This stage's share of Transformer.aux_loss (a mean over every MoE layer of the model).
            aux = sum(self.lb_weight * m.aux_losses["load_balancing"] + self.z_weight * m.aux_losses["z_loss"]
                      for m in self.moe) / self.num_moe_layers
            self.on_moe(self.moe, aux)
            if torch.is_grad_enabled():
                # _AttachAux's output is a view of x, and zero-bubble backward detaches stage outputs
                # in place, which a view refuses: without a head after it, pay one (B, T, d) copy.
                x = _AttachAux.apply(x, aux, self.loss_scale)
                if self.head is None:
                    x = x.clone()
        if self.head is not None:
            x = self.head(self.norm(x))  # (B, T, V)
        return x


class Pipeline:
    """This rank's stages and the schedule that runs them; one `train_step` is one optimizer step's
    forward and backward over every micro-batch."""

    def __init__(self, model: nn.Module, dims: ParallelDims, mesh, device: torch.device, schedule: str = "1f1b",
                 microbatches: int | None = None, stages_per_rank: int = 1, split_points=None,
                 no_sync: Callable = nullcontext, accumulate: int = 1, shard_stage: Callable | None = None,
                 sequence_parallel: bool = True):
        """`accumulate`: pipeline steps per optimizer step (trainer.accumulate_grad_batches);
        `shard_stage`: FSDP's root step for each stage module (ZeRO-2/3, fsdp.shard_stage_root)."""
        self.group = axis_group(mesh, "pp")
        self.pp, self.pp_rank = dims.pp, dist.get_rank(self.group)
        self.last_rank = dist.get_global_rank(self.group, self.pp - 1)
        self.microbatches = microbatches or 2 * dims.pp
        self.no_sync = no_sync
        self.loss_scale = 1.0 / (self.microbatches * accumulate)
        self.tp = dims.tp
        self._ce: list[torch.Tensor] = []  # each micro-batch's cross-entropy, unscaled
        num_stages = dims.pp * stages_per_rank
        ranges = stage_layers(model.n_layers, num_stages, split_points)
        num_moe = _count_moe_layers(model.cfg)
        self.mine = local_stages(self.pp_rank, dims.pp, stages_per_rank)
        seq_shards = dims.tp if sequence_parallel else 1
        self.modules = [StageModule(model, ranges[s], s == 0, s == num_stages - 1, num_moe, self._record,
                                    self.loss_scale, seq_shards) for s in self.mine]
        for m in self.modules if shard_stage is not None else ():
            shard_stage(m)  # before PipelineStage: the schedules treat an FSDPModule stage as such
        self.stages = [PipelineStage(m, s, num_stages, device, group=self.group) for m, s in zip(self.modules, self.mine)]
        self.has_first, self.has_last = 0 in self.mine, num_stages - 1 in self.mine
        cls = SCHEDULES[schedule]
        target = self.stages if schedule in MULTI_STAGE else self.stages[0]
        self.schedule = cls(target, n_microbatches=self.microbatches, loss_fn=self._loss, scale_grads=False)
        self._held: list = []  # (param, grad) between train_step and the strategy's backward
        self._forwards: dict[int, list] = {}  # per stage: (aux, [(MoE, aux losses, stats, a2a bytes)]) per forward

    def _loss(self, logits, targets) -> torch.Tensor:
        """A micro-batch's share of the optimizer step's loss (see the module doc for the scaling)."""
        # Under tp the logits are vocab-sharded (DTensor) and the caller's loss_parallel() is active:
        # not tensor_parallel.parallel_cross_entropy, whose own context would end it on exit (it
        # does not nest), before the schedule's backward.
        ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())  # (B*T, V), (B*T,)
        ce = ce.to_local() if self.tp > 1 else ce
        self._ce.append(ce.detach())
        return ce * self.loss_scale

    def _loss_context(self):
        # The vocab-parallel loss's backward runs inside the schedule, and must see loss_parallel as its forward did.
        return loss_parallel() if self.tp > 1 else nullcontext()

    def _record(self, layers, aux) -> None:
        if torch.is_grad_enabled():  # training: not validation
            self._forwards.setdefault(id(layers), []).append((aux.detach(), [
                (m, {k: v.detach() for k, v in m.aux_losses.items()}, {k: v.detach() for k, v in m.stats.items()},
                 getattr(m.dispatcher, "last_a2a_bytes", 0)) for m in layers]))

    def _publish_moe(self) -> torch.Tensor | None:
        """Leave on each local MoE layer the step's statistics as one forward of the whole per-rank
        batch would (means over micro-batches, token counts and all-to-all bytes summed); return
        this rank's share of the auxiliary loss, a mean over micro-batches."""
        aux = None
        for forwards in self._forwards.values():
            # The first step's metadata inference runs an extra forward (on placeholder inputs)
            # before the real ones: the micro-batches are the last ones.
            forwards = forwards[-self.microbatches:]
            stage_aux = torch.stack([a for a, _ in forwards]).mean()
            aux = stage_aux if aux is None else aux + stage_aux
            for i, m in enumerate(m for m, *_ in forwards[0][1]):
                layer = [f[1][i] for f in forwards]
                m.aux_losses = {k: torch.stack([l[1][k] for l in layer]).mean() for k in layer[0][1]}
                m.stats = {k: torch.stack([l[2][k] for l in layer]).sum(0) if k == "tokens_per_expert"
                           else torch.stack([l[2][k] for l in layer]).mean() for k in layer[0][2]}
                if hasattr(m.dispatcher, "last_a2a_bytes"):
                    m.dispatcher.last_a2a_bytes = sum(l[3] for l in layer)
        self._forwards.clear()
        return aux

    def train_step(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward of every micro-batch; gradients left in `.grad` (not yet synced).

        Returns (cross-entropy, this rank's share of the auxiliary loss), means over micro-batches;
        the cross-entropy is 0 except on the rank that holds the last stage."""
        inputs, targets = batch
        self._ce = []
        # Earlier accumulation steps' gradients wait aside: after a switch from eval, the schedule re-runs
        # its metadata inference, whose clean-up sets every .grad of an FSDP stage to None.
        self._hold_grads()
        with self.no_sync(), self._loss_context():  # gradients accumulate over micro-batches; synced once, after
            self.schedule.step(*((inputs,) if self.has_first else ()), target=targets if self.has_last else None)
        # Lightning zeroes gradients between training_step and backward (its closure), but the schedule
        # has already run backward: hold the gradients aside until the strategy's backward asks for them.
        self._hold_grads()
        aux = self._publish_moe()
        zero = torch.zeros((), device=inputs.device)
        ce = torch.stack(self._ce[-self.microbatches:]).mean() if self.has_last else zero
        return ce, (aux if aux is not None else zero)

    def _hold_grads(self) -> None:
        for m in self.modules:
            for p in m.parameters():
                if p.grad is not None:
                    self._held.append((p, p.grad))
                    p.grad = None

    def release_grads(self) -> None:
        """Put back the gradients `train_step` held aside (after Lightning zeroed the others), summed."""
        for p, grad in self._held:
            p.grad = grad if p.grad is None else p.grad + grad
        self._held = []

    def eval_loss(self, batch) -> torch.Tensor:
        """Mean cross-entropy of a batch, forward only; the same value on every stage (one broadcast)."""
        inputs, targets = batch
        self._ce = []
        self._hold_grads()  # validation inside an accumulation: the schedule's clean-up (see train_step)
        with self._loss_context():
            self.schedule.eval(*((inputs,) if self.has_first else ()), target=targets if self.has_last else None)
        self.release_grads()
        ce = torch.stack(self._ce[-self.microbatches:]).mean().float() if self.has_last else torch.zeros((), device=inputs.device)
        dist.broadcast(ce, src=self.last_rank, group=self.group)
        return ce


def _count_moe_layers(cfg) -> int:
    moe = cfg.moe
    if moe is None:
        return 0
    return sum(1 for i in range(cfg.n_layers) if (i + 1) % moe.every_n_layers == 0)

"""Gradient synchronisation: bucketed all-reduces launched from inside backward, one per group.

We do not wrap the model in DDP: DDP reduces every gradient over one process group, and an MoE
layout needs two (dense parameters over the world, expert shards over their dp group). This is
the same idea with the groups made explicit.

Scaling rule (what strategies pass as `scale`)
----------------------------------------------
Each rank's loss is the mean over its 1/world_size share of the global batch. The optimizer must
see the single-process gradient of the global-batch mean, i.e. (1/W) * (sum over all W ranks of
the gradient of their loss). So every gradient is SUM-reduced over its replica group and
multiplied by 1/W:

- dense parameters: replicated on every rank -> replica group = world, scale = 1/W.
- expert parameters: an expert shard lives on the ranks of one dp group. Tokens from every ep rank
  reach it by all-to-all, and the backward of that all-to-all already delivers, on this rank, the
  contributions of the losses of all ep ranks. Summing over the dp group therefore covers every
  rank's loss exactly once: replica group = dp group, scale = 1/W as well (NOT 1/dp, which gives
  ep-times too large expert gradients; public frameworks shipped that bug).

`reduction_groups_for` encodes this rule for a mesh.

How a step runs
---------------
Parameters of each group are packed into flat buckets of about `bucket_size_mb`, in reverse
registration order (a fair guess at the order backward produces gradients). The first bucket of a
group may be smaller (`first_bucket_mb`, EDGE_BUCKET_MB = 1 MiB from MeshStrategy, as torch DDP does): with one
25 MiB bucket a small model's only all-reduce would start after the whole backward, overlapping
nothing. So may the last (`last_bucket_mb`, 1 MiB from MeshStrategy; torch DDP has no such
bound): its all-reduce starts with the last gradient (the embedding's), nothing is left to
overlap it, and finish() waits for all of it; the bucket before it starts a block earlier. A
post-accumulate-grad hook on every parameter copies its gradient, scaled, into its bucket; when a
bucket is complete its all-reduce starts at once (async) and overlaps the rest of backward.
`finish()` (before clipping and the optimizer step) starts whatever is left, waits, and points
each `param.grad` at its slice of the reduced buffer.

Every rank must issue the same collectives in the same order on a process group, whatever its
data. Two rules keep that true when routing leaves a parameter without a gradient on some ranks:
buckets of one process group start strictly in their fixed order (a complete bucket waits for an
incomplete earlier one), and `finish()` starts every bucket that has not started, with zeros for
the missing gradients. Each bucket carries one extra element per parameter, 1 if this rank had a
gradient for it: after the all-reduce a parameter that no rank touched keeps `grad = None`, as in
the single-process run (an optimizer then skips it instead of decaying it).

Gradient accumulation: inside `no_sync()` the hooks do nothing and gradients accumulate in
`param.grad` as usual; the backward of the last micro-step runs synced, and the hooks then see the
accumulated gradient. A parameter the last micro-step did not touch but an earlier one did is
picked up by `finish()` from its `.grad`.

Memory and copies: the buffers hold a second copy of every gradient (as DDP does by default). After
`finish()`, `param.grad` IS a view of the buffer, so nothing is copied back; if the optimizer's
`zero_grad(set_to_none=False)` keeps those views, backward accumulates straight into the buffer
and the copy into it becomes an in-place scale.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from torch.distributed.tensor import DTensor

from paratrain.strategies.mesh import axis_size, data_group, dp_group, expert_replica_group, world_group
from paratrain.trainer.errors import ConfigError

EDGE_BUCKET_MB = 1.0
"""MeshStrategy's bound on the first and the last bucket of a group (see "How a step runs")."""


class ReductionGroup(NamedTuple):
    """Parameters whose gradients are SUM-reduced over `group`, then multiplied by `scale`."""

    params: Sequence[torch.nn.Parameter]
    group: Optional[dist.ProcessGroup]
    """None = the default (world) group, or no communication at all without a process group."""
    scale: float
    name: str = "params"


def reduction_groups_for(
    params: Iterable[torch.nn.Parameter],
    expert_params: Iterable[torch.nn.Parameter],
    mesh: DeviceMesh,
    tp_partial: Iterable[torch.nn.Parameter] = (),
) -> List[ReductionGroup]:
    """The reduction groups of a model laid out on `mesh` (see the scaling rule above).

    `params`: every parameter of the model in registration order (`model.parameters()`);
    `expert_params`: the subset that are local expert shards; `tp_partial`: under tp, the parameters
    whose gradient on a tp rank is a partial sum (tensor_parallel.tp_partial_params). Frozen
    parameters are skipped.
    """
    params = [p for p in params if p.requires_grad]
    expert_ids = {id(p) for p in expert_params}
    unknown = expert_ids - {id(p) for p in params}
    if unknown:
        raise ValueError(f"{len(unknown)} expert parameter(s) are not trainable model parameters")
    if axis_size(mesh, "tp") > 1:
        return _tensor_parallel_groups(params, expert_ids, {id(p) for p in tp_partial}, mesh)
    scale = 1.0 / mesh.size()
    if axis_size(mesh, "ep") == 1:
        # Experts are replicated like everything else: one group keeps the model's backward order.
        return [ReductionGroup(params, world_group(mesh), scale, "all")]
    dense = [p for p in params if id(p) not in expert_ids]
    experts = [p for p in params if id(p) in expert_ids]
    groups = [
        ReductionGroup(dense, world_group(mesh), scale, "dense"),
        ReductionGroup(experts, dp_group(mesh), scale, "expert"),
    ]
    return [g for g in groups if g.params]


def _tensor_parallel_groups(params, expert_ids, partial_ids, mesh) -> List[ReductionGroup]:
    """Under tp (strategies/tensor_parallel.py): the tp ranks of a data rank share its loss, so the
    scale is 1/(dp x ep). Parameters whose tp ranks each hold the whole gradient of their piece
    (tp slices; replicas fed every token) are summed over the data ranks; replicas fed 1/tp of the
    tokens (`partial`) over the data ranks and tp; experts over the ranks holding the same shard."""
    scale = axis_size(mesh, "tp") / mesh.size()
    whole = [p for p in params if id(p) not in partial_ids]
    partial = [p for p in params if id(p) in partial_ids and id(p) not in expert_ids]
    experts = [p for p in params if id(p) in expert_ids]
    if axis_size(mesh, "ep") == 1:
        partial, experts = partial + experts, []  # experts' replicas are the whole world too
    groups = [
        ReductionGroup(whole, data_group(mesh), scale, "tp-whole"),
        ReductionGroup(partial, world_group(mesh), scale, "tp-partial"),
        ReductionGroup(experts, expert_replica_group(mesh), scale, "expert"),
    ]
    return [g for g in groups if g.params]


def _local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds: a DTensor's local slice (or partial sum), else itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def _local_grad(p: torch.nn.Parameter) -> torch.Tensor:
    """p.grad as this rank's piece of p. DTensor may hand back a Replicate gradient for a sharded
    parameter (the embedding's): take this rank's slice of it (no communication). A Partial one
    stays partial: the bucket's all-reduce sums it (see _tensor_parallel_groups)."""
    g = p.grad
    if isinstance(g, DTensor) and g.placements != p.placements and not any(pl.is_partial() for pl in g.placements):
        g = g.redistribute(placements=p.placements)
    return _local(g)


def _as_grad(p: torch.nn.Parameter, view: torch.Tensor) -> torch.Tensor:
    """The reduced local gradient in `p`'s form: a DTensor with p's placements for a DTensor p."""
    if isinstance(p, DTensor):
        return DTensor.from_local(view, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())
    return view


class _Bucket:
    """A flat buffer `[grad of params[0], ..., grad of params[-1], one flag per param]`."""

    def __init__(self, index: int, params: List[torch.nn.Parameter], group, group_size, scale):
        self.index = index
        self.params = params
        self.group = group
        self.group_size = group_size
        self.scale = scale
        local = [_local(p) for p in params]
        numel = sum(t.numel() for t in local)
        self.buffer = torch.zeros(numel + len(params), dtype=params[0].dtype, device=params[0].device)
        self.views: List[torch.Tensor] = []
        offset = 0
        for t in local:
            self.views.append(self.buffer[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
        self.flags = self.buffer[numel:]
        """After the all-reduce: how many ranks had a gradient for each param (> 0 = any)."""
        self.reset()

    def reset(self) -> None:
        self.has_grad = [False] * len(self.params)
        self.pending = len(self.params)
        self.handle: Optional[dist.Work] = None
        self.launched = False

    @property
    def nbytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()


class _Chain:
    """The buckets of one process group, in the one order every rank launches them."""

    def __init__(self) -> None:
        self.buckets: List[_Bucket] = []
        self.next = 0


def _pack(params: Sequence[torch.nn.Parameter], bucket_bytes: int, first_bytes: Optional[int] = None,
          last_bytes: Optional[int] = None) -> Iterator[List[torch.nn.Parameter]]:
    """Consecutive runs of params (in the order backward produces their gradients) of at most
    bucket_bytes (a bigger param gets its own bucket); the first run at most `first_bytes`, so that
    its all-reduce starts early in backward, and the last at most `last_bytes`, because nothing is
    left to overlap the last all-reduce: finish() waits for all of it."""
    params = list(params)
    tail: List[torch.nn.Parameter] = []
    if last_bytes:
        last_bytes, size = min(last_bytes, bucket_bytes), 0
        while params and (not tail or (size + _nbytes(params[-1]) <= last_bytes and _same_kind(params[-1], tail[0]))):
            size += _nbytes(params[-1])
            tail.insert(0, params.pop())
    bucket: List[torch.nn.Parameter] = []
    size = 0
    limit = min(bucket_bytes, first_bytes or bucket_bytes)
    for p in params:
        if bucket and (size + _nbytes(p) > limit or not _same_kind(p, bucket[0])):
            yield bucket
            bucket, size, limit = [], 0, bucket_bytes
        bucket.append(p)
        size += _nbytes(p)
    if bucket:
        yield bucket
    if tail:
        yield tail


def _nbytes(p: torch.Tensor) -> int:
    return p.numel() * p.element_size()


def _same_kind(p: torch.Tensor, q: torch.Tensor) -> bool:
    """One bucket is one flat buffer: one dtype, one device."""
    return (p.dtype, p.device) == (q.dtype, q.device)


def _scaled_copy(src: torch.Tensor, dst: torch.Tensor, scale: float) -> None:
    if scale == 1.0:
        if src.data_ptr() != dst.data_ptr():
            dst.copy_(src)
    else:
        torch.mul(src, scale, out=dst)  # one pass; in place when src already is dst


class GradientSync:
    """Bucketed, backward-overlapped gradient all-reduce over one or more process groups.

    Use: build once after the model is laid out; call `finish()` after the backward of every
    optimizer step (before clipping); wrap the backward of accumulation micro-steps in `no_sync()`.
    Between optimizer steps the gradients must be zeroed or set to None, as optimizers do.
    """

    def __init__(
        self,
        groups: Sequence[ReductionGroup | Tuple],
        bucket_size_mb: float = 25.0,
        record_events: bool = False,
        first_bucket_mb: Optional[float] = None,
        last_bucket_mb: Optional[float] = None,
    ) -> None:
        if not isinstance(bucket_size_mb, (int, float)) or not bucket_size_mb > 0:
            raise ConfigError(
                f"strategy.bucket_size_mb={bucket_size_mb!r} is not a valid bucket size: gradients "
                f"are all-reduced in buckets of a positive number of MiB. Set it to a value > 0 "
                f"(25 is a good default; smaller buckets overlap more but launch more all-reduces)."
            )
        self.enabled = True
        """False = hooks do nothing and finish() is a no-op: gradients accumulate locally."""
        self.record_events = record_events
        self.events: List[Tuple] = []
        """When record_events: ("grad_ready", bucket, slot), ("allreduce", bucket), ("finish",) of
        the current or last synced step, in the order they happened."""
        self.num_allreduce_calls = 0
        """All-reduces issued in the last finished step (a bucket over one rank issues none)."""
        self.allreduce_bytes = 0
        """Bytes all-reduced in the last finished step."""

        self.buckets: List[_Bucket] = []
        self._chains: dict = {}
        self._hooks = []
        self._launched: List[_Bucket] = []
        self._step_open = False
        self._calls = 0
        self._bytes = 0

        bucket_bytes = int(bucket_size_mb * 2**20)
        first_bytes = int(first_bucket_mb * 2**20) if first_bucket_mb else None
        last_bytes = int(last_bucket_mb * 2**20) if last_bucket_mb else None
        seen = set()
        for spec in groups:
            params, group, scale, *rest = spec
            params = list(params)
            for p in params:
                if id(p) in seen:
                    raise ValueError("a parameter is listed in two reduction groups")
                if not p.requires_grad:
                    raise ValueError("a frozen parameter (requires_grad=False) was given to sync")
                seen.add(id(p))
            if dist.is_initialized():
                group = group if group is not None else dist.group.WORLD
                group_size = dist.get_world_size(group)
            else:
                group_size = 1
            chain = self._chains.setdefault(group, _Chain())
            for bucket_params in _pack(params[::-1], bucket_bytes, first_bytes, last_bytes):
                bucket = _Bucket(len(self.buckets), bucket_params, group, group_size, float(scale))
                self.buckets.append(bucket)
                chain.buckets.append(bucket)
                for slot, p in enumerate(bucket_params):
                    hook = self._make_hook(bucket, chain, slot)
                    self._hooks.append(p.register_post_accumulate_grad_hook(hook))

    @property
    def num_buckets(self) -> int:
        return len(self.buckets)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Skip the sync for the backward passes inside (gradient-accumulation micro-steps)."""
        previous, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = previous

    def _make_hook(self, bucket: _Bucket, chain: _Chain, slot: int):
        def on_grad_accumulated(param: torch.nn.Parameter) -> None:
            if not self.enabled:
                return
            if bucket.launched or bucket.has_grad[slot]:
                raise RuntimeError(
                    "a gradient was accumulated twice in one synchronised step: run every backward "
                    "but the last of an optimizer step inside GradientSync.no_sync(), and call "
                    "finish() after the last one"
                )
            self._open_step()
            with torch.no_grad():
                _scaled_copy(_local_grad(param), bucket.views[slot], bucket.scale)
            bucket.has_grad[slot] = True
            bucket.pending -= 1
            if self.record_events:
                self.events.append(("grad_ready", bucket.index, slot))
            if bucket.pending == 0:
                self._launch_ready(chain)

        return on_grad_accumulated

    def _open_step(self) -> None:
        if not self._step_open:
            self._step_open = True
            self.events.clear()
            self._calls = self._bytes = 0

    def _launch_ready(self, chain: _Chain) -> None:
        # Strictly in chain order: a rank whose routing left an earlier bucket incomplete must
        # not start a later one first, or the ranks' collectives would pair up wrongly.
        while chain.next < len(chain.buckets) and chain.buckets[chain.next].pending == 0:
            self._launch(chain.buckets[chain.next])
            chain.next += 1

    def _launch(self, bucket: _Bucket) -> None:
        if all(bucket.has_grad):
            bucket.flags.fill_(1)
        else:
            bucket.flags.copy_(torch.tensor(bucket.has_grad, dtype=bucket.flags.dtype))
        if bucket.group_size > 1:
            bucket.handle = dist.all_reduce(
                bucket.buffer, op=dist.ReduceOp.SUM, group=bucket.group, async_op=True
            )
            self._calls += 1
            self._bytes += bucket.nbytes
            if self.record_events:
                self.events.append(("allreduce", bucket.index))
        bucket.launched = True
        self._launched.append(bucket)

    def _fill_missing(self, bucket: _Bucket) -> None:
        """Gradients the last backward did not produce: an earlier micro-step's, or zeros."""
        with torch.no_grad():
            for slot, p in enumerate(bucket.params):
                if bucket.has_grad[slot]:
                    continue
                if p.grad is not None:
                    _scaled_copy(_local_grad(p), bucket.views[slot], bucket.scale)
                    bucket.has_grad[slot] = True
                else:
                    bucket.views[slot].zero_()
        bucket.pending = 0

    def finish(self) -> None:
        """Complete the sync of this optimizer step; afterwards every `.grad` is reduced and scaled.

        A no-op while syncing is disabled (`no_sync()`), so a strategy can call it after every
        backward. Blocks until this rank's all-reduces are done.
        """
        if not self._step_open and not self.enabled:
            return
        self._open_step()
        for chain in self._chains.values():
            while chain.next < len(chain.buckets):
                self._fill_missing(chain.buckets[chain.next])
                self._launch_ready(chain)
        for bucket in self._launched:
            if bucket.handle is not None:
                bucket.handle.wait()
        for bucket in self.buckets:
            # One device-to-host read per bucket (not per parameter).
            any_rank_had_grad = (bucket.flags > 0).tolist()
            for p, view, present in zip(bucket.params, bucket.views, any_rank_had_grad):
                p.grad = _as_grad(p, view) if present else None
            bucket.reset()
        for chain in self._chains.values():
            chain.next = 0
        self._launched.clear()
        if self.record_events:
            self.events.append(("finish",))
        self.num_allreduce_calls, self.allreduce_bytes = self._calls, self._bytes
        self._step_open = False

    def remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

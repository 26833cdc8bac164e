"""ZeRO-1: shard optimizer state over each parameter's replica group; what each rank holds, in bytes.

The stages (strategy.zero_stage): 0 = replicated, gradients all-reduced (grad_sync.py); 1 = this
file; 2 and 3 = FSDP2 (fsdp.py), which shards gradients and optimizer state, and at 3 parameters.

Gradients are still all-reduced (strategies/grad_sync.py), so every rank holds every reduced
gradient and the global clip norm needs nothing new. Each reduction group (dense parameters over
the world, expert shards over their dp group) splits its parameters between its ranks, whole
parameters, largest first to the least-loaded rank; a rank's optimizer then holds state only for
the parameters it owns (AdamW: 2 fp32 tensors per parameter, so state bytes fall by about the group
size). After the optimizer step each owner broadcasts its updated parameters to its group.

Under tp a parameter is what this rank holds of it: a DTensor's local piece. The ranks of every
reduction group hold the same piece (tp slices are reduced over the data ranks of one tp
coordinate, strategies/grad_sync.py), so the plan splits local pieces and an owner broadcasts its
pieces; each tp slice's data group partitions its own.
"""

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor


def partition(params: list[nn.Parameter], num_ranks: int) -> list[list[nn.Parameter]]:
    """Greedy balanced split by size; deterministic, so every rank computes the same plan."""
    sizes = [local_numel(p) for p in params]
    order = sorted(range(len(params)), key=lambda i: (-sizes[i], i))
    shares: list[list[int]] = [[] for _ in range(num_ranks)]
    loads = [0] * num_ranks
    for i in order:
        r = min(range(num_ranks), key=lambda r: (loads[r], r))
        shares[r].append(i)
        loads[r] += sizes[i]
    return [[params[i] for i in sorted(share)] for share in shares]


class OptimizerStateSharding:
    def __init__(self, groups):
        """groups: the gradient-sync reduction groups, (params, process group, ...) each."""
        self.plan = []  # (process group, [(global rank of owner, params)])
        self.owned: set[int] = set()
        for params, group, *_ in groups:
            size, me = dist.get_world_size(group), dist.get_rank(group)
            shares = partition(list(params), size)
            self.plan.append((group, [(dist.get_global_rank(group, r), share) for r, share in enumerate(shares)]))
            self.owned |= {id(p) for p in shares[me]}

    def shard(self, optimizer: torch.optim.Optimizer) -> None:
        """Keep only owned parameters in the optimizer (before it has any state)."""
        assert not optimizer.state, "shard the optimizer before its first step"
        for param_group in optimizer.param_groups:
            param_group["params"] = [p for p in param_group["params"] if id(p) in self.owned]

    @torch.no_grad()
    def gather_params(self) -> None:
        """Every owner sends its updated parameters to its group: one broadcast per owner, flat.

        Also drops the gradients of parameters this rank does not own: no optimizer here zeroes
        them, and a stale gradient would be accumulated into the next step's."""
        for group, owners in self.plan:
            for src, params in owners:
                if src != dist.get_rank():
                    for p in params:
                        p.grad = None
                if not params:
                    continue
                local = [_local(p) for p in params]
                flat = torch.cat([t.reshape(-1) for t in local]) if dist.get_rank() == src \
                    else torch.empty(sum(t.numel() for t in local), dtype=local[0].dtype, device=local[0].device)
                dist.broadcast(flat, src=src, group=group)
                if dist.get_rank() != src:
                    for t, chunk in zip(local, flat.split([t.numel() for t in local])):
                        t.copy_(chunk.view_as(t))


def describe_stage(layout: str, zero_stage: int) -> str:
    """"dp=2 x ep=2 over 4 processes; 4 experts per rank" -> "...over 4 processes; ZeRO-3; 4 experts per rank"."""
    if not zero_stage:
        return layout
    head, sep, tail = layout.partition("; ")
    return f"{head}; ZeRO-{zero_stage}{sep}{tail}"


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def local_numel(t: torch.Tensor) -> int:
    """Elements this rank holds of `t` (a DTensor's `numel()` is the global one)."""
    return _local(t).numel()


@torch.no_grad()
def held_bytes(tensors) -> int:
    """Bytes of the storage behind `tensors` on this rank, each storage counted once.

    A DTensor counts its local shard's storage (FSDP2: the padded shard); gradients that are views
    of one bucket (grad_sync.py) or of one reduce-scatter output (FSDP2) count that buffer once."""
    seen, total = set(), 0
    for t in tensors:
        if t is None or not torch.is_tensor(t):
            continue
        storage = _local(t).untyped_storage()
        if storage.data_ptr() not in seen and storage.nbytes():
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's tensors held on this rank (DTensor state: its local shard)."""
    return held_bytes(t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t) and t.ndim > 0)


def grad_bytes(module: nn.Module) -> int:
    """Bytes of the gradients this rank holds (measure after the sync, before the optimizer zeroes them)."""
    return held_bytes(p.grad for p in module.parameters())


def rank_memory(module: nn.Module, optimizers, grads: int | None = None) -> dict[str, int]:
    """Per-rank bytes of parameters, gradients and optimizer state, measured from the tensors held."""
    return {"param_bytes": held_bytes(module.parameters()),
            "grad_bytes": grad_bytes(module) if grads is None else grads,
            "optimizer_state_bytes": sum(optimizer_state_bytes(o) for o in optimizers)}

"""Expert-parallel token dispatch: send each kept (token, slot) pair to the rank holding its expert.

`AllToAllTokenDispatcher` is the `TokenDispatcher` an expert-parallel strategy installs on every
MoE layer after sharding its experts with `keep_experts`. Rank r of the ep group holds global
experts [r * E/ep, (r + 1) * E/ep), so rows sorted by global expert are also sorted by destination
rank, and one `permute_by_expert` serves both purposes. One forward:

    permute by global expert            x (N, d) -> x_sorted (M, d), counts (E,)
    exchange counts (all-to-all)        counts (E,) -> recv_counts (ep, E_local)   [host sync]
    dispatch (all-to-all, uneven)       x_sorted -> x_recv (R, d), by source rank then expert
    regroup by local expert             x_recv -> x_local (R, d)
    local grouped experts               x_local -> y_local
    undo regroup, combine (all-to-all)  y_local -> y_recv -> y_sorted (M, d)
    un-permute, weight and sum          y_sorted -> y (N, d)

Every rank issues the same three collectives per forward (and two in backward) whatever its
routing: a rank that sends or receives nothing still joins with zero-size splits, so routing can
never make the ranks' collectives pair up wrongly or hang.

Gradients: the data all-to-alls are differentiable (their backward is the reverse all-to-all), so
on every rank the expert weights receive the gradient contributions of the losses of ALL ep ranks
whose tokens they processed. That is what `grad_sync.reduction_groups_for` relies on when it
reduces expert gradients over the dp group only, with the same 1/world scale as dense ones.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed._functional_collectives import all_to_all_single_autograd

from ..trainer.moe import (
    GroupedExperts,
    TokenDispatcher,
    permute_by_expert,
    unpermute,
    unpermute_and_combine,
)

__all__ = ["AllToAllTokenDispatcher"]


def _all_to_all(x: Tensor, out_splits: List[int], in_splits: List[int], group) -> Tensor:
    """Differentiable uneven all-to-all of rows; backward sends the gradients back the same way.

    Zero-size splits (and an empty x) are fine: the rank still takes part in the collective.
    """
    # The functional collective returns a tensor that waits for the communication on first use.
    return all_to_all_single_autograd(x.contiguous(), out_splits, in_splits, group)


class AllToAllTokenDispatcher(TokenDispatcher):
    """Dispatch to experts sharded over `group` (the ep group) and combine the results.

    `group`: the process group whose ranks hold the different expert shards of every MoE layer,
    in rank order (mesh.ep_group). After each call, `last_a2a_bytes` = bytes this rank sent to
    other ranks in that forward, dispatch plus combine (rows that stay on this rank excluded);
    the backward sends the same amount again.
    """

    def __init__(self, group: Optional[dist.ProcessGroup]):
        self.group = group
        self.ep = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.last_a2a_bytes = 0

    def _check(self, experts: GroupedExperts) -> int:
        e_local = experts.num_local_experts
        if e_local * self.ep != experts.num_experts or experts.expert_offset != self.rank * e_local:
            raise RuntimeError(
                f"AllToAllTokenDispatcher on ep rank {self.rank} of {self.ep} needs experts "
                f"[{self.rank * experts.num_experts // self.ep}, "
                f"{(self.rank + 1) * experts.num_experts // self.ep}) of {experts.num_experts}, "
                f"but this module holds [{experts.expert_offset}, "
                f"{experts.expert_offset + e_local}): shard the experts with keep_experts over "
                "the same ep group before installing the dispatcher."
            )
        return e_local

    def __call__(self, x, expert_idx, weights, keep, experts):
        e, e_local, ep = experts.num_experts, self._check(experts), self.ep
        n, d = x.shape

        # 1. Sort the (token, slot) pairs by global expert, hence by destination rank. Dropped
        # slots get the extra key e and sort last: sorting over e + 1 keys without `keep` avoids
        # permute_by_expert's own host sync; the sync below sizes the kept prefix instead.
        if keep is not None:
            expert_idx = expert_idx.masked_fill(~keep, e)
        x_sorted, counts, order = permute_by_expert(x, expert_idx, None, e + 1)
        counts = counts[:e]  # (E,) kept rows per global expert

        # 2. Exchange counts: a fixed-shape (E,) all-to-all; chunk r (the counts of rank r's
        # experts) goes to rank r. recv_counts[s, j] = rows source rank s sends to local expert j.
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=self.group)
        recv_counts = recv_counts.view(ep, e_local)

        # The one device-to-host sync of a dispatch: the uneven all-to-all needs its split sizes
        # (and the row counts below) on the host. Free on CPU; on GPU it stalls the launch queue,
        # which is why capacity-padded (fixed-split) modes exist.
        splits = torch.cat([counts.view(ep, e_local).sum(1), recv_counts.sum(1)]).tolist()
        send_splits, recv_splits = splits[:ep], splits[ep:]
        m, r = sum(send_splits), sum(recv_splits)

        # 3. Dispatch the kept rows (M, d) -> (R, d), grouped by source rank, then local expert.
        x_recv = _all_to_all(x_sorted[:m], recv_splits, send_splits, self.group)

        # 4. Regroup by local expert (stable: source-rank order is kept within an expert). With
        # one local expert the rows already are grouped. Costs one gather and one scatter of R rows.
        local_counts = recv_counts.sum(0)  # (E_local,)
        if e_local > 1:
            local_expert = torch.arange(e_local, device=x.device).repeat(ep)  # (ep * E_local,)
            row_expert = torch.repeat_interleave(local_expert, recv_counts.reshape(-1),
                                                 output_size=r)  # (R,)
            regroup = torch.sort(row_expert, stable=True).indices
            y_local = experts(x_recv.index_select(0, regroup), local_counts)
            y_recv = unpermute(y_local, regroup, r)
        else:
            y_recv = experts(x_recv, local_counts)

        # 5. Combine: send results back (R, d) -> (M, d), in the order they left.
        y_sorted = _all_to_all(y_recv, send_splits, recv_splits, self.group)

        row_bytes = d * x.element_size()
        self.last_a2a_bytes = (
            (m - send_splits[self.rank]) + (r - recv_splits[self.rank])
        ) * row_bytes

        # 6. Back to token order, weighted sum over each token's kept slots (dropped ones add 0).
        return unpermute_and_combine(y_sorted, order[:m], weights)

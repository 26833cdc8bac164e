"""Expert-parallel token dispatch: send each token once to every rank that holds one of its experts.

`AllToAllTokenDispatcher` is the `TokenDispatcher` an expert-parallel strategy installs on every
MoE layer after sharding its experts with `keep_experts`. Rank r of the ep group holds global
experts [r * E/ep, (r + 1) * E/ep). A token whose k experts live on fewer than k ranks crosses the
network once per rank, not once per expert: the bytes the routing requires, and no more. One forward:

    rows: one per (destination rank, token)    x (N, d) -> x_rows (P, d), by destination, then token
    exchange counts (all-to-all)               rows and per-expert assignments per destination [host sync]
    dispatch (all-to-all, uneven)              [x_rows | slot weights | local expert ids] (P, d + 2k)
                                               -> (R, d + 2k); a slot for another rank: weight 0, id E_local
    local grouped experts, weighted sum        (R, d) -> (R, d): each row's local experts combined
    combine (all-to-all, uneven)               (R, d) -> (P, d), in the order the rows left
    sum each token's rows                      (P, d) -> y (N, d)

Every rank issues the same three collectives per forward (and two in backward) whatever its
routing: a rank that sends or receives nothing still joins with zero-size splits, so routing can
never make the ranks' collectives pair up wrongly or hang.

Gradients: the data all-to-alls are differentiable (their backward is the reverse all-to-all), so
on every rank the expert weights receive the gradient contributions of the losses of ALL ep ranks
whose tokens they processed, and the router weights travel with the rows, so their gradients come
back too. That is what `grad_sync.reduction_groups_for` relies on when it reduces expert gradients
over the dp group only, with the same 1/world scale as dense ones.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed._functional_collectives import all_to_all_single_autograd

from ..trainer.models.moe import GroupedExperts, TokenDispatcher, unpermute_and_combine

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
    in rank order (mesh.ep_group). After each call, `last_a2a_bytes` = bytes this rank sends to
    other ranks for it, forward and backward: rows with their weights and ids, results sent back,
    and the gradients of both (rows that stay on this rank excluded).
    """

    def __init__(self, group: Optional[dist.ProcessGroup]):
        self.group = group
        self.ep = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.last_a2a_bytes = 0

    @staticmethod
    def _check_ids_fit(dtype: torch.dtype, e_local: int) -> None:
        exact = int(2 / torch.finfo(dtype).eps)  # every integer up to this is exact: 2**24 in fp32, 256 in bf16
        if e_local + 1 > exact:
            raise RuntimeError(
                f"AllToAllTokenDispatcher sends local expert ids as {dtype} values, exact up to {exact}, "
                f"but this rank holds {e_local} experts: raise strategy.mesh.ep or train in float32."
            )

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
        (n, d), k = x.shape, expert_idx.shape[1]
        self._check_ids_fit(x.dtype, e_local)

        # 1. Each kept slot goes to rank expert // e_local; a dropped slot nowhere (key ep).
        dest = expert_idx // e_local
        if keep is not None:
            dest = dest.masked_fill(~keep, ep)
        goes = torch.zeros(ep + 1, n, dtype=torch.bool, device=x.device)  # goes[r, t]: token t has an expert on r
        goes[dest.reshape(-1), torch.arange(n, device=x.device).repeat_interleave(k)] = True
        goes = goes[:ep]
        kept_idx = expert_idx if keep is None else expert_idx.masked_fill(~keep, e)
        assignments = torch.bincount(kept_idx.reshape(-1), minlength=e + 1)[:e].view(ep, e_local)

        # 2. Exchange, per destination: rows, then assignments per local expert. A fixed-shape
        # all-to-all; recv[s] = what source rank s sends here.
        send_meta = torch.cat([goes.sum(1, keepdim=True), assignments], dim=1)  # (ep, 1 + E_local)
        recv_meta = torch.empty_like(send_meta)
        dist.all_to_all_single(recv_meta, send_meta, group=self.group)
        local_counts = recv_meta[:, 1:].sum(0)  # (E_local,) assignments each local expert receives

        # The one device-to-host sync of a dispatch: the uneven all-to-alls need their split sizes
        # on the host. Free on CPU; on GPU it stalls the launch queue, which is why
        # capacity-padded (fixed-split) modes exist.
        sizes = torch.cat([send_meta[:, 0], recv_meta[:, 0], local_counts.sum().view(1)]).tolist()
        send_splits, recv_splits, m_local = sizes[:ep], sizes[ep : 2 * ep], sizes[-1]
        p, r = sum(send_splits), sum(recv_splits)

        # 3. The rows, by destination then token (a stable sort of the mask, no second sync), each
        # with its slots' weights and local expert ids for that destination (others: weight 0, id E_local).
        row = torch.sort((~goes).reshape(-1).to(torch.int8), stable=True).indices[:p]
        row_dest, row_token = row // n, row % n
        mine = dest.index_select(0, row_token) == row_dest.unsqueeze(1)  # (P, k)
        ids = torch.where(mine, expert_idx.index_select(0, row_token) - (row_dest * e_local).unsqueeze(1), e_local)
        w_rows = torch.where(mine, weights.index_select(0, row_token), 0).to(x.dtype)
        # The ids ride in the same all-to-all as the rows, as floats: exact for the small integers
        # they are (_check_ids_fit), and one collective fewer, which on gloo is a round trip per layer.
        payload = torch.cat([x.index_select(0, row_token), w_rows, ids.to(x.dtype)], dim=1)  # (P, d + 2k)

        # 4. Dispatch: rows, differentiable in x and the router weights.
        recv = _all_to_all(payload, recv_splits, send_splits, self.group)  # (R, d + 2k), by source rank
        recv_ids = recv[:, d + k :].detach().to(torch.int64)

        # 5. Local experts: the received (row, slot) pairs sorted by local expert (stable: rows keep
        # their order within an expert), then each row's outputs weighted and summed.
        order = torch.sort(recv_ids.reshape(-1), stable=True).indices[:m_local]  # flat row * k + slot
        x_local, w_local = recv[:, :d], recv[:, d : d + k]
        y_local = experts(x_local.index_select(0, order // k), local_counts)
        y_rows = unpermute_and_combine(y_local, order, w_local)  # (R, d)

        # 6. Combine: results back to their tokens' ranks, in the order they left; sum per token.
        y_back = _all_to_all(y_rows, send_splits, recv_splits, self.group)  # (P, d)
        # Bytes to other ranks: rows out and results back; in backward their gradients travel the
        # other way, so every remote row crosses twice in each direction.
        sent, received = p - send_splits[self.rank], r - recv_splits[self.rank]
        self.last_a2a_bytes = (sent + received) * (2 * d + 2 * k) * x.element_size()
        return x.new_zeros(n, d).index_add(0, row_token, y_back)

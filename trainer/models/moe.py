"""Mixture-of-Experts FFN: router, grouped SwiGLU experts, token dispatch, auxiliary losses.

The layer computes locally and knows nothing about distribution. Moving tokens to their experts is
the job of a `TokenDispatcher`: `LocalTokenDispatcher` (here) when one process holds every expert;
an expert-parallel strategy swaps in an all-to-all dispatcher that reuses `unpermute_and_combine`
and shards the experts with `GroupedExperts.keep_experts`.

Shapes: N = tokens (B * T), d = model width, E = routed experts, k = top_k, h = expert width,
M = kept (token, slot) assignments (N * k when dropless).
"""

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError

__all__ = [
    "GroupedExperts",
    "TokenDispatcher",
    "LocalTokenDispatcher",
    "Router",
    "MoE",
    "SwiGLU",
    "permute_by_expert",
    "unpermute_and_combine",
    "capacity_keep_mask",
    "expert_capacity",
    "load_balancing_loss",
    "router_z_loss",
    "update_expert_bias",
    "grouped_mm_supported",
]


# --------------------------------------------------------------------------------------------
# Grouped experts
# --------------------------------------------------------------------------------------------

_HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")


def grouped_mm_supported(x: Tensor, w: Tensor) -> bool:
    """Whether `torch._grouped_mm(x, w, offs=...)` is available and correct for these operands.

    Checked on torch 2.13 CPU: fp32, bf16 and fp16 run, fp64 is rejected, and every non-unit
    stride must be a multiple of 16 bytes (d and h multiples of 4 in fp32, of 8 in bf16).
    CUDA: bf16 on Hopper (sm90+) is the documented fast path, with the same alignment rule.
    Anything else takes the per-expert loop.
    """
    if not _HAS_GROUPED_MM or x.dtype != w.dtype or not (x.is_contiguous() and w.is_contiguous()):
        return False
    if (x.shape[-1] * x.element_size()) % 16 or (w.shape[-1] * w.element_size()) % 16:
        return False
    if x.device.type == "cpu":
        return x.dtype in (torch.float32, torch.bfloat16, torch.float16)
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (9, 0)
    return False


def _dense_grad(grad: Tensor) -> Tensor:
    # grouped_mm's backward rejects zero strides, which y.sum() and friends hand back (even for
    # empty or one-row gradients, which .contiguous() would pass through as they are).
    if grad.stride() != (grad.shape[1], 1):
        grad = grad.clone(memory_format=torch.contiguous_format)
    return grad


class GroupedExperts(nn.Module):
    """`num_local_experts` SwiGLU experts stored as stacked weights, run as grouped GEMMs.

    w1, w3: (E_local, d, h); w2: (E_local, h, d). Local expert i is global expert
    `expert_offset + i`; a strategy narrows the stack with `keep_experts` to shard experts.
    """

    def __init__(self, num_experts: int, d_model: int, hidden_dim: int):
        super().__init__()
        self.num_experts = num_experts
        self.expert_offset = 0
        self.d_model = d_model
        self.hidden_dim = hidden_dim
        self.use_grouped_mm = True  # False forces the per-expert loop (tests compare the two)
        self.w1 = nn.Parameter(torch.empty(num_experts, d_model, hidden_dim))
        self.w3 = nn.Parameter(torch.empty(num_experts, d_model, hidden_dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_dim, d_model))

    @property
    def num_local_experts(self) -> int:
        return self.w1.shape[0]

    def keep_experts(self, start: int, count: int) -> None:
        """Keep global experts [start, start + count) and drop the rest (works on meta tensors).

        Called on a freshly built model, before the optimizer sees its parameters.
        """
        end = start + count
        if not (0 <= start and count > 0 and end <= self.num_experts):
            raise ValueError(
                f"keep_experts(start={start}, count={count}) is outside the {self.num_experts} "
                f"experts of this layer: need 0 <= start and start + count <= {self.num_experts}."
            )
        lo = start - self.expert_offset
        if lo < 0 or lo + count > self.num_local_experts:
            raise ValueError(
                f"keep_experts(start={start}, count={count}): this module holds experts "
                f"[{self.expert_offset}, {self.expert_offset + self.num_local_experts}) only."
            )
        for name in ("w1", "w3", "w2"):
            p = getattr(self, name)
            # clone: the kept slice must own its storage, or the full stack stays alive.
            setattr(self, name, nn.Parameter(p.detach()[lo : lo + count].clone(),
                                             requires_grad=p.requires_grad))
        self.expert_offset = start

    def forward(self, x: Tensor, counts: Tensor) -> Tensor:
        """x: (M, d) rows sorted by local expert; counts: (E_local,) int64 rows per expert.

        Returns (M, d). Rows past counts.sum() are not allowed (grouped_mm leaves them unset).
        """
        # w1's last dim is h and x's is d: one check covers all three GEMMs.
        if self.use_grouped_mm and grouped_mm_supported(x, self.w1):
            # Three grouped GEMMs: the FLOPs of a dense FFN over M rows, and on CPU about its
            # time too (torch runs one GEMM per group; bench/bench_moe.py). The int32 cumulative
            # offsets stay on the device (no host sync). Zero-count experts are empty groups:
            # no output rows, a zero weight gradient. The backward is grouped GEMMs as well.
            offs = torch.cumsum(counts, 0, dtype=torch.int32)
            h = F.silu(torch._grouped_mm(x, self.w1, offs=offs))
            h = h * torch._grouped_mm(x, self.w3, offs=offs)
            y = torch._grouped_mm(h, self.w2, offs=offs)
            if y.requires_grad:
                y.register_hook(_dense_grad)
            return y
        return self._forward_loop(x, counts)

    def _forward_loop(self, x: Tensor, counts: Tensor) -> Tensor:
        # Fallback: one small GEMM per expert. counts.tolist() is a device-to-host sync, and
        # torch.cat copies the outputs once more.
        outs = []
        for i, xi in enumerate(torch.split(x, counts.tolist())):
            h = F.silu(xi @ self.w1[i]) * (xi @ self.w3[i])
            outs.append(h @ self.w2[i])
        return torch.cat(outs) if outs else x.new_zeros(0, self.d_model)


# --------------------------------------------------------------------------------------------
# Permute / combine: the pieces every dispatcher shares
# --------------------------------------------------------------------------------------------


def permute_by_expert(
    x: Tensor, expert_idx: Tensor, keep: Optional[Tensor], num_experts: int
) -> Tuple[Tensor, Tensor, Tensor]:
    """Gather the kept (token, slot) pairs of x, grouped by expert.

    x: (N, d); expert_idx: (N, k) int64 in [0, num_experts); keep: (N, k) bool or None (= all).
    Returns x_sorted (M, d), counts (num_experts,) int64, order (M,) int64: the flat slot index
    (token * k + slot) of each sorted row. The sort is stable, so within an expert rows stay in
    token order. Costs one gather of M rows; with keep given, one host sync (to size M).
    """
    k = expert_idx.shape[1]
    flat = expert_idx.reshape(-1)
    if keep is not None:
        # Dropped slots get the key num_experts, sort last, and are cut off.
        flat = flat.masked_fill(~keep.reshape(-1), num_experts)
        counts = torch.bincount(flat, minlength=num_experts + 1)[:num_experts]
        order = torch.sort(flat, stable=True).indices[: int(counts.sum())]
    else:
        counts = torch.bincount(flat, minlength=num_experts)
        order = torch.sort(flat, stable=True).indices
    x_sorted = x.index_select(0, order // k) if k > 1 else x.index_select(0, order)
    return x_sorted, counts, order


class _Combine(torch.autograd.Function):
    """out[t] = sum over kept slots j of weights[t, j] * y_sorted[row of (t, j)].

    Hand-written because everything here is memory-bound: autograd through `y * w` and index_add
    (or through an un-permute and a bmm) allocates and streams two more (M, d) tensors than this.
    Forward: one scaled copy and one scatter-add. Backward: one gather, scaled in place, and a
    row-wise dot product for the weight gradients.
    """

    @staticmethod
    def forward(ctx, y_sorted: Tensor, weights: Tensor, order: Tensor) -> Tensor:
        n, k = weights.shape
        token = order // k  # (M,) token of each sorted row
        w_sorted = weights.reshape(-1).index_select(0, order).to(y_sorted.dtype)  # (M,)
        out = y_sorted.new_zeros(n, y_sorted.shape[1])
        out.index_add_(0, token, y_sorted * w_sorted.unsqueeze(1))
        ctx.save_for_backward(y_sorted, w_sorted, token, order)
        ctx.weights_shape, ctx.weights_dtype = weights.shape, weights.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        y_sorted, w_sorted, token, order = ctx.saved_tensors
        grad_rows = grad_out.index_select(0, token)  # (M, d)
        grad_weights = None
        if ctx.needs_input_grad[1]:
            grad_w_sorted = torch.einsum("md,md->m", grad_rows, y_sorted)
            n, k = ctx.weights_shape
            grad_weights = grad_w_sorted.new_zeros(n * k).index_copy_(0, order, grad_w_sorted)
            grad_weights = grad_weights.view(n, k).to(ctx.weights_dtype)  # dropped slots: 0
        grad_y = grad_rows.mul_(w_sorted.unsqueeze(1)) if ctx.needs_input_grad[0] else None
        return grad_y, grad_weights, None


def unpermute_and_combine(y_sorted: Tensor, order: Tensor, weights: Tensor) -> Tensor:
    """Sum each token's expert outputs weighted by its router weights; dropped slots add 0.

    y_sorted: (M, d) in the order of `permute_by_expert`; order: (M,) its flat slot indices
    (token * k + slot, distinct); weights: (N, k). Returns (N, d). Differentiable in y_sorted
    and weights.
    """
    return _Combine.apply(y_sorted, weights, order)


class TokenDispatcher:
    """Moves the kept (token, slot) pairs to their experts and the results back.

    `__call__(x (N, d), expert_idx (N, k), weights (N, k), keep (N, k) bool or None, experts)`
    returns (N, d) = sum over kept slots of weight * expert(x). `last_a2a_bytes` is what the last
    call sends to other ranks, forward and backward (0 when local).
    """

    last_a2a_bytes: int = 0

    def __call__(
        self,
        x: Tensor,
        expert_idx: Tensor,
        weights: Tensor,
        keep: Optional[Tensor],
        experts: GroupedExperts,
    ) -> Tensor:
        raise NotImplementedError


class LocalTokenDispatcher(TokenDispatcher):
    """Every expert lives in this process: sort, run the grouped experts, un-sort, combine."""

    def __init__(self):
        self.last_a2a_bytes = 0

    def __call__(self, x, expert_idx, weights, keep, experts):
        if experts.num_local_experts != experts.num_experts:
            raise RuntimeError(
                f"LocalTokenDispatcher needs all {experts.num_experts} experts, but this module "
                f"holds {experts.num_local_experts} (it was sharded): the strategy that shards "
                "experts must also install its all-to-all dispatcher."
            )
        x_sorted, counts, order = permute_by_expert(x, expert_idx, keep, experts.num_experts)
        y_sorted = experts(x_sorted, counts)
        return unpermute_and_combine(y_sorted, order, weights)


# --------------------------------------------------------------------------------------------
# Router, capacity, auxiliary losses
# --------------------------------------------------------------------------------------------


class Router(nn.Module):
    """Linear(d, E) logits -> softmax or sigmoid scores -> top_k experts and their weights.

    Options beyond Mixtral's router (each off by default):
    - `expert_bias` (balance_bias=True): a per-expert bias added to the scores only to CHOOSE
      experts (DeepSeek-V3's auxiliary-loss-free balancing); the weights stay the unbiased scores.
      A persistent fp32 buffer, not a parameter: `update_expert_bias` moves it after each
      optimizer step from the global expert counts, so it is checkpointed but never trained.
    - group-limited routing (n_groups > 1): experts form n_groups equal groups; a group scores the
      sum of its best two (biased) scores; each token keeps its topk_groups best groups and picks
      its top_k experts inside them.
    - route_scale: a constant multiplier on the combine weights (after renormalisation).
    - jitter (training only): the router input is multiplied by noise ~ U[1 - j, 1 + j]
      (Mixtral's router_jitter_noise; here only the router sees it, the experts get clean x).
      The noise comes from each rank's torch generator, so a run with jitter is not bitwise equal
      across layouts (the same in distribution).
    """

    def __init__(self, d_model: int, num_experts: int, top_k: int, score: str = "softmax",
                 renormalize: bool = True, route_scale: float = 1.0, n_groups: int = 1,
                 topk_groups: int = 1, balance_bias: bool = False, jitter: float = 0.0):
        super().__init__()
        if score not in ("softmax", "sigmoid"):
            raise ConfigError(
                f"model.moe.router_score={score!r} is not a router score: use softmax or sigmoid."
            )
        if not 1 <= top_k <= num_experts:
            raise ConfigError(
                f"model.moe.top_k={top_k} must be between 1 and model.moe.num_experts="
                f"{num_experts}: a token cannot pick more experts than exist."
            )
        self.gate = nn.Linear(d_model, num_experts, bias=False)
        self.num_experts = num_experts
        self.top_k = top_k
        self.score = score
        self.renormalize = renormalize
        self.route_scale = route_scale
        self.n_groups, self.topk_groups = n_groups, topk_groups
        self.jitter = jitter
        if balance_bias:
            self.register_buffer("expert_bias", torch.zeros(num_experts))
        else:
            self.expert_bias = None

    def _choose(self, scores: Tensor) -> Tensor:
        """scores (N, E) fp32 -> expert_idx (N, k), best (biased) choice first. No gradient."""
        with torch.no_grad():
            choice = scores if self.expert_bias is None else scores + self.expert_bias.float()
            if self.n_groups > 1:
                n, e, g = choice.shape[0], self.num_experts, self.n_groups
                grouped = choice.view(n, g, e // g)
                group_score = grouped.topk(min(2, e // g), dim=-1).values.sum(-1)  # (N, G)
                best = group_score.topk(self.topk_groups, dim=-1).indices  # (N, topk_groups)
                allowed = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, best, True)
                choice = grouped.masked_fill(~allowed.unsqueeze(-1), float("-inf")).view(n, e)
            return torch.topk(choice, self.top_k, dim=-1).indices

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """x: (N, d). Returns logits (N, E), probs (N, E) fp32 (sum to 1, for the balancing loss),
        weights (N, k) fp32 and expert_idx (N, k) int64, best expert first."""
        if self.training and self.jitter > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        logits = self.gate(x)
        # Scores in fp32: the top_k choice and the weights must not depend on bf16 rounding.
        if self.score == "softmax":
            # exp(logits - logsumexp) is torch.softmax, about 5x faster on CPU for rows of E ~ 8
            # (softmax's kernel vectorises along the short last dim), backward included.
            lf = logits.float()
            scores = (lf - torch.logsumexp(lf, dim=-1, keepdim=True)).exp()
            probs = scores
        else:
            scores = torch.sigmoid(logits.float())
            probs = scores / scores.sum(-1, keepdim=True)
        if self.expert_bias is None and self.n_groups == 1:
            weights, expert_idx = torch.topk(scores, self.top_k, dim=-1)
        else:
            expert_idx = self._choose(scores)
            weights = scores.gather(1, expert_idx)
        if self.renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
        if self.route_scale != 1.0:
            weights = weights * self.route_scale
        return logits, probs, weights, expert_idx


@torch.no_grad()
def update_expert_bias(bias: Tensor, load: Tensor, rate: float) -> None:
    """DeepSeek-V3's bias step, in place: bias += rate * sign(mean(load) - load).

    load: (E,) tokens routed to each expert over the WHOLE global batch of one optimizer step
    (every rank, every micro-batch), so every rank computes the same update.
    """
    load = load.to(device=bias.device, dtype=torch.float32)
    bias.add_((rate * torch.sign(load.mean() - load)).to(bias.dtype))


def expert_capacity(capacity_factor: float, seq_len: int, top_k: int, num_experts: int) -> int:
    """Assignments one expert takes from one sequence: ceil(cf * seq_len * top_k / E)."""
    return math.ceil(capacity_factor * seq_len * top_k / num_experts)


def capacity_keep_mask(expert_idx: Tensor, num_experts: int, capacity: int) -> Tensor:
    """expert_idx: (S, T, k) -> keep (S, T, k) bool: within each sequence, every expert keeps its
    first `capacity` assignments in token order (then slot order) and drops the rest.

    Per sequence, so the decision does not depend on how a batch is split over ranks.
    Memory: one (S, T * k, E) int tensor.
    """
    s, t, k = expert_idx.shape
    flat = expert_idx.reshape(s, t * k)
    one_hot = F.one_hot(flat, num_experts)  # (S, T*k, E)
    # Position of each assignment among the assignments to the same expert in its sequence.
    rank = (one_hot.cumsum(1) - 1).gather(2, flat.unsqueeze(2)).squeeze(2)
    return (rank < capacity).reshape(s, t, k)


def load_balancing_loss(probs: Tensor, expert_idx: Tensor, num_experts: int) -> Tensor:
    """Switch-Transformer balancing loss E * sum_e f_e * P_e, per sequence, mean over sequences.

    probs: (S, T, E) or (T, E) router probabilities; expert_idx: (S, T, k) or (T, k) assignments
    before capacity drops. f_e = share of the sequence's T * k assignments that go to e,
    P_e = mean over the sequence's tokens of probs[..., e]. 1.0 at perfect balance.
    """
    if probs.dim() == 2:
        probs, expert_idx = probs.unsqueeze(0), expert_idx.unsqueeze(0)
    s, t, k = expert_idx.shape
    counts = torch.zeros(s, num_experts, device=probs.device, dtype=probs.dtype)
    counts.scatter_add_(1, expert_idx.reshape(s, t * k),
                        torch.ones(s, t * k, device=probs.device, dtype=probs.dtype))
    f = counts / (t * k)  # (S, E), no gradient: routing is discrete
    p = probs.mean(1)  # (S, E)
    return num_experts * (f * p).sum(1).mean()


def router_z_loss(logits: Tensor) -> Tensor:
    """Mean over tokens of logsumexp(logits)^2 (ST-MoE): keeps router logits small."""
    return torch.logsumexp(logits.float(), dim=-1).square().mean()


# --------------------------------------------------------------------------------------------
# The MoE layer
# --------------------------------------------------------------------------------------------


class SwiGLU(nn.Module):
    """Dense SwiGLU FFN: w2(silu(w1 x) * w3 x), no biases. Also the MoE's shared experts."""

    def __init__(self, d_model: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, hidden_dim, bias=False)
        self.w3 = nn.Linear(d_model, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoE(nn.Module):
    """Drop-in FFN replacement: y = sum_k w_k * expert_k(x) [+ gate(x) * shared(x)].

    After each forward: `aux_losses` = {"load_balancing", "z_loss"} (unweighted, differentiable)
    and `stats` = {"tokens_per_expert": (E,) kept assignments of this rank's tokens,
    "dropped_fraction": scalar} (detached). In training, `routed_load` (E,) also sums this rank's
    routed assignments (before capacity drops) since the last `update_expert_bias` reset it.
    """

    def __init__(self, d_model: int, num_experts: int, top_k: int, expert_ffn_dim: int,
                 capacity_factor: Optional[float] = None, num_shared_experts: int = 0,
                 router_score: str = "softmax", renormalize: bool = True, route_scale: float = 1.0,
                 n_groups: int = 1, topk_groups: int = 1, balance_bias_rate: float = 0.0,
                 router_jitter: float = 0.0, shared_expert_ffn_dim: Optional[int] = None,
                 shared_expert_gate: bool = False):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.balance_bias_rate = balance_bias_rate
        self.router = Router(d_model, num_experts, top_k, router_score, renormalize, route_scale,
                             n_groups, topk_groups, balance_bias_rate > 0, router_jitter)
        self.experts = GroupedExperts(num_experts, d_model, expert_ffn_dim)
        # Shared experts: one SwiGLU every token passes through, of width shared_expert_ffn_dim
        # (default num_shared_experts * expert_ffn_dim: the shared experts fused into one).
        shared_dim = shared_expert_ffn_dim or num_shared_experts * expert_ffn_dim
        self.shared = SwiGLU(d_model, shared_dim) if num_shared_experts > 0 else None
        # Qwen2-MoE: the shared output is scaled per token by sigmoid(Linear(d, 1)(x)).
        self.shared_gate = (nn.Linear(d_model, 1, bias=False)
                            if self.shared is not None and shared_expert_gate else None)
        self.dispatcher: TokenDispatcher = LocalTokenDispatcher()
        self.aux_losses: Dict[str, Tensor] = {}
        self.stats: Dict[str, Tensor] = {}
        self.routed_load: Optional[Tensor] = None

    @classmethod
    def from_config(cls, d_model: int, ffn_dim: int, moe) -> "MoE":
        """moe: MoEConfig or its DictConfig; expert_ffn_dim null = the dense ffn_dim."""
        get = moe.get if hasattr(moe, "get") else lambda k, d=None: getattr(moe, k, d)
        return cls(
            d_model=d_model,
            num_experts=moe.num_experts,
            top_k=moe.top_k,
            expert_ffn_dim=moe.expert_ffn_dim or ffn_dim,
            capacity_factor=moe.capacity_factor,
            num_shared_experts=moe.num_shared_experts,
            router_score=moe.router_score,
            renormalize=moe.renormalize,
            route_scale=get("route_scale", 1.0),
            n_groups=get("n_groups", 1),
            topk_groups=get("topk_groups", 1),
            balance_bias_rate=get("balance_bias_rate", 0.0),
            router_jitter=get("router_jitter", 0.0),
            shared_expert_ffn_dim=get("shared_expert_ffn_dim", None),
            shared_expert_gate=get("shared_expert_gate", False),
        )

    def update_expert_bias(self, global_load: Tensor) -> None:
        """After an optimizer step: move the bias from the global routed load, reset the count."""
        if self.router.expert_bias is not None:
            update_expert_bias(self.router.expert_bias, global_load, self.balance_bias_rate)
        self.routed_load = None

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        xf = x.reshape(b * t, d)
        logits, probs, weights, expert_idx = self.router(xf)  # (N, E), (N, E), (N, k), (N, k)
        e, k = self.num_experts, self.top_k

        keep = None
        if self.capacity_factor is not None:
            cap = expert_capacity(self.capacity_factor, t, k, e)
            keep = capacity_keep_mask(expert_idx.view(b, t, k), e, cap).view(b * t, k)

        y = self.dispatcher(xf, expert_idx, weights.to(x.dtype), keep, self.experts)
        if self.shared is not None:
            shared = self.shared(xf)
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(xf)) * shared
            y = y + shared

        self.aux_losses = {
            "load_balancing": load_balancing_loss(probs.view(b, t, e), expert_idx.view(b, t, k), e),
            "z_loss": router_z_loss(logits),
        }
        with torch.no_grad():
            kept_idx = expert_idx if keep is None else expert_idx.masked_fill(~keep, e)
            tokens_per_expert = torch.bincount(kept_idx.reshape(-1), minlength=e + 1)[:e].float()
            total = float(b * t * k)
            self.stats = {
                "tokens_per_expert": tokens_per_expert,
                "dropped_fraction": 1.0 - tokens_per_expert.sum() / total,
            }
            if self.training and self.router.expert_bias is not None:
                # What the bias steers is the choice, so count choices, before capacity drops.
                routed = torch.bincount(expert_idx.reshape(-1), minlength=e).float()
                self.routed_load = routed if self.routed_load is None else self.routed_load + routed
        return y.view(b, t, d)

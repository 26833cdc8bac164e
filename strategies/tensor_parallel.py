"""Tensor parallelism (tp): weight matrices split over the tp group with DTensor's `parallelize_module`.

The plan (torchtitan's, for our module names), per block and outermost:

    tok_emb        RowwiseParallel   vocab rows split; output reduce-scattered to the residual layout
    attn.wq/wk/wv  ColwiseParallel   heads split: each rank computes n_heads / tp heads
    attn.wo        RowwiseParallel   partial sums -> reduce-scatter (SP) or all-reduce
    ffn.w1/w3      ColwiseParallel   SwiGLU hidden units split
    ffn.w2         RowwiseParallel
    *_norm, norm   SequenceParallel  with sequence_parallel: the residual stream is Shard(1) (a slice
                                     of each sequence) between blocks; norms run on that slice
    head           ColwiseParallel   vocab columns split; the loss is `loss_parallel` on the
                                     vocab-sharded logits (no rank ever holds (B, T, V) logits)

Communication per dense block and step, with activations A = B x T x d: without SP two all-reduces
of A forward and two backward; with SP the same bytes as all-gather + reduce-scatter pairs (and
norms and residual adds on 1/tp of the tokens).

MoE layers (design: experts replicated over tp, each tp rank dispatches its own share of tokens).
The router runs on every token of the layer's input, gathered over tp, so capacity drops and the
per-sequence auxiliary losses are those of the single-process run. Then tp rank r takes the r-th
of tp contiguous chunks of those tokens and sends them to their experts (locally, or by all-to-all
over its ep group, which holds the same tp coordinate). The layer's output is a partial sum over
tp (zeros for the tokens another tp rank handled; shared experts, split like the dense FFN, add
their row-parallel partial sums), reduce-scattered (SP) or all-reduced into the residual stream.
Gradients inside an MoE layer are therefore partial over tp: the backward treats the layer's
input gradient as a partial sum (reduce-scattered / all-reduced by DTensor), the auxiliary losses
(computed whole on every tp rank) backpropagate 1/tp on each, and the router and experts, plain
tensors, are summed over tp by the gradient sync (ZeRO-0/1) or by FSDP over a mesh that includes tp
(ZeRO-2/3, strategies/fsdp.py). Every tp rank routed all the tokens, so only tp rank 0 keeps the
layer's expert counts (`stats["tokens_per_expert"]`, `routed_load`): summed over the world, as the
metrics and the balance bias sum them, they are the single-process counts.

Which group reduces which gradient (strategies/grad_sync.py applies it; scale 1/(dp x ep)):
    sharded over tp (DTensor Shard)              over dp x ep (the data group): each tp rank holds
                                                 the whole gradient of its slice
    replicated over tp, fed all tokens           over dp x ep (norms without SP)
    replicated over tp, fed tp-sharded tokens    over dp x ep x tp (norms under SP, the router)
    experts (sharded over ep, fed 1/tp tokens)   over dp x tp (the ranks holding the same experts)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)

from ..trainer.models.moe import MoE, TokenDispatcher


def apply_tensor_parallel(model: nn.Module, tp_mesh, sequence_parallel: bool) -> None:
    """Split `model` (built on the meta device, before experts are sharded) over the 1-D `tp_mesh`."""
    tp = tp_mesh.size()
    residual = Shard(1) if sequence_parallel else Replicate()
    top = {
        "tok_emb": RowwiseParallel(input_layouts=Replicate(), output_layouts=residual),
        "head": ColwiseParallel(input_layouts=residual, output_layouts=Shard(-1), use_local_output=False),
    }
    if sequence_parallel:
        top["norm"] = SequenceParallel()
    # A pipeline stage holds only some of these (strategies/pipeline_parallel.py).
    parallelize_module(model, tp_mesh, {k: v for k, v in top.items() if getattr(model, k) is not None})
    for block in model.layers:
        plan = {
            "attn.wq": ColwiseParallel(), "attn.wk": ColwiseParallel(), "attn.wv": ColwiseParallel(),
            "attn.wo": RowwiseParallel(output_layouts=residual),
        }
        if sequence_parallel:
            plan["attn_norm"] = SequenceParallel()
            plan["ffn_norm"] = SequenceParallel()
        # The block's input as one Replicate DTensor shared by q/k/v (w1/w3): their input gradients
        # add up as a partial sum and cost one reduce-scatter (SP) or all-reduce, not one each.
        plan["attn"] = PrepareModuleInput(input_layouts=(residual, None), desired_input_layouts=(Replicate(), None))
        if isinstance(block.ffn, MoE):
            plan["ffn"] = ExpertsReplicatedOverTP(residual)
            if block.ffn.shared is not None:
                plan["ffn.shared"] = _PartialGradInput()
                plan.update(_swiglu("ffn.shared", Partial()))
        else:
            plan["ffn"] = PrepareModuleInput(input_layouts=(residual,), desired_input_layouts=(Replicate(),))
            plan.update(_swiglu("ffn", residual))
        parallelize_module(block, tp_mesh, plan)
        # The model computes the heads of its slice (torchtitan's n_local_heads).
        block.attn.n_heads //= tp
        block.attn.n_kv_heads //= tp  # GQA: kv heads split the same way (validate.py: n_kv_heads % tp == 0)


def _swiglu(prefix: str, output_layout) -> dict:
    return {f"{prefix}.w1": ColwiseParallel(), f"{prefix}.w3": ColwiseParallel(),
            f"{prefix}.w2": RowwiseParallel(output_layouts=output_layout)}


def apply_tp_token_split(model: nn.Module, tp_mesh) -> None:
    """Each tp rank dispatches only its chunk of every MoE layer's tokens (after the ep dispatcher is set)."""
    for moe in model.moe_layers():
        moe.dispatcher = TokenChunkDispatcher(moe.dispatcher, tp_mesh.get_local_rank(), tp_mesh.size())


def parallel_cross_entropy(logits, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of vocab-sharded logits (DTensor) as a plain scalar, the same on every tp rank.

    Its backward must run inside `loss_parallel()` too (MeshStrategy.backward)."""
    with loss_parallel():
        return F.cross_entropy(logits, targets).to_local()


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient times `scale` backward."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


class ExpertsReplicatedOverTP(ParallelStyle):
    """An MoE layer whose router and experts are plain tensors, replicated over tp (see the module doc).

    Input: the residual layout, gathered whole (the gradient that comes back is a partial sum).
    Output: a partial sum over tp, reduced into the residual layout."""

    def __init__(self, residual_layout):
        super().__init__()
        self.residual = residual_layout

    def _input(self, module, inputs, mesh):
        module.tp_routed_load_before = module.routed_load  # this forward adds to it
        x = inputs[0]
        if not isinstance(x, DTensor):
            x = DTensor.from_local(x, mesh, (self.residual,), run_check=False)
        return (x.redistribute(placements=(Replicate(),)).to_local(grad_placements=(Partial(),)),)

    def _output(self, module, y, mesh):
        y = DTensor.from_local(y, mesh, (Partial(),), run_check=False)
        # Every tp rank computed the same auxiliary losses from all tokens: 1/tp of their gradient each.
        module.aux_losses = {k: _ScaleGrad.apply(v, 1.0 / mesh.size()) for k, v in module.aux_losses.items()}
        if mesh.get_local_rank() != 0:  # the counts of these tokens are tp rank 0's to report (module doc)
            module.stats["tokens_per_expert"] = torch.zeros_like(module.stats["tokens_per_expert"])
            module.routed_load = module.tp_routed_load_before
        return y.redistribute(placements=(self.residual,)).to_local()

    def _apply(self, module, mesh):
        return _hook(module, mesh, self._input, self._output)


class _PartialGradInput(ParallelStyle):
    """Shared experts inside an MoE layer: a whole (replicated) input whose gradient stays partial."""

    def _input(self, module, inputs, mesh):
        return (DTensor.from_local(inputs[0], mesh, (Replicate(),), run_check=False, grad_placements=(Partial(),)),)

    def _apply(self, module, mesh):
        return _hook(module, mesh, self._input)


def _hook(module: nn.Module, mesh, input_fn, output_fn=None) -> nn.Module:
    """distribute_module's input/output hooks without its parameter step, which would make every
    parameter a Replicate DTensor: these stay plain tensors (their gradients are reduced by us)."""
    module.register_forward_pre_hook(lambda mod, inputs: input_fn(mod, inputs, mesh))
    if output_fn is not None:
        module.register_forward_hook(lambda mod, inputs, outputs: output_fn(mod, outputs, mesh))
    return module


class TokenChunkDispatcher(TokenDispatcher):
    """Run `inner` on this tp rank's chunk of the tokens; other rows of the output are 0 (a partial sum)."""

    def __init__(self, inner: TokenDispatcher, tp_rank: int, tp: int):
        self.inner, self.tp_rank, self.tp = inner, tp_rank, tp
        self.last_a2a_bytes = 0

    def __call__(self, x, expert_idx, weights, keep, experts):
        n = x.shape[0]
        lo, hi = n * self.tp_rank // self.tp, n * (self.tp_rank + 1) // self.tp
        y = self.inner(x[lo:hi], expert_idx[lo:hi], weights[lo:hi], None if keep is None else keep[lo:hi], experts)
        self.last_a2a_bytes = self.inner.last_a2a_bytes
        return F.pad(y, (0, 0, lo, n - hi))


def tp_partial_params(model: nn.Module) -> list[nn.Parameter]:
    """Parameters replicated over tp whose gradient on a tp rank is a partial sum: norms under SP
    (Replicate DTensors fed a slice of each sequence), and every MoE layer's router and experts."""
    out = [p for p in model.parameters()
           if isinstance(p, DTensor) and all(isinstance(pl, Replicate) for pl in p.placements)]
    for moe in model.moe_layers():
        out += [*moe.router.parameters(), *moe.experts.parameters()]
    return out


def is_tp_sharded(p: torch.Tensor) -> bool:
    """A DTensor parameter split over tp (each tp rank holds the whole gradient of its slice)."""
    return isinstance(p, DTensor) and any(isinstance(pl, Shard) for pl in p.placements)

"""What a run needs before it starts: parameters, per-rank bytes, all-to-all traffic.

`plan_run(cfg)` builds the model on the meta device (nothing allocated) and follows the layout
steps of strategies/layout.py as shapes, for the chosen mesh pp x dp x ep x tp, ZeRO stage,
precision and batch, to the bytes one rank holds:

    params      the rank's pipeline stage (embedding on the first, final norm and head on the last),
                tp-split matrices / tp, experts / ep; ZeRO-2/3 (FSDP2) hold each sharded over its
                replica ranks, padded to even shards: dense ones over dp x ep (dim 0), experts over dp
                (dim 0 when the local experts divide evenly, else dim 1); the unsharded copies exist only while FSDP computes (fsdp_gathered)
    grads       one gradient per held parameter, in the parameter dtype; with more than one rank per
                stage it lives in the gradient-sync buffer (strategies/grad_sync.py, + one flag per
                tensor); ZeRO-2/3 hold FSDP's padded reduce-scatter shards instead
    optimizer   AdamW: exp_avg + exp_avg_sq per parameter (SGD: momentum, if any); ZeRO-1 keeps the
                whole parameters strategies/zero.py assigns the rank (the most any rank owns),
                ZeRO-2/3 the FSDP shards
    fsdp_gathered  ZeRO-2/3 only: FSDP's unsharded parameters (ZeRO-2: all of them from forward to
                backward; ZeRO-3: two groups at a time) and one group's unsharded gradients
    activations tensors autograd saves for backward in one micro-batch (formula below, from this
                model's code: RMSNorm, rotary, SDPA, SwiGLU, grouped experts, combine, the head + CE),
                under tp / sequence parallel per rank, under pp times the micro-batches the schedule
                keeps in flight on that rank

Under pp the figures are those of the stage that needs the most (`pipeline.stages` lists each), in
the steady state: torch's first schedule step also keeps one metadata-inference forward on the
first stage until its backward metadata returns (not counted). Measured on gpipe and 1f1b; the
interleaved schedules' warm-up is torch's formula, not measured here.
Also the all-to-all bytes of one optimizer step over all ranks, for uniform routing (the minimum a
balanced router needs; the dispatcher logs the measured figure as a2a_bytes_per_step). Tests compare
every figure with the tensors a laid-out step holds on every layout (tests/test_plan.py).
`check_fits(plan)` compares one node's total with the memory that exists there (host RAM on CPU,
device memory on GPU).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from ..strategies.mesh import ParallelDims
from .models.transformer import Transformer, count_expert_params, count_params, is_moe_layer

GIB = 1024 ** 3


def _get(node, key, default=None):
    return node.get(key, default) if hasattr(node, "get") else getattr(node, key, default)


def _precision_bytes(precision: str) -> tuple[int, int]:
    """(bytes per parameter / gradient / optimizer element, bytes per activation element)."""
    if precision == "bf16-true":
        return 2, 2
    if precision == "bf16-mixed":
        return 4, 2  # fp32 weights and state; autocast runs the matmuls (and saves their inputs) in bf16
    return 4, 4


def zero_stage(strategy) -> int:
    """strategy.zero_stage (0 when a config predates it)."""
    return int(_get(strategy, "zero_stage", 0) or 0)


def _optimizer_slots(opt) -> int:
    target = str(_get(opt, "_target_", "torch.optim.AdamW")).lower()
    if "adam" in target:
        return 2
    if "sgd" in target:
        return 1 if (_get(opt, "momentum") or 0) > 0 else 0
    return 2  # unknown optimizer: plan for Adam's two slots


def activation_elements(m, tokens: int, layers=None, head: bool = True, tp: int = 1, sp: bool = True) -> dict[str, int]:
    """Elements autograd keeps for backward in one micro-batch of `tokens` tokens on one rank, by part.

    From the code in trainer/models (fp32 shown; every term scales with the activation dtype):
    per block, attention: norm (its input, the normalised x, its output) 3 N d, q and the rotated q
    2 N d, k, rotated k and v 3 N kv, SDPA's output and the o-projection input 2 N d;
    FFN: norm 3 N d; dense SwiGLU 4 N f (w1, silu, w3, product); MoE (M = N top_k rows): the
    sorted rows and the expert outputs 2 M d, 4 M h in the grouped SwiGLU, router scores ~ 4 N E,
    shared expert 4 N h_s; head: final norm 3 N d, logits and log-softmax 2 N V.
    `layers`: the blocks this rank holds (a pipeline stage), `head`: whether it holds the final
    norm and head. Under tp (strategies/tensor_parallel.py) every head-, hidden- and vocab-split
    term is / tp; with sequence parallel the norms run on N / tp tokens, and each gather back to
    the whole sequence (before q/k/v, the FFN, the router, the head) saves one whole N d; the router
    scores stay whole (it routes every token) and each tp rank dispatches M / tp rows.
    """
    d, n = m.d_model, tokens
    kv = (_get(m, "n_kv_heads") or m.n_heads) * (d // m.n_heads)
    moe = m.moe
    layers = range(m.n_layers) if layers is None else list(layers)
    norm = 3 * n * d if tp == 1 or not sp else 3 * n * d // tp + n * d
    attn = norm + (4 * n * d + 3 * n * kv) // tp
    out = {"attention": 0, "ffn": 0, "head": norm + 2 * n * m.vocab_size // tp if head else 0}
    for i in layers:
        out["attention"] += attn
        if is_moe_layer(m, i):
            rows = n * moe.top_k // tp
            h = moe.expert_ffn_dim or m.ffn_dim
            ffn = norm + 2 * rows * d + 4 * rows * h + 4 * n * moe.num_experts
            if moe.num_shared_experts > 0:
                ffn += 4 * n * (_get(moe, "shared_expert_ffn_dim") or moe.num_shared_experts * h) // tp
            out["ffn"] += ffn
        else:
            out["ffn"] += norm + 4 * n * m.ffn_dim // tp
    if _get(m, "activation_checkpointing", None) not in (None, False, "none", "") and layers:
        # Checkpointed blocks keep only their input; one block's activations exist at a time in backward.
        per_block = (out["attention"] + out["ffn"]) // len(layers)
        out = {"block_inputs": len(layers) * n * d // (tp if sp else 1), "recompute": per_block, "head": out["head"]}
    return out


def a2a_bytes_per_step(m, dims: ParallelDims, global_tokens: int, act_bytes: int) -> int:
    """Bytes sent to other ranks per optimizer step, all ranks together, forward and backward.

    One row per (token, other ep rank holding one of its experts), carrying d values + k weights
    + k expert ids; the result comes back (d + ...); in backward both gradients travel again
    (strategies/token_dispatch.py counts the same way). Uniform routing: a token has an expert on a
    given rank with probability 1 - C(E - E/ep, k) / C(E, k). Under tp each tp rank dispatches its
    1/tp of the tokens, under pp each stage its own layers: the total is the same.
    """
    moe = m.moe
    if moe is None or dims.ep == 1:
        return 0
    e, k, ep = moe.num_experts, moe.top_k, dims.ep
    p_hit = 1.0 - math.comb(e - e // ep, k) / math.comb(e, k)
    rows = global_tokens * (ep - 1) * p_hit  # rows sent = rows received, summed over ranks
    layers = sum(1 for i in range(m.n_layers) if is_moe_layer(m, i))
    return int(round(layers * 2 * rows * (2 * m.d_model + 2 * k) * act_bytes))


# --- what one rank holds: the layout steps of strategies/layout.py, as shapes -----------------

class _Held:
    """One parameter as a rank holds it: its local shape, its kind, its FSDP group."""

    def __init__(self, name: str, shape: tuple, expert: bool, group: str, kind: str = "dense"):
        # kind: "expert", "router", "norm" or "dense" (which reduction group / FSDP mesh it takes)
        self.name, self.shape, self.expert, self.group, self.kind = name, shape, expert, group, kind

    def numel(self) -> int:
        return math.prod(self.shape)


# strategies/tensor_parallel.py's plan, by parameter: the dim each tp rank holds 1/tp of (the
# weights of nn.Linear are (out, in): colwise splits dim 0, rowwise dim 1; the embedding's rows).
# Norms, the router and the routed experts stay whole on every tp rank.
_TP_COLWISE = ("wq", "wk", "wv", "w1", "w3", "head")
_TP_ROWWISE = ("wo", "w2")


def _tp_dim(name: str) -> int | None:
    parts = name.split(".")
    if parts[-1] != "weight" or "router" in parts or "shared_gate" in parts:
        return None
    leaf = parts[-2]
    if leaf in _TP_COLWISE or leaf == "tok_emb":
        return 0
    return 1 if leaf in _TP_ROWWISE else None


def _stage_of(cfg, dims: ParallelDims):
    """Per pp rank: (layer indices held, holds the embedding, holds the final norm and head)."""
    n = cfg.model.n_layers
    if dims.pp == 1:
        return [(set(range(n)), True, True)]
    from ..strategies.pipeline_parallel import local_stages, stage_layers  # pure functions (no process group)

    p = cfg.strategy.pipeline
    num_stages = dims.pp * p.stages_per_rank
    ranges = stage_layers(n, num_stages, p.split_points)
    out = []
    for r in range(dims.pp):
        mine = local_stages(r, dims.pp, p.stages_per_rank)
        out.append(({i for s in mine for i in ranges[s]}, 0 in mine, num_stages - 1 in mine))
    return out


def _held_params(model, dims: ParallelDims, layers: set, first: bool, last: bool) -> list[_Held]:
    """The parameters one rank of a stage holds, after the pipeline split, tp and expert sharding."""
    held = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        parts = name.split(".")
        if parts[0] == "layers" and int(parts[1]) not in layers:
            continue
        if (parts[0] == "tok_emb" and not first) or (parts[0] in ("norm", "head") and not last):
            continue
        shape = list(p.shape)
        expert = "experts" in parts
        if expert:
            shape[0] //= dims.ep
        dim = _tp_dim(name) if dims.tp > 1 else None
        if dim is not None:
            shape[dim] //= dims.tp
        kind = "expert" if expert else "router" if "router" in parts else \
            "norm" if parts[-2].endswith("norm") else "dense"
        # FSDP's groups (strategies/fsdp.py): each block and the root; each MoE layer's experts apart
        # when ep > 1 or tp > 1, and under tp each router.
        own = (expert and (dims.ep > 1 or dims.tp > 1)) or (kind == "router" and dims.tp > 1)
        group = ".".join(parts[:-1]) if own else ".".join(parts[:2]) if parts[0] == "layers" else ""
        held.append(_Held(name, tuple(shape), expert, group, kind))
    if last and first is False and model.tie_embeddings:  # a tied head on a later stage than the embedding
        held.append(_Held("head.weight", (model.cfg.vocab_size // dims.tp, model.cfg.d_model), False, ""))
    return held


def _fsdp_shard(p: _Held, dims: ParallelDims) -> int:
    """Elements of FSDP2's padded shard (every rank allocates ceil(dim / ranks) rows; rank 0's state
    is that size too), over the meshes of strategies/fsdp.py: dense parameters on dim 0 over the data
    ranks (dp x ep); experts over the ranks holding their shard (dp, x tp under tp), on the dim of
    `fsdp.expert_shard_dim`; under tp the router on dim 0 over every rank of the stage (dp x ep x tp)."""
    from ..strategies.fsdp import expert_shard_dim

    if p.expert:
        ranks = dims.dp * dims.tp
        dim = expert_shard_dim(p.shape[0], ranks)
    elif p.kind == "router" and dims.tp > 1:
        ranks, dim = dims.dp * dims.ep * dims.tp, 0
    else:
        ranks, dim = dims.dp * dims.ep, 0
    shape = list(p.shape)
    shape[dim] = -(-shape[dim] // ranks)
    return math.prod(shape)


def _zero1_owned(params: list, dims: ParallelDims, sequence_parallel: bool = True) -> int:
    """ZeRO-1 as strategies/zero.py partitions it (whole local pieces, per reduction group of one
    stage, strategies/grad_sync.py): the most elements any rank of the stage owns. Ranks of a stage
    are row-major over (dp, ep, tp): stage rank r is dp rank r // (ep tp)."""
    from ..strategies.zero import partition

    stage_world = dims.dp * dims.ep

    def shares(group, size):
        return [sum(p.numel() for p in share) for share in partition(group, size)] if group else [0] * size

    if dims.tp > 1:
        # grad_sync._tensor_parallel_groups: "whole" over the data ranks of a tp slice; "partial"
        # (router, norms under SP, experts when ep = 1) over the stage; experts over dp x tp.
        def partial(p):
            return p.kind == "router" or (p.kind == "norm" and sequence_parallel) or (p.expert and dims.ep == 1)

        whole = shares([p for p in params if not partial(p) and not p.expert], stage_world)
        part = shares([p for p in params if partial(p)], stage_world * dims.tp)
        experts = shares([p for p in params if p.expert and dims.ep > 1], dims.dp * dims.tp)
        owned = []
        for r in range(stage_world * dims.tp):
            dp_i, tp_i = r // (dims.ep * dims.tp), r % dims.tp
            owned.append(whole[r // dims.tp] + part[r] + experts[dp_i * dims.tp + tp_i])
        return max(owned)
    if dims.ep == 1:
        return max(shares(params, stage_world))
    dense = shares([p for p in params if not p.expert], stage_world)
    experts = shares([p for p in params if p.expert], dims.dp)
    return max(dense[r] + experts[r // dims.ep] for r in range(stage_world))


def _in_flight(cfg, dims: ParallelDims, pp_rank: int, microbatches: int) -> float:
    """Stage-micro-batches whose activations rank `pp_rank` holds at its peak, in units of all its
    stages' activations for one micro-batch, as torch.distributed.pipelining schedules them. GPipe:
    every micro-batch; 1F1B: its warm-up forwards, pp - rank; interleaved (v stages per rank, zero
    bubble alike): warm-up (v - 1) m / rounds + 2 (pp - 1 - rank) chunks of one stage, and one more."""
    if dims.pp == 1:
        return 1
    p = cfg.strategy.pipeline
    v = p.stages_per_rank
    if p.schedule == "gpipe":
        return microbatches
    if p.schedule == "1f1b":
        return min(microbatches, dims.pp - pp_rank)
    per_round = microbatches // max(1, microbatches // dims.pp)
    return min(v * microbatches, (v - 1) * per_round + 2 * (dims.pp - 1 - pp_rank) + 1) / v


def _stage_bytes(cfg, model, dims: ParallelDims, layers, first, last, pp_rank, elem, act_elem) -> dict:
    m, s, t, data = cfg.model, cfg.strategy, cfg.trainer, cfg.data
    stage = zero_stage(s)
    params = _held_params(model, dims, layers, first, last)
    local = sum(p.numel() for p in params)
    sharded = sum(_fsdp_shard(p, dims) for p in params)
    stage_world = dims.world_size // dims.pp
    synced = stage_world > 1 and stage < 2  # strategies/grad_sync.py: flat buckets, one flag per tensor
    held_params = sharded if stage >= 2 else local  # FSDP2 keeps sharded parameters at ZeRO-2 too
    grads = (sharded if stage >= 2 else local) + (len(params) if synced else 0)
    if stage >= 2:
        optim = sharded
    elif stage == 1 and synced:
        optim = _zero1_owned(params, dims, bool(_get(s, "sequence_parallel", True)))
    else:
        optim = local
    gathered = 0
    if stage >= 2:
        # FSDP2's unsharded copies: ZeRO-2 keeps every group gathered from its forward to its backward;
        # ZeRO-3 one group and the next (prefetch) at a time. Plus one group's unsharded gradients
        # before its reduce-scatter. (bf16-mixed gathers in bf16.)
        groups = {}
        for p in params:
            groups[p.group] = groups.get(p.group, 0) + p.numel()
        biggest = max(groups.values(), default=0)
        gathered = (local if stage == 2 else 2 * biggest) * act_elem + biggest * elem
    micro = data.batch_size // (dims.data_ranks * t.accumulate_grad_batches)  # sequences per rank per micro-step
    microbatches = 1
    if dims.pp > 1:
        from .validate import pipeline_microbatches

        microbatches = pipeline_microbatches(s.pipeline, dims.pp)
    tokens = micro // microbatches * data.seq_len
    acts = activation_elements(m, tokens, layers, last, dims.tp, bool(_get(s, "sequence_parallel", True)))
    in_flight = _in_flight(cfg, dims, pp_rank, microbatches)
    if dims.pp > 1:
        acts = {k: int(v * in_flight) for k, v in acts.items()}
    out = {
        "params": int(held_params * elem),
        "grads": int(grads * elem),
        "optimizer_state": int(_optimizer_slots(cfg.optimizer) * optim * elem),
        "activations": int(sum(acts.values()) * act_elem),
    }
    if gathered:
        out["fsdp_gathered"] = int(gathered)
    out["total"] = sum(out.values())
    return {"bytes": out, "params": int(held_params), "held": local, "tensors": len(params), "acts": acts,
            "layers": sorted(layers), "micro_tokens": tokens, "in_flight": in_flight}


def plan_run(cfg, dims: ParallelDims | None = None) -> dict:
    """The plan of a composed (validated) run config: a JSON-ready dict. Allocates nothing."""
    m, s, t, data = cfg.model, cfg.strategy, cfg.trainer, cfg.data
    if dims is None:  # validate resolves strategy=auto and -1 degrees the way a run would
        from .validate import validate

        dims = validate(cfg, announce=False)
    with torch.device("meta"):
        model = Transformer(m, max_seq_len=data.seq_len)
    counts = count_params(model, m)
    total, experts = counts["params_total"], count_expert_params(m)
    elem, act_elem = _precision_bytes(str(t.precision))
    stages = [_stage_bytes(cfg, model, dims, layers, first, last, r, elem, act_elem)
              for r, (layers, first, last) in enumerate(_stage_of(cfg, dims))]
    del model
    # The plan is per rank: the pipeline stage that needs the most (every stage when pp > 1).
    top = max(stages, key=lambda st: st["bytes"]["total"])
    micro = data.batch_size // (dims.data_ranks * t.accumulate_grad_batches)
    plan = {
        "params_total": total,
        "params_active_per_token": counts["params_active_per_token"],
        "params_experts": experts,
        "params_per_rank": top["params"],
        "params_held_per_rank": top["held"],
        "mesh": dims.as_dict(),
        "world_size": dims.world_size,
        "ranks_per_node": t.devices,
        "zero_stage": zero_stage(s),
        "precision": str(t.precision),
        "micro_batch_per_rank": micro,
        "seq_len": data.seq_len,
        "bytes_per_rank": top["bytes"],
        "activation_elements": top["acts"],
        "a2a_bytes_per_step": a2a_bytes_per_step(m, dims, data.batch_size * data.seq_len, act_elem),
        "param_tensors": top["tensors"],
    }
    if dims.pp > 1:
        plan["pipeline"] = {"schedule": s.pipeline.schedule, "microbatch_tokens": top["micro_tokens"],
                            "stages": [{"pp_rank": r, "layers": st["layers"], "in_flight": st["in_flight"],
                                        "params": st["params"], "bytes": st["bytes"]} for r, st in enumerate(stages)]}
    return plan


def available_memory(accelerator: str) -> tuple[int | None, str]:
    """(bytes one node offers the run, where the figure comes from); None where it cannot be known here."""
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            return None, "no GPU visible here"
        return torch.cuda.get_device_properties(0).total_memory, "GPU memory per device"
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return info["MemAvailable"], "host RAM available (MemAvailable)"
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "host RAM"


def check_fits(plan: dict, accelerator: str) -> dict:
    """Adds plan["memory"]: what one node needs and has. GPU: one rank per device; CPU: all ranks share RAM."""
    have, source = available_memory(accelerator)
    per_rank = plan["bytes_per_rank"]["total"]
    on_gpu = source.startswith("GPU")
    need = per_rank if on_gpu else per_rank * plan["ranks_per_node"]
    plan["memory"] = {"needed_bytes": need, "available_bytes": have, "source": source,
                      "fits": None if have is None else need <= have}
    return plan


def refusal(plan: dict) -> str:
    """The message for a plan that does not fit (None if it fits or cannot be judged)."""
    mem = plan["memory"]
    if mem["fits"] is not False:
        return None
    b = plan["bytes_per_rank"]
    parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in b.items() if k != "total")
    who = "one device" if mem["source"].startswith("GPU") else f"{plan['ranks_per_node']} ranks on this node"
    return (f"the plan needs {mem['needed_bytes'] / GIB:.2f} GiB for {who} ({b['total'] / GIB:.2f} GiB per rank: {parts} GiB), "
            f"but {mem['source']} is {mem['available_bytes'] / GIB:.2f} GiB: the run would run out of memory. "
            f"Lower data.batch_size or data.seq_len (activations), raise trainer.accumulate_grad_batches, add ranks "
            f"(trainer.devices, trainer.num_nodes) with strategy.mesh.ep (experts) or strategy.zero_stage=1/2/3 "
            f"(optimizer state, gradients, parameters), use trainer.precision=bf16-true, or a smaller model.* (d_model, n_layers, "
            f"model.moe.num_experts). `train ... dry_run=true` prints the plan without running.")


def write_plan(plan: dict, run_dir) -> Path:
    path = Path(run_dir) / "plan.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(plan, indent=2) + "\n")
    return path


def describe(plan: dict) -> str:
    """A few lines for the console."""
    b = plan["bytes_per_rank"]
    lines = [
        f"params: {plan['params_total'] / 1e9:.3f} B total, {plan['params_active_per_token'] / 1e9:.3f} B active per token",
        f"mesh {' x '.join(f'{a}={d}' for a, d in plan['mesh'].items())} (world {plan['world_size']}), ZeRO-{plan['zero_stage']}, "
        f"{plan['precision']}, {plan['micro_batch_per_rank']} x {plan['seq_len']} tokens per rank per micro-step",
        ("per rank (largest pipeline stage): " if "pipeline" in plan else "per rank: ")
        + ", ".join(f"{k} {v / GIB:.3f} GiB" for k, v in b.items()),
        f"all-to-all: {plan['a2a_bytes_per_step'] / GIB:.3f} GiB per step (all ranks, uniform routing)",
    ]
    mem = plan.get("memory")
    if mem:
        have = "unknown" if mem["available_bytes"] is None else f"{mem['available_bytes'] / GIB:.2f} GiB"
        lines.append(f"memory: needs {mem['needed_bytes'] / GIB:.2f} GiB, {mem['source']}: {have}")
    return "\n".join(lines)

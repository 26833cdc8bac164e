"""What a run needs before it starts: parameters, per-rank bytes, all-to-all traffic.

`plan_run(cfg)` builds the model on the meta device (nothing allocated) and counts, for the chosen
mesh, ZeRO stage, precision and batch, the bytes one rank holds:

    params      this rank's parameters: dense ones replicated (sharded over all ranks under ZeRO-3),
                experts / ep (and / dp under ZeRO-3)
    grads       one gradient per held parameter, in the parameter dtype; with more than one rank it
                lives in the gradient-sync buffer (strategies/grad_sync.py, + one flag per tensor);
                ZeRO-2/3 shard it like the optimizer state
    optimizer   AdamW: exp_avg + exp_avg_sq per parameter (SGD: momentum, if any), sharded over each
                parameter's replica group under ZeRO >= 1
    activations tensors autograd saves for backward in one micro-batch (formula below, from this
                model's code: RMSNorm, rotary, SDPA, SwiGLU, grouped experts, combine, the head + CE)

and the all-to-all bytes of one optimizer step over all ranks, for uniform routing (the minimum a
balanced router needs; the dispatcher logs the measured figure as a2a_bytes_per_step). Tests compare
every figure with a measured run (tests/test_plan.py). `fits(plan)` compares one node's total with
the memory that exists there (host RAM on CPU, device memory on GPU).
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


def activation_elements(m, tokens: int) -> dict[str, int]:
    """Elements autograd keeps for backward in one micro-batch of `tokens` tokens, by part.

    From the code in trainer/models (fp32 shown; every term scales with the activation dtype):
    per block, attention: norm (its input, the normalised x, its output) 3 N d, q and the rotated q
    2 N d, k, rotated k and v 3 N kv, SDPA's output and the o-projection input 2 N d;
    FFN: norm 3 N d; dense SwiGLU 4 N f (w1, silu, w3, product); MoE (M = N top_k rows): the
    sorted rows and the expert outputs 2 M d, 4 M h in the grouped SwiGLU, router scores ~ 4 N E,
    shared expert 4 N h_s; head: final norm 3 N d, logits and log-softmax 2 N V.
    """
    d, n = m.d_model, tokens
    kv = (_get(m, "n_kv_heads") or m.n_heads) * (d // m.n_heads)
    moe = m.moe
    attn = 7 * n * d + 3 * n * kv
    out = {"attention": 0, "ffn": 0, "head": 3 * n * d + 2 * n * m.vocab_size}
    for i in range(m.n_layers):
        out["attention"] += attn
        if is_moe_layer(m, i):
            rows = n * moe.top_k
            h = moe.expert_ffn_dim or m.ffn_dim
            ffn = 3 * n * d + 2 * rows * d + 4 * rows * h + 4 * n * moe.num_experts
            if moe.num_shared_experts > 0:
                ffn += 4 * n * (_get(moe, "shared_expert_ffn_dim") or moe.num_shared_experts * h)
            out["ffn"] += ffn
        else:
            out["ffn"] += 3 * n * d + 4 * n * m.ffn_dim
    if _get(m, "activation_checkpointing", None) not in (None, False, "none", ""):
        # Checkpointed blocks keep only their input; one block's activations exist at a time in backward.
        per_block = (out["attention"] + out["ffn"]) // m.n_layers
        out = {"block_inputs": m.n_layers * n * d, "recompute": per_block, "head": out["head"]}
    return out


def a2a_bytes_per_step(m, dims: ParallelDims, global_tokens: int, act_bytes: int) -> int:
    """Bytes sent to other ranks per optimizer step, all ranks together, forward and backward.

    One row per (token, other ep rank holding one of its experts), carrying d values + k weights
    + k expert ids; the result comes back (d + ...); in backward both gradients travel again
    (strategies/token_dispatch.py counts the same way). Uniform routing: a token has an expert on a
    given rank with probability 1 - C(E - E/ep, k) / C(E, k).
    """
    moe = m.moe
    if moe is None or dims.ep == 1:
        return 0
    e, k, ep = moe.num_experts, moe.top_k, dims.ep
    p_hit = 1.0 - math.comb(e - e // ep, k) / math.comb(e, k)
    rows = global_tokens * (ep - 1) * p_hit  # rows sent = rows received, summed over ranks
    layers = sum(1 for i in range(m.n_layers) if is_moe_layer(m, i))
    return int(round(layers * 2 * rows * (2 * m.d_model + 2 * k) * act_bytes))


def _zero1_owned(params: list, expert_ids: set, dims: ParallelDims) -> int:
    """ZeRO-1 as strategies/zero.py partitions it (whole parameters, per reduction group): the most
    elements any rank owns. Ranks are row-major over (dp, ep): global rank r is dp rank r // ep."""
    from ..strategies.zero import partition

    def shares(group, size):
        return [sum(p.numel() for p in share) for share in partition(group, size)] if group else [0] * size

    if dims.ep == 1:
        return max(shares(params, dims.world_size))
    dense = shares([p for p in params if id(p) not in expert_ids], dims.world_size)
    experts = shares([p for p in params if id(p) in expert_ids], dims.dp)
    return max(dense[r] + experts[r // dims.ep] for r in range(dims.world_size))


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
    world, ep, dp = dims.world_size, dims.ep, dims.dp
    for moe in model.moe_layers():  # what ep rank 0 keeps (every ep rank holds as many)
        moe.experts.keep_experts(0, moe.experts.num_experts // ep)
    params_list = [p for p in model.parameters() if p.requires_grad]
    expert_ids = {id(p) for moe in model.moe_layers() for p in moe.experts.parameters()}
    held = sum(p.numel() for p in params_list)
    tensors = len(params_list)
    stage = zero_stage(s)
    elem, act_elem = _precision_bytes(str(t.precision))

    # ZeRO-3 / FSDP shards each parameter evenly over the ranks holding a replica of it: dense ones
    # over all ranks, an expert shard over its dp group.
    held_dense = sum(p.numel() for p in params_list if id(p) not in expert_ids)
    sharded = held_dense / world + (held - held_dense) / dp
    params = sharded if stage >= 3 else held
    grads = sharded if stage >= 2 else held
    grad_flags = (tensors if world > 1 else 0) * elem  # grad_sync's flat buffers carry one flag per tensor
    if stage == 1:
        optim_held = _zero1_owned(params_list, expert_ids, dims)
    else:
        optim_held = sharded if stage >= 2 else held
    optim_elems = _optimizer_slots(cfg.optimizer) * optim_held
    del model

    micro = data.batch_size // (world * t.accumulate_grad_batches)  # sequences per rank per micro-step
    acts = activation_elements(m, micro * data.seq_len)
    act_bytes = sum(acts.values()) * act_elem

    per_rank = {
        "params": int(params * elem),
        "grads": int(grads * elem + grad_flags),
        "optimizer_state": int(optim_elems * elem),
        "activations": int(act_bytes),
    }
    per_rank["total"] = sum(per_rank.values())
    return {
        "params_total": total,
        "params_active_per_token": counts["params_active_per_token"],
        "params_experts": experts,
        "params_per_rank": int(params),
        "params_held_per_rank": held,
        "mesh": {"dp": dp, "ep": ep},
        "world_size": world,
        "ranks_per_node": t.devices,
        "zero_stage": stage,
        "precision": str(t.precision),
        "micro_batch_per_rank": micro,
        "seq_len": data.seq_len,
        "bytes_per_rank": per_rank,
        "activation_elements": acts,
        "a2a_bytes_per_step": a2a_bytes_per_step(m, dims, data.batch_size * data.seq_len, act_elem),
        "param_tensors": tensors,
    }


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
    parts = ", ".join(f"{k} {b[k] / GIB:.2f}" for k in ("params", "grads", "optimizer_state", "activations"))
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
        f"mesh dp={plan['mesh']['dp']} ep={plan['mesh']['ep']} (world {plan['world_size']}), ZeRO-{plan['zero_stage']}, "
        f"{plan['precision']}, {plan['micro_batch_per_rank']} x {plan['seq_len']} tokens per rank per micro-step",
        "per rank: " + ", ".join(f"{k} {v / GIB:.3f} GiB" for k, v in b.items()),
        f"all-to-all: {plan['a2a_bytes_per_step'] / GIB:.3f} GiB per step (all ranks, uniform routing)",
    ]
    mem = plan.get("memory")
    if mem:
        have = "unknown" if mem["available_bytes"] is None else f"{mem['available_bytes'] / GIB:.2f} GiB"
        lines.append(f"memory: needs {mem['needed_bytes'] / GIB:.2f} GiB, {mem['source']}: {have}")
    return "\n".join(lines)

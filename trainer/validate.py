"""Cross-field rules of a run config, checked before any process is spawned or file written.

Single-key typing is the schema's job (trainer/schema.py); here live the rules that relate keys.
Each failure is a ConfigError naming the key, the value, the rule and the fix.
"""

import dataclasses
import difflib
import glob
import importlib
import inspect
import logging
import math
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ..strategies.mesh import ParallelDims
from . import hf_init, loggers, tokenizer
from .errors import ConfigError, unknown_key_error

log = logging.getLogger("paratrain")
# and "auto", which resolve_auto_strategy turns into single, ddp, expert or hybrid
STRATEGIES = ("single", "ddp", "expert", "hybrid", "fsdp", "tensor", "pipeline")
ZERO_STAGES = (0, 1, 2, 3)
REDUCE_DTYPES = ("float32", "bfloat16")
ACTIVATION_CHECKPOINTING = ("none", "full", "selective")
SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "zero_bubble")
MULTI_STAGE_SCHEDULES = ("interleaved_1f1b", "zero_bubble")
PRECISIONS = ("32-true", "32", "bf16-mixed", "bf16-true")
CLUSTERS = ("local", "slurm")
ACCELERATORS = ("cpu", "gpu", "cuda", "auto")
GPU_ACCELERATORS = ("gpu", "cuda")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def world_size(cfg) -> int:
    return cfg.trainer.devices * cfg.trainer.num_nodes


def validate_model(m) -> None:
    _require(m.d_model % m.n_heads == 0 and (m.d_model // m.n_heads) % 2 == 0,
             f"model.d_model={m.d_model} is not divisible into model.n_heads={m.n_heads} heads of even width: "
             f"attention splits the width evenly and rotary positions rotate pairs. Choose d_model a multiple of 2 * n_heads.")
    _require(m.activation_checkpointing in ACTIVATION_CHECKPOINTING,
             f"model.activation_checkpointing={m.activation_checkpointing!r} is not a checkpointing mode: blocks keep "
             f"their activations (none), recompute them all in backward (full), or every other one (selective). "
             f"Use one of {', '.join(ACTIVATION_CHECKPOINTING)}.")
    for key in ("n_layers", "n_heads", "ffn_dim", "vocab_size"):
        _require(getattr(m, key) >= 1, f"model.{key}={getattr(m, key)} must be at least 1. Set a positive value.")
    n_kv = m.get("n_kv_heads") if hasattr(m, "get") else getattr(m, "n_kv_heads", None)
    _require(n_kv is None or (n_kv >= 1 and m.n_heads % n_kv == 0),
             f"model.n_kv_heads={n_kv} must divide model.n_heads={m.n_heads}: in grouped-query attention each key/value "
             f"head serves n_heads / n_kv_heads query heads. Use a divisor of {m.n_heads}, or null for one per query head.")
    moe = m.moe
    if moe is None:
        return
    validate_routing(moe)
    _require(moe.num_experts >= 1, f"model.moe.num_experts={moe.num_experts} must be at least 1. Set a positive count, or model.moe=null for a dense model.")
    _require(1 <= moe.top_k <= moe.num_experts,
             f"model.moe.top_k={moe.top_k} must be between 1 and model.moe.num_experts={moe.num_experts}: each token "
             f"picks top_k distinct experts. Use model.moe.top_k<={moe.num_experts}, or add experts.")
    _require(1 <= moe.every_n_layers <= m.n_layers,
             f"model.moe.every_n_layers={moe.every_n_layers} must be between 1 and model.n_layers={m.n_layers}, "
             f"or no layer would be an MoE layer. Use 1 for every layer, 2 for every other one.")
    _require(0 <= moe.first_dense_layers < m.n_layers,
             f"model.moe.first_dense_layers={moe.first_dense_layers} must be between 0 and model.n_layers - 1 = "
             f"{m.n_layers - 1}, or no layer would be an MoE layer. Use 0 for none, or model.moe=null for a dense model.")
    _require(moe.capacity_factor is None or moe.capacity_factor > 0,
             f"model.moe.capacity_factor={moe.capacity_factor} must be positive: it scales each expert's token budget. "
             f"Use e.g. 1.25, or null for dropless routing.")
    _require(moe.router_score in ("softmax", "sigmoid"),
             f"model.moe.router_score={moe.router_score!r} is not a router score function. Use softmax or sigmoid.")
    for key in ("num_shared_experts", "load_balancing_loss_weight", "z_loss_weight"):
        _require(getattr(moe, key) >= 0, f"model.moe.{key}={getattr(moe, key)} must not be negative. Use 0 to turn it off.")


def validate_routing(moe) -> None:
    """The router and shared-expert options of model.moe (the designs beyond Mixtral's)."""
    e = moe.num_experts
    _require(moe.balance_bias_rate >= 0,
             f"model.moe.balance_bias_rate={moe.balance_bias_rate} must not be negative: it is the step of the "
             f"balancing bias (DeepSeek-V3 used 1e-3). Use 0 to turn aux-loss-free balancing off.")
    _require(moe.route_scale > 0, f"model.moe.route_scale={moe.route_scale} must be positive: it multiplies the "
                                  f"combine weights. Use 1.0 for none (DeepSeek-V3 used 2.5).")
    _require(0 <= moe.router_jitter < 1,
             f"model.moe.router_jitter={moe.router_jitter} must be in [0, 1): the router input is multiplied by "
             f"noise in [1 - j, 1 + j]. Use e.g. 0.01, or 0 to turn it off.")
    _require(moe.n_groups >= 1 and e % moe.n_groups == 0 and (moe.n_groups == 1 or e // moe.n_groups >= 2),
             f"model.moe.n_groups={moe.n_groups} must divide model.moe.num_experts={e} into groups of at least 2 "
             f"experts: a group is scored by its two best experts. Use a divisor of {e} up to {e // 2}, or 1 for no groups.")
    _require(1 <= moe.topk_groups <= moe.n_groups,
             f"model.moe.topk_groups={moe.topk_groups} must be between 1 and model.moe.n_groups={moe.n_groups}: "
             f"it is how many groups a token may route into. Use at most {moe.n_groups}.")
    if moe.n_groups > 1:
        reachable = moe.topk_groups * (e // moe.n_groups)
        _require(moe.top_k <= reachable,
                 f"model.moe.top_k={moe.top_k} exceeds the {reachable} experts in model.moe.topk_groups={moe.topk_groups} "
                 f"groups of {e // moe.n_groups}: a token picks its experts inside its chosen groups. Raise "
                 f"model.moe.topk_groups, or lower model.moe.top_k.")
    if moe.shared_expert_ffn_dim is not None or moe.shared_expert_gate:
        key = "shared_expert_ffn_dim" if moe.shared_expert_ffn_dim is not None else "shared_expert_gate"
        _require(moe.num_shared_experts >= 1,
                 f"model.moe.{key}={getattr(moe, key)} configures the shared expert, but model.moe.num_shared_experts=0: "
                 f"there is none. Set model.moe.num_shared_experts=1 (a shared_expert_ffn_dim sets its width).")
    _require(moe.shared_expert_ffn_dim is None or moe.shared_expert_ffn_dim >= 1,
             f"model.moe.shared_expert_ffn_dim={moe.shared_expert_ffn_dim} must be at least 1, or null for "
             f"num_shared_experts * expert_ffn_dim.")


def validate_optimizer(o, max_steps: int) -> None:
    _require(o.lr > 0, f"optimizer.lr={o.lr} must be positive: it is the peak learning rate. Use e.g. optimizer.lr=3e-3.")
    _require(o.weight_decay >= 0, f"optimizer.weight_decay={o.weight_decay} must not be negative. Use 0 to turn it off.")
    _require(o.warmup_steps >= 0, f"optimizer.warmup_steps={o.warmup_steps} must not be negative. Use 0 for no warm-up.")
    if o.warmup_steps >= max_steps:
        warnings.warn(f"optimizer.warmup_steps={o.warmup_steps} >= trainer.max_steps={max_steps}: the run ends "
                      f"before the learning rate reaches optimizer.lr. Lower the warm-up or train longer.")
    _require(0 <= o.min_lr_ratio <= 1, f"optimizer.min_lr_ratio={o.min_lr_ratio} must be between 0 and 1: the cosine ends at lr * min_lr_ratio.")


def validate_data(d, data_ranks: int, accumulate: int) -> None:
    _require(d.source in ("stdlib", "text", "tokens"),
             f"data.source={d.source!r} is not a data source. Use stdlib, text (data.path=GLOB) or tokens (data.path=FILE).")
    if d.source in ("text", "tokens"):
        what = "a glob of text files" if d.source == "text" else "a file of uint16 tokens"
        _require(d.path is not None, f"data.path is missing: data.source={d.source} reads {what}. "
                                     f"Set it, e.g. data.path={'~/corpus/**/*.txt' if d.source == 'text' else '/data/train.u16'}.")
    if d.source == "text":
        _require(bool(glob.glob(os.path.expanduser(d.path), recursive=True)),
                 f"data.path={d.path!r} matches no file: data.source=text reads every file the glob matches. "
                 f"Point data.path at existing text files, e.g. data.path='~/corpus/**/*.txt' (quoted).")
    if d.source == "tokens":
        _require(os.path.isfile(os.path.expanduser(d.path)),
                 f"data.path={d.path!r} does not exist: data.source=tokens reads a flat file of uint16 tokens. "
                 f"Give an existing file, or use data.source=text for raw text.")
    _require(d.seq_len >= 2, f"data.seq_len={d.seq_len} must be at least 2 tokens. Use e.g. 128.")
    _require(d.batch_size >= 1 and d.batch_size % (data_ranks * accumulate) == 0,
             f"data.batch_size={d.batch_size} is not divisible by {data_ranks} data ranks x "
             f"trainer.accumulate_grad_batches={accumulate} = {data_ranks * accumulate}: data.batch_size is the global "
             f"batch and every rank must take the same number of sequences per micro-step. "
             f"Use a multiple of {data_ranks * accumulate}, or change trainer.devices / accumulate_grad_batches.")
    _require(0 < d.val_fraction < 1, f"data.val_fraction={d.val_fraction} must be between 0 and 1 (exclusive). Use e.g. 0.05.")
    _require(d.val_batches >= 1, f"data.val_batches={d.val_batches} must be at least 1.")


def validate_trainer(t) -> None:
    for key in ("devices", "num_nodes", "max_steps", "log_every_n_steps", "val_check_interval",
                "accumulate_grad_batches", "checkpoint_every_n_steps", "keep_last_checkpoints"):
        _require(getattr(t, key) >= 1, f"trainer.{key}={getattr(t, key)} must be at least 1. Set a positive integer.")
    _require(t.accelerator in ACCELERATORS,
             f"trainer.accelerator={t.accelerator!r} is not supported. Use one of {', '.join(ACCELERATORS)} "
             f"(gpu and cuda are the same: NCCL between ranks; cpu: gloo).")
    _require(t.precision in PRECISIONS, f"trainer.precision={t.precision!r} is not supported. Use one of {', '.join(PRECISIONS)}.")
    _require(t.gradient_clip_val is None or t.gradient_clip_val > 0,
             f"trainer.gradient_clip_val={t.gradient_clip_val} must be positive, or null for no clipping.")


def validate_keys(node, prefix: str = "") -> None:
    """Every key is one the schema declares: a `+key=value` override is not checked by Hydra (it adds the key)."""
    declared = node._metadata.object_type if isinstance(node, DictConfig) else None
    if not dataclasses.is_dataclass(declared):
        return  # free-form (extra: {...}) or a leaf
    names = {f.name for f in dataclasses.fields(declared)}
    for key in node.keys():
        if not prefix and key == "hydra":
            continue  # Hydra's own node, in a config composed outside a task (a sweep's jobs)
        full_key = f"{prefix}{key}"
        _require(key in names, unknown_key_error(full_key))
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_none():
            validate_keys(child, f"{full_key}.")


def first_process() -> bool:
    """False in the ranks a launcher started after the first (Lightning, torchrun, srun): they would repeat its logs."""
    return all(os.environ.get(v, "0") == "0" for v in ("RANK", "LOCAL_RANK", "SLURM_PROCID"))


def resolve_auto_strategy(cfg, announce: bool = True) -> None:
    """strategy=auto (the default) becomes single, ddp, expert or hybrid, from the world size and the model.

    1 process: single. A dense model: ddp. An MoE model: experts split over ep = gcd(num_experts,
    trainer.devices) ranks inside each node (all-to-all stays on a node's fast links), replicated over
    the rest: ep = 1 is ddp, ep = world size is expert, anything between is hybrid."""
    s = cfg.strategy
    if s.name != "auto":
        return
    for axis in ("dp", "ep"):
        _require(s.mesh[axis] == -1,
                 f"strategy=auto picks strategy.mesh itself, but strategy.mesh.{axis}={s.mesh[axis]} is set. Name the "
                 f"layout you want, e.g. strategy=hybrid strategy.mesh.{axis}={s.mesh[axis]} (or ddp / expert), or drop "
                 f"the strategy.mesh.{axis} override.")
    world = world_size(cfg)
    ep = math.gcd(cfg.model.moe.num_experts, cfg.trainer.devices) if cfg.model.moe is not None and world > 1 else 1
    name = "single" if world == 1 else "expert" if ep == world else "hybrid" if ep > 1 else "ddp"
    s.name, s.mesh.dp, s.mesh.ep = name, world // ep, ep
    if announce and first_process():
        why = ("one process" if world == 1 else "a dense model" if cfg.model.moe is None else
               f"{cfg.model.moe.num_experts} experts over trainer.devices={cfg.trainer.devices} per node: ep=gcd = {ep}")
        log.info("strategy=auto -> strategy=%s (dp=%d x ep=%d over %d process%s; %s). Set strategy=... to choose.",
                 name, world // ep, ep, world, "" if world == 1 else "es", why)


def validate_strategy(cfg) -> ParallelDims:
    s = cfg.strategy
    _require(s.name in STRATEGIES, f"strategy.name={s.name!r} is not a strategy. Use one of {', '.join(STRATEGIES)}.")
    _require(s.name != "single" or world_size(cfg) == 1,
             f"strategy=single runs one process, but trainer.devices * trainer.num_nodes = {world_size(cfg)}. "
             f"Use strategy=ddp (or expert / hybrid for an MoE model) to train on {world_size(cfg)} processes, "
             f"or set trainer.devices=1.")
    dims = ParallelDims(dp=s.mesh.dp, ep=s.mesh.ep, tp=s.mesh.tp, pp=s.mesh.pp, world_size=world_size(cfg))
    if dims.ep > 1:
        _require(cfg.model.moe is not None,
                 f"strategy={s.name} shards experts over strategy.mesh.ep={dims.ep} ranks, but the model is dense "
                 f"(model.moe=null): there are no experts to shard. Use an MoE model (e.g. +recipe=moe_8x), or "
                 f"strategy=ddp for a dense model.")
        dims.validate_experts(cfg.model.moe.num_experts)
    if dims.tp > 1:
        validate_tensor_parallel(cfg, dims)
    validate_zero(cfg, dims)
    _require(s.bucket_size_mb > 0, f"strategy.bucket_size_mb={s.bucket_size_mb} must be positive. Use e.g. 25.")
    _require(s.timeout_s > 0, f"strategy.timeout_s={s.timeout_s} must be positive: it bounds how long a collective waits for a dead rank.")
    return dims


def validate_tensor_parallel(cfg, dims: ParallelDims) -> None:
    """What strategies/tensor_parallel.py splits over tp must split evenly (FSDP's expert shards over
    dp x tp: validate_zero)."""
    tp = dims.tp
    m, moe, sp = cfg.model, cfg.model.moe, cfg.strategy.sequence_parallel
    fix = f"or change strategy.mesh.tp={tp}"
    splits = [("model.n_heads", m.n_heads, "attention heads are split over the tp ranks"),
              ("model.d_model", m.d_model, "q/k/v/o columns and rows are split over the tp ranks"),
              ("model.vocab_size", m.vocab_size, "the embedding rows and output-head columns are split over the tp ranks")]
    if m.get("n_kv_heads"):
        splits.append(("model.n_kv_heads", m.n_kv_heads, "key/value heads are split over the tp ranks like the query heads"))
    if moe is None or moe.every_n_layers > 1 or moe.get("first_dense_layers", 0) > 0:
        splits.append(("model.ffn_dim", m.ffn_dim, "the dense SwiGLU hidden units are split over the tp ranks"))
    _require(not m.get("tie_embeddings"),
             f"model.tie_embeddings=true with strategy.mesh.tp={tp}: the embedding is split by vocabulary rows and the "
             f"output head by vocabulary columns, so one tensor cannot serve both. Set model.tie_embeddings=false, {fix}.")
    _require(moe is None or not moe.get("shared_expert_gate"),
             f"model.moe.shared_expert_gate=true with strategy.mesh.tp={tp}: the gated shared expert has no tensor-parallel "
             f"plan yet. Set model.moe.shared_expert_gate=false, {fix}.")
    if moe is not None and moe.num_shared_experts > 0 and moe.get("shared_expert_ffn_dim"):
        splits.append(("model.moe.shared_expert_ffn_dim", moe.shared_expert_ffn_dim,
                       "the shared experts' hidden units are split over the tp ranks like the dense FFN's"))
    elif moe is not None and moe.num_shared_experts > 0:
        width = moe.expert_ffn_dim or m.ffn_dim
        key = "model.moe.expert_ffn_dim" if moe.expert_ffn_dim else "model.ffn_dim (= the expert width)"
        _require(moe.num_shared_experts * width % tp == 0,
                 f"{key}={width} x model.moe.num_shared_experts={moe.num_shared_experts} = {moe.num_shared_experts * width} "
                 f"is not divisible by strategy.mesh.tp={tp}: the shared experts' hidden units are split over the tp "
                 f"ranks like the dense FFN's. Use a width that makes it a multiple of {tp}, {fix}.")
    for key, value, why in splits:
        _require(value % tp == 0, f"{key}={value} is not divisible by strategy.mesh.tp={tp}: {why}. "
                                  f"Use a multiple of {tp} for {key}, {fix}.")
    _require(not sp or cfg.data.seq_len % tp == 0,
             f"data.seq_len={cfg.data.seq_len} is not divisible by strategy.mesh.tp={tp}: with "
             f"strategy.sequence_parallel=true each tp rank holds an equal slice of every sequence between blocks. "
             f"Use a multiple of {tp} for data.seq_len, set strategy.sequence_parallel=false, {fix}.")


def validate_zero(cfg, dims: ParallelDims) -> None:
    """strategy.zero_stage: 0-3, only with data ranks to shard over; FSDP2's even-sharding need for experts."""
    s = cfg.strategy
    _require(s.get("shard_optimizer") is None,
             f"strategy.shard_optimizer={s.shard_optimizer} was removed: one key, strategy.zero_stage, now says what is "
             f"sharded. Use strategy.zero_stage=1 (optimizer state sharded; 2 adds gradients, 3 parameters) and "
             f"drop strategy.shard_optimizer.")
    stage = s.zero_stage
    _require(stage in ZERO_STAGES and not isinstance(stage, bool),
             f"strategy.zero_stage={stage!r} is not a ZeRO stage: 0 replicates everything, 1 shards optimizer state, "
             f"2 also gradients, 3 also parameters. Use 0, 1, 2 or 3.")
    _require(stage == 0 or dims.world_size > 1,
             f"strategy.zero_stage={stage} (strategy={s.name}) shards over data-parallel ranks, but "
             f"trainer.devices * trainer.num_nodes = 1: there is nothing to shard over. Use strategy.zero_stage=0 "
             f"on one process, or e.g. strategy=fsdp trainer.devices=2.")
    _require(s.reduce_dtype in REDUCE_DTYPES,
             f"strategy.reduce_dtype={s.reduce_dtype!r} is not a reduce dtype: ZeRO-2/3 reduce-scatter gradients in "
             f"float32 or bfloat16. Use one of {', '.join(REDUCE_DTYPES)}.")
    _require(stage < 2 or cfg.trainer.precision != "bf16-true",
             f"trainer.precision=bf16-true with strategy.zero_stage={stage}: FSDP2 keeps fp32 master shards and "
             f"computes in bf16 through its mixed-precision policy, which trainer.precision=bf16-mixed selects. Use "
             f"trainer.precision=bf16-mixed (strategy.reduce_dtype sets the gradient reduce dtype), or zero_stage<=1.")
    moe = cfg.model.moe
    if stage < 2 or moe is None:
        return
    from ..strategies.fsdp import expert_shard_dim  # only here: importing FSDP costs other configs 0.5 s

    ranks = dims.dp * dims.tp  # the ranks FSDP shards each expert stack over (strategies/fsdp.py)
    if expert_shard_dim(moe.num_experts // dims.ep, ranks) == 1:
        # The local experts do not divide evenly over those ranks: the stacks are sharded on dim 1.
        over = f"strategy.mesh.dp={ranks}" if dims.tp == 1 else f"strategy.mesh.dp x strategy.mesh.tp = {ranks}"
        replicated = " (each expert is replicated over tp)" if dims.tp > 1 else ""
        hidden = moe.expert_ffn_dim or cfg.model.ffn_dim
        for key, width in (("model.d_model", cfg.model.d_model), ("model.moe.expert_ffn_dim", hidden)):
            _require(width % ranks == 0,
                     f"{key}={width} is not divisible by {over}: under strategy.zero_stage={stage} the "
                     f"{moe.num_experts // dims.ep} experts per ep rank do not divide evenly over the {ranks} ranks "
                     f"that hold them{replicated}, so each expert's matrices are split evenly over them instead. Use "
                     f"a multiple of {ranks} for {key} or for the experts per ep rank (model.moe.num_experts / "
                     f"strategy.mesh.ep), or strategy.zero_stage=0 or 1.")


def pipeline_microbatches(p, pp: int) -> int:
    return p.microbatches if p.microbatches is not None else 2 * pp


def validate_pipeline(p, dims: ParallelDims, n_layers: int, per_rank_batch: int) -> None:
    """strategy.pipeline.* against the mesh, the model depth and the per-rank batch of one pipeline
    step (strategy.mesh.pp > 1). trainer.accumulate_grad_batches, strategy.zero_stage and strategy.mesh.tp
    compose with it under their own rules."""
    pp = dims.pp
    _require(p.schedule in SCHEDULES, f"strategy.pipeline.schedule={p.schedule!r} is not a pipeline schedule. "
                                      f"Use one of {', '.join(SCHEDULES)}.")
    spr = p.stages_per_rank
    _require(spr >= 1, f"strategy.pipeline.stages_per_rank={spr} must be at least 1. Use 1, or 2 with an interleaved schedule.")
    _require(spr == 1 or p.schedule in MULTI_STAGE_SCHEDULES,
             f"strategy.pipeline.stages_per_rank={spr} needs a schedule that runs several stages per rank, but "
             f"strategy.pipeline.schedule={p.schedule} runs one. Use schedule=interleaved_1f1b or zero_bubble, "
             f"or stages_per_rank=1.")
    stages = pp * spr
    _require(n_layers >= stages,
             f"model.n_layers={n_layers} is fewer than the {stages} pipeline stages (strategy.mesh.pp={pp} x "
             f"strategy.pipeline.stages_per_rank={spr}): every stage needs at least one block. Use model.n_layers>={stages}, "
             f"or fewer stages.")
    if p.split_points is not None:
        points = list(p.split_points)
        ok = len(points) == stages - 1 and all(0 < a < b < n_layers for a, b in zip([0, *points], [*points, n_layers]))
        _require(ok, f"strategy.pipeline.split_points={points} does not split model.n_layers={n_layers} blocks into "
                     f"{stages} stages: give {stages - 1} increasing block indices between 1 and {n_layers - 1} (the first "
                     f"block of each stage after the first), e.g. {[(i + 1) * n_layers // stages for i in range(stages - 1)]}, "
                     f"or null for an even split.")
    m = pipeline_microbatches(p, pp)
    _require(m >= 1 and per_rank_batch % m == 0,
             f"strategy.pipeline.microbatches={m} does not divide the per-rank batch of {per_rank_batch} sequences "
             f"(data.batch_size over {dims.data_ranks} data ranks x trainer.accumulate_grad_batches): every micro-batch "
             f"must hold the same number of sequences. Use a divisor of {per_rank_batch}, or change data.batch_size.")
    _require(p.schedule == "gpipe" or m >= pp,
             f"strategy.pipeline.microbatches={m} is fewer than strategy.mesh.pp={pp}: schedule={p.schedule} keeps one "
             f"micro-batch in flight per stage, so with fewer the pipeline cannot fill. Use microbatches>={pp} "
             f"(default 2 x pp), or schedule=gpipe.")
    if p.schedule in MULTI_STAGE_SCHEDULES:
        rounds = max(1, m // pp)
        _require(m % rounds == 0,
                 f"strategy.pipeline.microbatches={m} is not a multiple of its {rounds} rounds of strategy.mesh.pp={pp}: "
                 f"schedule={p.schedule} runs micro-batches in rounds of about pp. Use a multiple of {pp}.")


def validate_cluster(cfg, submitting: bool = False) -> None:
    """cluster=slurm: the job shape Lightning checks inside the job, and (when submitting) sbatch itself."""
    c, t = cfg.cluster, cfg.trainer
    _require(c.name in CLUSTERS, f"cluster.name={c.name!r} is not a cluster. Use cluster=local or cluster=slurm.")
    if c.name != "slurm":
        return
    _require(c.tasks_per_node == t.devices,
             f"cluster.tasks_per_node={c.tasks_per_node} differs from trainer.devices={t.devices}: each SLURM task is "
             f"one rank, and Lightning requires SLURM_NTASKS_PER_NODE == trainer.devices. Drop the "
             f"cluster.tasks_per_node override (it follows trainer.devices), or set trainer.devices={c.tasks_per_node}.")
    _require(c.nodes == t.num_nodes,
             f"cluster.nodes={c.nodes} differs from trainer.num_nodes={t.num_nodes}: Lightning requires SLURM_NNODES "
             f"== trainer.num_nodes. Drop the cluster.nodes override (it follows trainer.num_nodes), or set "
             f"trainer.num_nodes={c.nodes}.")
    if c.gpus_per_node is not None and t.accelerator in GPU_ACCELERATORS:
        _require(c.gpus_per_node == t.devices,
                 f"cluster.gpus_per_node={c.gpus_per_node} differs from trainer.devices={t.devices}: with "
                 f"trainer.accelerator={t.accelerator} each rank drives one GPU. Drop the cluster.gpus_per_node "
                 f"override (null = trainer.devices), or set trainer.devices={c.gpus_per_node}.")
    for option in c.sbatch:
        _require(str(option).startswith("--") and len(str(option)) > 2,
                 f"cluster.sbatch entry {option!r} is not a long sbatch option: the entries are written as on sbatch's "
                 f"command line. Use e.g. 'cluster.sbatch=[--mail-type END,--exclusive]'.")
    _require(c.timeout_min >= 1, f"cluster.timeout_min={c.timeout_min} must be at least 1 (minutes). Use e.g. cluster.timeout_min=240.")
    _require(c.requeue_on_timeout >= 0, f"cluster.requeue_on_timeout={c.requeue_on_timeout} must not be negative. Use 0 to never requeue.")
    if submitting:
        _require(shutil.which("sbatch") is not None,
                 f"cluster=slurm submits jobs with sbatch, but sbatch is not on PATH ({os.environ.get('PATH', '')}). "
                 f"Run train where SLURM's commands are installed (e.g. a login node), add their directory to PATH, "
                 f"or use cluster=local.")


def validate_devices(t, launched_externally: bool) -> None:
    """The devices this machine has: checked where the run trains, not where a SLURM job is submitted."""
    if t.accelerator not in (*GPU_ACCELERATORS, "auto"):
        return
    found = torch.cuda.device_count()
    if t.accelerator == "auto" and found == 0:
        return  # auto on a machine without GPUs: the CPU
    _require(found > 0, f"trainer.accelerator={t.accelerator}, but this machine has no CUDA GPU that torch can use "
                        f"(torch {torch.__version__}, CUDA {torch.version.cuda or 'not built in'}). Use "
                        f"trainer.accelerator=cpu, or run where the GPUs are (e.g. cluster=slurm with a GPU partition).")
    # Under srun or torchrun each process may see only its own GPU: the launcher has placed them.
    _require(launched_externally or t.devices <= found,
             f"trainer.devices={t.devices} asks for {t.devices} GPUs per node, but this machine has {found}. "
             f"Use trainer.devices={found} or fewer (data.batch_size must stay divisible by the data ranks).")


def derive(cfg) -> None:
    """Fill the keys that follow from inputs, in place, before the rules see them: model.init_from fixes the
    architecture, data.tokenizer the vocabulary. An explicit command-line override that disagrees is an error."""
    explicit = hf_init.explicit_model_overrides()
    if cfg.model.get("init_from"):
        hf_init.fill_model_config(cfg, explicit)
    tokenizer.fill_vocab_size(cfg, explicit)


def validate(cfg, announce: bool = True) -> ParallelDims:
    """Check every key, fill derived keys (derive), check every cross-field rule; resolve strategy=auto in cfg
    (logged if `announce`); return the resolved mesh degrees."""
    validate_keys(cfg)
    validate_trainer(cfg.trainer)
    validate_cluster(cfg)
    loggers.check_packages(cfg.get("logger"))
    derive(cfg)
    validate_model(cfg.model)
    validate_optimizer(cfg.optimizer, cfg.trainer.max_steps)
    resolve_auto_strategy(cfg, announce)  # before the mesh degrees are resolved from strategy.mesh
    dims = validate_strategy(cfg)
    # Every (dp, ep) coordinate reads a different shard of the global batch; its tp ranks and a
    # pipeline's stages share one.
    validate_data(cfg.data, dims.data_ranks, cfg.trainer.accumulate_grad_batches)
    p = cfg.strategy.pipeline
    if dims.pp == 1 and (p.schedule, p.microbatches, p.stages_per_rank, p.split_points) != ("1f1b", None, 1, None):
        warnings.warn("strategy.pipeline.* is set but strategy.mesh.pp=1: there is no pipeline, so the schedule, "
                      "micro-batches and split are ignored. Set strategy.mesh.pp (or use strategy=pipeline with "
                      "trainer.devices > 1) to pipeline the model.")
    if dims.pp > 1:
        z = cfg.strategy.zero_stage
        _require(z == 0 or dims.data_ranks > 1,
                 f"strategy.zero_stage={z} with strategy.mesh.pp={dims.pp} and strategy.mesh.dp x strategy.mesh.ep = 1: "
                 f"ZeRO shards over the ranks of a stage that read different data, and this mesh has none, so "
                 f"nothing would be sharded. Use strategy.zero_stage=0, or give each stage data ranks (e.g. "
                 f"strategy.mesh.dp=2 with trainer.devices={2 * dims.world_size}).")
        validate_pipeline(cfg.strategy.pipeline, dims, cfg.model.n_layers,
                          cfg.data.batch_size // (dims.data_ranks * cfg.trainer.accumulate_grad_batches))
    resolve_targets(cfg)
    return dims


# --- resolved before spawning: what the config names, and where the run writes ------------------
def _import_object(path: str):
    """The object a dotted `_target_` names; raises ConfigError-ready (reason, close names) as LookupError."""
    parts = str(path).split(".")
    for cut in range(len(parts), 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name and not module_name.startswith(e.name):
                raise LookupError(f"importing {module_name} fails: {e}", []) from None  # a dependency is missing
            continue
        except Exception as e:  # noqa: BLE001 - a module that fails to import is the user's to see
            raise LookupError(f"importing {module_name} fails: {type(e).__name__}: {e}", []) from None
        for i, name in enumerate(parts[cut:]):
            if not hasattr(obj, name):
                where = ".".join(parts[: cut + i])
                names = {n for n in [*dir(obj), *getattr(obj, "__all__", [])] if not n.startswith("_")}
                close = difflib.get_close_matches(name, sorted(names), n=3)
                raise LookupError(f"{where} has no attribute {name!r}", [f"{where}.{c}" for c in close])
            obj = getattr(obj, name)
        return obj
    raise LookupError(f"no module {parts[0]!r} is installed", [])


def _targets(node, prefix: str = ""):
    if isinstance(node, dict):
        if "_target_" in node:
            yield prefix, node
        for key, value in node.items():
            yield from _targets(value, f"{prefix}.{key}" if prefix else str(key))


def resolve_targets(cfg) -> None:
    """Every `_target_` in the config imports, and takes the arguments the run will give it."""
    tree = OmegaConf.to_container(cfg, resolve=False)
    for key, node in _targets(tree):
        target = node["_target_"]
        try:
            obj = _import_object(target)
        except LookupError as e:
            reason, close = e.args
            hint = f"Did you mean {' or '.join(close)}? " if close else ""
            example = ", e.g. torch.optim.AdamW" if key == "optimizer" else ""
            raise ConfigError(f"{key}._target_={target!r} cannot be resolved: {reason}. `_target_` is the dotted import "
                              f"path of what {key} instantiates. {hint}Give an importable class{example}.") from None
        _require(callable(obj), f"{key}._target_={target!r} names a {type(obj).__name__}, not a class or function: "
                                f"it is instantiated. Give a class, e.g. torch.optim.AdamW.")
        if key == "optimizer":
            _require(isinstance(obj, type) and issubclass(obj, torch.optim.Optimizer),
                     f"optimizer._target_={target!r} is not a torch.optim.Optimizer: the run steps it like one. "
                     f"Use a torch.optim class (e.g. torch.optim.AdamW, torch.optim.SGD) or a subclass of it.")
            # What module.build_optimizer passes: the parameter groups, lr, and the non-null extra keys.
            given = {"lr": node.get("lr"), **{k: node[k] for k in ("betas", "momentum") if node.get(k) is not None}}
            _check_arguments(obj, key, target, given, args=([],))
        else:
            given = {k: v for k, v in node.items() if not (k.startswith("_") and k.endswith("_"))}
            _check_arguments(obj, key, target, given)


def _check_arguments(obj, key: str, target: str, given: dict, args: tuple = ()) -> None:
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return  # a builtin without a signature: nothing to check here
    try:
        signature.bind_partial(*args, **given)
    except TypeError as e:
        bad = next((k for k in given if f"'{k}'" in str(e)), None)
        setting = f"{key}.{bad}={given[bad]!r}" if bad else f"{key}._target_={target!r}"
        raise ConfigError(f"{setting} is not accepted by {target}: {e}. Remove the key (or set it to null), or pick "
                          f"another {key}._target_ that takes it.") from None


def _probe_writable(directory: Path, key: str, value) -> None:
    """Create and remove one file in `directory` (made if missing): os.access says yes to root on a read-only disk."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".paratrain-probe-"):
            pass
    except OSError as e:
        raise ConfigError(f"{key}={value} cannot be written: {directory}: {e.strerror or e}. The run writes its "
                          f"checkpoints, metrics and token cache there. Point {key} at a writable directory.") from None


def checkpoint_bytes(params_total: int, cfg) -> int:
    """The planned size of one checkpoint: weights and optimizer state of every parameter, plus metadata.
    Measured on the tiny MoE of the tests: 927 kB on disk for 49,568 parameters under AdamW (this gives 851 kB)."""
    element = 2 if cfg.trainer.precision == "bf16-true" else 4
    name = str(cfg.optimizer._target_).rsplit(".", 1)[-1]
    momentum = cfg.optimizer.get("momentum")
    slots = {"SGD": 1 if momentum else 0, "Adagrad": 1, "RMSprop": 1}.get(name, 2)  # Adam and kin: two moments
    return params_total * element * (1 + slots) + 256 * 1024


def check_run_paths(cfg, run_dir, params_total: int) -> None:
    """Every path the run writes is writable, and the run directory's disk holds one checkpoint more."""
    from .data import cache_root  # data.py imports nothing of ours but errors; keeps validate light

    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    _require(not ckpt_dir.exists() or ckpt_dir.is_dir(),
             f"hydra.run.dir={run_dir} holds a file named checkpoints, where the run keeps its checkpoint directory. "
             f"Move that file away, or pick another hydra.run.dir.")
    _probe_writable(ckpt_dir if ckpt_dir.is_dir() else run_dir, "hydra.run.dir", run_dir)
    cache_key = "data.cache_dir" if cfg.data.get("cache_dir") else "PARATRAIN_CACHE"
    cache = cache_root(cfg.data.get("cache_dir"))
    _probe_writable(cache, cache_key, cache)
    needed = checkpoint_bytes(params_total, cfg)
    free = shutil.disk_usage(ckpt_dir if ckpt_dir.is_dir() else run_dir).free
    _require(free >= needed,
             f"hydra.run.dir={run_dir} has {free:,} bytes free on its disk, but one checkpoint of this run needs about "
             f"{needed:,} bytes ({params_total:,} parameters with their optimizer state). Free space there, or pick a "
             f"hydra.run.dir on a larger disk.")

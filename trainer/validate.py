"""Cross-field rules of a run config, checked before any process is spawned or file written.

Single-key typing is the schema's job (trainer/schema.py); here live the rules that relate keys.
Each failure is a ConfigError naming the key, the value, the rule and the fix.
"""

import glob
import os
import shutil
import warnings

import torch

from ..strategies.mesh import ParallelDims
from .errors import ConfigError

STRATEGIES = ("single", "ddp", "expert", "hybrid", "fsdp", "tensor")
ZERO_STAGES = (0, 1, 2, 3)
REDUCE_DTYPES = ("float32", "bfloat16")
ACTIVATION_CHECKPOINTING = ("none", "full", "selective")
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
    moe = m.moe
    if moe is None:
        return
    _require(moe.num_experts >= 1, f"model.moe.num_experts={moe.num_experts} must be at least 1. Set a positive count, or model.moe=null for a dense model.")
    _require(1 <= moe.top_k <= moe.num_experts,
             f"model.moe.top_k={moe.top_k} must be between 1 and model.moe.num_experts={moe.num_experts}: each token "
             f"picks top_k distinct experts. Use model.moe.top_k<={moe.num_experts}, or add experts.")
    _require(1 <= moe.every_n_layers <= m.n_layers,
             f"model.moe.every_n_layers={moe.every_n_layers} must be between 1 and model.n_layers={m.n_layers}, "
             f"or no layer would be an MoE layer. Use 1 for every layer, 2 for every other one.")
    _require(moe.capacity_factor is None or moe.capacity_factor > 0,
             f"model.moe.capacity_factor={moe.capacity_factor} must be positive: it scales each expert's token budget. "
             f"Use e.g. 1.25, or null for dropless routing.")
    _require(moe.router_score in ("softmax", "sigmoid"),
             f"model.moe.router_score={moe.router_score!r} is not a router score function. Use softmax or sigmoid.")
    for key in ("num_shared_experts", "load_balancing_loss_weight", "z_loss_weight"):
        _require(getattr(moe, key) >= 0, f"model.moe.{key}={getattr(moe, key)} must not be negative. Use 0 to turn it off.")


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


def validate_strategy(cfg) -> ParallelDims:
    s = cfg.strategy
    _require(s.name in STRATEGIES, f"strategy.name={s.name!r} is not a strategy. Use one of {', '.join(STRATEGIES)}.")
    _require(s.name != "single" or world_size(cfg) == 1,
             f"strategy=single runs one process, but trainer.devices * trainer.num_nodes = {world_size(cfg)}. "
             f"Use strategy=ddp (or expert / hybrid for an MoE model) to train on {world_size(cfg)} processes, "
             f"or set trainer.devices=1.")
    dims = ParallelDims(dp=s.mesh.dp, ep=s.mesh.ep, tp=s.mesh.tp, world_size=world_size(cfg))
    if dims.ep > 1:
        _require(cfg.model.moe is not None,
                 f"strategy={s.name} shards experts over strategy.mesh.ep={dims.ep} ranks, but the model is dense "
                 f"(model.moe=null): there are no experts to shard. Use an MoE model (e.g. +recipe=moe_8x), or "
                 f"strategy=ddp for a dense model.")
        dims.validate_experts(cfg.model.moe.num_experts)
    if dims.tp > 1:
        validate_tensor_parallel(cfg, dims.tp)
    validate_zero(cfg, dims)
    _require(s.bucket_size_mb > 0, f"strategy.bucket_size_mb={s.bucket_size_mb} must be positive. Use e.g. 25.")
    _require(s.timeout_s > 0, f"strategy.timeout_s={s.timeout_s} must be positive: it bounds how long a collective waits for a dead rank.")
    return dims


def validate_tensor_parallel(cfg, tp: int) -> None:
    """What strategies/tensor_parallel.py splits over tp must split evenly."""
    m, moe, sp = cfg.model, cfg.model.moe, cfg.strategy.sequence_parallel
    fix = f"or change strategy.mesh.tp={tp}"
    splits = [("model.n_heads", m.n_heads, "attention heads are split over the tp ranks"),
              ("model.d_model", m.d_model, "q/k/v/o columns and rows are split over the tp ranks"),
              ("model.vocab_size", m.vocab_size, "the embedding rows and output-head columns are split over the tp ranks")]
    if moe is None or moe.every_n_layers > 1:
        splits.append(("model.ffn_dim", m.ffn_dim, "the dense SwiGLU hidden units are split over the tp ranks"))
    if moe is not None and moe.num_shared_experts > 0:
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
    stage = cfg.strategy.zero_stage
    _require(stage != 1,
             f"strategy.zero_stage=1 with strategy.mesh.tp={tp}: ZeRO-1's whole-parameter partition does not handle "
             f"tp-sharded (DTensor) parameters. Use strategy.zero_stage=2 or 3 (FSDP2 composes with tp), 0, or "
             f"strategy.mesh.tp=1.")
    _require(stage < 2 or moe is None,
             f"strategy.zero_stage={stage} with strategy.mesh.tp={tp} and an MoE model: FSDP2 would reduce the router "
             f"and expert gradients over the data ranks only, but under tp they are partial sums that must also be "
             f"summed over tp (strategies/tensor_parallel.py). Use strategy.zero_stage=0 with tp for MoE models, or "
             f"strategy.mesh.tp=1.")


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
    if stage >= 2 and moe is not None and dims.dp > 1:
        # Expert stacks (E_local, d, h) / (E_local, h, d) are sharded on dim 1 over dp (strategies/fsdp.py).
        hidden = moe.expert_ffn_dim or cfg.model.ffn_dim
        for key, width in (("model.d_model", cfg.model.d_model), ("model.moe.expert_ffn_dim", hidden)):
            _require(width % dims.dp == 0,
                     f"{key}={width} is not divisible by strategy.mesh.dp={dims.dp}: under strategy.zero_stage={stage} "
                     f"each expert's matrices are split evenly over the dp ranks that hold it. Use a multiple of "
                     f"{dims.dp}, or strategy.zero_stage=1.")


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
    if t.accelerator not in GPU_ACCELERATORS:
        return
    found = torch.cuda.device_count()
    _require(found > 0, f"trainer.accelerator={t.accelerator}, but this machine has no CUDA GPU that torch can use "
                        f"(torch {torch.__version__}, CUDA {torch.version.cuda or 'not built in'}). Use "
                        f"trainer.accelerator=cpu, or run where the GPUs are (e.g. cluster=slurm with a GPU partition).")
    # Under srun or torchrun each process may see only its own GPU: the launcher has placed them.
    _require(launched_externally or t.devices <= found,
             f"trainer.devices={t.devices} asks for {t.devices} GPUs per node, but this machine has {found}. "
             f"Use trainer.devices={found} or fewer (data.batch_size must stay divisible by the data ranks).")


def validate(cfg) -> ParallelDims:
    """Check every cross-field rule; return the resolved mesh degrees."""
    validate_trainer(cfg.trainer)
    validate_cluster(cfg)
    validate_model(cfg.model)
    validate_optimizer(cfg.optimizer, cfg.trainer.max_steps)
    dims = validate_strategy(cfg)
    # Every (dp, ep) coordinate reads a different shard of the global batch; its tp ranks share one.
    validate_data(cfg.data, dims.data_ranks, cfg.trainer.accumulate_grad_batches)
    return dims

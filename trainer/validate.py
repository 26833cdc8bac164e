"""Cross-field rules of a run config, checked before any process is spawned or file written.

Single-key typing is the schema's job (trainer/schema.py); here live the rules that relate keys.
Each failure is a ConfigError naming the key, the value, the rule and the fix.
"""

import dataclasses
import glob
import logging
import math
import os
import shutil
import warnings

import torch
from omegaconf import DictConfig

from ..strategies.mesh import ParallelDims
from .errors import ConfigError, unknown_key_error

log = logging.getLogger("paratrain")
STRATEGIES = ("single", "ddp", "expert", "hybrid")  # and "auto", which resolve_auto_strategy turns into one of them
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
    dims = ParallelDims(dp=s.mesh.dp, ep=s.mesh.ep, world_size=world_size(cfg))
    if dims.ep > 1:
        _require(cfg.model.moe is not None,
                 f"strategy={s.name} shards experts over strategy.mesh.ep={dims.ep} ranks, but the model is dense "
                 f"(model.moe=null): there are no experts to shard. Use an MoE model (e.g. +recipe=moe_8x), or "
                 f"strategy=ddp for a dense model.")
        dims.validate_experts(cfg.model.moe.num_experts)
    _require(s.bucket_size_mb > 0, f"strategy.bucket_size_mb={s.bucket_size_mb} must be positive. Use e.g. 25.")
    _require(s.timeout_s > 0, f"strategy.timeout_s={s.timeout_s} must be positive: it bounds how long a collective waits for a dead rank.")
    return dims


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


def validate(cfg, announce: bool = True) -> ParallelDims:
    """Check every key and cross-field rule; resolve strategy=auto in cfg (logged if `announce`); return the mesh degrees."""
    validate_keys(cfg)
    validate_trainer(cfg.trainer)
    validate_cluster(cfg)
    validate_model(cfg.model)
    validate_optimizer(cfg.optimizer, cfg.trainer.max_steps)
    resolve_auto_strategy(cfg, announce)  # before the mesh degrees are resolved from strategy.mesh
    dims = validate_strategy(cfg)
    # Every rank reads a different shard of the global batch, whatever the mesh axes.
    validate_data(cfg.data, dims.world_size, cfg.trainer.accumulate_grad_batches)
    return dims

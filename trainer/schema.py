"""Typed schemas of the config tree.

Every YAML file under `conf/` is merged onto these dataclasses (registered in Hydra's ConfigStore
as `base_config`), so an unknown or misspelt key fails while Hydra composes, before any work.
Rules that span several fields live in `validate()`, the one place that checks them.
"""

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class MoEConfig:
    num_experts: int = 8
    """Routed experts per MoE layer."""
    top_k: int = 2
    """Experts each token is sent to."""
    every_n_layers: int = 1
    """Layer i has an MoE FFN when (i + 1) % every_n_layers == 0; the others stay dense."""
    first_dense_layers: int = 0
    """Layers [0, first_dense_layers) keep the dense FFN (DeepSeek-V3's first_k_dense_replace: 3)."""
    expert_ffn_dim: Optional[int] = None
    """Hidden width of one expert's SwiGLU FFN; null = model.ffn_dim."""
    capacity_factor: Optional[float] = None
    """null = dropless; else each expert takes at most ceil(cf * seq_len * top_k / num_experts)
    tokens of one sequence (capacity is per sequence, so drops do not depend on the layout)."""
    num_shared_experts: int = 0
    """Experts every token passes through, besides its top_k routed ones."""
    load_balancing_loss_weight: float = 0.01
    """Weight of the Switch-Transformer load-balancing loss (computed per sequence)."""
    z_loss_weight: float = 0.001
    """Weight of the router z-loss (mean squared logsumexp of router logits)."""
    router_score: str = "softmax"
    """How router logits become scores: softmax | sigmoid."""
    renormalize: bool = True
    """Renormalise the top_k weights of each token to sum to 1."""
    # --- routing designs beyond Mixtral's (each off by default: today's math unchanged) -----------
    balance_bias_rate: float = 0.0
    """Auxiliary-loss-free balancing (DeepSeek-V3): after each optimizer step every expert's choice bias
    moves by this * sign(mean load - its load), from the whole global batch's counts; 0 = off."""
    route_scale: float = 1.0
    """Constant multiplier on the combine weights (DeepSeek-V3's routed_scaling_factor)."""
    n_groups: int = 1
    """Group-limited routing: experts form n_groups equal groups; 1 = off."""
    topk_groups: int = 1
    """With n_groups > 1: groups each token may choose its experts from (best by their top-2 scores)."""
    shared_expert_gate: bool = False
    """Scale the shared experts' output per token by sigmoid(Linear(d_model, 1)) (Qwen2-MoE)."""
    shared_expert_ffn_dim: Optional[int] = None
    """Hidden width of the (fused) shared expert; null = num_shared_experts * expert_ffn_dim."""
    router_jitter: float = 0.0
    """Training only: multiply the router's input by noise ~ U[1 - j, 1 + j] (Mixtral); 0 = off."""


@dataclass
class ModelConfig:
    vocab_size: int = 256
    """Byte-level vocabulary."""
    d_model: int = 128
    """Residual stream width."""
    n_layers: int = 4
    """Transformer blocks."""
    n_heads: int = 4
    """Attention heads; d_model must be divisible by it."""
    ffn_dim: int = 512
    """Hidden width of the dense SwiGLU FFN."""
    rope_theta: float = 10000.0
    """Base of the rotary position frequencies."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    init_std: float = 0.02
    """Standard deviation of the normal weight initialisation."""
    moe: Optional[MoEConfig] = None
    """null = dense model; set to make FFNs Mixture-of-Experts layers."""
    # --- attention and embedding designs (off by default) -----------------------------------------
    n_kv_heads: Optional[int] = None
    """Key/value heads (grouped-query attention); null = n_heads. Must divide n_heads."""
    tie_embeddings: bool = False
    """The output head shares the input embedding's weights."""
    init_from: Optional[str] = None
    """A local Hugging Face model directory (config.json + safetensors; Llama or Mixtral): its config fills
    the architecture keys above and its weights replace the initial ones, under any layout. null = random init."""
    activation_checkpointing: str = "none"
    """none | full (recompute every block in backward) | selective (every other block: blocks 0, 2, ...)."""


@dataclass
class MeshConfig:
    dp: int = 1
    """Data-parallel degree; -1 = infer from the world size."""
    ep: int = 1
    """Expert-parallel degree; -1 = infer from the world size."""
    tp: int = 1
    """Tensor-parallel degree (innermost axis: weight matrices split over tp contiguous ranks); -1 = infer."""
    pp: int = 1
    """Pipeline-parallel degree (stages, the outermost axis); -1 = infer from the world size."""


@dataclass
class PipelineConfig:
    schedule: str = "1f1b"
    """gpipe | 1f1b | interleaved_1f1b | zero_bubble (torch's ScheduleInterleavedZeroBubble, ZB1P)."""
    microbatches: Optional[int] = None
    """Micro-batches the per-rank batch is split into per optimizer step; null = 2 x strategy.mesh.pp."""
    stages_per_rank: int = 1
    """Stages each pp rank holds (looped: stage s on rank s % pp); > 1 for interleaved_1f1b and zero_bubble."""
    split_points: Optional[List[int]] = None
    """First block of each stage after the first (pp x stages_per_rank - 1 increasing indices); null = even."""


@dataclass
class StrategyConfig:
    _target_: str = "paratrain.strategies.MeshStrategy"
    name: str = "auto"
    """auto | single | ddp | expert | hybrid | fsdp | tensor | pipeline: how the run is laid out; auto picks
    single, ddp, expert or hybrid from the world size and the model."""
    mesh: MeshConfig = field(default_factory=MeshConfig)
    """Degrees of each mesh axis; their product must equal trainer.devices * trainer.num_nodes."""
    bucket_size_mb: float = 25.0
    """Gradients are all-reduced in buckets of about this many MiB."""
    sequence_parallel: bool = True
    """With strategy.mesh.tp > 1: norms and the residual stream split over tp along the sequence
    (all-gather + reduce-scatter per block instead of all-reduces); data.seq_len must divide by tp."""
    zero_stage: int = 0
    """ZeRO stage over the data ranks: 0 = replicated (all-reduce), 1 = + optimizer state sharded,
    2 = + gradients sharded (FSDP2, reshard_after_forward=False), 3 = + parameters (FSDP2)."""
    reduce_dtype: str = "float32"
    """ZeRO-2/3 with trainer.precision=bf16-mixed: dtype of the gradient reduce-scatter (float32 | bfloat16)."""
    shard_optimizer: Optional[bool] = None
    """Removed: use strategy.zero_stage=1 (setting this key is an error that says so)."""
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    """Micro-batch schedule and stage split, used when strategy.mesh.pp > 1."""
    timeout_s: float = 600.0
    """Collective timeout: a dead rank ends the job with an error after this long."""
    process_group_backend: Optional[str] = None
    """null = gloo on CPU, nccl on GPU."""


@dataclass
class OptimizerConfig:
    _target_: str = "torch.optim.AdamW"
    """Any torch.optim class; it receives lr, weight_decay and the non-null extra keys below."""
    lr: float = 3e-3
    """Peak learning rate, reached at the end of warm-up."""
    weight_decay: float = 0.1
    """Decoupled weight decay, applied to matrices only (not norms, not biases)."""
    betas: Optional[List[float]] = None
    """Adam betas; null = the optimizer's default."""
    momentum: Optional[float] = None
    """SGD momentum; null = the optimizer's default."""
    warmup_steps: int = 40
    """Linear warm-up from 0 to lr over this many optimizer steps."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at lr * min_lr_ratio at trainer.max_steps."""


@dataclass
class DataConfig:
    source: str = "stdlib"
    """stdlib (the Python standard library's source, embedded) | text (a glob of text files) |
    tokens (a pre-tokenised uint16 file)."""
    path: Optional[str] = None
    """Glob of text files (source=text) or path of a uint16 token file (source=tokens)."""
    tokenizer: str = "bytes"
    """bytes (one token per byte, vocabulary 256) | the path of a tokenizer.json (Hugging Face `tokenizers`,
    e.g. from `paratrain-tokenizer train`); model.vocab_size follows it. Text is tokenised once, cached per tokenizer."""
    batch_size: int = 32
    """GLOBAL batch: sequences per optimizer step over all ranks."""
    seq_len: int = 128
    """Tokens per sequence."""
    val_fraction: float = 0.05
    """Share of the corpus held out for validation (the tail of the token stream)."""
    val_batches: int = 8
    """Global batches of validation data evaluated at each validation."""
    cache_dir: Optional[str] = None
    """Where token caches live; null = $PARATRAIN_CACHE or ~/.cache/paratrain."""


@dataclass
class ClusterConfig:
    """Where a run's processes start. The keys below `name` apply to cluster=slurm (conf/cluster/slurm.yaml):
    trainer/launch/slurm.py turns them into submitit's sbatch parameters, for a single run and for a sweep."""

    name: str = "local"
    """local (trainer.devices processes on this machine) | slurm (submitted with sbatch through submitit)."""
    wait: bool = True
    """slurm, single run: wait for the job and stream its log; false = print the job id and return."""
    partition: Optional[str] = None
    """sbatch --partition; null = the cluster's default partition."""
    account: Optional[str] = None
    """sbatch --account."""
    qos: Optional[str] = None
    """sbatch --qos."""
    constraint: Optional[str] = None
    """sbatch --constraint, e.g. 'a100|h100'."""
    timeout_min: int = 60
    """Time limit of one job (minutes); at the limit the job checkpoints and is requeued (see requeue_on_timeout)."""
    nodes: int = "${trainer.num_nodes}"  # type: ignore[assignment]
    """sbatch --nodes; follows trainer.num_nodes (Lightning requires SLURM_NNODES == trainer.num_nodes)."""
    tasks_per_node: int = "${trainer.devices}"  # type: ignore[assignment]
    """sbatch --ntasks-per-node: one task per rank; follows trainer.devices (Lightning requires equality)."""
    gpus_per_node: Optional[int] = None
    """sbatch --gpus-per-node; null = trainer.devices when trainer.accelerator is gpu or cuda, else none."""
    cpus_per_task: Optional[int] = None
    """sbatch --cpus-per-task; null = the cluster's default."""
    mem_gb: Optional[int] = None
    """sbatch --mem per node in GB; null = the cluster's default."""
    sbatch: List[str] = field(default_factory=list)
    """Extra sbatch options as on sbatch's command line, e.g. 'cluster.sbatch=[--mail-type END,--exclusive]'
    (Hydra wants an '=' inside a list quoted: 'cluster.sbatch=["--mail-type=END"]')."""
    setup: List[str] = field(default_factory=list)
    """Shell lines run in the job before the tasks start, e.g. ['source $HOME/venv/bin/activate']."""
    requeue_on_timeout: int = 3
    """Times a job that reaches timeout_min is requeued to continue from its newest checkpoint; 0 = never.
    A preempted job is always requeued."""
    signal_delay_s: int = 120
    """The job is signalled (SIGUSR2, handled by submitit) this many seconds before its time limit."""


@dataclass
class TrainerConfig:
    accelerator: str = "auto"
    """auto (the GPUs torch sees where the run trains, else the CPU) | cpu | gpu (= cuda); ranks talk over
    nccl on GPUs, gloo on the CPU (strategy.process_group_backend overrides)."""
    devices: int = 1
    """Processes per node."""
    num_nodes: int = 1
    """Nodes."""
    max_steps: int = 400
    """Optimizer steps to train for."""
    log_every_n_steps: int = 10
    """Write a metrics row every this many optimizer steps."""
    val_check_interval: int = 100
    """Validate every this many optimizer steps (and at the end)."""
    accumulate_grad_batches: int = 1
    """Micro-batches per optimizer step; the global batch is split over them."""
    gradient_clip_val: Optional[float] = 1.0
    """Clip the global gradient norm to this; null = no clipping."""
    precision: str = "32-true"
    """32-true | bf16-mixed | bf16-true."""
    enable_progress_bar: bool = True
    """Show a progress bar on rank 0."""
    checkpoint_every_n_steps: int = 200
    """Save a resumable checkpoint every this many optimizer steps (and at the end)."""
    keep_last_checkpoints: int = 2
    """Checkpoints kept in the run directory."""
    on_nonfinite_loss: str = "error"
    """A NaN/inf loss: error (stop before the update; no NaN weights are saved) | skip (drop that step's update)."""


@dataclass
class CSVLoggerConfig:
    """metrics.csv in the run directory: always written (summary.json, plots and sweep summaries read it)."""


@dataclass
class TensorBoardLoggerConfig:
    save_dir: str = "tensorboard"
    """Event-file directory inside the run directory; `tensorboard --logdir` a sweep root to compare its jobs."""


@dataclass
class WandbLoggerConfig:
    project: str = "paratrain"
    """W&B project."""
    entity: Optional[str] = None
    """W&B team or user; null = your default entity."""
    group: Optional[str] = None
    """null = one group per sweep (named after its directory), none for a single run."""
    name: Optional[str] = None
    """Run name; null = the run directory's name (a sweep job: its number and overrides)."""
    tags: List[str] = field(default_factory=list)
    """Run tags."""
    mode: Optional[str] = None
    """online | offline | disabled; null = online when an account is configured (WANDB_API_KEY or
    `wandb login`), else offline (the run directory's wandb/ folder; `wandb sync` uploads it later)."""


@dataclass
class MLflowLoggerConfig:
    tracking_uri: str = "file:./mlruns"
    """Where runs are recorded; default: a local file store, mlruns/ in the directory train starts from."""
    experiment_name: Optional[str] = None
    """null = one experiment per sweep (named after its directory), `paratrain` for a single run."""
    run_name: Optional[str] = None
    """null = the run directory's name (a sweep job: its number and overrides)."""


@dataclass
class LoggerConfig:
    """The `logger=` group: one key per selected logger (`logger=[csv,tensorboard]` selects two)."""

    csv: Optional[CSVLoggerConfig] = None
    """metrics.csv (always written; the default selection)."""
    tensorboard: Optional[TensorBoardLoggerConfig] = None
    """TensorBoard event files (extra: paratrain[tensorboard])."""
    wandb: Optional[WandbLoggerConfig] = None
    """Weights & Biases, offline unless an account is configured (extra: paratrain[wandb])."""
    mlflow: Optional[MLflowLoggerConfig] = None
    """MLflow, a local file store by default (extra: paratrain[mlflow])."""


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    seed: int = 1234
    """Seeds the weights (by parameter name and expert index) and the data order."""
    resume: Optional[str] = None
    """null = fresh run; auto = newest complete checkpoint in the run directory; or a path."""
    extra: Dict[str, Any] = field(default_factory=dict)
    """Free-form notes carried into the run directory (e.g. a sweep label)."""
    dry_run: bool = False
    """Compose, validate and plan (plan.json: parameters, per-rank bytes, all-to-all), then stop: nothing is
    spawned or allocated."""


def register_configs() -> None:
    ConfigStore.instance().store(name="base_config", node=RunConfig)

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


@dataclass
class MeshConfig:
    dp: int = 1
    """Data-parallel degree; -1 = infer from the world size."""
    ep: int = 1
    """Expert-parallel degree; -1 = infer from the world size."""


@dataclass
class StrategyConfig:
    _target_: str = "paratrain.strategies.MeshStrategy"
    name: str = "auto"
    """auto | single | ddp | expert | hybrid: how the run is laid out; auto picks one from the world size and model."""
    mesh: MeshConfig = field(default_factory=MeshConfig)
    """Degrees of each mesh axis; their product must equal trainer.devices * trainer.num_nodes."""
    bucket_size_mb: float = 25.0
    """Gradients are all-reduced in buckets of about this many MiB."""
    shard_optimizer: bool = False
    """ZeRO-1: shard optimizer state over each parameter's data-parallel group."""
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
    accelerator: str = "cpu"
    """cpu | gpu (= cuda) | auto; checked against the GPUs torch sees where the run trains."""
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
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    seed: int = 1234
    """Seeds the weights (by parameter name and expert index) and the data order."""
    resume: Optional[str] = None
    """null = fresh run; auto = newest complete checkpoint in the run directory; or a path."""
    extra: Dict[str, Any] = field(default_factory=dict)
    """Free-form notes carried into the run directory (e.g. a sweep label)."""


def register_configs() -> None:
    ConfigStore.instance().store(name="base_config", node=RunConfig)

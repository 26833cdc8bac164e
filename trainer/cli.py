"""`train`: compose -> validate -> data -> model -> layout -> fit. One run, top to bottom.

    train                                      # dense default on the embedded corpus
    train +recipe=moe_8x strategy=expert trainer.devices=2
    train -m +recipe=moe_8x model.moe.num_experts=4,8,16
"""

import logging
import os
import sys
import warnings

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from .data import ByteDataModule
from .errors import ConfigError
from .model import build_model, count_params
from .module import LanguageModelTask
from .recipes import register_recipes
from .callbacks import RunDirectory
from .schema import register_configs
from .validate import validate

log = logging.getLogger("paratrain")
register_configs()
register_recipes()
_job_started = False  # set once Hydra hands us a composed config: errors before that are config errors


def quiet_lightning() -> None:
    # Our data is in-memory slicing: loader workers would only add start-up time.
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*`IterableDataset` has `__len__`.*")
    warnings.filterwarnings("ignore", message=".*is a checkpoint directory.*")


def checkpoints(run_dir: str, t) -> ModelCheckpoint:
    """Resumable checkpoints every N steps and at the end; the newest K are kept."""
    return ModelCheckpoint(dirpath=os.path.join(run_dir, "checkpoints"), filename="step{step:06d}",
                           auto_insert_metric_name=False, every_n_train_steps=t.checkpoint_every_n_steps,
                           save_top_k=t.keep_last_checkpoints, monitor="step", mode="max", save_last=False)


def run(cfg: DictConfig) -> dict:
    """Train one run described by a composed config; returns the summary. Raises ConfigError."""
    try:
        dims = validate(cfg)
    except MissingMandatoryValue as e:
        raise ConfigError(f"{e.full_key} is missing (???): this config option needs a value. Set it, e.g. {e.full_key}=...") from None
    run_dir = HydraConfig.get().runtime.output_dir
    quiet_lightning()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    t = cfg.trainer

    data = ByteDataModule(cfg.data, cfg.seed, accumulate=t.accumulate_grad_batches)
    model = build_model(cfg.model, cfg.seed, device="meta")  # weights materialise per rank in the strategy
    task = LanguageModelTask(model, cfg.optimizer, t.max_steps, tokens_per_step=cfg.data.batch_size * cfg.data.seq_len)
    task.seed = cfg.seed
    strategy = hydra.utils.instantiate(cfg.strategy, mesh=dict(cfg.strategy.mesh), _convert_="all")
    num_experts = cfg.model.moe.num_experts if cfg.model.moe else None
    layout = {"strategy": cfg.strategy.name, "mesh": {"dp": dims.dp, "ep": dims.ep}, "layout": dims.describe(num_experts)}
    run_directory = RunDirectory(run_dir, count_params(model, cfg.model), layout, t.log_every_n_steps)
    log.info("run directory: %s", run_dir)

    trainer = L.Trainer(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=strategy,
        precision=t.precision, max_steps=t.max_steps, val_check_interval=t.val_check_interval,
        check_val_every_n_epoch=None, num_sanity_val_steps=0, limit_val_batches=cfg.data.val_batches,
        accumulate_grad_batches=t.accumulate_grad_batches, gradient_clip_val=t.gradient_clip_val,
        enable_progress_bar=t.enable_progress_bar, enable_model_summary=False, logger=False,
        use_distributed_sampler=False, default_root_dir=run_dir,
        callbacks=[run_directory, checkpoints(run_dir, t)],
    )
    trainer.fit(task, datamodule=data)
    return run_directory


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def hydra_main(cfg: DictConfig) -> None:
    global _job_started
    _job_started = True
    try:
        run(cfg)
    except ConfigError as e:
        print(f"Error: {e}", file=sys.stderr)
        sys.exit(ConfigError.exit_code)


def main() -> None:
    """Console entry point: Hydra's own errors (unknown key, missing option) exit 2, like ours."""
    try:
        hydra_main()
    except SystemExit as e:
        if e.code == 1 and not _job_started:
            sys.exit(ConfigError.exit_code)
        raise


if __name__ == "__main__":
    main()

"""`train`: compose -> validate -> data -> model -> layout -> fit. One run, top to bottom.

    train                                      # dense default on the embedded corpus
    train +recipe=moe_8x strategy=expert trainer.devices=2
    train -m +recipe=moe_8x model.moe.num_experts=4,8,16
"""

import logging
import os
import sys
import traceback
import warnings

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue

from .errors import (ConfigError, explain_composition_error, full_error, hold_stderr, quote_home_paths, release_stderr,
                     stderr_held)
from .recipes import register_recipes
from . import plan as planning
from .launch import slurm, sweep
from .schema import register_configs
from .validate import check_run_paths, validate, validate_devices

# What only a run needs (Lightning, the data, the model, callbacks) is imported in run() once the
# config has passed: a config the checks refuse exits 2 without those imports (the last check, of
# the `_target_`s, imports the strategy class and with it Lightning, as does a dry run).
log = logging.getLogger("paratrain")
register_configs()
register_recipes()


def quiet_lightning() -> None:
    # Our data is in-memory slicing: loader workers would only add start-up time.
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*`IterableDataset` has `__len__`.*")
    warnings.filterwarnings("ignore", message=".*is a checkpoint directory.*")
    # Noise on this stack: SLURM runs go through cluster=slurm, and a deprecation inside Lightning.
    warnings.filterwarnings("ignore", message=".*`srun` command is available on your system.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    # Lightning's advertisement for its cloud logger, printed on every Trainer(logger=False).
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(no_advert)
    # Imported once Hydra has set up logging, Lightning's loggers propagate to Hydra's handlers (the
    # console and train.log, one format with ours); the `lightning` package's own console handler
    # would print every message a second time.
    if logging.getLogger().hasHandlers():
        logging.getLogger("lightning").handlers.clear()


def no_advert(record: logging.LogRecord) -> bool:
    return "litlogger" not in str(record.msg)


def _validated(cfg: DictConfig):
    try:
        return validate(cfg)
    except MissingMandatoryValue as e:
        raise ConfigError(f"{e.full_key} is missing (???): this config option needs a value. Set it, e.g. {e.full_key}=...") from None


def dry_run(cfg: DictConfig) -> None:
    """dry_run=true: compose, validate, plan on the meta device, print and write plan.json; spawn nothing."""
    plan = planning.check_fits(planning.plan_run(cfg, _validated(cfg)), cfg.trainer.accelerator)
    path = planning.write_plan(plan, HydraConfig.get().runtime.output_dir)
    print(f"{planning.describe(plan)}\nplan written to {path}")


def run(cfg: DictConfig):
    """Train one run described by a composed config; returns its run-directory writer. Raises ConfigError."""
    dims = _validated(cfg)
    validate_devices(cfg.trainer, launched_externally=slurm.in_slurm_job() or "TORCHELASTIC_RUN_ID" in os.environ)
    # The plan, before any process or tensor exists: a run that cannot fit stops here (exit 2).
    plan = planning.check_fits(planning.plan_run(cfg, dims), cfg.trainer.accelerator)
    if planning.refusal(plan):
        raise ConfigError(planning.refusal(plan))
    run_dir = HydraConfig.get().runtime.output_dir
    check_run_paths(cfg, run_dir, plan["params_total"])
    # What only a run needs, imported once the config has passed: a refused config exits 2 without
    # paying seconds for Lightning (and the torchmetrics and transformers it pulls in).
    import lightning as L
    from ..strategies.zero import describe_stage
    from . import balance, faults, loggers, tokenizer
    from .callbacks import InitFromHF, RunDirectory, StepProgressBar
    from .checkpoint_files import Checkpointer, resolve_resume
    from .data import ByteDataModule, checked_token_files
    from .models.transformer import build_model, count_params
    from .module import LanguageModelTask
    from .stop_signals import StopSignals

    stop = StopSignals().install()  # from here SIGTERM/SIGINT end the run after a step, with its checkpoint
    quiet_lightning()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    t = cfg.trainer

    # Resolved here, before Lightning spawns ranks: builds the token cache once and checks the tokens.
    train_path, val_path = checked_token_files(cfg.data, cfg.model.vocab_size)
    data = ByteDataModule(cfg.data, train_path, val_path, cfg.seed, accumulate=t.accumulate_grad_batches)
    model = build_model(cfg.model, cfg.seed, device="meta")  # weights materialise per rank in the strategy
    task = LanguageModelTask(model, cfg.optimizer, t.max_steps, tokens_per_step=cfg.data.batch_size * cfg.data.seq_len,
                             token_bytes=tokenizer.data_token_bytes(cfg.data))
    task.seed = cfg.seed
    strategy = hydra.utils.instantiate(cfg.strategy, mesh=dict(cfg.strategy.mesh), _convert_="all",
                                       activation_checkpointing=cfg.model.activation_checkpointing)
    num_experts = cfg.model.moe.num_experts if cfg.model.moe else None
    layout = {"strategy": cfg.strategy.name, "mesh": dims.as_dict(), "zero_stage": cfg.strategy.zero_stage,
              "layout": describe_stage(dims.describe(num_experts), cfg.strategy.zero_stage)}
    byte_level = cfg.data.source != "tokens" and cfg.data.get("tokenizer", "bytes") == "bytes"
    run_directory = RunDirectory(run_dir, count_params(model, cfg.model), layout, t.log_every_n_steps,
                                 loggers=loggers.build_loggers(cfg.logger, run_dir), hparams=loggers.hyperparameters(cfg),
                                 token_unit="byte" if byte_level else "token")
    ckpt_path = resolve_resume(cfg, run_dir, task)  # checked before anything in run_dir is written
    checkpointer = Checkpointer(run_dir, t.checkpoint_every_n_steps, t.keep_last_checkpoints, cfg, run_directory)
    if int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", os.environ.get("LOCAL_RANK", "0")))) == 0:
        planning.write_plan(plan, run_dir)

    trainer = L.Trainer(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=strategy,
        precision=t.precision, max_steps=t.max_steps, val_check_interval=t.val_check_interval,
        check_val_every_n_epoch=None, num_sanity_val_steps=0, limit_val_batches=cfg.data.val_batches,
        accumulate_grad_batches=t.accumulate_grad_batches, gradient_clip_val=t.gradient_clip_val,
        enable_progress_bar=t.enable_progress_bar, enable_model_summary=False, logger=False,
        use_distributed_sampler=False, default_root_dir=run_dir, plugins=slurm.lightning_plugins(),
        enable_checkpointing=False, callbacks=[run_directory, *balance.callbacks(cfg.model), checkpointer, stop,
                                                 *faults.callbacks(t),
                                                 *([InitFromHF(cfg.model.init_from)] if cfg.model.init_from else []),
                                                 *([StepProgressBar()] if t.enable_progress_bar else [])],
    )
    stop.attach(trainer, checkpointer, run_directory)
    stop.exit_if_signalled()
    trainer.fit(task, datamodule=data, ckpt_path=ckpt_path)
    stop.finish()  # exits 128 + N if a signal stopped the run
    return run_directory


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def hydra_main(cfg: DictConfig) -> None:
    sys.stderr.write(release_stderr())  # composed: from here on, errors are ours to report
    try:
        if cfg.get("dry_run"):  # before any launcher: a plan spawns, submits and allocates nothing
            dry_run(cfg)
        elif slurm.in_slurm_job():  # one task (rank) of a submitted job: train here, resume after a requeue
            slurm.run_in_job(cfg, run)
        elif cfg.cluster.name == "slurm":  # not in the job yet: submit one, follow it
            status = slurm.submit(cfg, "paratrain.trainer.cli:hydra_main")  # by name: see SubmittedRun
            if status:
                sys.exit(status)
        elif HydraConfig.get().mode == RunMode.MULTIRUN:  # a local sweep job: its own process tree
            sweep.run_sweep_job()
        else:
            run(cfg)
    except ConfigError as e:
        if full_error():
            traceback.print_exc()
        print(f"Error: {e}", file=sys.stderr)
        sys.exit(ConfigError.exit_code)
    except Exception as e:
        if not _disk_full(e):
            raise
        # disk full: the paragraph says where and how much; the run crashed (1)
        if full_error():
            traceback.print_exc()
        print(f"Error: {e}", file=sys.stderr)
        sys.exit(1)


def _disk_full(e: Exception) -> bool:
    """A CheckpointWriteError (only a run imports checkpoint_files, and only it can raise one)."""
    files = sys.modules.get("paratrain.trainer.checkpoint_files")
    return files is not None and isinstance(e, files.CheckpointWriteError)


def main() -> None:
    """Console entry point: Hydra's own errors (unknown key, missing option) exit 2, like ours."""
    # stderr is held while Hydra composes (until hydra_main or a sweep starts), so that a composition
    # error can be explained. The state lives in errors.py: sweep launchers pickle hydra_main by value.
    hold_stderr()
    sys.argv[1:] = quote_home_paths(sys.argv[1:])  # Lightning's per-rank re-runs reuse sys.argv as fixed here
    try:
        hydra_main()
    except SystemExit as e:
        composing = stderr_held()
        held = release_stderr()
        if e.code == 1 and composing:
            sys.stderr.write(explain_composition_error(held, sys.argv[1:]))
            sys.exit(ConfigError.exit_code)
        sys.stderr.write(held)
        raise
    except Exception:  # HYDRA_FULL_ERROR=1: Hydra raises a composition error instead of exiting 1
        if not stderr_held():
            raise
        sys.stderr.write(release_stderr())
        trace = traceback.format_exc()
        sys.stderr.write(trace)
        explained = explain_composition_error(trace, sys.argv[1:])
        sys.stderr.write(explained if explained != trace else "Error: the config did not compose (above).\n")
        sys.exit(ConfigError.exit_code)
    finally:
        sys.stderr.write(release_stderr())
    if sweep.failed_jobs():  # a sweep ran every job; some failed (sweep_summary.md says which and why)
        sys.exit(1)


if __name__ == "__main__":
    main()

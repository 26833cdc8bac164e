"""Experiment loggers (`logger=` group): Lightning's own loggers, fed the rows of metrics.csv.

    train logger=tensorboard                    # metrics.csv (always) + TensorBoard event files
    train 'logger=[csv,tensorboard,wandb]'       # any combination
    train -m logger=mlflow model.moe.num_experts=4,8   # every sweep job in one experiment / group

`csv` is the run directory's metrics.csv: summary.json, plots and sweep summaries read it, so it is
always written. The others receive the same rows (RunDirectory calls log_metrics on rank 0 as it
writes each row), the resolved config as hyperparameters, and the run's end status. A sweep job
is recognised by its run directory (Hydra wrote `.hydra/hydra.yaml` with mode MULTIRUN there) and
joins one W&B group / MLflow experiment named after the sweep directory; TensorBoard keeps one
directory per job, so `tensorboard --logdir <sweep dir>` shows the jobs side by side.
"""

import importlib.util
import netrc
import os
from pathlib import Path

from omegaconf import OmegaConf

from .errors import ConfigError

# logger -> (module Lightning needs, the paratrain extra that installs it)
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}


def selected(logger_cfg) -> list[str]:
    return [name for name in ("csv", "tensorboard", "wandb", "mlflow") if logger_cfg is not None and logger_cfg.get(name) is not None]


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def check_packages(logger_cfg) -> None:
    """Every selected logger's package is importable. Raises ConfigError naming the extra to install."""
    for name in selected(logger_cfg):
        if name in PACKAGES and not _installed(PACKAGES[name][0]):
            module, extra = PACKAGES[name]
            raise ConfigError(f"logger={name} needs the `{module}` package, which is not installed. Install it with "
                              f"pip install 'paratrain[{extra}]' (or pip install {module}), or drop {name} from logger=.")


def sweep_of(run_dir) -> Path | None:
    """The sweep directory of a sweep job's run directory, else None (a single run)."""
    hydra_yaml = Path(run_dir) / ".hydra" / "hydra.yaml"
    if not hydra_yaml.is_file():
        return None
    mode = OmegaConf.select(OmegaConf.load(hydra_yaml), "hydra.mode")
    return Path(run_dir).resolve().parent if str(mode) == "MULTIRUN" else None


def _sweep_name(sweep: Path) -> str:
    # multirun/2026-12-01/21-54-00 -> sweep-2026-12-01_21-54-00: unique per sweep, readable in a dashboard.
    return "sweep-" + "_".join(sweep.parts[-2:])


def _run_name(run_dir: Path, sweep: Path | None) -> str:
    if sweep is None:
        return run_dir.name
    # The job's overrides of the keys the sweep varies (sweep syntax in the sweep's multirun.yaml).
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides, sweep_file = run_dir / ".hydra" / "overrides.yaml", sweep / "multirun.yaml"
    mine = [str(o) for o in OmegaConf.load(overrides)] if overrides.is_file() else []
    given = [str(o) for o in OmegaConf.select(OmegaConf.load(sweep_file), "hydra.overrides.task") or []] if sweep_file.is_file() else []
    swept = {o.get_key_element() for o in OverridesParser.create().parse_overrides(given) if o.is_sweep_override()}
    return " ".join([f"job{run_dir.name}", *(o for o in mine if o.partition("=")[0] in swept)])


def _wandb_mode(configured) -> str:
    """Online only when the user configured an account (env or `wandb login`'s netrc entry), else offline."""
    if configured:
        return configured
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("//")[-1].split("/")[0]
        return "online" if netrc.netrc().authenticators(host) else "offline"
    except (OSError, netrc.NetrcParseError):
        return "offline"


def build_loggers(logger_cfg, run_dir) -> list:
    """Lightning loggers for the selected options (csv is metrics.csv itself: no logger object)."""
    run_dir = Path(run_dir)
    sweep = sweep_of(run_dir)
    name = _run_name(run_dir, sweep)
    out = []
    for kind in selected(logger_cfg):
        c = logger_cfg[kind]
        if kind == "tensorboard":
            from lightning.pytorch.loggers import TensorBoardLogger

            out.append(TensorBoardLogger(save_dir=str(run_dir), name=c.save_dir, version="", default_hp_metric=False))
        elif kind == "wandb":
            from lightning.pytorch.loggers import WandbLogger

            group = c.group or (_sweep_name(sweep) if sweep else None)
            out.append(WandbLogger(project=c.project, entity=c.entity, name=c.name or name, group=group,
                                   tags=list(c.tags) or None, save_dir=str(run_dir), mode=_wandb_mode(c.mode)))
        elif kind == "mlflow":
            from lightning.pytorch.loggers import MLFlowLogger

            if c.tracking_uri.startswith("file:"):
                # MLflow 3 refuses its file store unless asked; a local store is what this option is for.
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            experiment = c.experiment_name or (_sweep_name(sweep) if sweep else "paratrain")
            out.append(MLFlowLogger(experiment_name=experiment, run_name=c.run_name or name, tracking_uri=c.tracking_uri))
    return out


def finish(loggers: list, status: str) -> None:
    """End every logger's run: status "success" or "failed" (MLflow records it; TensorBoard flushes)."""
    for logger in loggers:
        logger.finalize(status)
        if type(logger).__name__ == "WandbLogger" and logger._experiment is not None:
            # Lightning leaves a W&B run open until interpreter exit, which a run ending in os._exit skips.
            logger._experiment.finish(exit_code=0 if status == "success" else 1)


def hyperparameters(cfg) -> dict:
    """The resolved run config, flattened to dotted keys (what dashboards show as a run's parameters)."""
    def flat(tree, prefix=""):
        for k, v in tree.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict):
                yield from flat(v, key + ".")
            else:
                yield key, v if isinstance(v, (int, float, str, bool)) or v is None else str(v)

    return dict(flat(OmegaConf.to_container(cfg, resolve=True)))

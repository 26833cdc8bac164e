"""What every launcher needs of a job: its summary.json, how to mark it failed, how to re-run it.

Local sweep jobs (sweep.py), SLURM runs (slurm.py) and SLURM sweeps (slurm_sweep.py) all read and
write a job's result through these, so the three never import each other for them.
"""

import json
from pathlib import Path

from hydra.core.hydra_config import HydraConfig

# hydra.* overrides a job's own rerun must not repeat: they belong to the sweep, or are pinned anew.
SWEEP_ONLY = ("hydra.mode", "hydra.run.", "hydra.sweep.", "hydra.output_subdir", "hydra.job.num", "hydra.job.id",
              "hydra/launcher", "hydra.launcher.", "hydra/sweeper", "hydra.sweeper.", "hydra.callbacks")


def read_summary(run_dir: Path) -> dict | None:
    try:
        return json.loads((Path(run_dir) / "summary.json").read_text())
    except (OSError, ValueError):
        return None


def mark_failed(run_dir: Path, error: str, exit_code: int | None) -> dict:
    """Make summary.json say the run failed and why; keep what the run itself wrote (and its own error)."""
    summary = read_summary(run_dir) or {}
    own = summary.get("error") if summary.get("status") == "failed" else None
    if own and (error in own or own in error):
        error = max(own, error, key=len)
    elif own:
        error = f"{own}; {error}"
    summary.update(status="failed", exit_code=exit_code, error=error)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    (Path(run_dir) / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def rerun_overrides(run_dir: Path) -> list[str]:
    """The current Hydra job as the overrides of a plain run pinned to RUN_DIR (Hydra already wrote .hydra/ there)."""
    hydra_cfg = HydraConfig.get()
    keep = [str(o) for o in hydra_cfg.overrides.hydra if not str(o).lstrip("+~").startswith(SWEEP_ONLY)]
    return [*map(str, hydra_cfg.overrides.task), *keep, f"hydra.run.dir={run_dir}", "hydra.output_subdir=null"]

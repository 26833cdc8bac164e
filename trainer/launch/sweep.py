"""Sweeps: `train -m ...` runs each job in its own process tree, then writes a sweep summary.

    train -m +recipe=moe_8x strategy=expert trainer.devices=2 model.moe.num_experts=4,8,16
    paratrain-sweep-summary multirun/2025-06-01/12-00-00   # (re)build the summary of a sweep directory

Lightning's multi-process launcher re-runs the command line for each rank, which cannot work inside
Hydra's multirun (it would re-run `-m`), and a process group left by one job would leak into the
next. So with Hydra's basic launcher the task function of each job starts
`python -m paratrain.trainer.cli <the job's overrides> hydra.run.dir=<its directory>` and waits:
ports, process groups and Lightning state end with that process tree. A failed job (exit 2 for a
bad config, 1 for a crash) is recorded in its summary.json and the sweep goes on; `train -m` then
exits 1. At the end (Hydra's on_multirun_end) the sweep root gets sweep_summary.csv, .md and .png:
one row per job. With cluster=slurm each job is a SLURM job instead (trainer/launch/slurm.py); the
summary is the same.
"""

import argparse
import csv
import logging
import math
import subprocess
import sys
from collections import deque
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from ..errors import ConfigError, release_stderr
from ..validate import validate, validate_cluster
from .jobs import mark_failed, read_summary, rerun_overrides

log = logging.getLogger("paratrain")
COLUMNS = ["job", "overrides", "status", "final_loss", "final_val_loss", "tokens_per_s", "params_total",
           "params_active_per_token", "peak_rss_mb", "steps", "wall_s", "error"]
_failed_jobs: list[dict] = []  # of the sweep that just ended in this process; cli.main exits 1 if any


def failed_jobs() -> list[dict]:
    return list(_failed_jobs)


# --- one local sweep job -----------------------------------------------------------------------
def run_sweep_job() -> dict:
    """The task function of a local sweep job: run it as `python -m paratrain.trainer.cli ...` and wait.

    Its output goes to the console (prefixed `[job N]`) and to <job dir>/console.log; the job's own log
    records are in train.log. Returns its summary; never raises for a failed job."""
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    cmd = [sys.executable, "-m", "paratrain.trainer.cli", *rerun_overrides(run_dir)]
    prefix = f"[job {hydra_cfg.job.num}] "
    tail: deque[str] = deque(maxlen=60)
    with open(run_dir / "console.log", "w") as logfile, \
            subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace") as child:
        for line in child.stdout:
            logfile.write(line)
            tail.append(line)
            sys.stdout.write(prefix + line)
            sys.stdout.flush()
    summary = read_summary(run_dir)
    if child.returncode == 0 and summary and summary.get("status") == "completed":
        return summary
    if child.returncode > 128 and summary and summary.get("status") == "interrupted":  # README: exit status
        log.warning("%sinterrupted (exit %d): %s", prefix, child.returncode, summary.get("error"))
        return summary
    summary = mark_failed(run_dir, error_from_output(list(tail), child.returncode), child.returncode)
    log.error("%sfailed (exit %d): %s", prefix, child.returncode, summary["error"])
    return summary


def error_from_output(lines: list[str], exit_code: int) -> str:
    """The reason a child run gave: its `Error: ...` paragraph (exit 2), else its last exception line."""
    lines = [line.rstrip() for line in lines if line.strip()]
    errors = [line[len("Error: "):] for line in lines if line.startswith("Error: ")]
    if errors:
        return errors[-1]
    raised = [line for line in lines if line.split(":")[0].endswith(("Error", "Exception", "Interrupt"))]
    if raised:
        return raised[-1]
    return f"exit status {exit_code}" + (f"; last output: {lines[-1]}" if lines else "")


# --- the sweep summary ---------------------------------------------------------------------------
def job_dirs(sweep_dir: Path) -> list[Path]:
    """Job directories of a sweep (Hydra's sweep.subdir: the job number), in job order."""
    found = [p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
             and ((p / ".hydra" / "overrides.yaml").exists() or (p / "summary.json").exists())]
    return sorted(found, key=lambda p: (0, int(p.name)) if p.name.isdigit() else (1, p.name))


def load_jobs(sweep_dir: Path) -> list[dict]:
    jobs = []
    for d in job_dirs(sweep_dir):
        path = d / ".hydra" / "overrides.yaml"
        overrides = [str(o) for o in OmegaConf.load(path)] if path.exists() else []
        summary = read_summary(d) or {"status": "unknown", "error": "no summary.json (the job did not finish)"}
        jobs.append({"job": d.name, "dir": d, "overrides": overrides, "summary": summary, "curve": loss_curve(d)})
    return jobs


def loss_curve(run_dir: Path) -> list[tuple[int, float]]:
    try:
        with open(run_dir / "metrics.csv") as f:
            return [(int(r["step"]), float(r["train/loss"])) for r in csv.DictReader(f) if r.get("train/loss")]
    except (OSError, ValueError, KeyError):
        return []


def swept_keys(jobs: list[dict]) -> list[str]:
    """Override keys whose value differs between jobs (or that only some jobs set), in command-line order."""
    per_job = [dict(o.partition("=")[::2] for o in job["overrides"]) for job in jobs]
    keys = list(dict.fromkeys(k for overrides in per_job for k in overrides))
    if len(jobs) == 1:
        return keys
    return [k for k in keys if len({overrides.get(k) for overrides in per_job}) > 1]


def table_rows(jobs: list[dict]) -> list[dict]:
    keys = swept_keys(jobs)
    rows = []
    for job in jobs:
        s = job["summary"]
        swept = [o for o in job["overrides"] if o.partition("=")[0] in keys]
        rows.append({"job": job["job"], "overrides": " ".join(swept), **{c: s.get(c) for c in COLUMNS[2:]}})
    return rows


def write_sweep_summary(sweep_dir) -> list[dict]:
    """Write sweep_summary.csv, sweep_summary.md and sweep_summary.png at the sweep root; return the rows."""
    sweep_dir = Path(sweep_dir)
    jobs = load_jobs(sweep_dir)
    if not jobs:
        raise ConfigError(f"{sweep_dir} holds no sweep job: expected numbered job directories with .hydra/overrides.yaml "
                          f"or summary.json (what `train -m ...` writes). Give the sweep root, e.g. multirun/DATE/TIME.")
    rows = table_rows(jobs)
    with open(sweep_dir / "sweep_summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    (sweep_dir / "sweep_summary.md").write_text(markdown(sweep_dir, jobs, rows))
    plot_sweep(jobs, swept_keys(jobs), sweep_dir / "sweep_summary.png")
    return rows


def _cell(value, column: str) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if column in ("tokens_per_s", "peak_rss_mb"):
            return f"{value:,.0f}"
        return f"{value:.4f}" if column.startswith("final") else f"{value:.1f}"
    if isinstance(value, int) and column.startswith("params"):
        return f"{value:,}"
    text = str(value).replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= 160 else text[:157] + "..."


def markdown(sweep_dir: Path, jobs: list[dict], rows: list[dict]) -> str:
    keys = set(swept_keys(jobs))
    common = [o for o in jobs[0]["overrides"] if o.partition("=")[0] not in keys]
    done = sum(r["status"] == "completed" for r in rows)
    failed = sum(r["status"] not in ("completed", "interrupted") for r in rows)
    heads = ["job", "overrides", "status", "final train loss", "final val loss", "tokens/s", "params total",
             "params active/token", "peak RSS (MB)", "steps", "wall (s)", "error"]
    lines = [f"# Sweep summary: {sweep_dir}", "",
             f"{len(rows)} jobs: {done} completed, {failed} failed, {len(rows) - done - failed} interrupted.",
             f"Common overrides: `{' '.join(common)}`" if common else "", "",
             "| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    lines += ["| " + " | ".join(_cell(r[c], c) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plot_sweep(jobs: list[dict], keys: list[str], path: Path) -> None:
    """Left: final losses against the swept value. Right: the train-loss curves of every job, overlaid."""
    from .. import plots  # noqa: F401  (selects the Agg backend)
    import matplotlib.pyplot as plt

    def value(job):
        return " ".join(o.partition("=")[2] for o in job["overrides"] if o.partition("=")[0] in keys) or job["job"]

    xs = [value(j) for j in jobs]
    numeric = len(keys) == 1 and all(_is_number(x) for x in xs)
    positions = [float(x) for x in xs] if numeric else list(range(len(jobs)))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    for key, style, label in (("final_loss", "o-", "final train loss"), ("final_val_loss", "s--", "final val loss")):
        points = [(p, j["summary"].get(key)) for p, j in zip(positions, jobs) if j["summary"].get(key) is not None]
        if points:
            left.plot(*zip(*sorted(points)), style, label=label, markersize=5)
    for p, j in zip(positions, jobs):
        if j["summary"].get("status") != "completed":
            left.axvline(p, color="tab:red", alpha=0.3, linestyle=":")
            left.annotate("failed", (p, 0.98), xycoords=("data", "axes fraction"), color="tab:red", ha="center", va="top")
    left.set_xticks(positions)
    left.set_xticklabels(xs, rotation=30 if not numeric else 0, ha="right" if not numeric else "center")
    left.set_xlabel(keys[0] if len(keys) == 1 else "job")
    left.set_ylabel("cross-entropy (nats/byte)")
    left.set_title("final loss per job")
    for j in jobs:
        if j["curve"]:
            label = " ".join(o.rpartition(".")[2] if "." in o.partition("=")[0] else o
                             for o in j["overrides"] if o.partition("=")[0] in keys) or f"job {j['job']}"
            right.plot(*zip(*j["curve"]), "-", label=label)
    right.set_xlabel("optimizer step")
    right.set_ylabel("train loss (nats/byte)")
    right.set_title("loss curves")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def sweep_jobs(config) -> list[list[str]]:
    """The overrides of each job of the sweep, in job order, as Hydra's basic sweeper expands them."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = OverridesParser.create().parse_overrides([str(o) for o in config.hydra.overrides.task])
    return [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]


def check_every_job(config) -> None:
    """Compose and validate every job of a sweep before the first one starts (or is submitted).

    Raises ConfigError naming each invalid job by its overrides: one bad job fails the sweep before
    any work, rather than alone after the others have run (or inside SLURM)."""
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf.errors import MissingMandatoryValue

    loader = GlobalHydra.instance().hydra.config_loader
    jobs = sweep_jobs(config)
    bad = []
    for num, overrides in enumerate(jobs):
        try:
            job_cfg = loader.load_sweep_config(config, list(overrides))
            validate(job_cfg, announce=False)
            validate_cluster(job_cfg, submitting=job_cfg.cluster.name == "slurm")
        except ConfigError as e:
            bad.append((num, overrides, str(e)))
        except MissingMandatoryValue as e:
            bad.append((num, overrides, f"{e.full_key} is missing (???): set it, e.g. {e.full_key}=..."))
        except Exception as e:  # Hydra could not compose the job (e.g. an option of a group that does not exist)
            bad.append((num, overrides, f"{type(e).__name__}: {str(e).strip()}"))
    if bad:
        lines = [f"job {num} ({' '.join(overrides)}): {message}" for num, overrides, message in bad]
        raise ConfigError(f"{len(bad)} of the sweep's {len(jobs)} jobs would be refused, so none was started or "
                          f"submitted. Fix or drop these values, then run the sweep again:\n  " + "\n  ".join(lines))


class SweepCallbacks(Callback):
    """Hydra callbacks of every sweep (conf/config.yaml, hydra.callbacks)."""

    def on_multirun_start(self, config, **kwargs) -> None:
        sys.stderr.write(release_stderr())  # composed (see cli.main)
        try:
            check_every_job(config)
            if config.cluster.name == "slurm":  # check and fill the submitit launcher before it submits anything
                from .slurm import prepare_sweep

                prepare_sweep(config)
        except ConfigError as e:
            print(f"Error: {e}", file=sys.stderr)
            sys.exit(ConfigError.exit_code)

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        rows = write_sweep_summary(sweep_dir)
        _failed_jobs[:] = [r for r in rows if r["status"] != "completed"]
        log.info("sweep summary: %s (%d jobs, %d failed)", sweep_dir / "sweep_summary.md", len(rows), len(_failed_jobs))
        for r in _failed_jobs:
            log.error("job %s (%s) %s: %s", r["job"], r["overrides"], r["status"], r["error"])


def main(argv: list[str] | None = None) -> None:
    """`paratrain-sweep-summary SWEEP_DIR`: write the sweep summary of an existing sweep, print its table."""
    parser = argparse.ArgumentParser(prog="paratrain-sweep-summary", description=main.__doc__)
    parser.add_argument("sweep_dir", type=Path, help="the sweep root (hydra.sweep.dir), e.g. multirun/DATE/TIME")
    args = parser.parse_args(argv)
    try:
        if not args.sweep_dir.is_dir():
            raise ConfigError(f"SWEEP_DIR={str(args.sweep_dir)!r} is not a directory. Give the root of a sweep, "
                              f"e.g. multirun/DATE/TIME (what `train -m` prints).")
        write_sweep_summary(args.sweep_dir)
    except ConfigError as e:
        print(f"Error: {e}", file=sys.stderr)
        sys.exit(ConfigError.exit_code)
    print((args.sweep_dir / "sweep_summary.md").read_text(), end="")
    print(f"\nwrote {args.sweep_dir / 'sweep_summary.csv'} and {args.sweep_dir / 'sweep_summary.png'}")


if __name__ == "__main__":
    main()

"""cluster=slurm: submit a run, or each job of a sweep, to SLURM through submitit.

    train +recipe=moe_8x cluster=slurm trainer.num_nodes=2 trainer.devices=8   # one job; waits, streams its log
    train -m +recipe=moe_8x cluster=slurm model.moe.num_experts=8,16          # one job per value

A single run submits one job here (`submit`); a sweep goes through hydra-submitit-launcher, whose
parameters (hydra.launcher.*) `prepare_sweep` fills from the same `launcher_parameters`. Either
way every SLURM task is one rank and runs the Hydra task function itself (the CLI passes its hydra_main ->
`run_in_job`): Lightning reads its rank from the SLURM environment, so nothing is launched locally.
That needs --ntasks-per-node == trainer.devices and --nodes == trainer.num_nodes: cluster.* follows
trainer.* and validate_cluster() checks it.

Requeue has one owner, submitit: before the time limit SLURM sends SIGUSR2, submitit's handler on
rank 0 re-pickles the job and runs `scontrol requeue`. Lightning's own SLURM auto-requeue (SIGUSR1)
is off. A requeued job keeps its run directory (fixed at submission) and runs with resume=auto, so
it continues from its newest complete checkpoint; so does a job requeued by hand or by preemption.
"""

import importlib
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict, read_write
from omegaconf.errors import MissingMandatoryValue

from ..errors import ConfigError
from .jobs import mark_failed, read_summary, rerun_overrides
from ..validate import GPU_ACCELERATORS, validate, validate_cluster

log = logging.getLogger("paratrain")
# trainer.* keys that shape the sbatch allocation: one sweep submits every job with the same shape.
SHAPE_KEYS = ("trainer.devices", "trainer.num_nodes", "trainer.accelerator")
ENDED = ("BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
         "TIMEOUT")


def in_slurm_job() -> bool:
    """True inside a job that submitit started: its sbatch script exports SUBMITIT_EXECUTOR=slurm to every task."""
    return os.environ.get("SUBMITIT_EXECUTOR") == "slurm"


def lightning_plugins() -> list:
    """Trainer plugins: inside our SLURM job, the SLURM environment with Lightning's auto-requeue off."""
    if not in_slurm_job():
        return []
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    return [SLURMEnvironment(auto_requeue=False)]  # submitit owns requeue (SIGUSR2); see the module docstring


def launcher_parameters(cfg) -> dict:
    """submitit's parameters, named as hydra.launcher (submitit_slurm) names them, from cluster.* and trainer.*.

    The one place where a cluster key becomes an sbatch flag, for single runs and sweeps alike."""
    c, t = cfg.cluster, cfg.trainer
    gpus = c.gpus_per_node
    if gpus is None and t.accelerator in GPU_ACCELERATORS:
        gpus = t.devices
    return {
        "nodes": c.nodes, "tasks_per_node": c.tasks_per_node, "gpus_per_node": gpus,
        "cpus_per_task": c.cpus_per_task, "mem_gb": c.mem_gb, "timeout_min": c.timeout_min,
        "partition": c.partition, "account": c.account, "qos": c.qos, "constraint": c.constraint,
        "additional_parameters": dict(sbatch_option(o) for o in c.sbatch),
        "setup": list(c.setup) or None, "max_num_timeout": c.requeue_on_timeout, "signal_delay_s": c.signal_delay_s,
    }


def sbatch_option(option: str) -> tuple[str, object]:
    """'--mail-type=END' or '--mail-type END' -> ('mail-type', 'END'); '--exclusive' -> ('exclusive', True)."""
    parts = option.lstrip("-").replace("=", " ", 1).split(None, 1)
    return parts[0], parts[1].strip() if len(parts) > 1 else True


def executor(folder: Path, params: dict, name: str):
    """A submitit executor set up as hydra-submitit-launcher sets up its own (same parameter names)."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    params = dict(params)
    ex = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=params.pop("max_num_timeout"))
    generic = set(OmegaConf.structured(BaseQueueConf).keys())
    ex.update_parameters(name=name, **{k if k in generic else f"slurm_{k}": v for k, v in params.items()})
    return ex


# sbatch options submitit writes itself (logs, name, signal), and the key each of the others comes from.
OWN_OPTIONS = ("output", "error", "job-name", "open-mode", "signal", "wckey")
OPTION_KEYS = {"nodes": "trainer.num_nodes (cluster.nodes)", "ntasks-per-node": "trainer.devices (cluster.tasks_per_node)",
               "gpus-per-node": "trainer.devices with trainer.accelerator=gpu (cluster.gpus_per_node)",
               "cpus-per-task": "cluster.cpus_per_task", "mem": "cluster.mem_gb", "time": "cluster.timeout_min",
               "partition": "cluster.partition", "account": "cluster.account", "qos": "cluster.qos",
               "constraint": "cluster.constraint"}


def check_with_sbatch(params: dict, folder: Path) -> None:
    """Ask sbatch whether it would accept the job (`sbatch --test-only`, nothing is queued). Raises ConfigError.

    A cluster refuses some requests only when they are submitted (no GPUs, an unknown partition or
    account): this shows sbatch's own reason, and the options paratrain derived from which keys."""
    script = executor(folder, params, name="paratrain-check")._executor._make_submission_file_text("true", "check")
    try:
        done = subprocess.run(["sbatch", "--test-only"], input=script, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("could not ask sbatch --test-only whether it accepts the job (%s); submitting anyway", e)
        return
    if done.returncode != 0:
        raise ConfigError(sbatch_refusal(done.stderr or done.stdout, script))


def sbatch_refusal(message: str, script: str) -> str:
    """sbatch's own reason, the options it was given and the key behind each, and what to change."""
    options = [line.split(None, 1)[1] for line in script.splitlines() if line.startswith("#SBATCH ")]
    given = [o for o in options if o.lstrip("-").split("=")[0] not in OWN_OPTIONS]
    origin = [f"{o} (from {OPTION_KEYS.get(o.lstrip('-').split('=')[0], 'cluster.sbatch')})" for o in given]
    reason = " ".join(line.strip() for line in message.strip().splitlines() if line.strip()) or "no message"
    return (f"sbatch refused the job: {reason!r}. The sbatch options paratrain gave it: {', '.join(origin)}. Nothing "
            f"was submitted. Change the key behind the option the cluster refuses (e.g. on a cluster without GPUs, "
            f"trainer.accelerator=cpu or a GPU partition with cluster.partition=...; `sinfo` lists the partitions).")


# --- a sweep: hydra-submitit-launcher submits, we check and fill its parameters first ------------
def prepare_sweep(config) -> None:
    """Before a SLURM sweep submits anything (Hydra's on_multirun_start): check, then fill hydra.launcher.

    Raises ConfigError. Per-job rules (model, mesh, data) run in each job and fail only that job."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for o in OverridesParser.create().parse_overrides([str(x) for x in config.hydra.overrides.task]):
        key = o.get_key_element()
        if o.is_sweep_override() and (key in SHAPE_KEYS or key == "cluster" or key.startswith("cluster.")):
            raise ConfigError(
                f"{o.input_line} sweeps a key that shapes the SLURM allocation: every job of one sweep is submitted "
                f"with the same sbatch parameters (nodes, tasks and GPUs per node). Run one sweep per value of {key}.")
    validate_cluster(config, submitting=True)
    managed = launcher_parameters(config)
    for o in config.hydra.overrides.hydra:
        key = str(o).split("=", 1)[0].lstrip("+~")
        name = key.split(".", 2)[2] if key.startswith("hydra.launcher.") else None
        if name in managed:
            source = {"additional_parameters": "cluster.sbatch", "max_num_timeout": "cluster.requeue_on_timeout"}.get(
                name, f"cluster.{name}")
            raise ConfigError(
                f"{o}: hydra.launcher.{name} is filled from {source} (trainer/launch/slurm.py), so this value would be "
                f"ignored. Set {source} instead (documented in trainer/schema.py, ClusterConfig).")
    check_with_sbatch(managed, Path(str(config.hydra.sweep.dir)) / ".submitit")
    with read_write(config.hydra), open_dict(config.hydra.launcher):
        for key, value in managed.items():
            config.hydra.launcher[key] = value
    from .slurm_sweep import fail_jobs_alone  # imports submitit: only when a SLURM sweep is submitted

    fail_jobs_alone()


# --- a single run: submit one job, then follow it -------------------------------------------------
class SubmittedRun:
    """What every task of a single-run job executes: `train OVERRIDES hydra.run.dir=RUN_DIR`, in-process.

    `checkpoint` makes submitit requeue it at the time limit (same arguments: the task function
    switches to resume=auto when SLURM_RESTART_COUNT > 0)."""

    def __init__(self, overrides: list[str], run_dir: str, task_function: str):
        # "module:function" of the CLI's Hydra app, imported in the job: launchers never import the CLI, and a
        # function object would be pickled by value when the CLI runs as __main__ (python -m), losing its config path.
        self.overrides, self.run_dir, self.task_function = overrides, run_dir, task_function

    def __call__(self) -> dict:
        module, _, name = self.task_function.partition(":")
        task_function = getattr(importlib.import_module(module), name)
        sys.argv = [sys.argv[0], *self.overrides]
        task_function()
        return read_summary(Path(self.run_dir)) or {"status": "failed", "error": "the job wrote no summary.json"}

    def checkpoint(self, *args, **kwargs):
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def submit(cfg, task_function: str) -> int:
    """`train cluster=slurm ...` without -m: check everything, submit one job, follow it. Returns an exit status.

    `task_function` ("module:function" of the CLI's Hydra app) is what every task of the job runs."""
    try:
        validate(cfg)  # what the job would check first, before anything is submitted
    except MissingMandatoryValue as e:
        raise ConfigError(f"{e.full_key} is missing (???): this config option needs a value. Set it, e.g. {e.full_key}=...") from None
    validate_cluster(cfg, submitting=True)
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    check_with_sbatch(launcher_parameters(cfg), run_dir / ".submitit")
    ex = executor(run_dir / ".submitit" / "%j", launcher_parameters(cfg), name=hydra_cfg.job.name)
    from submitit.core.utils import FailedJobError

    try:
        job = ex.submit(SubmittedRun(rerun_overrides(run_dir), str(run_dir), task_function))
    except FailedJobError as e:  # refused at submission after all (--test-only said yes)
        raise ConfigError(sbatch_refusal(str(e), ex._executor._make_submission_file_text("true", "check"))) from None
    stdout = job.task(0).paths.stdout
    print(f"submitted SLURM job {job.job_id}; run directory {run_dir}; log {stdout}", flush=True)
    if not cfg.cluster.wait:
        print(f"not waiting (cluster.wait=false): follow with `tail -f {stdout}`, stop with `scancel {job.job_id}`")
        return 0
    try:
        summary = follow(job)
    except KeyboardInterrupt:
        print(f"\nstopped following; SLURM job {job.job_id} keeps running (stop it with `scancel {job.job_id}`)")
        return 130
    status = summary.get("status")
    print(f"SLURM job {job.job_id}: {status}" + (f": {summary['error']}" if summary.get("error") else ""), flush=True)
    return 0 if status == "completed" else 1


def follow(job, poll_s: float = 1.0) -> dict:
    """Stream task 0's stdout and stderr while the job runs (across requeues); return its summary."""
    paths = job.task(0).paths
    streams = [[paths.stdout, 0, sys.stdout], [paths.stderr, 0, sys.stderr]]

    def drain():
        for stream in streams:
            path, offset, out = stream
            if path.exists() and path.stat().st_size > offset:
                with open(path, "rb") as f:
                    f.seek(offset)
                    chunk = f.read()
                stream[1] = offset + len(chunk)
                out.write(chunk.decode(errors="replace"))
                out.flush()

    gone_since, state = None, None
    while True:
        drain()
        if paths.result_pickle.exists():
            break
        state = slurm_state(job.job_id)
        if state in ENDED or state is None:  # ended without a result (killed, node failure), or forgotten
            gone_since = gone_since or time.monotonic()
            if time.monotonic() - gone_since > 10:  # the result file may lag on a shared filesystem
                break
        else:
            gone_since = None
        time.sleep(poll_s)
    time.sleep(poll_s)
    drain()
    run_dir = Path(paths.folder).parent.parent
    if not paths.result_pickle.exists():  # killed, cancelled, node failure: the job never returned
        error = f"SLURM job {job.job_id} ended ({state or 'gone'}) without a result; see {paths.stderr}"
        return mark_failed(run_dir, error, 1)
    try:
        result = job.task(0).result()  # rank 0's; the other tasks return the same summary
    except Exception as e:  # the job raised outside the run (e.g. while composing its config)
        return mark_failed(run_dir, f"{type(e).__name__}: {str(e).strip()[-2000:]}", 1)
    return result if isinstance(result, dict) else {"status": "failed", "error": f"unexpected result {result!r}"}


def slurm_state(job_id: str) -> str | None:
    """The job's state from squeue (works without SLURM accounting, unlike sacct); None if unknown."""
    try:
        out = subprocess.run(["squeue", "-h", "-t", "all", "-j", str(job_id), "-o", "%T"],
                             capture_output=True, text=True, timeout=30).stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        return "UNKNOWN"
    return out[0] if out else None


# --- inside the job: every task ---------------------------------------------------------------------
def run_in_job(cfg, run) -> dict:
    """One SLURM task's part of a submitted run (or sweep job): `run(cfg)`, resumed after a requeue.

    A failure does not raise: rank 0 records it in summary.json and the summary is the job's result,
    so the other jobs of a sweep go on. SystemExit (e.g. SIGTERM while the job is requeued) still ends
    the task without a result, so the requeued job's result is the one collected."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0 and resumable(cfg, run_dir):
        log.info("SLURM job requeued (restart %s): resume=auto from %s", os.environ["SLURM_RESTART_COUNT"], run_dir)
        cfg.resume = "auto"
    rank0 = os.environ.get("SLURM_PROCID", "0") == "0"
    try:
        run(cfg)
    except Exception as e:
        code = ConfigError.exit_code if isinstance(e, ConfigError) else 1
        message = f"{type(e).__name__}: {e}" if code == 1 else str(e)
        print(f"Error: {message}", file=sys.stderr, flush=True)
        if rank0:
            mark_failed(run_dir, message, code)
        if code == 1:
            log.exception("the run failed")
    return read_summary(run_dir) or {"status": "failed", "error": "the run wrote no summary.json"}


def resumable(cfg, run_dir: Path) -> bool:
    """After a requeue: continue with resume=auto unless the run names a checkpoint and none of its own exists yet."""
    if cfg.resume in (None, "auto"):
        return True
    from ..checkpoint_files import complete_checkpoints

    return bool(complete_checkpoints(run_dir / "checkpoints"))

"""SLURM sweeps: a job that ends badly fails alone, and the sweep goes on to its summary.

hydra-submitit-launcher waits for each job's result in turn. A job that ends without one (SIGKILL,
out of memory, scancel, a lost node) makes that wait raise, which ends the whole sweep without its
summary; and on a cluster without SLURM accounting (no sacct) submitit never learns that the job
ended, so the sweep waits forever. `fail_jobs_alone` changes only that: job states come from squeue
where sacct cannot answer, and such a job gets a failed summary.json naming its SLURM state and
log, like a job that failed inside the run.
"""

import getpass
import logging
import subprocess
from pathlib import Path

from hydra.core.utils import JobReturn, JobStatus
from omegaconf import open_dict
from submitit.core.utils import FailedJobError, UncompletedJobError
from submitit.slurm.slurm import SlurmInfoWatcher, SlurmJob

from .jobs import mark_failed

log = logging.getLogger("paratrain")


def accounting_enabled() -> bool:
    """Whether sacct answers: it needs SLURM accounting, which small clusters often run without."""
    try:
        return subprocess.run(["sacct", "-n", "-X", "-j", "1"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


class QueueWatcher(SlurmInfoWatcher):
    """submitit's job-state watcher, reading squeue instead of sacct. squeue lists a job until
    MinJobAge after it ends, so a registered job that it no longer lists has ended."""

    def _make_command(self):
        if not self._registered - self._finished:
            return None
        return ["squeue", "-h", "--array", "-t", "all", "-u", getpass.getuser(), "-o", "%i|%T|%N"]

    def read_info(self, string):
        text = string.decode() if isinstance(string, bytes) else string
        info = super().read_info("JobID|State|NodeList\n" + text)  # sacct's --parsable2 layout
        for job_id in self._registered - set(info):
            info[job_id] = {"JobID": job_id, "State": "LEFT_QUEUE"}
        return info


def fail_jobs_alone() -> None:
    """Make each job of a SLURM sweep end as a result, a failed summary if need be (once per process).

    submitit builds the jobs of an array itself (SlurmJob, not a class one can pass in), and
    hydra-submitit-launcher waits on them with `job.results()`: so the change is made to that class,
    in the process that submits the sweep (trainer/launch/slurm.py: prepare_sweep)."""
    if getattr(SlurmJob.results, "fails_alone", False):
        return
    results = SlurmJob.results
    failed: dict[str, JobReturn] = {}  # by job id: every task of a multi-task job fails the same way

    def results_or_failure(job):
        try:
            return results(job)
        except (UncompletedJobError, FailedJobError) as e:
            if job.job_id not in failed:
                failed[job.job_id] = failed_job(job, e)
            return [failed[job.job_id]]

    results_or_failure.fails_alone = True
    SlurmJob.results = results_or_failure
    if not accounting_enabled():
        SlurmJob.watcher = QueueWatcher(delay_s=30)


def failed_job(job, error: Exception) -> JobReturn:
    """The JobReturn of a job that ended without a result or raised outside the run; its summary.json says why."""
    submission = job.submission()  # the pickled launcher, and this job's (overrides, dir key, job num, ...)
    launcher, (overrides, _, job_num) = submission.function, submission.args[:3]
    # The job directory as the job itself computes it (hydra-submitit-launcher's __call__).
    cfg = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, list(overrides))
    with open_dict(cfg.hydra.job):
        cfg.hydra.job.id, cfg.hydra.job.num = job.job_id, job_num
    run_dir = Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)
    if isinstance(error, UncompletedJobError):
        reason = (f"SLURM job {job.job_id} ended without a result (state {job.state}): killed, out of memory or "
                  f"cancelled? Its log: {job.paths.stderr}")
    else:
        last = [line for line in str(error).splitlines() if line.strip()][-1:] or [type(error).__name__]
        reason = f"SLURM job {job.job_id} raised outside the run: {last[0].strip()} (its log: {job.paths.stderr})"
    log.error("job %d: %s", job_num, reason)
    summary = mark_failed(run_dir, reason, None)
    return JobReturn(overrides=list(overrides), working_dir=str(run_dir), status=JobStatus.COMPLETED,
                     _return_value=summary)

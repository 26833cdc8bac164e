"""When checkpoints are written, where they live, and which one a run resumes from.

    <run_dir>/checkpoints/step000300/     complete: published by an atomic rename, has manifest.json
    <run_dir>/checkpoints/.tmp-step000400/ being written (or left by a killed run: ignored, warned)

Every rank writes its shards into the temporary directory (strategies/portable_state.py); rank 0 then
renames it to its final name, so a checkpoint is either complete or invisible to `resume=auto`.
The newest `trainer.keep_last_checkpoints` are kept.

`resolve_resume` runs in the CLI before the Trainer exists and before any file of the run is
written: a bad `resume=` (missing, partial, corrupt, another model) is a ConfigError (exit 2) and
leaves the run directory as it was.
"""

import errno
import logging
import os
import re
import shutil
import time
from pathlib import Path

import lightning as L
from omegaconf import OmegaConf

from ..strategies import portable_state as ckpt
from . import faults
from .errors import ConfigError

log = logging.getLogger("paratrain")
STEP_DIR = re.compile(r"^step(\d{6,})$")
TMP_PREFIX = ".tmp-"


def checkpoint_name(step: int) -> str:
    return f"step{step:06d}"


def complete_checkpoints(root: Path, warn: bool = False) -> list[Path]:
    """Complete checkpoints under `root`, oldest first; partial ones are skipped (with a warning)."""
    if not root.is_dir():
        return []
    found, partial = [], []
    for p in root.iterdir():
        match = STEP_DIR.match(p.name)
        if match and (p / ckpt.MANIFEST_FILE).is_file():
            found.append((int(match.group(1)), p))
        elif match or p.name.startswith(TMP_PREFIX):
            partial.append(p)
    if warn:
        for p in sorted(partial):
            log.warning("ignoring partial checkpoint %s: it was never published (the run stopped while writing it)", p)
    return [p for _, p in sorted(found)]


def find_checkpoint(given: str, what: str = "resume") -> Path:
    """The checkpoint `given` names: a checkpoint directory, or a run (or checkpoints/) directory,
    meaning its newest complete checkpoint. Raises ConfigError; the error calls the input `what`."""
    path = Path(os.path.expanduser(str(given))).absolute()
    if not path.exists():
        raise ConfigError(
            f"{what}={given!r} does not exist: give the path of a checkpoint directory "
            f"(<run_dir>/checkpoints/stepNNNNNN) or of a run directory (its newest checkpoint). Check the path.")
    if (path / ckpt.MANIFEST_FILE).exists() or STEP_DIR.match(path.name) or path.name.startswith(TMP_PREFIX):
        return path  # a checkpoint, complete or not: verify() says which
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    found = complete_checkpoints(root, warn=True)
    if not found:
        raise ConfigError(
            f"{what}={given!r} holds no complete checkpoint: expected a checkpoint directory (with "
            f"{ckpt.MANIFEST_FILE}) or a run directory with checkpoints/stepNNNNNN in it.")
    return found[-1]


def resolve_resume(cfg, run_dir, module=None) -> str | None:
    """The checkpoint directory `resume=` names, verified; None for a fresh run. Raises ConfigError.

    resume=null: fresh. resume=auto: the newest complete checkpoint in <run_dir>/checkpoints, or
    fresh if there is none. resume=PATH: a checkpoint directory, or a run directory (its newest).
    With `module` (the LightningModule, may be on the meta device), the checkpoint's parameter
    names and shapes are checked against it."""
    resume = cfg.get("resume")
    if resume in (None, "", "null"):
        earlier = [p.name for p in (Path(run_dir) / "metrics.csv", Path(run_dir) / "summary.json",
                                    Path(run_dir) / "checkpoints") if p.exists()]
        if earlier:
            raise ConfigError(
                f"hydra.run.dir={run_dir} already holds an earlier run ({', '.join(earlier)}), and resume=null "
                f"would start a fresh one over it. Continue that run with resume=auto, or pick a new "
                f"hydra.run.dir.")
        return None
    if resume == "auto":
        found = complete_checkpoints(Path(run_dir) / "checkpoints", warn=True)
        if not found:
            log.warning("resume=auto found no complete checkpoint in %s: this starts a FRESH run from step 0 there. "
                        "If you meant to continue a run, stop now (Ctrl-C) and check hydra.run.dir.",
                        Path(run_dir) / "checkpoints")
            return None
        path = found[-1]
    else:
        path = find_checkpoint(resume)
    meta = ckpt.verify(path)
    saved = (meta.get("paratrain") or {}).get("config") or {}
    if module is not None:
        try:
            ckpt.check_model(path, module)
        except ckpt.CheckpointError as e:
            changed = _changed_keys(saved.get("model"), OmegaConf.to_container(cfg.model, resolve=True), "model")
            raise ckpt.CheckpointError(f"{e} The checkpoint was trained with {', '.join(changed)}."
                                       if changed else str(e)) from None
    saved_optim = (saved.get("optimizer") or {}).get("_target_")
    if saved_optim and saved_optim != cfg.optimizer._target_:
        raise ConfigError(
            f"optimizer._target_={cfg.optimizer._target_}, but checkpoint {path} was trained with {saved_optim}: "
            f"its optimizer state does not fit another optimizer. Resume with optimizer._target_={saved_optim}, "
            f"or start fresh from exported weights (paratrain-export).")
    log.info("resuming from %s (step %s)", path, meta.get("global_step"))
    return str(path)


def _changed_keys(saved, current, prefix: str) -> list[str]:
    """["model.d_model=32 (this run: 64)", ...] for the leaves where two config trees differ."""
    if isinstance(saved, dict) and isinstance(current, dict):
        return [c for k in sorted(set(saved) | set(current), key=str)
                for c in _changed_keys(saved.get(k), current.get(k), f"{prefix}.{k}")]
    return [] if saved == current else [f"{prefix}={saved} (this run: {current})"]


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full); the message names the directory and the bytes."""


NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def disk_full(error: BaseException) -> bool:
    """True if `error`, its causes, or any rank's failure inside DCP's CheckpointException ran out of space."""
    seen, todo = set(), [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in NO_SPACE or "No space left on device" in str(e):
            return True
        failures = getattr(e, "failures", None)  # torch.distributed.checkpoint.api.CheckpointException
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
        todo += [e.__cause__, e.__context__]
    return False


def _tree_bytes(path: Path) -> int:
    try:
        return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
    except OSError:  # gone (rank 0 removed it) or unreadable
        return 0


class Checkpointer(L.Callback):
    """Save every `every_n_steps` optimizer steps and at the last step; keep the newest `keep_last`."""

    def __init__(self, run_dir, every_n_steps: int, keep_last: int, config=None, run_directory=None):
        self.root = Path(run_dir) / "checkpoints"
        self.every, self.keep_last = every_n_steps, keep_last
        self.config = OmegaConf.to_container(config, resolve=True) if config is not None else None
        self.run_directory = run_directory  # flushed before a save, so metrics cover the checkpoint's steps
        self.last_saved: int | None = None  # the step of the newest checkpoint this run published

    @property
    def last_saved_name(self) -> str:
        return checkpoint_name(self.last_saved) if self.last_saved is not None else "(none)"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        step = trainer.global_step
        if step % self.every == 0 or step >= trainer.max_steps:
            self.save(trainer, step)

    def on_exception(self, trainer, pl_module, exception):
        # Rank-local (other ranks may be gone): say where the run can continue from.
        found = complete_checkpoints(self.root)
        where = f"resume=auto continues from {found[-1]}" if found else "no checkpoint was completed yet"
        reason = (str(exception).splitlines() or [""])[0][:300]
        log.error("rank %d stopped after step %d (%s: %s); %s", trainer.global_rank, trainer.global_step,
                  type(exception).__name__, reason, where)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        checkpoint["paratrain"] = {"config": self.config, "world_size": trainer.world_size}

    def save(self, trainer, step: int) -> Path:
        started = time.perf_counter()
        final = self.root / checkpoint_name(step)
        tmp = self.root / f"{TMP_PREFIX}{checkpoint_name(step)}"
        strategy = trainer.strategy
        if trainer.is_global_zero:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while writing this step
            tmp.mkdir(parents=True)
            if self.run_directory is not None:
                self.run_directory.flush()
        strategy.barrier("checkpoint-prepare")
        try:
            # Every rank writes its shards; DCP gathers any rank's write error and raises it on every rank.
            trainer.save_checkpoint(tmp, weights_only=False)  # ends in a barrier
        except BaseException as e:  # DCP's CheckpointException is a BaseException
            if not disk_full(e):
                raise
            raise self._disk_full_error(trainer, step, tmp) from None
        faults.inject("save", step=step, rank=trainer.global_rank)
        if trainer.is_global_zero:
            self._publish(tmp, final)
            self._prune()
        strategy.barrier("checkpoint-publish")
        self.last_saved = step
        if self.run_directory is not None:
            self.run_directory.pause(time.perf_counter() - started)
        return final

    def _disk_full_error(self, trainer, step: int, tmp: Path) -> "CheckpointWriteError":
        """Drop the partial checkpoint (never published), then say where, how much, and what still holds."""
        written = _tree_bytes(tmp)
        if trainer.is_global_zero:
            shutil.rmtree(tmp, ignore_errors=True)
        found = complete_checkpoints(self.root)
        needed = _tree_bytes(found[-1]) if found else written
        free = shutil.disk_usage(self.root).free
        kept = (f"The previous checkpoint {found[-1]} is intact: resume=auto continues from it."
                if found else "No earlier checkpoint of this run exists.")
        return CheckpointWriteError(
            f"the checkpoint of step {step} does not fit in {self.root}: the disk is full (about {needed:,} bytes "
            f"needed for one checkpoint, {free:,} bytes free after removing the partial one; nothing partial was "
            f"published). {kept} Free space there, or move the run to a larger disk (hydra.run.dir).")

    @staticmethod
    def _publish(tmp: Path, final: Path) -> None:
        if final.exists():  # the same step again (a resumed run retracing steps): replace it
            old = final.with_name(f"{TMP_PREFIX}old-{final.name}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)  # atomic: the checkpoint appears complete or not at all
        log.info("checkpoint %s", final)

    def _prune(self) -> None:
        complete = complete_checkpoints(self.root)
        for old in complete[: max(0, len(complete) - self.keep_last)]:
            shutil.rmtree(old, ignore_errors=True)
        for p in self.root.iterdir():  # partial ones of killed runs: no longer the newest of anything
            if p.name.startswith(TMP_PREFIX):
                shutil.rmtree(p, ignore_errors=True)

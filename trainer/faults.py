"""Faults: a non-finite loss never reaches the weights; test hooks that kill a rank or poison a loss.

`trainer.on_nonfinite_loss=error` (default) stops the run before the optimizer step of a step whose
loss is NaN or inf on any rank, so no NaN weights are ever saved; `skip` drops that step's update
(the step still counts: schedule and data move on) and trains on.

PARATRAIN_FAULT (tests only; comma-separated) makes a run fail on purpose:
    kill@N[:R]          rank R (default 0) SIGKILLs itself when it starts step N+1
    nan@N[:R]           the loss of step N is NaN on rank R (default 0)
    kill_in_save@N[:R]  rank R SIGKILLs itself while checkpoint N is written, before it is published
    stall_in_stop@N[:R] rank R sleeps 120 s after a stop signal ended step N, before its checkpoint
N may be * (any step).
"""

import logging
import os
import signal
import time

import lightning as L
import torch

from .errors import ConfigError

log = logging.getLogger("paratrain")
ENV = "PARATRAIN_FAULT"


class NonFiniteLossError(RuntimeError):
    pass


class NonFiniteLossGuard(L.Callback):
    def __init__(self, mode: str = "error"):
        if mode not in ("error", "skip"):
            raise ConfigError(f"trainer.on_nonfinite_loss={mode!r} is not a policy: a NaN/inf loss either stops the "
                              f"run (error) or drops that step's update (skip). Use error or skip.")
        self.mode = mode
        self._bad: torch.Tensor | None = None  # any non-finite micro-batch loss on this rank since the last step
        self._skip = False

    def on_train_start(self, trainer, pl_module):
        if self.mode == "skip":
            for optimizer in trainer.optimizers:
                self._wrap(optimizer)

    def on_before_backward(self, trainer, pl_module, loss):
        bad = (~torch.isfinite(loss.detach())).float().reshape(1)
        self._bad = bad if self._bad is None else torch.maximum(self._bad, bad)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        # After backward and gradient sync, before clipping and the update. Every rank joins the
        # reduction every step (ranks must agree to skip); .item() is one device-to-host sync.
        bad, self._bad = self._bad, None
        if bad is None:
            return
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce(bad, reduce_op="max")
        if not bad.item():
            return
        step = trainer.global_step + 1
        if self.mode == "skip":
            self._skip = True
            if trainer.is_global_zero:
                log.warning("step %d: non-finite loss; its update is skipped (trainer.on_nonfinite_loss=skip)", step)
            return
        raise NonFiniteLossError(
            f"the loss of step {step} is not finite (NaN or inf) on at least one rank: the run stops before the "
            f"update, so no checkpoint holds non-finite weights. Lower optimizer.lr, set trainer.gradient_clip_val, "
            f"or set trainer.on_nonfinite_loss=skip to drop such steps; resume=auto continues from the last checkpoint.")

    def _wrap(self, optimizer):
        # Lightning runs forward and backward inside optimizer.step(closure): the decision to skip
        # is made during the closure, so the update after it is what we leave out.
        original = optimizer.step

        def step(closure=None, **kwargs):
            if closure is None:
                return original(**kwargs)
            with torch.enable_grad():
                loss = closure()
            if self._skip:
                self._skip = False
                optimizer.zero_grad(set_to_none=True)
                return loss
            return original(**kwargs)

        optimizer.step = step


def _parse(spec: str) -> list[tuple[str, int, int]]:
    faults = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        kind, _, where = item.partition("@")
        step, _, rank = where.partition(":")
        faults.append((kind, -1 if step == "*" else int(step), int(rank or 0)))
    return faults


def _planned(kind: str, step: int, rank: int) -> bool:
    return any(k == kind and s in (step, -1) and r == rank for k, s, r in _parse(os.environ.get(ENV, "")))


def _kill_self(what: str) -> None:
    log.warning("%s: %s, SIGKILL", ENV, what)
    for handler in logging.getLogger().handlers + log.handlers:
        handler.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def inject(point: str, step: int, rank: int) -> None:
    """Called where a fault may be planned (e.g. point="save"): dies if the environment says so."""
    if _planned(f"kill_in_{point}", step, rank):
        _kill_self(f"rank {rank} killed during {point} of step {step}")
    if _planned(f"stall_in_{point}", step, rank):
        log.warning("%s: rank %d stalls 120 s in %s of step %d", ENV, rank, point, step)
        time.sleep(120)


class FaultInjection(L.Callback):
    """Acts on PARATRAIN_FAULT's kill@ and nan@ entries (see the module docstring)."""

    def __init__(self):
        self._hook = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        done, rank = trainer.global_step, trainer.global_rank
        if _planned("kill", done, rank):
            _kill_self(f"rank {rank} killed after step {done}")
        if _planned("nan", done + 1, rank) and self._hook is None:
            self._hook = pl_module.model.register_forward_hook(lambda m, i, out: out * float("nan"))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


def callbacks(trainer_cfg) -> list[L.Callback]:
    out = [NonFiniteLossGuard(trainer_cfg.get("on_nonfinite_loss", "error"))]
    if os.environ.get(ENV):
        out.append(FaultInjection())
    return out

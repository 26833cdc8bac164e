"""Stop signals: SIGTERM or SIGINT ends a run after its current step, with a checkpoint of that step.

    kill -TERM <pid of train>    (rank 0 only), a scheduler's SIGTERM to every rank, or Ctrl-C (SIGINT)
    -> the step in progress finishes, every rank agrees to stop after it, a checkpoint of it is published
       (atomically, like every checkpoint), summary.json says "status": "interrupted", and `train`
       exits 128 + the signal number (143 for SIGTERM, 130 for SIGINT). resume=auto continues bitwise.
    a second signal -> exit at once (128 + its number); rank 0 kills the ranks it launched.

Agreement: a signal reaches one rank, or all of them at different instants. The handler only records
it; at the end of every optimizer step every rank joins one all-reduce (max) of its record, so all
ranks read the same answer at the same step. Whether a rank joins never depends on the data or on
which rank was signalled. Cost: one 1-element all-reduce per step.

Lightning 2.6 handles SIGTERM itself (its _SignalConnector): its handler forwards the signal to the
child ranks and runs a broadcast inside the handler, and the loops then raise SIGTERMException (a
SystemExit with status 0) from checks that only the signalled rank makes. `attach` swaps that
connector for one that installs nothing, so Lightning's per-batch broadcast always carries 0.

Under SLURM submitit stays the only requeue owner (SIGUSR2, trainer/launch/slurm.py): the SIGTERM
that SLURM sends on a requeue, a preemption or scancel stops the run as above, and the requeued job
continues from that checkpoint with resume=auto.
"""

import json
import logging
import os
import signal
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.trainer.connectors.signal_connector import _SignalConnector

from . import faults

log = logging.getLogger("paratrain")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def exit_status(signum: int) -> int:
    """The shell's convention for a process ended by signal N."""
    return 128 + signum


class _NoLightningHandlers(_SignalConnector):
    """Lightning's signal connector minus its handlers: StopSignals owns SIGTERM and SIGINT."""

    def register_signal_handlers(self) -> None:
        self.received_sigterm = False

    def teardown(self) -> None:
        pass


class StopSignals(L.Callback):
    """Records the first stop signal; at the next step boundary all ranks checkpoint and stop."""

    def __init__(self):
        self.received: int | None = None  # this rank's first signal
        self.stopped: tuple[int, int] | None = None  # (signal, step) once the ranks agreed and stopped
        self.checkpointer = self.run_directory = self.trainer = None
        self._previous: dict = {}

    # --- handlers (this process) -----------------------------------------------------------------
    def install(self) -> "StopSignals":
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        # Runs between two bytecodes of the main thread: os.write, not print or logging (not reentrant).
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = signum
            os.write(2, f"\n[paratrain] {name}: finishing the current step, then writing a checkpoint of it "
                        f"(send {name} again to stop at once)\n".encode())
            return
        os.write(2, f"\n[paratrain] second stop signal ({name}): stopping at once\n".encode())
        self._stop_at_once(signum)

    def _stop_at_once(self, signum: int) -> None:
        trainer = self.trainer
        try:
            for proc in getattr(getattr(trainer, "strategy", None), "launcher", None).procs if trainer else []:
                proc.kill()  # the ranks this process launched: they would wait for it in a collective
        except AttributeError:
            pass
        try:
            if trainer is not None and trainer.is_global_zero and self.run_directory is not None:
                self._write_summary(signum, trainer.global_step, at_once=True)
            for handler in logging.getLogger().handlers + log.handlers:
                handler.flush()
        except Exception:  # noqa: BLE001 - exiting at once matters more than the record
            pass
        os._exit(exit_status(signum))

    # --- wiring ------------------------------------------------------------------------------------
    def attach(self, trainer, checkpointer, run_directory) -> None:
        """Own the stop signals of `trainer` (see the module docstring); checkpoints go through `checkpointer`."""
        self.trainer, self.checkpointer, self.run_directory = trainer, checkpointer, run_directory
        trainer._signal_connector = _NoLightningHandlers(trainer)  # private in Lightning 2.6; tests/test_stop.py pins it

    def exit_if_signalled(self) -> None:
        """Before training: a signal that came while the run was being set up ends it here, nothing written."""
        if self.received is not None:
            name = signal.Signals(self.received).name
            print(f"Stopped by {name} before training started: nothing was trained or written.", flush=True)
            raise SystemExit(exit_status(self.received))

    def finish(self) -> None:
        """After Trainer.fit: exit 128 + N if a signal stopped the run (SystemExit; submitit keeps no result)."""
        self.uninstall()
        if self.stopped is None:
            return
        signum, step = self.stopped
        if self.trainer is None or self.trainer.is_global_zero:
            where = self.checkpointer.root / self.checkpointer.last_saved_name if self.checkpointer else None
            print(f"Stopped by {signal.Signals(signum).name} after step {step}: checkpoint {where}. "
                  f"Continue with resume=auto (same hydra.run.dir).", flush=True)
        raise SystemExit(exit_status(signum))

    # --- at every step boundary (every rank) ---------------------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # mid-accumulation: the optimizer step is not done yet
        flag = torch.tensor([float(self.received or 0)], device=pl_module.device)
        if trainer.world_size > 1:
            flag = trainer.strategy.reduce(flag, reduce_op="max")  # every rank, every step
        signum, step = int(flag.item()), trainer.global_step
        if not signum or step >= trainer.max_steps:
            return  # no signal, or the run is complete anyway
        if trainer.is_global_zero:
            log.warning("%s: stopping after step %d; writing its checkpoint", signal.Signals(signum).name, step)
        faults.inject("stop", step=step, rank=trainer.global_rank)
        if self.checkpointer.last_saved != step:
            self.checkpointer.save(trainer, step)
        self.stopped = (signum, step)
        self.run_directory.stopped_by = self._record(signum, step)
        trainer.should_stop = True
        every = trainer.val_check_batch  # in batches; float("inf") when validation is off
        if not (isinstance(every, int) and every > 0 and (trainer.fit_loop.epoch_loop.total_batch_idx + 1) % every == 0):
            trainer.limit_val_batches = 0  # Lightning validates on any early stop; only a scheduled validation runs

    def _record(self, signum: int, step: int, at_once: bool = False) -> dict:
        name = signal.Signals(signum).name
        root = self.checkpointer.root
        if at_once:
            from .checkpoint_files import complete_checkpoints

            found = complete_checkpoints(root)
            resume = f"resume=auto continues from {found[-1]}" if found else "no checkpoint was completed"
            error = f"stopped at once by a second {name} during step {step + 1}; {resume}"
        else:
            error = f"stopped by {name} after step {step}; resume=auto continues from {root / self.checkpointer.last_saved_name}"
        return {"signal": name, "exit_code": exit_status(signum), "error": error}

    def _write_summary(self, signum: int, step: int, at_once: bool) -> None:
        path = Path(self.run_directory.run_dir) / "summary.json"
        summary = {"status": "interrupted", "steps": step, **self._record(signum, step, at_once)}
        tmp = path.with_name("summary.json.tmp")
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
        os.replace(tmp, path)

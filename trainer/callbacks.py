"""The run directory of DESIGN.md: metrics.csv, summary.json and plots/, written by rank 0; the step
progress bar; and model.init_from's weight loading (kept out of hf_init.py, which the config check
imports: that check must not pay for importing Lightning).

Metrics are reduced on every rank at the same steps (a collective); only rank 0 writes files.
"""

import csv
import logging
import json
import math
import os
import resource
import shlex
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar

from ..strategies.zero import grad_bytes, local_numel, rank_memory
from .hf_init import load_weights
from .loggers import finish as finish_loggers
from .plots import plot_expert_load, plot_loss_curve

log = logging.getLogger("paratrain")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class RunDirectory(L.Callback):
    def __init__(self, run_dir: str, params: dict, layout: dict, log_every_n_steps: int, loggers=(), hparams=None,
                 token_unit: str = "byte"):
        self.run_dir = Path(run_dir)
        self.loggers, self.hparams = list(loggers), hparams or {}  # experiment loggers (trainer/loggers.py): fed each row
        self._sent: tuple[int, set] = (-1, set())  # the step and keys last sent to the loggers
        self.token_unit = token_unit  # "byte" for byte-level data: losses are then also given in bits per byte
        self.report: str | None = None  # the end-of-run block, printed once the progress bar is closed
        self.params, self.layout, self.log_every = params, layout, log_every_n_steps
        self.rows: list[dict] = []  # written rows; kept for plots and the summary
        self._pending: dict | None = None  # the newest row, open until the next one (val/loss may join it)
        self._columns: list[str] | None = None
        self.load_history: list[tuple[int, torch.Tensor]] = []
        self._paused_s = 0.0  # validation and checkpoint time: not training, so not in tokens/s
        self._logged: tuple[int, set] = (-1, set())  # the step and keys of the last greppable log line
        self._reopenable: int | None = None  # step of the last row, if flush() wrote it early
        self._last_row_offset = 0  # metrics.csv's size before the last row
        self.stopped_by: dict | None = None  # set by trainer/stop_signals.py when a signal ended the run early
        self.val_columns: list[str] = []  # per-byte validation loss, when the data knows bytes per token
        self._grad_bytes: int | None = None  # gradient bytes this rank holds during a step

    def on_fit_start(self, trainer, pl_module):
        if trainer.is_global_zero:  # once, not once per rank
            log.info("run directory: %s", self.run_dir)

    # --- timing -------------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module):
        self._t0 = self._window_t0 = time.perf_counter()
        self._window_paused_s, self._window_step = 0.0, trainer.global_step
        self._start_step = trainer.global_step
        if getattr(pl_module, "token_bytes", None) is not None:
            self.val_columns = ["val/loss_per_byte", "val/bits_per_byte"]
        if trainer.global_step > 0 and trainer.is_global_zero:
            self._continue_metrics(trainer.global_step)  # resumed: after the checkpoint loaded
        if trainer.is_global_zero:
            for logger in self.loggers:
                logger.log_hyperparams(self.hparams)

    def pause(self, seconds: float) -> None:
        """Count `seconds` of non-training work (validation, a checkpoint save) out of tokens/s."""
        self._paused_s += seconds
        self._window_paused_s += seconds

    def on_validation_start(self, trainer, pl_module):
        self._val_t0 = time.perf_counter()

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        self.pause(time.perf_counter() - self._val_t0)
        val = trainer.callback_metrics.get("val/loss")
        if val is not None and trainer.is_global_zero:
            row = self._pending if self._pending and self._pending["step"] == trainer.global_step else None
            if row is None and self._reopenable == trainer.global_step:
                row = self._reopen_last()  # flushed for a checkpoint of this step; val/loss joins it
            if row is None:
                self._flush()
                row = self._pending = {"step": trainer.global_step}
            row["val/loss"] = float(val)
            per_token = trainer.callback_metrics.get("val/bytes_per_token")
            if per_token is not None:  # comparable across tokenizers: nats and bits per byte of text
                row["val/loss_per_byte"] = float(val) / float(per_token)
                row["val/bits_per_byte"] = row["val/loss_per_byte"] / math.log(2)

    # --- one row per logged step -----------------------------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        step_done = (batch_idx + 1) % trainer.accumulate_grad_batches == 0
        if step_done and step >= trainer.max_steps:
            # Stopping through should_stop makes Lightning validate after this step, so every run (and
            # every resumed run) ends with a val/loss of its final weights, whatever val_check_interval.
            trainer.should_stop = True
        if step_done and (step % self.log_every == 0 or step >= trainer.max_steps):
            metrics = pl_module.reduce_step_metrics()  # collective: every rank, same steps
            now = time.perf_counter()
            train_s = now - self._window_t0 - self._window_paused_s
            metrics["tokens_per_s"] = (step - self._window_step) * pl_module.tokens_per_step / max(train_s, 1e-9)
            metrics["lr"] = trainer.optimizers[0].param_groups[0]["lr"]
            self._window_t0, self._window_paused_s, self._window_step = now, 0.0, step
            pl_module.log("train_loss", metrics["train/loss"], prog_bar=True, logger=False)
            if trainer.is_global_zero:
                self._flush()
                self._pending = {"step": step, **metrics}
                if pl_module.expert_load is not None:
                    self.load_history.append((step, pl_module.expert_load))

    def flush(self):
        """Write the open row now (before a checkpoint, so metrics.csv covers the checkpoint's steps)."""
        step = self._pending["step"] if self._pending else None
        self._flush()
        self._reopenable = step

    def _reopen_last(self) -> dict:
        os.truncate(self.run_dir / "metrics.csv", self._last_row_offset)
        self._reopenable = None
        self._pending = self.rows.pop()
        return self._pending

    def _continue_metrics(self, step: int) -> None:
        """A resumed run: keep the rows up to its checkpoint's step, drop later ones (no duplicates)."""
        path = self.run_dir / "metrics.csv"
        if not path.exists() or path.stat().st_size == 0:
            return
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            columns, rows = reader.fieldnames, [r for r in reader if r.get("step") and int(float(r["step"])) <= step]
        tmp = path.with_name("metrics.csv.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, path)
        self._columns = columns
        self.rows = [{k: int(float(v)) if k == "step" else float(v) for k, v in r.items() if v not in (None, "")}
                     for r in rows]

    def _flush(self):
        self._reopenable = None
        if self._pending is None:
            return
        row, self._pending = self._pending, None
        self.rows.append(row)
        path = self.run_dir / "metrics.csv"
        self._last_row_offset = path.stat().st_size if path.exists() else 0
        # Empty also when the first row was re-opened (truncated to 0): the header goes first again.
        fresh = self._last_row_offset == 0
        if self._columns is None:
            if fresh:
                first = ["step", "train/loss", "val/loss", *self.val_columns, "tokens_per_s"]
                self._columns = first + sorted(k for k in row if k not in first)
            else:  # a resumed run: its columns
                with open(path) as f:
                    self._columns = next(csv.reader(f))
        with open(path, "w" if fresh else "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self._columns, extrasaction="ignore")
            if fresh:
                writer.writeheader()
            writer.writerow(row)
        # A row re-opened for val/loss sends the loggers only what it gained.
        sent_step, sent = self._sent
        new = {k: v for k, v in row.items() if k != "step" and not (sent_step == row["step"] and k in sent)}
        for logger in self.loggers:
            if new:
                logger.log_metrics(new, step=row["step"])
        self._sent = (row["step"], set(new) | (sent if sent_step == row["step"] else set()))
        # One greppable line per row in the run's log: `grep 'step=' train.log`. A row re-opened for
        # val/loss logs only what it gained, so no value appears twice.
        step, logged = self._logged
        keys = [k for k in ("train/loss", "val/loss", "tokens_per_s", "lr") if k in row and not (step == row["step"] and k in logged)]
        if keys:
            log.info(" ".join([f"step={row['step']}"] + [f"{k}={row[k]:.5g}" for k in keys]))
        self._logged = (row["step"], set(keys) | (logged if step == row["step"] else set()))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self._grad_bytes is None:  # synced gradients of the first step (optimizers drop them later)
            self._grad_bytes = grad_bytes(pl_module.model)

    # --- end of run -------------------------------------------------------------------------
    def on_train_end(self, trainer, pl_module):
        # Collectives first, on every rank; then rank 0 writes.
        device = pl_module.device
        held = rank_memory(pl_module.model, trainer.optimizers, self._grad_bytes)  # bytes this rank holds, by kind
        local = torch.tensor([peak_rss_mb(), sum(local_numel(p) for p in pl_module.model.parameters()), *held.values()],
                             device=device, dtype=torch.float64)
        peaks = trainer.strategy.reduce(local, reduce_op="max") if trainer.world_size > 1 else local
        if trainer.is_global_zero:
            self._flush()
            self.write_summary(trainer, pl_module, "interrupted" if self.stopped_by else "completed",
                               peak_rss=float(peaks[0]), params_per_rank=int(peaks[1]),
                               optimizer_state_bytes=int(peaks[4]), extra=self.stopped_by,
                               held={f"{k}_per_rank": int(v) for k, v in zip(held, peaks[2:])})
            self._finalize_loggers("success")

    def on_exception(self, trainer, pl_module, exception):
        # No collectives here: other ranks may be gone.
        if trainer.is_global_zero:
            self._flush()
            self.write_summary(trainer, pl_module, "failed", error=f"{type(exception).__name__}: {exception}")
            self._finalize_loggers("failed")
            print(self.report, flush=True)
            self.report = None

    def _finalize_loggers(self, status: str) -> None:
        finish_loggers(self.loggers, status)

    def teardown(self, trainer, pl_module, stage):
        # After every on_train_end: the progress bar is closed, so the block is not torn by it.
        if self.report and trainer.is_global_zero:
            print(self.report, flush=True)
            self.report = None

    def write_summary(self, trainer, pl_module, status, peak_rss=None, params_per_rank=None, optimizer_state_bytes=None,
                      error=None, extra=None, held=None):
        self.run_dir.mkdir(parents=True, exist_ok=True)
        wall = time.perf_counter() - getattr(self, "_t0", time.perf_counter())
        steps = trainer.global_step
        tokens = (steps - getattr(self, "_start_step", 0)) * pl_module.tokens_per_step
        train_rows = [r for r in self.rows if "train/loss" in r]
        val_rows = [r for r in self.rows if "val/loss" in r]
        summary = {
            "status": status,
            "steps": steps,
            "final_loss": train_rows[-1]["train/loss"] if train_rows else None,
            "final_val_loss": val_rows[-1]["val/loss"] if val_rows else None,
            "tokens": tokens,
            "tokens_per_s": tokens / max(wall - self._paused_s, 1e-9),
            "wall_s": wall,
            "world_size": trainer.world_size,
            **self.layout,
            **self.params,
            "params_per_rank": params_per_rank,
            "optimizer_state_bytes_per_rank": optimizer_state_bytes,
            **(held or {}),  # param_bytes_per_rank, grad_bytes_per_rank, optimizer_state_bytes_per_rank (max over ranks)
            "peak_rss_mb": peak_rss if peak_rss is not None else peak_rss_mb(),
            "a2a_bytes_per_step": pl_module.step_metrics.get("a2a_bytes_per_step", 0.0),
        }
        if getattr(self, "_start_step", 0):
            summary["resumed_from_step"] = self._start_step
        if error:
            summary["error"] = error
        summary.update(extra or {})
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        self.report = end_of_run_block(summary, self.run_dir, self.token_unit, trainer.max_steps)
        plots = self.run_dir / "plots"
        if self.rows:
            plot_loss_curve(self.rows, plots / "loss.png")
        if self.load_history:
            plot_expert_load(self.load_history, plots / "expert_load.png")


def resume_command(run_dir: Path) -> str:
    """The command that continues this run: its own overrides, with resume=auto and its run directory pinned."""
    try:
        from hydra.core.hydra_config import HydraConfig

        own = [str(o) for o in HydraConfig.get().overrides.task]
    except ValueError:  # not under Hydra (a test building the callback by hand)
        own = []
    keep = [o for o in own if not o.lstrip("+~").startswith(("resume=", "hydra.run.dir="))]
    return shlex.join(["train", *keep, "resume=auto", f"hydra.run.dir={run_dir}"])


def end_of_run_block(s: dict, run_dir: Path, token_unit: str, max_steps: int) -> str:
    """What a person reads when a run ends: how it went, where it is, how to continue it."""
    def loss(value):
        if value is None:
            return "n/a"
        bits = f" = {value / math.log(2):.3f} bits/{token_unit}" if math.isfinite(value) else ""
        return f"{value:.4f} nats{bits}"

    steps = f"{s['steps']}/{max_steps} steps" + (f" (resumed from step {s['resumed_from_step']})"
                                                 if s.get("resumed_from_step") else "")
    lines = [f"run {s['status']}: {steps}" + (f": {s['error']}" if s.get("error") else ""),
             f"  final loss     train {loss(s.get('final_loss'))}, val {loss(s.get('final_val_loss'))}",
             f"  throughput     {s['tokens_per_s']:,.0f} tokens/s over {s['world_size']} process"
             f"{'es' if s['world_size'] > 1 else ''} ({s.get('layout', s.get('strategy'))})",
             f"  wall time      {s['wall_s']:.1f} s",
             f"  peak memory    {s['peak_rss_mb']:,.0f} MB RSS (the largest process)",
             f"  run directory  {run_dir}",
             f"  resume with    {resume_command(run_dir)}"]
    return "\n".join(lines)


class StepProgressBar(TQDMProgressBar):
    """Lightning's bar, labelled by what a run counts (batches towards max_steps), not "Epoch 0/-2".

    Its total is the run's max_steps; a resumed run's bar starts at the checkpoint's step, and its
    rate counts only the batches this process trained."""

    def on_train_start(self, trainer, *args):
        super().on_train_start(trainer, *args)
        self._start_at(trainer)  # a run resumed mid-epoch gets no on_train_epoch_start

    def on_train_epoch_start(self, trainer, *args):
        super().on_train_epoch_start(trainer, *args)
        self._start_at(trainer)

    def _start_at(self, trainer):
        bar = self.train_progress_bar
        done = trainer.global_step * trainer.accumulate_grad_batches
        bar.reset(total=trainer.max_steps * trainer.accumulate_grad_batches)
        bar.initial = bar.n = bar.last_print_n = done  # tqdm's rate is (n - initial) / elapsed
        bar.set_description("train")


class InitFromHF(L.Callback):
    """Fill the laid-out model with a HF checkpoint's weights on every rank.

    on_fit_start runs after the strategy has laid the model out and materialised it, and before a
    checkpoint is restored: a resumed run continues from its checkpoint, not from init_from."""

    def __init__(self, path):
        self.path = path

    def on_fit_start(self, trainer, pl_module):
        load_weights(pl_module.model, self.path)
        log.info("model.init_from: loaded %s", self.path)

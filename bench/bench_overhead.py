"""Framework overhead: the real `train` command's steady-state step vs a plain PyTorch loop.

    python bench/bench_overhead.py [--steps 50] [--rounds 3] [OVERRIDE ...]

OVERRIDEs are Hydra overrides given to both sides, e.g. `+recipe=moe_8x` or
`trainer.enable_progress_bar=false`; by default both run the default `train` config (dense 4x128,
global batch 32 x 128, AdamW, warm-up + cosine, clipping at trainer.gradient_clip_val).

  train   `train OVERRIDES trainer.max_steps=N` in a subprocess, as a user runs it (progress bar,
          metrics, run directory; validation and intermediate checkpoints pushed past the end; the
          final checkpoint is written after the last metrics row, so it is not timed). Figure:
          the `tokens_per_s` column of metrics.csv, one row per trainer.log_every_n_steps window
          (train reduces metrics once per logged step, so the windows include that cost).
  plain   a hand-written loop in a subprocess, no Lightning: the same composed config, the same
          model (`build_model`), the same sampler (`TrainBatches`), torch.optim.AdamW with the same
          parameter groups and schedule, the same clipping; `loss.item()` once per window (as any
          loop that prints its loss). Timed over the same windows.
Both at one thread (OMP_NUM_THREADS=1 and torch.set_num_threads(1)), as DESIGN.md asks of benches;
note the default `train` uses every core. Steady state = median of the windows that start after
--warmup steps; the two sides run --rounds times in alternating order, and the table shows the
median over rounds. Both report the mean training loss of each window: the same math, so they
must agree closely (a check that both do the same work). Target (DESIGN.md): train / plain <= 1.05.
"""

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import bench_env, compose, load_note, train_command

BIG = 10**6  # "never" for intervals counted in steps


def common_overrides(args) -> list[str]:
    return [*args.overrides, f"trainer.max_steps={args.steps}", f"trainer.val_check_interval={BIG}",
            "data.val_batches=1", f"trainer.checkpoint_every_n_steps={BIG}"]


def plain_worker(args) -> None:
    """The plain loop; writes [{step, tokens_per_s, train/loss}] per window to args.out."""
    import math

    import torch
    import torch.nn.functional as F

    from paratrain.trainer.data import TrainBatches, token_files
    from paratrain.trainer.models.transformer import build_model

    torch.set_num_threads(1)
    cfg = compose(common_overrides(args))
    o, t, d = cfg.optimizer, cfg.trainer, cfg.data
    assert t.devices * t.num_nodes == 1 and t.accumulate_grad_batches == 1, "the plain loop is one process, no accumulation"
    model = build_model(cfg.model, cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": o.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    assert o._target_ == "torch.optim.AdamW", "the plain loop is written for AdamW"
    opt = torch.optim.AdamW(groups, lr=o.lr, **({"betas": tuple(o.betas)} if o.betas else {}))

    def lr_factor(step):  # linear warm-up, then cosine to min_lr_ratio
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        progress = min(1.0, (step - o.warmup_steps) / max(1, t.max_steps - o.warmup_steps))
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    train_path, _ = token_files(d)
    batches = iter(TrainBatches(train_path, d.seq_len, d.batch_size, cfg.seed))
    tokens_per_step = d.batch_size * d.seq_len
    rows, loss_sum, t0 = [], 0.0, time.perf_counter()
    for step in range(1, t.max_steps + 1):
        x, y = next(batches)  # (B, T) each
        logits = model(x)
        ce = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        (ce + model.aux_loss()).backward()
        if t.gradient_clip_val:
            torch.nn.utils.clip_grad_norm_(params, t.gradient_clip_val)
        opt.step()
        schedule.step()
        opt.zero_grad(set_to_none=True)
        loss_sum = loss_sum + ce.detach()
        if step % t.log_every_n_steps == 0 or step == t.max_steps:
            window = step - (rows[-1]["step"] if rows else 0)
            mean_loss = loss_sum.item() / window  # the loop's one host sync per window
            now = time.perf_counter()
            rows.append({"step": step, "tokens_per_s": window * tokens_per_step / (now - t0), "train/loss": mean_loss})
            loss_sum, t0 = 0.0, now
    Path(args.out).write_text(json.dumps({"rows": rows, "tokens_per_step": tokens_per_step}))


def run_train(args, run_dir: Path) -> dict:
    cmd = [*train_command(), *common_overrides(args), f"hydra.run.dir={run_dir}"]
    _run(cmd, args.timeout, "train")
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = [{"step": int(float(r["step"])), "tokens_per_s": float(r["tokens_per_s"]), "train/loss": float(r["train/loss"])}
                for r in csv.DictReader(f) if r.get("tokens_per_s")]
    summary = json.loads((run_dir / "summary.json").read_text())
    if summary["world_size"] != 1:
        sys.exit(f"train ran on {summary['world_size']} processes; this bench compares one process with the plain loop")
    return {"rows": rows, "tokens_per_step": summary["tokens"] // summary["steps"]}


def run_plain(args, out: Path) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--plain-worker", "--out", str(out),
           "--steps", str(args.steps), *args.overrides]
    _run(cmd, args.timeout, "plain loop")
    return json.loads(out.read_text())


def _run(cmd, timeout, what) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(cmd, env=bench_env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        sys.exit(f"{what} did not finish in {timeout} s: {' '.join(cmd)}")
    if proc.returncode != 0:
        sys.exit(f"{what} failed with exit status {proc.returncode}: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return proc


def steady(result: dict, warmup: int) -> dict:
    rows = [r for r in result["rows"] if r["step"] - _window(result["rows"], r) >= warmup]
    if not rows:
        sys.exit(f"no metrics window starts after --warmup={warmup} steps: raise --steps")
    tps = statistics.median(r["tokens_per_s"] for r in rows)
    return {"tokens_per_s": tps, "step_s": result["tokens_per_step"] / tps, "windows": len(rows),
            "losses": {r["step"]: r["train/loss"] for r in result["rows"]}}


def _window(rows, row) -> int:
    """Steps in the window that ends at `row` (rows are in step order)."""
    i = rows.index(row)
    return row["step"] - (rows[i - 1]["step"] if i else 0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("overrides", nargs="*", help="Hydra overrides for both sides, e.g. +recipe=moe_8x")
    p.add_argument("--steps", type=int, default=50, help="optimizer steps per run")
    p.add_argument("--warmup", type=int, default=10, help="windows starting before this step are left out")
    p.add_argument("--rounds", type=int, default=3, help="runs of each side, alternating which goes first")
    p.add_argument("--timeout", type=int, default=900, help="seconds allowed per run")
    p.add_argument("--plain-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.plain_worker:
        return plain_worker(args)
    cfg = compose(common_overrides(args))
    if args.steps < args.warmup + 2 * cfg.trainer.log_every_n_steps:
        p.error(f"--steps={args.steps}: need at least 2 windows of trainer.log_every_n_steps="
                f"{cfg.trainer.log_every_n_steps} after --warmup={args.warmup}")

    load_before = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="bench_overhead-"))
    results = {"train": [], "plain": []}
    for r in range(args.rounds):
        for side in (("train", "plain") if r % 2 == 0 else ("plain", "train")):
            t0 = time.perf_counter()
            raw = run_train(args, tmp / f"train-{r}") if side == "train" else run_plain(args, tmp / f"plain-{r}.json")
            results[side].append(steady(raw, args.warmup))
            print(f"  round {r + 1}/{args.rounds} {side:<6} {results[side][-1]['step_s'] * 1e3:7.1f} ms/step "
                  f"({time.perf_counter() - t0:.0f} s run)", flush=True)
    shutil.rmtree(tmp, ignore_errors=True)

    step = {side: statistics.median(x["step_s"] for x in rs) for side, rs in results.items()}
    tps = {side: statistics.median(x["tokens_per_s"] for x in rs) for side, rs in results.items()}
    m = cfg.model
    shape = f"{'MoE' if m.moe else 'dense'} {m.n_layers}x{m.d_model}, batch {cfg.data.batch_size} x {cfg.data.seq_len}"
    print(f"{shape}, 1 thread; median of {results['train'][0]['windows']} windows of "
          f"{cfg.trainer.log_every_n_steps} steps after step {args.warmup}, median of {args.rounds} round(s)")
    print(f"{'side':<8}{'step ms':>9}{'tokens/s':>10}")
    for side in ("train", "plain"):
        print(f"{side:<8}{step[side] * 1e3:>9.1f}{tps[side]:>10.0f}")
    a, b = results["train"][-1]["losses"], results["plain"][-1]["losses"]
    gap = max(abs(a[s] - b[s]) / abs(b[s]) for s in a.keys() & b.keys())
    print(f"window mean losses, train vs plain: max rel. diff {gap:.1e}  (same work: expect < 1e-4)")
    print(f"overhead train / plain: {step['train'] / step['plain']:.3f}  (target <= 1.05)")
    print(load_note(load_before))


if __name__ == "__main__":
    main()

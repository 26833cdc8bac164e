"""MoE layouts side by side: `train +recipe=moe_8x` as single, ddp, expert and hybrid (issues 4, 5).

    python bench/bench_layouts.py [--steps 30] [--log-every 5] [--warmup 10] [--only expert-2,single] [OVERRIDE ...]

Runs the real `train` command once per layout, one after another, one thread per process
(OMP_NUM_THREADS=1), same global batch (data.batch_size, 32 x 128 by default) and same math:

  single        1 process
  ddp-2         2 processes, dp=2            expert-2      2 processes, ep=2
  ddp-4         4 processes, dp=4            expert-4      4 processes, ep=4
  hybrid-4      4 processes, dp=2 x ep=2     hybrid-4-zero the same with strategy.zero_stage=1

Validation and intermediate checkpoints are pushed past the end (data.val_batches=1). Figures:
tokens/s = median of metrics.csv `tokens_per_s` rows whose window starts at or after --warmup
(one row per --log-every steps); from summary.json: peak_rss_mb (max over ranks), params_per_rank,
optimizer_state_bytes_per_rank, a2a_bytes_per_step (dispatch + combine, forward and backward, summed
over ranks). Ratios: expert-2 / single, expert-2 / ddp-2 and a few more.
Runs with more processes than cores are oversubscribed (marked *): their speed says little.
OVERRIDEs go to every run (e.g. data.batch_size=64); a failed run is reported and skipped.
The recipe's learning-rate warm-up is kept (it outlasts the run; train warns): every layout does
the same math, so the final losses agree to float rounding. With a short warm-up (e.g.
optimizer.warmup_steps=10) the loss spikes and rounding differences grow to ~1e-2 in 30 steps.
"""

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from benchlib import bench_env, load_note, train_command

BIG = 10**6
LAYOUTS = {  # name: (processes, overrides)
    "single": (1, ["strategy=single"]),
    "ddp-2": (2, ["strategy=ddp"]),
    "expert-2": (2, ["strategy=expert"]),
    "ddp-4": (4, ["strategy=ddp"]),
    "expert-4": (4, ["strategy=expert"]),
    "hybrid-4": (4, ["strategy=hybrid", "strategy.mesh.dp=2", "strategy.mesh.ep=2"]),
    "hybrid-4-zero": (4, ["strategy=hybrid", "strategy.mesh.dp=2", "strategy.mesh.ep=2", "strategy.zero_stage=1"]),
}
RATIOS = [  # tokens/s of a over b, at the same global batch
    ("expert-2", "single", "speed-up; ideal 2 on 2 free cores"),
    ("expert-2", "ddp-2", "ideal >= 1"),
    ("ddp-2", "single", "speed-up; ideal 2 on 2 free cores"),
    ("expert-4", "ddp-4", "oversubscribed on < 4 cores"),
    ("hybrid-4", "ddp-4", "oversubscribed on < 4 cores"),
]


def run_layout(name: str, args, run_dir: Path) -> dict:
    procs, layout = LAYOUTS[name]
    cmd = [*train_command(), "+recipe=moe_8x", *layout, f"trainer.devices={procs}", f"trainer.max_steps={args.steps}",
           f"trainer.log_every_n_steps={args.log_every}", f"trainer.val_check_interval={BIG}", "data.val_batches=1",
           f"trainer.checkpoint_every_n_steps={BIG}", "trainer.enable_progress_bar=false",
           *args.overrides, f"hydra.run.dir={run_dir}"]
    t0 = time.perf_counter()
    try:
        # A new session: on a timeout the whole process tree (Lightning's child ranks too) is killed.
        proc = subprocess.Popen(cmd, env=bench_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        log, _ = proc.communicate(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.communicate()
        return {"error": f"timed out after {args.timeout} s"}
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = "\n    ".join(log.strip().splitlines()[-6:])
        return {"error": f"exit status {proc.returncode}:\n    {tail}"}
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("tokens_per_s")]
    steady, start = [], 0
    for r in rows:
        step = int(float(r["step"]))
        if start >= args.warmup:
            steady.append(float(r["tokens_per_s"]))
        start = step
    if not steady:
        return {"error": f"no metrics window starts after step {args.warmup}: raise --steps"}
    s = json.loads((run_dir / "summary.json").read_text())
    if s["world_size"] != procs:
        return {"error": f"ran on {s['world_size']} processes, expected {procs}"}
    return {"tokens_per_s": statistics.median(steady), "windows": len(steady), "wall_s": wall,
            "tokens_per_step": s["tokens"] / s["steps"], "layout": s["layout"], "peak_rss_mb": s["peak_rss_mb"],
            "params_per_rank": s["params_per_rank"], "opt_bytes": s["optimizer_state_bytes_per_rank"],
            "a2a_bytes": s["a2a_bytes_per_step"], "final_loss": s["final_loss"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    p.add_argument("--log-every", type=int, default=5, help="trainer.log_every_n_steps: one tokens/s row per window")
    p.add_argument("--warmup", type=int, default=10, help="windows starting before this step are left out")
    p.add_argument("--only", help=f"comma-separated subset of: {','.join(LAYOUTS)}")
    p.add_argument("--timeout", type=int, default=900, help="seconds allowed per run")
    p.add_argument("--keep", action="store_true", help="keep the run directories (printed at the end)")
    args = p.parse_args()
    names = args.only.split(",") if args.only else list(LAYOUTS)
    unknown = [n for n in names if n not in LAYOUTS]
    if unknown:
        p.error(f"--only: unknown layout(s) {unknown}; choose from {', '.join(LAYOUTS)}")
    if args.steps < args.warmup + args.log_every:
        p.error(f"--steps={args.steps} leaves no window of {args.log_every} steps after --warmup={args.warmup}")

    cores = os.cpu_count() or 1
    load_before = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="bench_layouts-"))
    results = {}
    for name in names:
        results[name] = r = run_layout(name, args, tmp / name)
        done = f"{r['tokens_per_s']:.0f} tokens/s ({r['wall_s']:.0f} s run)" if "error" not in r else "FAILED"
        print(f"  {name:<14} {done}", flush=True)

    print(f"+recipe=moe_8x, {args.steps} steps, 1 thread per process; tokens/s = median of metrics.csv windows "
          f"of {args.log_every} steps starting at step >= {args.warmup}")
    head = f"{'layout':<15}{'procs':>5}{'tokens/s':>10}{'step ms':>9}{'vs single':>10}{'RSS MiB':>8}" \
           f"{'params/rank':>12}{'opt MiB/rank':>13}{'a2a MiB/step':>13}{'loss':>8}"
    print(head)
    base = results.get("single", {}).get("tokens_per_s")
    for name in names:
        procs, r = LAYOUTS[name][0], results[name]
        mark = "*" if procs > cores else " "
        if "error" in r:
            print(f"{name:<15}{procs:>4}{mark}  failed: {r['error']}")
            continue
        vs = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
        print(f"{name:<15}{procs:>4}{mark}{r['tokens_per_s']:>10.0f}{r['tokens_per_step'] / r['tokens_per_s'] * 1e3:>9.0f}"
              f"{vs:>10}{r['peak_rss_mb']:>8.0f}{r['params_per_rank']:>12,}{r['opt_bytes'] / 2**20:>13.2f}"
              f"{r['a2a_bytes'] / 2**20:>13.2f}{r['final_loss']:>8.4f}")
    ok = {n: r for n, r in results.items() if "error" not in r}
    for a, b, note in RATIOS:
        if a in ok and b in ok:
            print(f"{a + ' / ' + b + ':':<27}{ok[a]['tokens_per_s'] / ok[b]['tokens_per_s']:>7.3f}  ({note})")
    if "hybrid-4" in ok and "hybrid-4-zero" in ok:
        z, h = ok["hybrid-4-zero"], ok["hybrid-4"]
        print(f"{'hybrid-4-zero / hybrid-4:':<27}{z['tokens_per_s'] / h['tokens_per_s']:>7.3f}  (optimizer state per rank "
              f"{z['opt_bytes'] / h['opt_bytes']:.3f}x, peak RSS {z['peak_rss_mb'] / h['peak_rss_mb']:.3f}x)")
    print("RSS = peak resident memory of the largest rank; opt = optimizer state of the largest rank; "
          "a2a = dispatch + combine, forward and backward, all ranks; loss = final, same math everywhere")
    if any(LAYOUTS[n][0] > cores for n in names):
        print(f"* {max(LAYOUTS[n][0] for n in names)} processes on {cores} cores: oversubscribed; their tokens/s "
              f"measure contention, not the layout. Run on >= 4 free cores for those figures.")
    print(load_note(load_before))
    if args.keep:
        print(f"run directories: {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

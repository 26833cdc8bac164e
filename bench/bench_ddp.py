"""Data-parallel gradient sync: our `ddp` (MeshStrategy) vs Lightning's `DDPStrategy`, and weak scaling.

    python bench/bench_ddp.py [--steps 40] [--warmup 10] [--batch 16] [--rounds 3] [--variants ours,lightning] [--ab-parts]

Four variants, each in its own process tree (gloo, one thread per process, OMP_NUM_THREADS=1):
  single     1 process,   MeshStrategy single, global batch B   (weak-scaling baseline)
  single_x2  2 independent `single` runs at once, no communication: what the machine itself allows
             two processes (shared memory bandwidth and caches), the ceiling of weak scaling here
  ours       2 processes, MeshStrategy ddp,    global batch 2B  (our bucketed all-reduce)
  lightning  2 processes, Lightning DDPStrategy (torch DDP), global batch 2B
B = --batch sequences of 128 bytes per process in every variant. Same model (the dense default,
4 x 128), same initial weights, same data slices, same AdamW and schedule, no clipping (Lightning's
DDP knows nothing of sharded norms) and no validation, checkpoints or progress bar: the only
difference between `ours` and `lightning` is the strategy. Each run checks that it really ran
the intended world size, per-rank batch and gradient sync, and reports rank 0's last loss: `ours`
and `lightning` do the same math, so the two losses must agree (to float rounding).

Step time = the interval between successive `on_train_batch_end` calls on rank 0 (forward,
backward, gradient sync, optimizer step, next batch), median over the steps after --warmup. The
CPU column is rank 0's process CPU time over the same interval (every thread: compute, hooks,
gloo's): when a 2-process variant's CPU time moves with its step time, the machine computed more
slowly, nobody waited longer.
The variants run --rounds times in rotated order; the table shows the median over rounds.
Targets (DESIGN.md): ours / lightning step time <= 1.0; weak scaling t_single / t_ours >= 0.9.
The ceiling line, t_single_x2 / t_ours, is the share of the machine's own two-process speed that
the gradient sync keeps (1.0 = the sync costs nothing).
2 processes need 2 free cores: on a loaded machine both ratios mostly measure the load.

Separate runs drift: on this machine one 2-process variant's step time, and its CPU time with it,
moves by +-10% from run to run, more than the gap being measured. So the bench ends with an A/B of
the gradient sync alone (--ab-blocks, 0 = skip): one 2-process job holds two copies of the model,
one synced by our GradientSync (as MeshStrategy builds it) and one wrapped in torch's
DistributedDataParallel, and trains them in alternating blocks of steps on the same batches (a
plain loop: forward, backward, sync, AdamW), so both see the same machine at the same minutes. The
two copies must end with the same weights (to float rounding). With --ab-parts the A/B also
alternates two parts of a step: the step on a third copy that is never synced ("compute"), and our
buckets' all-reduces with no step at all ("allreduce"). Their sum is what a sync costs when overlap
hides nothing, as on 2 busy cores. It also times rank 0 stepping that unsynced copy while rank 1
idles ("alone"): the one-process step in the same minutes, so weak scaling (alone / ours) and its
ceiling (alone / compute) are measured side by side too, free of the drift between separate runs.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from benchlib import bench_env, chosen_variants, exit_worker, free_port, load_note

SEQ_LEN = 128
VARIANTS = [("single", 1), ("single_x2", 1), ("ours", 2), ("lightning", 2)]


def worker(args) -> None:
    """One training run under Lightning; rank 0 writes its measurements to args.out."""
    import lightning as L
    import torch
    from lightning.pytorch.strategies import DDPStrategy
    from omegaconf import OmegaConf

    from paratrain.strategies import MeshStrategy
    from paratrain.trainer.data import ByteDataModule, checked_token_files
    from paratrain.trainer.models.transformer import build_model
    from paratrain.trainer.module import LanguageModelTask
    from paratrain.trainer.schema import DataConfig, ModelConfig, OptimizerConfig

    torch.set_num_threads(1)
    data_cfg = OmegaConf.structured(DataConfig(batch_size=args.global_batch, seq_len=SEQ_LEN, val_batches=1))
    model_cfg = OmegaConf.structured(ModelConfig())
    opt_cfg = OmegaConf.structured(OptimizerConfig(betas=[0.9, 0.95], warmup_steps=5))
    if args.kind == "lightning":
        # Same weights as the meta-built model that MeshStrategy materialises: seeded by name.
        model = build_model(model_cfg, 0, device="cpu")
        strategy = DDPStrategy(process_group_backend="gloo")
    else:
        model = build_model(model_cfg, 0, device="meta")
        strategy = MeshStrategy(name="ddp" if args.devices > 1 else "single", mesh={"dp": -1, "ep": 1},
                                bucket_size_mb=args.bucket_mb)
    task = LanguageModelTask(model, opt_cfg, args.steps, tokens_per_step=args.global_batch * SEQ_LEN)
    task.seed = 0
    stamps, cpu, seen = [], [], {}

    class StepClock(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.setdefault("local_batch", list(batch[0].shape))
            seen.setdefault("wrapped", type(trainer.strategy.model).__name__)  # unwrapped again at teardown

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            stamps.append(time.perf_counter())
            cpu.append(time.process_time())  # every thread of this rank: compute, hooks, gloo's
            seen["last_loss"] = float(outputs["loss"])
            sync = getattr(trainer.strategy, "grad_sync", None)
            if sync is not None:
                seen["sync"] = f"ours: {sync.num_allreduce_calls} all-reduce/step, {sync.allreduce_bytes / 1e6:.2f} MB"

    trainer = L.Trainer(accelerator="cpu", devices=args.devices, strategy=strategy, max_steps=args.steps,
                        limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False, callbacks=[StepClock()])
    trainer.fit(task, datamodule=ByteDataModule(data_cfg, *checked_token_files(data_cfg, model_cfg.vocab_size), 0))
    if trainer.is_global_zero:
        steps, cpu_steps = ([b - a for a, b in zip(marks[args.warmup:], marks[args.warmup + 1:])]
                            for marks in (stamps, cpu))
        ddp = seen["wrapped"] == "DistributedDataParallel"
        sync = seen.get("sync") or ("Lightning: torch DistributedDataParallel" if ddp else "none")
        with open(args.out, "w") as f:
            json.dump({"median_step_s": statistics.median(steps), "median_cpu_s": statistics.median(cpu_steps),
                       "timed_steps": len(steps),
                       "world_size": trainer.world_size, "threads": torch.get_num_threads(),
                       "local_batch": seen["local_batch"], "sync": sync, "last_loss": seen["last_loss"]}, f)


def ab_worker(args) -> None:
    """One rank of the sync A/B (see the module doc); rank 0 writes the step times to args.out."""
    import copy

    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from omegaconf import OmegaConf
    from torch.nn.parallel import DistributedDataParallel

    from paratrain.strategies.grad_sync import EDGE_BUCKET_MB, GradientSync, reduction_groups_for
    from paratrain.strategies.mesh import ParallelDims, build_mesh
    from paratrain.trainer.models.transformer import build_model
    from paratrain.trainer.schema import ModelConfig

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=args.rank, world_size=2)
    mesh = build_mesh(ParallelDims(dp=2, ep=1, world_size=2), "cpu")
    base = build_model(OmegaConf.structured(ModelConfig()), 0, device="cpu")
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    sync = GradientSync(reduction_groups_for(ours.parameters(), [], mesh), args.bucket_mb,
                        first_bucket_mb=EDGE_BUCKET_MB, last_bucket_mb=EDGE_BUCKET_MB)
    models = {"ours": (ours, ours, sync), "ddp": (DistributedDataParallel(theirs), theirs, None)}
    kinds = list(models)
    if args.ab_parts:
        unsynced = copy.deepcopy(base)
        models["compute"] = (unsynced, unsynced, None)  # the same step without any all-reduce
        # "allreduce": our buckets' all-reduces alone (same sizes, same order), no compute at all.
        buffers = [torch.zeros_like(b.buffer) for b in sync.buckets]
        # "alone": rank 0 steps the unsynced copy while rank 1 waits at the next block's barrier:
        # the one-process step in the same minutes, the baseline of weak scaling.
        kinds = [*models, "allreduce", "alone"]
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-3) for k, (_, m, _) in models.items()}
    g = torch.Generator().manual_seed(args.rank)
    batches = [torch.randint(0, 256, (args.batch, SEQ_LEN + 1), generator=g) for _ in range(args.ab_steps)]
    times = {k: [] for k in kinds}
    for block in range(args.ab_blocks + 1):  # block 0 warms up
        for kind in kinds:
            dist.barrier()
            if kind == "alone" and args.rank != 0:
                continue
            for i, x in enumerate(batches):
                t0 = time.perf_counter()
                if kind == "allreduce":
                    for work in [dist.all_reduce(b, async_op=True) for b in buffers]:
                        work.wait()
                else:
                    copy = "compute" if kind == "alone" else kind
                    forward, model, grad_sync = models[copy]
                    F.cross_entropy(forward(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
                    if grad_sync is not None:
                        grad_sync.finish()
                    opts[copy].step()
                    opts[copy].zero_grad(set_to_none=True)
                if block > 0 and i > 0:  # the first step of a block runs on the other copy's caches
                    times[kind].append(time.perf_counter() - t0)
    gap = max((a - b).abs().max().item() for a, b in zip(ours.parameters(), theirs.parameters()))
    if args.rank == 0:
        with open(args.out, "w") as f:
            json.dump({"times": times, "weight_gap": gap, "bucket_mb": [b.nbytes / 2**20 for b in sync.buckets]}, f)
    exit_worker()


def run_ab(args, tmp: str) -> dict:
    out = os.path.join(tmp, "sync_ab.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "sync_ab", "--port", str(free_port()),
           "--bucket-mb", str(args.bucket_mb), "--batch", str(args.batch), "--ab-blocks", str(args.ab_blocks),
           "--ab-steps", str(args.ab_steps), "--out", out] + (["--ab-parts"] if args.ab_parts else [])
    start_and_wait([cmd + ["--rank", str(r)] for r in range(2)], [os.path.join(tmp, f"sync_ab-{r}.err") for r in range(2)],
                   [out, None], "sync A/B", args.timeout)  # rank 0 writes the result
    with open(out) as f:
        return json.load(f)


def print_ab(ab: dict, args) -> None:
    t = {k: statistics.median(v) for k, v in ab["times"].items()}
    per_block = args.ab_steps - 1
    blocks = [statistics.median(o) / statistics.median(d) for o, d in
              zip(*(zip(*[iter(ab["times"][k])] * per_block) for k in ("ours", "ddp")))]
    q1, _, q3 = statistics.quantiles(blocks, n=4)
    print(f"sync A/B, one 2-process job, {args.ab_blocks} alternating blocks of {per_block} timed steps each:")
    print(f"  ours {t['ours'] * 1e3:.1f} ms/step, torch DDP {t['ddp'] * 1e3:.1f} ms/step: ours / DDP "
          f"{t['ours'] / t['ddp']:.3f}  (per-block ratios, quartiles: {q1:.3f} .. {q3:.3f}); "
          f"weights agree to {ab['weight_gap']:.1e}")
    if "compute" in t:
        parts = t["compute"] + t["allreduce"]
        print(f"  where a step goes: compute alone (both ranks, no all-reduce) {t['compute'] * 1e3:.1f} ms, our "
              f"{len(ab['bucket_mb'])} buckets' all-reduces alone ({sum(ab['bucket_mb']):.2f} MiB) "
              f"{t['allreduce'] * 1e3:.1f} ms; sum {parts * 1e3:.1f} ms: ours / sum {t['ours'] / parts:.3f}, "
              f"DDP / sum {t['ddp'] / parts:.3f} (1.0 = the sync adds nothing to gloo's own all-reduce, and "
              f"overlapping it with backward hides nothing)")
        print(f"  weak scaling 1 -> 2 in the same minutes: rank 0 alone {t['alone'] * 1e3:.1f} ms/step; ours "
              f"{t['alone'] / t['ours']:.3f}, torch DDP {t['alone'] / t['ddp']:.3f}, ceiling (2 ranks, no sync) "
              f"{t['alone'] / t['compute']:.3f}")


def run(kind: str, devices: int, per_process_batch: int, args, tmp: str, round_: int) -> dict:
    copies = 2 if kind == "single_x2" else 1  # independent runs started together
    outs = [os.path.join(tmp, f"{kind}-{round_}-{c}.json") for c in range(copies)]
    cmds = [[sys.executable, os.path.abspath(__file__), "--worker", "single" if copies > 1 else kind,
             "--bucket-mb", str(args.bucket_mb),
             "--devices", str(devices), "--global-batch", str(devices * per_process_batch), "--steps", str(args.steps),
             "--warmup", str(args.warmup), "--out", out] for out in outs]
    start_and_wait(cmds, [out + ".err" for out in outs], outs, f"{kind} ({devices} processes)", args.timeout)
    results = [check_result(kind, devices, per_process_batch, out) for out in outs]
    return max(results, key=lambda r: r["median_step_s"])  # the slower copy bounds a synchronous pair


def start_and_wait(cmds: list, log_paths: list, outs: list, what: str, timeout: int) -> None:
    """Start the commands together and wait for all; exit with the log of the first that fails or
    does not write its result file (an `outs` entry of None: no result expected)."""
    logs = [open(path, "w+") for path in log_paths]  # files, not pipes: two writers never block on a full pipe
    procs = [subprocess.Popen(cmd, env=bench_env(), stdout=subprocess.DEVNULL, stderr=log) for cmd, log in zip(cmds, logs)]
    for proc, out, log in zip(procs, outs, logs):
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            sys.exit(f"{what} did not finish in {timeout} s")
        if proc.returncode != 0 or (out is not None and not os.path.exists(out)):
            log.seek(0)
            sys.exit(f"{what} failed with exit status {proc.returncode}:\n{log.read()[-3000:]}")


def check_result(kind: str, devices: int, per_process_batch: int, out: str) -> dict:
    with open(out) as f:
        result = json.load(f)
    # The point of the comparison: each variant ran what its name says.
    expected = {"world_size": devices, "local_batch": [per_process_batch, SEQ_LEN], "threads": 1}
    for key, value in expected.items():
        if result[key] != value:
            sys.exit(f"{kind}: {key}={result[key]}, expected {value}")
    if devices > 1 and result["sync"] == "none":
        sys.exit(f"{kind}: no gradient sync found on {devices} processes")
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    p.add_argument("--warmup", type=int, default=10, help="steps left out of the median")
    p.add_argument("--batch", type=int, default=16, help="sequences per process (all variants)")
    p.add_argument("--rounds", type=int, default=3, help="runs of every variant, in rotated order")
    p.add_argument("--variants", default=",".join(k for k, _ in VARIANTS),
                   help="comma-separated subset of " + ", ".join(k for k, _ in VARIANTS))
    p.add_argument("--bucket-mb", type=float, default=25.0, help="ours: strategy.bucket_size_mb")
    p.add_argument("--ab-blocks", type=int, default=20, help="blocks per copy in the sync A/B (0 = no A/B)")
    p.add_argument("--ab-steps", type=int, default=5, help="steps per block in the sync A/B (the first is not timed)")
    p.add_argument("--ab-parts", action="store_true",
                   help="A/B: also time the step without the all-reduce, the all-reduces without the step, and "
                        "rank 0's step alone (weak scaling in the same job)")
    p.add_argument("--timeout", type=int, default=600, help="seconds allowed per run")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--devices", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--global-batch", type=int, default=32, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.kind = args.worker
        return ab_worker(args) if args.worker == "sync_ab" else worker(args)
    if args.steps < args.warmup + 3:
        p.error(f"--steps={args.steps} leaves fewer than 2 timed steps after --warmup={args.warmup}")
    if args.ab_blocks and (args.ab_blocks < 4 or args.ab_steps < 2):
        p.error("--ab-blocks needs at least 4 blocks of --ab-steps >= 2 (or 0 for no A/B)")

    chosen = chosen_variants(p, args.variants, [k for k, _ in VARIANTS])
    variants = [(k, d) for k, d in VARIANTS if k in chosen]
    load_before = os.getloadavg()[0]  # other people's work: ours has not started yet
    results = {kind: [] for kind, _ in variants}
    with tempfile.TemporaryDirectory(prefix="bench_ddp-") as tmp:
        for r in range(args.rounds):
            order = variants[r % len(variants):] + variants[: r % len(variants)]
            for kind, devices in order:
                t0 = time.perf_counter()
                results[kind].append(run(kind, devices, args.batch, args, tmp, r))
                print(f"  round {r + 1}/{args.rounds} {kind:<10} {results[kind][-1]['median_step_s'] * 1e3:7.1f} "
                      f"ms/step, CPU {results[kind][-1]['median_cpu_s'] * 1e3:6.1f} ms "
                      f"({time.perf_counter() - t0:.0f} s run)", flush=True)
        ab = run_ab(args, tmp) if args.ab_blocks else None

    t = {kind: statistics.median(x["median_step_s"] for x in rs) for kind, rs in results.items()}
    cpu = {kind: statistics.median(x["median_cpu_s"] for x in rs) for kind, rs in results.items()}
    tok = SEQ_LEN * args.batch
    print(f"dense 4x128, {args.batch} x {SEQ_LEN} tokens per process, 1 thread per process, gloo; "
          f"median step after {args.warmup} warm-up steps, median of {args.rounds} round(s)")
    print(f"{'variant':<11}{'procs':>6}{'step ms':>9}{'tokens/s':>10}{'CPU ms':>8}{'last loss':>11}  gradient sync")
    for kind, devices in variants:
        last = results[kind][-1]
        devices *= 2 if kind == "single_x2" else 1
        print(f"{kind:<11}{devices:>6}{t[kind] * 1e3:>9.1f}{devices * tok / t[kind]:>10.0f}{cpu[kind] * 1e3:>8.1f}"
              f"{last['last_loss']:>11.5f}  {last['sync']}")
    if {"ours", "lightning"} <= t.keys():
        loss_gap = abs(results["ours"][-1]["last_loss"] - results["lightning"][-1]["last_loss"])
        print(f"ours vs lightning last loss |diff|: {loss_gap:.2e}  (same math: expect ~1e-5 or less)")
        per_round = ", ".join(f"{a['median_step_s'] / b['median_step_s']:.3f}"
                              for a, b in zip(results["ours"], results["lightning"]))
        print(f"ours / lightning step time:        {t['ours'] / t['lightning']:.3f}  (target <= 1.0; per round: {per_round})")
    for kind in ("ours", "lightning"):
        if {"single", kind} <= t.keys():
            print(f"weak scaling 1 -> 2, {kind + ':':<14}{t['single'] / t[kind]:.3f}" + ("  (target >= 0.9)" if kind == "ours" else ""))
    if {"single", "single_x2"} <= t.keys():
        print(f"weak scaling ceiling (single_x2):  {t['single'] / t['single_x2']:.3f}  (two runs at once, no sync)")
    if {"single_x2", "ours", "lightning"} <= t.keys():
        print(f"ours / ceiling:                    {t['single_x2'] / t['ours']:.3f}  "
              f"(lightning: {t['single_x2'] / t['lightning']:.3f}; 1.0 = the sync costs nothing)")
    if ab is not None:
        print_ab(ab, args)
    print(load_note(load_before, "the 2-process figures mostly measure the load"))


if __name__ == "__main__":
    main()

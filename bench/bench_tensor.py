"""Tensor parallelism: step time, per-rank memory and communication bytes, ours vs Lightning's ModelParallelStrategy.

    python bench/bench_tensor.py [--steps 20] [--warmup 5] [--batch 8] [--rounds 1] [--quick]

Variants, each in its own process tree (gloo, one thread per process, OMP_NUM_THREADS=1), all on the
same global batch (--batch sequences of 128 bytes), same weights (seeded by name), AdamW, no clipping,
no validation, no checkpoints:
  dense-tp1            1 process,  MeshStrategy single
  dense-tp2            2 processes, MeshStrategy tensor (tp=2, sequence parallel)
  dense-tp2-lightning  2 processes, Lightning ModelParallelStrategy(tensor_parallel_size=2) with the same
                       plan (strategies/tensor_parallel.apply_tensor_parallel in configure_model, loss_parallel)
  dense-dp2xtp2        4 processes, MeshStrategy tensor dp=2 x tp=2, ZeRO-3 (FSDP2 over dp)
  dense-dp2xtp2-lightning  4 processes, ModelParallelStrategy(2, 2): the same plan + fully_shard over dp
  moe-tp1, moe-tp2     moe_8x on 1 and 2 processes (ours only: Lightning has no MoE layout to compare)
  moe-dp2xtp2          moe_8x on 4 processes, dp=2 x tp=2, ZeRO-3 (router over every rank, experts over dp x tp)
(--quick: only dense-tp1, dense-tp2, dense-tp2-lightning.)

Step time: interval between successive on_train_batch_end calls on rank 0, median after --warmup.
Memory: rank 0's parameter bytes (the local pieces of DTensors) and peak RSS.
Communication: on rank 0, every functional collective DTensor issues in one training step (forward
and backward; our gradient all-reduce is counted separately by GradientSync), as the bytes a ring
algorithm sends from one rank: all-gather (tp-1) x input, reduce-scatter and all-reduce (tp-1)/tp and
2(tp-1)/tp x input. The analytic count for the plan: per block 4 all-gathers of A/tp and 4
reduce-scatters of A with sequence parallel (A = local tokens x d_model x 4 bytes), i.e.
8 (tp-1)/tp A per block, plus the embedding and the head (4 (tp-1)/tp A). loss_parallel's per-token
all-reduces (3 of B x T x 4 bytes) go through plain c10d, not functional collectives: not counted.
Measured once (loaded 2-core machine, --quick --steps 6): dense tp=2 9.437 MB/step = analytic 9.437 MB;
18 all-gathers + 18 reduce-scatters per step; ours and Lightning's identical collectives and losses.
Target (DESIGN.md): ours / lightning step time <= 1.0.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from torch.utils._python_dispatch import TorchDispatchMode

from benchlib import bench_env, load_note

SEQ_LEN = 128
VARIANTS = {  # name: (devices, recipe, kind, dp, tp)
    "dense-tp1": (1, None, "ours", 1, 1),
    "dense-tp2": (2, None, "ours", 1, 2),
    "dense-tp2-lightning": (2, None, "lightning", 1, 2),
    "dense-dp2xtp2": (4, None, "ours", 2, 2),
    "dense-dp2xtp2-lightning": (4, None, "lightning", 2, 2),
    "moe-tp1": (1, "moe_8x", "ours", 1, 1),
    "moe-tp2": (2, "moe_8x", "ours", 1, 2),
    "moe-dp2xtp2": (4, "moe_8x", "ours", 2, 2),
}
QUICK = ["dense-tp1", "dense-tp2", "dense-tp2-lightning"]


class CommCounter(TorchDispatchMode):
    """Adds up the functional collectives (DTensor's) issued inside it, as the bytes a ring sends from this rank."""

    RING = {"all_gather_into_tensor": ("all_gather", lambda n, tp: (tp - 1) * n),
            "reduce_scatter_tensor": ("reduce_scatter", lambda n, tp: (tp - 1) * n // tp),
            "all_reduce": ("all_reduce", lambda n, tp: 2 * (tp - 1) * n // tp)}

    def __init__(self, tp: int):
        super().__init__()
        self.tp = tp
        self.bytes = {kind: 0 for kind, _ in self.RING.values()}
        self.calls = dict.fromkeys(self.bytes, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        op = str(func)  # e.g. "_c10d_functional.all_gather_into_tensor.default"
        if op.startswith("_c10d_functional."):
            entry = self.RING.get(op.split(".")[1])
            if entry is not None:
                kind, ring = entry
                self.bytes[kind] += ring(args[0].numel() * args[0].element_size(), self.tp)
                self.calls[kind] += 1
        return func(*args, **(kwargs or {}))


def worker(args) -> None:
    import lightning as L
    import torch
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.experimental import implicit_replication
    from torch.distributed.tensor.parallel import loss_parallel

    from benchlib import compose
    from paratrain.strategies import MeshStrategy
    from paratrain.strategies.tensor_parallel import apply_tensor_parallel, parallel_cross_entropy
    from paratrain.trainer.callbacks import peak_rss_mb
    from paratrain.trainer.data import ByteDataModule, checked_token_files
    from paratrain.trainer.models.transformer import build_model, materialize
    from paratrain.trainer.module import LanguageModelTask

    torch.set_num_threads(1)
    devices, recipe, kind, dp, tp = VARIANTS[args.variant]
    cfg = compose([*([f"+recipe={recipe}"] if recipe else []), f"data.batch_size={args.batch}",
                   f"data.seq_len={SEQ_LEN}", "optimizer.betas=[0.9,0.95]", "optimizer.warmup_steps=5"])
    model = build_model(cfg.model, 0, device="meta")

    class LightningTP(LanguageModelTask):
        """The same plan applied the way Lightning's ModelParallelStrategy asks: in configure_model."""

        def configure_model(self):
            if getattr(self, "_laid_out", False):
                return
            self._laid_out = True
            apply_tensor_parallel(self.model, self.device_mesh["tensor_parallel"], sequence_parallel=True)
            with implicit_replication():
                materialize(self.model, 0, self.device)
            if dp > 1:
                from torch.distributed.fsdp import fully_shard
                for block in self.model.layers:
                    fully_shard(block, mesh=self.device_mesh["data_parallel"])
                fully_shard(self.model, mesh=self.device_mesh["data_parallel"])
            self.cross_entropy = parallel_cross_entropy

        def backward(self, loss, *a, **k):
            with loss_parallel():
                loss.backward()

    if kind == "lightning":
        task = LightningTP(model, cfg.optimizer, args.steps, tokens_per_step=args.batch * SEQ_LEN)
        strategy = ModelParallelStrategy(data_parallel_size=dp, tensor_parallel_size=tp)
    else:
        task = LanguageModelTask(model, cfg.optimizer, args.steps, tokens_per_step=args.batch * SEQ_LEN)
        name = "single" if devices == 1 else "tensor"
        strategy = MeshStrategy(name=name, mesh={"dp": dp, "ep": 1, "tp": tp}, zero_stage=3 if dp > 1 else 0)
    task.seed = 0
    stamps, seen = [], {}
    counter = {}

    class StepClock(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.setdefault("local_batch", list(batch[0].shape))
            if batch_idx == args.warmup and tp > 1:
                counter["mode"] = CommCounter(tp).__enter__()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            stamps.append(time.perf_counter())
            if "mode" in counter and "bytes" not in counter:
                mode = counter["mode"]
                mode.__exit__(None, None, None)
                counter["bytes"], counter["calls"] = dict(mode.bytes), dict(mode.calls)
            seen["last_loss"] = float(outputs["loss"])
            sync = getattr(trainer.strategy, "grad_sync", None)
            if sync is not None:
                seen["sync_bytes"] = sync.allreduce_bytes

    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=args.steps,
                        limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False, callbacks=[StepClock()])
    trainer.fit(task, datamodule=ByteDataModule(cfg.data, *checked_token_files(cfg.data, cfg.model.vocab_size), 0))
    held = sum((p.to_local() if isinstance(p, DTensor) else p).numel() * p.element_size() for p in task.model.parameters())
    if trainer.is_global_zero:
        steps = [b - a for a, b in zip(stamps[args.warmup:], stamps[args.warmup + 1:])]
        d = cfg.model.d_model
        local_tokens = args.batch // dp * SEQ_LEN
        a_bytes = local_tokens * d * 4
        ring = (tp - 1) / tp if tp > 1 else 0
        analytic_blocks = cfg.model.n_layers * 8 * ring * a_bytes
        analytic = analytic_blocks + 4 * ring * a_bytes  # loss_parallel's small all-reduces: not functional, not counted
        with open(args.out, "w") as f:
            json.dump({"median_step_s": statistics.median(steps), "world_size": trainer.world_size,
                       "local_batch": seen["local_batch"], "last_loss": seen["last_loss"],
                       "param_bytes_rank0": held, "peak_rss_mb": peak_rss_mb(),
                       "comm_bytes": counter.get("bytes"), "comm_calls": counter.get("calls"),
                       "analytic_bytes": analytic, "sync_bytes": seen.get("sync_bytes", 0)}, f)


def run(variant: str, args, tmp: str, round_: int) -> dict:
    out = os.path.join(tmp, f"{variant}-{round_}.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", variant, "--batch", str(args.batch),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--out", out]
    try:
        proc = subprocess.run(cmd, env=bench_env(), capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        sys.exit(f"{variant} did not finish in {args.timeout} s")
    if proc.returncode != 0 or not os.path.exists(out):
        sys.exit(f"{variant} failed with exit status {proc.returncode}:\n{proc.stderr[-3000:]}")
    with open(out) as f:
        result = json.load(f)
    devices, _, _, dp, _ = VARIANTS[variant]
    if result["world_size"] != devices or result["local_batch"] != [args.batch // dp, SEQ_LEN]:
        sys.exit(f"{variant}: ran {result['world_size']} processes with local batch {result['local_batch']}")
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch", type=int, default=8, help="global batch (sequences of 128 bytes)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="dense tp1 / tp2 / Lightning tp2 only")
    p.add_argument("--timeout", type=int, default=900)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.variant = args.worker
        return worker(args)
    names = QUICK if args.quick else list(VARIANTS)
    load_before = os.getloadavg()[0]
    results = {n: [] for n in names}
    with tempfile.TemporaryDirectory(prefix="bench_tensor-") as tmp:
        for r in range(args.rounds):
            for n in names[r % len(names):] + names[: r % len(names)]:
                t0 = time.perf_counter()
                results[n].append(run(n, args, tmp, r))
                print(f"  round {r + 1}/{args.rounds} {n:<24} {results[n][-1]['median_step_s'] * 1e3:8.1f} ms/step "
                      f"({time.perf_counter() - t0:.0f} s run)", flush=True)
    t = {n: statistics.median(x["median_step_s"] for x in rs) for n, rs in results.items()}
    print(f"global batch {args.batch} x {SEQ_LEN} tokens, 1 thread per process, gloo; median step after "
          f"{args.warmup} warm-up steps, median of {args.rounds} round(s)")
    print(f"{'variant':<25}{'procs':>6}{'step ms':>9}{'param MiB r0':>13}{'RSS MB':>8}{'last loss':>11}"
          f"{'comm MB/step':>14}{'analytic MB':>13}  collectives (rank 0, one step)")
    for n in names:
        last = results[n][-1]
        comm = sum(last["comm_bytes"].values()) / 1e6 if last["comm_bytes"] else 0.0
        calls = ", ".join(f"{k} {v}" for k, v in (last["comm_calls"] or {}).items())
        print(f"{n:<25}{VARIANTS[n][0]:>6}{t[n] * 1e3:>9.1f}{last['param_bytes_rank0'] / 2**20:>13.2f}"
              f"{last['peak_rss_mb']:>8.0f}{last['last_loss']:>11.5f}{comm:>14.3f}{last['analytic_bytes'] / 1e6:>13.3f}  {calls}")
    for ours, theirs in (("dense-tp2", "dense-tp2-lightning"), ("dense-dp2xtp2", "dense-dp2xtp2-lightning")):
        if ours in t and theirs in t:
            gap = abs(results[ours][-1]["last_loss"] - results[theirs][-1]["last_loss"])
            print(f"{ours} / {theirs} step time: {t[ours] / t[theirs]:.3f} (target <= 1.0); last loss |diff| {gap:.1e}")
    if "dense-tp1" in t and "dense-tp2" in t:
        r1, r2 = results["dense-tp1"][-1], results["dense-tp2"][-1]
        print(f"parameter bytes on rank 0, tp=2 / tp=1: {r2['param_bytes_rank0'] / r1['param_bytes_rank0']:.3f} (norms stay whole)")
    print(load_note(load_before, "step times mostly measure the load"))


if __name__ == "__main__":
    main()

"""ZeRO stages side by side: our ddp, ZeRO-1, ZeRO-2, ZeRO-3 vs Lightning's ModelParallelStrategy (FSDP2).

    python bench/bench_zero.py [--steps 30] [--warmup 10] [--batch 8] [--rounds 2] [--models dense,moe_8x]

Every variant trains the same model (the dense default 4 x 128, or moe_8x: 8 experts, top-2,
expert width 256) on 2 processes (gloo, one thread each, OMP_NUM_THREADS=1), on the same global
batch (--batch sequences of 128 bytes per process), with the same weights, data slices, AdamW and
schedule; no clipping (Lightning's strategy has no sharded norm of ours), no validation, no checkpoints:

  ddp        MeshStrategy, strategy.zero_stage=0 (our bucketed all-reduce)
  zero1      MeshStrategy, strategy.zero_stage=1 (+ optimizer state split by whole parameters)
  zero2      MeshStrategy, strategy.zero_stage=2 (FSDP2, reshard_after_forward=False)
  zero3      MeshStrategy, strategy.zero_stage=3 (FSDP2, reshard_after_forward=True)
  lightning  Lightning ModelParallelStrategy(data_parallel_size=2), configure_model = fully_shard per
             block and the root (reshard_after_forward=True): Lightning's own FSDP2 path, the peer of zero3

Step time = interval between successive `on_train_batch_end` on rank 0, median after --warmup; the
table shows the median over --rounds (variants run in rotated order). Memory per rank (max over the
2 ranks): bytes of parameters, gradients (after the sync of the first step) and optimizer state,
measured from the storages each rank holds (strategies/zero.py:rank_memory), and peak RSS.
Targets (issue 12): zero3 / lightning step time <= 1.0; zero3 memory <= lightning's.
On a loaded machine the step times mostly measure the neighbours (the last line says the load).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from benchlib import bench_env, chosen_variants, exit_worker, load_note

SEQ_LEN = 128
VARIANTS = {"ddp": 0, "zero1": 1, "zero2": 2, "zero3": 3, "lightning": None}
MB = 2**20


def model_config(name: str):
    from omegaconf import OmegaConf

    from paratrain.trainer.schema import ModelConfig, MoEConfig

    moe = MoEConfig(num_experts=8, top_k=2, expert_ffn_dim=256) if name == "moe_8x" else None
    return OmegaConf.structured(ModelConfig(moe=moe))


def worker(args) -> None:
    import lightning as L
    import torch
    from lightning.pytorch.strategies import ModelParallelStrategy
    from omegaconf import OmegaConf
    from torch.distributed.fsdp import fully_shard

    from paratrain.strategies import MeshStrategy
    from paratrain.strategies.zero import grad_bytes, rank_memory
    from paratrain.trainer.callbacks import peak_rss_mb
    from paratrain.trainer.data import ByteDataModule, checked_token_files
    from paratrain.trainer.models.transformer import build_model
    from paratrain.trainer.module import LanguageModelTask
    from paratrain.trainer.schema import DataConfig, OptimizerConfig

    class LightningFSDP2Task(LanguageModelTask):
        def configure_model(self):
            mesh = self.device_mesh["data_parallel"]
            for block in self.model.layers:
                fully_shard(block, mesh=mesh, reshard_after_forward=True)
            fully_shard(self.model, mesh=mesh, reshard_after_forward=True)

    torch.set_num_threads(1)
    data_cfg = OmegaConf.structured(DataConfig(batch_size=args.global_batch, seq_len=SEQ_LEN, val_batches=1))
    model_cfg = model_config(args.model)
    opt_cfg = OmegaConf.structured(OptimizerConfig(betas=[0.9, 0.95], warmup_steps=5))
    tokens = args.global_batch * SEQ_LEN
    if args.kind == "lightning":
        # Same weights as the meta-built model MeshStrategy materialises: seeded by name.
        task = LightningFSDP2Task(build_model(model_cfg, 0, device="cpu"), opt_cfg, args.steps, tokens)
        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, process_group_backend="gloo")
    else:
        task = LanguageModelTask(build_model(model_cfg, 0, device="meta"), opt_cfg, args.steps, tokens)
        strategy = MeshStrategy(name="ddp", mesh={"dp": -1, "ep": 1}, zero_stage=VARIANTS[args.kind])
    task.seed = 0
    stamps, seen = [], {}

    class Measure(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.setdefault("local_batch", list(batch[0].shape))

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            seen.setdefault("grad_bytes", grad_bytes(pl_module.model))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            stamps.append(time.perf_counter())
            seen["last_loss"] = float(outputs["loss"])

        def on_train_end(self, trainer, pl_module):
            held = rank_memory(pl_module.model, trainer.optimizers, seen["grad_bytes"])
            local = torch.tensor([*held.values(), peak_rss_mb()], dtype=torch.float64)
            seen["memory"] = dict(zip([*held, "peak_rss_mb"], trainer.strategy.reduce(local, reduce_op="max").tolist()))

    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=args.steps, limit_val_batches=0,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, callbacks=[Measure()])
    trainer.fit(task, datamodule=ByteDataModule(data_cfg, *checked_token_files(data_cfg, model_cfg.vocab_size), 0))
    if trainer.is_global_zero:
        steps = [b - a for a, b in zip(stamps[args.warmup:], stamps[args.warmup + 1:])]
        with open(args.out, "w") as f:
            json.dump({"median_step_s": statistics.median(steps), "world_size": trainer.world_size,
                       "local_batch": seen["local_batch"], "last_loss": seen["last_loss"], **seen["memory"]}, f)
    exit_worker()


def run(kind: str, model: str, args, tmp: str, round_: int) -> dict:
    out = os.path.join(tmp, f"{model}-{kind}-{round_}.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--model", model, "--global-batch",
           str(2 * args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup), "--out", out]
    try:
        proc = subprocess.run(cmd, env=bench_env(), capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        sys.exit(f"{model} {kind} did not finish in {args.timeout} s")
    if proc.returncode != 0 or not os.path.exists(out):
        sys.exit(f"{model} {kind} failed with exit status {proc.returncode}:\n{proc.stderr[-3000:]}")
    with open(out) as f:
        result = json.load(f)
    if result["world_size"] != 2 or result["local_batch"] != [args.batch, SEQ_LEN]:
        sys.exit(f"{model} {kind}: ran {result['world_size']} processes, local batch {result['local_batch']}")
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    p.add_argument("--warmup", type=int, default=10, help="steps left out of the median")
    p.add_argument("--batch", type=int, default=8, help="sequences per process")
    p.add_argument("--rounds", type=int, default=2, help="runs of every variant, in rotated order")
    p.add_argument("--models", default="dense,moe_8x", help="comma-separated: dense, moe_8x")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))
    p.add_argument("--timeout", type=int, default=900, help="seconds allowed per run")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--model", default="dense", help=argparse.SUPPRESS)
    p.add_argument("--global-batch", type=int, default=16, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.kind = args.worker
        return worker(args)
    if args.steps < args.warmup + 3:
        p.error(f"--steps={args.steps} leaves fewer than 2 timed steps after --warmup={args.warmup}")

    load_before = os.getloadavg()[0]
    kinds = chosen_variants(p, args.variants, list(VARIANTS))
    for model in args.models.split(","):
        results = {k: [] for k in kinds}
        with tempfile.TemporaryDirectory(prefix="bench_zero-") as tmp:
            for r in range(args.rounds):
                for kind in kinds[r % len(kinds):] + kinds[: r % len(kinds)]:
                    t0 = time.perf_counter()
                    results[kind].append(run(kind, model, args, tmp, r))
                    print(f"  {model} round {r + 1}/{args.rounds} {kind:<10} "
                          f"{results[kind][-1]['median_step_s'] * 1e3:7.1f} ms/step ({time.perf_counter() - t0:.0f} s run)",
                          flush=True)
        t = {k: statistics.median(x["median_step_s"] for x in rs) for k, rs in results.items()}
        print(f"\n{model}: 2 processes, {args.batch} x {SEQ_LEN} tokens per process, gloo, 1 thread each; median step "
              f"after {args.warmup} warm-up steps, median of {args.rounds} round(s); memory per rank, max over ranks")
        print(f"{'variant':<11}{'step ms':>9}{'/ ddp':>7}{'params MB':>11}{'grads MB':>10}{'optim MB':>10}"
              f"{'total MB':>10}{'peak RSS':>10}{'last loss':>11}")
        total = {}
        for kind in kinds:
            last = results[kind][-1]
            total[kind] = (last["param_bytes"] + last["grad_bytes"] + last["optimizer_state_bytes"]) / MB
            print(f"{kind:<11}{t[kind] * 1e3:>9.1f}{t[kind] / t.get('ddp', float('nan')):>7.2f}{last['param_bytes'] / MB:>11.2f}"
                  f"{last['grad_bytes'] / MB:>10.2f}{last['optimizer_state_bytes'] / MB:>10.2f}{total[kind]:>10.2f}"
                  f"{last['peak_rss_mb']:>10.0f}{last['last_loss']:>11.5f}")
        if {"zero3", "lightning"} <= set(kinds):
            gap = abs(results["zero3"][-1]["last_loss"] - results["lightning"][-1]["last_loss"])
            pairs = [a["median_step_s"] / b["median_step_s"] for a, b in zip(results["zero3"], results["lightning"])]
            print(f"zero3 vs lightning last loss |diff|: {gap:.2e}  (same math: expect ~1e-5 or less)")
            print(f"zero3 / lightning step time:        {t['zero3'] / t['lightning']:.3f}  (target <= 1.0; per round: "
                  f"{', '.join(f'{x:.3f}' for x in pairs)})")
            print(f"zero3 / lightning memory per rank:  {total['zero3'] / total['lightning']:.3f}  (target <= 1.0)")
        if {"zero3", "ddp"} <= set(kinds):
            print(f"zero3 / ddp memory per rank:        {total['zero3'] / total['ddp']:.3f}  (ideal 0.5 at 2 ranks)")
    print(load_note(load_before, "the step times mostly measure the load"))


if __name__ == "__main__":
    main()

"""Share of an expert-parallel training step spent in all-to-all (issue 4), measured with torch.profiler.

    python bench/bench_a2a.py [--world 2] [--steps 8] [--profile-steps 5] [--trace DIR] [OVERRIDE ...]

Spawns --world gloo processes on localhost (one thread each) and runs the `expert` layout by hand,
as MeshStrategy does but without Lightning: `apply_layout` (experts sharded over ep = world, the
all-to-all dispatcher installed) + `GradientSync`, then per step: forward on this rank's slice of
the global batch (TrainBatches), cross-entropy + aux loss, backward, gradient sync, clipping at
trainer.gradient_clip_val (global norm over ep), AdamW. Shapes come from the composed config
`+recipe=moe_8x` (d=128, 4 layers, 8 experts, top-2, expert_ffn_dim=256, batch 32 x 128 global);
OVERRIDEs change it, e.g. model.moe.num_experts=16.

After --steps unprofiled steps (timed: the median is the plain step time), --profile-steps more run
under torch.profiler (CPU activities). All-to-all time = the summed wall time, on the training
thread, of the outermost events of:
  counts   the per-destination count exchange (dist.all_to_all_single, synchronous; wrapped here
           in a record_function, since its wait is not an op the profiler records)
  fwd      the functional all_to_all_single of dispatch and combine (launch) and their
           _c10d_functional::wait_tensor (where the training thread blocks for the data)
  bwd      autograd's evaluate_function of the all-to-all backward (launch + wait of the reverse
           all-to-all)
`gloo:all_to_all` events (the transfers as gloo's worker thread records them) are left out of the
sum and shown apart. The blocked time includes waiting for the slower rank: on a loaded machine
skew between ranks shows up here. Share = all-to-all time / step time of the profiled steps.
Per-rank rows, then the mean over ranks.
"""

import argparse
import json
import os
import re
import statistics
import tempfile
import time
from pathlib import Path

from benchlib import compose, free_port, load_note

A2A = re.compile(r"all_to_all|alltoall|wait_tensor|^bench::a2a")


def time_the_count_exchange() -> None:
    """Wrap the dispatcher's synchronous count exchange in a record_function (bench only)."""
    import torch.distributed as dist
    from torch.profiler import record_function

    import paratrain.strategies.token_dispatch as token_dispatch

    class TimedDist:
        def __getattr__(self, name):
            return getattr(dist, name)

        @staticmethod
        def all_to_all_single(*args, **kwargs):
            with record_function("bench::a2a_counts"):
                return dist.all_to_all_single(*args, **kwargs)

    token_dispatch.dist = TimedDist()


def classify(events, main_thread) -> dict:
    """Seconds per category over the outermost matching events on the training thread."""
    out = {"counts": 0.0, "fwd": 0.0, "bwd": 0.0, "gloo": 0.0, "n": 0}
    for e in events:
        if e.name.startswith("gloo:all_to_all"):
            out["gloo"] += e.cpu_time_total / 1e6
            continue
        if e.thread != main_thread or not A2A.search(e.name) or e.name.startswith("gloo:"):
            continue
        parent, nested = e.cpu_parent, False
        while parent is not None:
            if A2A.search(parent.name):
                nested = True
                break
            parent = parent.cpu_parent
        if nested:
            continue
        kind = "counts" if e.name.startswith("bench::a2a_counts") else \
            "bwd" if e.name.startswith("autograd::engine::evaluate_function") else "fwd"
        out[kind] += e.cpu_time_total / 1e6
        out["n"] += 1
    return out


def body(rank, world, port, args, out_dir) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile, record_function

    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        from paratrain.strategies.grad_sync import GradientSync
        from paratrain.strategies.grad_norm import clip_grad_norm_
        from paratrain.strategies.layout import apply_layout
        from paratrain.strategies.mesh import ParallelDims, build_mesh
        from paratrain.trainer.data import TrainBatches, token_files
        from paratrain.trainer.models.transformer import build_model

        cfg = compose(["+recipe=moe_8x", *args.overrides])
        time_the_count_exchange()
        m, d, o, t = cfg.model, cfg.data, cfg.optimizer, cfg.trainer
        dims = ParallelDims(dp=1, ep=world, world_size=world)
        mesh = build_mesh(dims, "cpu")
        model = build_model(m, cfg.seed, device="meta")
        sync = GradientSync(apply_layout(model, dims, mesh, cfg.seed, torch.device("cpu")), cfg.strategy.bucket_size_mb)
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": o.weight_decay},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
        opt = torch.optim.AdamW(groups, lr=o.lr, **({"betas": tuple(o.betas)} if o.betas else {}))
        train_path, _ = token_files(d)
        batches = iter(TrainBatches(train_path, d.seq_len, d.batch_size, cfg.seed, rank, world))
        layers = list(model.moe_layers())

        def step():
            x, y = next(batches)  # (B / world, T) each
            with record_function("bench::step"):
                ce = F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten())
                (ce + model.aux_loss()).backward()
                sync.finish()
                if t.gradient_clip_val:
                    clip_grad_norm_(model, t.gradient_clip_val, mesh)
                opt.step()
                opt.zero_grad(set_to_none=True)

        for _ in range(args.warmup):
            step()
        dist.barrier()
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        dist.barrier()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for _ in range(args.profile_steps):
                step()
            profiled = (time.perf_counter() - t0) / args.profile_steps
        a2a_bytes = sum(layer.dispatcher.last_a2a_bytes for layer in layers)
        events = prof.events()
        steps = [e for e in events if e.name == "bench::step"]
        main_thread = steps[0].thread
        parts = classify(events, main_thread)
        if args.trace:
            prof.export_chrome_trace(str(Path(args.trace) / f"a2a-rank{rank}.json"))
        result = {"rank": rank, "step_s": statistics.median(times), "profiled_step_s": profiled,
                  **{k: v / args.profile_steps for k, v in parts.items()}, "a2a_bytes": a2a_bytes,
                  "experts_per_rank": layers[0].experts.num_local_experts, "local_batch": d.batch_size // world,
                  "shape": f"d={m.d_model}, {m.n_layers} layers, {m.moe.num_experts} experts, top-{m.moe.top_k}, "
                           f"expert_ffn_dim={m.moe.expert_ffn_dim}, batch {d.batch_size} x {d.seq_len} global"}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("overrides", nargs="*", help="Hydra overrides on top of +recipe=moe_8x")
    p.add_argument("--world", type=int, default=2, help="processes = expert-parallel degree")
    p.add_argument("--warmup", type=int, default=3, help="steps before anything is timed")
    p.add_argument("--steps", type=int, default=8, help="timed steps without the profiler")
    p.add_argument("--profile-steps", type=int, default=5, help="steps under the profiler")
    p.add_argument("--trace", help="directory for Chrome traces (one per rank)")
    args = p.parse_args()
    if args.trace:
        Path(args.trace).mkdir(parents=True, exist_ok=True)
    import torch.multiprocessing as mp

    os.environ["OMP_NUM_THREADS"] = "1"  # before the children import torch
    load_before = os.getloadavg()[0]
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="bench_a2a-") as out_dir:
        mp.spawn(body, args=(args.world, port, args, out_dir), nprocs=args.world, join=True)
        ranks = [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(args.world)]

    print(f"expert layout, ep={args.world}, {ranks[0]['experts_per_rank']} experts per rank, "
          f"{ranks[0]['local_batch']} sequences per rank, 1 thread per process, gloo")
    print(f"{ranks[0]['shape']}; {args.steps} plain + {args.profile_steps} profiled steps after {args.warmup} warm-up")
    print(f"{'rank':<6}{'step ms':>9}{'prof. step':>11}{'counts':>8}{'fwd a2a':>9}{'bwd a2a':>9}{'a2a ms':>8}"
          f"{'share':>8}{'gloo ms':>9}")
    rows = []
    for r in ranks:
        a2a = r["counts"] + r["fwd"] + r["bwd"]
        rows.append((r["step_s"], r["profiled_step_s"], r["counts"], r["fwd"], r["bwd"], a2a, a2a / r["profiled_step_s"], r["gloo"]))
    for label, row in [*((str(r["rank"]), row) for r, row in zip(ranks, rows)),
                       ("mean", tuple(statistics.fmean(c) for c in zip(*rows)))]:
        step, prof, counts, fwd, bwd, a2a, share, gloo = row
        print(f"{label:<6}{step * 1e3:>9.1f}{prof * 1e3:>11.1f}{counts * 1e3:>8.1f}{fwd * 1e3:>9.1f}{bwd * 1e3:>9.1f}"
              f"{a2a * 1e3:>8.1f}{share:>8.1%}{gloo * 1e3:>9.1f}")
    sent = sum(r["a2a_bytes"] for r in ranks)
    print(f"all-to-all data sent per step, all ranks: {sent / 2**20:.2f} MiB, forward and backward")
    print("ms per step; a2a = counts + fwd + bwd (training thread blocked, incl. waiting for the other rank); "
          "gloo = gloo worker's own all_to_all spans")
    print(load_note(load_before, "skew between ranks inflates the a2a time"))


if __name__ == "__main__":
    main()

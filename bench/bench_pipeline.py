"""Pipeline schedules at pp=2: step time, measured bubble vs analytic, peak activation memory.

    python bench/bench_pipeline.py [--microbatches 2 4 8] [--steps 6] [--warmup 2] [OVERRIDE ...]

Spawns 2 gloo processes on localhost (one thread each) and lays the composed config's model out
as MeshStrategy does for strategy=pipeline: `apply_layout` (the split) + `Pipeline` (manual
PipelineStages and torch's schedule). Default shapes: the dense default model (d=128, 4 layers,
batch 32 x 128), over OVERRIDEs. For each schedule and m micro-batches:

  step_ms      median wall time of one schedule step (forward + backward of all micro-batches)
  bubble       measured idle share of a stage's step: 1 - busy / step, where busy is the summed
               wall time of the stage's forward, backward (input and weight) actions, from
               timestamps around PipelineStage's *_one_chunk methods; mean over the two stages.
               Time blocked in send/recv counts as idle.
  analytic     (p - 1) / (m + p - 1) for gpipe and 1f1b (equal fwd/bwd times per stage);
               interleaved (v stages per rank): (p - 1) / (v m + p - 1); zero_bubble fills the
               bubble with weight-gradient work: analytic ~0 when W takes what the bubble was.
  act_MiB      peak bytes of tensors saved for backward and alive at once on stage 0 (counted with
               saved_tensors_hooks): 1F1B keeps at most p micro-batches in flight, GPipe all m.

interleaved_1f1b and zero_bubble run 2 stages per rank (model.n_layers must be >= 4).
On a shared 2-core machine wall times mostly measure the neighbours: ratios only.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
import weakref
from pathlib import Path

from benchlib import compose, exit_worker, free_port, load_note

SCHEDULES = [("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 2), ("zero_bubble", 2)]


def analytic_bubble(schedule: str, m: int, p: int, v: int) -> float:
    if schedule == "zero_bubble":
        return 0.0
    return (p - 1) / (v * m + p - 1)


class SavedBytes:
    """Live bytes of tensors autograd saved for backward (by storage), and their peak."""

    def __init__(self):
        self.live, self.peak, self._refs = 0, 0, {}

    def pack(self, t):
        key = t.untyped_storage().data_ptr()
        count, nbytes = self._refs.get(key, (0, t.untyped_storage().nbytes()))
        if count == 0:
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        self._refs[key] = (count + 1, nbytes)
        holder = _Holder(t)
        weakref.finalize(holder, self._release, key)
        return holder

    def _release(self, key):
        count, nbytes = self._refs[key]
        if count == 1:
            del self._refs[key]
            self.live -= nbytes
        else:
            self._refs[key] = (count - 1, nbytes)

    @staticmethod
    def unpack(holder):
        return holder.t


class _Holder:
    __slots__ = ("t", "__weakref__")

    def __init__(self, t):
        self.t = t


def timed(stage, busy):
    """Wrap a PipelineStage's compute actions with timestamps (bench only)."""
    for name in ("forward_one_chunk", "backward_one_chunk", "backward_weight_one_chunk"):
        original = getattr(stage, name, None)
        if original is None:
            continue

        def wrapper(*args, _original=original, **kwargs):
            t0 = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                busy.append(time.perf_counter() - t0)

        setattr(stage, name, wrapper)


def rank_main(rank, world, port, overrides, microbatches, steps, warmup, out_dir):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    from paratrain.strategies.layout import apply_layout
    from paratrain.strategies.mesh import ParallelDims, build_mesh
    from paratrain.strategies.pipeline_parallel import Pipeline
    from paratrain.trainer.data import TrainBatches, token_files
    from paratrain.trainer.models.transformer import build_model
    from paratrain.trainer.schema import PipelineConfig

    cfg = compose(overrides)
    dims = ParallelDims(dp=1, ep=1, pp=world, world_size=world)
    mesh = build_mesh(dims, "cpu")
    train_path, _ = token_files(cfg.data)
    batches = iter(TrainBatches(train_path, cfg.data.seq_len, cfg.data.batch_size, cfg.seed))
    rows = []
    for schedule, v in SCHEDULES:
        if cfg.model.n_layers < world * v:
            continue
        for m in microbatches:
            pcfg = PipelineConfig(schedule=schedule, microbatches=m, stages_per_rank=v)
            model = build_model(cfg.model, cfg.seed, device="meta")
            apply_layout(model, dims, mesh, cfg.seed, torch.device("cpu"), pipeline=pcfg)
            pipe = Pipeline(model, dims, mesh, torch.device("cpu"), schedule, m, v)
            busy: list[float] = []
            for stage in pipe.stages:
                timed(stage, busy)
            saved = SavedBytes()
            times, bubbles = [], []
            for step in range(warmup + steps):
                batch = next(batches)
                busy.clear()
                dist.barrier()
                t0 = time.perf_counter()
                with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
                    pipe.train_step(batch)
                elapsed = time.perf_counter() - t0
                pipe.release_grads()
                model.zero_grad(set_to_none=True)
                if step >= warmup:
                    times.append(elapsed)
                    bubbles.append(1 - sum(busy) / elapsed)
            stats = torch.tensor([statistics.median(times), statistics.median(bubbles), saved.peak], dtype=torch.float64)
            gathered = [torch.zeros_like(stats) for _ in range(world)]
            dist.all_gather(gathered, stats)
            if rank == 0:
                rows.append((schedule, v, m, [g.tolist() for g in gathered]))
    if rank == 0:
        import json

        Path(out_dir, "rows.json").write_text(json.dumps(rows))
    exit_worker()  # its barrier: rank 0 has written the rows before any rank leaves


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--microbatches", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    import json

    import torch.multiprocessing as mp

    load = os.getloadavg()[0]
    port = free_port()
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(rank_main, args=(2, port, args.overrides, args.microbatches, args.steps, args.warmup, out_dir),
                           nprocs=2, join=True, start_method="spawn")
        rows = json.loads(Path(out_dir, "rows.json").read_text())
    p = 2
    print(f"pp={p}, one thread per process; overrides: {' '.join(args.overrides) or '(defaults)'}")
    print(f"{'schedule':<18}{'v':>2}{'m':>4}{'step_ms':>10}{'bubble':>9}{'analytic':>10}{'act_MiB':>9}")
    acts = {}
    for schedule, v, m, ranks in rows:
        step = statistics.mean(r[0] for r in ranks) * 1e3
        bubble = statistics.mean(r[1] for r in ranks)
        act = ranks[0][2] / 2**20  # stage 0 holds the most micro-batches in flight
        acts[(schedule, m)] = act
        print(f"{schedule:<18}{v:>2}{m:>4}{step:>10.1f}{bubble:>9.3f}{analytic_bubble(schedule, m, p, v):>10.3f}{act:>9.2f}")
    for m in args.microbatches:
        if ("gpipe", m) in acts and ("1f1b", m) in acts:
            print(f"m={m}: 1F1B / GPipe peak activation memory on stage 0 = {acts[('1f1b', m)] / acts[('gpipe', m)]:.2f}")
    print(load_note(load))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()

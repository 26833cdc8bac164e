"""Pipeline parallelism (strategy.mesh.pp): equal to the single-process run, gradients first.

Tier 3 (in-process ranks): after one optimizer step's pipeline steps (forward + backward of every
micro-batch, 1 or 2 accumulation steps) and the gradient sync (ours, or FSDP2's reduce-scatter at
ZeRO-2/3), every parameter a rank holds has the single-process gradient of the global-batch loss
(cross-entropy + MoE auxiliary losses), rtol 1e-5 / atol 1e-6 in fp32, for every schedule, dense
and MoE, and composed with dp and ep. A wrong micro-batch scaling gives 4x gradients while
the loss moves by ~1e-6 (DESIGN.md facts), which is why gradients are compared.
Tier 4 (`train` in a subprocess): losses over 6 steps equal `single` to 1e-5 relative.
"""

import contextlib
import re
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from conftest import REPO, TINY, TINY_MOE, metrics, summary, train, train_losses
from distributed import run_on_ranks
from paratrain.trainer.models.transformer import build_model
from paratrain.trainer.schema import ModelConfig, MoEConfig, PipelineConfig

SEED = 11


def model_cfg(moe=True, n_layers=4):
    moe_cfg = MoEConfig(num_experts=4, top_k=2, expert_ffn_dim=16) if moe else None
    return OmegaConf.structured(ModelConfig(d_model=32, n_layers=n_layers, n_heads=2, ffn_dim=32, moe=moe_cfg))


def global_batch(batch=8, seq=16):
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, 256, (batch, seq + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def reference(cfg):
    model = build_model(cfg, SEED)
    x, y = global_batch()
    ce = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    (ce + model.aux_loss()).backward()
    return ce.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_split_keeps_parameter_names_embedding_first_head_last():
    """Tier 1: the split step on the meta device; stages by an even split and by split_points."""
    from paratrain.strategies.mesh import ParallelDims
    from paratrain.strategies.pipeline_parallel import apply_pipeline_split, local_stages, stage_layers

    assert stage_layers(5, 2) == [range(0, 3), range(3, 5)]
    assert stage_layers(8, 4, [1, 2, 7]) == [range(0, 1), range(1, 2), range(2, 7), range(7, 8)]
    assert local_stages(1, 2, 2) == [1, 3]  # loop placement: stage s on rank s % pp
    cfg = model_cfg(moe=True)
    full = {n for n, _ in build_model(cfg, SEED, device="meta").named_parameters()}
    dims = ParallelDims(dp=1, ep=1, pp=2, world_size=2)
    held = []
    for rank in range(2):
        model = build_model(cfg, SEED, device="meta")
        apply_pipeline_split(model, dims, rank, stages_per_rank=2)  # 4 stages of one block each
        names = {n for n, _ in model.named_parameters()}
        assert names <= full
        assert ("tok_emb.weight" in names) == (rank == 0) and ("head.weight" in names) == (rank == 1)
        assert sorted({n.split(".")[1] for n in names if n.startswith("layers.")}) == ([str(rank), str(rank + 2)])
        held.append(names)
    assert held[0] | held[1] == full and not held[0] & held[1]


class Layout(NamedTuple):
    schedule: str
    microbatches: int
    stages_per_rank: int = 1
    zero_stage: int = 0
    accumulate: int = 1
    """Pipeline steps per optimizer step (trainer.accumulate_grad_batches)."""
    sequence_parallel: bool = True
    """Under tp: stage boundaries carry each tp rank's slice of the sequence (else the whole of it)."""


def pipelined_grads(rank, world_size, cfg, mesh_degrees, layouts):
    """Every Layout in `layouts` on one process group; the rows of the global batch split over the
    data ranks, then over the accumulation steps, as the data module splits them."""
    from functools import partial

    from torch.distributed.tensor import DTensor

    from paratrain.strategies.fsdp import shard_stage_root
    from paratrain.strategies.grad_sync import GradientSync
    from paratrain.strategies.layout import apply_layout
    from paratrain.strategies.mesh import ParallelDims, build_mesh
    from paratrain.strategies.pipeline_parallel import Pipeline

    dims = ParallelDims(world_size=world_size, **mesh_degrees)
    mesh = build_mesh(dims, "cpu")
    out = []
    for layout in layouts:
        pcfg = PipelineConfig(schedule=layout.schedule, microbatches=layout.microbatches,
                              stages_per_rank=layout.stages_per_rank)
        model = build_model(cfg, SEED, device="meta")
        groups = apply_layout(model, dims, mesh, SEED, torch.device("cpu"), zero_stage=layout.zero_stage,
                              sequence_parallel=layout.sequence_parallel, pipeline=pcfg)
        sync = GradientSync(groups, bucket_size_mb=0.01) if groups else None
        shard = partial(shard_stage_root, mesh=mesh, zero_stage=layout.zero_stage) if groups == [] else None
        pipe = Pipeline(model, dims, mesh, torch.device("cpu"), layout.schedule, layout.microbatches,
                        layout.stages_per_rank, no_sync=sync.no_sync if sync else contextlib.nullcontext,
                        accumulate=layout.accumulate, shard_stage=shard, sequence_parallel=layout.sequence_parallel)
        # ZeRO-2/3: every parameter a stage holds is an FSDP shard (a DTensor over the stage's dp ranks).
        assert layout.zero_stage < 2 or all(isinstance(p, DTensor) for p in model.parameters()), layout
        x, y = global_batch()
        local = x.shape[0] // (dims.data_ranks * layout.accumulate)
        ces = []
        for step in range(layout.accumulate):
            start = (dims.data_rank(rank) * layout.accumulate + step) * local
            ce, aux = pipe.train_step((x[start:start + local], y[start:start + local]))
            pipe.release_grads()  # as the strategy's backward does
            ces.append(ce.item())
        if sync:
            sync.finish()
        offsets = {n: m.expert_offset for n, m in model.named_modules() if hasattr(m, "expert_offset")}
        # DTensor gradients (FSDP shards, tp slices) gathered whole: a collective over the stage's ranks.
        grads = {n: ((p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad.clone()),
                     offsets.get(n.rsplit(".", 1)[0])) for n, p in model.named_parameters()}
        out.append((sum(ces) / len(ces), grads))
    return out


def check(results, ref, layouts, ep=1, last_ranks=1):
    """`last_ranks`: the ranks of the last stage (dp x ep x tp), each holding the loss of its data slice."""
    ref_ce, ref_grads = ref
    for i, layout in enumerate(layouts):
        seen = set()
        ces = []
        for rank, per_layout in enumerate(results):
            ce, grads = per_layout[i]
            ces.append(ce)
            for name, (grad, offset) in grads.items():
                expected = ref_grads[name]
                if offset is not None and ep > 1:
                    expected = expected[offset: offset + grad.shape[0]]
                torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6, msg=f"{layout} rank {rank} {name}")
                seen.add(name)
        assert seen == set(ref_grads), f"{layout}: parameters held by no stage: {set(ref_grads) - seen}"
        # The last stage's ranks hold the loss of their data slice; their mean is the global loss.
        last = [c for c in ces if c != 0.0]
        assert len(last) == last_ranks and sum(last) / last_ranks == pytest.approx(ref_ce, rel=1e-5), layout


# 2 accumulation steps of 2 micro-batches: earlier steps' gradients must not be rescaled by later ones.
SCHEDULES = [Layout("gpipe", 4), Layout("1f1b", 4), Layout("interleaved_1f1b", 4, 2), Layout("zero_bubble", 4, 2),
             Layout("1f1b", 2, accumulate=2), Layout("zero_bubble", 2, 2, accumulate=2)]


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_pp2_gradients_equal_single_process_for_every_schedule(moe):
    cfg = model_cfg(moe=moe)
    results = run_on_ranks(pipelined_grads, 2, cfg, {"dp": 1, "ep": 1, "pp": 2}, SCHEDULES, timeout_s=240)
    check(results, reference(cfg), SCHEDULES)


def test_pp2_composes_with_dp2_and_ep2():
    """4 processes: pp=2 x dp=2 (dense and MoE gradients reduced over each stage's dp ranks; by our
    all-reduce, or by FSDP2's reduce-scatter at ZeRO-2/3 with each stage module its own root, with
    and without accumulation) and pp=2 x ep=2 (experts sharded inside a stage, tokens exchanged by
    all-to-all within it)."""
    layouts = [Layout("1f1b", 2), Layout("interleaved_1f1b", 2, 2)]
    zero = [Layout("1f1b", 2, zero_stage=2), Layout("interleaved_1f1b", 2, 2, zero_stage=2, accumulate=2),
            Layout("zero_bubble", 2, 2, zero_stage=2),
            Layout("gpipe", 2, zero_stage=3)]
    cfg = model_cfg(moe=True)
    ref = reference(cfg)
    check(run_on_ranks(pipelined_grads, 4, cfg, {"dp": 2, "ep": 1, "pp": 2}, layouts + zero, timeout_s=300), ref,
          layouts + zero, last_ranks=2)
    check(run_on_ranks(pipelined_grads, 4, cfg, {"dp": 1, "ep": 2, "pp": 2}, layouts, timeout_s=300), ref, layouts,
          ep=2, last_ranks=2)


def test_3d_pp2_dp2_tp2_gradients_equal_single_process():
    """8 processes, pp=2 x dp=2 x tp=2, dense: tp inside each stage, activations crossing stages as
    each tp rank's local tensor (its slice of the sequence under sequence parallel, else all of it),
    the vocab-parallel loss on the last stage; with our gradient sync, and with FSDP2 (ZeRO-2) over
    each stage's dp ranks on top of the tp plan, accumulating 2 pipeline steps."""
    layouts = [Layout("1f1b", 2), Layout("interleaved_1f1b", 2, 2, sequence_parallel=False),
               Layout("1f1b", 2, zero_stage=2, accumulate=2)]
    cfg = model_cfg(moe=False)
    check(run_on_ranks(pipelined_grads, 8, cfg, {"dp": 2, "ep": 1, "tp": 2, "pp": 2}, layouts, timeout_s=400),
          reference(cfg), layouts, last_ranks=4)


# --- tier 4: `train` under strategy=pipeline reproduces `single` ---------------------------------

PP2 = ["strategy=pipeline", "trainer.devices=2", "strategy.pipeline.microbatches=4"]
RUNS = {
    "gpipe-moe": (TINY_MOE, [*PP2, "strategy.pipeline.schedule=gpipe"]),
    # 2 accumulation steps of 4 micro-batches (one sequence each) per optimizer step.
    "1f1b-dense-accumulate2": (TINY, [*PP2, "strategy.pipeline.schedule=1f1b", "trainer.accumulate_grad_batches=2"]),
    # 4 processes: experts over ep=2 inside each stage; ZeRO-1 / ZeRO-2 over each stage's dp=2 ranks.
    "pp2xep2-1f1b-moe": (TINY_MOE, ["strategy=pipeline", "strategy.mesh.ep=2", "trainer.devices=4",
                                    "strategy.pipeline.microbatches=2"]),
    "pp2xdp2-zero1-dense": (TINY, ["strategy=pipeline", "strategy.mesh.dp=2", "trainer.devices=4",
                                   "strategy.pipeline.microbatches=2", "strategy.zero_stage=1"]),
    # Validation at loader batch 3 falls inside an accumulation: the schedule's re-initialisation after
    # eval would clear the FSDP gradients of the first half (Pipeline.train_step holds them aside).
    "pp2xdp2-zero2-accumulate2-moe": (TINY_MOE, ["strategy=pipeline", "strategy.mesh.dp=2", "trainer.devices=4",
                                                 "strategy.pipeline.microbatches=2", "strategy.zero_stage=2",
                                                 "trainer.accumulate_grad_batches=2"]),
}


@pytest.fixture(scope="module")
def single_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    out = {}
    for name, args in (("dense", TINY), ("moe", TINY_MOE)):
        done = train(args, root / name)
        assert done.returncode == 0, done.stderr[-3000:]
        out[name] = root / name
    return out


@pytest.mark.parametrize("name", list(RUNS))
def test_train_under_pipeline_reproduces_single(name, single_runs, tmp_path):
    base, layout = RUNS[name]
    run_dir = tmp_path / name
    done = train([*base, *layout], run_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    ref = single_runs["moe" if base is TINY_MOE else "dense"]
    assert train_losses(run_dir) == pytest.approx(train_losses(ref), rel=1e-5)
    # By step: Lightning counts trainer.val_check_interval in loader batches, so accumulation validates
    # more often (also at steps 1 and 4 with 2 accumulation steps), but at steps 3 and 6 as `single`.
    val, ref_val = ({int(r["step"]): float(r["val/loss"]) for r in metrics(d) if r["val/loss"]} for d in (run_dir, ref))
    assert len(ref_val) == 2 and {k: val.get(k) for k in ref_val} == pytest.approx(ref_val, rel=1e-5)
    s, r = summary(run_dir), summary(ref)
    assert s["status"] == "completed" and s["mesh"]["pp"] == 2 and s["layout"].startswith("pp=2 x ")
    assert s["params_total"] == r["params_total"] and s["params_per_rank"] < r["params_total"]
    if base is TINY_MOE:  # the MoE metrics of every stage's layers reach rank 0's row
        row, ref_row = metrics(run_dir)[-1], metrics(ref)[-1]
        for key in ("train/load_balancing_loss", "train/z_loss", "moe/layer0/imbalance", "moe/layer1/imbalance"):
            assert float(row[key]) == pytest.approx(float(ref_row[key]), rel=1e-4), key


# --- checkpoints: resume bitwise, reshard to single and back -----------------------------------

CKPT = [*TINY_MOE, "optimizer.warmup_steps=8", "optimizer.min_lr_ratio=1.0", "strategy.timeout_s=60",
        "trainer.checkpoint_every_n_steps=6"]


def _ok(args, run_dir):
    done = train(args, run_dir)
    assert done.returncode == 0, done.stderr[-3000:]


def test_pp2_checkpoint_resumes_bitwise_and_reshards_to_single_and_back(tmp_path):
    """12 steps on pp2 and on single, checkpoints at 6 and 12 (the LR is flat after warm-up, so
    step 6 of a 12-step run is where a 6-step run would stop); each step-6 checkpoint resumed to 12
    in a new run directory, on its own layout and on the other one."""
    from paratrain.strategies import portable_state

    _ok([*CKPT, *PP2, "trainer.max_steps=12"], tmp_path / "pp-straight")
    _ok([*CKPT, "trainer.max_steps=12"], tmp_path / "single-straight")
    # Keys are parameter names whatever stage held them: the pp checkpoint holds the whole model.
    step6 = {run: tmp_path / run / "checkpoints" / "step000006" for run in ("pp-straight", "single-straight")}
    weights = portable_state.consolidated_model_state(step6["pp-straight"])
    single6 = portable_state.consolidated_model_state(step6["single-straight"])
    assert weights.keys() == single6.keys()
    for key in weights:
        torch.testing.assert_close(weights[key], single6[key], rtol=1e-4, atol=1e-6, msg=key)

    cases = {"pp-to-pp": ("pp-straight", PP2, 0),
             "pp-to-single": ("pp-straight", [], 1e-5),
             "single-to-pp": ("single-straight", PP2, 1e-5)}
    for name, (first, then, rel) in cases.items():
        run_dir = tmp_path / name
        _ok([*CKPT, *then, "trainer.max_steps=12", f"resume={step6[first]}"], run_dir)
        got, want = train_losses(run_dir), train_losses(tmp_path / first)[6:]
        assert len(got) == 6 and summary(run_dir)["resumed_from_step"] == 6, name
        if rel == 0:
            assert got == want, name
        else:
            assert got == pytest.approx(want, rel=rel), name


# --- bad input: exit 2 before any process starts -----------------------------------------------

BAD = [
    (["strategy=pipeline", "trainer.devices=4", "model.n_layers=2", "strategy.mesh.pp=4"],
     r"model\.n_layers=2 is fewer than the 4 pipeline stages"),
    (["strategy=pipeline", "trainer.devices=2", "strategy.pipeline.schedule=interleaved_1f1b",
      "strategy.pipeline.stages_per_rank=2", "model.n_layers=3"], r"model\.n_layers=3 is fewer than the 4 pipeline stages"),
    (["strategy=pipeline", "trainer.devices=2", "strategy.pipeline.microbatches=3"],
     r"strategy\.pipeline\.microbatches=3 does not divide the per-rank batch of 8"),
    (["strategy=pipeline", "trainer.devices=4", "strategy.mesh.pp=4", "model.n_layers=4", "strategy.pipeline.microbatches=2"],
     r"strategy\.pipeline\.microbatches=2 is fewer than strategy\.mesh\.pp=4"),
    (["strategy=pipeline", "trainer.devices=2", "strategy.pipeline.stages_per_rank=2"],
     r"stages_per_rank=2 needs a schedule that runs several stages per rank"),
    (["strategy=pipeline", "trainer.devices=2", "strategy.pipeline.schedule=dualpipe"],
     r"strategy\.pipeline\.schedule='dualpipe' is not a pipeline schedule"),
    (["strategy=pipeline", "trainer.devices=2", "model.n_layers=4", "strategy.pipeline.split_points=[4]"],
     r"split_points=\[4\] does not split model\.n_layers=4 blocks into 2 stages"),
    # The micro-batches divide one accumulation step's share: 8 / 2 = 4 sequences.
    (["strategy=pipeline", "trainer.devices=2", "trainer.accumulate_grad_batches=2", "strategy.pipeline.microbatches=8"],
     r"strategy\.pipeline\.microbatches=8 does not divide the per-rank batch of 4"),
    (["strategy=pipeline", "trainer.devices=2", "strategy.zero_stage=2"],
     r"strategy\.zero_stage=2 with strategy\.mesh\.pp=2 and strategy\.mesh\.dp x strategy\.mesh\.ep = 1"),
    (["strategy=pipeline", "strategy.mesh.pp=2", "strategy.mesh.dp=2", "trainer.devices=2"],
     r"strategy\.mesh\.pp=2 x strategy\.mesh\.dp=2 x strategy\.mesh\.ep=1 = 4 processes"),
]


def compose_run(overrides):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from paratrain.trainer.recipes import register_recipes
    from paratrain.trainer.schema import register_configs

    register_configs()
    register_recipes()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*TINY, *overrides])
    GlobalHydra.instance().clear()
    return cfg


@pytest.mark.parametrize("args,pattern", BAD, ids=[a[-1] for a, _ in BAD])
def test_bad_pipeline_config_is_refused_naming_the_key(args, pattern):
    """Every rule, on the composed config, in-process: the CLI runs the same validate() first."""
    from paratrain.trainer.errors import ConfigError
    from paratrain.trainer.validate import validate

    with pytest.raises(ConfigError, match=pattern):
        validate(compose_run(args))


def test_pipeline_keys_without_pp_warn_and_defaults_validate():
    from paratrain.trainer.validate import validate

    with pytest.warns(UserWarning, match=r"strategy\.pipeline\.\* is set but strategy\.mesh\.pp=1"):
        validate(compose_run(["strategy.pipeline.schedule=gpipe"]))
    dims = validate(compose_run(["strategy=pipeline", "trainer.devices=2"]))  # pp inferred, microbatches = 2 x pp
    assert (dims.pp, dims.dp, dims.ep) == (2, 1, 1)


def test_bad_pipeline_config_exits_2_before_spawning(tmp_path):
    run_dir = tmp_path / "bad"
    args, pattern = BAD[0]
    done = train([*TINY, *args], run_dir, timeout=120)
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert re.search(pattern, done.stderr, re.S), done.stderr
    assert "Traceback" not in done.stderr and not (run_dir / "summary.json").exists()

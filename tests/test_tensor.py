"""Tensor parallelism: every tp layout reproduces the single-process run on the same global batch.

Tier 3 (gradients): the model laid out by `apply_layout` on a dp x ep x tp mesh (ZeRO 0-3), our
gradient sync (or FSDP2) and AdamW, 6 steps; per-step losses to rel 1e-5, every gradient at the
first and the last step (rtol 1e-5 / atol 1e-6) and every parameter after the last update (atol
1e-4), gathered whole (DTensor slices with full_tensor, expert shards by their global index), and the router's
expert counts summed over ranks exactly, against one process. The layouts of one world size run in
one spawned job. Tier 4: the real `train` command under strategy=tensor.
"""

import re

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from distributed import run_on_ranks
from paratrain.trainer.models.transformer import build_model
from paratrain.trainer.schema import ModelConfig, MoEConfig

SEED = 11
STEPS = 6
BATCH, SEQ = 8, 16
RTOL, ATOL = 1e-5, 1e-6
# Parameters after 6 AdamW steps (lr 1e-2): m / sqrt(v) of a near-zero gradient turns its last-bit
# differences into up to ~2e-5; a parameter a rank failed to update or to receive would be ~1e-2 off.
PARAM_ATOL = 1e-4


def model_cfg(moe=False, num_shared_experts=0, capacity_factor=None, balance_bias_rate=0.0):
    moe_cfg = MoEConfig(num_experts=4, top_k=2, expert_ffn_dim=16, num_shared_experts=num_shared_experts,
                        capacity_factor=capacity_factor, balance_bias_rate=balance_bias_rate) if moe else None
    return OmegaConf.structured(ModelConfig(d_model=32, n_layers=2, n_heads=4, ffn_dim=64, moe=moe_cfg))


def batch(step):
    g = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(0, 256, (BATCH, SEQ + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def _train(model, rows, cross_entropy, sync=None, backward_context=None, clip=None, zero=None):
    """STEPS AdamW steps on `rows` of each global batch. Returns (losses, grads of step 0 and of the last
    step, expert counts (layers, E) per step, routed_load per layer at the end, parameters at the end)."""
    from contextlib import nullcontext

    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    if zero is not None:
        zero.shard(opt)
    losses, grads, loads = [], [], []
    for step in range(STEPS):
        x, y = batch(step)
        logits = model(x[rows])
        loss = cross_entropy(logits.flatten(0, 1), y[rows].flatten()) + model.aux_loss()
        with backward_context() if backward_context else nullcontext():
            loss.backward()
        if sync is not None:
            sync.finish()
        if clip is not None:
            clip(model)
        losses.append(loss.detach().clone())
        if step in (0, STEPS - 1):
            grads.append({n: p.grad.clone() for n, p in model.named_parameters()})  # sync reuses its buffers
        if model.moe_layers():
            loads.append(torch.stack([m.stats["tokens_per_expert"] for m in model.moe_layers()]))
        opt.step()
        if zero is not None:
            zero.gather_params()
        opt.zero_grad(set_to_none=True)
    routed = [m.routed_load for m in model.moe_layers()]
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return losses, grads, loads, routed, params, opt


def reference(cfg):
    model = build_model(cfg, SEED)
    losses, grads, loads, routed, params, _ = _train(model, slice(None), F.cross_entropy, clip=_clip_single)
    return [float(v) for v in losses], grads, loads, routed, params


def _clip_single(model):
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)


def laid_out(rank, world_size, cfg, dp, ep, tp, sequence_parallel, zero_stage=0):
    from paratrain.strategies.grad_norm import clip_grad_norm_
    from paratrain.strategies.grad_sync import GradientSync
    from paratrain.strategies.layout import apply_layout
    from paratrain.strategies.mesh import ParallelDims, build_mesh
    from paratrain.strategies.zero import OptimizerStateSharding, optimizer_state_bytes
    from torch.distributed.tensor.parallel import loss_parallel

    from paratrain.strategies.tensor_parallel import parallel_cross_entropy

    dims = ParallelDims(dp=dp, ep=ep, tp=tp, world_size=world_size)
    mesh = build_mesh(dims, "cpu")
    model = build_model(cfg, SEED, device="meta")
    groups = apply_layout(model, dims, mesh, SEED, torch.device("cpu"), sequence_parallel=sequence_parallel,
                          zero_stage=zero_stage)
    sync = GradientSync(groups, bucket_size_mb=0.01)
    local = BATCH // dims.data_ranks
    data_rank = dims.data_rank(rank)
    rows = slice(data_rank * local, (data_rank + 1) * local)
    ce = parallel_cross_entropy if tp > 1 else F.cross_entropy
    losses, grads, loads, routed, params, opt = _train(
        model, rows, ce, sync, loss_parallel if tp > 1 else None, clip=lambda m: clip_grad_norm_(m, 1.0, mesh),
        zero=OptimizerStateSharding(groups) if zero_stage == 1 else None)
    offsets = {n: m.expert_offset for n, m in model.named_modules() if hasattr(m, "expert_offset")}
    # Gradients were kept as DTensors: gather slices (a collective, the same order on every rank).
    whole = [{n: (g.full_tensor() if hasattr(g, "full_tensor") else g, offsets.get(n.rsplit(".", 1)[0]))
              for n, g in step.items()} for step in (*grads, params)]
    local_bytes = sum((p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size()
                      for p in model.parameters())
    return [float(v) for v in losses], whole, local_bytes, loads, routed, optimizer_state_bytes(opt)


def laid_out_many(rank, world_size, layouts):
    """Several layouts, one after the other, in one process group: one spawn for the lot."""
    return [laid_out(rank, world_size, model_cfg(**kw), *rest) for kw, *rest in layouts]


LAYOUTS = {  # name: (cfg kwargs, dp, ep, tp, sequence_parallel[, zero_stage])
    "dense-tp2-sp": ({}, 1, 1, 2, True),
    "dense-tp2": ({}, 1, 1, 2, False),
    "moe-tp2": ({"moe": True, "balance_bias_rate": 1e-3}, 1, 1, 2, True),
    "moe-tp2-shared-capacity-nosp": ({"moe": True, "num_shared_experts": 1, "capacity_factor": 1.0}, 1, 1, 2, False),
    "dense-dp2xtp2": ({}, 2, 1, 2, True),
    "moe-ep2xtp2-shared": ({"moe": True, "num_shared_experts": 1}, 1, 2, 2, True),
    "dense-dp2xtp2-zero3": ({}, 2, 1, 2, True, 3),  # FSDP2 over dp on top of the tp plan
    # MoE under ZeRO-2/3: router and experts sharded by FSDP over meshes that include tp (strategies/fsdp.py).
    "moe-dp2xtp2-zero3": ({"moe": True, "balance_bias_rate": 1e-3}, 2, 1, 2, True, 3),
    "moe-ep2xtp2-zero2": ({"moe": True, "num_shared_experts": 1}, 1, 2, 2, True, 2),
    # ZeRO-1: optimizer state split over what each rank holds (tp slices, replicated norms, router, experts).
    "moe-dp2xtp2-shared-zero1": ({"moe": True, "num_shared_experts": 1}, 2, 1, 2, True, 1),
}
JOBS = {world: [n for n, (_, dp, ep, tp, *_) in LAYOUTS.items() if dp * ep * tp == world] for world in (2, 4)}


@pytest.mark.parametrize("world", list(JOBS), ids=lambda w: f"{w}-processes")
def test_tp_gradients_equal_single_process(world):
    """Every layout of one world size in one spawned job; each compared with its own single-process run."""
    names = JOBS[world]
    jobs = run_on_ranks(laid_out_many, world, [LAYOUTS[n] for n in names], timeout_s=150 * len(names))
    refs = {}
    for i, name in enumerate(names):
        cfg_kwargs, dp, ep, tp, sp, *zero_stage = LAYOUTS[name]
        key = repr(sorted(cfg_kwargs.items()))
        if key not in refs:
            refs[key] = reference(model_cfg(**cfg_kwargs))
        _check_layout(name, [job[i] for job in jobs], *refs[key], dp=dp, ep=ep, zero_stage=(zero_stage or [0])[0])


def _check_layout(name, results, ref_losses, ref_grads, ref_loads, ref_routed, ref_params, dp, ep, zero_stage):
    # Each rank's loss is the mean over its data rank's slice (equal slices): their mean is the global one.
    steps = range(STEPS)
    mean_losses = [sum(r[0][step] for r in results) / len(results) for step in steps]
    assert mean_losses == pytest.approx(ref_losses, rel=1e-5), (name, mean_losses, ref_losses)
    for rank, (losses, grads, local_bytes, _, _, opt_bytes) in enumerate(results):
        if dp * ep == 1:
            assert losses == pytest.approx(ref_losses, rel=1e-5), (name, rank, losses, ref_losses)
        # Gradients at the first and the last step, then the parameters after the last update.
        for step, (got, want) in enumerate(zip(grads, [*ref_grads, ref_params])):
            assert got.keys() == want.keys()
            for n, (g, offset) in got.items():
                expected = want[n]
                if offset is not None and ep > 1:
                    expected = expected[offset: offset + g.shape[0]]
                torch.testing.assert_close(g, expected, rtol=RTOL, atol=ATOL if step < 2 else PARAM_ATOL,
                                           msg=lambda m: f"{name} rank {rank} step {step} {n}: {m}")
        if zero_stage == 1:  # AdamW: 2 fp32 tensors per parameter held, split over dp=2 (largest first)
            assert 0 < opt_bytes < 0.75 * 2 * local_bytes, (name, rank, opt_bytes, local_bytes)
    if ref_loads:
        # Expert counts (metrics, plots, the balance bias) add up over the world to the single run's.
        for step in steps:
            total = sum(r[3][step] for r in results)
            assert torch.equal(total, ref_loads[step]), (name, step, total, ref_loads[step])
        if ref_routed[0] is not None:
            for layer, want in enumerate(ref_routed):
                total = sum(r[4][layer] for r in results if r[4][layer] is not None)
                assert torch.equal(total, want), (name, layer, total, want)


def test_tp_shards_the_split_layers_by_tp():
    """Per-rank parameter bytes of the split layers fall by tp; only the norms stay whole (measured)."""
    cfg = model_cfg()
    full = build_model(cfg, SEED)
    total = sum(p.numel() * p.element_size() for p in full.parameters())
    norms = sum(p.numel() * p.element_size() for n, p in full.named_parameters() if "norm" in n)
    results = run_on_ranks(_held_bytes, 2, cfg, timeout_s=120)
    assert results[0] == results[1] == (total - norms) // 2 + norms


def _held_bytes(rank, world_size, cfg):
    from paratrain.strategies.layout import apply_layout
    from paratrain.strategies.mesh import ParallelDims, build_mesh

    dims = ParallelDims(dp=1, ep=1, tp=2, world_size=world_size)
    mesh = build_mesh(dims, "cpu")
    model = build_model(cfg, SEED, device="meta")
    apply_layout(model, dims, mesh, SEED, torch.device("cpu"))
    return sum((p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size() for p in model.parameters())


# --- tier 4: the `train` command ---------------------------------------------------------------

from conftest import TINY, TINY_MOE, summary, train, train_losses  # noqa: E402

CKPT = ["optimizer.warmup_steps=8", "optimizer.min_lr_ratio=1.0", "strategy.timeout_s=60"]
TP2 = ["strategy=tensor", "trainer.devices=2"]


def run_ok(args, run_dir):
    done = train(args, run_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


def val_losses(run_dir):
    from conftest import metrics

    return {int(r["step"]): float(r["val/loss"]) for r in metrics(run_dir) if r["val/loss"]}


@pytest.fixture(scope="module")
def dense_runs(tmp_path_factory):
    """12-step references (single and tp=2) and 6-step runs of each to resume."""
    root = tmp_path_factory.mktemp("tensor")
    runs = {}
    for name, layout in (("single", []), ("tp2", TP2)):
        runs[name] = run_ok([*TINY, *CKPT, *layout, "trainer.max_steps=12"], root / name)
        runs[f"{name}-first6"] = run_ok([*TINY, *CKPT, *layout, "trainer.max_steps=6"], root / f"{name}-first6")
    return runs


def test_train_tensor_reproduces_single(dense_runs):
    single, tp2 = dense_runs["single"], dense_runs["tp2"]
    assert len(train_losses(tp2)) == 12
    assert train_losses(tp2) == pytest.approx(train_losses(single), rel=1e-5)
    assert val_losses(tp2) == pytest.approx(val_losses(single), rel=1e-5)
    s, ref = summary(tp2), summary(single)
    assert s["mesh"] == {"dp": 1, "ep": 1, "tp": 2} and s["world_size"] == 2
    assert s["layout"] == "dp=1 x ep=1 x tp=2 over 2 processes"
    norms = 5 * 32  # 2 blocks x 2 norms + the final norm, d_model=32 (TINY): replicated over tp
    assert s["params_per_rank"] == (ref["params_total"] - norms) // 2 + norms
    assert s["param_bytes_per_rank"] == 4 * s["params_per_rank"]
    assert ref["param_bytes_per_rank"] == 4 * ref["params_total"]


@pytest.mark.parametrize("first,then,reference,rel", [
    pytest.param("tp2", TP2, "tp2", 0, id="tp2-resume-bitwise"),
    pytest.param("tp2", [], "single", 1e-5, id="tp2-to-single"),
    pytest.param("single", TP2, "single", 1e-5, id="single-to-tp2"),
    pytest.param("tp2", ["strategy=ddp", "trainer.devices=2"], "single", 1e-5, id="tp2-to-ddp2"),
    pytest.param("tp2", ["strategy=tensor", "strategy.mesh.dp=2", "strategy.mesh.tp=2", "strategy.zero_stage=1",
                         "trainer.devices=4"], "single", 1e-5, id="tp2-to-dp2xtp2-zero1"),
])
def test_tensor_checkpoints_resume_and_reshard(first, then, reference, rel, dense_runs, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(dense_runs[f"{first}-first6"], run_dir)
    run_ok([*TINY, *CKPT, *then, "trainer.max_steps=12", "resume=auto"], run_dir)
    got, want = train_losses(run_dir), train_losses(dense_runs[reference])
    assert summary(run_dir)["resumed_from_step"] == 6
    if rel == 0:
        assert got == want and val_losses(run_dir) == val_losses(dense_runs[reference])
    else:
        assert got == pytest.approx(want, rel=rel)
        assert val_losses(run_dir) == pytest.approx(val_losses(dense_runs[reference]), rel=rel)


def test_export_consolidates_a_tensor_parallel_checkpoint(dense_runs, tmp_path):
    import subprocess
    import sys

    from paratrain.trainer.export import load_exported

    out = tmp_path / "model.safetensors"
    done = subprocess.run([sys.executable, "-m", "paratrain.trainer.export", str(dense_runs["tp2"]), str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    exported, _ = load_exported(out)
    single, _ = load_exported(_export(dense_runs["single"], tmp_path / "single.safetensors"))
    assert exported.head.weight.shape == (256, 32)  # whole, not a tp slice
    for (name, a), (_, b) in zip(exported.state_dict().items(), single.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=name)  # AdamW turns last-bit sums into ~1e-5


def _export(run_dir, out):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "paratrain.trainer.export", str(run_dir), str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def test_train_moe_ep2_x_tp2_zero2_reproduces_single(tmp_path):
    """MoE with ep x tp under FSDP2 (router over every rank, experts over dp x tp), through the real command,
    checkpoints included (TINY saves every 3 steps)."""
    moe = [*TINY_MOE, "model.moe.num_shared_experts=1"]
    single = run_ok(moe, tmp_path / "single")
    laid_out = run_ok([*moe, "strategy=tensor", "strategy.mesh.ep=2", "strategy.mesh.tp=2", "strategy.zero_stage=2",
                       "trainer.devices=4"], tmp_path / "ep2xtp2-zero2")
    assert train_losses(laid_out) == pytest.approx(train_losses(single), rel=1e-5)
    s = summary(laid_out)
    assert s["layout"] == "dp=1 x ep=2 x tp=2 over 4 processes; ZeRO-2; 2 experts per rank"
    assert s["a2a_bytes_per_step"] > 0


# --- bad input: exit 2 before any process starts, naming the key and the fix --------------------

BAD = {  # id: (overrides, regex of the message)
    "heads": (["model.n_heads=1", "model.d_model=32"], r"model\.n_heads=1 is not divisible by strategy\.mesh\.tp=2: "
              r"attention heads are split .* Use a multiple of 2 for model\.n_heads"),
    "ffn": (["model.ffn_dim=63"], r"model\.ffn_dim=63 is not divisible by strategy\.mesh\.tp=2: the dense SwiGLU"),
    "vocab": (["model.vocab_size=257"], r"model\.vocab_size=257 is not divisible by strategy\.mesh\.tp=2: the embedding"),
    "shared-expert-width": (["+recipe=moe_8x", "model.moe.expert_ffn_dim=31", "model.moe.num_shared_experts=1"],
                            r"model\.moe\.expert_ffn_dim=31 x model\.moe\.num_shared_experts=1 = 31 is not divisible by "
                            r"strategy\.mesh\.tp=2: the shared experts"),
    "seq-len-sp": (["data.seq_len=31"], r"data\.seq_len=31 is not divisible by strategy\.mesh\.tp=2: with "
                   r"strategy\.sequence_parallel=true .* set strategy\.sequence_parallel=false"),
    "mesh-product": (["strategy.mesh.tp=4"], r"strategy\.mesh\.dp=1 x strategy\.mesh\.ep=1 x strategy\.mesh\.tp=4 = 4 "
                     r"processes, but trainer\.devices \* trainer\.num_nodes = 2"),
    "zero3-moe-expert-width": (["+recipe=moe_8x", "strategy.zero_stage=3", "model.moe.expert_ffn_dim=31",
                                "model.moe.num_experts=3"],
                               r"model\.moe\.expert_ffn_dim=31 is not divisible by strategy\.mesh\.dp x "
                               r"strategy\.mesh\.tp = 2: under strategy\.zero_stage=3 .* Use a multiple of 2"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_tensor_parallel_config_is_refused_before_spawning(name):
    import re

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from conftest import REPO
    from paratrain.trainer.errors import ConfigError
    from paratrain.trainer.recipes import register_recipes
    from paratrain.trainer.schema import register_configs
    from paratrain.trainer.validate import validate

    overrides, message = BAD[name]
    register_configs()
    register_recipes()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*TINY, *TP2, *overrides])
    GlobalHydra.instance().clear()
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert re.search(message, str(e.value)), str(e.value)


def test_bad_tensor_parallel_config_exits_2_and_starts_nothing(tmp_path):
    done = train([*TINY, *TP2, "model.vocab_size=257"], tmp_path / "run")
    assert done.returncode == 2, done.stderr[-2000:]
    assert re.search(r"model\.vocab_size=257 is not divisible by strategy\.mesh\.tp=2", done.stderr)
    assert "Traceback" not in done.stderr and "distributed_backend" not in done.stderr + done.stdout


def test_train_dp2_x_tp2_zero3_reproduces_single(tmp_path):
    """tp composed with FSDP2 (ZeRO-3 over the data ranks of each tp slice), through the real command."""
    single = run_ok(TINY, tmp_path / "single")
    laid_out = run_ok([*TINY, "strategy=tensor", "strategy.mesh.dp=2", "strategy.mesh.tp=2", "strategy.zero_stage=3",
                       "trainer.devices=4"], tmp_path / "dp2xtp2-zero3")
    assert train_losses(laid_out) == pytest.approx(train_losses(single), rel=1e-5)
    s = summary(laid_out)
    assert s["layout"] == "dp=2 x ep=1 x tp=2 over 4 processes; ZeRO-3"
    assert s["params_per_rank"] < summary(single)["params_total"] / 3  # ~1/4: sharded over tp and dp

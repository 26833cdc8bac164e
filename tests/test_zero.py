"""ZeRO stages (strategy.zero_stage) and activation checkpointing: the single-process math, less memory.

Tiers, cheapest first:
1. config: bad input exits 2 before anything is spawned, naming the key.
2. one process: activation checkpointing keeps fewer saved activations, same gradients.
3. gloo, 2 and 4 ranks: after backward every gathered gradient equals the single-process gradient of
   the global batch (rtol 1e-5, atol 1e-6, fp32) under ZeRO-2, ZeRO-3, ZeRO-3 + checkpointing, on
   dp=2, ep=2 and dp=2 x ep=2 with capacity. This is where the expert-gradient divide factor shows:
   FSDP's default (/ dp) gives 2x expert gradients at ep=2. Per-rank bytes of parameters + gradients +
   optimizer state, measured from the tensors held: ZeRO-3 <= 1/N of ddp + 10%, dense and moe_8x, N=2, 4.
4. the real `train` command: losses of 6 steps within 1e-5 relative of `single`; the DCP checkpoint
   of a ZeRO-3 run resumes bitwise, reshards to single / hybrid / expert and back (1e-5), exports.
"""

import re

import pytest
import torch
from omegaconf import OmegaConf

from conftest import TINY, TINY_MOE, summary, train, train_losses
from distributed import run_on_ranks
from test_layout import SEED, global_batch, loss_of, model_cfg, reference_grads
from paratrain.strategies import portable_state as ckpt
from paratrain.trainer.models.transformer import build_model

# --- 1. bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize("args,message", [
    (["strategy=ddp", "trainer.devices=2", "strategy.zero_stage=4"], r"strategy\.zero_stage=4 is not a ZeRO stage.*0, 1, 2 or 3"),
    (["strategy.zero_stage=3"], r"strategy\.zero_stage=3 \(strategy=single\).*= 1: there is nothing to shard"),
    (["strategy=fsdp"], r"strategy\.zero_stage=3 \(strategy=fsdp\).*nothing to shard over"),
    (["strategy=ddp", "trainer.devices=2", "strategy.shard_optimizer=true"],
     r"strategy\.shard_optimizer=True was removed.*Use strategy\.zero_stage=1"),
    (["model.activation_checkpointing=some"], r"model\.activation_checkpointing='some' is not a checkpointing mode.*none, full, selective"),
    (["strategy=fsdp", "trainer.devices=2", "strategy.reduce_dtype=float16"], r"strategy\.reduce_dtype='float16'.*float32, bfloat16"),
    (["strategy=fsdp", "trainer.devices=2", "trainer.precision=bf16-true"], r"trainer\.precision=bf16-true with strategy\.zero_stage=3.*Use trainer\.precision=bf16-mixed"),
    (["+recipe=moe_8x", "strategy=fsdp", "trainer.devices=4", "model.d_model=66", "model.n_heads=1", "model.moe.num_experts=6"],
     r"model\.d_model=66 is not divisible by strategy\.mesh\.dp=4: .* 6 experts per ep rank do not divide evenly.*"
     r"Use a multiple of 4 for model\.d_model or for the experts per ep rank"),
])
def test_bad_zero_config_is_a_config_error(args, message, compose_run):
    from paratrain.trainer.errors import ConfigError
    from paratrain.trainer.validate import validate

    with pytest.raises(ConfigError, match=message):
        validate(compose_run(*args))


def test_shard_optimizer_exits_2_before_spawning(tmp_path):
    run_dir = tmp_path / "run"
    done = train([*TINY, "strategy=ddp", "trainer.devices=2", "strategy.shard_optimizer=true"], run_dir)
    assert done.returncode == 2, done.stderr[-2000:]
    assert re.search(r"strategy\.shard_optimizer=True was removed.*strategy\.zero_stage=1", done.stderr)
    assert "Traceback" not in done.stderr and "Initializing distributed" not in done.stderr + done.stdout


def test_fsdp_option_composes_as_zero3_over_every_rank(compose_run):
    from paratrain.trainer.validate import validate

    cfg = compose_run("strategy=fsdp", "trainer.devices=4")
    assert cfg.strategy.zero_stage == 3 and validate(cfg).as_dict() == {"dp": 4, "ep": 1}
    # 8 experts over dp=4: whole experts per rank (dim 0), so the expert width need not divide by 4.
    validate(compose_run("+recipe=moe_8x", "strategy=fsdp", "trainer.devices=4", "model.d_model=66", "model.n_heads=1"))


# --- 2. activation checkpointing on one process ------------------------------------------------


def saved_activation_bytes(model, x, y) -> tuple[int, dict]:
    """Bytes of the distinct storages autograd keeps from forward for backward; the gradients."""
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_of(model, x, y)
    loss.backward()
    return sum(storages.values()), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_activation_checkpointing_keeps_fewer_activations_and_the_same_gradients():
    """Measured: bytes saved for backward (parameters are saved too; they count in every mode).

    Margins: full <= 60% of none; selective strictly between full and none."""
    from paratrain.strategies.activation_checkpointing import apply_activation_checkpointing

    cfg = OmegaConf.structured(model_cfg())
    cfg.n_layers = 4
    x, y = global_batch(batch=8, seq=64)
    saved, grads = {}, {}
    for mode in ("none", "full", "selective"):
        model = build_model(cfg, SEED)
        apply_activation_checkpointing(model, mode)
        saved[mode], grads[mode] = saved_activation_bytes(model, x, y)
        assert [n for n, _ in model.named_parameters()] == list(grads["none"]), "names must not change"
    assert saved["full"] <= 0.6 * saved["none"], saved
    assert saved["full"] < saved["selective"] < saved["none"], saved
    for mode in ("full", "selective"):
        for name, g in grads[mode].items():
            torch.testing.assert_close(g, grads["none"][name], rtol=1e-5, atol=1e-6, msg=f"{mode} {name}")


# --- 3. gradients and held bytes on gloo -------------------------------------------------------


def zero_grads(rank, world_size, cfg, cases):
    """For each (dp, ep, stage, ac): lay out, one backward of this rank's slice, gather every gradient.
    Also returns the dims FSDP shards the expert stacks on (strategies/fsdp.py: 0 or 1)."""
    from torch.distributed.tensor import DTensor

    from paratrain.strategies.layout import apply_layout
    from paratrain.strategies.mesh import ParallelDims, build_mesh

    from paratrain.trainer.models.moe import GroupedExperts

    out = []
    for dp, ep, stage, ac, *trap in cases:
        dims = ParallelDims(dp=dp, ep=ep, world_size=world_size)
        model = build_model(cfg, SEED, device="meta")
        groups = apply_layout(model, dims, build_mesh(dims, "cpu"), SEED, torch.device("cpu"), zero_stage=stage,
                              activation_checkpointing=ac)
        assert groups == [], "FSDP reduces the gradients: no all-reduce groups"
        for experts in (m for m in model.modules() if isinstance(m, GroupedExperts) and trap):
            experts.set_gradient_divide_factor(float(dp))  # FSDP's default over the dp group: the trap
        x, y = global_batch()
        local = x.shape[0] // world_size
        loss_of(model, x[rank * local:(rank + 1) * local], y[rank * local:(rank + 1) * local]).backward()
        offsets = {n: m.expert_offset for n, m in model.named_modules() if hasattr(m, "expert_offset")}
        grads = {}
        for name, p in model.named_parameters():
            assert isinstance(p, DTensor) and isinstance(p.grad, DTensor), name
            grads[name] = (p.grad.full_tensor(), offsets.get(name.rsplit(".", 1)[0]))  # collective, same order
        out.append((grads, expert_shard_dims(model)))
    return out


def expert_shard_dims(model) -> set:
    from paratrain.trainer.models.moe import GroupedExperts

    return {p.placements[0].dim for m in model.modules() if isinstance(m, GroupedExperts) for p in m.parameters()}


def assert_grads_equal(results, ref, cases, expert_dim=0):
    for rank, per_case in enumerate(results):
        for (dp, ep, stage, ac, *trap), (grads, dims) in zip(cases, per_case):
            assert dims == {expert_dim if dp > 1 else 0}, (dp, ep, dims)
            assert grads.keys() == ref.keys()
            for name, (grad, offset) in grads.items():
                expected = ref[name] if offset is None or ep == 1 else ref[name][offset:offset + grad.shape[0]]
                if trap and offset is not None:
                    expected = expected * ep  # what the test would see had we kept FSDP's / dp
                torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6,
                                           msg=f"rank {rank} dp={dp} ep={ep} ZeRO-{stage} ac={ac}: {name}")


def zero3_checkpoints(rank, world_size, path):
    """Per expert count (4: FSDP shards the stacks on dim 0 over dp=2; 3: on dim 1): one AdamW step
    under ZeRO-3, save; load into a fresh ZeRO-3 layout and into a replicated one (ZeRO-0): every
    parameter and AdamW moment comes back bitwise. Returns the dims and the saved per-expert shapes."""
    from torch.distributed.tensor import DTensor

    from paratrain.strategies.layout import apply_layout
    from paratrain.strategies.mesh import ParallelDims, build_mesh

    dims = ParallelDims(dp=2, ep=1, world_size=world_size)
    mesh = build_mesh(dims, "cpu")

    def whole(t):
        return t.full_tensor() if isinstance(t, DTensor) else t  # collective: same order on every rank

    out = {}
    for num_experts in (4, 3):
        cfg = model_cfg(num_experts=num_experts)

        def laid_out(stage):
            model = build_model(cfg, SEED, device="meta")
            apply_layout(model, dims, mesh, SEED, torch.device("cpu"), zero_stage=stage)
            return model, torch.optim.AdamW(model.parameters(), lr=1e-2)

        model, opt = laid_out(3)
        x, y = global_batch()
        loss_of(model, x[rank * 4:(rank + 1) * 4], y[rank * 4:(rank + 1) * 4]).backward()
        opt.step()
        target = f"{path}/experts{num_experts}"
        ckpt.save(target, {"state_dict": ckpt.model_state(model), "optimizer_states": [ckpt.optimizer_state(model, opt)],
                           "global_step": 1})
        params = {n: whole(p.detach()) for n, p in model.named_parameters()}
        moments = {n: whole(opt.state[p]["exp_avg"]) for n, p in model.named_parameters()}
        for stage in (3, 0):
            fresh, fresh_opt = laid_out(stage)
            ckpt.load(target, fresh, [fresh_opt])
            for n, p in fresh.named_parameters():
                assert torch.equal(whole(p.detach()), params[n]), (num_experts, stage, n)
                assert torch.equal(whole(fresh_opt.state[p]["exp_avg"]), moments[n]), (num_experts, stage, n)
        saved = ckpt.tensor_metadata(target)
        consolidated = ckpt.consolidated_model_state(target) if rank == 0 else params
        out[num_experts] = {
            "dims": expert_shard_dims(model),
            "w1": [tuple(saved[f"layers.0.ffn.experts.w1/expert/{i}"].size) for i in range(num_experts)],
            "exp_avg": tuple(saved["optim/layers.0.ffn.experts.w2/expert/2/exp_avg"].size),
            "consolidated": consolidated.keys() == params.keys() and all(torch.equal(consolidated[k], params[k]) for k in params),
        }
    return out


def test_zero_gradients_on_two_ranks_equal_single_process():
    cfg = model_cfg()
    cases = [(2, 1, 2, "none"), (2, 1, 3, "none"), (2, 1, 3, "full"), (1, 2, 3, "selective"), (1, 2, 2, "none")]
    assert_grads_equal(run_on_ranks(zero_grads, 2, cfg, cases, timeout_s=180), reference_grads(cfg), cases)
    # 3 experts do not divide over dp=2: FSDP shards each stack on dim 1 instead (strategies/fsdp.py).
    cfg, cases = model_cfg(num_experts=3), [(2, 1, 3, "none"), (2, 1, 2, "none")]
    assert_grads_equal(run_on_ranks(zero_grads, 2, cfg, cases, timeout_s=180), reference_grads(cfg), cases, expert_dim=1)


def test_zero3_checkpoints_of_dim0_and_dim1_expert_shards_load_into_any_layout(tmp_path):
    """Both ways FSDP shards an expert stack save the same keys: one whole expert per global index."""
    for rank, out in enumerate(run_on_ranks(zero3_checkpoints, 2, str(tmp_path), timeout_s=180)):
        assert out[4]["dims"] == {0} and out[3]["dims"] == {1}, out
        for n in (4, 3):
            assert out[n]["w1"] == [(32, 16)] * n and out[n]["exp_avg"] == (16, 32) and out[n]["consolidated"], (rank, out)


def test_hybrid_zero3_gradients_with_capacity_equal_single_process():
    """dp=2 x ep=2: dense sharded over 4 ranks, each expert shard over its dp pair, divided by 4, not 2."""
    cfg = model_cfg(capacity_factor=1.25)
    # The last case divides expert gradients by dp, as FSDP does by default: they come out ep = 2x.
    cases = [(2, 2, 3, "none"), (2, 2, 2, "full"), (2, 2, 3, "none", "divide by dp")]
    assert_grads_equal(run_on_ranks(zero_grads, 4, cfg, cases, timeout_s=240), reference_grads(cfg), cases)


def held_memory(rank, world_size, cfg, dp, ep, stages):
    """{stage: bytes of params / grads / AdamW state this rank holds after one step}."""
    from paratrain.strategies.expert_parallel import expert_params
    from paratrain.strategies.grad_sync import GradientSync
    from paratrain.strategies.layout import apply_layout
    from paratrain.strategies.mesh import ParallelDims, build_mesh
    from paratrain.strategies.zero import grad_bytes, rank_memory

    out = {}
    for stage in stages:
        dims = ParallelDims(dp=dp, ep=ep, world_size=world_size)
        model = build_model(cfg, SEED, device="meta")
        groups = apply_layout(model, dims, build_mesh(dims, "cpu"), SEED, torch.device("cpu"), zero_stage=stage)
        sync = GradientSync(groups) if groups else None
        assert (sync is None) == (stage >= 2) and len(expert_params(model)) >= 0
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        tokens = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(rank))
        loss_of(model, tokens[:, :-1], tokens[:, 1:]).backward()
        if sync:
            sync.finish()
        grads = grad_bytes(model)
        optimizer.step()
        out[stage] = rank_memory(model, [optimizer], grads)
    return out


@pytest.mark.parametrize("world_size", [2, 4])
def test_zero3_holds_a_world_size_share_of_ddp_memory(world_size):
    """Dense and moe_8x-sized (8 experts, top-2, d=128, h=256): ZeRO-3 total <= ddp total / N * 1.1."""
    from paratrain.trainer.schema import ModelConfig, MoEConfig

    models = {"dense": OmegaConf.structured(ModelConfig(n_layers=2)),
              "moe_8x": OmegaConf.structured(ModelConfig(n_layers=2, moe=MoEConfig(num_experts=8, top_k=2, expert_ffn_dim=256)))}
    for name, cfg in models.items():
        per_rank = run_on_ranks(held_memory, world_size, cfg, world_size, 1, [0, 3], timeout_s=240)
        for rank, held in enumerate(per_rank):
            ddp, zero3 = sum(held[0].values()), sum(held[3].values())
            assert held[0]["grad_bytes"] >= held[0]["param_bytes"] > 0  # ddp: whole model and its buckets
            assert zero3 <= ddp / world_size * 1.1, (name, rank, held)
            for kind in ("param_bytes", "grad_bytes", "optimizer_state_bytes"):
                assert 0 < held[3][kind] <= held[0][kind] / world_size * 1.1, (name, rank, kind, held)


# --- 4. the real `train` command ---------------------------------------------------------------

DDP2 = ["strategy=ddp", "trainer.devices=2"]
HYBRID = ["strategy=hybrid", "strategy.mesh.dp=2", "strategy.mesh.ep=2", "trainer.devices=4"]
CKPT = [*TINY_MOE, "optimizer.warmup_steps=8", "optimizer.min_lr_ratio=1.0", "strategy.timeout_s=120"]


def run_ok(args, run_dir):
    done = train(args, run_dir, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def final_weights(run_dir):
    return ckpt.consolidated_model_state(sorted((run_dir / "checkpoints").glob("step*"))[-1])


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """Single-process references, run once per module on first use."""
    root, runs = tmp_path_factory.mktemp("single"), {}

    def get(args):
        key = " ".join(args)
        if key not in runs:
            runs[key] = root / f"ref{len(runs)}"
            run_ok(args, runs[key])
        return runs[key]

    return get


@pytest.mark.parametrize("name,base,layout,atol", [
    ("dense-zero2", TINY, [*DDP2, "strategy.zero_stage=2"], 1e-5),
    ("dense-zero3-accum", [*TINY, "trainer.accumulate_grad_batches=2"], ["strategy=fsdp", "trainer.devices=2"], 1e-5),
    ("hybrid-zero3-capacity", [*TINY_MOE, "model.moe.capacity_factor=1.25"], [*HYBRID, "strategy.zero_stage=3"], 1e-4),
])
def test_train_under_zero_reproduces_single(name, base, layout, atol, single, tmp_path):
    """Clipping (trainer.gradient_clip_val=1.0) is on in every run: the global norm across shards.

    MoE on ddp=2 under ZeRO-3 with activation checkpointing: the `ckpt_runs` fixture below."""
    run_dir = tmp_path / name
    done = run_ok([*base, *layout], run_dir)
    ref = single(base)
    assert train_losses(run_dir) == pytest.approx(train_losses(ref), rel=1e-5)
    assert len(train_losses(run_dir)) == 6
    wa, wb = final_weights(run_dir), final_weights(ref)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=atol, msg=key)
    s, r = summary(run_dir), summary(ref)
    stage = s["zero_stage"]
    assert re.search(rf"over {s['world_size']} processes; ZeRO-{stage}", s["layout"]) and s["layout"] in done.stdout + done.stderr
    n = s["world_size"]
    # Sharded over the data ranks (FSDP pads a shard by at most one row). ZeRO-2 keeps parameters
    # gathered after a forward until its backward: after the final validation it holds them whole.
    assert s["param_bytes_per_rank"] <= r["param_bytes_per_rank"] / (n if stage == 3 else 1) * 1.1
    assert s["optimizer_state_bytes_per_rank"] <= r["optimizer_state_bytes_per_rank"] / n * 1.1
    assert 0 < s["grad_bytes_per_rank"] <= r["grad_bytes_per_rank"] / n * 1.1


def test_bf16_mixed_under_zero3_trains_close_to_fp32(single, tmp_path):
    """MixedPrecisionPolicy: bf16 compute, fp32 master shards, fp32 reduce-scatter (strategy.reduce_dtype)."""
    run_dir = tmp_path / "bf16"
    run_ok([*TINY, "strategy=fsdp", "trainer.devices=2", "trainer.precision=bf16-mixed"], run_dir)
    fp32 = train_losses(single(TINY))
    assert train_losses(run_dir) == pytest.approx(fp32, rel=2e-2)
    assert final_weights(run_dir)["model.head.weight"].dtype == torch.float32


# Checkpoints. The schedule depends on the step only (warm-up 8, then constant), so the first 6
# steps of a 12-step run are a 6-step run, and a resumed run follows the straight one.
ZERO3_AC = ["strategy=fsdp", "trainer.devices=2", "model.activation_checkpointing=full"]


@pytest.fixture(scope="module")
def ckpt_runs(tmp_path_factory):
    """12 straight steps on one process; 6 steps of MoE under ZeRO-3 + checkpointing on 2 (never modified)."""
    root = tmp_path_factory.mktemp("zero-ckpt")
    run_ok([*CKPT, "trainer.max_steps=12"], root / "straight")
    run_ok([*CKPT, "trainer.max_steps=6", *ZERO3_AC], root / "zero3")
    return root


def test_moe_zero3_with_checkpointing_reproduces_single(ckpt_runs):
    assert train_losses(ckpt_runs / "zero3") == pytest.approx(train_losses(ckpt_runs / "straight")[:6], rel=1e-5)
    s = summary(ckpt_runs / "zero3")
    assert s["layout"] == "dp=2 x ep=1 over 2 processes; ZeRO-3; 4 experts per rank"


def test_zero3_checkpoint_holds_dtensor_shards_by_name_and_global_expert(ckpt_runs):
    path = ckpt_runs / "zero3" / "checkpoints" / "step000006"
    saved = ckpt.tensor_metadata(path)
    assert saved["model.layers.0.ffn.experts.w1/expert/3"].size == torch.Size([32, 32])
    assert saved["optim/model.layers.0.ffn.experts.w1/expert/3/exp_avg"].size == torch.Size([32, 32])
    assert saved["model.tok_emb.weight"].size == torch.Size([256, 32])
    assert sorted(p.name for p in path.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]  # each rank its shard


def resume(run_dir, steps, layout):
    run_ok([*CKPT, f"trainer.max_steps={steps}", "resume=auto", *layout], run_dir)


def test_zero3_resume_under_the_same_layout_is_bitwise(ckpt_runs, tmp_path):
    import shutil

    straight = tmp_path / "straight-zero3"
    run_ok([*CKPT, "trainer.max_steps=12", *ZERO3_AC], straight)
    run_dir = shutil.copytree(ckpt_runs / "zero3", tmp_path / "run")
    resume(run_dir, 12, ZERO3_AC)
    assert train_losses(run_dir) == train_losses(straight)
    assert final_weights(run_dir).keys() == final_weights(straight).keys()
    for key, tensor in final_weights(run_dir).items():
        assert torch.equal(tensor, final_weights(straight)[key]), key
    assert summary(run_dir)["resumed_from_step"] == 6


@pytest.mark.parametrize("legs", [
    pytest.param([[], [*HYBRID, "strategy.zero_stage=3"]], id="zero3-single-hybrid_zero3"),
    pytest.param([["strategy=expert", "trainer.devices=2"], ["strategy=fsdp", "trainer.devices=2"]], id="zero3-expert-zero3"),
])
def test_zero3_checkpoint_reshards_and_back(legs, ckpt_runs, tmp_path):
    """From the ZeRO-3 checkpoint of step 6 to steps 9 on the first layout, 12 on the second."""
    import shutil

    run_dir = shutil.copytree(ckpt_runs / "zero3", tmp_path / "run")
    for steps, layout in zip((9, 12), legs):
        resume(run_dir, steps, layout)
    assert train_losses(run_dir) == pytest.approx(train_losses(ckpt_runs / "straight"), rel=1e-5)
    assert summary(run_dir)["resumed_from_step"] == 9


def test_export_of_a_zero3_run_is_the_whole_model(ckpt_runs, tmp_path):
    import subprocess
    import sys

    from paratrain.trainer.export import load_exported

    out = tmp_path / "model.safetensors"
    done = subprocess.run([sys.executable, "-m", "paratrain.trainer.export", str(ckpt_runs / "zero3"), str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    model, _ = load_exported(out)
    weights = final_weights(ckpt_runs / "zero3")
    assert model.layers[0].ffn.experts.w1.shape == (4, 32, 32)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, weights["model." + name], rtol=0, atol=0, msg=name)

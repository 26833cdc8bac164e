"""Hugging Face checkpoints both ways (trainer/hf.py): export as Llama/Mixtral, start from them.

Logits are compared as max |a - b| / max |b| <= 1e-5 (fp32; the two implementations differ only in
the order of a few sums and in computing the rotary angles in fp32 vs fp64: ~2e-7 measured).
"""

import json
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from conftest import TINY, TINY_MOE, summary, train, train_losses

transformers = pytest.importorskip("transformers")

from paratrain.trainer import hf, hf_init  # noqa: E402
from paratrain.trainer.errors import ConfigError  # noqa: E402
from paratrain.trainer.schema import RunConfig  # noqa: E402

TOL = 1e-5
# The HF twin of TINY's model: every model.* override in TINY agrees with it.
SHAPE = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0, rms_norm_eps=1e-5)


def rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def save_random_hf(kind: str, path, **extra):
    """A tiny random HF model saved with save_pretrained. Weights are redrawn N(0, 0.2) everywhere (norms too),
    so a tensor loaded into the wrong place, transposed or left at paratrain's init changes the logits."""
    torch.manual_seed({"llama": 0, "mixtral": 1}[kind])
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**SHAPE, **extra}))
    else:
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(
            **{**SHAPE, "num_local_experts": 4, "num_experts_per_tok": 2, **extra}))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    model.eval().save_pretrained(path)
    return model


def paratrain_from(path):
    from paratrain.trainer.models.transformer import build_model

    cfg = OmegaConf.structured(RunConfig)
    cfg.model.init_from = str(path)
    hf_init.fill_model_config(cfg, explicit={})
    model = build_model(cfg.model, seed=0)
    hf_init.load_weights(model, path)
    return model.eval(), cfg


@pytest.mark.parametrize("kind", ["llama", "mixtral"])
def test_init_from_gives_the_hf_models_logits(kind, tmp_path):
    theirs = save_random_hf(kind, tmp_path / kind)
    ours, cfg = paratrain_from(tmp_path / kind)
    assert (cfg.model.moe is None) == (kind == "llama")
    if kind == "mixtral":
        assert (cfg.model.moe.num_experts, cfg.model.moe.top_k, cfg.model.moe.expert_ffn_dim) == (4, 2, 64)
    tokens = torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert rel(ours(tokens), theirs(tokens).logits) <= TOL


def test_init_from_reads_only_the_experts_a_rank_holds(tmp_path):
    save_random_hf("mixtral", tmp_path / "mix")
    full, cfg = paratrain_from(tmp_path / "mix")
    from paratrain.trainer.models.transformer import build_model

    shard = build_model(cfg.model, seed=0)
    for moe in shard.moe_layers():
        moe.experts.keep_experts(2, 2)  # what expert parallelism does on ep rank 1 of 2
    hf_init.load_weights(shard, tmp_path / "mix")
    for name in ("w1", "w2", "w3"):
        assert torch.equal(getattr(shard.layers[1].ffn.experts, name), getattr(full.layers[1].ffn.experts, name)[2:])


def test_transformers_5_fused_expert_layout_loads_too(tmp_path):
    """Mixtral checkpoints written as fused gate_up_proj / down_proj tensors (transformers 5's module layout)."""
    from safetensors.torch import load_file, save_file

    theirs = save_random_hf("mixtral", tmp_path / "mix")
    legacy = load_file(str(tmp_path / "mix" / "model.safetensors"))
    fused = {k.replace(".block_sparse_moe.gate.", ".mlp.gate."): v for k, v in legacy.items() if ".experts." not in k}
    for i in range(2):
        e = f"model.layers.{i}.block_sparse_moe.experts"
        fused[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([legacy[f"{e}.{j}.w1.weight"], legacy[f"{e}.{j}.w3.weight"]]) for j in range(4)])
        fused[f"model.layers.{i}.mlp.experts.down_proj"] = torch.stack([legacy[f"{e}.{j}.w2.weight"] for j in range(4)])
    save_file(fused, str(tmp_path / "mix" / "model.safetensors"))
    ours, _ = paratrain_from(tmp_path / "mix")
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert rel(ours(tokens), theirs(tokens).logits) <= TOL


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny dense and a tiny MoE run, 6 steps each, exported in both formats."""
    root = tmp_path_factory.mktemp("export")
    out = {}
    for kind, args in (("dense", TINY), ("moe", TINY_MOE)):
        done = train(args, root / kind)
        assert done.returncode == 0, done.stderr[-3000:]
        for fmt, target in (("hf", root / f"{kind}-hf"), ("paratrain", root / f"{kind}.safetensors")):
            exported = subprocess.run([sys.executable, "-m", "paratrain.trainer.export", str(root / kind), str(target),
                                       "--format", fmt], capture_output=True, text=True, timeout=120)
            assert exported.returncode == 0, exported.stderr
        out[kind] = root
    return root


@pytest.mark.parametrize("kind,architecture", [("dense", "LlamaForCausalLM"), ("moe", "MixtralForCausalLM")])
def test_export_hf_loads_in_transformers_with_the_same_logits(kind, architecture, trained):
    from paratrain.trainer.export import load_exported

    ours, _ = load_exported(trained / f"{kind}.safetensors")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(trained / f"{kind}-hf").eval()
    assert type(theirs).__name__ == architecture
    assert json.loads((trained / f"{kind}-hf" / "config.json").read_text())["architectures"] == [architecture]
    tokens = torch.randint(0, 256, (3, 48), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert rel(theirs(tokens).logits, ours.eval()(tokens)) <= TOL
    assert (trained / f"{kind}-hf" / "model.safetensors").stat().st_mode & 0o777 == 0o644
    assert (trained / f"{kind}.safetensors").stat().st_mode & 0o777 == 0o644
    # ... and back: init_from the export reproduces the exported model.
    again, _ = paratrain_from(trained / f"{kind}-hf")
    with torch.no_grad():
        assert rel(again(tokens), ours(tokens)) <= TOL


def test_init_from_mixtral_trains_identically_under_expert_and_hybrid(tmp_path):
    """Single, expert 2 and hybrid 2x2 from the same HF Mixtral: the same losses (1e-5 rel), and the first
    step's loss is the HF model's own cross-entropy on that global batch (the weights really were loaded)."""
    from paratrain.trainer.data import batch_offsets, load_tokens, sequences, token_files
    from paratrain.trainer.schema import DataConfig

    theirs = save_random_hf("mixtral", tmp_path / "mix")
    base = [*TINY, f"model.init_from={tmp_path / 'mix'}"]
    losses = {}
    for name, layout in {"single": [], "expert2": ["strategy=expert", "trainer.devices=2"],
                         "hybrid2x2": ["strategy=hybrid", "strategy.mesh.dp=2", "strategy.mesh.ep=2", "trainer.devices=4"]}.items():
        done = train([*base, *layout], tmp_path / name)
        assert done.returncode == 0, done.stderr[-3000:]
        losses[name] = train_losses(tmp_path / name)
        assert summary(tmp_path / name)["params_total"] == sum(p.numel() for p in theirs.parameters())
    assert len(losses["single"]) == 6 and losses["single"][-1] < losses["single"][0]
    assert losses["expert2"] == pytest.approx(losses["single"], rel=TOL)
    assert losses["hybrid2x2"] == pytest.approx(losses["single"], rel=TOL)

    data = OmegaConf.structured(DataConfig(batch_size=8, seq_len=32))
    tokens = load_tokens(token_files(data)[0])
    inputs, targets = sequences(tokens, batch_offsets(len(tokens), 32, 8, 1234, 0), 32)
    with torch.no_grad():
        expected = F.cross_entropy(theirs(inputs).logits.flatten(0, 1), targets.flatten()).item()
    assert losses["single"][0] == pytest.approx(expected, rel=TOL)


def test_options_without_an_hf_counterpart_are_named():
    from paratrain.trainer.schema import MoEConfig

    moe = OmegaConf.structured(RunConfig).model
    moe.moe = OmegaConf.structured(MoEConfig(num_experts=4, top_k=2))
    assert hf.to_hf_config(moe)["model_type"] == "mixtral"
    for key, value in (("capacity_factor", 1.25), ("num_shared_experts", 1), ("router_score", "sigmoid"),
                       ("every_n_layers", 2), ("renormalize", False)):
        cfg = moe.copy()
        cfg.moe[key] = value
        with pytest.raises(ConfigError, match=rf"model\.moe\.{key}={value}.*Mixtral"):
            hf.to_hf_config(cfg)


@pytest.mark.parametrize("extra,match", [
    ({"num_key_value_heads": 1}, r"num_key_value_heads=1.*grouped-query"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, r"rope_scaling='linear'"),
])
def test_hf_options_paratrain_cannot_reproduce_are_refused(extra, match, tmp_path):
    config = {**SHAPE, "model_type": "llama", **extra}
    with pytest.raises(ConfigError, match=match):
        hf.model_config_from_hf(config, str(tmp_path))


def test_bad_init_from_is_a_config_error(tmp_path):
    save_random_hf("llama", tmp_path / "llama")
    (tmp_path / "empty").mkdir()
    (tmp_path / "gqa").mkdir()
    (tmp_path / "gqa" / "config.json").write_text(json.dumps({**SHAPE, "model_type": "llama", "num_key_value_heads": 1}))
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (tmp_path / "nocheckpoint").mkdir()
    (tmp_path / "nocheckpoint" / "config.json").write_text((tmp_path / "llama" / "config.json").read_text())
    (tmp_path / "wrongshape").mkdir()
    (tmp_path / "wrongshape" / "model.safetensors").write_bytes((tmp_path / "llama" / "model.safetensors").read_bytes())
    (tmp_path / "wrongshape" / "config.json").write_text(json.dumps(
        {**json.loads((tmp_path / "llama" / "config.json").read_text()), "intermediate_size": 80}))
    cases = [
        ("missing", {}, r"model\.init_from=.*missing.* is not a directory"),
        ("empty", {}, r"has no config\.json: it is not a Hugging Face model directory"),
        ("gqa", {}, r"num_key_value_heads=1.*grouped-query"),
        ("bert", {}, r"holds a 'bert' model.*llama, mixtral"),
        ("nocheckpoint", {}, r"has no safetensors weights"),
        ("wrongshape", {}, r"mlp\.gate_proj\.weight has shape \[64, 32\], but its config\.json implies \[80, 32\]"),
        ("llama", {"model.n_layers": "3"}, r"model\.n_layers=3 conflicts with model\.init_from=.*num_hidden_layers=2"),
    ]
    for name, explicit, match in cases:
        cfg = OmegaConf.structured(RunConfig)
        cfg.model.init_from = str(tmp_path / name)
        if explicit:
            cfg.model.n_layers = 3
        with pytest.raises(ConfigError, match=match):
            hf_init.fill_model_config(cfg, explicit)


def test_bad_init_from_exits_2_before_spawning(tmp_path):
    save_random_hf("llama", tmp_path / "llama")
    cases = [
        ([f"model.init_from={tmp_path / 'missing'}"], r"model\.init_from=.*missing.* is not a directory"),
        # The override comes from the command line: Hydra's task overrides are what counts as explicit.
        ([f"model.init_from={tmp_path / 'llama'}", "model.d_model=64"],
         r"model\.d_model=64 conflicts with model\.init_from=.*hidden_size=32"),
    ]
    for i, (args, match) in enumerate(cases):
        run_dir = tmp_path / f"run{i}"
        # Two processes asked for: the error must come before Lightning starts the second one.
        done = train([*TINY, "strategy=ddp", "trainer.devices=2", *args], run_dir, timeout=120)
        assert done.returncode == 2, (args, done.stderr[-2000:])
        assert "Traceback" not in done.stderr and "Initializing distributed" not in done.stderr
        assert re.search(match, done.stderr), (match, done.stderr[-2000:])
        assert not (run_dir / "metrics.csv").exists()

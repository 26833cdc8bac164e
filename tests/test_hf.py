"""Hugging Face checkpoints both ways (trainer/hf.py): export as Llama/Mixtral/Qwen2-MoE, start from Llama/Mixtral.

Logits are compared as max |a - b| / max |b| <= 1e-5 (fp32; the two implementations differ only in
the order of a few sums and in computing the rotary angles in fp32 vs fp64: ~2e-7 measured).
"""

import json
import re
from pathlib import Path

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


@torch.no_grad()
def redraw(model, seed: int):
    """Every weight N(0, 0.2), norms too: a tensor loaded into the wrong place, transposed or left at its
    initial value changes the logits."""
    torch.manual_seed(seed)
    for p in model.parameters():
        p.normal_(0, 0.2)
    return model


def save_random_hf(kind: str, path, **extra):
    """A tiny random HF model saved with save_pretrained."""
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**SHAPE, **extra}))
    else:
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(
            **{**SHAPE, "num_local_experts": 4, "num_experts_per_tok": 2, **extra}))
    redraw(model, {"llama": 0, "mixtral": 1}[kind]).eval().save_pretrained(path)
    return model


def tiny_model_config(**moe):
    """TINY's model (MoE with TINY_MOE's experts when `moe` options are given) as a config, no run needed."""
    from paratrain.trainer.schema import MoEConfig

    cfg = OmegaConf.structured(RunConfig)
    cfg.model.merge_with({"d_model": 32, "n_layers": 2, "n_heads": 2, "ffn_dim": 64})
    if moe:
        cfg.model.moe = OmegaConf.structured(MoEConfig(num_experts=4, top_k=2, expert_ffn_dim=32))
        cfg.model.moe.merge_with(moe)
    return cfg


def paratrain_from(path, **overrides):
    """The paratrain model init_from `path` builds, with `overrides` ({"model.key": value}) given explicitly."""
    from paratrain.trainer.models.transformer import build_model

    cfg = OmegaConf.structured(RunConfig)
    cfg.model.init_from = str(path)
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value)
    hf_init.fill_model_config(cfg, explicit={k: str(v).lower() for k, v in overrides.items()})
    model = build_model(cfg.model, seed=0)
    hf_init.load_weights(model, path)
    return model.eval(), cfg


def assert_transformers_loads(out_dir, ours, architecture: str, seq_len: int = 48):
    """out_dir loads with AutoModelForCausalLM, every tensor used (none missing, unexpected or reshaped),
    as `architecture`, and gives `ours`'s logits. Returns the HF model."""
    theirs, info = transformers.AutoModelForCausalLM.from_pretrained(out_dir, output_loading_info=True)
    assert type(theirs).__name__ == architecture
    assert json.loads((Path(out_dir) / "config.json").read_text())["architectures"] == [architecture]
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    tokens = torch.randint(0, 256, (3, seq_len), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert rel(theirs.eval()(tokens).logits, ours.eval()(tokens)) <= TOL
    return theirs


@pytest.mark.parametrize("kind,extra,overrides", [
    ("llama", {}, {}), ("mixtral", {}, {}),
    ("llama", {"num_key_value_heads": 1}, {}),  # grouped-query attention
    ("llama", {"num_key_value_heads": 1, "tie_word_embeddings": True}, {}),
    ("mixtral", {"num_key_value_heads": 1, "tie_word_embeddings": True}, {}),
    # Untying is the run's choice (e.g. for tensor parallelism): the head starts as a copy of the embedding.
    ("llama", {"tie_word_embeddings": True}, {"model.tie_embeddings": False}),
], ids=["llama", "mixtral", "llama-gqa", "llama-gqa-tied", "mixtral-gqa-tied", "llama-tied-untied"])
def test_init_from_gives_the_hf_models_logits(kind, extra, overrides, tmp_path):
    theirs = save_random_hf(kind, tmp_path / kind, **extra)
    ours, cfg = paratrain_from(tmp_path / kind, **overrides)
    assert (cfg.model.moe is None) == (kind == "llama")
    assert cfg.model.n_kv_heads == extra.get("num_key_value_heads")  # null: one per query head
    tied = overrides.get("model.tie_embeddings", extra.get("tie_word_embeddings", False))
    assert cfg.model.tie_embeddings == tied and (ours.head.weight is ours.tok_emb.weight) == tied
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


RUNS = {
    "dense": TINY,
    "moe": TINY_MOE,
    "gqa_tied": [*TINY, "model.n_kv_heads=1", "model.tie_embeddings=true"],
    # Qwen2-MoE: gated shared expert (its own width), layer 0 dense (mlp_only_layers), no renormalisation, GQA.
    "qwen2_moe": [*TINY_MOE, "model.moe.num_shared_experts=1", "model.moe.shared_expert_gate=true",
                  "model.moe.shared_expert_ffn_dim=48", "model.moe.first_dense_layers=1", "model.moe.renormalize=false",
                  "model.n_kv_heads=1"],
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Tiny runs of RUNS, 6 steps each, exported in both formats by paratrain-export's main, in this
    process (the console script as a subprocess is tested in test_checkpoint and test_new_user)."""
    from paratrain.trainer import export

    root = tmp_path_factory.mktemp("export")
    for kind, args in RUNS.items():
        done = train(args, root / kind)
        assert done.returncode == 0, done.stderr[-3000:]
        for fmt, target in (("hf", root / f"{kind}-hf"), ("paratrain", root / f"{kind}.safetensors")):
            export.main([str(root / kind), str(target), "--format", fmt])
    return root


@pytest.mark.parametrize("kind,architecture", [("dense", "LlamaForCausalLM"), ("moe", "MixtralForCausalLM"),
                                               ("gqa_tied", "LlamaForCausalLM"), ("qwen2_moe", "Qwen2MoeForCausalLM")])
def test_export_hf_loads_in_transformers_with_the_same_logits(kind, architecture, trained):
    from safetensors import safe_open

    from paratrain.trainer.export import load_exported

    ours, cfg = load_exported(trained / f"{kind}.safetensors")
    theirs = assert_transformers_loads(trained / f"{kind}-hf", ours, architecture)
    config = json.loads((trained / f"{kind}-hf" / "config.json").read_text())
    assert config["num_key_value_heads"] == (cfg.n_kv_heads or cfg.n_heads)
    with safe_open(str(trained / f"{kind}-hf" / "model.safetensors"), framework="pt") as f:
        # A tied head is the embedding: written once, tied again by transformers.
        assert ("lm_head.weight" in f.keys()) == (not cfg.tie_embeddings)
    assert (theirs.lm_head.weight is theirs.model.embed_tokens.weight) == cfg.tie_embeddings
    if kind == "qwen2_moe":
        assert (config["mlp_only_layers"], config["norm_topk_prob"], config["qkv_bias"]) == ([0], False, False)
        assert config["shared_expert_intermediate_size"] == 48 and config["moe_intermediate_size"] == 32
    assert (trained / f"{kind}-hf" / "model.safetensors").stat().st_mode & 0o777 == 0o644
    assert (trained / f"{kind}.safetensors").stat().st_mode & 0o777 == 0o644
    if config["model_type"] in hf.INIT_FROM_TYPES:
        # ... and back: init_from the export reproduces the exported model.
        again, _ = paratrain_from(trained / f"{kind}-hf")
        tokens = torch.randint(0, 256, (3, 48), generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            assert rel(again(tokens), ours(tokens)) <= TOL


def test_qwen2_moe_export_places_sparse_and_dense_layers_as_paratrain(tmp_path):
    """decoder_sparse_step and mlp_only_layers together: 4 layers, every_n_layers=2, first_dense_layers=2 ->
    only layer 3 is sparse (layer 1 is dense only through mlp_only_layers). No training: a redrawn model."""
    from paratrain.trainer.models.transformer import build_model, is_moe_layer

    cfg = tiny_model_config(num_shared_experts=2, shared_expert_gate=True, every_n_layers=2, first_dense_layers=2)
    cfg.model.n_layers = 4
    assert [is_moe_layer(cfg.model, i) for i in range(4)] == [False, False, False, True]
    ours = redraw(build_model(cfg.model, seed=0), 3)
    hf.save_hf(ours.state_dict(), cfg.model, tmp_path / "qwen")
    theirs = assert_transformers_loads(tmp_path / "qwen", ours, "Qwen2MoeForCausalLM", seq_len=24)
    assert [type(layer.mlp).__name__ for layer in theirs.model.layers] == ["Qwen2MoeMLP"] * 3 + ["Qwen2MoeSparseMoeBlock"]
    assert theirs.config.shared_expert_intermediate_size == 2 * 32  # num_shared_experts x expert_ffn_dim, fused


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
    cfg = tiny_model_config(num_experts=4)
    assert hf.to_hf_config(cfg.model)["model_type"] == "mixtral"
    # Training-only options change nothing the exported model computes.
    cfg.model.activation_checkpointing, cfg.model.moe.router_jitter = "full", 0.1
    assert hf.to_hf_config(cfg.model)["model_type"] == "mixtral"
    for key, value, arch in (("capacity_factor", 1.25, "Mixtral"), ("num_shared_experts", 1, "Mixtral.*Qwen2-MoE"),
                             ("every_n_layers", 2, "Mixtral.*decoder_sparse_step"),
                             ("first_dense_layers", 1, "Mixtral.*mlp_only_layers"), ("renormalize", False, "Mixtral")):
        with pytest.raises(ConfigError, match=rf"model\.moe\.{key}={value} has no counterpart in Hugging Face {arch}"):
            hf.to_hf_config(tiny_model_config(**{key: value}).model)
    qwen = tiny_model_config(num_shared_experts=1, shared_expert_gate=True, capacity_factor=1.25)
    with pytest.raises(ConfigError, match=r"model\.moe\.capacity_factor=1\.25 has no counterpart in Hugging Face Qwen2-MoE"):
        hf.to_hf_config(qwen.model)


@pytest.mark.parametrize("options", [{"balance_bias_rate": 0.01}, {"n_groups": 2}, {"n_groups": 2, "topk_groups": 2},
                                     {"route_scale": 2.5}, {"router_score": "sigmoid"}],
                         ids=["balance_bias_rate", "n_groups", "topk_groups", "route_scale", "router_score"])
def test_deepseek_v3_router_options_exit_2_naming_the_option_and_mla(options, tmp_path, capsys):
    """A real (untrained) checkpoint with the option: paratrain-export --format hf exits 2 before writing."""
    from paratrain.strategies import portable_state as ckpt
    from paratrain.trainer import export
    from paratrain.trainer.models.transformer import build_model

    cfg = tiny_model_config(**options)
    model = build_model(cfg.model, seed=0)
    state = {f"model.{k}": v for k, v in ckpt.model_state(model).items()}
    ckpt.save(tmp_path / "ckpt", {"state_dict": state, "global_step": 0,
                                  "paratrain": {"config": OmegaConf.to_container(cfg, resolve=True)}})
    with pytest.raises(SystemExit) as exited:
        export.main([str(tmp_path / "ckpt"), str(tmp_path / "hf"), "--format", "hf"])
    assert exited.value.code == 2
    message = capsys.readouterr().err.strip()
    key = list(options)[-1]
    assert re.fullmatch(rf"Error: model\.moe\.{key}={options[key]} is a DeepSeek-V3 router option .*multi-head latent "
                        rf"attention \(MLA.*train with model\.moe\.{key}=\S+\.", message), message
    assert "\n" not in message and not (tmp_path / "hf").exists()


@pytest.mark.parametrize("extra,match", [
    ({"num_key_value_heads": 3}, r"num_key_value_heads=3.*whole group of the 2 query heads"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, r"rope_scaling\.rope_type='linear'.*no RoPE scaling"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, r"rope_scaling\.type='dynamic'"),  # transformers 4.x
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, r"rope_parameters\.rope_type='yarn'"),
])
def test_hf_options_paratrain_cannot_reproduce_are_refused(extra, match, tmp_path):
    config = {**SHAPE, "model_type": "llama", **extra}
    with pytest.raises(ConfigError, match=match):
        hf.model_config_from_hf(config, str(tmp_path))


def test_bad_init_from_is_a_config_error(tmp_path):
    save_random_hf("llama", tmp_path / "llama")
    (tmp_path / "empty").mkdir()
    save_random_hf("llama", tmp_path / "gqa", num_key_value_heads=1)
    (tmp_path / "yarn").mkdir()
    (tmp_path / "yarn" / "config.json").write_text(json.dumps(
        {**SHAPE, "model_type": "llama", "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}))
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
        ("yarn", {}, r"rope_parameters\.rope_type='yarn'"),
        ("gqa", {"model.n_kv_heads": "2"}, r"model\.n_kv_heads=2 conflicts with model\.init_from=.*num_key_value_heads=1"),
        ("bert", {}, r"holds a 'bert' model.*llama, mixtral"),
        ("nocheckpoint", {}, r"has no safetensors weights"),
        ("wrongshape", {}, r"mlp\.gate_proj\.weight has shape \[64, 32\], but its config\.json implies \[80, 32\]"),
        ("llama", {"model.n_layers": "3"}, r"model\.n_layers=3 conflicts with model\.init_from=.*num_hidden_layers=2"),
    ]
    for name, explicit, match in cases:
        cfg = OmegaConf.structured(RunConfig)
        cfg.model.init_from = str(tmp_path / name)
        for key, value in explicit.items():
            OmegaConf.update(cfg, key, int(value))
        with pytest.raises(ConfigError, match=match):
            hf_init.fill_model_config(cfg, explicit)
    # n_kv_heads = n_heads is what a checkpoint without GQA means: no conflict.
    cfg = OmegaConf.structured(RunConfig)
    cfg.model.init_from, cfg.model.n_kv_heads = str(tmp_path / "llama"), 2
    hf_init.fill_model_config(cfg, {"model.n_kv_heads": "2"})
    assert cfg.model.n_kv_heads is None


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

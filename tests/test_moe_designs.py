"""The routing and attention designs of issue 15 against Hugging Face transformers' own modules.

Each reference is built from a tiny random config (nothing is downloaded), its weights are copied
into ours, and outputs and gradients (inputs and every weight) must agree to 1e-5 relative
(||ours - theirs|| / ||theirs||, fp32). Also: the options' config rules, and the bias update rule.
"""

import pytest
import torch
from omegaconf import OmegaConf

from paratrain.trainer.errors import ConfigError
from paratrain.trainer.models.moe import MoE, update_expert_bias
from paratrain.trainer.models.transformer import build_model, count_params
from paratrain.trainer.schema import ModelConfig, MoEConfig
from paratrain.trainer.validate import validate_model

REL = 1e-5


def rel_err(ours, theirs) -> float:
    return ((ours - theirs).norm() / theirs.norm().clamp_min(1e-30)).item()


def copy_experts(ours: MoE, gate_up: torch.Tensor, down: torch.Tensor) -> None:
    """HF stacks experts as gate_up_proj (E, 2h, d) [gate; up] and down_proj (E, d, h); ours (E, d, h) x2, (E, h, d)."""
    h = ours.experts.hidden_dim
    with torch.no_grad():
        ours.experts.w1.copy_(gate_up[:, :h, :].transpose(1, 2))
        ours.experts.w3.copy_(gate_up[:, h:, :].transpose(1, 2))
        ours.experts.w2.copy_(down.transpose(1, 2))


def copy_mlp(ours, hf_mlp) -> None:
    with torch.no_grad():
        ours.w1.weight.copy_(hf_mlp.gate_proj.weight)
        ours.w3.weight.copy_(hf_mlp.up_proj.weight)
        ours.w2.weight.copy_(hf_mlp.down_proj.weight)


def compare_forward_backward(ours, theirs, x, pairs):
    """Run both on x (B, T, d), backprop the same random cotangent; check outputs and gradients."""
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = ours(x1), theirs(x2)
    y2 = y2[0] if isinstance(y2, tuple) else y2
    assert rel_err(y1, y2) < REL
    cot = torch.randn_like(y2)
    (y1 * cot).sum().backward()
    (y2 * cot).sum().backward()
    assert rel_err(x1.grad, x2.grad) < REL
    for name, g_ours, g_theirs in pairs():
        assert g_theirs is not None and g_ours is not None, name
        assert rel_err(g_ours, g_theirs) < REL, (name, rel_err(g_ours, g_theirs))


def test_deepseek_v3_bias_route_scale_and_group_routing_match_hf():
    tf = pytest.importorskip("transformers", minversion="5.0")  # experts stacked as gate_up_proj (v5)
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    torch.manual_seed(0)
    d, h, e = 32, 16, 16
    cfg = tf.DeepseekV3Config(hidden_size=d, moe_intermediate_size=h, n_routed_experts=e, num_experts_per_tok=4,
                              n_group=4, topk_group=2, routed_scaling_factor=2.5, n_shared_experts=2,
                              norm_topk_prob=True, hidden_act="silu")
    ref = DeepseekV3MoE(cfg).float()
    with torch.no_grad():
        ref.gate.weight.normal_(0, 0.3)
        ref.gate.e_score_correction_bias.copy_(torch.randn(e) * 0.1)  # a bias that changes the choice
        ref.experts.gate_up_proj.normal_(0, 0.1)
        ref.experts.down_proj.normal_(0, 0.1)
        for p in ref.shared_experts.parameters():
            p.normal_(0, 0.1)
    ours = MoE(d, e, 4, h, num_shared_experts=2, router_score="sigmoid", renormalize=True, route_scale=2.5,
               n_groups=4, topk_groups=2, balance_bias_rate=1e-3)
    with torch.no_grad():
        ours.router.gate.weight.copy_(ref.gate.weight)
        ours.router.expert_bias.copy_(ref.gate.e_score_correction_bias)
    copy_experts(ours, ref.experts.gate_up_proj, ref.experts.down_proj)
    copy_mlp(ours.shared, ref.shared_experts)

    x = torch.randn(2, 24, d)
    # The bias and the groups must matter here, or the test would not test them.
    with torch.no_grad():
        scores = torch.sigmoid(x.view(-1, d) @ ref.gate.weight.T)
        plain = scores.topk(4, dim=-1).indices.sort(-1).values
        chosen = ours.router(x.view(-1, d))[3].sort(-1).values
    assert (plain != chosen).any(dim=-1).float().mean() > 0.2

    def grads():
        g = ref.experts.gate_up_proj.grad
        yield "router", ours.router.gate.weight.grad, ref.gate.weight.grad
        yield "w1", ours.experts.w1.grad, g[:, :h, :].transpose(1, 2)
        yield "w3", ours.experts.w3.grad, g[:, h:, :].transpose(1, 2)
        yield "w2", ours.experts.w2.grad, ref.experts.down_proj.grad.transpose(1, 2)
        yield "shared.w1", ours.shared.w1.weight.grad, ref.shared_experts.gate_proj.weight.grad
        yield "shared.w2", ours.shared.w2.weight.grad, ref.shared_experts.down_proj.weight.grad

    compare_forward_backward(ours, ref, x, grads)


def test_qwen2_moe_shared_expert_gate_and_width_match_hf():
    tf = pytest.importorskip("transformers", minversion="5.0")  # experts stacked as gate_up_proj (v5)
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    torch.manual_seed(1)
    d, h, e, shared = 32, 8, 8, 40
    cfg = tf.Qwen2MoeConfig(hidden_size=d, moe_intermediate_size=h, num_experts=e, num_experts_per_tok=2,
                            shared_expert_intermediate_size=shared, norm_topk_prob=False, hidden_act="silu")
    ref = Qwen2MoeSparseMoeBlock(cfg).float()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.2)
    ours = MoE(d, e, 2, h, num_shared_experts=1, renormalize=False, shared_expert_ffn_dim=shared,
               shared_expert_gate=True)
    assert ours.shared.w1.weight.shape == (shared, d)
    with torch.no_grad():
        ours.router.gate.weight.copy_(ref.gate.weight)
        ours.shared_gate.weight.copy_(ref.shared_expert_gate.weight)
    copy_experts(ours, ref.experts.gate_up_proj, ref.experts.down_proj)
    copy_mlp(ours.shared, ref.shared_expert)

    def grads():
        yield "router", ours.router.gate.weight.grad, ref.gate.weight.grad
        yield "shared_gate", ours.shared_gate.weight.grad, ref.shared_expert_gate.weight.grad
        yield "shared.w3", ours.shared.w3.weight.grad, ref.shared_expert.up_proj.weight.grad
        yield "w2", ours.experts.w2.grad, ref.experts.down_proj.grad.transpose(1, 2)

    compare_forward_backward(ours, ref, torch.randn(2, 16, d), grads)


@pytest.mark.parametrize("n_kv_heads,tied", [(2, True), (1, False), (4, True)])
def test_gqa_and_tied_embeddings_match_hf_llama(n_kv_heads, tied):
    tf = pytest.importorskip("transformers", minversion="5.0")  # experts stacked as gate_up_proj (v5)

    torch.manual_seed(2)
    d, heads, layers, ffn, vocab = 32, 4, 2, 64, 256
    hf_cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=ffn, num_hidden_layers=layers,
                            num_attention_heads=heads, num_key_value_heads=n_kv_heads, rms_norm_eps=1e-5,
                            rope_theta=10000.0, max_position_embeddings=64, tie_word_embeddings=tied,
                            attention_bias=False, mlp_bias=False, hidden_act="silu")
    hf_cfg._attn_implementation = "eager"
    ref = tf.LlamaForCausalLM(hf_cfg).float()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.1) if p.dim() > 1 else p.uniform_(0.8, 1.2)
    cfg = OmegaConf.structured(ModelConfig(vocab_size=vocab, d_model=d, n_layers=layers, n_heads=heads, ffn_dim=ffn,
                                           n_kv_heads=n_kv_heads, tie_embeddings=tied))
    ours = build_model(cfg, seed=0)
    assert (ours.head.weight is ours.tok_emb.weight) == tied
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    assert count_params(ours, cfg)["params_total"] == sum(p.numel() for p in ref.parameters())
    hf = ref.model
    pairs = [(ours.tok_emb.weight, hf.embed_tokens.weight), (ours.norm.weight, hf.norm.weight)]
    if not tied:
        pairs.append((ours.head.weight, ref.lm_head.weight))
    for ob, hb in zip(ours.layers, hf.layers):
        a, m = hb.self_attn, hb.mlp
        pairs += [(ob.attn_norm.weight, hb.input_layernorm.weight), (ob.ffn_norm.weight, hb.post_attention_layernorm.weight),
                  (ob.attn.wq.weight, a.q_proj.weight), (ob.attn.wk.weight, a.k_proj.weight),
                  (ob.attn.wv.weight, a.v_proj.weight), (ob.attn.wo.weight, a.o_proj.weight),
                  (ob.ffn.w1.weight, m.gate_proj.weight), (ob.ffn.w3.weight, m.up_proj.weight),
                  (ob.ffn.w2.weight, m.down_proj.weight)]
    with torch.no_grad():
        for o, r in pairs:
            o.copy_(r)

    tokens = torch.randint(0, vocab, (2, 20))
    logits_ours = ours(tokens)
    logits_ref = ref(tokens).logits
    assert rel_err(logits_ours, logits_ref) < REL
    cot = torch.randn_like(logits_ref)
    (logits_ours * cot).sum().backward()
    (logits_ref * cot).sum().backward()
    for o, r in pairs:
        assert rel_err(o.grad, r.grad) < REL, rel_err(o.grad, r.grad)


def _filled(moe: MoE) -> MoE:
    """A bare MoE's expert stacks are allocated, not initialised (materialize does that for a model):
    fill every parameter from the seeded generator, or the outputs are whatever the memory held."""
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return moe


def test_default_options_leave_the_router_unchanged():
    """route_scale=1, no groups, no bias, no jitter: the plain top-k path, bitwise."""
    torch.manual_seed(3)
    plain = _filled(MoE(16, 8, 2, 8))
    explicit = MoE(16, 8, 2, 8, route_scale=1.0, n_groups=1, topk_groups=1, balance_bias_rate=0.0, router_jitter=0.0)
    explicit.load_state_dict(plain.state_dict())
    x = torch.randn(2, 8, 16)
    assert torch.equal(plain(x), explicit(x))
    assert "router.expert_bias" not in plain.state_dict()


def test_router_jitter_only_in_training():
    torch.manual_seed(4)
    moe = _filled(MoE(16, 8, 2, 8, router_jitter=0.5))
    x = torch.randn(2, 8, 16)
    moe.eval()
    assert torch.equal(moe(x), moe(x))
    moe.train()
    assert not torch.equal(moe(x), moe(x))


def test_bias_update_rule_and_routed_load():
    bias = torch.zeros(4)
    update_expert_bias(bias, torch.tensor([10.0, 0.0, 5.0, 5.0]), 0.01)
    assert bias.tolist() == pytest.approx([-0.01, 0.01, 0.0, 0.0])
    moe = _filled(MoE(16, 4, 2, 8, balance_bias_rate=0.1, capacity_factor=0.5))
    x = torch.randn(3, 8, 16)
    moe(x)
    moe(x)
    assert moe.routed_load.sum().item() == 2 * 3 * 8 * 2  # choices before capacity drops, 2 forwards
    moe.eval()
    moe(x)
    assert moe.routed_load.sum().item() == 2 * 3 * 8 * 2  # validation does not count
    moe.update_expert_bias(moe.routed_load)
    assert moe.routed_load is None and moe.router.expert_bias.abs().sum() > 0


def _model(**moe_over):
    moe = OmegaConf.structured(MoEConfig(num_experts=8, top_k=2))
    cfg = OmegaConf.structured(ModelConfig())
    cfg.moe = moe
    for k, v in moe_over.items():
        if k in ("n_kv_heads", "tie_embeddings"):
            cfg[k] = v
        else:
            cfg.moe[k] = v
    return cfg


@pytest.mark.parametrize("over,pattern", [
    ({"n_kv_heads": 3}, r"model\.n_kv_heads=3 must divide model\.n_heads=4"),
    ({"n_groups": 3}, r"model\.moe\.n_groups=3 must divide model\.moe\.num_experts=8"),
    ({"n_groups": 4, "topk_groups": 5}, r"model\.moe\.topk_groups=5 must be between 1 and model\.moe\.n_groups=4"),
    ({"n_groups": 4, "topk_groups": 1, "top_k": 3}, r"model\.moe\.top_k=3 exceeds the 2 experts"),
    ({"balance_bias_rate": -1.0}, r"model\.moe\.balance_bias_rate=-1\.0 must not be negative"),
    ({"route_scale": 0.0}, r"model\.moe\.route_scale=0\.0 must be positive"),
    ({"router_jitter": 1.5}, r"model\.moe\.router_jitter=1\.5 must be in \[0, 1\)"),
    ({"shared_expert_gate": True}, r"model\.moe\.shared_expert_gate=True .*num_shared_experts=0"),
])
def test_routing_option_rules(over, pattern):
    with pytest.raises(ConfigError, match=pattern):
        validate_model(_model(**over))


# --- auxiliary-loss-free balancing: it balances, and every layout makes the same update -------------

def _skewed_moe_8x_run(rate: float, steps: int = 100, batch: int = 8, seq: int = 64, skew: float = 1.0) -> list:
    """moe_8x (no balancing loss, no z-loss) on the embedded corpus's bytes, its routers pushed
    towards experts 0 and 1 along the mean direction of their inputs; max/mean expert load per step
    (mean over layers). The bias moves exactly as in training: MoE.update_expert_bias after each step."""
    import torch.nn.functional as F
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from paratrain.trainer.data import corpus_files
    from paratrain.trainer.module import build_optimizer
    from paratrain.trainer.recipes import register_recipes
    from paratrain.trainer.schema import register_configs

    register_configs()
    register_recipes()
    GlobalHydra.instance().clear()
    with initialize_config_module("paratrain.conf", version_base="1.3"):
        cfg = compose("config", overrides=["+recipe=moe_8x", f"model.moe.balance_bias_rate={rate}",
                                           "model.moe.load_balancing_loss_weight=0", "model.moe.z_loss_weight=0"])
    GlobalHydra.instance().clear()
    # The embedded corpus (this Python's standard library), not this repository's source: data that
    # changes with every commit moved the measured loads by 0.1x of the start between commits.
    _, files = corpus_files("stdlib")
    text = b"".join(p.read_bytes() for p in files[:200])
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    g = torch.Generator().manual_seed(0)

    def next_batch():
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=g)
        x = torch.stack([data[s : s + seq + 1] for s in starts.tolist()])
        return x[:, :-1], x[:, 1:]

    model = build_model(cfg.model, cfg.seed)
    optimizer = build_optimizer(cfg.optimizer, model.named_parameters())
    inputs = {}
    hooks = [m.router.register_forward_hook(lambda mod, a, out, m=m: inputs.__setitem__(m, a[0].detach()))
             for m in model.moe_layers()]
    with torch.no_grad():
        model(next_batch()[0])
        for m in model.moe_layers():
            mean = inputs[m].mean(0)
            m.router.gate.weight[:2] += skew * mean / mean.norm().square()
    for h in hooks:
        h.remove()
    imbalance = []
    for _ in range(steps):
        x, y = next_batch()
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten()) + model.aux_loss()
        load = model.expert_load()
        imbalance.append((load.max(1).values / load.mean(1)).mean().item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        for m in model.moe_layers():
            if m.router.expert_bias is not None:
                m.update_expert_bias(m.routed_load)
    return imbalance


def test_aux_free_balancing_evens_a_skewed_router():
    """Measured (seeded, one thread, the embedded corpus): bias 0.01 takes max/mean load from 3.83
    (first 5 steps) to 1.68 (last 20 of 100); without it 3.87 -> 3.38. Margins: on < 0.6 x start,
    off > 0.65 x start, on < 0.7 x off."""
    on, off = _skewed_moe_8x_run(0.01), _skewed_moe_8x_run(0.0)
    start_on, start_off = sum(on[:5]) / 5, sum(off[:5]) / 5
    end_on, end_off = sum(on[-20:]) / 20, sum(off[-20:]) / 20
    print(f"max/mean load: bias on {start_on:.2f} -> {end_on:.2f}; off {start_off:.2f} -> {end_off:.2f}")
    assert start_on > 3.0 and start_off > 3.0, "the router start is not skewed"
    assert end_on < 0.6 * start_on
    # Without the bias the load still drifts a little (0.74-0.87 of the start in the runs seen here).
    assert end_off > 0.65 * start_off
    assert end_on < 0.7 * end_off


BIAS_ARGS = ["model.moe.balance_bias_rate=0.002", "model.moe.load_balancing_loss_weight=0",
             "optimizer.warmup_steps=8", "optimizer.min_lr_ratio=1.0", "strategy.timeout_s=60"]
EXPERT2 = ["strategy=expert", "trainer.devices=2"]
HYBRID = ["strategy=hybrid", "strategy.mesh.dp=2", "strategy.mesh.ep=2", "trainer.devices=4"]


def _biases(checkpoint) -> dict:
    from paratrain.strategies import portable_state

    state = portable_state.consolidated_model_state(checkpoint)
    return {k: v for k, v in state.items() if k.endswith("router.expert_bias")}


def test_bias_update_is_the_same_on_every_layout_and_survives_resume(tmp_path):
    """6 steps (step-only LR schedule) on single and expert 2; and 3 steps on hybrid 2x2 resumed to 6
    on expert 2. The biases of step 3 and step 6 must agree to 1e-6 (they are sums of +-0.002
    steps: equal routing gives bitwise equal biases; a larger step on 4 softmax experts flips the
    choice every step and returns the bias to 0 every second step)."""
    from conftest import TINY_MOE

    def run(name, *extra, steps=6):
        done = train([*TINY_MOE, *BIAS_ARGS, f"trainer.max_steps={steps}", *extra], tmp_path / name)
        assert done.returncode == 0, done.stderr[-3000:]
        return tmp_path / name / "checkpoints"

    single, expert = run("single"), run("expert2", *EXPERT2)
    run("resumed", *HYBRID, steps=3)
    resumed = run("resumed", *EXPERT2, "resume=auto")
    ref3, ref6 = _biases(single / "step000003"), _biases(single / "step000006")
    assert len(ref6) == 2 and all(b.abs().sum() > 0 for b in ref6.values())  # 2 MoE layers, moved
    assert any(not torch.equal(ref3[k], ref6[k]) for k in ref6)  # and still moving at step 6
    for ckpts in (expert, resumed):
        for step, ref in (("step000003", ref3), ("step000006", ref6)):
            got = _biases(ckpts / step)
            assert got.keys() == ref.keys()
            for k in ref:
                torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-6, msg=f"{ckpts.parent.name} {step} {k}")


from conftest import train  # noqa: E402  (the subprocess helper, after the in-process tests above)

"""Hugging Face checkpoints, both ways: the dense model is Llama, the MoE model Mixtral or Qwen2-MoE.

    paratrain-export outputs/run1 hf-out --format hf        # to_hf_config + to_hf_state, then save_hf
    train model.init_from=~/models/tiny-llama                # model_config_from_hf; weights: hf_init.py

The architectures are the same function as paratrain's Transformer when the options line up:
pre-norm RMSNorm blocks, rotary attention with the rotate-half convention (so q/k need no
permutation), grouped-query attention (num_key_value_heads), SwiGLU (gate = w1, up = w3,
down = w2), tied or untied head. Mixtral's router is a softmax over all experts, top-k,
renormalised, with no capacity limit, in every layer. Qwen2-MoE (export only) is the model with a
sigmoid-gated shared expert (model.moe.shared_expert_gate): softmax top-k, renormalised or not
(norm_topk_prob), dense layers where decoder_sparse_step / mlp_only_layers say. Every option that
breaks this is named in the error (exit 2) instead of producing a model that loads but computes
something else.

Nothing here needs `transformers`; nothing is downloaded.
"""

import json
import math
import os
from pathlib import Path

from omegaconf import OmegaConf

from .errors import ConfigError

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}
INIT_FROM_TYPES = ("llama", "mixtral")  # model_type values model.init_from reads (Qwen2-MoE is export only)
CONFIG_FILE, WEIGHTS_FILE, INDEX_FILE = "config.json", "model.safetensors", "model.safetensors.index.json"


# --- paratrain -> Hugging Face ----------------------------------------------------------------
def _non_default(section, defaults, handled: set, prefix: str) -> list[str]:
    """Options of `section` outside `handled` whose value is not the schema default (options added to the
    schema later are caught here: they have no counterpart until someone maps them)."""
    data = OmegaConf.to_container(section, resolve=True) if OmegaConf.is_config(section) else dict(section)
    return [f"{prefix}.{k}={v}" for k, v in data.items()
            if k not in handled and hasattr(defaults, k) and getattr(defaults, k) != v]


# Keys of the model config that change nothing the exported model computes (training choices).
TRAINING_ONLY = {"init_from", "activation_checkpointing"}
MOE_TRAINING_ONLY = {"load_balancing_loss_weight", "z_loss_weight", "router_jitter"}  # jitter: training only

# Router options that, among Hugging Face's architectures we could target, only DeepSeek-V3 has:
# (key, default, DeepseekV3Config's name for it).
DEEPSEEK_V3_ONLY = (
    ("router_score", "softmax", "its router's sigmoid scores"),
    ("balance_bias_rate", 0.0, "e_score_correction_bias, the auxiliary-loss-free balancing bias"),
    ("topk_groups", 1, "topk_group"),  # before n_groups: topk_groups > 1 needs n_groups > 1, name the finer one
    ("n_groups", 1, "n_group"),
    ("route_scale", 1.0, "routed_scaling_factor"),
)


def _opt(section, key: str, default):
    # Configs recorded before a key existed lack it: the default is what they trained with.
    return getattr(section, key, default)


def _refuse_deepseek_v3(moe) -> None:
    for key, default, theirs in DEEPSEEK_V3_ONLY:
        value = _opt(moe, key, default)
        if value != default:
            raise ConfigError(
                f"model.moe.{key}={value} is a DeepSeek-V3 router option ({theirs} in Hugging Face's DeepseekV3Config); "
                f"Llama, Mixtral and Qwen2-MoE, the architectures --format hf writes, have no such option. "
                f"DeepseekV3ForCausalLM cannot hold this model either: its attention is multi-head latent attention "
                f"(MLA: keys and values expanded from a low-rank latent, with a separate rotary part), and paratrain's "
                f"attention has plain wq/wk/wv projections, which have no place in MLA. So the model maps onto no "
                f"architecture --format hf writes and cannot be exported with it; export paratrain's own format "
                f"(paratrain-export CKPT OUT.safetensors), or train with model.moe.{key}={default}.")


def hf_architecture(m) -> str:
    """model_type the model config `m` exports as: llama (dense), qwen2_moe (gated shared expert), else mixtral."""
    if m.moe is None:
        return "llama"
    return "qwen2_moe" if _opt(m.moe, "shared_expert_gate", False) else "mixtral"


def to_hf_config(m, max_position_embeddings: int = 2048) -> dict:
    """config.json for the model config `m` (ModelConfig or DictConfig). Raises ConfigError naming the
    option that has no counterpart in the architecture it maps onto (hf_architecture)."""
    from .schema import ModelConfig, MoEConfig

    kind = hf_architecture(m)
    arch = {"llama": "Llama", "mixtral": "Mixtral", "qwen2_moe": "Qwen2-MoE"}[kind]

    def refuse(option: str, why: str) -> None:
        raise ConfigError(f"{option} has no counterpart in Hugging Face {arch}: {why}. The model cannot be exported "
                          f"with --format hf; export paratrain's own format (paratrain-export CKPT OUT.safetensors), "
                          f"or train with that option at its default.")

    extra = _non_default(m, ModelConfig(), {"vocab_size", "d_model", "n_layers", "n_heads", "ffn_dim", "rope_theta",
                                              "norm_eps", "init_std", "moe", "n_kv_heads", "tie_embeddings",
                                              *TRAINING_ONLY}, "model")
    if extra:
        refuse(extra[0], "its Transformer has no such option")
    config = {
        "architectures": [ARCHITECTURES[kind]], "model_type": kind,
        "vocab_size": m.vocab_size, "hidden_size": m.d_model, "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads, "num_key_value_heads": _opt(m, "n_kv_heads", None) or m.n_heads,
        "head_dim": m.d_model // m.n_heads, "hidden_act": "silu", "rms_norm_eps": m.norm_eps,
        "initializer_range": m.init_std, "max_position_embeddings": max_position_embeddings,
        "tie_word_embeddings": bool(_opt(m, "tie_embeddings", False)),
        # transformers 5 reads rope_parameters, 4.x reads rope_theta.
        "rope_theta": m.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
        "attention_dropout": 0.0, "use_cache": True, "torch_dtype": "float32", "dtype": "float32",
        "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
    }
    moe = m.moe
    if moe is None:
        return {**config, "intermediate_size": m.ffn_dim, "attention_bias": False, "mlp_bias": False, "pretraining_tp": 1}
    _refuse_deepseek_v3(moe)
    first_dense = _opt(moe, "first_dense_layers", 0)
    if kind == "mixtral":
        # Qwen2-MoE maps these, but it always has a sigmoid-gated shared expert.
        qwen = ("train with a gated shared expert (model.moe.num_shared_experts=1 model.moe.shared_expert_gate=true) "
                "to export as Qwen2-MoE")
        rules = [
            (moe.num_shared_experts == 0, f"model.moe.num_shared_experts={moe.num_shared_experts}",
             f"Mixtral has no shared experts ({qwen}, whose shared expert is gated per token)"),
            (moe.every_n_layers == 1, f"model.moe.every_n_layers={moe.every_n_layers}",
             f"every Mixtral layer is an MoE layer ({qwen}: its decoder_sparse_step maps it)"),
            (first_dense == 0, f"model.moe.first_dense_layers={first_dense}",
             f"every Mixtral layer is an MoE layer ({qwen}: its mlp_only_layers maps it)"),
            (moe.renormalize, f"model.moe.renormalize={moe.renormalize}",
             f"Mixtral always renormalises the top-k weights ({qwen}: its norm_topk_prob=false maps it)"),
        ]
    else:
        rules = []
    rules.append((moe.capacity_factor is None, f"model.moe.capacity_factor={moe.capacity_factor}",
                  f"{arch} routes without a capacity limit, so its outputs would differ wherever tokens were dropped"))
    for ok, option, why in rules:
        if not ok:
            refuse(option, why)
    handled = {"num_experts", "top_k", "every_n_layers", "first_dense_layers", "expert_ffn_dim", "capacity_factor",
               "num_shared_experts", "renormalize", "shared_expert_gate", "shared_expert_ffn_dim",
               *(key for key, _, _ in DEEPSEEK_V3_ONLY), *MOE_TRAINING_ONLY}
    extra = _non_default(moe, MoEConfig(), handled, "model.moe")
    if extra:
        refuse(extra[0], f"{arch}'s router has no such option")
    width = moe.expert_ffn_dim or m.ffn_dim
    if kind == "mixtral":
        return {**config, "intermediate_size": width, "num_local_experts": moe.num_experts,
                "num_experts_per_tok": moe.top_k, "router_aux_loss_coef": moe.load_balancing_loss_weight,
                "output_router_logits": False, "router_jitter_noise": 0.0, "sliding_window": None}
    # Qwen2-MoE: layer i is sparse unless i in mlp_only_layers, and when (i + 1) % decoder_sparse_step == 0 —
    # paratrain's is_moe_layer with first_dense_layers spelled as a list. qkv_bias=false (transformers 5 reads
    # it): paratrain's projections have no bias.
    return {**config, "intermediate_size": m.ffn_dim, "moe_intermediate_size": width,
            "shared_expert_intermediate_size": _opt(moe, "shared_expert_ffn_dim", None) or moe.num_shared_experts * width,
            "num_experts": moe.num_experts, "num_experts_per_tok": moe.top_k, "norm_topk_prob": bool(moe.renormalize),
            "decoder_sparse_step": moe.every_n_layers, "mlp_only_layers": list(range(first_dense)),
            "qkv_bias": False, "use_sliding_window": False, "sliding_window": None, "max_window_layers": m.n_layers,
            "router_aux_loss_coef": moe.load_balancing_loss_weight, "output_router_logits": False}


def _layer_names(i: int, moe_layer: bool, kind: str = "mixtral") -> dict[str, str]:
    """paratrain name -> HF name for the non-expert tensors of layer i (kind: mixtral | qwen2_moe)."""
    p, h = f"layers.{i}.", f"model.layers.{i}."
    names = {p + "attn_norm.weight": h + "input_layernorm.weight", p + "ffn_norm.weight": h + "post_attention_layernorm.weight"}
    for ours, theirs in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj")):
        names[f"{p}attn.{ours}.weight"] = f"{h}self_attn.{theirs}.weight"
    swiglu = (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj"))
    if not moe_layer:
        names.update({f"{p}ffn.{ours}.weight": f"{h}mlp.{theirs}.weight" for ours, theirs in swiglu})
    elif kind == "mixtral":
        names[p + "ffn.router.gate.weight"] = h + "block_sparse_moe.gate.weight"
    else:
        names[p + "ffn.router.gate.weight"] = h + "mlp.gate.weight"
        names[p + "ffn.shared_gate.weight"] = h + "mlp.shared_expert_gate.weight"  # (1, d)
        names.update({f"{p}ffn.shared.{ours}.weight": f"{h}mlp.shared_expert.{theirs}.weight" for ours, theirs in swiglu})
    return names


TOP_LEVEL = {"tok_emb.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight", "head.weight": "lm_head.weight"}
# Per-expert tensor names, the layout every transformers version reads (transformers 5 fuses them on load).
EXPERT_NAMES = {"mixtral": {"w1": "block_sparse_moe.experts.{j}.w1", "w3": "block_sparse_moe.experts.{j}.w3",
                            "w2": "block_sparse_moe.experts.{j}.w2"},
                "qwen2_moe": {"w1": "mlp.experts.{j}.gate_proj", "w3": "mlp.experts.{j}.up_proj",
                              "w2": "mlp.experts.{j}.down_proj"}}


def to_hf_state(state: dict, m) -> dict:
    """paratrain's full state dict -> HF tensors (experts one by one). A tied head is not written: HF ties
    lm_head to the embedding itself (and safetensors refuses two names for one tensor).

    Our experts are stacked (E, d, h) and applied as x @ w; HF's are Linear weights (h, d): transposed."""
    from .models.transformer import is_moe_layer

    kind = hf_architecture(m)
    tied = bool(_opt(m, "tie_embeddings", False))
    out = {TOP_LEVEL[k]: v for k, v in state.items() if k in TOP_LEVEL and not (tied and k == "head.weight")}
    for i in range(m.n_layers):
        sparse = is_moe_layer(m, i)
        out.update({theirs: state[ours] for ours, theirs in _layer_names(i, sparse, kind).items()})
        if sparse:
            for w, name in EXPERT_NAMES[kind].items():
                stack = state[f"layers.{i}.ffn.experts.{w}"]
                for j in range(stack.shape[0]):
                    out[f"model.layers.{i}.{name.format(j=j)}.weight"] = stack[j].T.contiguous()
    return {k: v.contiguous() for k, v in out.items()}


def save_hf(state: dict, m, out_dir, max_position_embeddings: int = 2048) -> Path:
    """Write config.json, generation_config.json and model.safetensors into out_dir (config checked first)."""
    from safetensors.torch import save_file

    config = to_hf_config(m, max_position_embeddings)
    tensors = to_hf_state(state, m)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (WEIGHTS_FILE + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(out / WEIGHTS_FILE)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps({"do_sample": False}, indent=2) + "\n")
    for p in out.iterdir():
        p.chmod(0o644)
    return out


# --- Hugging Face -> paratrain ------------------------------------------------------------------
def read_config(path) -> dict:
    """config.json of a local HF model directory, checked: exists, parses, an architecture we map. Raises ConfigError."""
    given = str(path)
    path = Path(os.path.expanduser(given))
    fix = "Give a local directory that save_pretrained wrote (config.json and model.safetensors), or model.init_from=null."
    if not path.is_dir():
        raise ConfigError(f"model.init_from={given!r} is not a directory: it names a local Hugging Face model directory "
                          f"(nothing is downloaded). {fix}")
    if not (path / CONFIG_FILE).is_file():
        raise ConfigError(f"model.init_from={given!r} has no {CONFIG_FILE}: it is not a Hugging Face model directory. {fix}")
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except ValueError as e:
        raise ConfigError(f"model.init_from={given!r}: {CONFIG_FILE} is not valid JSON ({e}). {fix}") from None
    kind = config.get("model_type") if isinstance(config, dict) else None
    if kind not in INIT_FROM_TYPES:
        raise ConfigError(f"model.init_from={given!r} holds a {kind!r} model (config.json model_type); paratrain starts "
                          f"from {', '.join(INIT_FROM_TYPES)} models only (its dense and MoE Transformer). Convert the "
                          f"checkpoint, or pick a Llama or Mixtral one.")
    return config


def _rope(config: dict) -> tuple[float, str | None, str | None]:
    """(theta, the key that asks for RoPE scaling, its type), the last two None for plain rotary positions:
    transformers 5 writes rope_parameters, 4.x rope_theta and rope_scaling."""
    params = config.get("rope_parameters") or {}
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    for key, section in (("rope_parameters", params), ("rope_scaling", config.get("rope_scaling") or {})):
        for field in ("rope_type", "type"):
            if section.get(field) not in (None, "default"):
                return float(theta), f"{key}.{field}", section[field]
    return float(theta), None, None


# paratrain model key -> the config.json key it comes from (for messages)
HF_KEYS = {"vocab_size": "vocab_size", "rope_theta": "rope_theta", "d_model": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
           "n_kv_heads": "num_key_value_heads", "ffn_dim": "intermediate_size", "norm_eps": "rms_norm_eps",
           "init_std": "initializer_range", "tie_embeddings": "tie_word_embeddings",
           "moe.num_experts": "num_local_experts", "moe.top_k": "num_experts_per_tok", "moe.expert_ffn_dim": "intermediate_size"}


def model_config_from_hf(config: dict, given: str) -> dict:
    """The paratrain model keys a HF config fixes (nested dict, moe None for Llama; n_kv_heads None when every
    query head has its own). Raises ConfigError for an option paratrain's Transformer cannot reproduce."""
    heads, width = config["num_attention_heads"], config["hidden_size"]
    kv_heads = config.get("num_key_value_heads") or heads
    theta, scaling_key, scaling = _rope(config)

    def refuse(key, value, why):
        raise ConfigError(f"model.init_from={given!r}: its config.json has {key}={value!r}, which paratrain's Transformer "
                          f"cannot reproduce ({why}). Start from a checkpoint without it.")

    if scaling_key is not None:
        refuse(scaling_key, scaling, "plain rotary positions: no RoPE scaling")
    checks = [
        ("num_key_value_heads", heads % kv_heads, 0, f"each key/value head serves a whole group of the {heads} query heads"),
        ("head_dim", config.get("head_dim") or width // heads, width // heads, "heads split hidden_size evenly"),
        ("hidden_act", config.get("hidden_act", "silu"), "silu", "the FFN is SwiGLU"),
        ("attention_bias", bool(config.get("attention_bias", False)), False, "projections have no bias"),
        ("mlp_bias", bool(config.get("mlp_bias", False)), False, "projections have no bias"),
    ]
    for key, value, want, why in checks:
        if value != want:
            refuse(key, config.get(key), why)
    if config.get("sliding_window") not in (None, 0) and config.get("use_sliding_window", True):
        refuse("sliding_window", config["sliding_window"], "attention is fully causal")
    model = {"vocab_size": config["vocab_size"], "d_model": width, "n_layers": config["num_hidden_layers"],
             "n_heads": heads, "n_kv_heads": kv_heads if kv_heads != heads else None, "ffn_dim": config["intermediate_size"],
             "rope_theta": theta, "norm_eps": float(config.get("rms_norm_eps", 1e-6)),
             "init_std": float(config.get("initializer_range", 0.02)),
             "tie_embeddings": bool(config.get("tie_word_embeddings", False)), "moe": None}
    if config["model_type"] == "mixtral":
        model["moe"] = {"num_experts": config["num_local_experts"], "top_k": config["num_experts_per_tok"],
                        "every_n_layers": 1, "expert_ffn_dim": config["intermediate_size"], "capacity_factor": None,
                        "num_shared_experts": 0, "router_score": "softmax", "renormalize": True,
                        # Mixtral's routing: the designs beyond it off (a recipe that set them would change the function)
                        "first_dense_layers": 0, "route_scale": 1.0, "n_groups": 1, "topk_groups": 1,
                        "shared_expert_gate": False, "shared_expert_ffn_dim": None}
    return model


def max_position(seq_len: int) -> int:
    """max_position_embeddings written on export: at least 2048 (rotary positions extend past training)."""
    return max(2048, 2 ** math.ceil(math.log2(max(seq_len, 1))))

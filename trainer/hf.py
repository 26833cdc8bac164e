"""Hugging Face checkpoints, both ways: the dense model is Llama, the MoE model Mixtral.

    paratrain-export outputs/run1 hf-out --format hf        # to_hf_config + to_hf_state, then save_hf
    train model.init_from=~/models/tiny-llama                # model_config_from_hf; weights: hf_init.py

The two architectures are the same function as paratrain's Transformer when the options line up:
pre-norm RMSNorm blocks, rotary attention with the rotate-half convention (so q/k need no
permutation), SwiGLU (gate = w1, up = w3, down = w2), untied head; Mixtral's router is a softmax
over all experts, top-k, renormalised, with no capacity limit. Every option that breaks this is
named in the error (exit 2) instead of producing a model that loads but computes something else.

Nothing here needs `transformers`; nothing is downloaded.
"""

import json
import math
import os
from pathlib import Path

from omegaconf import OmegaConf

from .errors import ConfigError

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM"}
CONFIG_FILE, WEIGHTS_FILE, INDEX_FILE = "config.json", "model.safetensors", "model.safetensors.index.json"


# --- paratrain -> Hugging Face ----------------------------------------------------------------
def _non_default(section, defaults, handled: set, prefix: str) -> list[str]:
    """Options of `section` outside `handled` whose value is not the schema default (options added to the
    schema later are caught here: they have no counterpart until someone maps them)."""
    data = OmegaConf.to_container(section, resolve=True) if OmegaConf.is_config(section) else dict(section)
    return [f"{prefix}.{k}={v}" for k, v in data.items()
            if k not in handled and hasattr(defaults, k) and getattr(defaults, k) != v]


def to_hf_config(m, max_position_embeddings: int = 2048) -> dict:
    """config.json for the model config `m` (ModelConfig or DictConfig). Raises ConfigError naming the
    option that has no Llama/Mixtral counterpart."""
    from .schema import ModelConfig, MoEConfig

    def refuse(option: str, arch: str, why: str) -> None:
        raise ConfigError(f"{option} has no counterpart in Hugging Face {arch}: {why}. The model cannot be exported "
                          f"with --format hf; export paratrain's own format (paratrain-export CKPT OUT.safetensors), "
                          f"or train with that option at its default.")

    arch = "Mixtral" if m.moe is not None else "Llama"
    extra = _non_default(m, ModelConfig(), {"vocab_size", "d_model", "n_layers", "n_heads", "ffn_dim", "rope_theta",
                                              "norm_eps", "init_std", "moe", "init_from"}, "model")
    if extra:
        refuse(extra[0], arch, "its Transformer has no such option")
    config = {
        "vocab_size": m.vocab_size, "hidden_size": m.d_model, "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads, "num_key_value_heads": m.n_heads, "head_dim": m.d_model // m.n_heads,
        "hidden_act": "silu", "rms_norm_eps": m.norm_eps, "initializer_range": m.init_std,
        "max_position_embeddings": max_position_embeddings, "tie_word_embeddings": False,
        # transformers 5 reads rope_parameters, 4.x reads rope_theta.
        "rope_theta": m.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
        "attention_dropout": 0.0, "use_cache": True, "torch_dtype": "float32", "dtype": "float32",
        "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
    }
    moe = m.moe
    if moe is None:
        return {**config, "architectures": [ARCHITECTURES["llama"]], "model_type": "llama",
                "intermediate_size": m.ffn_dim, "attention_bias": False, "mlp_bias": False, "pretraining_tp": 1}
    rules = [
        (moe.every_n_layers == 1, f"model.moe.every_n_layers={moe.every_n_layers}", "every Mixtral layer is an MoE layer"),
        (moe.num_shared_experts == 0, f"model.moe.num_shared_experts={moe.num_shared_experts}", "Mixtral has no shared experts"),
        (moe.router_score == "softmax", f"model.moe.router_score={moe.router_score}", "Mixtral's router is a softmax"),
        (moe.renormalize, f"model.moe.renormalize={moe.renormalize}", "Mixtral always renormalises the top-k weights"),
        (moe.capacity_factor is None, f"model.moe.capacity_factor={moe.capacity_factor}",
         "Mixtral routes without a capacity limit, so its outputs would differ wherever tokens were dropped"),
    ]
    for ok, option, why in rules:
        if not ok:
            refuse(option, arch, why)
    handled = {"num_experts", "top_k", "every_n_layers", "expert_ffn_dim", "capacity_factor", "num_shared_experts",
               "load_balancing_loss_weight", "z_loss_weight", "router_score", "renormalize"}
    extra = _non_default(moe, MoEConfig(), handled, "model.moe")
    if extra:
        refuse(extra[0], arch, "Mixtral's router has no such option")
    return {**config, "architectures": [ARCHITECTURES["mixtral"]], "model_type": "mixtral",
            "intermediate_size": moe.expert_ffn_dim or m.ffn_dim, "num_local_experts": moe.num_experts,
            "num_experts_per_tok": moe.top_k, "router_aux_loss_coef": moe.load_balancing_loss_weight,
            "output_router_logits": False, "router_jitter_noise": 0.0, "sliding_window": None}


def _layer_names(i: int, moe: bool) -> dict[str, str]:
    """paratrain name -> HF name for the non-expert tensors of layer i."""
    p, h = f"layers.{i}.", f"model.layers.{i}."
    names = {p + "attn_norm.weight": h + "input_layernorm.weight", p + "ffn_norm.weight": h + "post_attention_layernorm.weight"}
    for ours, theirs in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj")):
        names[f"{p}attn.{ours}.weight"] = f"{h}self_attn.{theirs}.weight"
    if moe:
        names[p + "ffn.router.gate.weight"] = h + "block_sparse_moe.gate.weight"
    else:
        for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
            names[f"{p}ffn.{ours}.weight"] = f"{h}mlp.{theirs}.weight"
    return names


TOP_LEVEL = {"tok_emb.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight", "head.weight": "lm_head.weight"}


def to_hf_state(state: dict, m) -> dict:
    """paratrain's full state dict -> HF tensors (Mixtral experts one by one, as every transformers reads them).

    Our experts are stacked (E, d, h) and applied as x @ w; HF's are Linear weights (h, d): transposed."""
    out = {TOP_LEVEL[k]: v for k, v in state.items() if k in TOP_LEVEL}
    for i in range(m.n_layers):
        names = _layer_names(i, m.moe is not None)
        out.update({theirs: state[ours] for ours, theirs in names.items()})
        if m.moe is not None:
            for w in ("w1", "w2", "w3"):
                stack = state[f"layers.{i}.ffn.experts.{w}"]
                for j in range(stack.shape[0]):
                    out[f"model.layers.{i}.block_sparse_moe.experts.{j}.{w}.weight"] = stack[j].T.contiguous()
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
    if kind not in ARCHITECTURES:
        raise ConfigError(f"model.init_from={given!r} holds a {kind!r} model (config.json model_type); paratrain starts "
                          f"from {', '.join(ARCHITECTURES)} models only (its dense and MoE Transformer). Convert the "
                          f"checkpoint, or pick a Llama or Mixtral one.")
    return config


def _rope_theta(config: dict) -> tuple[float, str | None]:
    """(theta, the scaling type if any): transformers 5 writes rope_parameters, 4.x rope_theta and rope_scaling."""
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type")
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    return float(theta), (kind if kind not in (None, "default") else None)


# paratrain model key -> the config.json key it comes from (for messages)
HF_KEYS = {"d_model": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
           "ffn_dim": "intermediate_size", "norm_eps": "rms_norm_eps", "init_std": "initializer_range",
           "moe.num_experts": "num_local_experts", "moe.top_k": "num_experts_per_tok", "moe.expert_ffn_dim": "intermediate_size"}


def model_config_from_hf(config: dict, given: str) -> dict:
    """The paratrain model keys a HF config fixes (nested dict, moe None for Llama). Raises ConfigError for an
    option paratrain's Transformer cannot reproduce."""
    heads, width = config["num_attention_heads"], config["hidden_size"]
    theta, scaling = _rope_theta(config)

    def refuse(key, value, why):
        raise ConfigError(f"model.init_from={given!r}: its config.json has {key}={value!r}, which paratrain's Transformer "
                          f"cannot reproduce ({why}). Start from a checkpoint without it.")

    checks = [
        ("num_key_value_heads", config.get("num_key_value_heads") or heads, heads, "no grouped-query attention: every head has its own keys and values"),
        ("head_dim", config.get("head_dim") or width // heads, width // heads, "heads split hidden_size evenly"),
        ("hidden_act", config.get("hidden_act", "silu"), "silu", "the FFN is SwiGLU"),
        ("attention_bias", bool(config.get("attention_bias", False)), False, "projections have no bias"),
        ("mlp_bias", bool(config.get("mlp_bias", False)), False, "projections have no bias"),
        ("rope_scaling", scaling, None, "plain rotary positions"),
    ]
    for key, value, want, why in checks:
        if value != want:
            refuse(key, value, why)
    if config.get("sliding_window") not in (None, 0) and config.get("use_sliding_window", True):
        refuse("sliding_window", config["sliding_window"], "attention is fully causal")
    model = {"vocab_size": config["vocab_size"], "d_model": width, "n_layers": config["num_hidden_layers"],
             "n_heads": heads, "ffn_dim": config["intermediate_size"], "rope_theta": theta,
             "norm_eps": float(config.get("rms_norm_eps", 1e-6)), "init_std": float(config.get("initializer_range", 0.02)),
             "moe": None}
    if config["model_type"] == "mixtral":
        model["moe"] = {"num_experts": config["num_local_experts"], "top_k": config["num_experts_per_tok"],
                        "every_n_layers": 1, "expert_ffn_dim": config["intermediate_size"], "capacity_factor": None,
                        "num_shared_experts": 0, "router_score": "softmax", "renormalize": True}
    return model


def max_position(seq_len: int) -> int:
    """max_position_embeddings written on export: at least 2048 (rotary positions extend past training)."""
    return max(2048, 2 ** math.ceil(math.log2(max(seq_len, 1))))

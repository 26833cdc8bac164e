"""Hugging Face checkpoints, both ways: the dense model is Llama, the MoE model Mixtral.

    paratrain-export outputs/run1 hf-out --format hf        # to_hf_config + to_hf_state, then save
    train model.init_from=~/models/tiny-llama                # model_config_from_hf, then load_weights

The two architectures are the same function as paratrain's Transformer when the options line up:
pre-norm RMSNorm blocks, rotary attention with the rotate-half convention (so q/k need no
permutation), SwiGLU (gate = w1, up = w3, down = w2), untied head; Mixtral's router is a softmax
over all experts, top-k, renormalised, with no capacity limit. Every option that breaks this is
named in the error (exit 2) instead of producing a model that loads but computes something else.

Weights are read from safetensors headers lazily, by name: one file or an index of shards, and
both Mixtral layouts (per-expert `block_sparse_moe.experts.J.w1.weight`, which every transformers
version reads and writes, and the fused `mlp.experts.gate_up_proj` of transformers 5). Each rank
reads only the experts it holds (`GroupedExperts.expert_offset`), so loading works under any
expert-parallel layout. Nothing here needs `transformers`; nothing is downloaded.
"""

import json
import logging
import math
import os
from pathlib import Path

import lightning as L
import torch
from omegaconf import OmegaConf, open_dict

from .errors import ConfigError

log = logging.getLogger("paratrain")
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


class HFWeights:
    """Tensors of a HF model directory by name, read lazily from its safetensors file(s)."""

    def __init__(self, path):
        from safetensors import safe_open

        self.path = Path(os.path.expanduser(str(path)))
        if (self.path / INDEX_FILE).is_file():
            weight_map = json.loads((self.path / INDEX_FILE).read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.path.glob("*.safetensors"))
        if not files:
            raise ConfigError(f"model.init_from={str(path)!r} has no safetensors weights ({WEIGHTS_FILE} or {INDEX_FILE}); "
                              f"paratrain does not read pickled pytorch_model.bin files. Re-save the model with "
                              f"save_pretrained(..., safe_serialization=True).")
        self._files = {}
        for name in files:
            try:
                handle = safe_open(str(self.path / name), framework="pt")
            except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
                raise ConfigError(f"model.init_from={str(path)!r}: {name} is not a readable safetensors file ({e}). "
                                  f"Re-save the model with save_pretrained.") from None
            for key in handle.keys():
                self._files[key] = handle

    def __contains__(self, name: str) -> bool:
        return name in self._files

    def shape(self, name: str) -> tuple:
        return tuple(self._files[name].get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        return self._files[name].get_tensor(name)


def _expert_source(weights: HFWeights, i: int, w: str, start: int, count: int) -> torch.Tensor:
    """Experts [start, start + count) of layer i's w1/w2/w3 in our layout: (count, d, h) or (count, h, d)."""
    legacy = f"model.layers.{i}.block_sparse_moe.experts.{{}}.{w}.weight"
    if legacy.format(start) in weights:
        return torch.stack([weights.get(legacy.format(j)).T for j in range(start, start + count)])
    fused = f"model.layers.{i}.mlp.experts."
    if w == "w2":
        return weights.get(fused + "down_proj")[start:start + count].transpose(1, 2)  # (E, d, h) -> (E, h, d)
    gate_up = weights.get(fused + "gate_up_proj")[start:start + count]  # (E, 2h, d): gate rows, then up rows
    h = gate_up.shape[1] // 2
    return (gate_up[:, :h] if w == "w1" else gate_up[:, h:]).transpose(1, 2)


def _source_name(weights: HFWeights, ours: str, names: dict) -> str:
    theirs = names[ours]
    if theirs not in weights and ".block_sparse_moe.gate." in theirs:
        theirs = theirs.replace(".block_sparse_moe.gate.", ".mlp.gate.")  # transformers 5's fused layout
    return theirs


def _all_names(m) -> dict:
    names = dict(TOP_LEVEL)
    for i in range(m.n_layers):
        names.update(_layer_names(i, m.moe is not None))
    return names


def _expected_shapes(m, weights: "HFWeights") -> dict[str, tuple]:
    """HF tensor name -> the shape the model config implies (experts: expert 0, or the fused stacks)."""
    d, v = m.d_model, m.vocab_size
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    if "lm_head.weight" in weights:  # absent: tied embeddings, the head starts as a copy
        shapes["lm_head.weight"] = (v, d)
    for i in range(m.n_layers):
        h = f"model.layers.{i}."
        shapes.update({h + "input_layernorm.weight": (d,), h + "post_attention_layernorm.weight": (d,)})
        shapes.update({f"{h}self_attn.{x}_proj.weight": (d, d) for x in "qkvo"})
        if m.moe is None:
            f = m.ffn_dim
            shapes.update({h + "mlp.gate_proj.weight": (f, d), h + "mlp.up_proj.weight": (f, d), h + "mlp.down_proj.weight": (d, f)})
            continue
        e, f = m.moe.num_experts, m.moe.expert_ffn_dim or m.ffn_dim
        gate = h + "block_sparse_moe.gate.weight"
        shapes[gate if gate in weights else h + "mlp.gate.weight"] = (e, d)
        if h + "block_sparse_moe.experts.0.w1.weight" in weights or h + "mlp.experts.gate_up_proj" not in weights:
            for j in range(e):
                x = f"{h}block_sparse_moe.experts.{j}."
                shapes.update({x + "w1.weight": (f, d), x + "w3.weight": (f, d), x + "w2.weight": (d, f)})
        else:
            shapes.update({h + "mlp.experts.gate_up_proj": (e, 2 * f, d), h + "mlp.experts.down_proj": (e, d, f)})
    return shapes


def check_weights(path, m) -> None:
    """Every tensor the config implies is in the directory, with its shape (safetensors headers only, before
    any process starts). Raises ConfigError."""
    weights = HFWeights(path)
    expected = _expected_shapes(m, weights)
    missing = [name for name in expected if name not in weights]
    if missing:
        raise ConfigError(f"model.init_from={str(path)!r} lacks {len(missing)} tensors its config.json implies, e.g. "
                          f"{missing[0]}: the weights do not belong to that config. Re-save the model with save_pretrained.")
    for name, shape in expected.items():
        if weights.shape(name) != shape:
            raise ConfigError(f"model.init_from={str(path)!r}: {name} has shape {list(weights.shape(name))}, but its "
                              f"config.json implies {list(shape)}. Re-save the model with save_pretrained.")


@torch.no_grad()
def load_weights(model, path) -> None:
    """Copy a HF checkpoint into a materialised paratrain model, in place (optimizer references stay valid).

    The model may hold only some experts of each MoE layer (expert parallel): those are read."""
    from .models.moe import GroupedExperts

    m = model.cfg
    weights = HFWeights(path)
    names = _all_names(m)
    experts = {f"{name}.{w}": (mod, w) for name, mod in model.named_modules() if isinstance(mod, GroupedExperts)
               for w in ("w1", "w2", "w3")}
    for ours, p in model.named_parameters():
        if ours in experts:
            mod, w = experts[ours]
            layer = int(ours.split(".")[1])
            src = _expert_source(weights, layer, w, mod.expert_offset, mod.num_local_experts)
        elif ours == "head.weight" and "lm_head.weight" not in weights:
            log.warning("model.init_from=%s ties the output head to the embedding; paratrain starts the head as a "
                        "copy and trains it separately", path)
            src = weights.get("model.embed_tokens.weight")
        else:
            src = weights.get(_source_name(weights, ours, names))
        if hasattr(p, "device_mesh") and hasattr(p, "placements"):
            # A DTensor (a sharded layout): this rank's piece of the full tensor, cut locally (no communication).
            from torch.distributed.tensor import distribute_tensor

            src = distribute_tensor(src.to(p.dtype), p.device_mesh, p.placements, src_data_rank=None)
        if tuple(src.shape) != tuple(p.shape):
            raise ConfigError(f"model.init_from={str(path)!r}: {ours} has shape {list(src.shape)} there, but the model "
                              f"expects {list(p.shape)}. Re-save the model with save_pretrained.")
        p.copy_(src.to(dtype=p.dtype, device=p.device))


def explicit_model_overrides() -> dict:
    """{key: value} of the model.* overrides given on the command line (Hydra's task overrides); {} outside Hydra."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    found = {}
    for override in HydraConfig.get().overrides.task:
        key, _, value = str(override).lstrip("+~").partition("=")
        if key.startswith("model.") and key != "model.init_from":
            found[key] = value
    return found


def fill_model_config(cfg, explicit: dict | None = None) -> None:
    """model.init_from set: replace the architecture keys of cfg.model by the checkpoint's (in place).

    A command-line override that disagrees with the checkpoint is a ConfigError; keys the checkpoint does
    not fix (aux-loss weights, capacity_factor given explicitly) stay the run's choice."""
    given = cfg.model.init_from
    hf = model_config_from_hf(read_config(given), str(given))
    explicit = explicit_model_overrides() if explicit is None else explicit

    def flat(tree, prefix="model"):
        for k, v in tree.items():
            if isinstance(v, dict):
                yield from flat(v, f"{prefix}.{k}")
            elif v is not None or k != "moe":
                yield f"{prefix}.{k}", v

    for key, value in flat(hf):
        if key in explicit and OmegaConf.select(cfg, key) != value and key != "model.moe.capacity_factor":
            # (a capacity limit is a training choice on top of the checkpoint's dropless routing, not its shape)
            theirs = HF_KEYS.get(key[len("model."):], key.split(".")[-1])
            raise ConfigError(f"{key}={explicit[key]} conflicts with model.init_from={given!r}, whose config.json gives "
                              f"{theirs}={value}: the checkpoint's weights fix the architecture. Drop the "
                              f"{key} override (init_from fills it), or start from another checkpoint.")
    if hf["moe"] is None and "model.moe" in explicit and explicit["model.moe"] not in ("null", "None", ""):
        raise ConfigError(f"model.moe={explicit['model.moe']} conflicts with model.init_from={given!r}: it holds a dense "
                          f"Llama model. Drop the model.moe override, or start from a Mixtral checkpoint.")
    with open_dict(cfg):
        for key, value in hf.items():
            if key != "moe":
                cfg.model[key] = value
        if hf["moe"] is None:
            cfg.model.moe = None
        else:
            keep = {k: v for k, v in (OmegaConf.to_container(cfg.model.moe) if cfg.model.moe is not None else {}).items()}
            moe = {**keep, **hf["moe"]}
            if "model.moe.capacity_factor" in explicit:
                moe["capacity_factor"] = keep.get("capacity_factor")
            from .schema import MoEConfig

            cfg.model.moe = OmegaConf.merge(OmegaConf.structured(MoEConfig), moe)
    check_weights(given, cfg.model)


def max_position(seq_len: int) -> int:
    """max_position_embeddings written on export: at least 2048 (rotary positions extend past training)."""
    return max(2048, 2 ** math.ceil(math.log2(max(seq_len, 1))))


class InitFromHF(L.Callback):
    """Fill the laid-out model with a HF checkpoint's weights on every rank.

    on_fit_start runs after the strategy has laid the model out and materialised it, and before a
    checkpoint is restored: a resumed run continues from its checkpoint, not from init_from."""

    def __init__(self, path):
        self.path = path

    def on_fit_start(self, trainer, pl_module):
        load_weights(pl_module.model, self.path)
        log.info("model.init_from: loaded %s", self.path)

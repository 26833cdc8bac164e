"""`model.init_from=DIR`: a Hugging Face checkpoint fills the model config and replaces the initial weights.

Weights are read from safetensors headers lazily, by name: one file or an index of shards, and
both Mixtral layouts (per-expert `block_sparse_moe.experts.J.w1.weight`, which every transformers
version reads and writes, and the fused `mlp.experts.gate_up_proj` of transformers 5). Each rank
reads only the experts it holds (`GroupedExperts.expert_offset`), so loading works under any
expert-parallel layout. Everything a run can get wrong (missing files, names, shapes, a conflicting
override) is checked from config.json and the headers before any process starts.
"""

import json
import logging
import os
from pathlib import Path

import torch
from omegaconf import OmegaConf, open_dict

from .errors import ConfigError
from .hf import HF_KEYS, INDEX_FILE, TOP_LEVEL, WEIGHTS_FILE, _layer_names, model_config_from_hf, read_config

log = logging.getLogger("paratrain")


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
    from .models.transformer import is_moe_layer

    names = dict(TOP_LEVEL)
    for i in range(m.n_layers):
        names.update(_layer_names(i, is_moe_layer(m, i)))
    return names


def _expected_shapes(m, weights: "HFWeights") -> dict[str, tuple]:
    """HF tensor name -> the shape the model config implies (experts: expert 0, or the fused stacks)."""
    d, v = m.d_model, m.vocab_size
    kv = (m.get("n_kv_heads") or m.n_heads) * (d // m.n_heads)  # grouped-query attention: narrower k, v
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    if not m.get("tie_embeddings") and "lm_head.weight" in weights:  # absent, untied: the head starts as a copy
        shapes["lm_head.weight"] = (v, d)
    for i in range(m.n_layers):
        h = f"model.layers.{i}."
        shapes.update({h + "input_layernorm.weight": (d,), h + "post_attention_layernorm.weight": (d,)})
        shapes.update({f"{h}self_attn.{x}_proj.weight": (kv if x in "kv" else d, d) for x in "qkvo"})
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

    def same(key, ours, theirs):
        if key == "model.n_kv_heads":  # null and n_heads both mean one key/value head per query head
            return (ours or hf["n_heads"]) == (theirs or hf["n_heads"])
        return ours == theirs

    # Choices on top of the checkpoint, not its shape: a capacity limit on its dropless routing, and untying a
    # tied head (it starts as a copy of the embedding, so the initial function is the checkpoint's).
    untie = "model.tie_embeddings" in explicit and hf["tie_embeddings"] and not cfg.model.tie_embeddings
    own = {"model.moe.capacity_factor", *(["model.tie_embeddings"] if untie else [])}
    for key, value in flat(hf):
        if key in explicit and key not in own and not same(key, OmegaConf.select(cfg, key), value):
            short = key[len("model."):]
            value = hf["n_heads"] if key == "model.n_kv_heads" and value is None else value
            source = (f"whose config.json gives {HF_KEYS[short]}={value}" if short in HF_KEYS
                      else f"whose architecture ({read_config(given)['model_type']}) has {short}={value}")
            raise ConfigError(f"{key}={explicit[key]} conflicts with model.init_from={given!r}, {source}: the "
                              f"checkpoint's weights fix the architecture. Drop the {key} override (init_from fills "
                              f"it), or start from another checkpoint.")
    if hf["moe"] is None and "model.moe" in explicit and explicit["model.moe"] not in ("null", "None", ""):
        raise ConfigError(f"model.moe={explicit['model.moe']} conflicts with model.init_from={given!r}: it holds a dense "
                          f"Llama model. Drop the model.moe override, or start from a Mixtral checkpoint.")
    with open_dict(cfg):
        for key, value in hf.items():
            if key != "moe" and not (key == "tie_embeddings" and untie):
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

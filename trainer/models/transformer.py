"""Decoder-only transformer, dense or Mixture-of-Experts, as a plain nn.Module.

Pre-norm blocks (RMSNorm), rotary attention through `F.scaled_dot_product_attention`, SwiGLU FFNs;
layer i has an MoE FFN when cfg.moe is set, i >= cfg.moe.first_dense_layers and
(i + 1) % cfg.moe.every_n_layers == 0 (`is_moe_layer`).

Nothing here knows about distribution. A strategy builds the model on the meta device, lays it
out (e.g. `GroupedExperts.keep_experts` to shard experts, a new `MoE.dispatcher`), then calls
`materialize`: initial weights are seeded per parameter name and per global expert index, so they
do not depend on creation order, device or which experts a rank holds.

`cfg` is a ModelConfig or its OmegaConf DictConfig: attribute access only.
"""

import math
import zlib
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from .moe import GroupedExperts, MoE, Router, SwiGLU  # SwiGLU is the dense FFN too

__all__ = [
    "RMSNorm",
    "Rotary",
    "Attention",
    "SwiGLU",
    "Block",
    "Transformer",
    "init_weights",
    "build_model",
    "materialize",
    "count_params",
    "count_expert_params",
    "is_moe_layer",
]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32 so bf16 activations do not lose the mean square.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


class Rotary(nn.Module):
    """Rotary position tables, cos and sin of shape (max_seq_len, head_dim / 2), one per model.

    The tables are non-persistent buffers: never in a checkpoint, recomputed by `reset_buffers`
    (init_weights calls it, since a meta-built model has no values) and grown when a longer
    sequence comes.
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float):
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.max_seq_len = max_seq_len
        self.register_buffer("cos", torch.empty(max_seq_len, head_dim // 2), persistent=False)
        self.register_buffer("sin", torch.empty(max_seq_len, head_dim // 2), persistent=False)
        if self.cos.device.type != "meta":
            self.reset_buffers()

    @torch.no_grad()
    def reset_buffers(self, seq_len: Optional[int] = None) -> None:
        n = max(seq_len or 0, self.max_seq_len)
        device = self.cos.device
        # Computed on the CPU in fp64 whatever the device (or an enclosing torch.device context).
        pos = torch.arange(n, dtype=torch.float64, device="cpu")
        dims = torch.arange(0, self.head_dim, 2, dtype=torch.float64, device="cpu")
        angles = torch.outer(pos, self.theta ** (-dims / self.head_dim))  # (n, head_dim / 2)
        self.max_seq_len = n
        self.cos = angles.cos().float().to(device)
        self.sin = angles.sin().float().to(device)

    def forward(self, seq_len: int, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
        """cos, sin tables for positions [0, seq_len), each (seq_len, head_dim / 2)."""
        if seq_len > self.max_seq_len:
            self.reset_buffers(seq_len)
        return self.cos[:seq_len].to(dtype), self.sin[:seq_len].to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: (B, nh, T, hs) rotated pairwise (first half with second half) by position."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class Attention(nn.Module):
    """Causal self-attention; n_kv_heads < n_heads is grouped-query attention (GQA): query head h
    reads key/value head h // (n_heads / n_kv_heads), as in Llama 3 (wk, wv are n_kv_heads wide)."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: Optional[int] = None):
        super().__init__()
        # n_heads / n_kv_heads are the heads this module computes: a tensor-parallel layout lowers them
        # to the heads of its slice of wq/wk/wv (torchtitan's n_local_heads); head_dim never changes.
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads or n_heads
        self.head_dim = d_model // n_heads
        kv_dim = self.n_kv_heads * self.head_dim
        self.wq = nn.Linear(d_model, d_model, bias=False)
        self.wk = nn.Linear(d_model, kv_dim, bias=False)
        self.wv = nn.Linear(d_model, kv_dim, bias=False)
        self.wo = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: Tensor, rope: Tuple[Tensor, Tensor]) -> Tensor:
        b, t, _ = x.shape
        nh, nkv, hs = self.n_heads, self.n_kv_heads, self.head_dim
        q = self.wq(x).view(b, t, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = self.wk(x).view(b, t, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.wv(x).view(b, t, nkv, hs).transpose(1, 2)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        # enable_gqa: SDPA reads each kv head for its n_heads / n_kv_heads query heads without
        # materialising the repeated keys and values.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=nkv != nh)  # (B, nh, T, hs)
        return self.wo(y.transpose(1, 2).reshape(b, t, nh * hs))


def _get(cfg, key: str, default=None):
    # New keys read with a default, so configs written before they existed still build.
    return cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)


def is_moe_layer(cfg, i: int) -> bool:
    """Whether block i has an MoE FFN (the others keep the dense SwiGLU of width ffn_dim)."""
    moe = cfg.moe
    return moe is not None and i >= _get(moe, "first_dense_layers", 0) and (i + 1) % moe.every_n_layers == 0


class Block(nn.Module):
    def __init__(self, cfg, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg.d_model, cfg.n_heads, _get(cfg, "n_kv_heads"))
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        moe = cfg.moe
        if is_moe_layer(cfg, layer_idx):
            self.ffn = MoE.from_config(cfg.d_model, cfg.ffn_dim, moe)
        else:
            self.ffn = SwiGLU(cfg.d_model, cfg.ffn_dim)

    def forward(self, x: Tensor, rope: Tuple[Tensor, Tensor]) -> Tensor:
        x = x + self.attn(self.attn_norm(x), rope)
        return x + self.ffn(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg, max_seq_len: int = 2048):
        super().__init__()
        if cfg.d_model % cfg.n_heads != 0 or (cfg.d_model // cfg.n_heads) % 2 != 0:
            raise ConfigError(
                f"model.d_model={cfg.d_model} must be divisible by model.n_heads={cfg.n_heads} "
                "into an even head size (rotary embeddings rotate pairs). Change either."
            )
        self.cfg = cfg
        self.n_layers = cfg.n_layers
        self.init_std = cfg.init_std
        self.rotary = Rotary(cfg.d_model // cfg.n_heads, max_seq_len, cfg.rope_theta)
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.tie_embeddings = bool(_get(cfg, "tie_embeddings", False))
        self.tie_weights()
        moe = cfg.moe
        self.lb_weight = moe.load_balancing_loss_weight if moe is not None else 0.0
        self.z_weight = moe.z_loss_weight if moe is not None else 0.0

    def tie_weights(self) -> None:
        """tie_embeddings: the output head IS the input embedding (one parameter, (V, d)).

        Called again after `to_empty`, which gives each module its own new parameter."""
        if self.tie_embeddings:
            self.head.weight = self.tok_emb.weight

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens: (B, T) int64 -> logits (B, T, V)."""
        x = self.tok_emb(tokens)  # (B, T, d)
        rope = self.rotary(tokens.shape[1], x.dtype)  # computed once, shared by every layer
        for layer in self.layers:
            x = layer(x, rope)
        return self.head(self.norm(x))

    def moe_layers(self) -> List[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def aux_loss(self) -> Tensor:
        """Mean over MoE layers of lb_weight * load_balancing + z_weight * z_loss (0 if dense)."""
        layers = self.moe_layers()
        if not layers or not layers[0].aux_losses:
            # A plain tensor even when a layout made head.weight a DTensor (it is added to the loss).
            return torch.zeros((), dtype=self.head.weight.dtype, device=self.head.weight.device)
        total = sum(self.lb_weight * m.aux_losses["load_balancing"]
                    + self.z_weight * m.aux_losses["z_loss"] for m in layers)
        return total / len(layers)

    def aux_loss_terms(self) -> Dict[str, Tensor]:
        """Unweighted means over MoE layers, detached, for logging ({} if dense)."""
        layers = [m for m in self.moe_layers() if m.aux_losses]
        if not layers:
            return {}
        return {key: torch.stack([m.aux_losses[key].detach() for m in layers]).mean()
                for key in layers[0].aux_losses}

    def expert_load(self) -> Optional[Tensor]:
        """(num_moe_layers, E) tokens per expert of the last forward, or None."""
        layers = self.moe_layers()
        if not layers or not all(m.stats for m in layers):
            return None
        return torch.stack([m.stats["tokens_per_expert"] for m in layers])


# --------------------------------------------------------------------------------------------
# Initialisation, building, counting
# --------------------------------------------------------------------------------------------


def _generator(seed: int, *key) -> torch.Generator:
    # A stable hash (not Python's salted hash()) so every process derives the same stream.
    text = ":".join(str(part) for part in (seed, *key))
    return torch.Generator().manual_seed(zlib.crc32(text.encode()))


def _is_output_projection(name: str) -> bool:
    # Attention out and FFN/expert down projections write into the residual stream: their std is
    # scaled by 1/sqrt(2 * n_layers) so the residual variance does not grow with depth (GPT-2).
    parts = name.split(".")
    leaf = parts[-2] if parts[-1] == "weight" else parts[-1]
    return leaf in ("wo", "w2")


@torch.no_grad()
def init_weights(model: Transformer, seed: int) -> None:
    """Initialise every parameter from a generator seeded by (seed, name[, global expert index]).

    Matrices ~ Normal(0, init_std), output projections scaled by 1/sqrt(2 * n_layers), norms = 1.
    Values are drawn on the CPU in fp32 then copied, so they do not depend on the device either.
    Also recomputes the rotary tables.
    """
    std = model.init_std
    out_std = std / math.sqrt(2 * model.n_layers)
    experts_params = {}
    for mod_name, mod in model.named_modules():
        if isinstance(mod, GroupedExperts):
            for pname, p in mod.named_parameters(recurse=False):
                experts_params[f"{mod_name}.{pname}"] = mod
    for name, p in model.named_parameters():
        if p.device.type == "meta":
            continue  # nothing to fill (the launcher's meta-device model): the strategy initialises it
        if p.dim() == 1:
            p.fill_(1.0)
            continue
        s = out_std if _is_output_projection(name) else std
        if name in experts_params:
            offset = experts_params[name].expert_offset
            for i in range(p.shape[0]):
                g = _generator(seed, name, offset + i)
                p[i].copy_(torch.randn(p.shape[1:], generator=g) * s)
        else:
            p.copy_(torch.randn(p.shape, generator=_generator(seed, name)) * s)
    for mod in model.modules():
        if isinstance(mod, Rotary):
            mod.reset_buffers()
        if isinstance(mod, Router) and mod.expert_bias is not None:
            mod.expert_bias.zero_()  # aux-loss-free balancing starts unbiased


def materialize(model: Transformer, seed: int, device="cpu") -> Transformer:
    """Allocate a meta-device (possibly sharded) model on `device` and initialise it."""
    model.to_empty(device=device)
    model.tie_weights()
    init_weights(model, seed)
    return model


def build_model(cfg, seed: int, device="cpu", max_seq_len: int = 2048) -> Transformer:
    """Build on the meta device (no memory, no init cost), then allocate and initialise."""
    with torch.device("meta"):
        model = Transformer(cfg, max_seq_len=max_seq_len)
    return materialize(model, seed, device)


def count_params(model: Optional[nn.Module], cfg) -> Dict[str, int]:
    """Parameters of the whole model, from the config (right on a sharded model too).

    params_active_per_token counts each MoE layer's routed experts as top_k of num_experts
    (router and shared experts fully). Buffers (the balancing bias) are not parameters.
    When `model` holds every expert, its size is checked.
    """
    d, v, f = cfg.d_model, cfg.vocab_size, cfg.ffn_dim
    tied = bool(_get(cfg, "tie_embeddings", False))
    embed = (1 if tied else 2) * v * d + d  # embedding, output head (unless tied), final norm
    kv_dim = (_get(cfg, "n_kv_heads") or cfg.n_heads) * (d // cfg.n_heads)
    attn = 2 * d * d + 2 * d * kv_dim + 2 * d  # q, o; k, v; the two block norms
    total = active = embed
    for i in range(cfg.n_layers):
        total += attn
        active += attn
        moe = cfg.moe
        if is_moe_layer(cfg, i):
            h = moe.expert_ffn_dim or f
            expert = 3 * d * h
            fixed = d * moe.num_experts  # router
            if moe.num_shared_experts > 0:
                fixed += 3 * d * (_get(moe, "shared_expert_ffn_dim") or moe.num_shared_experts * h)
                fixed += d if _get(moe, "shared_expert_gate", False) else 0
            total += fixed + moe.num_experts * expert
            active += fixed + moe.top_k * expert
        else:
            total += 3 * d * f
            active += 3 * d * f
    if model is not None and all(m.num_local_experts == m.num_experts
                                 for m in model.modules() if isinstance(m, GroupedExperts)):
        local = sum(p.numel() for p in model.parameters())
        assert local == total, f"count_params: config says {total}, model holds {local}"
    return {"params_total": total, "params_active_per_token": active}


def count_expert_params(cfg) -> int:
    """Parameters of the routed experts (all layers): the part an expert-parallel layout splits."""
    moe = cfg.moe
    if moe is None:
        return 0
    layers = sum(1 for i in range(cfg.n_layers) if is_moe_layer(cfg, i))
    return layers * moe.num_experts * 3 * cfg.d_model * (moe.expert_ffn_dim or cfg.ffn_dim)

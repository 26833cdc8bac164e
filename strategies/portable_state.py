"""Layout-independent checkpoints: every rank saves what it holds, keyed by name, never by rank.

A checkpoint is a directory written with `torch.distributed.checkpoint` (DCP) by all ranks at once:

    stepNNNNNN/
      .metadata, __R_N.distcp   DCP: one flat dict of tensors, each rank writes the keys it holds
      meta.json                 everything that is not a tensor (loop progress, LR schedule, config)
      manifest.json             size and CRC-32 of every file; written last: the completion marker

Tensor keys are parameter names, with each expert split out by its GLOBAL index, so a rank that
holds experts [2, 4) writes and reads exactly those, whatever the mesh at save or load time:

    model.layers.0.attn.wq.weight                      a dense parameter (replicated: DCP keeps one copy)
    model.layers.0.ffn.experts.w1/expert/3             expert 3 of a GroupedExperts stack, (d, h)
    optim/model.layers.0.ffn.experts.w1/expert/3/exp_avg
    optim/model.norm.weight/step
    rng/rank0/torch                                    per-rank RNG states (rank 0's if a rank is new)

Optimizer state is saved for the parameters in this rank's optimizer (with ZeRO-1 a subset) and
loaded the same way, so optimizer sharding can change between save and load too.

Under ZeRO-2/3 parameters and their optimizer state are DTensors (FSDP2 shards): the same keys
hold them, DCP writes each rank's shard with its offsets and reads back whatever slice the loading
layout holds, so a ZeRO-3 checkpoint loads on one process and the other way round. An expert stack
FSDP shards on dim 1 keeps `stack[i]` one expert (a DTensor view); one sharded on dim 0
(strategies/fsdp.py) holds whole experts, and each rank writes and reads those of its local shard.

Safety: DCP stores tensors as raw storages read back with `torch.load(weights_only=True)`; its
`.metadata` index is a pickle, which `SafeReader` reads with an allow-list of the classes DCP
itself writes, so a checkpoint never runs code. `verify()` checks every file against the manifest.

The functions take a module and optimizers, not a strategy: they hold no process group of their
own and work on one process without any (DCP then saves and loads locally).
"""

from __future__ import annotations

import json
import os
import pickle
import random
import warnings
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.tensor import DTensor

from ..trainer.errors import ConfigError
from ..trainer.models.moe import GroupedExperts

FORMAT = "paratrain-checkpoint/1"
META_FILE = "meta.json"
MANIFEST_FILE = "manifest.json"
EXPERT = "/expert/"
OPTIM = "optim"
RNG = "rng"


# --------------------------------------------------------------------------------------------
# Flat, layout-independent state
# --------------------------------------------------------------------------------------------


def _expert_modules(module: nn.Module) -> dict[str, GroupedExperts]:
    return {name: m for name, m in module.named_modules() if isinstance(m, GroupedExperts)}


def expert_rows(stack: torch.Tensor, owner: GroupedExperts) -> list[tuple[int, torch.Tensor]]:
    """(global expert index, that expert) for every expert of a (E_local, ...) stack this rank holds.

    Views, not copies: DCP writes from them and loads into them in place. A stack FSDP shards on
    dim 0 holds an equal run of whole experts per rank (strategies/fsdp.py); those are plain views of
    its local shard, each written by the one rank that holds it."""
    if isinstance(stack, DTensor) and stack.placements[0].is_shard(0):
        local = stack.to_local()
        start = owner.expert_offset + stack.device_mesh.get_local_rank() * local.shape[0]
        return [(start + j, local[j]) for j in range(local.shape[0])]
    return [(owner.expert_offset + i, stack[i]) for i in range(stack.shape[0])]


def _split(name: str, tensor: torch.Tensor, experts: dict[str, GroupedExperts]) -> dict[str, torch.Tensor]:
    """{key: tensor}: a stacked expert tensor (E_local, ...) becomes one entry per global expert."""
    owner = experts.get(name.rpartition(".")[0])
    if owner is None or tensor.ndim == 0:
        return {name: tensor}
    return {f"{name}{EXPERT}{index}": expert for index, expert in expert_rows(tensor, owner)}


def model_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every persistent tensor of `module` this rank holds, experts split by global index.

    Works on a meta-device module too (for shape checks before anything is allocated)."""
    experts = _expert_modules(module)
    out = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        out.update(_split(name, tensor.detach(), experts))
    return out


def _optim_prefix(index: int) -> str:
    return OPTIM if index == 0 else f"{OPTIM}{index}"


def _hyperparams(group: dict) -> dict:
    """The scheduled values of a param group (the rest comes from the config of the resumed run)."""
    return {k: v for k, v in group.items() if k in ("lr", "initial_lr") and isinstance(v, (int, float))}


def optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer, index: int = 0) -> dict:
    """{"state": flat tensors keyed by parameter name (+ expert), "param_groups": scheduled values}.

    Only parameters in this optimizer appear: with ZeRO-1 each rank writes the state it owns."""
    names = {id(p): name for name, p in module.named_parameters()}
    experts = _expert_modules(module)
    prefix = _optim_prefix(index)
    state = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            owner = experts.get(name.rpartition(".")[0])
            for key, value in optimizer.state.get(p, {}).items():
                if value is None:
                    continue  # e.g. SGD without momentum keeps momentum_buffer=None
                value = value.detach() if torch.is_tensor(value) else torch.tensor(value)
                if owner is None:
                    state[f"{prefix}/{name}/{key}"] = value
                    continue
                if value.ndim > 0 and value.shape[0] != owner.num_local_experts:
                    raise NotImplementedError(
                        f"optimizer state {key!r} of {name} has shape {tuple(value.shape)}: only per-expert "
                        f"stacked ({owner.num_local_experts}, ...) or scalar state can be split by expert.")
                # Scalars (Adam's step) are shared by the stack: every expert keeps a copy.
                rows = expert_rows(value, owner) if value.ndim else [(i, value) for i, _ in expert_rows(p, owner)]
                for index, row in rows:
                    state[f"{prefix}/{name}{EXPERT}{index}/{key}"] = row
    return {"state": state, "param_groups": [_hyperparams(g) for g in optimizer.param_groups]}


def rng_state(rank: int) -> dict[str, torch.Tensor]:
    """This rank's torch, numpy, Python (and CUDA) generator states, as tensors."""
    p = f"{RNG}/rank{rank}"
    version, mt, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()  # ("MT19937", keys, pos, has_gauss, cached)
    out = {
        f"{p}/torch": torch.get_rng_state(),
        f"{p}/python": torch.tensor([version, *mt], dtype=torch.int64),
        f"{p}/python_gauss": torch.tensor([float("nan") if gauss is None else gauss], dtype=torch.float64),
        f"{p}/numpy": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        f"{p}/numpy_pos": torch.tensor([pos, has_gauss], dtype=torch.int64),
        f"{p}/numpy_gauss": torch.tensor([cached], dtype=torch.float64),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out[f"{p}/cuda"] = torch.cuda.get_rng_state()
    return out


def restore_rng(tensors: dict[str, torch.Tensor], rank: int) -> None:
    p = f"{RNG}/rank{rank}"
    torch.set_rng_state(tensors[f"{p}/torch"])
    py = tensors[f"{p}/python"].tolist()
    gauss = tensors[f"{p}/python_gauss"].item()
    random.setstate((py[0], tuple(py[1:]), None if gauss != gauss else gauss))
    pos, has_gauss = tensors[f"{p}/numpy_pos"].tolist()
    np.random.set_state(("MT19937", tensors[f"{p}/numpy"].numpy().astype(np.uint32), pos, has_gauss,
                         tensors[f"{p}/numpy_gauss"].item()))
    if f"{p}/cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors[f"{p}/cuda"])


# --------------------------------------------------------------------------------------------
# Files: JSON beside DCP, manifest, safe metadata
# --------------------------------------------------------------------------------------------


class _JSONEncoder(json.JSONEncoder):
    def default(self, o):
        if torch.is_tensor(o):
            return o.tolist()
        if isinstance(o, (np.generic,)):
            return o.item()
        if isinstance(o, (set, tuple)):
            return list(o)
        if isinstance(o, Path):
            return str(o)
        # Lightning's own state (loops, schedules, precision) is plain data; a callback's may not be.
        warnings.warn(f"checkpoint: a {type(o).__name__} in the training state is not plain data; it is saved as its "
                      f"type name only and will not be restored on resume")
        return f"<{type(o).__name__}>"


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(obj, indent=1, cls=_JSONEncoder) + "\n")
        f.flush()
        os.fsync(f.fileno())  # DCP fsyncs its files too: the manifest must not outlive what it lists
    os.replace(tmp, path)


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def _file_entry(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "crc32": _crc32(path)}


# The classes a DCP `.metadata` pickle refers to (as written by torch 2.13). Anything else is refused.
_SAFE_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "TensorProperties", "ChunkStorageMetadata",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
     ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
     ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "Path")}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _SAFE_GLOBALS or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not a class DCP metadata uses")


class SafeReader(FileSystemReader):
    """FileSystemReader whose `.metadata` index is unpickled with an allow-list (no code runs)."""

    def read_metadata(self, *args, **kwargs):
        rank = kwargs.get("rank")
        path = Path(self.path) / (".metadata" if rank is None else f"__{rank}.metadata")
        with open(path, "rb") as f:
            metadata = _SafeUnpickler(f).load()
        if getattr(metadata, "storage_meta", None) is None:
            from torch.distributed.checkpoint.metadata import StorageMeta
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def tensor_metadata(path) -> dict[str, Any]:
    """{key: TensorStorageMetadata (size, properties.dtype)} of a checkpoint, read safely."""
    return {k: v for k, v in SafeReader(path).read_metadata().state_dict_metadata.items() if hasattr(v, "size")}


def read_meta(path) -> dict:
    return json.loads((Path(path) / META_FILE).read_text())


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used: missing, partial, corrupt or of another model."""


def verify(path) -> dict:
    """Check a complete checkpoint against its manifest; return meta.json. Raises CheckpointError.

    Reads every file once (CRC-32); the page cache then serves DCP's read right after."""
    path = Path(path)
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise CheckpointError(
            f"{path} is not a complete checkpoint: it has no {MANIFEST_FILE}, which is written last, so it was "
            f"interrupted while being written (or is not a paratrain checkpoint). Resume from an earlier one "
            f"(resume=auto picks the newest complete checkpoint).")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{manifest_path} is corrupt ({e}). Resume from another checkpoint.") from None
    problems = []
    for name, want in files.items():
        f = path / name
        if not f.is_file():
            problems.append(f"{name} is missing")
        elif f.stat().st_size != want["bytes"]:
            problems.append(f"{name} has {f.stat().st_size} bytes, the manifest says {want['bytes']}")
        elif _crc32(f) != want["crc32"]:
            problems.append(f"{name} fails its CRC-32 check (contents changed after saving)")
    if problems:
        raise CheckpointError(
            f"checkpoint {path} is corrupt: {'; '.join(problems)}. It cannot be loaded; resume from an earlier "
            f"checkpoint (resume=PATH) or delete this one so that resume=auto picks the previous one.")
    try:
        meta = read_meta(path)
        tensor_metadata(path)
    except Exception as e:  # noqa: BLE001 - any failure here means the files are not what we wrote
        raise CheckpointError(f"checkpoint {path} is corrupt: {type(e).__name__}: {e}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} has format {meta.get('format')!r}; this paratrain reads {FORMAT!r}.")
    return meta


# --------------------------------------------------------------------------------------------
# Save and load (collective when a process group exists)
# --------------------------------------------------------------------------------------------


@contextmanager
def _quiet():
    # On one process DCP warns that it "assumes the intent is to save in a single process": it is.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled, unavailable or uninitialized.*")
        yield


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _all_gather(obj) -> list:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def save(path, checkpoint: dict) -> None:
    """Write a Lightning checkpoint dict into directory `path` from every rank in parallel.

    `checkpoint["state_dict"]` and each `checkpoint["optimizer_states"][i]["state"]` are flat tensor
    dicts (model_state / optimizer_state); replicated keys are written once (DCP deduplicates).
    The rest of the dict (loops, LR schedules, config) must be plain data: rank 0 writes it as JSON.
    Ends with manifest.json, the completion marker. Every rank must call this."""
    path = Path(path)
    rank = _rank()
    checkpoint = dict(checkpoint)
    tensors = dict(checkpoint.pop("state_dict"))
    optimizers = []
    for opt in checkpoint.pop("optimizer_states", []):
        tensors.update(opt["state"])
        optimizers.append({"param_groups": opt["param_groups"]})
    tensors.update(rng_state(rank))
    with _quiet():
        dcp.save(tensors, storage_writer=dcp.FileSystemWriter(path, thread_count=1))
    # Each rank checksums the data files it wrote (DCP names them __RANK_N.distcp): in parallel.
    mine = {f.name: _file_entry(f) for f in sorted(path.glob(f"__{rank}_*"))}
    files = {k: v for part in _all_gather(mine) for k, v in part.items()}
    if rank == 0:
        _write_json(path / META_FILE, {"format": FORMAT, **checkpoint, "optimizers": optimizers})
        for name in (".metadata", META_FILE):
            files[name] = _file_entry(path / name)
        _write_json(path / MANIFEST_FILE, {"format": FORMAT, "files": files})


def _check_shapes(expected: dict[str, tuple], saved: dict[str, Any], path, what="model") -> None:
    missing = sorted(set(expected) - set(saved))
    shape = [f"{k}: checkpoint {tuple(saved[k].size)} vs {what} {expected[k]}"
             for k in sorted(set(expected) & set(saved)) if tuple(saved[k].size) != tuple(expected[k])]
    if missing or shape:
        def few(items):
            return ", ".join(items[:6]) + (f" (+{len(items) - 6} more)" if len(items) > 6 else "")
        parts = []
        if shape:
            parts.append(f"shapes differ for {few(shape)}")
        if missing:
            parts.append(f"missing from the checkpoint: {few(missing)}")
        raise CheckpointError(
            f"checkpoint {path} holds another model than this run's: {'; '.join(parts)}. Resume with the "
            f"model.* settings the checkpoint was trained with, or start a fresh run (resume=null).")


def check_model(path, module: nn.Module) -> None:
    """Raise CheckpointError naming every parameter whose key or shape differs (meta module is fine)."""
    saved = tensor_metadata(path)
    saved_model = {k: v for k, v in saved.items() if not k.startswith((OPTIM, RNG + "/"))}
    expected = {k: tuple(v.shape) for k, v in model_state(module).items()}
    _check_shapes(expected, saved_model, path)
    unexpected = sorted(set(saved_model) - set(expected))
    if unexpected:
        raise CheckpointError(
            f"checkpoint {path} holds another model than this run's: parameters not in this model: "
            f"{', '.join(unexpected[:6])}{' ...' if len(unexpected) > 6 else ''}. Resume with the model.* "
            f"settings the checkpoint was trained with, or start a fresh run (resume=null).")


def load(path, module: nn.Module, optimizers: list[torch.optim.Optimizer]) -> dict:
    """Load into `module` (in place, this rank's experts) and its optimizers; return meta.json.

    After the layout is applied and the optimizers exist. Every rank must call this."""
    path = Path(path)
    rank = _rank()
    saved = tensor_metadata(path)
    meta = read_meta(path)

    targets = model_state(module)
    _check_shapes({k: tuple(v.shape) for k, v in targets.items()}, saved, path)

    saved_groups = [o["param_groups"] for o in meta.get("optimizers", [])]
    for optimizer, groups in zip(optimizers, saved_groups):
        if len(groups) != len(optimizer.param_groups):
            raise CheckpointError(
                f"checkpoint {path} has {len(groups)} optimizer parameter groups, this run "
                f"{len(optimizer.param_groups)}: the optimizer set-up changed. Resume with the same optimizer.")

    # Optimizer state: allocate what the checkpoint holds for the parameters in this rank's optimizer.
    state_keys: dict[str, list[str]] = {}  # "optim/<name>[/expert/<i>]/" -> ["exp_avg", "step", ...]
    for key in saved:
        if key.startswith(OPTIM):
            head, _, leaf = key.rpartition("/")
            state_keys.setdefault(head + "/", []).append(leaf)
    names = {id(p): name for name, p in module.named_parameters()}
    experts = _expert_modules(module)
    wanted = []  # (param, its group, owner GroupedExperts or None, per-expert key heads, state keys)
    for index, optimizer in enumerate(optimizers):
        prefix = _optim_prefix(index)
        for group in optimizer.param_groups:
            for p in group["params"]:
                name = names[id(p)]
                owner = experts.get(name.rpartition(".")[0])
                heads = ([f"{prefix}/{name}{EXPERT}{index}/" for index, _ in expert_rows(p, owner)]
                         if owner is not None else [f"{prefix}/{name}/"])
                leaves = sorted(state_keys.get(heads[0], []))
                whole = {}  # leaf -> a tensor laid out like p (a DTensor under FSDP), loaded in place
                for leaf in leaves:
                    md = saved[heads[0] + leaf]
                    per_key_shape = tuple(p.shape[1:]) if owner is not None else tuple(p.shape)
                    if tuple(md.size) == per_key_shape and len(per_key_shape) > 0:
                        whole[leaf] = torch.empty_like(p, dtype=md.properties.dtype, device=p.device)
                        views = [row for _, row in expert_rows(whole[leaf], owner)] if owner is not None else [whole[leaf]]
                        for head, view in zip(heads, views):
                            targets[head + leaf] = view
                        continue
                    for head in heads:
                        md = saved[head + leaf]
                        targets[head + leaf] = torch.empty(tuple(md.size), dtype=md.properties.dtype)
                wanted.append((optimizer, p, group, owner, heads, leaves, whole))

    rng_rank = rank if f"{RNG}/rank{rank}/torch" in saved else 0  # a rank the checkpoint did not have
    rng_keys = [k for k in saved if k.startswith(f"{RNG}/rank{rng_rank}/")]
    for key in rng_keys:
        targets[key] = torch.empty(tuple(saved[key].size), dtype=saved[key].properties.dtype)

    with _quiet():
        dcp.load(targets, storage_reader=SafeReader(path))

    for optimizer, p, group, owner, heads, leaves, whole in wanted:
        state = {}
        for leaf in leaves:
            if leaf in whole:
                state[leaf] = whole[leaf]
                continue
            parts = [targets[head + leaf] for head in heads]
            # An expert stack's state is (E_local, ...) again; its scalars were copies: take one.
            value = torch.stack(parts) if owner is not None and parts[0].ndim > 0 else parts[0]
            # Scalars (Adam's step) stay on the CPU as torch keeps them, unless the optimizer is on-device.
            on_device = value.ndim > 0 or group.get("capturable") or group.get("fused")
            state[leaf] = value.to(p.device) if on_device else value
        if state:
            optimizer.state[p] = state
    for optimizer, groups in zip(optimizers, saved_groups):
        for group, values in zip(optimizer.param_groups, groups):
            group.update(values)  # the scheduled lr of the step the checkpoint ends

    restore_rng({k.replace(f"rank{rng_rank}/", f"rank{rank}/"): targets[k] for k in rng_keys}, rank)
    return meta


def consolidated_model_state(path) -> dict[str, torch.Tensor]:
    """The whole model from a checkpoint on one process: {state_dict name: tensor}, experts stacked.

    For export and tests; loads every model tensor into memory."""
    saved = tensor_metadata(path)
    keys = [k for k in saved if not k.startswith((OPTIM, RNG + "/"))]
    flat = {k: torch.empty(tuple(saved[k].size), dtype=saved[k].properties.dtype) for k in keys}
    with _quiet():
        dcp.load(flat, storage_reader=SafeReader(path), no_dist=True)
    out, stacks = {}, {}
    for key, tensor in flat.items():
        if EXPERT in key:
            name, _, index = key.partition(EXPERT)
            stacks.setdefault(name, {})[int(index)] = tensor
        else:
            out[key] = tensor
    for name, parts in stacks.items():
        out[name] = torch.stack([parts[i] for i in range(len(parts))])
    return out

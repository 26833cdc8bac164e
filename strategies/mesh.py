"""The device mesh: how many processes each parallel axis gets, and the process groups it implies.

This file is the one owner of the mesh. Nothing else in paratrain calls `dist.new_group` or builds
a `DeviceMesh`; strategies ask for groups through the accessors at the bottom.

Two halves, used at different times:

- `ParallelDims` is pure arithmetic. It resolves `strategy.mesh.*` (with -1 = infer) against the
  world size and checks the rules, so the CLI can reject a bad layout before it spawns anything.
- `build_mesh` turns resolved dims into a `DeviceMesh` once the default process group exists.

Rank layout. Axes are listed outermost first and the last one is innermost:

    rank = ((pp_index * dp + dp_index) * ep + ep_index) * tp + tp_index
                                                          # dp=2 x ep=2:  ep groups {0,1} {2,3}
                                                          #               dp groups {0,2} {1,3}
                                                          # dp=2 x tp=2:  tp groups {0,1} {2,3}
                                                          # pp=2 x dp=2:  pp groups {0,2} {1,3}

pp is outermost: a pipeline's stages exchange only activations, point to point, so they can sit on
different nodes; the ranks of one stage (its `stage_mesh`) are contiguous. An axis of degree 1 that
only some layouts use (pp) is left out of the mesh, so the other layouts' meshes, names and log
lines do not change.

tp is innermost: a tp group (ranks that hold different slices of the same weight matrices and
exchange activations in every block) is a run of contiguous ranks, inside a node. An ep group
(ranks that exchange tokens and hold different expert shards) comes next. A dp group holds ranks
with the same expert shard: expert gradients are reduced over it. The ranks of one tp group read
the same slice of the global batch: the data ranks are the (dp, ep) coordinates (`data_rank`).

A new axis joins by adding a field with default 1 and its name to `AXES`, in layout order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from paratrain.trainer.errors import ConfigError

WORLD_KEY = "trainer.devices * trainer.num_nodes"
"""How error messages name the world size: the two keys a user sets to change it."""

INFER = -1
"""A degree of -1 asks for the axis to take whatever the other axes leave of the world."""


def _key(axis: str) -> str:
    return f"strategy.mesh.{axis}"


@dataclass(frozen=True)
class ParallelDims:
    """Degrees of every mesh axis, resolved against the world size. Creates no process group.

    `ParallelDims(dp=-1, ep=2, world_size=8)` resolves to dp=4, ep=2. Raises `ConfigError` when
    the degrees cannot cover the world exactly once.
    """

    dp: int
    """Data-parallel degree (replicas of each expert shard); -1 = infer."""
    ep: int
    """Expert-parallel degree (ranks the experts of one MoE layer are split over); -1 = infer."""
    world_size: int
    """Processes in the job: trainer.devices * trainer.num_nodes."""
    tp: int = 1
    """Tensor-parallel degree (ranks each weight matrix is split over); innermost; -1 = infer."""
    pp: int = 1
    """Pipeline-parallel degree (stages the model's blocks are split over); outermost; -1 = infer."""

    AXES = ("pp", "dp", "ep", "tp")
    """Axis names in layout order, outermost first; the last axis holds contiguous ranks."""
    OPTIONAL = ("pp",)
    """Axes left out of the mesh (and of its description) at degree 1."""

    def __post_init__(self) -> None:
        # An optional axis at its default stays out of the rules and their messages.
        requested = {axis: getattr(self, axis) for axis in self.AXES if axis not in self.OPTIONAL or getattr(self, axis) != 1}
        resolved = _resolve(requested, self.world_size)
        for axis, degree in resolved.items():
            object.__setattr__(self, axis, degree)  # frozen: resolution happens once, here
        object.__setattr__(
            self, "_inferred", tuple(a for a, d in requested.items() if d == INFER)
        )

    @classmethod
    def from_config(cls, mesh: Any, trainer: Any) -> "ParallelDims":
        """From the `strategy.mesh` and `trainer` config nodes."""
        return cls(dp=mesh.dp, ep=mesh.ep, tp=getattr(mesh, "tp", 1), pp=getattr(mesh, "pp", 1),
                   world_size=trainer.devices * trainer.num_nodes)

    # --- the axes, generically -------------------------------------------------------------

    @property
    def axis_names(self) -> Tuple[str, ...]:
        """The axes of the mesh: every axis but an optional one at degree 1."""
        return tuple(a for a in self.AXES if a not in self.OPTIONAL or getattr(self, a) > 1)

    @property
    def degrees(self) -> Tuple[int, ...]:
        """Degrees in `axis_names` order: the shape of the mesh."""
        return tuple(getattr(self, axis) for axis in self.axis_names)

    def degree(self, axis: str) -> int:
        if axis not in self.AXES:
            raise KeyError(f"no mesh axis {axis!r}; axes are {self.AXES}")
        return getattr(self, axis)

    @property
    def data_ranks(self) -> int:
        """Ranks that read different slices of the global batch: dp x ep (tp ranks and a pipeline's stages share one)."""
        return self.dp * self.ep

    def as_dict(self) -> Dict[str, int]:
        """{"dp": 2, "ep": 2}: what summary.json and logs record as the mesh. dp and ep always (the
        layouts users know); tp and pp only when they split something, as in `describe`."""
        return {a: d for a, d in zip(self.axis_names, self.degrees) if a in ("dp", "ep") or d > 1}

    def data_rank(self, rank: int) -> int:
        """Which slice of the global batch `rank` reads: its (dp, ep) coordinate, row-major (tp ranks
        and a pipeline's stages share one)."""
        coord = self.coordinate(rank)
        return coord["dp"] * self.ep + coord["ep"]

    def coordinate(self, rank: int) -> Dict[str, int]:
        """This rank's index along every axis (row-major, the last axis innermost)."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside a world of {self.world_size}")
        coord = {}
        for axis, degree in reversed(list(zip(self.axis_names, self.degrees))):
            rank, coord[axis] = divmod(rank, degree)
        return {axis: coord[axis] for axis in self.axis_names}

    def axis_ranks(self, axis: str, rank: int) -> List[int]:
        """The ranks that share every coordinate with `rank` except along `axis`: its group there."""
        coord = self.coordinate(rank)
        stride = math.prod(self.degrees[self.axis_names.index(axis) + 1 :])
        base = rank - coord[axis] * stride
        return [base + i * stride for i in range(self.degree(axis))]

    # --- rules that involve other config sections ------------------------------------------

    def validate_experts(self, num_experts: int) -> int:
        """Check that every ep rank holds the same number of experts; return that number."""
        ep_text = f"{_key('ep')}={self.ep}" + (" (inferred)" if "ep" in self._inferred else "")
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
            raise ConfigError(
                f"model.moe.num_experts={num_experts!r} is not a valid expert count: an MoE layer "
                f"needs at least one expert. Set model.moe.num_experts to a positive integer "
                f"(a multiple of {self.ep}, for {ep_text})."
            )
        if num_experts % self.ep:
            raise ConfigError(
                f"model.moe.num_experts={num_experts} is not divisible by {ep_text}: every "
                f"expert-parallel rank must hold the same number of experts. Use a multiple of "
                f"{self.ep} for model.moe.num_experts, or a {_key('ep')} that divides {num_experts}."
            )
        return num_experts // self.ep

    def describe(self, num_experts: Optional[int] = None) -> str:
        """One line for logs: "dp=2 x ep=2 over 4 processes; 4 experts per rank"."""
        # dp and ep always (the layouts users know); other axes only when they split something.
        axes = " x ".join(f"{axis}={degree}" for axis, degree in zip(self.axis_names, self.degrees)
                          if axis in ("dp", "ep") or degree > 1)
        plural = "process" if self.world_size == 1 else "processes"
        text = f"{axes} over {self.world_size} {plural}"
        if num_experts is not None:
            per_rank = self.validate_experts(num_experts)
            text += f"; {per_rank} expert{'' if per_rank == 1 else 's'} per rank"
        return text


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _resolve(requested: Dict[str, int], world_size: int) -> Dict[str, int]:
    """Replace at most one -1 by what the world leaves for it; check the product covers the world."""
    if not _is_int(world_size) or world_size < 1:
        raise ConfigError(
            f"{WORLD_KEY} = {world_size!r}: a run needs at least one process. "
            f"Set trainer.devices and trainer.num_nodes to positive integers."
        )
    for axis, degree in requested.items():
        if not _is_int(degree) or (degree < 1 and degree != INFER):
            raise ConfigError(
                f"{_key(axis)}={degree!r} is not a valid degree: each mesh axis spans at least one "
                f"process, or -1 to infer it from {WORLD_KEY}. "
                f"Set {_key(axis)} to a positive integer or -1."
            )

    inferred = [axis for axis, degree in requested.items() if degree == INFER]
    if len(inferred) > 1:
        both = " and ".join(f"{_key(axis)}=-1" for axis in inferred)
        raise ConfigError(
            f"{both}: only one mesh axis can be inferred from {WORLD_KEY} = {world_size}. "
            f"Give every axis but one an explicit degree."
        )

    fixed = {axis: degree for axis, degree in requested.items() if degree != INFER}
    fixed_product = math.prod(fixed.values())
    # Messages name dp and ep always, a later axis (tp) only when it is set: tp=1 is the default.
    fixed = {axis: degree for axis, degree in fixed.items() if axis in ("dp", "ep") or degree != 1}
    fixed_text = " x ".join(f"{_key(axis)}={degree}" for axis, degree in fixed.items())

    if inferred:
        axis = inferred[0]
        if world_size % fixed_product:
            if len(fixed) == 1:
                others = f"set {fixed_text.split('=')[0]} to a divisor of {world_size}"
            else:
                keys = ", ".join(_key(a) for a in fixed)
                others = f"set {keys} so that their product divides {world_size}"
            raise ConfigError(
                f"{_key(axis)}=-1 cannot be inferred: {WORLD_KEY} = {world_size} is not divisible "
                f"by {fixed_text}. Make {WORLD_KEY} a multiple of {fixed_product}, or {others}."
            )
        return {a: (world_size // fixed_product if a == axis else d) for a, d in requested.items()}

    if fixed_product != world_size:
        processes = "1 process" if fixed_product == 1 else f"{fixed_product} processes"
        raise ConfigError(
            f"{fixed_text} = {processes}, but {WORLD_KEY} = {world_size}: the mesh must cover every "
            f"process exactly once. Set the degrees so their product is {world_size}, or use -1 on "
            f"one axis to infer it."
        )
    return dict(requested)


# --- process groups (need an initialised default process group) ------------------------------


def build_mesh(dims: ParallelDims, device_type: str) -> DeviceMesh:
    """The `DeviceMesh` of `dims` over the default process group ("cpu" or "cuda")."""
    if not dist.is_initialized():
        raise RuntimeError("build_mesh needs the default process group: call it after setup")
    actual = dist.get_world_size()
    if actual != dims.world_size:
        raise ConfigError(
            f"{WORLD_KEY} = {dims.world_size}, but the job started {actual} processes: the mesh "
            f"{dims.describe()} must cover the processes that exist. Launch exactly "
            f"{dims.world_size} processes (under SLURM: --ntasks-per-node=trainer.devices, "
            f"--nodes=trainer.num_nodes), or set {WORLD_KEY} = {actual}."
        )
    # init_device_mesh lays ranks out row-major over `degrees`, which is our rank layout, and
    # creates one process group per axis slice. A slice spanning the world reuses WORLD.
    mesh = init_device_mesh(device_type, dims.degrees, mesh_dim_names=dims.axis_names)
    if dims.ep > 1:
        # The data ranks of this rank's tp slice, one axis (dense gradients are reduced over it, FSDP
        # shards dense parameters over it). Flattened once, here, on every rank at the same time:
        # it creates a process group.
        mesh[("dp", "ep")]._flatten("data")
    if dims.ep > 1 and dims.tp > 1:
        mesh[("dp", "tp")]._flatten("expert_replicas")  # the ranks holding one expert shard
    if dims.tp > 1:
        # Every rank of a stage: FSDP shards the MoE router (replicated over tp, fed tp-sharded tokens) over it.
        mesh[tuple(a for a in dims.axis_names if a != "pp")]._flatten("replicas")
    return mesh


def stage_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The sub-mesh of this rank's pipeline stage (all of `mesh` without pp): the ranks that hold the
    same layers, over which a stage's gradients are reduced."""
    if "pp" not in mesh.mesh_dim_names:
        return mesh
    return mesh[tuple(a for a in mesh.mesh_dim_names if a != "pp")]


def pp_rank(mesh: DeviceMesh) -> int:
    """Which pipeline position this rank holds (0 without pp): stages pp_rank, pp_rank + pp, ..."""
    return axis_rank(mesh, "pp") if "pp" in mesh.mesh_dim_names else 0


def axis_group(mesh: DeviceMesh, axis: str) -> dist.ProcessGroup:
    """The group of ranks that differ from this one only along `axis`."""
    return mesh.get_group(axis)


def axis_rank(mesh: DeviceMesh, axis: str) -> int:
    """This rank's coordinate along `axis`."""
    return mesh.get_local_rank(axis)


def axis_size(mesh: DeviceMesh, axis: str) -> int:
    return mesh.size(mesh.mesh_dim_names.index(axis))


def dp_group(mesh: DeviceMesh) -> dist.ProcessGroup:
    """Ranks holding the same expert shard: expert gradients are reduced over this group."""
    return axis_group(mesh, "dp")


def ep_group(mesh: DeviceMesh) -> dist.ProcessGroup:
    """Ranks that exchange tokens by all-to-all and hold different expert shards."""
    return axis_group(mesh, "ep")


def ep_rank(mesh: DeviceMesh) -> int:
    """Which expert shard this rank holds: experts [ep_rank * E/ep, (ep_rank + 1) * E/ep)."""
    return axis_rank(mesh, "ep")


def tp_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The 1-D mesh of this rank's tp group: DTensor parameters are placed on it."""
    return mesh["tp"]


def tp_group(mesh: DeviceMesh) -> dist.ProcessGroup:
    """Ranks holding different slices of the same weight matrices; they read the same data."""
    return axis_group(mesh, "tp")


def data_group(mesh: DeviceMesh) -> dist.ProcessGroup:
    """Ranks that read different data and share this rank's tp coordinate (dp x ep).

    Gradients of parameters sharded over tp are reduced here; the world when tp is 1."""
    if axis_size(mesh, "tp") == 1:
        return world_group(mesh)
    return data_mesh(mesh).get_group()


def expert_replica_group(mesh: DeviceMesh) -> dist.ProcessGroup:
    """Ranks holding the same expert shard (same ep coordinate): dp x tp."""
    if axis_size(mesh, "tp") == 1:
        return dp_group(mesh)
    if axis_size(mesh, "ep") == 1:
        return world_group(mesh)
    return mesh["expert_replicas"].get_group()


def world_group(mesh: DeviceMesh) -> dist.ProcessGroup:
    """Every rank of the mesh (the job, or one pipeline stage's `stage_mesh`): dense gradients are reduced here."""
    if mesh.size() == dist.get_world_size():
        return dist.group.WORLD
    return mesh._flatten().get_group()  # every rank calls this in the same order: a collective


def expert_replica_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """A 1-D mesh over the ranks holding this rank's expert shard (`expert_replica_group`): FSDP shards
    each expert shard over it."""
    if axis_size(mesh, "tp") == 1:
        return mesh["dp"]
    if axis_size(mesh, "ep") == 1:
        return mesh["replicas"]
    return mesh["expert_replicas"]  # flattened in build_mesh


def replica_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """Under tp: a 1-D mesh over every rank of this rank's stage (dp x ep x tp): FSDP shards the MoE
    router over it (replicated on all of them, and each tp rank's gradient is a partial sum)."""
    return mesh["replicas"]  # flattened in build_mesh


def data_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """A 1-D mesh over the data ranks of this rank's tp slice (dp x ep): FSDP shards dense parameters over it."""
    if axis_size(mesh, "ep") == 1:
        return mesh["dp"]
    return mesh["data"]  # flattened in build_mesh

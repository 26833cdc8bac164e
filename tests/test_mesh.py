"""The mesh: degree arithmetic and its error messages (no process group), then real groups on gloo."""

import re

import pytest

from paratrain.strategies.mesh import ParallelDims
from paratrain.trainer.errors import ConfigError
from paratrain.trainer.schema import MeshConfig, TrainerConfig


def _valid_layouts():
    """(dp, ep, world) as a user may write them, with the degrees they resolve to."""
    for world in (1, 2, 4, 8):
        for dp in (d for d in range(1, world + 1) if world % d == 0):
            ep = world // dp
            for asked in ((dp, ep), (-1, ep), (dp, -1)):
                yield pytest.param(*asked, world, (dp, ep), id=f"{asked[0]}x{asked[1]}@{world}")


@pytest.mark.parametrize("dp, ep, world, expected", list(_valid_layouts()))
def test_valid_layouts_resolve(dp, ep, world, expected):
    dims = ParallelDims(dp=dp, ep=ep, world_size=world)
    assert dims.degrees == (*expected, 1)  # tp defaults to 1
    assert (dims.dp, dims.ep, dims.world_size) == (*expected, world)
    assert dims.axis_names == ("dp", "ep", "tp")
    assert dims.as_dict() == dict(zip(("dp", "ep"), expected))  # tp (and pp) only when > 1
    assert dims == ParallelDims(*expected, world)


def test_rank_layout_puts_ep_innermost():
    dims = ParallelDims(dp=2, ep=2, world_size=4)
    assert [dims.coordinate(r) for r in range(4)] == [
        {"dp": 0, "ep": 0, "tp": 0}, {"dp": 0, "ep": 1, "tp": 0}, {"dp": 1, "ep": 0, "tp": 0}, {"dp": 1, "ep": 1, "tp": 0},
    ]
    assert dims.axis_ranks("ep", 2) == [2, 3]  # contiguous: ranks that exchange tokens
    assert dims.axis_ranks("dp", 1) == [1, 3]  # same expert shard
    wide = ParallelDims(dp=2, ep=4, world_size=8)
    assert wide.axis_ranks("ep", 5) == [4, 5, 6, 7]
    assert wide.axis_ranks("dp", 5) == [1, 5]


def test_rank_layout_puts_tp_innermost_and_tp_ranks_share_data():
    dims = ParallelDims(dp=2, ep=1, tp=2, world_size=4)
    assert dims.axis_ranks("tp", 2) == [2, 3]  # contiguous: inside a node
    assert dims.axis_ranks("dp", 1) == [1, 3]
    assert [dims.data_rank(r) for r in range(4)] == [0, 0, 1, 1]
    assert dims.data_ranks == 2
    assert ParallelDims(dp=1, ep=2, tp=2, world_size=4).describe(num_experts=4) == \
        "dp=1 x ep=2 x tp=2 over 4 processes; 2 experts per rank"
    assert ParallelDims(dp=2, ep=1, tp=-1, world_size=8).tp == 4


def test_from_config_multiplies_devices_and_nodes():
    dims = ParallelDims.from_config(MeshConfig(dp=-1, ep=2), TrainerConfig(devices=4, num_nodes=2))
    assert (dims.dp, dims.ep, dims.world_size) == (4, 2, 8)


def test_describe():
    assert ParallelDims(2, 2, 4).describe(num_experts=8) == "dp=2 x ep=2 over 4 processes; 4 experts per rank"
    assert ParallelDims(1, 1, 1).describe() == "dp=1 x ep=1 over 1 process"
    assert ParallelDims(1, 4, 4).describe(num_experts=4) == "dp=1 x ep=4 over 4 processes; 1 expert per rank"


WORLD = re.escape("trainer.devices * trainer.num_nodes")


INVALID = {  # id: (dp, ep, world, the whole message as a regex)
    "product-too-big": (
        2, 3, 4,
        rf"^strategy\.mesh\.dp=2 x strategy\.mesh\.ep=3 = 6 processes, but {WORLD} = 4: the mesh must "
        r"cover every process exactly once\. Set the degrees so their product is 4, or use -1 on one "
        r"axis to infer it\.$",
    ),
    "product-too-small": (
        1, 1, 2,
        rf"^strategy\.mesh\.dp=1 x strategy\.mesh\.ep=1 = 1 process, but {WORLD} = 2: .* product is 2,",
    ),
    "two-inferred": (
        -1, -1, 4,
        rf"^strategy\.mesh\.dp=-1 and strategy\.mesh\.ep=-1: only one mesh axis can be inferred from "
        rf"{WORLD} = 4\. Give every axis but one an explicit degree\.$",
    ),
    "zero": (
        0, 1, 1,
        rf"^strategy\.mesh\.dp=0 is not a valid degree: .*-1 to infer it from {WORLD}\. "
        r"Set strategy\.mesh\.dp to a positive integer or -1\.$",
    ),
    "negative": (
        2, -3, 4,
        r"^strategy\.mesh\.ep=-3 is not a valid degree: .*"
        r"Set strategy\.mesh\.ep to a positive integer or -1\.$",
    ),
    "inference-does-not-divide": (
        4, -1, 6,
        rf"^strategy\.mesh\.ep=-1 cannot be inferred: {WORLD} = 6 is not divisible by strategy\.mesh\.dp=4\. "
        rf"Make {WORLD} a multiple of 4, or set strategy\.mesh\.dp to a divisor of 6\.$",
    ),
    "empty-world": (
        1, 1, 0,
        rf"^{WORLD} = 0: a run needs at least one process\. "
        r"Set trainer\.devices and trainer\.num_nodes to positive integers\.$",
    ),
    "not-an-int": (1.5, 1, 2, r"^strategy\.mesh\.dp=1\.5 is not a valid degree"),
}


@pytest.mark.parametrize("dp, ep, world, pattern", list(INVALID.values()), ids=list(INVALID))
def test_invalid_layouts_name_keys_values_and_fix(dp, ep, world, pattern):
    with pytest.raises(ConfigError, match=pattern):
        ParallelDims(dp=dp, ep=ep, world_size=world)


def test_num_experts_must_divide_over_ep():
    assert ParallelDims(2, 2, 4).validate_experts(8) == 4
    with pytest.raises(
        ConfigError,
        match=r"^model\.moe\.num_experts=6 is not divisible by strategy\.mesh\.ep=4: every expert-parallel "
        r"rank must hold the same number of experts\. Use a multiple of 4 for model\.moe\.num_experts, "
        r"or a strategy\.mesh\.ep that divides 6\.$",
    ):
        ParallelDims(1, 4, 4).validate_experts(6)
    with pytest.raises(ConfigError, match=r"strategy\.mesh\.ep=4 \(inferred\)"):
        ParallelDims(1, -1, 4).validate_experts(6)
    with pytest.raises(ConfigError, match=r"^model\.moe\.num_experts=0 is not a valid expert count"):
        ParallelDims(1, 1, 1).validate_experts(0)
    with pytest.raises(ConfigError, match="not divisible"):
        ParallelDims(1, 4, 4).describe(num_experts=6)


# --- real process groups -------------------------------------------------------------------------

from distributed import run_on_ranks  # noqa: E402  (tests/ is on sys.path under pytest)

SHAPES = [(2, 2), (4, 1), (1, 4)]


def _report_groups(rank, world_size):
    import torch.distributed as dist

    from paratrain.strategies import mesh as m

    report = {}
    for dp, ep in SHAPES:
        dims = ParallelDims(dp, ep, world_size)
        mesh = m.build_mesh(dims, "cpu")
        report[(dp, ep)] = {
            "dp_group": dist.get_process_group_ranks(m.dp_group(mesh)),
            "ep_group": dist.get_process_group_ranks(m.ep_group(mesh)),
            "world_group": dist.get_process_group_ranks(m.world_group(mesh)),
            "coordinate": {"dp": m.axis_rank(mesh, "dp"), "ep": m.ep_rank(mesh)},
            "sizes": (m.axis_size(mesh, "dp"), m.axis_size(mesh, "ep")),
        }
    try:
        m.build_mesh(ParallelDims(1, 2, 2), "cpu")
    except ConfigError as e:
        report["wrong_world"] = str(e)
    return report


@pytest.fixture(scope="module")
def group_reports():
    return run_on_ranks(_report_groups, 4, timeout_s=30)


def test_hybrid_mesh_groups(group_reports):
    expected = {  # rank: (dp group, ep group, coordinate)
        0: ([0, 2], [0, 1], {"dp": 0, "ep": 0}),
        1: ([1, 3], [0, 1], {"dp": 0, "ep": 1}),
        2: ([0, 2], [2, 3], {"dp": 1, "ep": 0}),
        3: ([1, 3], [2, 3], {"dp": 1, "ep": 1}),
    }
    for rank, report in enumerate(group_reports):
        got = report[(2, 2)]
        assert (got["dp_group"], got["ep_group"], got["coordinate"]) == expected[rank], rank
        assert got["world_group"] == [0, 1, 2, 3]
        assert got["sizes"] == (2, 2)


@pytest.mark.parametrize("shape", [(4, 1), (1, 4)], ids=["ddp-4x1", "expert-1x4"])
def test_one_axis_meshes(group_reports, shape):
    dp, ep = shape
    for rank, report in enumerate(group_reports):
        got = report[shape]
        assert got["dp_group"] == ([0, 1, 2, 3] if dp == 4 else [rank])
        assert got["ep_group"] == ([0, 1, 2, 3] if ep == 4 else [rank])
        assert got["coordinate"] == {"dp": rank if dp == 4 else 0, "ep": rank if ep == 4 else 0}
        # The groups the mesh built agree with the arithmetic the CLI uses before spawning.
        dims = ParallelDims(dp, ep, 4)
        assert got["dp_group"] == dims.axis_ranks("dp", rank)
        assert got["ep_group"] == dims.axis_ranks("ep", rank)


def test_mesh_must_match_the_processes_that_exist(group_reports):
    message = group_reports[0]["wrong_world"]
    assert re.match(rf"^{WORLD} = 2, but the job started 4 processes: .*Launch exactly 2 processes", message)

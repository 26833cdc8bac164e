"""GradientSync: N ranks with the hooks reproduce the single-process gradient of the global batch.

Tolerance: fp32, rtol 1e-5, atol 1e-6 (the only difference from the reference is the order of
the floating-point sums).
"""

import pytest
import torch
import torch.nn as nn

from paratrain.strategies.grad_sync import GradientSync, ReductionGroup, reduction_groups_for
from paratrain.trainer.errors import ConfigError

from distributed import run_on_ranks

RTOL, ATOL = 1e-5, 1e-6
GLOBAL_BATCH = 8
BUCKET_MB = 512 / 2**20  # 512 bytes: the toy model spans several buckets


class Offset(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(dim))


class Toy(nn.Module):
    """An MLP plus two parameters some steps leave without a gradient.

    Registration order sets the bucket order (reversed; see BUCKETS): `side` sits in the first
    bucket, so a rank without its gradient must still launch the later buckets in the same order
    as the others; `never` sits in the last one.
    """

    def __init__(self):
        super().__init__()
        self.never = Offset(3)  # no sample ever uses it
        self.l1 = nn.Linear(6, 16)
        self.l2 = nn.Linear(16, 16)
        self.side = Offset(3)  # used only by samples with use_side=True
        self.l3 = nn.Linear(16, 3)

    def forward(self, x, use_side):  # x: (B, 6) -> (B, 3)
        y = self.l3(torch.tanh(self.l2(torch.tanh(self.l1(x)))))
        return y + self.side.bias if use_side else y


BUCKETS = [  # at BUCKET_MB = 512 bytes
    ["l3.bias", "l3.weight", "side.bias", "l2.bias"],  # 12 + 192 + 12 + 64 bytes
    ["l2.weight"],  # 1024 bytes: a bucket of its own
    ["l1.bias", "l1.weight", "never.bias"],  # 64 + 384 + 12 bytes
]


def bucket_layout(sync, model):
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in bucket.params] for bucket in sync.buckets]


def make_model():
    torch.manual_seed(0)
    return Toy()


def make_batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(GLOBAL_BATCH, 6, generator=g), torch.randn(GLOBAL_BATCH, 3, generator=g)


def chunk_loss(model, rows, use_side, share):
    """Mean squared error over `rows` of the global batch, weighted by `share` of the loss."""
    x, y = make_batch()
    return ((model(x[rows], use_side) - y[rows]) ** 2).mean() * share


def reference_grads(chunks):
    """Single process: gradient of the global-batch mean, the batch split into (rows, use_side)."""
    model = make_model()
    loss = sum(chunk_loss(model, rows, side, len(rows) / GLOBAL_BATCH) for rows, side in chunks)
    loss.backward()
    return grads_of(model)


def grads_of(model):
    return {n: (None if p.grad is None else p.grad.detach().clone()) for n, p in model.named_parameters()}


def assert_grads_equal(got, expected):
    assert got.keys() == expected.keys()
    for name in expected:
        if expected[name] is None:
            assert got[name] is None, f"{name}: expected no gradient"
        else:
            assert got[name] is not None, f"{name}: gradient missing"
            torch.testing.assert_close(got[name], expected[name], rtol=RTOL, atol=ATOL, msg=name)


# --- two ranks, one process group: the cases run in one spawn --------------------------------


def _two_rank_cases(rank, world_size):
    rows = list(range(rank * 4, rank * 4 + 4))  # this rank's half of the global batch
    out = {}

    def sync_for(model):
        return GradientSync([ReductionGroup(list(model.parameters()), None, 1 / world_size)], BUCKET_MB,
                            record_events=True)

    # 1. every sample uses `side`; three steps: grads set to None, then zeroed in place (views).
    model = make_model()
    sync = sync_for(model)
    steps = []
    for set_to_none in (True, True, False):
        chunk_loss(model, rows, True, 1.0).backward()
        sync.finish()
        steps.append({"grads": grads_of(model), "events": list(sync.events),
                      "calls": sync.num_allreduce_calls, "bytes": sync.allreduce_bytes})
        model.zero_grad(set_to_none=set_to_none)
    out["full"] = {"steps": steps, "num_buckets": sync.num_buckets, "layout": bucket_layout(sync, model)}

    # 2. only rank 0's samples use `side`: rank 1 never produces its gradient.
    model = make_model()
    sync = sync_for(model)
    chunk_loss(model, rows, rank == 0, 1.0).backward()
    sync.finish()
    out["side_on_rank0"] = {"grads": grads_of(model), "events": list(sync.events),
                            "calls": sync.num_allreduce_calls, "num_buckets": sync.num_buckets}

    # 3. accumulation: two micro-steps, the first not synced; `side` only in the first.
    model = make_model()
    sync = sync_for(model)
    with sync.no_sync():
        chunk_loss(model, rows[:2], True, 0.5).backward()
        sync.finish()  # a strategy may call it after every backward: a no-op here
    events_after_first = list(sync.events)
    chunk_loss(model, rows[2:], False, 0.5).backward()
    sync.finish()
    out["accumulation"] = {"grads": grads_of(model), "events_after_first": events_after_first,
                           "calls": sync.num_allreduce_calls, "num_buckets": sync.num_buckets}
    return out


@pytest.fixture(scope="module")
def two_ranks():
    return run_on_ranks(_two_rank_cases, 2, timeout_s=30)


def test_two_ranks_match_single_process(two_ranks):
    expected = reference_grads([(list(range(8)), True)])
    for report in two_ranks:
        for step in report["full"]["steps"]:  # also after zero_grad(set_to_none=False)
            assert_grads_equal(step["grads"], expected)


def test_allreduce_starts_during_backward(two_ranks):
    for report in two_ranks:
        full = report["full"]
        assert full["layout"] == BUCKETS
        for step in full["steps"]:
            events = step["events"]
            kinds = [e[0] for e in events]
            first_allreduce = kinds.index("allreduce")
            last_grad = len(kinds) - 1 - kinds[::-1].index("grad_ready")
            assert first_allreduce < last_grad, events  # overlapped with the rest of backward
            # Every bucket but the one holding `never` (no gradient ever) starts inside backward.
            assert kinds[:last_grad].count("allreduce") == full["num_buckets"] - 1, events
            assert step["calls"] == full["num_buckets"]  # one all-reduce per bucket per step
            assert kinds[-1] == "finish"


def test_parameter_without_gradient_on_one_rank(two_ranks):
    expected = reference_grads([(list(range(0, 4)), True), (list(range(4, 8)), False)])
    for report in two_ranks:
        assert_grads_equal(report["side_on_rank0"]["grads"], expected)  # side: rank 0's half / 2
        assert report["side_on_rank0"]["calls"] == report["side_on_rank0"]["num_buckets"]
    # Rank 1 lacks `side` (bucket 0), so bucket 1, complete during backward, waits for finish():
    # both ranks all-reduce buckets 0, 1, 2 in that order.
    rank0, rank1 = ([e for e in r["side_on_rank0"]["events"] if e[0] != "grad_ready"] for r in two_ranks)
    assert rank0 == rank1 == [("allreduce", 0), ("allreduce", 1), ("allreduce", 2), ("finish",)]
    kinds = [e[0] for e in two_ranks[0]["side_on_rank0"]["events"]]
    assert kinds.index("allreduce") < len(kinds) - 1 - kinds[::-1].index("grad_ready")
    kinds = [e[0] for e in two_ranks[1]["side_on_rank0"]["events"]]
    assert kinds.index("allreduce") > len(kinds) - 1 - kinds[::-1].index("grad_ready")


def test_accumulation_syncs_once_over_accumulated_grads(two_ranks):
    expected = reference_grads([([0, 1], True), ([2, 3], False), ([4, 5], True), ([6, 7], False)])
    for report in two_ranks:
        acc = report["accumulation"]
        assert acc["events_after_first"] == []  # no hook did anything, nothing was all-reduced
        assert acc["calls"] == acc["num_buckets"]
        assert_grads_equal(acc["grads"], expected)


# --- four ranks, dp=2 x ep=2: sub-groups and the expert scaling --------------------------------

NUM_EXPERTS, D = 2, 3
TOKENS = 8  # global batch of tokens; rank r takes tokens 2r (-> expert 0) and 2r + 1 (-> expert 1)


def make_expert_model():
    torch.manual_seed(0)
    return torch.randn(D, D) / D**0.5, torch.randn(NUM_EXPERTS, D, D) / D**0.5  # dense W, experts E


def expert_batch():
    g = torch.Generator().manual_seed(2)
    return torch.randn(TOKENS, D, generator=g), torch.randn(TOKENS, D, generator=g)


def expert_reference():
    """Single process: token t goes to expert t % 2; loss = mean over tokens of squared error."""
    w, e = (t.requires_grad_() for t in make_expert_model())
    x, target = expert_batch()
    h = torch.tanh(x @ w.T)
    y = torch.einsum("tij,tj->ti", e[torch.arange(TOKENS) % NUM_EXPERTS], h)
    ((y - target) ** 2).sum(-1).mean().backward()
    return w.grad, e.grad


def _four_rank_cases(rank, world_size):
    import torch.distributed as dist
    from torch.distributed._functional_collectives import all_to_all_single_autograd

    from paratrain.strategies import mesh as m

    out = {}
    mesh = m.build_mesh(m.ParallelDims(2, 2, world_size), "cpu")

    # a. A group over the dp sub-group ({0, 2} or {1, 3}) reduces only there, with its scale.
    p = nn.Parameter(torch.zeros(5))
    sync = GradientSync([ReductionGroup([p], m.dp_group(mesh), 0.25)], bucket_size_mb=1)
    (p * (rank + 1)).sum().backward()
    sync.finish()
    out["subgroup"] = {"grad": p.grad.clone(), "calls": sync.num_allreduce_calls,
                       "members": dist.get_process_group_ranks(m.dp_group(mesh))}

    # b. Expert parallel by hand: dense W replicated, expert shard E[ep_rank] here; tokens go to
    #    their expert and back by differentiable all-to-all over the ep group.
    w0, e0 = make_expert_model()
    w, expert = nn.Parameter(w0.clone()), nn.Parameter(e0[m.ep_rank(mesh)].clone())
    sync = GradientSync(reduction_groups_for([w, expert], [expert], mesh), bucket_size_mb=1)
    x, target = expert_batch()
    mine = slice(2 * rank, 2 * rank + 2)
    h = torch.tanh(x[mine] @ w.T)  # (2, D): row j is for expert j, held by ep rank j
    ep = m.ep_group(mesh)
    received = all_to_all_single_autograd(h, [1, 1], [1, 1], ep)  # row j from ep rank j
    y = all_to_all_single_autograd(received @ expert.T, [1, 1], [1, 1], ep)  # back to its owner
    ((y - target[mine]) ** 2).sum(-1).mean().backward()
    sync.finish()
    out["expert"] = {"w": w.grad.clone(), "expert": expert.grad.clone(), "ep_rank": m.ep_rank(mesh),
                     "calls": sync.num_allreduce_calls}

    # c. dp=1 x ep=4: an expert shard has no replica, so it is only scaled (no collective).
    mesh = m.build_mesh(m.ParallelDims(1, 4, world_size), "cpu")
    q = nn.Parameter(torch.zeros(2))
    sync = GradientSync(reduction_groups_for([q], [q], mesh), bucket_size_mb=1)
    (q * (rank + 1)).sum().backward()
    sync.finish()
    out["no_replica"] = {"grad": q.grad.clone(), "calls": sync.num_allreduce_calls}
    return out


@pytest.fixture(scope="module")
def four_ranks():
    return run_on_ranks(_four_rank_cases, 4, timeout_s=30)


def test_subgroup_reduces_only_within_the_group(four_ranks):
    for rank, report in enumerate(four_ranks):
        sub = report["subgroup"]
        assert sub["members"] == [rank % 2, rank % 2 + 2]
        expected = sum(r + 1 for r in sub["members"]) * 0.25  # ranks 0,2: 1.0; ranks 1,3: 1.5
        torch.testing.assert_close(sub["grad"], torch.full((5,), float(expected)))
        assert sub["calls"] == 1


def test_expert_grads_scaled_by_world_not_dp(four_ranks):
    w_ref, e_ref = expert_reference()
    for report in four_ranks:
        exp = report["expert"]
        torch.testing.assert_close(exp["w"], w_ref, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(exp["expert"], e_ref[exp["ep_rank"]], rtol=RTOL, atol=ATOL)
        assert exp["calls"] == 2  # dense bucket over the world, expert bucket over dp


def test_group_of_one_rank_only_scales(four_ranks):
    for rank, report in enumerate(four_ranks):
        torch.testing.assert_close(report["no_replica"]["grad"], torch.full((2,), (rank + 1) / 4))
        assert report["no_replica"]["calls"] == 0


# --- one process, no process group: bucketing and bookkeeping ------------------------------------


def test_buckets_pack_in_reverse_order_and_big_params_get_their_own():
    a, b, c, d = (nn.Parameter(torch.zeros(n)) for n in (100, 10, 1000, 10))  # 400, 40, 4000, 40 B
    e = nn.Parameter(torch.zeros(10, dtype=torch.float64))
    sync = GradientSync([ReductionGroup([a, b, c, d, e], None, 1.0)], bucket_size_mb=500 / 2**20)
    layout = [[p.numel() for p in bucket.params] for bucket in sync.buckets]
    assert layout == [[10], [10], [1000], [10, 100]]  # e (float64) apart; d; c alone; then b + a
    assert [bucket.params[0] is e for bucket in sync.buckets] == [True, False, False, False]


def test_first_and_last_buckets_are_bounded_apart_from_the_rest():
    # Gradients arrive last for the first-registered params: the bucket holding them is bounded by
    # last_bucket_mb (its all-reduce overlaps nothing), the one holding the first to arrive by
    # first_bucket_mb, the rest by bucket_size_mb; a param bigger than a bound gets its own bucket.
    kib = 2**-10
    sizes = (1, 1, 4, 4, 2, 1, 3)  # KiB, registration order; backward produces them reversed
    params = [nn.Parameter(torch.zeros(n * 256)) for n in sizes]

    def layout(**bounds):
        sync = GradientSync([ReductionGroup(params, None, 1.0)], bucket_size_mb=8 * kib, **bounds)
        return [[p.numel() * p.element_size() // 1024 for p in bucket.params] for bucket in sync.buckets]

    assert layout(first_bucket_mb=2 * kib) == [[3], [1, 2, 4], [4, 1, 1]]
    assert layout(first_bucket_mb=2 * kib, last_bucket_mb=2 * kib) == [[3], [1, 2, 4], [4], [1, 1]]
    # One buffer holds one dtype: a float64 param ends the last bucket early.
    params[1] = nn.Parameter(torch.zeros(128, dtype=torch.float64))
    assert layout(first_bucket_mb=2 * kib, last_bucket_mb=2 * kib) == [[3], [1, 2, 4], [4], [1], [1]]


def test_single_process_scale_views_and_missing_grads():
    used, unused = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2))
    sync = GradientSync([ReductionGroup([used, unused], None, 0.5)], bucket_size_mb=1)
    (used * 4).sum().backward()
    sync.finish()
    torch.testing.assert_close(used.grad, torch.full((3,), 2.0))
    assert unused.grad is None  # no rank had a gradient: stays None, as without sync
    assert used.grad.data_ptr() == sync.buckets[0].buffer.data_ptr() + 2 * 4  # a view, no copy back
    assert sync.num_allreduce_calls == 0  # a group of one process needs no collective


def test_backward_twice_without_no_sync_is_an_error():
    p = nn.Parameter(torch.ones(2))
    sync = GradientSync([ReductionGroup([p], None, 1.0)], bucket_size_mb=1)
    p.sum().backward()
    with pytest.raises(RuntimeError, match="no_sync"):
        p.sum().backward()


def test_bucket_size_must_be_positive():
    p = nn.Parameter(torch.ones(2))
    pattern = r"^strategy\.bucket_size_mb=0 is not a valid bucket size: .*Set it to a value > 0"
    with pytest.raises(ConfigError, match=pattern):
        GradientSync([ReductionGroup([p], None, 1.0)], bucket_size_mb=0)


def test_a_parameter_in_two_groups_is_rejected():
    p = nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="two reduction groups"):
        GradientSync([ReductionGroup([p], None, 1.0), ReductionGroup([p], None, 1.0)])

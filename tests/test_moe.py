"""MoE layer: equality with a plain per-expert loop, grouped_mm vs fallback, losses, capacity."""

import math

import pytest
import torch
import torch.nn.functional as F

from paratrain.trainer.models.moe import (
    GroupedExperts,
    LocalTokenDispatcher,
    MoE,
    capacity_keep_mask,
    expert_capacity,
    grouped_mm_supported,
    load_balancing_loss,
    permute_by_expert,
    router_z_loss,
    unpermute_and_combine,
)

# fp32 throughout: the optimised path and the reference differ only in summation order.
TOL = dict(rtol=1e-5, atol=1e-6)


def make_moe(seed=0, d=16, num_experts=4, top_k=2, hidden=8, **kwargs):
    torch.manual_seed(seed)
    moe = MoE(d, num_experts, top_k, hidden, **kwargs)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, 0.3)
    return moe


def reference_moe(moe: MoE, x: torch.Tensor):
    """Plain loops, written from the definition: route each token, then for every expert run the
    tokens that picked it (within capacity) and add weight * output to those tokens."""
    b, t, d = x.shape
    xf = x.reshape(b * t, d)
    logits = xf @ moe.router.gate.weight.t()
    if moe.router.score == "softmax":
        scores = torch.softmax(logits, -1)
    else:
        scores = torch.sigmoid(logits)
    weights, idx = torch.topk(scores, moe.top_k, dim=-1)
    if moe.router.renormalize:
        weights = weights / weights.sum(-1, keepdim=True)

    keep = torch.ones_like(idx, dtype=torch.bool)
    if moe.capacity_factor is not None:
        cap = math.ceil(moe.capacity_factor * t * moe.top_k / moe.num_experts)
        for s in range(b):
            used = [0] * moe.num_experts
            for tok in range(t):
                for j in range(moe.top_k):
                    e = int(idx[s * t + tok, j])
                    keep[s * t + tok, j] = used[e] < cap
                    used[e] += 1

    out = torch.zeros_like(xf)
    ex = moe.experts
    for e in range(moe.num_experts):
        rows, slots = torch.nonzero((idx == e) & keep, as_tuple=True)
        if len(rows) == 0:
            continue
        xe = xf[rows]
        ye = (F.silu(xe @ ex.w1[e]) * (xe @ ex.w3[e])) @ ex.w2[e]
        out = out.index_add(0, rows, weights[rows, slots].unsqueeze(1) * ye)
    if moe.shared is not None:
        sh = moe.shared
        out = out + sh.w2(F.silu(sh.w1(xf)) * sh.w3(xf))
    return out.view(b, t, d), keep


def grads(module, x, y, g):
    params = [p for _, p in module.named_parameters()]
    return torch.autograd.grad(y, [x] + params, g)


@pytest.mark.parametrize("use_grouped_mm", [True, False])
@pytest.mark.parametrize("score,renormalize", [("softmax", True), ("sigmoid", True),
                                               ("sigmoid", False)])
@pytest.mark.parametrize("capacity_factor", [None, 0.75])
@pytest.mark.parametrize("num_shared_experts", [0, 1])
def test_moe_matches_per_expert_loop(use_grouped_mm, score, renormalize, capacity_factor,
                                     num_shared_experts):
    moe = make_moe(router_score=score, renormalize=renormalize, capacity_factor=capacity_factor,
                   num_shared_experts=num_shared_experts)
    moe.experts.use_grouped_mm = use_grouped_mm
    x = torch.randn(3, 10, 16, requires_grad=True)
    g = torch.randn(3, 10, 16)

    y = moe(x)
    y_ref, keep_ref = reference_moe(moe, x)
    torch.testing.assert_close(y, y_ref, **TOL)

    # Gradients of the input, the router and every expert / shared weight.
    for a, b in zip(grads(moe, x, y, g), grads(moe, x, y_ref, g)):
        torch.testing.assert_close(a, b, **TOL)

    kept = int(keep_ref.sum())
    assert moe.stats["tokens_per_expert"].sum().item() == kept
    assert moe.stats["dropped_fraction"].item() == pytest.approx(1 - kept / (3 * 10 * 2))
    if capacity_factor is not None:
        assert kept < 3 * 10 * 2, "the capacity case must actually drop something"


def test_aux_losses_are_differentiable_and_reach_the_router():
    moe = make_moe()
    moe(torch.randn(2, 6, 16))
    loss = moe.aux_losses["load_balancing"] + moe.aux_losses["z_loss"]
    (grad,) = torch.autograd.grad(loss, moe.router.gate.weight)
    assert grad.abs().sum() > 0


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_grouped_mm_path_equals_loop_path(dtype, tol):
    # Expert 1 and 3 get no tokens: empty groups must give no rows and zero weight gradients.
    torch.manual_seed(0)
    ex = GroupedExperts(num_experts=4, d_model=16, hidden_dim=8)
    with torch.no_grad():
        for p in ex.parameters():
            p.normal_(0.0, 0.3)
    ex = ex.to(dtype)
    counts = torch.tensor([5, 0, 7, 0])
    x = torch.randn(12, 16, dtype=dtype)
    assert grouped_mm_supported(x, ex.w1)
    g = torch.randn(12, 16, dtype=dtype)

    outs = []
    for use in (True, False):
        ex.use_grouped_mm = use
        xi = x.clone().requires_grad_()
        y = ex(xi, counts)
        outs.append([y] + list(torch.autograd.grad(y, [xi, ex.w1, ex.w3, ex.w2], g)))
    for a, b in zip(*outs):
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)
    grad_w1 = outs[0][2]
    assert grad_w1[1].abs().max() == 0 and grad_w1[3].abs().max() == 0


def test_grouped_mm_with_no_tokens_and_summed_output():
    ex = GroupedExperts(num_experts=3, d_model=8, hidden_dim=8)
    torch.nn.init.normal_(ex.w1), torch.nn.init.normal_(ex.w3), torch.nn.init.normal_(ex.w2)
    x = torch.zeros(0, 8, requires_grad=True)
    y = ex(x, torch.zeros(3, dtype=torch.long))
    assert y.shape == (0, 8)
    y.sum().backward()  # a stride-0 gradient: the module makes it contiguous for grouped_mm
    assert ex.w1.grad.abs().max() == 0
    x = torch.randn(5, 8, requires_grad=True)
    ex(x, torch.tensor([2, 0, 3])).sum().backward()
    assert x.grad.shape == (5, 8)


def test_grouped_mm_not_used_when_unaligned():
    # bf16 rows of 12 elements are 24 bytes: not a multiple of 16, so the loop runs instead.
    x = torch.randn(4, 12, dtype=torch.bfloat16)
    assert not grouped_mm_supported(x, torch.randn(2, 12, 16, dtype=torch.bfloat16))
    assert not grouped_mm_supported(x.double(), torch.randn(2, 12, 16, dtype=torch.float64))
    ex = GroupedExperts(2, 12, 6).to(torch.bfloat16)
    torch.nn.init.normal_(ex.w1), torch.nn.init.normal_(ex.w3), torch.nn.init.normal_(ex.w2)
    assert ex(x, torch.tensor([1, 3])).shape == (4, 12)


def test_permute_then_combine_round_trip():
    x = torch.arange(4 * 3, dtype=torch.float32).view(4, 3)
    idx = torch.tensor([[2, 0], [0, 1], [2, 1], [0, 2]])
    keep = torch.tensor([[True, True], [True, False], [True, True], [False, True]])
    xs, counts, order = permute_by_expert(x, idx, keep, num_experts=3)
    assert counts.tolist() == [2, 1, 3]
    # Stable: within an expert, rows stay in (token, slot) order.
    assert (order // 2).tolist() == [0, 1, 2, 0, 2, 3]
    torch.testing.assert_close(xs, x[[0, 1, 2, 0, 2, 3]])
    w = torch.tensor([[0.5, 0.5], [1.0, 2.0], [0.25, 0.75], [3.0, 1.0]])
    out = unpermute_and_combine(xs, order, w)
    # Kept weights sum to 1 for every token (dropped ones are ignored), so out == x.
    torch.testing.assert_close(out, x)


def test_local_dispatcher_refuses_sharded_experts():
    ex = GroupedExperts(4, 8, 8)
    ex.keep_experts(2, 2)
    with pytest.raises(RuntimeError, match="all-to-all dispatcher"):
        LocalTokenDispatcher()(torch.randn(3, 8), torch.zeros(3, 1, dtype=torch.long),
                               torch.ones(3, 1), None, ex)


def test_sharded_experts_sum_to_the_full_layer():
    """What an expert-parallel dispatcher does, without processes: each shard runs the tokens of
    its experts (re-sorted by local expert with the same helpers); the shard outputs add up."""
    moe = make_moe(num_experts=4, top_k=2)
    x = torch.randn(20, 16)
    _, _, w, idx = moe.router(x)
    full = moe.dispatcher(x, idx, w, None, moe.experts)

    total = torch.zeros_like(x)
    for start in (0, 2):
        shard = GroupedExperts(4, 16, 8)
        shard.load_state_dict(moe.experts.state_dict())
        shard.keep_experts(start, 2)
        mine = (idx >= start) & (idx < start + 2)
        xs, counts, order = permute_by_expert(x, idx - start, mine, num_experts=2)
        total = total + unpermute_and_combine(shard(xs, counts), order, w)
    torch.testing.assert_close(total, full, **TOL)


def test_keep_experts_slices_and_sets_offset():
    ex = GroupedExperts(8, 4, 4)
    torch.nn.init.normal_(ex.w1)
    w1 = ex.w1.detach().clone()
    ex.keep_experts(4, 2)
    assert ex.num_local_experts == 2 and ex.expert_offset == 4 and ex.num_experts == 8
    torch.testing.assert_close(ex.w1, w1[4:6], rtol=0, atol=0)
    with torch.device("meta"):
        meta = GroupedExperts(8, 4, 4)
    meta.keep_experts(6, 2)
    assert meta.w2.shape == (2, 4, 4) and meta.w2.is_meta
    with pytest.raises(ValueError, match="outside the 8 experts"):
        GroupedExperts(8, 4, 4).keep_experts(6, 4)


# --- losses, by hand ----------------------------------------------------------------------


def test_load_balancing_loss_by_hand():
    # Sequence 1: 4 tokens, 2 experts, top-1 choices 0, 0, 1, 0.
    #   f = (3/4, 1/4); P = mean probs = (2.6/4, 1.4/4) = (0.65, 0.35)
    #   loss = 2 * (0.75 * 0.65 + 0.25 * 0.35) = 1.15
    # Sequence 2: uniform probs, every token to expert 1: f = (0, 1), P = (.5, .5) -> 1.0
    # Mean over sequences: 1.075 (pooling the 8 tokens instead would give 0.9625).
    probs = torch.tensor([[[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]],
                          [[0.5, 0.5], [0.5, 0.5], [0.5, 0.5], [0.5, 0.5]]])
    idx = torch.tensor([[[0], [0], [1], [0]], [[1], [1], [1], [1]]])
    assert load_balancing_loss(probs, idx, 2).item() == pytest.approx(1.075, abs=1e-6)
    assert load_balancing_loss(probs[0], idx[0], 2).item() == pytest.approx(1.15, abs=1e-6)
    # top-2 of 2 experts: f = (1/2, 1/2) whatever the router says, so the loss is 1.
    idx2 = torch.tensor([[0, 1], [1, 0], [0, 1], [1, 0]])
    assert load_balancing_loss(probs[0], idx2, 2).item() == pytest.approx(1.0, abs=1e-6)
    # d loss / d probs[t, e] = E * f_e / T: for sequence 1 alone, (2*0.75/4, 2*0.25/4).
    p = probs[0].clone().requires_grad_()
    load_balancing_loss(p, idx[0], 2).backward()
    torch.testing.assert_close(p.grad, torch.tensor([[0.375, 0.125]] * 4))


def test_router_z_loss_by_hand():
    # logsumexp(0, 0) = ln 2; logsumexp(ln 3, 0) = ln 4 = 2 ln 2
    # mean of squares = (ln2^2 + 4 ln2^2) / 2 = 2.5 * 0.480453 = 1.201133
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    assert router_z_loss(logits).item() == pytest.approx(1.201133, abs=1e-5)


# --- capacity -------------------------------------------------------------------------------


def test_expert_capacity_formula():
    assert expert_capacity(1.25, 128, 2, 8) == 40  # ceil(1.25 * 128 * 2 / 8)
    assert expert_capacity(1.0, 6, 1, 4) == 2  # ceil(1.5)


def test_capacity_drops_by_hand():
    # T=6, E=2, top-1, cf=1 -> capacity ceil(6/2) = 3: expert 0 is picked by tokens 0,1,2,3,5;
    # tokens 3 and 5 come after the first three and drop; token 4 (expert 1) stays.
    idx = torch.tensor([[[0], [0], [0], [0], [1], [0]]])
    keep = capacity_keep_mask(idx, 2, expert_capacity(1.0, 6, 1, 2))
    assert keep.view(-1).tolist() == [True, True, True, False, True, False]

    # T=4, E=4, top-2, cf=1 -> capacity ceil(4*2/4) = 2. Expert 0 is picked by tokens 0, 1, 2, 3:
    # tokens 0 and 1 win, (2, slot 0) and (3, slot 1) drop; experts 1, 2, 3 stay within capacity.
    idx = torch.tensor([[[0, 1], [1, 0], [0, 2], [3, 0]]])
    keep = capacity_keep_mask(idx, 4, expert_capacity(1.0, 4, 2, 4))
    assert keep[0].tolist() == [[True, True], [True, True], [False, True], [True, False]]


def test_capacity_is_per_sequence_so_a_split_batch_drops_the_same():
    moe = make_moe(capacity_factor=0.5, num_experts=4, top_k=2)
    x = torch.randn(4, 12, 16)
    y_full = moe(x)
    full_stats, full_lb = moe.stats, moe.aux_losses["load_balancing"]
    halves, counts, lbs = [], 0, []
    for part in x.split(2):
        halves.append(moe(part))
        counts = counts + moe.stats["tokens_per_expert"]
        lbs.append(moe.aux_losses["load_balancing"])
    assert full_stats["dropped_fraction"] > 0
    torch.testing.assert_close(torch.cat(halves), y_full, **TOL)
    torch.testing.assert_close(counts, full_stats["tokens_per_expert"], rtol=0, atol=0)
    # The balancing loss is a mean over sequences: the mean of the halves' losses is the same.
    torch.testing.assert_close(torch.stack(lbs).mean(), full_lb, **TOL)


def test_bad_router_settings_are_config_errors():
    from paratrain.trainer.errors import ConfigError

    with pytest.raises(ConfigError, match=r"model\.moe\.top_k=5 .*model\.moe\.num_experts=4"):
        MoE(8, num_experts=4, top_k=5, expert_ffn_dim=8)
    with pytest.raises(ConfigError, match=r"router_score='tanh'.*softmax or sigmoid"):
        MoE(8, num_experts=4, top_k=2, expert_ffn_dim=8, router_score="tanh")


def test_bf16_layer_runs_grouped_mm_and_tracks_fp32():
    moe = make_moe(capacity_factor=1.0)
    x = torch.randn(2, 8, 16)
    y32 = moe(x)
    moe16 = make_moe(capacity_factor=1.0).to(torch.bfloat16)
    xb = x.bfloat16().requires_grad_()
    assert grouped_mm_supported(xb, moe16.experts.w1)
    y16 = moe16(xb)
    assert y16.dtype == torch.bfloat16
    y16.float().square().sum().backward()
    assert moe16.experts.w1.grad.dtype == torch.bfloat16
    assert moe16.router.gate.weight.grad.abs().sum() > 0
    # bf16 keeps 8 bits of mantissa; relative to the output scale, errors here are ~2e-4
    # typical and ~1e-2 at worst (fixed seed, no top-2 choice flips under rounding).
    err = (y16.float() - y32).abs() / y32.abs().max()
    assert err.median() < 5e-3 and err.max() < 5e-2


def test_combine_gradcheck_with_dropped_slots():
    # Finite differences in float64 (gradcheck's default tolerances: atol 1e-5, rtol 1e-3).
    torch.manual_seed(0)
    idx = torch.tensor([[2, 0], [0, 1], [2, 1], [0, 2], [1, 0]])
    keep = torch.tensor([[True, True], [True, False], [True, True], [False, True], [True, True]])
    x = torch.randn(5, 3, dtype=torch.float64)
    _, _, order = permute_by_expert(x, idx, keep, 3)
    y = torch.randn(len(order), 3, dtype=torch.float64, requires_grad=True)
    w = torch.rand(5, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda y, w: unpermute_and_combine(y, order, w), (y, w))

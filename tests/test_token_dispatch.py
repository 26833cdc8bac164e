"""All-to-all token dispatch: an expert-parallel MoE layer reproduces the single-process layer.

Reference: ONE process, the full layer (LocalTokenDispatcher) on the global batch, loss =
(y * R).sum() / N_global for a fixed random R. Distributed: W gloo processes; rank r runs rows
[r * B, (r + 1) * B) of the same batch on its expert shard with the layer laid out by the real
`expert_parallel.apply_expert_sharding` / `apply_token_dispatch`, and loss_r = (y_r * R_r).sum() / N_r,
the mean over its own share, as in training. The reference loss is (1/W) * sum_r loss_r, so:

- outputs: y_r equals the reference rows of rank r;
- every gradient the distributed run produces, reduced the way `grad_sync.reduction_groups_for`
  says (SUM over the replica group, times its scale), equals the reference gradient: dense
  (router, shared experts) over the world, expert shards over the dp group only (the ranks holding
  the same shard). With dp = 1 that is each rank's own expert gradient times 1/W, compared with
  its slice of the reference: an ep-times (or 1/ep) scaling error fails it. The input gradient,
  which feeds the dense parameters below the layer, gets the same 1/W.

Tolerance: fp32, atol = rtol = 1e-5 (sums of a few dozen products; observed max |diff| ~6e-8).

All cases of one process count run in a single spawn (module fixture): starting processes costs
seconds, the cases milliseconds.
"""

import pytest
import torch
import torch.nn as nn

from distributed import run_on_ranks  # noqa: E402  (tests/ is on sys.path under pytest)
from paratrain.trainer.models.moe import MoE, capacity_keep_mask, expert_capacity

TOL = dict(atol=1e-5, rtol=1e-5)
D, H, B, T = 8, 12, 2, 6  # width, expert width, sequences per rank, tokens per sequence

# name -> (world, dp, ep, MoE kwargs, options). forced=e: a router bias makes experts [0, e) win.
CASES = {
    "ep2": (2, 1, 2, dict(num_experts=4, top_k=2), {}),
    "ep2_capacity": (2, 1, 2, dict(num_experts=4, top_k=2, capacity_factor=1.0), {}),
    "ep2_shared": (2, 1, 2, dict(num_experts=4, top_k=2, num_shared_experts=1), {}),
    "ep2_loop": (2, 1, 2, dict(num_experts=4, top_k=2), {"grouped_mm": False}),
    "ep2_forced": (2, 1, 2, dict(num_experts=4, top_k=2), {"forced": 2}),
    "ep4": (4, 1, 4, dict(num_experts=8, top_k=2), {}),
    # top_k=1 onto expert 0: rank 0's second expert and ranks 1..3 receive nothing.
    "ep4_forced": (4, 1, 4, dict(num_experts=8, top_k=1), {"forced": 1}),
    "ep4_one_expert_capacity": (4, 1, 4, dict(num_experts=4, top_k=2, capacity_factor=1.25), {}),
    "dp2xep2": (4, 2, 2, dict(num_experts=4, top_k=2, capacity_factor=1.0), {}),
}


class _OneLayer(nn.Module):
    """The smallest model the layout functions accept: one MoE layer."""

    def __init__(self, moe: MoE):
        super().__init__()
        self.moe = moe

    def moe_layers(self):
        return [self.moe]


def _build(moe_kwargs: dict, options: dict) -> MoE:
    moe = MoE(d_model=D, expert_ffn_dim=H, **moe_kwargs)
    moe.experts.use_grouped_mm = options.get("grouped_mm", True)
    if "forced" in options:
        # A biased gate so that experts [0, forced) dominate every token's scores.
        moe.router.gate = nn.Linear(D, moe.num_experts, bias=True)
    return moe


def _init(moe: MoE, options: dict, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        if "forced" in options:
            bias = torch.full((moe.num_experts,), -8.0)
            bias[: options["forced"]] = 8.0
            moe.router.gate.bias.copy_(bias)


def _global_batch(world: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(world * B, T, D, generator=g), torch.randn(world * B, T, D, generator=g)


def _reference(name):
    """Single process, full layer: outputs, gradients and routing of the global batch."""
    world, dp, ep, moe_kwargs, options = CASES[name]
    torch.manual_seed(0)
    moe = _build(moe_kwargs, options)
    _init(moe, options, seed=1)
    x, r = _global_batch(world, seed=2)
    x.requires_grad_(True)
    y = moe(x)
    ((y * r).sum() / (world * B * T)).backward()

    with torch.no_grad():  # the routing, recomputed independently of any dispatcher
        _, _, _, expert_idx = moe.router(x.detach().reshape(-1, D))
        e, k = moe.num_experts, moe.top_k
        keep = torch.ones_like(expert_idx, dtype=torch.bool)
        if moe.capacity_factor is not None:
            cap = expert_capacity(moe.capacity_factor, T, k, e)
            keep = capacity_keep_mask(expert_idx.view(-1, T, k), e, cap).view(-1, k)
    return dict(
        state=moe.state_dict(), x=x.detach(), r=r, y=y.detach(), x_grad=x.grad,
        grads={n: p.grad.clone() for n, p in moe.named_parameters()},
        expert_idx=expert_idx, keep=keep, dropped=int((~keep).sum()),
    )


def _run_cases(rank, world_size, cases):
    """Body on every rank: each case's local outputs, gradients and dispatcher counters."""
    from paratrain.strategies.grad_sync import reduction_groups_for
    from paratrain.strategies.expert_parallel import apply_expert_sharding, apply_token_dispatch, expert_params
    from paratrain.strategies.mesh import ParallelDims, build_mesh, ep_group, ep_rank
    from paratrain.strategies.token_dispatch import AllToAllTokenDispatcher

    meshes, out = {}, {}
    for name, (dp, ep, moe_kwargs, options, state, x, r) in cases.items():
        dims = ParallelDims(dp=dp, ep=ep, world_size=world_size)
        if dims.degrees not in meshes:
            meshes[dims.degrees] = build_mesh(dims, "cpu")
        mesh = meshes[dims.degrees]

        moe = _build(moe_kwargs, options)
        moe.load_state_dict(state)
        model = _OneLayer(moe)
        apply_expert_sharding(model, dims, ep_rank(mesh))
        apply_token_dispatch(model, mesh)
        assert isinstance(moe.dispatcher, AllToAllTokenDispatcher)
        scales = {g.name: g.scale for g in reduction_groups_for(model.parameters(),
                                                                expert_params(model), mesh)}

        xs = x[rank * B : (rank + 1) * B].clone().requires_grad_(True)
        rs = r[rank * B : (rank + 1) * B]
        group = ep_group(mesh)
        seq0 = group._get_sequence_number_for_group()  # +1 per collective on this group
        y = moe(xs)
        seq1 = group._get_sequence_number_for_group()
        ((y * rs).sum() / (B * T)).backward()  # mean over this rank's share, as in training
        seq2 = group._get_sequence_number_for_group()
        out[name] = dict(
            y=y.detach(), x_grad=xs.grad, ep_rank=ep_rank(mesh), offset=moe.experts.expert_offset,
            grads={n: (None if p.grad is None else p.grad.clone()) for n, p in moe.named_parameters()},
            expert_names=[n for n, p in moe.named_parameters()
                          if any(p is q for q in moe.experts.parameters())],
            scales=scales, a2a_bytes=moe.dispatcher.last_a2a_bytes,
            collectives=(seq1 - seq0, seq2 - seq1),
        )
    return out


def _spawn(world):
    names = [n for n, c in CASES.items() if c[0] == world]
    refs = {n: _reference(n) for n in names}
    cases = {n: (*CASES[n][1:5], refs[n]["state"], refs[n]["x"], refs[n]["r"]) for n in names}
    results = run_on_ranks(_run_cases, world, cases, timeout_s=60)
    return {n: (refs[n], [res[n] for res in results]) for n in names}


@pytest.fixture(scope="module")
def runs_2():
    return _spawn(2)


@pytest.fixture(scope="module")
def runs_4():
    return _spawn(4)


def _results(request, name):
    """(reference, per-rank results) of a case; starts only the process count it needs."""
    return request.getfixturevalue("runs_2" if CASES[name][0] == 2 else "runs_4")[name]



@pytest.mark.parametrize("name", list(CASES))
def test_outputs_and_input_grads_match_single_process(name, request):
    ref, ranks = _results(request, name)
    world = CASES[name][0]
    for rank, res in enumerate(ranks):
        rows = slice(rank * B, (rank + 1) * B)
        torch.testing.assert_close(res["y"], ref["y"][rows], **TOL)
        # The input gradient feeds dense parameters, which get the 1/W of the reduction rule.
        torch.testing.assert_close(res["x_grad"] / world, ref["x_grad"][rows], **TOL)


@pytest.mark.parametrize("name", list(CASES))
def test_gradients_reduced_by_the_grad_sync_rule_match_single_process(name, request):
    ref, ranks = _results(request, name)
    world, dp, ep, moe_kwargs, _ = CASES[name]
    e_local = moe_kwargs["num_experts"] // ep
    expert_names = set(ranks[0]["expert_names"])
    assert expert_names == {"experts.w1", "experts.w2", "experts.w3"}
    assert all(res["scales"] == {"dense": 1 / world, "expert": 1 / world} for res in ranks)

    for pname, ref_grad in ref["grads"].items():
        if pname in expert_names:
            # SUM over the dp group (ranks with the same shard), times the expert scale.
            for shard in range(ep):
                holders = [res for res in ranks if res["ep_rank"] == shard]
                assert len(holders) == dp and all(h["offset"] == shard * e_local for h in holders)
                got = sum(h["grads"][pname] for h in holders) * holders[0]["scales"]["expert"]
                want = ref_grad[shard * e_local : (shard + 1) * e_local]
                torch.testing.assert_close(got, want, **TOL, msg=f"{pname} shard {shard}")
        else:
            got = sum(res["grads"][pname] for res in ranks) * ranks[0]["scales"]["dense"]
            torch.testing.assert_close(got, ref_grad, **TOL, msg=pname)


@pytest.mark.parametrize("name", ["ep2_capacity", "ep4_one_expert_capacity", "dp2xep2"])
def test_capacity_cases_drop_something(name):
    # Otherwise these cases would not show that dropped slots are respected.
    assert _reference(name)["dropped"] > 0


@pytest.mark.parametrize("name", ["ep2_forced", "ep4_forced"])
def test_forced_routing_leaves_other_shards_exactly_zero(name, request):
    ref, ranks = _results(request, name)
    _, _, ep, moe_kwargs, options = CASES[name]
    e_local = moe_kwargs["num_experts"] // ep
    assert bool((ref["expert_idx"] < options["forced"]).all()), "the bias did not force routing"
    for res in ranks:
        for pname in res["expert_names"]:
            grad = res["grads"][pname]
            assert grad is not None  # a rank without tokens still produces (zero) gradients
            for local in range(e_local):
                if res["offset"] + local >= options["forced"]:
                    assert torch.count_nonzero(grad[local]) == 0, (pname, res["ep_rank"], local)
                else:
                    assert torch.count_nonzero(grad[local]) > 0, (pname, res["ep_rank"], local)


def _expected_bytes(ref, world, ep, num_experts):
    """Bytes each rank sends to other ranks for one forward and backward, from the routing alone:
    one row per (token, remote rank holding at least one of its kept experts), however many experts
    it has there. A row goes out with its k weights and k ids (D + 2k fp32 values) and comes back
    as D values; in backward their gradients travel the other way."""
    e_local, k = num_experts // ep, ref["expert_idx"].shape[1]
    n_local = B * T
    dest = torch.where(ref["keep"], ref["expert_idx"] // e_local, ep)  # (tokens, k); ep = dropped
    pairs = {(t, int(r)) for t in range(world * n_local) for r in dest[t].tolist() if r < ep}
    out_row, back_row = (D + 2 * k) * 4, D * 4

    def src(t):
        return t // n_local

    expected = []
    for rank in range(world):
        ep_index, ep_base = rank % ep, rank - rank % ep  # ep groups are contiguous runs of ranks
        sent = sum(1 for t, r in pairs if src(t) == rank and r != ep_index)
        returned = sum(1 for t, r in pairs if ep_base <= src(t) < ep_base + ep and src(t) != rank and r == ep_index)
        expected.append((sent + returned) * (out_row + back_row))
    remote = sum(1 for t, r in pairs if r != src(t) % ep)
    # Per (token, slot), as a dispatcher without the dedup would send: more whenever two kept
    # experts of one token share a remote rank.
    per_slot = int(((dest < ep) & (dest != (torch.arange(world * n_local) // n_local % ep).unsqueeze(1))).sum())
    return expected, 2 * remote * (out_row + back_row), remote, per_slot


@pytest.mark.parametrize("name", list(CASES))
def test_a2a_bytes_are_what_the_routing_requires(name, request):
    ref, ranks = _results(request, name)
    world, dp, ep, moe_kwargs, _ = CASES[name]
    per_rank, total, remote_rows, remote_slots = _expected_bytes(ref, world, ep, moe_kwargs["num_experts"])
    assert [res["a2a_bytes"] for res in ranks] == per_rank
    assert sum(per_rank) == total
    if name in ("ep2", "ep4"):  # the dedup shows: some tokens have both experts on one remote rank
        assert remote_rows < remote_slots


@pytest.mark.parametrize("name", list(CASES))
def test_collectives_per_step_do_not_depend_on_routing(name, request):
    _, ranks = _results(request, name)
    # Forward: one count exchange + dispatch + combine; backward: the two reverse all-to-alls.
    assert [res["collectives"] for res in ranks] == [(3, 2)] * len(ranks)


def test_expert_ids_travel_exactly_in_the_row_dtype():
    from paratrain.strategies.token_dispatch import AllToAllTokenDispatcher

    fits = AllToAllTokenDispatcher._check_ids_fit
    fits(torch.bfloat16, 255)  # ids 0..255 (255 = "not for this rank") are exact in bf16
    fits(torch.float32, 100_000)
    with pytest.raises(RuntimeError, match="exact up to 256, but this rank holds 256 experts"):
        fits(torch.bfloat16, 256)
    assert torch.tensor(255.0, dtype=torch.bfloat16).long() == 255 and torch.tensor(257.0, dtype=torch.bfloat16).long() != 257

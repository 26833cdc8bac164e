"""MoE layer forward+backward vs a dense SwiGLU FFN of the same active FLOPs (and HF Mixtral).

    python bench/bench_moe.py [--tokens 4096] [--d 256] [--ffn 512] [--experts 8] [--top-k 2]

One thread, fp32, median of --reps after warm-up, all candidates timed side by side in one run.
Dense reference: SwiGLU with ffn = top_k * ffn over the same tokens = the MoE's active FLOPs.
Target (DESIGN.md): MoE / dense <= 1.10x, and faster than transformers' MixtralSparseMoeBlock.
"""

import argparse
import statistics
import time

import torch

from paratrain.trainer.models.moe import MoE, SwiGLU


def fwd_bwd(module, x, grad):
    """One forward + backward; returns its (wall, CPU) time in seconds."""
    module.zero_grad(set_to_none=True)
    xi = x.detach().requires_grad_()
    t0, c0 = time.perf_counter(), time.process_time()
    module(xi).backward(grad)
    return time.perf_counter() - t0, time.process_time() - c0


def mixtral_block(d, ffn, experts, top_k, implementation):
    try:
        from transformers.models.mixtral.configuration_mixtral import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except ImportError as err:
        return None, f"transformers not importable ({err}); skipped"
    import transformers

    kwargs = dict(hidden_size=d, intermediate_size=ffn, num_local_experts=experts,
                  num_experts_per_tok=top_k, router_jitter_noise=0.0,
                  experts_implementation=implementation)
    try:
        block = MixtralSparseMoeBlock(MixtralConfig(**kwargs))
    except Exception as err:  # older transformers: no experts_implementation switch
        return None, f"transformers {transformers.__version__} {implementation}: {err}"
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.02)
    label = f"transformers {transformers.__version__} MixtralSparseMoeBlock ({implementation})"
    return block, label


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--ffn", type=int, default=512)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)

    t, d = args.tokens, args.d
    moe = MoE(d, args.experts, args.top_k, args.ffn)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, 0.02)
    moe_loop = MoE(d, args.experts, args.top_k, args.ffn)
    moe_loop.load_state_dict(moe.state_dict())
    moe_loop.experts.use_grouped_mm = False
    dense = SwiGLU(d, args.top_k * args.ffn)
    with torch.no_grad():
        for p in dense.parameters():
            p.normal_(0.0, 0.02)

    x = torch.randn(1, t, d)
    grad = torch.randn(1, t, d)
    candidates = [("dense SwiGLU ffn=%d (same active FLOPs)" % (args.top_k * args.ffn), dense),
                  ("paratrain MoE (sort + grouped_mm)", moe),
                  ("paratrain MoE (per-expert loop fallback)", moe_loop)]
    for impl in ("eager", "grouped_mm"):
        block, label = mixtral_block(d, args.ffn, args.experts, args.top_k, impl)
        if block is None:
            print(label)
        else:
            candidates.append((label, block))

    print(f"T={t} d={d} ffn={args.ffn} E={args.experts} top_k={args.top_k} fp32 "
          f"threads={torch.get_num_threads()} torch {torch.__version__}; "
          f"forward+backward, median of {args.reps}")
    # Warm up, then interleave the repetitions so that machine noise hits every candidate alike.
    results = {label: [] for label, _ in candidates}
    for _ in range(3):
        for _, module in candidates:
            fwd_bwd(module, x, grad)
    for _ in range(args.reps):
        for label, module in candidates:
            results[label].append(fwd_bwd(module, x, grad))
    # CPU time too: on a shared machine, time spent descheduled inflates wall time but not it.
    print(f"  {'':<58s} {'wall ms':>9s} {'ratio':>6s} {'cpu ms':>9s} {'ratio':>6s}")
    base = [statistics.median(r[i] for r in results[candidates[0][0]]) for i in (0, 1)]
    for label, _ in candidates:
        wall, cpu = (statistics.median(r[i] for r in results[label]) for i in (0, 1))
        print(f"  {label:<58s} {wall * 1e3:9.2f} {wall / base[0]:5.2f}x "
              f"{cpu * 1e3:9.2f} {cpu / base[1]:5.2f}x")
    ours = statistics.median(r[0] for r in results[candidates[1][0]]) / base[0]
    print(f"MoE / dense (wall) = {ours:.2f}x, target <= 1.10x")


if __name__ == "__main__":
    main()

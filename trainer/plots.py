"""PNG plots a person looks at: the loss curve and the expert load per MoE layer."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a window
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def plot_loss_curve(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, style in (("train/loss", "-"), ("val/loss", "o-")):
        points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points), style, label=key, markersize=4)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/byte)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_expert_load(history: list[tuple[int, torch.Tensor]], path: Path) -> None:
    """One heat map per MoE layer: share of routed tokens per expert (x) over logged steps (y)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    steps = [s for s, _ in history]
    load = torch.stack([l for _, l in history])  # (logs, layers, experts)
    share = load / load.sum(-1, keepdim=True).clamp_min(1)
    num_layers, num_experts = share.shape[1], share.shape[2]
    fig, axes = plt.subplots(1, num_layers, figsize=(2.2 + 1.6 * num_layers, 4), squeeze=False, sharey=True)
    for i, ax in enumerate(axes[0]):
        image = ax.imshow(share[:, i].numpy(), aspect="auto", origin="lower", cmap="viridis", vmin=0,
                          vmax=max(2.0 / num_experts, float(share.max())), interpolation="nearest",
                          extent=(-0.5, num_experts - 0.5, steps[0], steps[-1] if len(steps) > 1 else steps[0] + 1))
        ax.set_title(f"layer {i}")
        ax.set_xlabel("expert")
        ax.set_xticks(range(num_experts))
    axes[0][0].set_ylabel("optimizer step")
    fig.colorbar(image, ax=axes[0].tolist(), label="share of routed tokens")
    fig.suptitle(f"Expert load (uniform = {1 / num_experts:.3f})")
    fig.savefig(path, dpi=110)
    plt.close(fig)

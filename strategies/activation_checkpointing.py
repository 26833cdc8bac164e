"""Activation checkpointing: a block keeps only its input in forward and recomputes the rest in backward.

`full` checkpoints every transformer block; `selective` every other block (blocks 0, 2, 4, ...:
torchtitan's layer-wise selective mode at frequency 2), which keeps about half the activations at
half the recompute. Applied with torch's composable `checkpoint` (module hooks): parameter names do
not change, so checkpoints and the FSDP step that follows see the same module tree on every layout.

Cost: one more forward of each checkpointed block in backward, including its MoE all-to-alls
(every rank recomputes the same blocks in the same order, so the collectives still pair up).
"""

from torch import nn
from torch.distributed._composable import checkpoint

MODES = ("none", "full", "selective")


def checkpointed_blocks(num_blocks: int, mode: str) -> list[int]:
    if mode not in MODES:
        raise ValueError(f"activation checkpointing mode {mode!r}: use one of {', '.join(MODES)}")
    if mode == "none":
        return []
    return list(range(num_blocks)) if mode == "full" else list(range(0, num_blocks, 2))


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """Checkpoint the blocks `mode` names (model.layers[i]); no randomness inside, so no RNG state is kept."""
    for i in checkpointed_blocks(len(model.layers), mode):
        checkpoint(model.layers[i], preserve_rng_state=False)

"""Auxiliary-loss-free balancing (DeepSeek-V3): move each expert's choice bias after every optimizer step.

The bias must see the load of the WHOLE global batch, so that every layout makes the same update:
each MoE layer counts the experts its rank's tokens chose (`MoE.routed_load`, all micro-batches of
the step), and one fixed-shape sum over all ranks (`strategy.reduce`, the path the step metrics use)
gives every rank the global counts. Every rank joins it at every optimizer step, whatever its routing,
and only when some layer has the bias on (a run-wide setting), so no rank can skip it.
"""

import lightning as L
import torch


class ExpertBiasBalancer(L.Callback):
    """After each optimizer step: bias += rate * sign(mean load - load), per MoE layer, from global counts.

    Runs before the checkpoint callback, so a checkpoint of step s holds the bias after step s's update."""

    def __init__(self):
        self._last_step = None

    def on_train_start(self, trainer, pl_module):
        self._last_step = trainer.global_step  # a resumed run continues from the checkpoint's step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self._last_step:
            return  # an accumulation micro-step: the optimizer has not stepped yet
        self._last_step = trainer.global_step
        layers = [m for m in pl_module.model.moe_layers() if m.router.expert_bias is not None]
        if not layers:
            return
        zeros = torch.zeros(layers[0].num_experts, device=layers[0].router.expert_bias.device)
        local = torch.stack([m.routed_load if m.routed_load is not None else zeros for m in layers]).float()
        total = trainer.strategy.reduce(local, reduce_op="sum")  # (layers, E): the global batch's choices
        for layer, load in zip(layers, total):
            layer.update_expert_bias(load)


def callbacks(model_cfg) -> list:
    """The balancer when model.moe.balance_bias_rate > 0, else nothing."""
    moe = model_cfg.moe
    return [ExpertBiasBalancer()] if moe is not None and moe.get("balance_bias_rate", 0) > 0 else []

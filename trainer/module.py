"""The LightningModule: next-byte cross-entropy plus MoE auxiliary losses, AdamW/SGD, warm-up + cosine.

It holds a plain `nn.Module` and knows nothing about the layout; the strategy lays the model out
before training (DESIGN.md). Metrics of a step are packed into one fixed-shape tensor and reduced
over all ranks in one collective, so routing can never make ranks disagree on which collectives run.
"""

import math

import hydra.utils
import lightning as L
import torch
import torch.nn.functional as F


def lr_lambda(warmup_steps: int, max_steps: int, min_lr_ratio: float):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def build_optimizer(cfg, named_params) -> torch.optim.Optimizer:
    """Instantiate cfg._target_ with weight decay on matrices only (not norms, not biases)."""
    decay, no_decay = [], []
    for _, p in named_params:
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    extra = {k: cfg[k] for k in ("betas", "momentum") if cfg.get(k) is not None}
    return hydra.utils.instantiate({"_target_": cfg._target_}, groups, lr=cfg.lr, **extra, _convert_="all")


class LanguageModelTask(L.LightningModule):
    def __init__(self, model: torch.nn.Module, optimizer_cfg, max_steps: int, tokens_per_step: int, token_bytes=None):
        super().__init__()
        # (V,) bytes of text per token id (data.tokenizer): validation also reports loss per byte.
        self.token_bytes = None if token_bytes is None else torch.as_tensor(token_bytes, dtype=torch.float32)
        self.model = model
        self.optimizer_cfg, self.max_steps, self.tokens_per_step = optimizer_cfg, max_steps, tokens_per_step
        self.moe_layers = list(model.moe_layers())
        self.cross_entropy = F.cross_entropy  # a tensor-parallel layout swaps in its vocab-parallel loss
        self._sums: torch.Tensor | None = None  # this rank's metric sums since the last reduction
        self._micro_batches = 0
        self.step_metrics: dict[str, float] = {}  # last reduced metrics, read by the run-directory callback
        self.expert_load: torch.Tensor | None = None  # (moe layers, experts) global token counts since last log

    def forward(self, tokens):
        return self.model(tokens)

    def _loss(self, batch):
        inputs, targets = batch
        logits = self.model(inputs)  # (B, T, V)
        ce = self.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        return ce, logits

    def training_step(self, batch, batch_idx):
        pipeline = getattr(self.trainer.strategy, "pipeline", None)
        if pipeline is not None:
            # Pipeline stages: the schedule runs forward and backward of every micro-batch here; ce is
            # the last stage's, aux this stage's share (each sums once over the ranks of a data slice).
            ce, aux = pipeline.train_step(batch)
        else:
            ce, _ = self._loss(batch)
            aux = self.model.aux_loss()
        self._accumulate(ce, aux)
        return ce + aux

    def validation_step(self, batch, batch_idx):
        pipeline = getattr(self.trainer.strategy, "pipeline", None)
        ce = pipeline.eval_loss(batch) if pipeline is not None else self._loss(batch)[0]
        # Equal-size slices on every rank: the mean over ranks is the mean over the global batch.
        self.log("val/loss", ce, sync_dist=True, prog_bar=True)
        if self.token_bytes is not None:
            # Equal token counts per batch and rank too: mean(CE) / mean(bytes) = total CE / total bytes.
            self.token_bytes = self.token_bytes.to(batch[1].device)
            self.log("val/bytes_per_token", self.token_bytes[batch[1]].mean(), sync_dist=True)

    # --- metrics: one fixed-shape reduction per logged step ----------------------------------
    def _metric_vector(self, ce, aux) -> torch.Tensor:
        parts = [ce.detach().float().reshape(1), (ce + aux).detach().float().reshape(1)]
        if self.moe_layers:
            # Layers this rank did not run (other pipeline stages) add zeros: every layer is counted
            # once per data slice when the vector is summed over ranks.
            ran = [m for m in self.moe_layers if m.stats]
            zero = torch.zeros((), device=self.device)
            for key in ("load_balancing", "z_loss"):
                parts += [(sum((m.aux_losses[key].detach().float() for m in ran), zero) / len(self.moe_layers)).reshape(1)]
            parts += [torch.stack([m.stats.get("dropped_fraction", zero).float() for m in self.moe_layers])]
            parts += [torch.stack([m.stats["tokens_per_expert"].float() if m.stats
                                   else torch.zeros(m.num_experts, device=self.device) for m in self.moe_layers]).flatten()]
            parts += [torch.tensor([float(sum(m.dispatcher.last_a2a_bytes for m in self.moe_layers))])]
        return torch.cat([p.to(self.device) for p in parts])

    def _accumulate(self, ce, aux):
        v = self._metric_vector(ce, aux)
        self._sums = v if self._sums is None else self._sums + v
        self._micro_batches += 1

    def reduce_step_metrics(self) -> dict[str, float]:
        """Mean over micro-batches and ranks since the last call (expert counts and bytes are summed).

        Every rank calls this at the same steps: it is a collective."""
        # A pipeline's stages each add their part of one data slice's metrics (zeros elsewhere).
        world = self.trainer.world_size // getattr(getattr(self.trainer.strategy, "dims", None), "pp", 1)
        total = self.trainer.strategy.reduce(self._sums, reduce_op="sum")
        n = self._micro_batches * world
        out = {"train/loss": total[0].item() / n, "train/total_loss": total[1].item() / n}
        if self.moe_layers:
            num_layers, num_experts = len(self.moe_layers), self.moe_layers[0].experts.num_experts
            out["train/load_balancing_loss"] = total[2].item() / n
            out["train/z_loss"] = total[3].item() / n
            dropped = total[4 : 4 + num_layers] / n
            load = total[4 + num_layers : 4 + num_layers + num_layers * num_experts].reshape(num_layers, num_experts)
            for i, layer_load in enumerate(load):
                mean = layer_load.mean().clamp_min(1e-9)
                out[f"moe/layer{i}/imbalance"] = (layer_load.max() / mean).item()
                out[f"moe/layer{i}/dead_experts"] = int((layer_load == 0).sum().item())
                out[f"moe/layer{i}/dropped_fraction"] = dropped[i].item()
            # Bytes all ranks sent to other ranks per optimizer step, forward and backward.
            steps = self._micro_batches / self.trainer.accumulate_grad_batches
            out["a2a_bytes_per_step"] = total[-1].item() / steps
            self.expert_load = load.cpu()
        self._sums, self._micro_batches = None, 0
        self.step_metrics = out
        return out

    def configure_optimizers(self):
        c = self.optimizer_cfg
        optimizer = build_optimizer(c, self.model.named_parameters())
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(c.warmup_steps, self.max_steps, c.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        if gradient_clip_val:
            # The strategy knows which gradients are sharded, so it computes the global norm.
            self.trainer.strategy.clip_grad_norm_(self.model, gradient_clip_val)

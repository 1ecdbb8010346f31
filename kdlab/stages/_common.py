"""Helpers shared by the stages: optimizer + warmup, LoRA, token means across ranks, ranking evaluation."""

from __future__ import annotations

import time

from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "DEFAULT_LORA_TARGETS",
    "build_optimizer",
    "linear_warmup",
    "apply_lora",
    "group_scores",
    "RankingEvalMixin",
    "PASSTHROUGH_KEYS",
    "global_token_mean",
]

DEFAULT_LORA_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")


def global_token_mean(module: Any, total: Tensor, count: Tensor) -> Tensor:
    """``total / count`` where ``count`` (valid tokens) is summed over every rank: ``W · total / N``.

    DDP averages the ranks' gradients, so with a per-rank mean each rank's tokens would weigh
    ``1 / (W · its own count)``; with this, every token of the global batch weighs ``1 / N`` and
    W ranks × B/W sequences train exactly like 1 rank × B (a token-level mean, as on one process).
    Outside a multi-rank fit it is the plain mean. Training-step only: it is a collective call.
    """
    trainer = getattr(module, "_trainer", None)
    world = int(getattr(trainer, "world_size", 1) or 1) if trainer is not None else 1
    if world == 1:
        return total / count.clamp(min=1)
    global_count = trainer.strategy.reduce(count.detach().to(total.dtype), reduce_op="sum")
    return total * world / global_count.clamp(min=1)


def linear_warmup(warmup_steps: int):  # type: ignore[no-untyped-def]
    """LR multiplier ``f(step) = min(1, (step + 1) / warmup_steps)`` (constant 1 when
    ``warmup_steps <= 0``): linear warmup, then the base learning rate."""

    def factor(step: int) -> float:
        if warmup_steps <= 0:
            return 1.0
        return min(1.0, (step + 1) / warmup_steps)

    return factor


def build_optimizer(
    module: nn.Module, lr: float, weight_decay: float, warmup_steps: int, *, decay_biases_and_norms: bool = False
) -> dict[str, Any]:
    """AdamW over trainable parameters with a per-step linear-warmup ``LambdaLR``; the Lightning
    ``configure_optimizers`` dict.

    Biases and norm weights (tensors with ``ndim < 2``) get no weight decay, in a second parameter
    group, unless ``decay_biases_and_norms``: then one group in the module's parameter order, as a
    plain ``AdamW(module.parameters())``. The order matters beyond decay: gradient-norm clipping
    sums the parameters' norms in the optimizer's order, so the two layouts round differently.
    """
    trainable = [p for p in module.parameters() if p.requires_grad]
    if decay_biases_and_norms:
        groups = [{"params": trainable, "weight_decay": weight_decay}]
    else:
        groups = [
            {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
        ]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_warmup(warmup_steps))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def apply_lora(
    model: nn.Module,
    rank: int,
    alpha: float,
    dropout: float,
    target_modules: list[str] | None,
    task_type: str,
) -> nn.Module:
    """Wrap ``model`` with a peft LoRA adapter of rank ``rank`` (``rank == 0``: return ``model``
    unchanged, i.e. full fine-tuning). ``task_type`` is a ``peft.TaskType`` name
    (``CAUSAL_LM`` or ``FEATURE_EXTRACTION``/``SEQ_CLS``)."""
    if rank <= 0:
        return model
    from peft import LoraConfig, TaskType, get_peft_model

    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules or DEFAULT_LORA_TARGETS),
        task_type=getattr(TaskType, task_type),
    )
    return get_peft_model(model, config)


def train_only_last_layers(model: nn.Module, n_layers: int) -> nn.Module:
    """Freeze every parameter of a decoder backbone except its last ``n_layers`` transformer layers
    and the final norm (full fine-tuning of the top of the network; the rest stays pretrained).

    The layers are found as ``model.layers`` (``LlamaModel`` and most decoders in transformers, as
    loaded with ``task="encoder"``). Returns ``model``.
    """
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no `layers` ModuleList: train_last_layers needs a decoder")
    if not 1 <= n_layers <= len(layers):
        raise ValueError(f"train_last_layers must be in [1, {len(layers)}] for this model, got {n_layers}")
    for param in model.parameters():
        param.requires_grad_(False)
    for module in [*layers[len(layers) - n_layers:], getattr(model, "norm", None)]:
        if module is not None:
            for param in module.parameters():
                param.requires_grad_(True)
    return model


def group_scores(flat: Tensor, batch: dict[str, Any]) -> Tensor:
    """Reshape per-document scores ``[G*N]`` to ``[G, N]`` using ``batch["doc_mask"]``'s shape."""
    g, n = batch["doc_mask"].shape
    return flat.view(g, n)


PASSTHROUGH_KEYS: tuple[str, ...] = ("query_ids", "doc_ids")


class RankingEvalMixin:
    """Validation / test / predict for ranking stages (mixed into a ``LightningModule``).

    The stage provides ``score_groups(batch) -> [G, N]`` (served model only) and creates
    ``self.val_metrics`` / ``self.test_metrics`` (:class:`kdlab.metrics.RankingMetrics`). Logged at
    epoch end: ``val/ndcg@k``, ``val/mrr@k``, ``val/pnr`` (and ``test/...``).
    """

    def score_groups(self, batch: dict[str, Any]) -> Tensor:  # pragma: no cover - overridden
        raise NotImplementedError

    def _eval_update(self, metrics: Any, batch: dict[str, Any]) -> None:
        scores = self.score_groups(batch)
        metrics.update(scores.float(), batch["labels"], batch["doc_mask"], batch["query_index"])

    def _eval_log(self, metrics: Any, prefix: str) -> None:
        values = metrics.compute()
        metrics.reset()
        for name, value in values.items():
            self.log(f"{prefix}/{name}", value.float(), prog_bar=name.startswith("ndcg"))  # type: ignore[attr-defined]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_update(self.val_metrics, batch)  # type: ignore[attr-defined]

    # Seconds spent in training batches so far (validation excluded), logged beside each validation:
    # learning curves against compute, not only against steps (scripts/plot_curves.py).
    _train_seconds: float = 0.0
    _batch_start: float | None = None

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._batch_start = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._batch_start is not None:
            self._train_seconds += time.perf_counter() - self._batch_start
            self._batch_start = None

    def on_validation_epoch_end(self) -> None:
        self._eval_log(self.val_metrics, "val")  # type: ignore[attr-defined]
        trainer = getattr(self, "_trainer", None)
        if trainer is not None and not trainer.sanity_checking:
            self.log("time/train_s", float(self._train_seconds))  # type: ignore[attr-defined]

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_update(self.test_metrics, batch)  # type: ignore[attr-defined]

    def on_test_epoch_end(self) -> None:
        self._eval_log(self.test_metrics, "test")  # type: ignore[attr-defined]

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        """``{"scores" [G, N], "doc_mask", "query_index", "labels"}`` on CPU, plus ``query_ids`` /
        ``doc_ids`` when the batch carries them (so labeling can write them out)."""
        out: dict[str, Any] = {
            "scores": self.score_groups(batch).detach().float().cpu(),
            "doc_mask": batch["doc_mask"].cpu(),
            "query_index": batch["query_index"].cpu(),
        }
        if "labels" in batch:
            out["labels"] = batch["labels"].cpu()
        for key in PASSTHROUGH_KEYS:
            if key in batch:
                out[key] = batch[key]
        return out

"""Helpers shared by the stages: optimizer + warmup, LoRA, token means across ranks, ranking evaluation."""

from __future__ import annotations

import time
from collections.abc import Mapping

from typing import Any

import torch
from torch import Tensor, nn

from kdlab.errors import ConfigError

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


def linear_warmup(warmup_steps: int, total_steps: int | None = None):  # type: ignore[no-untyped-def]
    """LR multiplier: ``min(1, (step + 1) / warmup_steps)`` (constant 1 when ``warmup_steps <= 0``),
    then the base learning rate; with ``total_steps``, after the warmup it decays linearly,
    ``(total_steps − step) / (total_steps − warmup_steps)``, reaching 0 at ``total_steps``."""

    def factor(step: int) -> float:
        rise = 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)
        if not total_steps or step < warmup_steps:
            return rise
        return rise * max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


LR_SCHEDULES = ("constant", "linear")


def scheduled_steps(module: Any, lr_schedule: str) -> int | None:
    """The step count a ``linear`` schedule decays over (the trainer's estimate of the optimizer
    steps of the whole fit), or None for ``constant``."""
    if lr_schedule == "constant":
        return None
    if lr_schedule != "linear":
        raise ConfigError(f"model.init_args.lr_schedule: expected one of {list(LR_SCHEDULES)}, got {lr_schedule!r}")
    return max(1, int(module.trainer.estimated_stepping_batches))


def build_optimizer(
    module: nn.Module, lr: float, weight_decay: float, warmup_steps: int, *, decay_biases_and_norms: bool = False,
    total_steps: int | None = None, lr_by_prefix: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """AdamW over trainable parameters with a per-step linear-warmup ``LambdaLR`` (and a linear
    decay to 0 at ``total_steps`` when given); the Lightning ``configure_optimizers`` dict.
    ``lr_by_prefix`` gives the parameters whose names start with a prefix their own learning rate
    (e.g. a freshly initialised head), in groups of their own.

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
    if lr_by_prefix:
        names = {id(p): n for n, p in module.named_parameters()}
        split = []
        for group in groups:
            for prefix, rate in lr_by_prefix.items():
                mine = [p for p in group["params"] if names[id(p)].startswith(prefix)]
                if mine:
                    split.append({**group, "params": mine, "lr": rate})
                group = {**group, "params": [p for p in group["params"] if not names[id(p)].startswith(prefix)]}
            split.append(group)
        groups = split
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_warmup(warmup_steps, total_steps))
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


def right_padded_lengths(attention_mask: Tensor) -> tuple[Tensor, bool]:
    """``(lengths [B], every row is ones then zeros)``: the collators' layout, which the fast forwards need."""
    lengths = attention_mask.sum(dim=1)
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    prefix = positions.unsqueeze(0) < lengths.unsqueeze(1)
    return lengths, bool(torch.equal(prefix, attention_mask.bool()))


def length_chunked_scores(ranker: nn.Module, input_ids: Tensor, attention_mask: Tensor,
                    token_type_ids: Tensor | None, chunk: int) -> Tensor:
    """``ranker`` scores ``[B]`` computed on rows sorted by real length, in chunks of ``chunk`` rows,
    each cut to its longest row (right padding: the collator's layout), then put back in order."""
    lengths = attention_mask.sum(dim=1)
    order = torch.argsort(lengths, stable=True)
    pieces = []
    for start in range(0, order.numel(), chunk):
        idx = order[start:start + chunk]
        width = max(int(lengths[idx].max()), 1)
        tt = None if token_type_ids is None else token_type_ids[idx, :width]
        pieces.append(ranker(input_ids=input_ids[idx, :width], attention_mask=attention_mask[idx, :width],
                             token_type_ids=tt))
    return torch.cat(pieces)[torch.argsort(order)]


def keep_first_layers(model: nn.Module, n_layers: int) -> nn.Module:
    """Drop every transformer layer of a decoder backbone above the first ``n_layers`` (the final
    norm stays, so the truncated model's output is the norm of layer ``n_layers``' hidden state),
    and record ``num_hidden_layers = n_layers`` in its config so that ``save_pretrained`` writes a
    checkpoint every loader reads back as the same truncated model. Returns ``model``.

    Why: per (query, document) pair a decoder ranker's cost is linear in its depth; on a CPU budget
    a ranker made of the first layers of a pretrained LLM trains and scores proportionally faster.
    """
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no `layers` ModuleList: num_layers needs a decoder")
    if not 1 <= n_layers <= len(layers):
        raise ConfigError(f"model.init_args.num_layers: expected an integer in [1, {len(layers)}] for this "
                          f"backbone, got {n_layers}")
    model.layers = nn.ModuleList(list(layers)[:n_layers])
    model.config.num_hidden_layers = n_layers
    layer_types = getattr(model.config, "layer_types", None)
    if isinstance(layer_types, list):
        model.config.layer_types = layer_types[:n_layers]
    return model


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

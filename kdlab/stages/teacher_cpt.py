"""Stage A of DisRanker: continued pre-training (CPT) of a decoder LLM on click logs.

The batch's ``labels`` already hold ``IGNORE_INDEX`` on the prompt (the query) and on padding, so the loss
is ``L_cpt = − (1 / |O|) Σ_{t ∈ O} log p(y_t | q, y_<t)`` over the output tokens ``O`` of the batch
(our reading: loss on the clicked title + summary only; the data module's ``loss_on_prompt``
option puts it on the query too).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor
from torchmetrics import MeanMetric

from kdlab.losses.token import next_token_nll
from kdlab.models.backbones import load_backbone
from kdlab.models.served import save_served_model
from kdlab.stages._common import apply_lora, build_optimizer, global_token_mean

__all__ = ["TeacherCPT"]


class TeacherCPT(L.LightningModule):
    """Causal-LM continued pre-training of the teacher LLM.

    Logs ``train/loss`` (token mean over the step's batch), ``val/loss`` (token-weighted mean NLL
    over the whole validation epoch) and ``val/perplexity = exp(val/loss)``.

    Args:
        backbone: a backbone name for :func:`kdlab.models.backbones.load_backbone` (``tiny-llama``,
            an alias, a local directory or a hub id).
        backbone_config: config overrides (tiny models) passed to ``load_backbone``.
        lora_rank: 0 = full fine-tuning; > 0 = LoRA through peft with ``lora_alpha``,
            ``lora_dropout`` and ``lora_target_modules`` (default: the attention projections).
        lr, weight_decay, warmup_steps: AdamW and its linear warmup (per optimizer step).
        dtype, quantization: forwarded to ``load_backbone``.
    """

    main_metric: tuple[str, str] = ("val/loss", "min")  # the best checkpoint's

    def __init__(
        self,
        backbone: str = "tiny-llama",
        backbone_config: dict[str, Any] | None = None,
        lora_rank: int = 0,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.05,
        lora_target_modules: list[str] | None = None,
        lr: float = 1e-4,
        weight_decay: float = 0.01,
        warmup_steps: int = 0,
        dtype: str = "float32",
        quantization: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        model = load_backbone(
            backbone, task="causal-lm", config=backbone_config, dtype=dtype, quantization=quantization
        )
        self.model = apply_lora(model, lora_rank, lora_alpha, lora_dropout, lora_target_modules, "CAUSAL_LM")
        self.val_nll = MeanMetric()

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Logits ``[B, T, V]``."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def batch_loss(self, batch: dict[str, Any]) -> Tensor:
        """Mean next-token NLL over the batch's target tokens (the training loss)."""
        total, count = next_token_nll(self(batch["input_ids"], batch["attention_mask"]), batch["labels"])
        return total / count.clamp(min=1)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        total, count = next_token_nll(self(batch["input_ids"], batch["attention_mask"]), batch["labels"])
        loss = global_token_mean(self, total, count)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0], sync_dist=True)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        total, count = next_token_nll(self(batch["input_ids"], batch["attention_mask"]), batch["labels"])
        if count > 0:
            self.val_nll.update(total / count, weight=count.float())

    def on_validation_epoch_end(self) -> None:
        # MeanMetric holds Σ w·x and Σ w as sum states: exact token weighting across batches and ranks
        nll = self.val_nll.compute()
        self.val_nll.reset()
        self.log("val/loss", nll, prog_bar=True)
        self.log("val/perplexity", torch.exp(nll))

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        return build_optimizer(self, hp.lr, hp.weight_decay, hp.warmup_steps)

    def export_pretrained(self, directory: str) -> None:
        """Save the CPT model (LoRA merged in) and its tokenizer as a plain HF directory, loadable
        by path as the next stage's ``backbone``."""
        save_served_model(self.model, self.hparams.backbone, directory, stage=type(self).__name__)

"""Stage B of DisRanker: rank SFT of the (CPT) LLM as a last-token scorer.

Input text (data module, ``text_format: decoder``): ``query: {q} document: {title} {summary}`` + EOS.
Score ``s(q, d) = w · h_EOS + b`` from the last-layer hidden state of the final non-padding token
(:class:`kdlab.models.heads.LastTokenScore`). Loss (``loss`` knob, :mod:`kdlab.losses.ranking`):

* ``hinge`` (default, DisRanker, our reading): ``mean_{(i,j): y_i > y_j} max(0, m − (s_i − s_j))``;
* ``ranknet``: ``mean_{(i,j): y_i > y_j} −log σ(s_i − s_j)``;
* ``listwise``: softmax CE with the (highest-label) positive as the target (RankLLaMA).
"""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
from torch import Tensor

from kdlab.defaults import EVAL_K
from kdlab.errors import ConfigError
from kdlab.losses.ranking import rank_loss
from kdlab.metrics import RankingMetrics
from kdlab.models.backbones import load_backbone
from kdlab.models.heads import DecoderRanker
from kdlab.models.export import save_served_model
from kdlab.stages._common import RankingEvalMixin, apply_lora, build_optimizer, group_scores, train_only_last_layers

__all__ = ["TeacherRankSFT"]


class TeacherRankSFT(RankingEvalMixin, L.LightningModule):
    """LLM ranker: base decoder (``task="encoder"``, no LM head) + last-token score head.

    Args:
        backbone: ``tiny-llama``, an alias, a hub id, or the directory a :class:`TeacherCPT` exported.
        backbone_config: tiny-model config overrides.
        loss: ``hinge`` | ``ranknet`` | ``listwise``; ``margin`` is the hinge margin ``m``.
        lora_rank: 0 = full fine-tune; > 0 = LoRA (``lora_alpha``, ``lora_dropout``,
            ``lora_target_modules``) on the backbone; the score head is always trained fully.
        train_last_layers: with ``lora_rank = 0``, train only the last n transformer layers (and the
            final norm) in full and freeze the rest; None trains everything. Cheaper per step than
            full fine-tuning on a CPU: no gradients below the trained layers.
        lr, weight_decay, warmup_steps: AdamW + linear warmup.
        eval_k: the cut-off of the logged ``ndcg@k`` / ``mrr@k``.

    Exports (``export_pretrained``): the backbone (LoRA merged) + tokenizer via ``save_pretrained``,
    plus ``score_head.safetensors`` and ``kdlab_score_head.json``;
    :func:`kdlab.models.export.load_rank_teacher` reloads it.
    """

    def __init__(
        self,
        backbone: str = "tiny-llama",
        backbone_config: dict[str, Any] | None = None,
        loss: Literal["hinge", "ranknet", "listwise"] = "hinge",
        margin: float = 1.0,
        lora_rank: int = 0,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.05,
        lora_target_modules: list[str] | None = None,
        train_last_layers: int | None = None,
        lr: float = 1e-4,
        weight_decay: float = 0.01,
        warmup_steps: int = 0,
        eval_k: int = EVAL_K,
        dtype: str = "float32",
        quantization: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        base = load_backbone(backbone, task="encoder", config=backbone_config, dtype=dtype, quantization=quantization)
        hidden = int(base.config.hidden_size)
        if train_last_layers is not None:
            if lora_rank > 0:
                raise ConfigError("model.init_args.train_last_layers: full training of the last layers "
                                  f"needs lora_rank=0, got lora_rank={lora_rank}")
            train_only_last_layers(base, train_last_layers)
        base = apply_lora(base, lora_rank, lora_alpha, lora_dropout, lora_target_modules, "FEATURE_EXTRACTION")
        self.ranker = DecoderRanker(base, hidden)
        self.val_metrics = RankingMetrics(k=eval_k)
        self.main_metric: tuple[str, str] = (f"val/ndcg@{eval_k}", "max")  # the best checkpoint's
        self.test_metrics = RankingMetrics(k=eval_k)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Scores ``[B]`` for tokenized (query, document) texts ending in EOS."""
        return self.ranker(input_ids=input_ids, attention_mask=attention_mask)

    def score_groups(self, batch: dict[str, Any]) -> Tensor:
        """Scores ``[G, N]`` for a ranking-group batch."""
        return group_scores(self(batch["input_ids"], batch["attention_mask"]), batch)

    def batch_loss(self, batch: dict[str, Any]) -> Tensor:
        """The selected rank loss on the batch's labels."""
        hp = self.hparams
        return rank_loss(hp.loss, self.score_groups(batch).float(), batch["labels"], batch["doc_mask"], margin=hp.margin)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss = self.batch_loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["doc_mask"].shape[0], sync_dist=True)
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        return build_optimizer(self, hp.lr, hp.weight_decay, hp.warmup_steps)

    def export_pretrained(self, directory: str) -> None:
        """Backbone (LoRA merged) + tokenizer + score head, reloadable with ``load_rank_teacher``."""
        save_served_model(self.ranker, self.hparams.backbone, directory, stage=type(self).__name__)

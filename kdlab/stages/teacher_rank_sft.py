"""Stage B of DisRanker: rank SFT of the (CPT) LLM as a last-token scorer.

Input text (data module, ``text_format: decoder``): ``query: {q} document: {title} {summary}`` + EOS.
Score ``s(q, d) = w · h_EOS + b`` from the last-layer hidden state of the final non-padding token
(:class:`kdlab.models.heads.LastTokenScore`). Loss (``loss`` knob, :mod:`kdlab.losses.ranking`):

* ``hinge`` (default, DisRanker, our reading): ``mean_{(i,j): y_i > y_j} max(0, m − (s_i − s_j))``;
* ``ranknet``: ``mean_{(i,j): y_i > y_j} −log σ(s_i − s_j)``;
* ``listwise``: softmax CE with the (highest-label) positive as the target (RankLLaMA).

``head_init="prompt"`` (**[reading]**, beyond the papers) reads the ``decoder-prompt`` text instead
(:data:`kdlab.data.collators.RELEVANCE_PROMPT`, scored at its last token, no EOS) and starts the head
at the LLM's zero-shot yes/no judgement; see the argument.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import lightning as L
from torch import Tensor

from kdlab.data.collators import prompt_answer_ids
from kdlab.defaults import EVAL_K
from kdlab.errors import ConfigError
from kdlab.losses.ranking import rank_loss
from kdlab.metrics import RankingMetrics
from kdlab.models.backbones import load_backbone, load_tokenizer
from kdlab.models.heads import DecoderRanker
from kdlab.models.served import save_served_model
from kdlab.stages._common import (
    LR_SCHEDULES,
    RankingEvalMixin,
    apply_lora,
    build_optimizer,
    group_scores,
    keep_first_layers,
    length_chunked_scores,
    right_padded_lengths,
    scheduled_steps,
    train_only_last_layers,
)

__all__ = ["TeacherRankSFT"]


class TeacherRankSFT(RankingEvalMixin, L.LightningModule):
    """LLM ranker: base decoder (``task="encoder"``, no LM head) + last-token score head.

    Args:
        backbone: ``tiny-llama``, an alias, a hub id, or the directory a :class:`TeacherCPT` exported.
        backbone_config: tiny-model config overrides.
        num_layers: keep only the first n transformer layers of the backbone (and its final norm);
            None keeps them all (the papers). **[reading]**, beyond the papers: a ranker built from
            the lower layers of the LLM trains and scores in proportion to its depth, which is what
            a CPU budget buys (``docs/rank_sft_cpu.md``). The export is the truncated model.
        loss: ``hinge`` | ``ranknet`` | ``listwise``; ``margin`` is the hinge margin ``m``.
        lora_rank: 0 = full fine-tune; > 0 = LoRA (``lora_alpha``, ``lora_dropout``,
            ``lora_target_modules``) on the backbone; the score head is always trained fully.
        train_last_layers: with ``lora_rank = 0``, train only the last n transformer layers (and the
            final norm) in full and freeze the rest; None trains everything. Cheaper per step than
            full fine-tuning on a CPU: no gradients below the trained layers.
        lr, weight_decay, warmup_steps: AdamW + linear warmup.
        lr_schedule: after the warmup, ``constant`` (default, as before) or ``linear`` decay to 0 at
            the fit's last optimizer step (``trainer.estimated_stepping_batches``).
        head_lr: the score head's own learning rate (None: ``lr``). **[reading]**, beyond the papers:
            the head starts random while LoRA starts at zero, and with Adam each weight moves about
            ``lr`` a step, so a head at the LoRA rate takes tens of steps to find the relevance
            direction before the loss leaves ``ln N`` (``docs/rank_sft_cpu.md``).
        eval_k: the cut-off of the logged ``ndcg@k`` / ``mrr@k``.
        length_chunk_size: 0 (default, as before) runs each batch as one padded tensor; n > 0 sorts
            its rows by real length and runs them in chunks of n rows, each cut to its own longest
            row (training, validation and testing; the scores equal the padded forward's). Why: a
            batch pads every row to its longest, most rows are much shorter, and a causal LM's
            cost is in its tokens (a step at 96 tokens: ~9 s → 6.5 s, ``docs/rank_sft_cpu.md``).
        head_init: how the score head starts. ``zero`` (default, as before): a random weight and a
            zero bias, on ``decoder`` text (``query: … document: …`` + EOS). ``prompt``
            (**[reading]**: our option, beyond the DisRanker / RankLLaMA papers): the ranker reads the
            ``decoder-prompt`` text, a relevance question whose answer is one token
            (:data:`kdlab.data.collators.RELEVANCE_PROMPT`: ``Query: {q}\\nDocument: {d}\\nIs the
            document relevant to the query? Answer yes or no.\\nAnswer:``), scored at the prompt's
            last token with no EOS; the head weight starts at ``E_out[yes] − E_out[no]`` (the LM-head
            rows of the answer tokens, :func:`kdlab.data.collators.prompt_answer_ids`: ``" yes"`` /
            ``" no"`` for SmolLM2; tied or untied, read from a causal-LM load of the same checkpoint)
            and the bias at 0, so the step-0 score is exactly ``logit(yes) − logit(no)`` of the
            untouched causal LM at that position: training starts from the LLM's zero-shot
            judgement instead of a random direction. LoRA and ``train_last_layers`` work as with
            ``zero``. The data must say ``text_format: decoder-prompt`` (a mismatch is a one-line
            ConfigError before training); the export records the format, so labeling, evaluation
            and the hf / onnx exports read the same prompt. An option, not the default: a probe
            found SmolLM2-135M-Instruct's zero-shot yes/no NDCG@10 at 0.407 on the embedded sample's
            test split, below random ordering (0.447).

    Exports (``export_pretrained``): the backbone (LoRA merged) + tokenizer via ``save_pretrained``,
    plus ``score_head.safetensors`` and ``kdlab_score_head.json``;
    :func:`kdlab.models.served.load_rank_teacher` reloads it.
    """

    def __init__(
        self,
        backbone: str = "tiny-llama",
        backbone_config: dict[str, Any] | None = None,
        num_layers: int | None = None,
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
        lr_schedule: Literal["constant", "linear"] = "constant",
        head_lr: float | None = None,
        eval_k: int = EVAL_K,
        dtype: str = "float32",
        quantization: str | None = None,
        head_init: Literal["zero", "prompt"] = "zero",
        length_chunk_size: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.check_options(dict(self.hparams))
        output_embeddings = answers = None
        if head_init == "prompt":
            # One causal-LM load: its base model is the backbone, its LM head gives the answer rows.
            lm = load_backbone(backbone, task="causal-lm", config=backbone_config, dtype=dtype,
                               quantization=quantization)
            output_embeddings, base = lm.get_output_embeddings(), lm.base_model
            answers = prompt_answer_ids(load_tokenizer(backbone))
            del lm
        else:
            base = load_backbone(backbone, task="encoder", config=backbone_config, dtype=dtype,
                                 quantization=quantization)
        if num_layers is not None:
            keep_first_layers(base, num_layers)
        hidden = int(base.config.hidden_size)
        if train_last_layers is not None:
            if lora_rank > 0:
                raise ConfigError("model.init_args.train_last_layers: full training of the last layers "
                                  f"needs lora_rank=0, got lora_rank={lora_rank}")
            train_only_last_layers(base, train_last_layers)
        base = apply_lora(base, lora_rank, lora_alpha, lora_dropout, lora_target_modules, "FEATURE_EXTRACTION")
        self.ranker = DecoderRanker(base, hidden, text_format=self.text_format_for(head_init))
        if output_embeddings is not None and answers is not None:
            self.ranker.head.init_from_answers(output_embeddings, answers[0], answers[1])
            del output_embeddings
        self.val_metrics = RankingMetrics(k=eval_k)
        self.main_metric: tuple[str, str] = (f"val/ndcg@{eval_k}", "max")  # the best checkpoint's
        self.test_metrics = RankingMetrics(k=eval_k)

    @staticmethod
    def text_format_for(head_init: str) -> str:
        """The data's ``text_format`` that a ``head_init`` reads."""
        return "decoder-prompt" if head_init == "prompt" else "decoder"

    @classmethod
    def check_options(cls, init_args: Mapping[str, Any]) -> None:
        """Config-time checks of the options alone (:class:`kdlab.protocols.ChecksData`)."""
        head_init = init_args.get("head_init", "zero")
        if head_init not in ("zero", "prompt"):
            raise ConfigError(f"model.init_args.head_init: expected 'zero' or 'prompt', got {head_init!r}")
        if init_args.get("lr_schedule", "constant") not in LR_SCHEDULES:
            raise ConfigError(f"model.init_args.lr_schedule: expected one of {list(LR_SCHEDULES)}, "
                              f"got {init_args['lr_schedule']!r}")
        head_lr = init_args.get("head_lr")
        if head_lr is not None and not head_lr > 0.0:
            raise ConfigError(f"model.init_args.head_lr: expected a learning rate > 0 or null, got {head_lr}")
        chunk = init_args.get("length_chunk_size", 0)
        if not isinstance(chunk, int) or chunk < 0:
            raise ConfigError(f"model.init_args.length_chunk_size: expected an integer >= 0, got {chunk!r}")

    @classmethod
    def check_data(cls, init_args: Mapping[str, Any], datamodule: Any) -> None:
        """Config-time check against the data module (:class:`kdlab.protocols.ChecksData`): the
        ``decoder-prompt`` text goes with ``head_init=prompt`` and only with it."""
        cls._check_text_format(init_args.get("head_init", "zero"), getattr(datamodule, "text_format", None))

    @classmethod
    def _check_text_format(cls, head_init: str, text_format: str | None) -> None:
        want = cls.text_format_for(head_init)
        if text_format is None or text_format == want or "decoder-prompt" not in (text_format, want):
            return
        raise ConfigError(f"data.init_args.text_format={text_format} does not match "
                          f"model.init_args.head_init={head_init}: head_init=prompt reads the yes/no relevance "
                          "prompt (text_format=decoder-prompt) and head_init=zero the plain decoder text; "
                          f"set data.init_args.text_format={want}")

    def setup(self, stage: str) -> None:
        """The same text-format check for runs the CLI does not check before loading (validate, test)."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        self._check_text_format(self.hparams.get("head_init", "zero"), getattr(datamodule, "text_format", None))

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Scores ``[B]`` for tokenized (query, document) texts (``decoder``: ending in EOS;
        ``decoder-prompt``: the relevance prompt, scored at its last token)."""
        chunk = int(self.hparams.get("length_chunk_size", 0) or 0)
        if 0 < chunk < input_ids.shape[0] and right_padded_lengths(attention_mask)[1]:
            return length_chunked_scores(self.ranker, input_ids, attention_mask, None, chunk)
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
        head_lr = hp.get("head_lr")
        return build_optimizer(self, hp.lr, hp.weight_decay, hp.warmup_steps,
                               total_steps=scheduled_steps(self, hp.get("lr_schedule", "constant")),
                               lr_by_prefix=None if head_lr is None else {"ranker.head.": head_lr})

    def export_pretrained(self, directory: str) -> None:
        """Backbone (LoRA merged) + tokenizer + score head, reloadable with ``load_rank_teacher``."""
        save_served_model(self.ranker, self.hparams.backbone, directory, stage=type(self).__name__)

"""Stage C of DisRanker (and RRADistill's RRA-BERT): distil teacher ranking scores into a student.

Per batch of groups (1 positive + n negatives, positive first), with student scores ``s``, teacher
scores ``t`` (optionally standardised, ``t' = (t − μ) / σ`` with the training set's μ, σ) and labels y:

``L(s) = α · mean_i (s_i − t_i)^2 + β · mean_{(p, j)} ((s_p − s_j) − (t_p − t_j))^2 + γ · L_rank(s, y)``

(:func:`kdlab.losses.ranking.hybrid_distill_loss`; γ = ``gt_weight``, ``L_rank`` = ``gt_loss``).
With the Term Control Layer (``use_tcl``, RRADistill, our reading): ``L = L(s) + λ · L(s_tcl)``,
where ``s_tcl`` is the score of :class:`kdlab.models.heads.TermControlLayer` over the encoder's last
hidden states at the selected term positions. The TCL is training-only: validation, prediction and
``export_pretrained`` use the main head only.

RRA-GPT (RRADistill's decoder student, ``architecture: decoder`` + ``reasons_weight``): a causal LM
whose ranking layer scores the ranking input's EOS, trained jointly on ranking and on generating
the LLM's one-sentence reason for each document, appended after that EOS in the same row
(:class:`~kdlab.data.collators.RankingCollator`): ``L = L(s) + λ · L_reason`` with ``L_reason`` the
reasons' token NLL through the LM head (:func:`kdlab.losses.ranking.rank_and_reasons_loss`, formula
there; [paper] joint training, [reading] the sum and the single row). The score's position sees
only the ranking tokens (causal attention), so served scores — the ranking layer alone, no LM
head, no generation — are the scores the loss trained.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor, nn

from kdlab.defaults import EVAL_K
from kdlab.errors import ConfigError
from kdlab.defaults import IGNORE_INDEX
from kdlab.losses.ranking import hybrid_distill_loss, rank_and_reasons_loss, rank_loss
from kdlab.metrics import RankingMetrics
from kdlab.models.backbones import load_backbone, load_tokenizer
from kdlab.models.heads import (
    DecoderRanker,
    SequenceClassificationRanker,
    TermControlLayer,
    select_term_tokens,
)
from kdlab.models.served import save_served_model
from kdlab.protocols import attach_unregistered
from kdlab.stages._common import (
    LR_SCHEDULES,
    RankingEvalMixin,
    build_optimizer,
    group_scores,
    length_chunked_scores,
    linear_warmup,
    right_padded_lengths,
    scheduled_steps,
)

__all__ = ["RankDistillStudent"]


def _as_scores(output: Any) -> Tensor:
    """Per-document scores ``[B]`` from a teacher's output: a tensor ``[B]``/``[B, 1]`` (kdlab
    rankers) or a Hugging Face output with ``logits [B, 1]`` (a ``seq-cls`` teacher loaded by the
    teacher callback)."""
    t = output.logits if hasattr(output, "logits") else output
    if t.dim() == 2:
        if t.shape[1] != 1:
            raise ValueError(f"a live ranking teacher must give one score per document, got logits {tuple(t.shape)}")
        t = t[:, 0]
    return t


def _data_teacher_scores(batch: dict[str, Any]) -> Tensor:
    """``teacher_scores`` of a batch, or an error that says how to get them."""
    if "teacher_scores" not in batch:
        raise ValueError(
            "the ranking data has no 'teacher_score' fields: score it first with `python -m kdlab label "
            "--teacher <TeacherRankSFT export> --input <file> --output <file>` and point the data's "
            "train/val at the output, or set model.init_args.teacher_source=live"
        )
    return batch["teacher_scores"]


def _packable(model: nn.Module) -> bool:
    """Whether :func:`_packed_bert` can run ``model``: a plain one-label ``BertForSequenceClassification``
    (MiniLM, BERT, tiny-bert) with absolute positions, no decoder / cross-attention / feed-forward
    chunking and an ``sdpa`` or ``eager`` attention. Anything else takes the length-chunked path."""
    try:
        from transformers.models.bert.modeling_bert import (
            BertForSequenceClassification,
            BertLayer,
        )
    except ImportError:  # pragma: no cover - transformers without BERT
        return False
    if type(model) is not BertForSequenceClassification:
        return False
    cfg = model.config
    bert = model.bert
    return (bert.pooler is not None and int(cfg.num_labels) == 1 and not cfg.is_decoder
            and not getattr(cfg, "add_cross_attention", False)
            and int(getattr(cfg, "chunk_size_feed_forward", 0) or 0) == 0
            and getattr(cfg, "position_embedding_type", "absolute") == "absolute"
            and getattr(cfg, "_attn_implementation", "eager") in ("sdpa", "eager")
            and all(type(layer) is BertLayer for layer in bert.encoder.layer))


def _dropout(x: Tensor, module: nn.Module) -> Tensor:
    """``module``'s (an ``nn.Dropout``) inverted dropout of ``x``: each entry kept with probability
    ``1 − p`` and scaled by ``1 / (1 − p)``, as ``nn.functional.dropout``. On a CPU the mask is one
    uniform draw compared with ``p`` (``rand ≥ p``), about half the time of the ``bernoulli_`` that
    PyTorch's CPU dropout draws with (same distribution, another stream of the same generator);
    elsewhere PyTorch's own dropout."""
    p = float(module.p)
    if not module.training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return nn.functional.dropout(x, p, training=True)
    return x * torch.rand_like(x).ge_(p).mul_(1.0 / (1.0 - p))


def _packed_bert(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None,
                 lengths: Tensor, chunk: int, return_hidden: bool = False) -> tuple[Tensor, Tensor | None]:
    """Scores ``[B]`` of a :func:`_packable` BERT cross-encoder, its padding removed ("unpadded" BERT).

    Every layer's dense parts (embeddings, Q/K/V as one matmul, attention output, feed-forward,
    LayerNorms, dropout) run once over the batch's *real* tokens packed into one ``[N, H]`` matrix
    (``N`` = Σ lengths), with each row's own positions ``0..len−1``; only attention needs rows, so
    the rows are sorted by length and attention runs per chunk of ``chunk`` rows, each padded to its
    own longest row (padded keys masked). The pooler reads each row's first token (``[CLS]``). This
    is the model's own forward (``BertEmbeddings`` … ``BertForSequenceClassification``, written out
    module by module on the same weights), so scores equal the padded HF forward to float tolerance,
    and so do gradients; dropout (training) is :func:`_dropout`. Right padding assumed (checked by
    the caller).

    ``return_hidden``: also the last hidden states ``[B, T, H]`` in batch order, zeros at padding
    (for the Term Control Layer, which masks padding).
    """
    bert = model.bert
    rows, width = input_ids.shape
    order = torch.argsort(lengths, stable=True)
    sorted_lengths = lengths[order]
    positions = torch.arange(width, device=input_ids.device)
    real = positions.unsqueeze(0) < sorted_lengths.unsqueeze(1)  # [B, T] in sorted row order
    starts = torch.cumsum(sorted_lengths, 0) - sorted_lengths  # first packed token of each sorted row
    emb = bert.embeddings  # BertEmbeddings.forward, on the packed tokens, with :func:`_dropout`
    packed_positions = positions.expand(rows, width)[real]
    packed_types = (emb.token_type_ids[0, packed_positions] if token_type_ids is None
                    else token_type_ids[order][real])
    hidden = emb.word_embeddings(input_ids[order][real]) + emb.token_type_embeddings(packed_types)
    hidden = _dropout(emb.LayerNorm(hidden + emb.position_embeddings(packed_positions)), emb.dropout)
    # Attention plan, shared by every layer: per chunk of sorted rows, the packed token behind each
    # padded slot (a padded slot repeats its row's last token; it is masked as a key and dropped as a
    # query, so it gets exactly zero gradient), the padded slots to keep, and the key mask as a
    # boolean (SDPA) and as an additive 0 / -inf bias (eager attention; every row has a real key,
    # so no softmax row is all -inf).
    host_lengths = sorted_lengths.tolist()
    plan = []
    for a in range(0, rows, chunk):
        b = min(a + chunk, rows)
        w = max(int(host_lengths[b - 1]), 1)
        span = positions[:w].unsqueeze(0)
        row_lengths = sorted_lengths[a:b].unsqueeze(1)
        gather = (starts[a:b].unsqueeze(1) + torch.minimum(span, row_lengths - 1)).reshape(-1)
        keep_mask = span < row_lengths
        bias = torch.zeros(keep_mask.shape, dtype=hidden.dtype, device=hidden.device)
        bias.masked_fill_(~keep_mask, float("-inf"))
        plan.append((b - a, w, gather, keep_mask.reshape(-1).nonzero().squeeze(1), keep_mask[:, None, None, :],
                     bias[:, None, None, :]))
    for layer in bert.encoder.layer:
        sa = layer.attention.self
        heads, head_size = sa.num_attention_heads, sa.attention_head_size
        qkv = nn.functional.linear(hidden, torch.cat([sa.query.weight, sa.key.weight, sa.value.weight]),
                                   torch.cat([sa.query.bias, sa.key.bias, sa.value.bias]))
        attention_dropout = sa.training and sa.dropout.p > 0.0
        parts = []
        for n, w, gather, keep, key_mask, key_bias in plan:
            q, k, v = qkv.index_select(0, gather).view(n, w, 3, heads, head_size).permute(2, 0, 3, 1, 4)
            if attention_dropout:  # HF's eager attention (SDPA's CPU math path adds a safe-softmax check)
                probs = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * sa.scaling + key_bias, dim=-1)
                out = torch.matmul(_dropout(probs, sa.dropout), v)
            else:
                out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, scale=sa.scaling)
            parts.append(out.transpose(1, 2).reshape(n * w, heads * head_size).index_select(0, keep))
        context = torch.cat(parts) if len(parts) > 1 else parts[0]
        so, io, oo = layer.attention.output, layer.intermediate, layer.output  # BertSelfOutput, ...
        attended = so.LayerNorm(_dropout(so.dense(context), so.dropout) + hidden)
        hidden = oo.LayerNorm(_dropout(oo.dense(io.intermediate_act_fn(io.dense(attended))), oo.dropout) + attended)
    pooled = bert.pooler(hidden.index_select(0, starts).unsqueeze(1))
    unsort = torch.argsort(order)
    scores = model.classifier(_dropout(pooled, model.dropout))[:, 0][unsort]
    if not return_hidden:
        return scores, None
    padded = hidden.new_zeros(rows, width, hidden.shape[-1])
    padded[real] = hidden  # sorted rows; put back in batch order below
    return scores, padded[unsort]


class RankDistillStudent(RankingEvalMixin, L.LightningModule):
    """Ranking student trained on teacher scores (read from the data, or from a live teacher).

    Args:
        backbone: ``tiny-bert`` / an alias / a path / a hub id (``tiny-llama`` etc. for ``decoder``).
        backbone_config: tiny-model config overrides.
        architecture: ``cross-encoder`` = ``[CLS] q [SEP] d [SEP]`` → pooled ``[CLS]`` → linear
            (a ``*ForSequenceClassification`` with one label, served as a plain HF model);
            ``decoder`` = base causal LM + last-token score head (RRA-GPT-like, without reasons).
        alpha, beta: weights of point-MSE and margin-MSE (α = 0 / β = 0 are the ablations).
        margin_pairs: ``positive`` (positive vs each negative, Hofstätter) or ``all`` pairs.
        gt_weight, gt_loss, gt_margin: optional ground-truth rank loss on the labels.
        standardize_teacher: use ``(t − μ) / σ``; μ, σ are ``teacher_mean``/``teacher_std`` when
            given, otherwise computed once over the training dataloader's valid teacher scores
            (summed over all ranks) at the start of training, and kept in the checkpoint.
        use_tcl, tcl_weight (λ), tcl_heads: the Term Control Layer (cross-encoder only).
        reasons_weight: RRA-GPT (``decoder`` only): λ of the reasons' NLL; the backbone is loaded
            with its LM head, which the reasons train and the export drops. ``0`` trains the same
            model on ranking alone (the ablation); None (default) loads no LM head at all. The
            training data needs ``reasons: true`` and reasons (``kdlab label --mode listwise --reasons``).
        teacher_source: ``data`` (``batch["teacher_scores"]``) or ``live``: a frozen teacher attached
            through :class:`kdlab.protocols.NeedsTeacher` by the teacher callback (``teacher:`` in
            the config, e.g. ``{backbone: <TeacherRankSFT export>, task: ranker}``; any module
            returning ``[B]`` scores or an HF output with ``logits [B, 1]``). It is called on
            ``teacher_input_ids``/``teacher_attention_mask`` when the batch has them, otherwise on
            the student's own inputs, so it must then share the student's tokenizer and text format.
        length_chunk_size, packed_forward: the fast forward, on by default for training and for
            scoring (validation, test, predict). A batch is padded to its longest row over all
            ``G*N`` rows, so a plain forward pays for many padding tokens (on the embedded sample
            105.5 token slots per pair for 65.6 real ones). With ``length_chunk_size > 0`` the rows
            are sorted by real length and
            * ``packed_forward`` (default) with a BERT cross-encoder (``BertForSequenceClassification``:
              MiniLM, BERT, tiny-bert): the dense layers run once over the real tokens only, packed,
              and attention runs per chunk of ``length_chunk_size`` sorted rows, each padded to its
              own longest row (:func:`_packed_bert`): no padding in the matmuls;
            * otherwise (other backbones, decoder students, ``packed_forward: false``): the rows are
              scored in chunks of ``length_chunk_size``, each cut to its own longest row.
            Either way scores are put back in batch order and padding is masked, so scores and
            gradients equal the plain padded forward's to float tolerance (``tests/test_student_fast_path.py``).
            With dropout on (training) the result is the same *distribution*, not the same draw: the
            fast paths make their dropout masks over different tensor shapes, so they consume the RNG
            differently and a seeded run trains to other (equally valid) weights than with
            ``length_chunk_size: 0``, the plain forward (the behaviour before the fast path was the
            default). Batches that are not right-padded take the plain forward; under strategies
            that shard parameters (FSDP, DeepSpeed) the packed forward gives way to length chunks.
        lr, weight_decay, warmup_steps: AdamW + linear warmup; ``lr_schedule`` then keeps the rate
            ``constant`` (default, as before) or decays it ``linear``-ly to 0 at the fit's last step.
        fused_adamw: AdamW as one fused kernel per parameter group (``torch.optim.AdamW(fused=True)``,
            CPU and CUDA) instead of PyTorch's per-tensor loop, its default off a GPU: the same update
            to float rounding, ~7x less optimizer time on a CPU (MiniLM-L6: ~20 vs ~150 ms a step on
            one core), where the optimizer is a few % of a step. Parameters on another device (or not
            floating point) keep the loop.
    """

    def __init__(
        self,
        backbone: str = "tiny-bert",
        backbone_config: dict[str, Any] | None = None,
        architecture: Literal["cross-encoder", "decoder"] = "cross-encoder",
        alpha: float = 1.0,
        beta: float = 1.0,
        margin_pairs: Literal["positive", "all"] = "positive",
        gt_weight: float = 0.0,
        gt_loss: Literal["listwise", "hinge", "ranknet"] = "listwise",
        gt_margin: float = 1.0,
        standardize_teacher: bool = False,
        teacher_mean: float | None = None,
        teacher_std: float | None = None,
        use_tcl: bool = False,
        tcl_weight: float = 0.5,
        tcl_heads: int = 4,
        reasons_weight: float | None = None,
        teacher_source: Literal["data", "live"] = "data",
        lr: float = 5e-5,
        weight_decay: float = 0.01,
        warmup_steps: int = 0,
        lr_schedule: Literal["constant", "linear"] = "constant",
        eval_k: int = EVAL_K,
        dtype: str = "float32",
        length_chunk_size: int = 16,
        packed_forward: bool = True,
        fused_adamw: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        # Checked before any weights load, so a typo costs a second, not a model load.
        self.check_options(dict(self.hparams))
        self.ranker: nn.Module
        self.reason_head: nn.Module | None = None
        if architecture == "cross-encoder":
            model = load_backbone(backbone, task="seq-cls", config=backbone_config, dtype=dtype, num_labels=1)
            self.ranker = SequenceClassificationRanker(model)
            hidden = int(model.config.hidden_size)
        elif architecture == "decoder" and reasons_weight is not None:
            # One causal-LM load: its base model is the ranker's, its LM head generates the reasons.
            lm = load_backbone(backbone, task="causal-lm", config=backbone_config, dtype=dtype)
            hidden = int(lm.config.hidden_size)
            self.ranker = DecoderRanker(lm.base_model, hidden)
            self.reason_head = lm.get_output_embeddings()
            del lm
        elif architecture == "decoder":
            base = load_backbone(backbone, task="encoder", config=backbone_config, dtype=dtype)
            hidden = int(base.config.hidden_size)
            self.ranker = DecoderRanker(base, hidden)
        else:
            raise ValueError(f"architecture must be 'cross-encoder' or 'decoder', got {architecture!r}")
        self.tcl: TermControlLayer | None = TermControlLayer(hidden, tcl_heads) if use_tcl else None
        self.special_ids: list[int] = list(load_tokenizer(backbone).all_special_ids) if use_tcl else []
        self.register_buffer("teacher_stats", torch.tensor(
            [teacher_mean if teacher_mean is not None else float("nan"),
             teacher_std if teacher_std is not None else float("nan")], dtype=torch.float32))
        self.needs_teacher: bool = teacher_source == "live"
        attach_unregistered(self, "teacher", None)
        self.val_metrics = RankingMetrics(k=eval_k)
        self.main_metric: tuple[str, str] = (f"val/ndcg@{eval_k}", "max")  # the best checkpoint's
        self.test_metrics = RankingMetrics(k=eval_k)

    @classmethod
    def check_options(cls, init_args: Mapping[str, Any]) -> None:
        """Config-time checks of the options alone (:class:`kdlab.protocols.ChecksData`): one-line
        :class:`~kdlab.errors.ConfigError` for a negative or all-zero loss weight and the like."""
        defaults = {"alpha": 1.0, "beta": 1.0, "gt_weight": 0.0, "tcl_weight": 0.5, "eval_k": EVAL_K, "tcl_heads": 4,
                    "length_chunk_size": 16, "warmup_steps": 0, "lr": 5e-5, "use_tcl": False,
                    "architecture": "cross-encoder"}
        a = {**defaults, **init_args}
        for name in ("alpha", "beta", "gt_weight", "tcl_weight"):
            if not a[name] >= 0.0:
                raise ConfigError(f"model.init_args.{name}: a loss weight must be >= 0, got {a[name]} "
                                  "(a negative weight maximises that loss)")
        if a["alpha"] == 0.0 and a["beta"] == 0.0 and a["gt_weight"] == 0.0:
            raise ConfigError("model.init_args: alpha, beta and gt_weight are all 0, so there is no loss to train on")
        for name, least in (("eval_k", 1), ("tcl_heads", 1), ("length_chunk_size", 0), ("warmup_steps", 0)):
            if a[name] < least:
                raise ConfigError(f"model.init_args.{name}: expected an integer >= {least}, got {a[name]}")
        if not a["lr"] > 0.0:
            raise ConfigError(f"model.init_args.lr: expected a learning rate > 0, got {a['lr']}")
        if a.get("lr_schedule", "constant") not in LR_SCHEDULES:
            raise ConfigError(f"model.init_args.lr_schedule: expected one of {list(LR_SCHEDULES)}, "
                              f"got {a['lr_schedule']!r}")
        if a["use_tcl"] and a["architecture"] != "cross-encoder":
            raise ConfigError("model.init_args.use_tcl needs architecture='cross-encoder' "
                              "(token selection uses token_type_ids)")
        reasons = a.get("reasons_weight")
        if reasons is not None and not (a["architecture"] == "decoder" and reasons >= 0.0):
            raise ConfigError(f"model.init_args.reasons_weight: RRA-GPT's reasons need architecture='decoder' and a "
                              f"weight >= 0, got architecture={a['architecture']!r}, reasons_weight={reasons}")

    @classmethod
    def check_data(cls, init_args: Mapping[str, Any], datamodule: Any) -> None:
        """Config-time check against the data (:class:`kdlab.protocols.ChecksData`): a student that
        learns from teacher scores read from the data needs them in its training file."""
        if getattr(datamodule, "reasons", False) and init_args.get("reasons_weight") is None:
            raise ConfigError("data.init_args.reasons=true appends reasons to the training rows, which only an "
                              "RRA-GPT student reads: set model.init_args.reasons_weight (0 = ranking alone)")
        if (init_args.get("reasons_weight") or 0.0) > 0.0 and "train" in getattr(datamodule, "groups", {}):
            source = datamodule.source_label("train")
            if not getattr(datamodule, "reasons", False):
                raise ConfigError("model.init_args.reasons_weight > 0 needs the reasons in the training rows: "
                                  "set data.init_args.reasons=true")
            if not datamodule.has_reasons("train"):
                raise ConfigError(f"{source}: no document has a 'reason', which reasons_weight > 0 trains on; label "
                                  f"it with: python -m kdlab label --mode listwise --reasons --teacher <LLM> "
                                  f"--input ... --output <labels.jsonl>")
        alpha, beta = init_args.get("alpha", 1.0), init_args.get("beta", 1.0)
        if init_args.get("teacher_source", "data") != "data" or (alpha == 0.0 and beta == 0.0):
            return
        has_scores = getattr(datamodule, "has_teacher_scores", None)
        if has_scores is not None and "train" in getattr(datamodule, "groups", {}) and not has_scores("train"):
            source = datamodule.source_label("train")
            raise ConfigError(
                f"{source}: no document has a 'teacher_score', which the distillation loss needs; score it first: "
                f"python -m kdlab label --teacher <TeacherRankSFT export>/model --input {source} --output "
                f"<scored.jsonl>, then set data.init_args.train to the output (or use teacher_source=live)")

    # ---------------------------------------------------------------- teacher
    def attach_teacher(self, teacher: nn.Module) -> None:
        """Keep the frozen live teacher without registering it (never in state_dict / DDP / .to())."""
        attach_unregistered(self, "teacher", teacher)

    def _teacher_scores(self, batch: dict[str, Any]) -> Tensor:
        if self.hparams.teacher_source == "live":
            teacher = getattr(self, "teacher", None)
            if teacher is None:
                raise RuntimeError("teacher_source='live' but no teacher is attached: configure one under "
                                   "`teacher:` (e.g. --teacher.backbone=<ranker export> --teacher.task=ranker)")
            ids = batch.get("teacher_input_ids", batch["input_ids"])
            mask = batch.get("teacher_attention_mask", batch["attention_mask"])
            extra = {} if "teacher_input_ids" in batch or "token_type_ids" not in batch else {
                "token_type_ids": batch["token_type_ids"]}
            with torch.no_grad():
                t = _as_scores(teacher(input_ids=ids, attention_mask=mask, **extra))
            t = group_scores(t.float(), batch)
        else:
            t = _data_teacher_scores(batch).float()
        if self.hparams.standardize_teacher:
            mean, std = self.teacher_stats[0], self.teacher_stats[1]
            if not torch.isfinite(self.teacher_stats).all():
                raise RuntimeError("standardize_teacher is on but the teacher mean/std are not set")
            t = (t - mean) / std.clamp(min=1e-6)
        return t

    def on_train_start(self) -> None:
        if self.hparams.standardize_teacher and not torch.isfinite(self.teacher_stats).all():
            self.teacher_stats.copy_(self._compute_teacher_stats())

    def _compute_teacher_stats(self) -> Tensor:
        """``[μ, σ]`` of all valid, finite teacher scores of the training data (all ranks)."""
        if self.needs_teacher:
            raise ValueError("standardize_teacher with a live teacher needs teacher_mean and teacher_std")
        dm = getattr(self.trainer, "datamodule", None)
        loader = dm.train_dataloader() if dm is not None else self.trainer.train_dataloader
        acc = torch.zeros(3, dtype=torch.float64, device=self.device)  # Σt, Σt², n
        for batch in loader:
            t = _data_teacher_scores(batch).double()
            ok = batch["doc_mask"].bool() & torch.isfinite(t)
            v = t[ok]
            acc += torch.stack([v.sum(), v.pow(2).sum(), torch.tensor(float(v.numel()), dtype=torch.float64)]).to(acc)
        acc = self.trainer.strategy.reduce(acc, reduce_op="sum")
        n = acc[2].clamp(min=1)
        mean = acc[0] / n
        std = (acc[1] / n - mean.pow(2)).clamp(min=0).sqrt()
        return torch.stack([mean, std]).float()

    # ---------------------------------------------------------------- scoring
    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        """Served scores ``[B]`` (main head only), through the fast forward when it is on."""
        fast = self._fast_forward(input_ids, attention_mask, token_type_ids)
        if fast is not None:
            return fast[0]
        return self.ranker(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)

    def _fast_forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None,
                      hidden: bool = False) -> tuple[Tensor, Tensor | None] | None:
        """``(scores [B], last hidden states [B, T, H] or None)`` from the packed or length-chunked
        forward (see ``length_chunk_size``), or None where the plain forward applies: the option is
        off, a chunked forward would be one chunk anyway, the rows are not right-padded, or ``hidden``
        is asked of a backbone the packed forward cannot run."""
        chunk = int(self.hparams.get("length_chunk_size", 0) or 0)
        if chunk <= 0:
            return None
        model = getattr(self.ranker, "model", None)
        packed = (bool(self.hparams.get("packed_forward", True)) and isinstance(self.ranker, SequenceClassificationRanker)
                  and _packable(model) and not self._sharded())
        if not packed and (hidden or input_ids.shape[0] <= chunk):
            return None
        lengths, right_padded = right_padded_lengths(attention_mask)
        if not right_padded:
            return None
        if packed:
            return _packed_bert(model, input_ids, attention_mask, token_type_ids, lengths, chunk, return_hidden=hidden)
        return length_chunked_scores(self.ranker, input_ids, attention_mask, token_type_ids, chunk), None

    def _sharded(self) -> bool:
        """Under a strategy that shards parameters (FSDP, DeepSpeed, model parallel), whose hooks
        gather a layer's weights when the layer module is called: the packed forward reads the
        weights of the layers' sub-modules itself, so it is not used there."""
        trainer = getattr(self, "_trainer", None)
        name = type(trainer.strategy).__name__ if trainer is not None else ""
        return any(key in name for key in ("FSDP", "DeepSpeed", "ModelParallel"))

    def score_groups(self, batch: dict[str, Any]) -> Tensor:
        """Main-head scores ``[G, N]``."""
        return group_scores(self(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids")), batch)

    def _train_scores(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor | None]:
        if self.tcl is None:
            return self.score_groups(batch), None
        tt = batch.get("token_type_ids")
        if tt is None:
            raise KeyError("use_tcl needs token_type_ids in the batch (cross-encoder text format)")
        fast = self._fast_forward(batch["input_ids"], batch["attention_mask"], tt, hidden=True)
        if fast is not None and fast[1] is not None:
            scores, last_hidden = fast
        else:
            out = self.ranker.model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], token_type_ids=tt,
                output_hidden_states=True,
            )
            scores, last_hidden = out.logits[:, 0], out.hidden_states[-1]
        selection = select_term_tokens(batch["input_ids"], tt, batch["attention_mask"], self.special_ids)
        s_tcl = self.tcl(last_hidden, selection)
        return group_scores(scores, batch), group_scores(s_tcl, batch)

    def _score_loss(self, scores: Tensor, teacher: Tensor, batch: dict[str, Any]) -> Tensor:
        hp = self.hparams
        mask = batch["doc_mask"]
        loss = hybrid_distill_loss(scores.float(), teacher, mask, hp.alpha, hp.beta, pairs=hp.margin_pairs)
        if hp.gt_weight != 0.0:
            loss = loss + hp.gt_weight * rank_loss(hp.gt_loss, scores.float(), batch["labels"], mask, margin=hp.gt_margin)
        return loss

    def batch_loss(self, batch: dict[str, Any]) -> Tensor:
        """``L(s) (+ λ · L(s_tcl))`` for the batch (see the module docstring)."""
        return self._losses(batch)[0]

    def _reason_rows(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        """RRA-GPT rows (ranking tokens, then the reason): scores ``[G, N]`` at each row's ranking
        EOS, the LM head's logits before each reason token ``[R, V]`` and those tokens ``[R]``."""
        hidden = self.ranker.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        head = self.ranker.head.dense
        scores = head(hidden[rows, batch["score_positions"]].to(head.weight.dtype)).squeeze(-1)
        targets = batch["reason_labels"][:, 1:]
        take = targets != IGNORE_INDEX
        if not self.hparams.reasons_weight:  # the ablation: the same rows, no LM-head cost
            take = torch.zeros_like(take)
        return group_scores(scores, batch), self.reason_head(hidden[:, :-1][take]), targets[take]

    def _losses(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor | None]:
        distills = self.hparams.alpha != 0.0 or self.hparams.beta != 0.0
        # A student of labels alone (alpha = beta = 0, e.g. on RRADistill's LLM labels) needs no teacher scores.
        teacher = self._teacher_scores(batch) if distills else torch.zeros_like(batch["labels"])
        if "reason_labels" in batch:
            if self.reason_head is None:
                raise RuntimeError("the batch carries reasons (data.init_args.reasons=true) but the student has no "
                                   "LM head for them: set model.init_args.reasons_weight")
            scores, logits, targets = self._reason_rows(batch)
            main = self._score_loss(scores, teacher, batch)
            loss, reason = rank_and_reasons_loss(main, logits, targets, float(self.hparams.reasons_weight))
            return loss, main, reason
        scores, s_tcl = self._train_scores(batch)
        main = self._score_loss(scores, teacher, batch)
        if s_tcl is None:
            return main, main, None
        aux = self._score_loss(s_tcl, teacher, batch)
        return main + self.hparams.tcl_weight * aux, main, aux

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss, main, aux = self._losses(batch)
        bs = batch["doc_mask"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs, sync_dist=True)
        if aux is not None:
            self.log("train/loss_main", main, batch_size=bs, sync_dist=True)
            aux_name = "train/loss_reason" if "reason_labels" in batch else "train/loss_tcl"
            self.log(aux_name, aux, batch_size=bs, sync_dist=True)
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        total = scheduled_steps(self, hp.get("lr_schedule", "constant"))
        config = build_optimizer(self, hp.lr, hp.weight_decay, hp.warmup_steps, total_steps=total)
        if not hp.get("fused_adamw", True):
            return config
        loop = config["optimizer"]
        groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in loop.param_groups]
        if not all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for g in groups for p in g["params"]):
            return config
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, fused=True)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_warmup(hp.warmup_steps, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---------------------------------------------------------------- export
    def served_model(self) -> nn.Module:
        """The module that is served (never includes the TCL)."""
        return self.ranker

    def export_pretrained(self, directory: str) -> None:
        """Save the served model + tokenizer; the TCL is never saved.

        cross-encoder: a plain ``*ForSequenceClassification`` directory (one label), loadable by
        ``AutoModelForSequenceClassification`` or sentence-transformers' ``CrossEncoder``;
        decoder: backbone + ``score_head.safetensors`` like :class:`TeacherRankSFT`.
        """
        save_served_model(self.ranker, self.hparams.backbone, directory, stage=type(self).__name__)

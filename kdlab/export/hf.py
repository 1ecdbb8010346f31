"""The ``cross-encoder`` and ``hf`` exports: a sentence-transformers CrossEncoder directory, a standard
``*ForSequenceClassification`` directory (a decoder ranker becomes e.g. ``LlamaForSequenceClassification``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdlab.export.source import (
    HF_TOLERANCE,
    ExportError,
    ExportSource,
    check_applies,
    distinct_pad_token_id,
    pair_encoder,
    probe_batch,
    save_seq_cls,
    save_tokenizer,
)
from kdlab.models.backbones import load_tokenizer
from kdlab.models.heads import DecoderRanker
from kdlab.models.served import load_rank_teacher


def export_cross_encoder(source: ExportSource, out: Path, *, max_length: int, opset: int) -> dict[str, Any]:
    check_applies(source, "cross-encoder")
    return save_seq_cls(source, out, max_length)


def _decoder_classifier(source: ExportSource, ranker: DecoderRanker,
                        tokenizer: Any) -> tuple[nn.Module, dict[str, Any]]:
    """The decoder ranker as a standard ``*ForSequenceClassification`` (see :func:`export_model`)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    pad, added = distinct_pad_token_id(tokenizer)
    config = AutoConfig.from_pretrained(str(source.model_dir))
    config.num_labels = 1
    config.pad_token_id = pad
    config.architectures = None
    try:
        model = AutoModelForSequenceClassification.from_config(config)
    except ValueError:
        raise ExportError(f"transformers has no *ForSequenceClassification for model type {config.model_type!r} "
                          f"({source.model_dir}): use --format onnx") from None
    model.base_model.load_state_dict(ranker.backbone.state_dict())
    score = getattr(model, "score", None)
    if not isinstance(score, nn.Linear) or score.out_features != 1:
        raise ExportError(f"{type(model).__name__} has no one-label linear `score` head to hold kdlab's score head: "
                          "use --format onnx")
    dense = ranker.head.dense
    shift = 0.0
    with torch.no_grad():
        score.weight.copy_(dense.weight.to(score.weight.dtype))
        if score.bias is not None:
            score.bias.copy_(dense.bias.to(score.bias.dtype))
        else:
            shift = float(dense.bias.item())
    if added:
        model.resize_token_embeddings(len(tokenizer))
    model.config.kdlab_score_bias = shift
    model.eval()
    return model, {"pad_token_id": pad, "pad_token_added": added, "score_bias_shift": shift}


def export_hf(source: ExportSource, out: Path, *, max_length: int, opset: int) -> dict[str, Any]:
    if source.kind == "cross-encoder":
        return save_seq_cls(source, out, max_length)
    from transformers import AutoModelForSequenceClassification

    ranker = load_rank_teacher(str(source.model_dir))
    tokenizer = load_tokenizer(str(source.model_dir))
    model, details = _decoder_classifier(source, ranker, tokenizer)
    model.save_pretrained(str(out))
    eos_appended = save_tokenizer(source, out, max_length, text_format=ranker.text_format, tokenizer=tokenizer)
    # Proof, as a user loads it: transformers' own classes on kdlab's inputs padded with the export's pad id.
    reloaded = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    encoder = pair_encoder(load_tokenizer(str(source.model_dir)), ranker.text_format, max_length)
    batch = probe_batch(encoder)
    ids = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, details["pad_token_id"])
    with torch.no_grad():
        ours = ranker(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        theirs = reloaded(input_ids=ids, attention_mask=batch["attention_mask"]).logits[:, 0]
    diff = float((theirs + details["score_bias_shift"] - ours).abs().max())
    if diff > HF_TOLERANCE:
        raise RuntimeError(f"the hf export does not score like kdlab: max |Δ| = {diff:.3g} > {HF_TOLERANCE}")
    return {**details, "max_length": max_length, "eos_appended_by_tokenizer": eos_appended, "max_abs_diff": diff}

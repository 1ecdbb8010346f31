"""Exports a user's serving stack loads, each checked at export time to score like kdlab.

:func:`export_model` turns a ranker (a run directory's ``model/``, or a bare model directory) into a
sentence-transformers ``CrossEncoder`` directory (:mod:`kdlab.export.hf`), a standard
``*ForSequenceClassification`` directory (``hf``, the same module), or an ONNX graph
(:mod:`kdlab.export.onnx`); each with a model card (:mod:`kdlab.export.card`). What an export reads
is :mod:`kdlab.export.source`; the model directories it reads are :mod:`kdlab.models.served`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from kdlab.export.card import card_text, model_card
from kdlab.export.hf import export_cross_encoder, export_hf
from kdlab.export.onnx import export_onnx
from kdlab.export.source import (
    EXPORT_FORMATS,
    EXPORT_RECORD,
    ExportError,
    ExportFormat,
    ExportSource,
    check_applies,
    default_export_dir,
    distinct_pad_token_id,
    max_length_for,
    read_export_source,
)

__all__ = [
    "EXPORT_FORMATS", "ExportError", "ExportFormat", "ExportSource", "default_export_dir", "distinct_pad_token_id",
    "export_command", "export_model", "model_card", "read_export_source",
]

EXPORTERS = {"cross-encoder": export_cross_encoder, "hf": export_hf, "onnx": export_onnx}


def export_model(run_or_model_dir: str | Path, format: ExportFormat, output: str | Path | None = None, *,
                 max_length: int = 512, opset: int = 17) -> Path:
    """Export a kdlab ranker in a format a serving stack loads; returns the output directory.

    ``run_or_model_dir`` is a run directory (``model/``, ``config.yaml``, ``manifest.json``,
    ``metrics.json``) or a bare model directory; ``output`` defaults to ``<run dir>/export/<format>``
    (``<model dir>-export/<format>`` for a bare one). The output is built in a temporary directory
    and swapped in whole (:func:`kdlab.runs.atomic_dir`): a failed export leaves nothing behind, and
    the previous export stays until the new one is complete. Every output has a model card
    (``README.md``, :func:`model_card`) and ``kdlab_export.json`` (what was checked, measured).

    Formats:

    * ``cross-encoder`` — a sentence-transformers ``CrossEncoder`` directory (cross-encoders only):
      the HF classifier + tokenizer (``model_max_length = max_length``), with
      ``config.sentence_transformers = {"activation_fn": "torch.nn.modules.linear.Identity"}`` (ST's
      default for one label is a sigmoid), so ``CrossEncoder(dir).predict(pairs)`` = kdlab's scores.
      A decoder ranker reads one sequence, not a (query, document) pair: refused, use ``hf``/``onnx``.
    * ``hf`` — a standard ``*ForSequenceClassification`` directory. A cross-encoder is already one
      (the same files as ``cross-encoder``). A decoder ranker becomes e.g.
      ``LlamaForSequenceClassification(num_labels=1)``: base weights as they are, ``score.weight`` =
      kdlab's head weight. transformers scores the rightmost token whose id is not ``pad_token_id``,
      so the export pads with a token other than EOS (:func:`distinct_pad_token_id`; kdlab's last
      token is always EOS) and the saved tokenizer appends the EOS itself (checked by reloading), so
      ``tokenizer(f"query: {q} document: {d}")`` is kdlab's input. kdlab's head has a bias and HF's
      ``score`` has none. That bias starts at 0 (:class:`~kdlab.models.heads.LastTokenScore`) and
      rank losses (hinge / RankNet / listwise, shift-invariant) never move it, so a rank-trained
      teacher's export scores identically. Where a loss did move it, no standard decoder classifier
      can add a constant after the final norm and the export does not invent an architecture for
      it: HF's logit is kdlab's score minus that bias, recorded as ``config.kdlab_score_bias`` and in
      the card; rankings and pairwise margins are still identical.
    * ``onnx`` — ``model.onnx`` (``torch.onnx.export`` at ``opset``: the TorchScript-based exporter,
      else the torch.export-based one, see :func:`_torch_onnx_export`) with inputs ``input_ids`` /
      ``attention_mask`` (/ ``token_type_ids``), dynamic batch and sequence axes, output
      ``scores [batch]``: kdlab's own scorer, bias included, plus the tokenizer. The export checks
      onnxruntime against PyTorch on three padded batch shapes (max |Δ| ≤ 1e-4) and prints their
      median latency side by side (also in ``kdlab_export.json`` and the card).

    Raises:
        ExportError: no ``model/`` in the run directory, not a ranker, a format that does not apply,
            an output that would overwrite the source, missing onnx packages (one line each).
    """
    if format not in EXPORT_FORMATS:
        raise ExportError(f"unknown export format {format!r}; use one of {', '.join(EXPORT_FORMATS)}")
    source = read_export_source(run_or_model_dir)
    length = max_length_for(source.model_dir, max_length)
    check_applies(source, format)
    out = Path(output).expanduser() if output is not None else default_export_dir(source, format)
    resolved, model_dir = out.resolve(), source.model_dir.resolve()
    if resolved == model_dir or model_dir.is_relative_to(resolved) or (
            source.run_dir is not None and source.run_dir.resolve().is_relative_to(resolved)):
        raise ExportError(f"output {out} would replace the model it exports ({source.model_dir}); choose another --output")
    if out.exists() and not out.is_dir():
        raise ExportError(f"output {out} exists and is not a directory")
    from kdlab.runs import atomic_dir, write_json_atomic, write_text_atomic

    with atomic_dir(out, prefix=f".{out.name}.") as build:
        details = EXPORTERS[format](source, build, max_length=length, opset=opset)
        write_text_atomic(build / "README.md", card_text(source, format, details))
        write_json_atomic(build / EXPORT_RECORD, {"format": format, "kind": source.kind,
                                                   "source": str(source.model_dir), **details})
    return out


def export_command(run_dir: str, format: Literal["cross-encoder", "onnx", "hf"], output: str | None = None,
                   max_length: int = 512) -> list[Path]:
    """Export a trained ranker for serving: a sentence-transformers CrossEncoder, ONNX, or an HF classifier.

    Args:
        run_dir: a run directory (with model/, config.yaml, metrics.json) or a model directory.
        format: cross-encoder (sentence_transformers.CrossEncoder loads it), onnx (onnxruntime; dynamic
            batch and sequence axes) or hf (a standard *ForSequenceClassification directory; decoder
            rankers become a Llama-style classifier scoring the last non-padding token).
        output: where to write it (default: <run dir>/export/<format>).
        max_length: tokens per (query, document) the exported model is set up for.
    """
    path = export_model(run_dir, format, output, max_length=max_length)
    print(f"exported ({format}) with a model card: {path}")
    return [path]

"""kdlab model directories: the one way a stage's served model is written, and read back.

Every stage exports through :func:`save_served_model`: a plain Hugging Face directory
(``save_pretrained``, LoRA merged in) plus the tokenizer. A decoder ranker (a TeacherRankSFT
teacher, a decoder student) adds its last-token score head as ``score_head.safetensors`` and
``kdlab_score_head.json``. :func:`load_rank_teacher` reads any ranker directory back, and
:func:`load_teacher` is the one loader of frozen teachers (the teacher callback uses it).
Turning such a directory into what a serving stack loads is :mod:`kdlab.export`.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from kdlab.models.backbones import Quantization, load_backbone, load_tokenizer
from kdlab.models.heads import DecoderRanker, SequenceClassificationRanker
from kdlab.models.text_formats import RELEVANCE_PROMPT

__all__ = [
    "SCORE_HEAD_FILE", "SCORE_HEAD_META", "TeacherConfigError", "TeacherTask", "check_teacher_options", "freeze",
    "load_rank_teacher", "load_score_head", "load_teacher", "merge_lora", "save_score_head", "save_served_model",
    "text_format_of",
]

SCORE_HEAD_FILE = "score_head.safetensors"
SCORE_HEAD_META = "kdlab_score_head.json"

TeacherTask = Literal["causal-lm", "encoder", "seq-cls", "ranker"]


class TeacherConfigError(ValueError):
    """A teacher configuration that cannot work (with this stage or strategy); printed as one line."""


def check_teacher_options(task: TeacherTask, quantization: Quantization | None) -> None:
    """Refuse option combinations no teacher can be loaded with (none today: every task, rankers
    included, loads in full precision or 8-bit / 4-bit; kept as the one place such rules go)."""


def freeze(model: nn.Module) -> nn.Module:
    """``model`` in eval mode with gradients off: how every teacher is held (returns ``model``)."""
    model.eval()
    model.requires_grad_(False)
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """A plain ``transformers`` model: LoRA weights merged in (``merge_and_unload``) when ``model``
    is a peft model, else ``model`` itself. Works on a deep copy so training can go on."""
    if hasattr(model, "merge_and_unload"):
        return copy.deepcopy(model).merge_and_unload()  # type: ignore[operator]
    return model


def save_score_head(head: nn.Module, directory: str | Path, meta: dict[str, Any]) -> None:
    """Write ``score_head.safetensors`` (the head's state dict) and ``kdlab_score_head.json``."""
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    save_file(state, str(out / SCORE_HEAD_FILE))
    (out / SCORE_HEAD_META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def load_score_head(head: nn.Module, directory: str | Path) -> dict[str, Any]:
    """Load ``score_head.safetensors`` into ``head``; return the JSON metadata."""
    from safetensors.torch import load_file

    d = Path(directory)
    head.load_state_dict(load_file(str(d / SCORE_HEAD_FILE)))
    return json.loads((d / SCORE_HEAD_META).read_text())


def save_served_model(model: nn.Module, tokenizer: str, directory: str | Path, *, stage: str) -> None:
    """Write ``model`` and the tokenizer of backbone ``tokenizer`` to ``directory``.

    ``model`` is a ``transformers`` model (a causal LM, a classifier), a
    :class:`~kdlab.models.heads.SequenceClassificationRanker` (saved as its classifier) or a
    :class:`~kdlab.models.heads.DecoderRanker` (its base model plus the score-head files, with
    ``stage`` recorded in the metadata). LoRA adapters are merged in first.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(model, DecoderRanker):
        merge_lora(model.backbone).save_pretrained(str(out))
        meta = {"kind": "decoder-last-token", "hidden_size": model.head.hidden_size,
                "text_format": model.text_format, "stage": stage}
        if model.text_format == "decoder-prompt":
            meta["prompt"] = RELEVANCE_PROMPT  # the text it reads, recorded beside the format
        save_score_head(model.head, out, meta)
    elif isinstance(model, SequenceClassificationRanker):
        merge_lora(model.model).save_pretrained(str(out))
    else:
        merge_lora(model).save_pretrained(str(out))
    load_tokenizer(tokenizer).save_pretrained(str(out))


def load_rank_teacher(
    directory: str, *, dtype: str = "float32", device: str | torch.device | None = None,
    quantization: Quantization | None = None,
) -> DecoderRanker | SequenceClassificationRanker:
    """Load an exported ranker for scoring, frozen.

    A directory with ``kdlab_score_head.json`` (a TeacherRankSFT or decoder-student export) gives a
    :class:`~kdlab.models.heads.DecoderRanker` (base model + last-token head); any other directory is
    loaded as a one-label ``*ForSequenceClassification`` cross-encoder
    (:class:`~kdlab.models.heads.SequenceClassificationRanker`). The ranker's ``text_format`` says
    how its inputs are built (a decoder's is the one its ``kdlab_score_head.json`` records).
    """
    d = Path(directory)
    ranker: DecoderRanker | SequenceClassificationRanker
    # A quantized (bitsandbytes) model is loaded straight onto its device and never moved after.
    placed = {"quantization": quantization, "device": device} if quantization else {}
    if (d / SCORE_HEAD_META).is_file():
        meta = json.loads((d / SCORE_HEAD_META).read_text())
        text_format = _decoder_text_format(meta, d)
        ranker = DecoderRanker(load_backbone(str(d), task="encoder", dtype=dtype, **placed), int(meta["hidden_size"]),
                               text_format=text_format)
        load_score_head(ranker.head, d)
        if quantization:  # the score head stays full precision, beside the quantized base
            ranker.head.to(next(ranker.backbone.parameters()).device)
    else:
        ranker = SequenceClassificationRanker(load_backbone(str(d), task="seq-cls", dtype=dtype, num_labels=1,
                                                            **placed))
    if device is not None and not quantization:
        ranker = ranker.to(device)
    return freeze(ranker)


def _decoder_text_format(meta: dict[str, Any], directory: Path) -> str:
    """The text format a score-head export records (``decoder`` for exports older than the field).
    A ``decoder-prompt`` export must record the prompt kdlab builds today, or it would be scored on
    another text than it was trained on."""
    text_format = str(meta.get("text_format", "decoder"))
    if text_format == "decoder-prompt":
        if meta.get("prompt", RELEVANCE_PROMPT) != RELEVANCE_PROMPT:
            raise ValueError(f"{directory / SCORE_HEAD_META}: the ranker was trained on the prompt {meta['prompt']!r}, "
                             f"but this kdlab builds {RELEVANCE_PROMPT!r}")
    return text_format


def text_format_of(model_dir: str | Path) -> str:
    """An export directory's ranker text format without loading its weights: a score-head export's
    recorded format (``decoder`` / ``decoder-prompt``), anything else ``cross-encoder``
    (as :func:`load_rank_teacher` decides)."""
    d = Path(model_dir)
    if not (d / SCORE_HEAD_META).is_file():
        return "cross-encoder"
    return _decoder_text_format(json.loads((d / SCORE_HEAD_META).read_text()), d)


def load_teacher(
    name: str,
    task: TeacherTask = "causal-lm",
    *,
    config: dict[str, Any] | None = None,
    dtype: str = "float32",
    quantization: Quantization | None = None,
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
    num_labels: int = 1,
) -> nn.Module:
    """A frozen teacher on ``device``: a backbone for ``task`` (:func:`load_backbone`, 8-bit / 4-bit
    through bitsandbytes where asked), or for ``task="ranker"`` an exported ranker directory
    (:func:`load_rank_teacher`, also 8-bit / 4-bit)."""
    check_teacher_options(task, quantization)
    if task == "ranker":
        return load_rank_teacher(name, dtype=dtype, device=device, quantization=quantization)
    model = load_backbone(name, task, config=config, dtype=dtype, quantization=quantization, device=device,
                          trust_remote_code=trust_remote_code, num_labels=num_labels)
    return freeze(model)

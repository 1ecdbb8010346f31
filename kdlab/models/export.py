"""kdlab model directories: the one way a stage's served model is written, and read back.

Every stage exports through :func:`save_served_model`: a plain Hugging Face directory
(``save_pretrained``, LoRA merged in) plus the tokenizer. A decoder ranker (a TeacherRankSFT
teacher, a decoder student) adds its last-token score head as ``score_head.safetensors`` and
``kdlab_score_head.json``. :func:`load_rank_teacher` reads any ranker directory back, and
:func:`load_teacher` is the one loader of frozen teachers (the teacher callback uses it).
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

__all__ = [
    "SCORE_HEAD_FILE", "SCORE_HEAD_META", "TeacherConfigError", "TeacherTask", "check_teacher_options", "freeze", "load_rank_teacher", "load_score_head",
    "load_teacher", "merge_lora", "save_score_head", "save_served_model",
]

SCORE_HEAD_FILE = "score_head.safetensors"
SCORE_HEAD_META = "kdlab_score_head.json"

TeacherTask = Literal["causal-lm", "encoder", "seq-cls", "ranker"]


class TeacherConfigError(ValueError):
    """A teacher configuration that cannot work (with this stage or strategy); printed as one line."""


def check_teacher_options(task: TeacherTask, quantization: Quantization | None) -> None:
    """Refuse option combinations no teacher can be loaded with."""
    if task == "ranker" and quantization is not None:
        raise TeacherConfigError("teacher task 'ranker' loads a full-precision export: set quantization to null "
                                 "(or quantize a causal-lm/encoder teacher)")


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
        save_score_head(model.head, out, {"kind": "decoder-last-token", "hidden_size": model.head.hidden_size,
                                          "text_format": model.text_format, "stage": stage})
    elif isinstance(model, SequenceClassificationRanker):
        merge_lora(model.model).save_pretrained(str(out))
    else:
        merge_lora(model).save_pretrained(str(out))
    load_tokenizer(tokenizer).save_pretrained(str(out))


def load_rank_teacher(
    directory: str, *, dtype: str = "float32", device: str | torch.device | None = None
) -> DecoderRanker | SequenceClassificationRanker:
    """Load an exported ranker for scoring, frozen.

    A directory with ``kdlab_score_head.json`` (a TeacherRankSFT or decoder-student export) gives a
    :class:`~kdlab.models.heads.DecoderRanker` (base model + last-token head); any other directory is
    loaded as a one-label ``*ForSequenceClassification`` cross-encoder
    (:class:`~kdlab.models.heads.SequenceClassificationRanker`). The ranker's ``text_format`` says
    how its inputs are built.
    """
    d = Path(directory)
    ranker: DecoderRanker | SequenceClassificationRanker
    if (d / SCORE_HEAD_META).is_file():
        meta = json.loads((d / SCORE_HEAD_META).read_text())
        ranker = DecoderRanker(load_backbone(str(d), task="encoder", dtype=dtype), int(meta["hidden_size"]))
        load_score_head(ranker.head, d)
    else:
        ranker = SequenceClassificationRanker(load_backbone(str(d), task="seq-cls", dtype=dtype, num_labels=1))
    if device is not None:
        ranker = ranker.to(device)
    return freeze(ranker)


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
    (:func:`load_rank_teacher`, full precision only)."""
    check_teacher_options(task, quantization)
    if task == "ranker":
        return load_rank_teacher(name, dtype=dtype, device=device)
    model = load_backbone(name, task, config=config, dtype=dtype, quantization=quantization, device=device,
                          trust_remote_code=trust_remote_code, num_labels=num_labels)
    return freeze(model)

"""kdlab model directories: the one way a stage's served model is written, and read back.

Every stage exports through :func:`save_served_model`: a plain Hugging Face directory
(``save_pretrained``, LoRA merged in) plus the tokenizer. A decoder ranker (a TeacherRankSFT
teacher, a decoder student) adds its last-token score head as ``score_head.safetensors`` and
``kdlab_score_head.json``. :func:`load_rank_teacher` reads any ranker directory back, and
:func:`load_teacher` is the one loader of frozen teachers (the teacher callback uses it).

:func:`export_model` turns a ranker (a run directory's ``model/``, or a bare model directory) into
what a user's serving stack loads: a sentence-transformers ``CrossEncoder`` directory, a standard
``*ForSequenceClassification`` directory (``hf``), or an ONNX graph; each with a model card
(:func:`model_card`) and each checked at export time to score like kdlab.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from kdlab.models.backbones import Quantization, load_backbone, load_tokenizer
from kdlab.models.heads import DecoderRanker, SequenceClassificationRanker

__all__ = [
    "EXPORT_FORMATS", "ExportError", "ExportFormat", "ExportSource", "ONNX_EXPORTERS", "SCORE_HEAD_FILE",
    "SCORE_HEAD_META", "TeacherConfigError", "TeacherTask", "check_teacher_options", "default_export_dir",
    "distinct_pad_token_id", "export_model", "freeze", "load_rank_teacher",
    "load_score_head", "load_teacher", "merge_lora", "model_card", "read_export_source", "save_score_head",
    "save_served_model", "text_format_of",
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
            from kdlab.data.collators import RELEVANCE_PROMPT

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
        from kdlab.data.collators import RELEVANCE_PROMPT

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


# ====================================================================================== exports
ExportFormat = Literal["cross-encoder", "onnx", "hf"]
EXPORT_FORMATS: tuple[str, ...] = ("cross-encoder", "onnx", "hf")

#: What sentence-transformers applies to a one-label CrossEncoder's logit when the config names it
#: (``config.sentence_transformers["activation_fn"]``, ST >= 4; ``sbert_ce_default_activation_function``
#: before): the identity, so ``predict`` returns kdlab's raw scores (ST's own default is a sigmoid).
ST_IDENTITY = "torch.nn.modules.linear.Identity"
#: The export's own record (what was checked, the measured latency) beside the model files.
EXPORT_RECORD = "kdlab_export.json"
#: Tolerances of the export-time checks (fp32; the tests hold the same ones).
HF_TOLERANCE, ONNX_TOLERANCE = 1e-5, 1e-4
_PROBE_PAIRS: tuple[tuple[str, str], ...] = (
    ("what does os.path.join do", "os.path.join joins one or more path components intelligently."),
    ("sort a list", "sorted returns a new sorted list from the items in iterable."),
    ("json", "json.dumps serializes obj to a JSON formatted str using this conversion table, with keys "
             "sorted when sort_keys is true and the separators given."),
    ("how to read a file line by line in python", "io"),
)


class ExportError(ValueError):
    """A user's mistake in asking for an export (no model, a format that does not apply); one line."""


@dataclass(frozen=True)
class ExportSource:
    """A ranker to export and the record of the run that made it (empty when there is none).

    ``kind``: ``cross-encoder`` (a one-label ``*ForSequenceClassification``, kdlab text format
    ``cross-encoder``) or ``decoder`` (base decoder + ``score_head.safetensors``, text format
    ``decoder``). ``config`` / ``manifest`` / ``metrics`` are the run's ``config.yaml``,
    ``manifest.json`` and ``metrics.json``.
    """

    model_dir: Path
    kind: Literal["cross-encoder", "decoder"]
    run_dir: Path | None = None
    config: dict[str, Any] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)


def _read_record(path: Path) -> dict[str, Any]:
    """A run's ``config.yaml`` / ``*.json`` as a dict (``{}`` when absent); unreadable = one line."""
    if not path.is_file():
        return {}
    try:
        if path.suffix == ".yaml":
            import yaml

            data = yaml.safe_load(path.read_text())
        else:
            data = json.loads(path.read_text())
    except Exception as err:  # noqa: BLE001 - JSON, YAML and OS errors alike: one line naming the file
        first = (str(err).splitlines() or [""])[0]
        raise ExportError(f"{path}: cannot be read ({type(err).__name__}: {first})") from None
    return data if isinstance(data, dict) else {}


def _ranker_kind(model_dir: Path) -> Literal["cross-encoder", "decoder"]:
    if (model_dir / SCORE_HEAD_META).is_file():
        return "decoder"
    config = _read_record(model_dir / "config.json")
    architectures = [str(a) for a in config.get("architectures") or []]
    labels = len(config.get("id2label") or {}) or int(config.get("num_labels", 1) or 1)
    if any(a.endswith("ForSequenceClassification") for a in architectures) and labels == 1:
        return "cross-encoder"
    what = architectures[0] if architectures else f"model type {config.get('model_type', '?')!r}"
    raise ExportError(f"{model_dir} holds a {what}, not a kdlab ranker: export takes a ranker directory (a one-label "
                      "*ForSequenceClassification cross-encoder, or a decoder with kdlab_score_head.json)")


def read_export_source(run_or_model_dir: str | Path) -> ExportSource:
    """Resolve a run directory (``model/`` + ``config.yaml`` + ``manifest.json`` + ``metrics.json``)
    or a bare model directory (a run's ``model/`` counts as its run) into an :class:`ExportSource`."""
    path = Path(run_or_model_dir).expanduser()
    if not path.is_dir():
        raise ExportError(f"{path} is not a directory (expected a run directory with model/, or a model directory)")
    run_files = [n for n in ("manifest.json", "config.yaml", "metrics.json") if (path / n).is_file()]
    if (path / "model").is_dir():
        run_dir: Path | None = path
        model_dir = path / "model"
    elif (path / "config.json").is_file():
        model_dir = path
        parent = path.parent
        run_dir = parent if path.name == "model" and (parent / "manifest.json").is_file() else None
    elif run_files:
        raise ExportError(f"{path} is a run directory without model/ (its stage exported no model, or the run "
                          "did not finish fitting): export a run that trained a ranker")
    else:
        raise ExportError(f"{path} is neither a run directory (with model/) nor a model directory (with config.json)")
    if not (model_dir / "config.json").is_file():
        raise ExportError(f"{model_dir} has no config.json: not a Hugging Face model directory")
    kind = _ranker_kind(model_dir)
    if run_dir is None:
        return ExportSource(model_dir=model_dir, kind=kind)
    return ExportSource(model_dir=model_dir, kind=kind, run_dir=run_dir,
                        config=_read_record(run_dir / "config.yaml"),
                        manifest=_read_record(run_dir / "manifest.json"),
                        metrics=_read_record(run_dir / "metrics.json"))


def default_export_dir(source: ExportSource, format: str) -> Path:
    """``<run dir>/export/<format>``; for a bare model directory ``<model dir>-export/<format>``."""
    if source.run_dir is not None:
        return source.run_dir / "export" / format
    return source.model_dir.with_name(source.model_dir.name + "-export") / format


# ------------------------------------------------------------------------------- scoring helpers
def _pair_encoder(tokenizer: Any, kind: str, max_length: int) -> Any:
    from kdlab.data.collators import RankingCollator

    return RankingCollator(tokenizer, kind, max_length=max_length)  # type: ignore[arg-type]


def _probe_batch(encoder: Any, repeat: int = 1) -> dict[str, torch.Tensor]:
    """kdlab's model inputs for the probe pairs (different lengths, so right padding is exercised)."""
    pairs = list(_PROBE_PAIRS) * repeat
    return encoder.pad([encoder.encode(q, d) for q, d in pairs])


def _median_ms(fn: Any, repeats: int = 10, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def _max_length_for(model_dir: Path, max_length: int) -> int:
    """``max_length`` capped at the model's position limit (a longer input could not be scored)."""
    if max_length < 2:
        raise ExportError(f"max_length must be at least 2 tokens, got {max_length}")
    limit = _read_record(model_dir / "config.json").get("max_position_embeddings")
    return min(max_length, int(limit)) if isinstance(limit, int) and limit > 1 else max_length


# --------------------------------------------------------------------------------- tokenizers
def distinct_pad_token_id(tokenizer: Any) -> tuple[int, bool]:
    """A pad id that differs from EOS, set on ``tokenizer``; ``(id, added)``.

    transformers' decoder classifiers (``LlamaForSequenceClassification`` and kin) score the
    rightmost token whose id is not ``pad_token_id``. kdlab's decoder inputs end with EOS, and many
    decoders pad with EOS (:func:`~kdlab.models.backbones.load_tokenizer` does when a tokenizer has no
    pad token): then HF would score the token *before* the EOS. So the export pads with the
    tokenizer's own pad token when it is not EOS, else its UNK / BOS / another special token, else a
    new ``<pad>`` token (``added``: the caller grows the embeddings; the new row is only ever masked).
    """
    eos = tokenizer.eos_token_id
    candidates = [tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.bos_token_id, *tokenizer.all_special_ids]
    for candidate in candidates:
        if candidate is not None and candidate != eos:
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(int(candidate))
            return int(candidate), False
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    return int(tokenizer.pad_token_id), True


def _append_eos_template(tokenizer: Any) -> bool:
    """Make ``tokenizer(text)`` give ``ids(text) + [EOS]`` (kdlab's decoder input) instead of the
    tokenizer's own special tokens; False when the tokenizer has no fast backend to change."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or tokenizer.eos_token is None:
        return False
    from tokenizers.processors import TemplateProcessing

    eos = tokenizer.eos_token
    backend.post_processor = TemplateProcessing(
        single=f"$A:0 {eos}:0", pair=f"$A:0 {eos}:0 $B:1 {eos}:1", special_tokens=[(eos, int(tokenizer.eos_token_id))])
    for attr in ("add_bos_token", "add_eos_token"):  # Llama-style tokenizers rebuild their template from these
        if hasattr(tokenizer, attr):
            setattr(tokenizer, attr, attr == "add_eos_token")
    return True


def _save_tokenizer(source: ExportSource, out: Path, max_length: int, *, text_format: str,
                    tokenizer: Any = None) -> bool:
    """Save the ranker's tokenizer to ``out`` with ``model_max_length = max_length``. For ``decoder``
    text, try to make plain ``tokenizer(text)`` append the EOS (checked by reloading); returns whether
    it does (else users append ``eos_token_id`` themselves, as the card then says). ``decoder-prompt``
    text is encoded with ``add_special_tokens=False`` and nothing appended (the card says so): False."""
    from transformers import AutoTokenizer

    tok = tokenizer if tokenizer is not None else load_tokenizer(str(source.model_dir))
    tok.model_max_length = max_length
    if text_format == "cross-encoder":
        tok.save_pretrained(str(out))
        return False
    tok.model_input_names = ["input_ids", "attention_mask"]  # decoders take no token_type_ids
    if text_format == "decoder-prompt":
        tok.save_pretrained(str(out))
        return False
    reference = copy.deepcopy(tok)
    templated = _append_eos_template(tok)
    tok.save_pretrained(str(out))
    if templated:
        text = "query: " + _PROBE_PAIRS[0][0] + " document: " + _PROBE_PAIRS[0][1]
        want = list(reference(text, add_special_tokens=False)["input_ids"]) + [int(reference.eos_token_id)]
        if list(AutoTokenizer.from_pretrained(str(out))(text)["input_ids"]) == want:
            return True
    reference.save_pretrained(str(out))  # the template did not survive a reload: keep the original
    return False


# ------------------------------------------------------------------------------------ formats
def _save_seq_cls(source: ExportSource, out: Path, max_length: int) -> dict[str, Any]:
    """A one-label ``*ForSequenceClassification`` + tokenizer, with sentence-transformers told to
    apply no activation (both the ST >= 4 key and the older one), so ``CrossEncoder.predict`` and
    plain transformers both give kdlab's raw scores."""
    ranker = load_rank_teacher(str(source.model_dir))
    model = ranker.model
    model.config.sentence_transformers = {"activation_fn": ST_IDENTITY}
    model.config.sbert_ce_default_activation_function = ST_IDENTITY
    model.save_pretrained(str(out))
    _save_tokenizer(source, out, max_length, text_format="cross-encoder")
    return {"max_length": max_length, "activation": "identity", "score_bias_shift": 0.0}


def _check_applies(source: ExportSource, format: str) -> None:
    """Refuse, in one line, a format that cannot hold this ranker faithfully."""
    if format == "cross-encoder" and source.kind == "decoder":
        raise ExportError(f"{source.model_dir} is a decoder ranker (one sequence 'query: … document: …' + EOS), which a "
                          "sentence-transformers CrossEncoder (query, document) pair model cannot score faithfully: "
                          "use --format hf (a standard *ForSequenceClassification) or --format onnx")


def _export_cross_encoder(source: ExportSource, out: Path, *, max_length: int, opset: int) -> dict[str, Any]:
    _check_applies(source, "cross-encoder")
    return _save_seq_cls(source, out, max_length)


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


def _export_hf(source: ExportSource, out: Path, *, max_length: int, opset: int) -> dict[str, Any]:
    if source.kind == "cross-encoder":
        return _save_seq_cls(source, out, max_length)
    from transformers import AutoModelForSequenceClassification

    ranker = load_rank_teacher(str(source.model_dir))
    tokenizer = load_tokenizer(str(source.model_dir))
    model, details = _decoder_classifier(source, ranker, tokenizer)
    model.save_pretrained(str(out))
    eos_appended = _save_tokenizer(source, out, max_length, text_format=ranker.text_format, tokenizer=tokenizer)
    # Proof, as a user loads it: transformers' own classes on kdlab's inputs padded with the export's pad id.
    reloaded = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    encoder = _pair_encoder(load_tokenizer(str(source.model_dir)), ranker.text_format, max_length)
    batch = _probe_batch(encoder)
    ids = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, details["pad_token_id"])
    with torch.no_grad():
        ours = ranker(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        theirs = reloaded(input_ids=ids, attention_mask=batch["attention_mask"]).logits[:, 0]
    diff = float((theirs + details["score_bias_shift"] - ours).abs().max())
    if diff > HF_TOLERANCE:
        raise RuntimeError(f"the hf export does not score like kdlab: max |Δ| = {diff:.3g} > {HF_TOLERANCE}")
    return {**details, "max_length": max_length, "eos_appended_by_tokenizer": eos_appended, "max_abs_diff": diff}


class _OnnxScorer(nn.Module):
    """``scores [B]`` of a kdlab ranker from explicit tensor inputs (what the ONNX graph computes)."""

    def __init__(self, ranker: nn.Module, with_token_types: bool) -> None:
        super().__init__()
        self.ranker = ranker
        self.with_token_types = with_token_types

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        if self.with_token_types:
            return self.ranker(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return self.ranker(input_ids=input_ids, attention_mask=attention_mask)


def _onnx_modules() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxruntime
    except ImportError as err:
        raise ExportError(f"the onnx export needs onnx and onnxruntime ({err.name} is missing): "
                          "pip install onnx onnxruntime") from None
    return onnx, onnxruntime


ONNX_EXPORTERS: tuple[str, ...] = ("torchscript", "dynamo")


def _torch_onnx_export(scorer: nn.Module, batch: dict[str, torch.Tensor], names: list[str], path: Path, *,
                       exporter: str, opset: int, max_length: int) -> None:
    """Write ``scorer`` to ``path`` with ``torch.onnx.export`` and dynamic ``batch`` / ``sequence`` axes.

    ``torchscript`` (``dynamo=False``) emits the requested opset natively (17 by default), needs no
    ``onnxscript``, takes about a second for the tiny models and writes the same bytes on every run;
    torch 2.13 deprecates it. ``dynamo`` (the torch.export-based exporter, torch's default) needs
    ``onnxscript``, is also byte-stable but ~20x slower here, and below opset 18 converts down from
    18, which can fail and then keeps 18 (the card reports the opset the file really has).
    """
    import warnings

    args = tuple(batch[n] for n in names)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            torch.onnx.export(scorer, args, str(path), input_names=names, output_names=["scores"], opset_version=opset,
                              dynamo=False, dynamic_axes={**{n: {0: "batch", 1: "sequence"} for n in names},
                                                          "scores": {0: "batch"}})
            return
        try:
            import onnxscript  # noqa: F401 - the torch.export-based exporter needs it
        except ImportError:
            raise ExportError("the torch.export-based ONNX exporter needs onnxscript: pip install onnxscript") from None
        big = sum(p.numel() * p.element_size() for p in scorer.parameters()) > 1_800_000_000
        batch_dim, seq_dim = torch.export.Dim("batch"), torch.export.Dim("sequence", max=max(max_length, 8))
        torch.onnx.export(scorer, args, str(path), input_names=names, output_names=["scores"], opset_version=opset,
                          dynamo=True, external_data=big, verbose=False,
                          dynamic_shapes={n: {0: batch_dim, 1: seq_dim} for n in names})


def _export_onnx(source: ExportSource, out: Path, *, max_length: int, opset: int) -> dict[str, Any]:
    """``model.onnx`` (dynamic batch and sequence axes, output ``scores``) + tokenizer.

    The graph is kdlab's own scorer (:class:`~kdlab.models.heads.DecoderRanker` — last real token by
    the attention mask, head bias included — or the classifier's logit), so ONNX scores are kdlab's.
    Each exporter of :data:`ONNX_EXPORTERS` is tried in turn until one writes a graph that
    onnxruntime runs like PyTorch on three batch shapes (a traced graph that baked a shape in fails
    that check); the one used is recorded.
    """
    onnx, ort = _onnx_modules()
    ranker = load_rank_teacher(str(source.model_dir))
    encoder = _pair_encoder(load_tokenizer(str(source.model_dir)), ranker.text_format, max_length)
    batch = _probe_batch(encoder)
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in batch]
    scorer = _OnnxScorer(ranker, "token_type_ids" in names).eval()
    checks = [batch, _probe_batch(encoder, repeat=2), encoder.pad([encoder.encode(*_PROBE_PAIRS[-1])])]
    with torch.no_grad():
        expected = [scorer(*(c[n] for n in names)).numpy() for c in checks]
    timed = checks[1]
    with torch.inference_mode():  # before any onnxruntime session: its spinning threads would slow PyTorch
        torch_ms = _median_ms(lambda: scorer(*(timed[n] for n in names)))
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    path = out / "model.onnx"
    failures: list[str] = []
    for exporter in ONNX_EXPORTERS:
        for leftover in out.glob("model.onnx*"):
            leftover.unlink()
        try:
            _torch_onnx_export(scorer, batch, names, path, exporter=exporter, opset=opset, max_length=max_length)
            onnx.checker.check_model(str(path))
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            diff = max(float(abs(session.run(["scores"], {n: c[n].numpy() for n in names})[0] - want).max())
                       for c, want in zip(checks, expected))
        except ExportError:
            raise
        except Exception as err:  # noqa: BLE001 - this exporter could not do it: try the next one
            failures.append(f"{exporter}: {type(err).__name__}: {(str(err).splitlines() or [''])[0]}")
            continue
        if diff <= ONNX_TOLERANCE:
            break
        failures.append(f"{exporter}: onnxruntime differs from PyTorch by {diff:.3g} > {ONNX_TOLERANCE}")
    else:
        raise RuntimeError("no ONNX exporter wrote a graph that scores like kdlab: " + "; ".join(failures))
    written_opset = max(int(o.version) for o in onnx.load(str(path), load_external_data=False).opset_import
                        if o.domain in ("", "ai.onnx"))

    def run_ort(b: dict[str, torch.Tensor]) -> Any:
        return session.run(["scores"], {n: b[n].numpy() for n in names})[0]

    ort_ms = _median_ms(lambda: run_ort(timed))
    shape = tuple(timed["input_ids"].shape)
    latency = {"batch": shape[0], "tokens": shape[1], "repeats": 10, "threads": torch.get_num_threads(),
               "pytorch_ms": round(torch_ms, 3), "onnxruntime_ms": round(ort_ms, 3)}
    print(f"[kdlab] onnx latency, batch {shape[0]} x {shape[1]} tokens, median of 10 on {latency['threads']} "
          f"thread(s): PyTorch {torch_ms:.2f} ms | onnxruntime {ort_ms:.2f} ms", flush=True)
    eos_appended = _save_tokenizer(source, out, max_length, text_format=ranker.text_format)
    return {"max_length": max_length, "opset": written_opset, "exporter": exporter, "exporter_failures": failures,
            "inputs": names, "output": "scores", "max_abs_diff": diff, "latency": latency,
            "eos_appended_by_tokenizer": eos_appended, "score_bias_shift": 0.0}


_EXPORTERS = {"cross-encoder": _export_cross_encoder, "hf": _export_hf, "onnx": _export_onnx}


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
    length = _max_length_for(source.model_dir, max_length)
    _check_applies(source, format)
    out = Path(output).expanduser() if output is not None else default_export_dir(source, format)
    resolved, model_dir = out.resolve(), source.model_dir.resolve()
    if resolved == model_dir or model_dir.is_relative_to(resolved) or (
            source.run_dir is not None and source.run_dir.resolve().is_relative_to(resolved)):
        raise ExportError(f"output {out} would replace the model it exports ({source.model_dir}); choose another --output")
    if out.exists() and not out.is_dir():
        raise ExportError(f"output {out} exists and is not a directory")
    from kdlab.runs import atomic_dir, write_json_atomic, write_text_atomic

    with atomic_dir(out, prefix=f".{out.name}.") as build:
        details = _EXPORTERS[format](source, build, max_length=length, opset=opset)
        write_text_atomic(build / "README.md", _card(source, format, details))
        write_json_atomic(build / EXPORT_RECORD, {"format": format, "kind": source.kind,
                                                   "source": str(source.model_dir), **details})
    return out


# ------------------------------------------------------------------------------------ the card
def _base_model(backbone: str | None) -> tuple[str | None, str]:
    """``(hub id for the card's base_model or None, words for the text)`` of a run's backbone."""
    from kdlab.models.backbones import TINY_NAMES
    from kdlab.models.prepare import ALIASES

    if not backbone:
        return None, "unknown (no run record)"
    if backbone in TINY_NAMES:
        return None, f"`{backbone}` (kdlab's tiny random-init test configuration, no pretrained weights)"
    if backbone in ALIASES:
        hub = ALIASES[backbone].hub_id
        return hub, f"`{backbone}` (prepared by `kdlab models prepare`; on the hub: `{hub}`)"
    if Path(backbone).expanduser().exists() or backbone.startswith((".", "/", "~")):
        return None, f"the local directory `{backbone}`"
    return backbone, f"`{backbone}`"


def _license_of(backbone: str | None) -> str:
    """The base model's license when its directory's card names one, else the project's."""
    if backbone:
        from kdlab.models.prepare import ALIASES, alias_dir

        directory = alias_dir(backbone) if backbone in ALIASES else Path(backbone).expanduser()
        readme = directory / "README.md"
        if readme.is_file():
            text = readme.read_text(errors="replace")
            if text.startswith("---"):
                import yaml

                try:
                    front = yaml.safe_load(text.split("---", 2)[1]) or {}
                except Exception:  # noqa: BLE001 - a foreign card; fall back to the project's license
                    front = {}
                if isinstance(front, dict) and isinstance(front.get("license"), str):
                    return front["license"]
    return "apache-2.0"


def _fmt(value: Any) -> str:
    """A recipe value for a Markdown table cell (``|`` escaped)."""
    if isinstance(value, float):
        return f"{value:.6g}"
    if value is None:
        return "—"
    text = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else str(value)
    return "`" + text.replace("|", "\\|") + "`"


def _table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


_TEXT_FORMAT = {
    "cross-encoder": ("A (query, document) pair, tokenized as a pair by the saved tokenizer (BERT-style: "
                      "`[CLS] query [SEP] document [SEP]` with token types), truncated to {L} tokens; "
                      "the document is `title + \" \" + body`. The score is the single logit, no activation "
                      "(higher = more relevant)."),
    "decoder": ("One sequence: `query: {{query}} document: {{title}} {{body}}` (trailing spaces stripped), "
                "encoded without the tokenizer's special tokens, then the EOS token appended ({eos}); at most {L} "
                "tokens including the EOS. The score is read at that final EOS token (last-token pooling)."),
    "decoder-prompt": ("One sequence, a yes/no relevance question (`TeacherRankSFT(head_init=\"prompt\")`): `{prompt}` "
                       "with the document `{{title}} {{body}}`, encoded without the tokenizer's special tokens and with "
                       "nothing appended; at most {L} tokens (a longer prompt has its document cut, never the question). "
                       "The score is read at the prompt's last token (last-token pooling)."),
}


_HF_IMPORT = "from transformers import AutoModelForSequenceClassification, AutoTokenizer"
_PAIRS_LINE = 'pairs = [("what is python", "Python is a language."), ("what is python", "A python is a snake.")]'


def _snippets(format: str, kind: str, eos_appended: bool, shift: float, text_format: str = "") -> list[str]:
    if format == "cross-encoder":
        return ["```python", "from sentence_transformers import CrossEncoder", "",
                'model = CrossEncoder("path/to/this/directory")',
                'scores = model.predict([("what is python", "Python is a programming language."),',
                '                        ("what is python", "A python is a snake.")])  # raw logits', "```"]
    if format == "hf" and kind == "cross-encoder":
        return ["```python", "import torch", _HF_IMPORT, "",
                'tok = AutoTokenizer.from_pretrained("path/to/this/directory")',
                'model = AutoModelForSequenceClassification.from_pretrained("path/to/this/directory").eval()',
                'batch = tok(["what is python"] * 2, ["Python is a language.", "A python is a snake."],',
                '            padding=True, truncation=True, return_tensors="pt")',
                "with torch.no_grad():", "    scores = model(**batch).logits[:, 0]", "```",
                "It is also a sentence-transformers `CrossEncoder` directory (identity activation)."]
    texts = '[f"query: {q} document: {d}".rstrip() for q, d in pairs]'
    if text_format == "decoder-prompt":
        from kdlab.data.collators import RELEVANCE_PROMPT

        encode = [f"prompt = {RELEVANCE_PROMPT!r}",
                  "texts = [prompt.format(query=q, document=d) for q, d in pairs]",
                  'batch = tok(texts, add_special_tokens=False, padding=True, return_tensors="pt")  # no EOS']
    elif eos_appended:
        encode = [f"texts = {texts}",
                  'batch = tok(texts, padding=True, truncation=True, return_tensors="pt")  # appends EOS']
    else:
        encode = [f"texts = {texts}",
                  "ids = [x + [tok.eos_token_id] for x in tok(texts, add_special_tokens=False)['input_ids']]",
                  'batch = tok.pad({"input_ids": ids}, return_tensors="pt")']
    if format == "hf":
        lines = ["```python", "import torch", _HF_IMPORT, "",
                 'tok = AutoTokenizer.from_pretrained("path/to/this/directory")',
                 'model = AutoModelForSequenceClassification.from_pretrained("path/to/this/directory").eval()',
                 _PAIRS_LINE,
                 *encode, "with torch.no_grad():",
                 "    scores = model(**batch).logits[:, 0]" + ("  # kdlab's score minus config.kdlab_score_bias" if shift else ""),
                 "```"]
        if shift:
            lines.append(f"kdlab's absolute scores are `logits + {shift!r}` (`config.kdlab_score_bias`); rankings are "
                         "the same either way (see \"Fidelity\").")
        return lines
    prefix = [_PAIRS_LINE, *encode] \
        if kind == "decoder" else [
        'batch = tok(["what is python"] * 2, ["Python is a language.", "A python is a snake."],',
        '            padding=True, truncation=True, return_tensors="np")']
    return ["```python", "import onnxruntime as ort", "from transformers import AutoTokenizer", "",
            'tok = AutoTokenizer.from_pretrained("path/to/this/directory")',
            'session = ort.InferenceSession("path/to/this/directory/model.onnx")',
            *[line.replace('return_tensors="pt"', 'return_tensors="np"') for line in prefix],
            "names = [i.name for i in session.get_inputs()]",
            'scores = session.run(["scores"], {n: batch[n] for n in names})[0]  # [batch]', "```"]


def _card(source: ExportSource, format: str, details: dict[str, Any]) -> str:
    import yaml

    init = dict((source.config.get("model") or {}).get("init_args") or {})
    class_path = (source.config.get("model") or {}).get("class_path")
    backbone = init.get("backbone")
    hub, backbone_words = _base_model(backbone)
    front: dict[str, Any] = {
        "library_name": {"cross-encoder": "sentence-transformers", "hf": "transformers", "onnx": "onnx"}[format],
        "pipeline_tag": "text-classification" if format == "hf" else "text-ranking",
    }
    if hub:
        front["base_model"] = hub
    front["license"] = _license_of(backbone)
    front["tags"] = ["kdlab", "distillation", *(["cross-encoder"] if source.kind == "cross-encoder" else []), "reranker",
                     *(["onnx"] if format == "onnx" else [])]
    stage = source.manifest.get("stage") or (class_path.rsplit(".", 1)[-1] if class_path else None) or (
        _read_record(source.model_dir / SCORE_HEAD_META).get("stage"))  # a bare decoder export names its stage
    what = {"cross-encoder": "a cross-encoder reranker (one-label sequence classifier)",
            "decoder": "a decoder reranker (base decoder + linear score head on the last token)"}[source.kind]
    title = f"kdlab {stage or 'ranker'} — {format} export"
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {title}", "",
             f"This is {what}, trained with kdlab and exported as `{format}`.", ""]
    lines += ["## Model", "", f"- Stage: `{stage}`" if stage else "- Stage: unknown (no run record)",
              f"- Backbone / base model: {backbone_words}"]
    teacher = (source.config.get("teacher") or {}).get("backbone")
    if teacher:
        lines.append(f"- Teacher: `{teacher}` (task `{(source.config.get('teacher') or {}).get('task')}`)")
    elif init.get("teacher_source") == "data":
        lines.append("- Teacher: scores read from the training data (labels written by `kdlab label` from a teacher)")
    lines.append(f"- Source model directory: `{source.model_dir}`")
    if init:
        lines += ["", "### Recipe", "", f"`model.init_args` of the run's `config.yaml` ({class_path}):", ""]
        lines += _table(("option", "value"), [(k, _fmt(v)) for k, v in init.items()])
    data = source.manifest.get("data")
    if isinstance(data, dict) and data:
        lines += ["", "## Data", ""]
        rows = []
        for split, record in data.items():
            if isinstance(record, dict):
                src = record.get("source") or {}
                src = src if isinstance(src, dict) else {}
                name, fmt = src.get("path") or src.get("collection") or "—", src.get("format", "—")
                rows.append((split, record.get("queries", "—"), record.get("pairs", "—"), fmt, f"`{name}`"))
        lines += _table(("split", "queries", "pairs", "format", "file"), rows)
    lines += ["", "## Metrics", ""]
    numbers = {k: v for k, v in source.metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if numbers:
        lines += ["From the run's `metrics.json`:", ""]
        lines += _table(("metric", "value"), [(k, f"{float(v):.6g}") for k, v in sorted(numbers.items())])
    else:
        lines.append("No metrics recorded (no run record beside this model).")
    eos = details.get("eos_appended_by_tokenizer", False)
    L = details.get("max_length")
    text_format = text_format_of(source.model_dir)
    from kdlab.data.collators import RELEVANCE_PROMPT

    lines += ["", "## Input format", "", _TEXT_FORMAT[text_format].format(
        L=L, eos="the saved tokenizer appends it itself" if eos else "append `tokenizer.eos_token_id` yourself",
        prompt=RELEVANCE_PROMPT.replace("\n", "\\n"))]
    shift = float(details.get("score_bias_shift", 0.0))
    lines += ["", "## How to load", "", *_snippets(format, source.kind, bool(eos), shift, text_format)]
    lines += ["", "## Fidelity", ""]
    measured = details.get("max_abs_diff") == details.get("max_abs_diff")  # NaN: a card written without an export
    if format == "cross-encoder" or (format == "hf" and source.kind == "cross-encoder"):
        lines.append("The classifier is kdlab's own, saved as it is: its logit is kdlab's score. sentence-transformers "
                     "is told to apply no activation (`config.sentence_transformers.activation_fn` = identity).")
    if format == "hf" and source.kind == "decoder" and not measured:
        lines.append("HF's logit is kdlab's score minus the score head's bias (`config.kdlab_score_bias`, 0 unless a "
                     "pointwise loss trained it): the standard `score` layer has no bias.")
    if format == "hf" and source.kind == "decoder" and measured:
        scored = ("the prompt's last token is the one it scores" if text_format == "decoder-prompt"
                  else "not EOS, so the EOS is the token it scores")
        lines.append(f"Checked at export: transformers' `{_family(source)}ForSequenceClassification`, padded with token id "
                     f"{details['pad_token_id']} ({scored}), matches kdlab: max |Δ| = "
                     f"{details['max_abs_diff']:.2g}" + (" once the bias is added back." if shift else "."))
        if shift:
            lines.append(f"kdlab's score head has a trained bias ({shift:.6g}) and the standard `score` layer has none: "
                         "the logits here are kdlab's scores minus that constant (`config.kdlab_score_bias`). Rankings "
                         "and score differences are identical.")
    if format == "onnx" and not measured:
        lines.append("The graph is kdlab's own scorer; `export_model` checks onnxruntime against PyTorch when it writes it.")
    if format == "onnx" and measured:
        lat = details["latency"]
        lines.append(f"Checked at export: onnxruntime matches PyTorch (kdlab) within {details['max_abs_diff']:.2g} "
                     f"(max |Δ| over padded batches); opset {details['opset']} ({details['exporter']} exporter); dynamic axes "
                     "`batch`, `sequence`.")
        lines += ["", f"Latency at export (batch {lat['batch']} × {lat['tokens']} tokens, median of {lat['repeats']}, "
                      f"{lat['threads']} CPU thread(s)):", ""]
        lines += _table(("runtime", "ms"), [("PyTorch", f"{lat['pytorch_ms']:.2f}"),
                                           ("onnxruntime", f"{lat['onnxruntime_ms']:.2f}")])
    versions = source.manifest.get("versions") or {}
    git = source.manifest.get("git") or {}
    lines += ["", "## Provenance", ""]
    kdlab_version = versions.get("kdlab")
    if kdlab_version is None:
        from kdlab import __version__ as kdlab_version
        kdlab_version = f"{kdlab_version} (exporting; the run recorded none)"
    lines.append(f"- kdlab version: `{kdlab_version}`")
    if git.get("sha"):
        lines.append(f"- git SHA: `{git['sha']}`" + (" (dirty checkout)" if git.get("dirty") else ""))
    for key in ("command", "seed", "start_time", "end_time", "status"):
        if source.manifest.get(key) is not None:
            lines.append(f"- {key}: `{source.manifest[key]}`")
    if source.run_dir is not None:
        lines.append(f"- Run directory: `{source.run_dir}`")
    return "\n".join(lines) + "\n"


def _family(source: ExportSource) -> str:
    """The architecture family of a model directory (``Llama`` for ``LlamaModel``), for the card."""
    arch = (_read_record(source.model_dir / "config.json").get("architectures") or ["?"])[0]
    for suffix in ("ForCausalLM", "ForSequenceClassification", "Model"):
        if arch.endswith(suffix):
            return arch[: -len(suffix)]
    return arch


def model_card(run_or_model_dir: str | Path, format: ExportFormat, *, details: dict[str, Any] | None = None,
               max_length: int = 512) -> str:
    """The Hugging Face model card (``README.md``) of an export of ``run_or_model_dir`` as ``format``.

    YAML front matter (``library_name``, ``pipeline_tag``, ``base_model`` when it is a hub id,
    ``license``, ``tags``), then the model (stage, backbone, teacher), the recipe (the run's
    ``model.init_args``), data sizes (``manifest.json``'s ``data``), the metrics of ``metrics.json``
    as a table, the input text format, how to load it, what was checked, and the kdlab version and
    git SHA. ``details`` is what :func:`export_model` measured (``kdlab_export.json``); without it
    the card is written from the run record alone.
    """
    source = read_export_source(run_or_model_dir)
    base = {"max_length": _max_length_for(source.model_dir, max_length), "score_bias_shift": 0.0,
            "max_abs_diff": float("nan")}
    return _card(source, format, {**base, **(details or {})})

"""What an export reads (a run or model directory, :func:`read_export_source`) and the pieces every
format shares: the pair encoder, the probe batch the export-time checks score, the tokenizer it
saves, the one-label classifier directory."""

from __future__ import annotations

import copy
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from kdlab.models.backbones import load_tokenizer
from kdlab.models.served import SCORE_HEAD_META, load_rank_teacher

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
PROBE_PAIRS: tuple[tuple[str, str], ...] = (
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


def read_record(path: Path) -> dict[str, Any]:
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
    config = read_record(model_dir / "config.json")
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
                        config=read_record(run_dir / "config.yaml"),
                        manifest=read_record(run_dir / "manifest.json"),
                        metrics=read_record(run_dir / "metrics.json"))


def default_export_dir(source: ExportSource, format: str) -> Path:
    """``<run dir>/export/<format>``; for a bare model directory ``<model dir>-export/<format>``."""
    if source.run_dir is not None:
        return source.run_dir / "export" / format
    return source.model_dir.with_name(source.model_dir.name + "-export") / format


# ------------------------------------------------------------------------------- scoring helpers
def pair_encoder(tokenizer: Any, kind: str, max_length: int) -> Any:
    from kdlab.data.collators import RankingCollator

    return RankingCollator(tokenizer, kind, max_length=max_length)  # type: ignore[arg-type]


def probe_batch(encoder: Any, repeat: int = 1) -> dict[str, torch.Tensor]:
    """kdlab's model inputs for the probe pairs (different lengths, so right padding is exercised)."""
    pairs = list(PROBE_PAIRS) * repeat
    return encoder.pad([encoder.encode(q, d) for q, d in pairs])


def median_ms(fn: Any, repeats: int = 10, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def max_length_for(model_dir: Path, max_length: int) -> int:
    """``max_length`` capped at the model's position limit (a longer input could not be scored)."""
    if max_length < 2:
        raise ExportError(f"max_length must be at least 2 tokens, got {max_length}")
    limit = read_record(model_dir / "config.json").get("max_position_embeddings")
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


def save_tokenizer(source: ExportSource, out: Path, max_length: int, *, text_format: str,
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
        text = "query: " + PROBE_PAIRS[0][0] + " document: " + PROBE_PAIRS[0][1]
        want = list(reference(text, add_special_tokens=False)["input_ids"]) + [int(reference.eos_token_id)]
        if list(AutoTokenizer.from_pretrained(str(out))(text)["input_ids"]) == want:
            return True
    reference.save_pretrained(str(out))  # the template did not survive a reload: keep the original
    return False


# ------------------------------------------------------------------------------------ formats
def save_seq_cls(source: ExportSource, out: Path, max_length: int) -> dict[str, Any]:
    """A one-label ``*ForSequenceClassification`` + tokenizer, with sentence-transformers told to
    apply no activation (both the ST >= 4 key and the older one), so ``CrossEncoder.predict`` and
    plain transformers both give kdlab's raw scores."""
    ranker = load_rank_teacher(str(source.model_dir))
    model = ranker.model
    model.config.sentence_transformers = {"activation_fn": ST_IDENTITY}
    model.config.sbert_ce_default_activation_function = ST_IDENTITY
    model.save_pretrained(str(out))
    save_tokenizer(source, out, max_length, text_format="cross-encoder")
    return {"max_length": max_length, "activation": "identity", "score_bias_shift": 0.0}


def check_applies(source: ExportSource, format: str) -> None:
    """Refuse, in one line, a format that cannot hold this ranker faithfully."""
    if format == "cross-encoder" and source.kind == "decoder":
        raise ExportError(f"{source.model_dir} is a decoder ranker (one sequence 'query: … document: …' + EOS), which a "
                          "sentence-transformers CrossEncoder (query, document) pair model cannot score faithfully: "
                          "use --format hf (a standard *ForSequenceClassification) or --format onnx")

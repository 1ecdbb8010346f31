"""The model card every export writes (``README.md``): what the model is, how it was trained and
measured, and how to score with it in the exported format."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kdlab.export.source import (
    ExportFormat,
    ExportSource,
    max_length_for,
    read_export_source,
    read_record,
)
from kdlab.models.served import SCORE_HEAD_META, text_format_of
from kdlab.models.text_formats import RELEVANCE_PROMPT


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


def card_text(source: ExportSource, format: str, details: dict[str, Any]) -> str:
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
        read_record(source.model_dir / SCORE_HEAD_META).get("stage"))  # a bare decoder export names its stage
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
    arch = (read_record(source.model_dir / "config.json").get("architectures") or ["?"])[0]
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
    base = {"max_length": max_length_for(source.model_dir, max_length), "score_bias_shift": 0.0,
            "max_abs_diff": float("nan")}
    return card_text(source, format, {**base, **(details or {})})

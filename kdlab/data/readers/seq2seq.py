"""Seq2seq pairs as JSONL: ``source``/``target`` records, or GSM8K's ``question``/``answer``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from kdlab.data.readers.base import DataFormatError, PathLike, _require_str, iter_jsonl


@dataclass(frozen=True)
class Seq2SeqPair:
    """A source text and its reference target."""

    source: str
    target: str


Seq2SeqFields = Literal["auto", "source-target", "question-answer"]

#: ``fields`` of :func:`read_seq2seq_jsonl` → the (source, target) keys of each record
SEQ2SEQ_FIELDS: dict[str, tuple[str, str]] = {
    "source-target": ("source", "target"),
    "question-answer": ("question", "answer"),  # GSM8K's own JSONL
}


def _seq2seq_pair_of(obj: Mapping[str, Any]) -> tuple[str, str] | None:
    """``source``/``target`` if the record has either key, else ``question``/``answer`` if it has
    either, else None."""
    return next((keys for keys in SEQ2SEQ_FIELDS.values() if any(k in obj for k in keys)), None)


def read_seq2seq_jsonl(path: PathLike, fields: Seq2SeqFields = "auto") -> list[Seq2SeqPair]:
    """Read seq2seq pairs, one JSON object per line: ``{"source": str, "target": str}`` or GSM8K's
    ``{"question": str, "answer": str}`` (question → source, answer → target, kept whole: the
    worked solution with its ``<<48/2=24>>`` calculator notes and the final ``#### 72``). Other keys
    are ignored.

    ``fields``: ``"auto"`` (the first record's pair — ``source``/``target`` if it has either key,
    else ``question``/``answer`` — then holds for every line of the file), ``"source-target"`` or
    ``"question-answer"``. A missing or non-string field is a :class:`DataFormatError` naming the
    file, line and field. **[code]** The released KETCHUP code first rewrites GSM8K answers
    (``data/gsm8k/change_format.py``: drops simple ``<<a=b>>`` notes, spaces operators, joins lines);
    kdlab reads the file as published.
    """
    if fields != "auto" and fields not in SEQ2SEQ_FIELDS:
        raise ValueError(f"fields must be 'auto' or one of {sorted(SEQ2SEQ_FIELDS)}, got {fields!r}")
    keys = SEQ2SEQ_FIELDS.get(fields)
    pairs: list[Seq2SeqPair] = []
    set_by = "the fields option"
    for line, obj in iter_jsonl(path):
        if keys is None:
            keys, set_by = _seq2seq_pair_of(obj), f"line {line}"
            if keys is None:
                found = ", ".join(repr(k) for k in list(obj)[:6]) or "none"
                raise DataFormatError(path, line, "source", "missing (expected string fields 'source' and "
                                      f"'target', or GSM8K's 'question' and 'answer'; found keys: {found})")
        other = _seq2seq_pair_of(obj)
        missing = next((k for k in keys if k not in obj), None)
        if missing is not None and other not in (None, keys):
            raise DataFormatError(path, line, missing, f"missing (expected a string; {set_by} chose fields "
                                  f"{'/'.join(keys)}, this line has {'/'.join(other)}: one pair per file)")
        pairs.append(Seq2SeqPair(_require_str(path, line, obj, keys[0]), _require_str(path, line, obj, keys[1])))
    return pairs


__all__ = ["SEQ2SEQ_FIELDS", "Seq2SeqFields", "Seq2SeqPair", "read_seq2seq_jsonl"]

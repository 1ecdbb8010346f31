"""Teacher labeling: score every (query, document) candidate once, and RRADistill listwise labels.

* :func:`score_file` — a ranker (a :class:`~kdlab.stages.TeacherRankSFT` export directory or a
  ranker module) scores a ranking JSONL file and writes the same groups with a
  ``teacher_score`` per document. No grad, length-bucketed batches (documents of a chunk sorted by
  token length, so padding is small), a tqdm progress bar, and **resumable**: completed groups are
  appended to ``<output>.partial`` in chunks (flush + fsync after each), a restart skips the
  query ids already there, and only a complete run writes ``output`` (atomically, in input
  order), so ``output`` is never half-written.
* :func:`rradistill_labels` — RRADistill label generation: a pre-ranker's top-k and bottom-k go to an
  LLM in one listwise prompt (:func:`build_listwise_prompt`); its answer is parsed with
  :func:`parse_permutation`; omitted documents become hard negatives.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from kdlab.data.collators import RankingCollator
from kdlab.data.readers import Doc, RankingDoc, RankingGroup, ranking_group_to_json, with_scores
from kdlab.data.sources import RankingSource, as_source, read_source
from kdlab.defaults import LABEL_BATCH_SIZE, LABEL_CHUNK_GROUPS, PAIR_MAX_LENGTH
from kdlab.models.backbones import load_tokenizer, pad_token_id
from kdlab.models.export import load_rank_teacher
from kdlab.runs import atomic_path

__all__ = [
    "score_file",
    "score_candidates",
    "build_listwise_prompt",
    "parse_permutation",
    "position_label",
    "rradistill_labels",
    "hf_llm_rank_fn",
]

TextFormat = Literal["cross-encoder", "decoder"]


# ------------------------------------------------------------------------------------------ loading
def _ranker_and_tokenizer(teacher: str | os.PathLike[str] | nn.Module, tokenizer: str | None) -> tuple[nn.Module, Any]:
    """An exported ranker directory (its own tokenizer), or a ranker module with ``tokenizer`` named."""
    if isinstance(teacher, (str, os.PathLike)):
        return load_rank_teacher(str(teacher)), load_tokenizer(str(tokenizer or teacher))
    if not hasattr(teacher, "text_format") or tokenizer is None:
        raise TypeError("score_file takes a ranker export directory, or a ranker module "
                        "(kdlab.models.heads.DecoderRanker / SequenceClassificationRanker) and tokenizer=NAME")
    return teacher, load_tokenizer(tokenizer)


# ------------------------------------------------------------------------------------------ scoring
@torch.no_grad()
def score_candidates(
    model: nn.Module,
    encoder: RankingCollator,
    groups: Sequence[RankingGroup],
    batch_size: int,
    device: torch.device,
    progress: Any = None,
) -> list[list[float]]:
    """Scores of every document of ``groups`` (``[len(groups)][len(docs)]``).

    Length bucketing: all (group, doc) pairs are encoded, sorted by token length (stable), cut
    into batches of ``batch_size`` and right-padded to each batch's longest row.
    """
    items: list[tuple[int, int, dict[str, list[int]]]] = []
    for g, group in enumerate(groups):
        for j, doc in enumerate(group.docs):
            items.append((g, j, encoder.encode(group.query, doc.text)))
    order = sorted(range(len(items)), key=lambda i: len(items[i][2]["input_ids"]))
    out: list[list[float]] = [[0.0] * len(group.docs) for group in groups]
    for start in range(0, len(order), batch_size):
        chunk = [items[i] for i in order[start:start + batch_size]]
        inputs = {key: value.to(device) for key, value in encoder.pad([c[2] for c in chunk]).items()}
        scores = model(**inputs).float().cpu().tolist()
        for (g, j, _), s in zip(chunk, scores):
            out[g][j] = float(s)
        if progress is not None:
            progress.update(len(chunk))
    return out


def _done_query_ids(partial: Path) -> set[str]:
    """Query ids of complete lines in ``partial``; a trailing incomplete line (a write cut short) is
    truncated away so appending continues from a clean line boundary."""
    if not partial.exists():
        return set()
    data = partial.read_bytes()
    cut = data.rfind(b"\n") + 1
    if cut != len(data):
        with open(partial, "r+b") as f:
            f.truncate(cut)
    done: set[str] = set()
    for line in data[:cut].decode("utf-8").splitlines():
        if line.strip():
            done.add(str(json.loads(line)["query_id"]))
    return done


def score_file(
    teacher: str | os.PathLike[str] | nn.Module,
    input_path: RankingSource | str,
    output_path: str,
    batch_size: int = LABEL_BATCH_SIZE,
    max_length: int = PAIR_MAX_LENGTH,
    resume: bool = True,
    *,
    tokenizer: str | None = None,
    text_format: TextFormat | None = None,
    chunk_groups: int = LABEL_CHUNK_GROUPS,
    device: str | torch.device | None = None,
    progress: bool = True,
    on_chunk: Callable[[int], None] | None = None,
) -> int:
    """Write ``input_path``'s groups to ``output_path`` with a ``teacher_score`` on every document.

    ``input_path`` is a kdlab JSONL path or any :class:`~kdlab.data.sources.RankingSource`
    (MS MARCO / BEIR / TREC / FlagEmbedding files); the output is kdlab JSONL.

    Args:
        teacher: a ranker export directory (:func:`kdlab.models.export.load_rank_teacher`), or a
            ranker module (``DecoderRanker`` / ``SequenceClassificationRanker``) with ``tokenizer``.
        tokenizer: the tokenizer's backbone name (default: the export directory's own).
        batch_size: documents per forward pass; max_length: tokens per (query, doc) text.
        resume: continue from ``<output>.partial`` (False: start over).
        text_format: override the teacher's input format (``decoder``: ``query: … document: …`` +
            EOS; ``cross-encoder``: tokenizer pair) — the same encoding as the ranking collator.
        chunk_groups: groups scored and durably appended (flush + fsync) per chunk.
        on_chunk: called with the number of groups done after each durable chunk (tests use it to
            simulate an interruption).

    Returns the number of groups in the output. Output order = input order.
    """
    from tqdm.auto import tqdm

    groups = read_source(as_source(input_path, "input"), "input").groups  # validated before the model loads
    model, tok = _ranker_and_tokenizer(teacher, tokenizer)
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    encoder = RankingCollator(tok, text_format=text_format or model.text_format, max_length=max_length)
    out = Path(output_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    if not resume and partial.exists():
        partial.unlink()
    done = _done_query_ids(partial)
    todo = [g for g in groups if g.query_id not in done]
    total_docs = sum(len(g.docs) for g in groups)
    bar = tqdm(total=total_docs, initial=total_docs - sum(len(g.docs) for g in todo),
               desc="labeling", unit="doc", disable=not progress)
    n_done = len(groups) - len(todo)
    try:
        with open(partial, "a", encoding="utf-8", newline="\n") as f:
            for start in range(0, len(todo), chunk_groups):
                chunk = todo[start:start + chunk_groups]
                scores = score_candidates(model, encoder, chunk, batch_size, dev, progress=bar)
                for group, group_scores in zip(chunk, scores):
                    docs = tuple(with_scores(d, teacher_score=s) for d, s in zip(group.docs, group_scores))
                    row = ranking_group_to_json(replace(group, docs=docs))
                    f.write(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
                n_done += len(chunk)
                if on_chunk is not None:
                    on_chunk(n_done)
    finally:
        bar.close()
        model.train(was_training)
    # reorder to input order (a resumed run may have groups from an older partial in another order)
    rows = {}
    for line in partial.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            rows[str(row["query_id"])] = line
    missing = [g.query_id for g in groups if g.query_id not in rows]
    if missing:
        raise RuntimeError(f"{partial}: {len(missing)} groups missing after labeling (first: {missing[0]!r})")
    with atomic_path(out) as tmp:
        tmp.write_text("".join(rows[g.query_id] + "\n" for g in groups), encoding="utf-8")
    partial.unlink()
    return len(groups)


# ------------------------------------------------------------------------------------------ RRADistill
def build_listwise_prompt(query: str, docs: Sequence[str], max_doc_chars: int = 300) -> str:
    """One listwise ranking prompt (RankGPT style): the documents numbered ``[1] … [n]`` and an
    instruction to answer with identifiers only, most relevant first, e.g. ``[2] > [1] > [3]``."""
    lines = [
        f"I will give you {len(docs)} passages, each with an identifier [1] to [{len(docs)}].",
        f"Rank them by relevance to the search query: {query}",
        "",
    ]
    for i, doc in enumerate(docs, start=1):
        text = " ".join(doc.split())[:max_doc_chars]
        lines.append(f"[{i}] {text}")
    lines += [
        "",
        f"Search query: {query}",
        "Answer with the identifiers only, most relevant first, separated by ' > ' "
        "(for example [2] > [1] > [3]). Leave out passages that are not relevant.",
        "Answer:",
    ]
    return "\n".join(lines)


_BRACKETED = re.compile(r"\[\s*(\d+)\s*\]")
_BARE = re.compile(r"(?<![\d.])(\d+)(?![\d.])")


def parse_permutation(text: str, n: int) -> list[int]:
    """The document identifiers (1-based, as written ``[k]``) in the order the LLM wrote them.

    Robust to malformed output: bracketed ids ``[k]`` are used when there are any, otherwise bare
    integers; ids outside ``1..n`` are ignored; duplicates are dropped (the first occurrence
    counts); any other text is ignored. Garbage gives ``[]``. Never raises.
    """
    if not isinstance(text, str) or n <= 0:
        return []
    found = _BRACKETED.findall(text) or _BARE.findall(text)
    seen: set[int] = set()
    out: list[int] = []
    for token in found:
        k = int(token)
        if 1 <= k <= n and k not in seen:
            seen.add(k)
            out.append(k)
    return out


def position_label(position: int, n_ranked: int) -> float:
    """Graded pseudo-label of the document the LLM put at 0-based ``position`` among ``n_ranked``
    ranked documents: ``n_ranked − position`` (top = ``n_ranked``, last ranked = 1); omitted
    documents get 0 (hard negatives)."""
    return float(n_ranked - position)


def rradistill_labels(
    groups: Sequence[RankingGroup],
    prescores: Mapping[str, Sequence[float]] | Sequence[Sequence[float]],
    llm_rank_fn: Callable[[str], str],
    top_k: int = 10,
    bottom_k: int = 10,
    max_doc_chars: int = 300,
) -> list[dict[str, Any]]:
    """RRADistill listwise labels (paper: pre-ranker top-10 + bottom-10, one LLM pass, omitted →
    hard negatives).

    For each group: order documents by the pre-ranker's ``prescores`` (per query id, or a list
    parallel to ``groups``; one score per document), keep the ``top_k`` highest and the
    ``bottom_k`` lowest (all documents when there are at most ``top_k + bottom_k``), show them in
    that order to ``llm_rank_fn(build_listwise_prompt(...))`` and parse its answer with
    :func:`parse_permutation`. Ranked documents get ``label = position_label(pos, m)`` and
    ``llm_rank`` (1-based); the documents it omitted get ``label = 0`` and
    ``"hard_negative": true``. Documents outside the top/bottom-k are dropped. Output rows are
    ranking JSONL groups (ranked documents first, in the LLM's order), ready for
    :func:`kdlab.data.readers.read_ranking_jsonl`.
    """
    rows: list[dict[str, Any]] = []
    for gi, group in enumerate(groups):
        scores = prescores[group.query_id] if isinstance(prescores, Mapping) else prescores[gi]
        if len(scores) != len(group.docs):
            raise ValueError(
                f"query {group.query_id!r}: {len(scores)} pre-ranker scores for {len(group.docs)} documents"
            )
        by_score = sorted(range(len(group.docs)), key=lambda j: -float(scores[j]))
        if len(by_score) <= top_k + bottom_k:
            shown = by_score
        else:
            shown = by_score[:top_k] + (by_score[-bottom_k:] if bottom_k > 0 else [])
        docs = [group.docs[j] for j in shown]
        prompt = build_listwise_prompt(group.query, [d.text for d in docs], max_doc_chars=max_doc_chars)
        ranking = parse_permutation(llm_rank_fn(prompt), len(docs))
        out_docs: list[dict[str, Any]] = []
        for pos, ident in enumerate(ranking):
            d = docs[ident - 1]
            out_docs.append(_doc_row(d, position_label(pos, len(ranking)), llm_rank=pos + 1))
        ranked = set(ranking)
        for i, d in enumerate(docs, start=1):
            if i not in ranked:
                out_docs.append(_doc_row(d, 0.0, hard_negative=True))
        rows.append({"query_id": group.query_id, "query": group.query, "docs": out_docs})
    return rows


def _doc_row(doc: Doc, label: float, llm_rank: int | None = None, hard_negative: bool = False) -> dict[str, Any]:
    row: dict[str, Any] = {"id": doc.id, "title": doc.title, "summary": doc.body, "label": label,
                           "hard_negative": hard_negative}
    if llm_rank is not None:
        row["llm_rank"] = llm_rank
    return row


def hf_llm_rank_fn(
    model: nn.Module, tokenizer: Any, max_new_tokens: int = 96, use_chat_template: bool = True
) -> Callable[[str], str]:
    """An ``llm_rank_fn`` backed by a Hugging Face causal LM: greedy ``generate`` on the prompt
    (wrapped in the tokenizer's chat template when it has one and ``use_chat_template``), returning
    only the newly generated text."""

    def rank(prompt: str) -> str:
        text = prompt
        if use_chat_template and getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        enc = tokenizer(text, return_tensors="pt")
        device = next(model.parameters()).device
        enc = {k: v.to(device) for k, v in enc.items()}
        pad = pad_token_id(tokenizer)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)  # type: ignore[operator]
        return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)

    return rank


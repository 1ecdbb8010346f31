"""RRADistill listwise labels at scale: one LLM prompt per query, batched, resumable.

The recipe (PAPERS.md §2, RRADistill, arXiv 2410.18097):

1. **Candidates** [paper]: a pre-ranker orders each query's retrieved documents and only its top-k
   and bottom-k go to the LLM (the paper: top-10 and bottom-10 of 50). Here the pre-ranker is the
   first stage: ``RankingDoc.first_stage_score`` (a run file's score or BM25, see
   :mod:`kdlab.data.sources`), descending, ties kept in the group's order
   (:func:`select_candidates`). Documents between the two ends are not labeled and not written.
2. **One listwise prompt per query** [paper: one pass, no sliding window]: RankGPT style, the
   candidates numbered ``[1] … [n]`` in pre-ranker order (:func:`build_listwise_prompt`).
3. **The answer** is a permutation such as ``[2] > [1] > [3]``, parsed strictly
   (:func:`parse_permutation`): only bracketed identifiers, or a bare ``2 > 1 > 3`` list that is the
   whole answer; numbers in free text never count.
4. **Omitted documents are hard negatives** [paper: treated as irrelevant instead of asking again]:
   the lowest label and ``"hard_negative": true``.
5. **Graded labels** [reading]: :func:`position_label` (the formula is in its docstring).

:func:`listwise_label_file` runs it over a whole :class:`~kdlab.data.sources.RankingSource`:
``batch_size`` queries per greedy ``generate`` call (left padding, only the new tokens decoded,
the tokenizer's chat template when it has one), a tqdm bar over queries, and **resumable** exactly
like :func:`kdlab.labeling.score_file`: each batch's groups are appended to ``<output>.partial``
(flush + fsync), a restart skips the query ids already there (a trailing incomplete line is cut
away), and only a complete run writes ``output``, atomically and in input order.

6. **Reasons** [paper: a smaller LLM writes reasons for the ranking, used to train RRA-GPT;
   reading: one sentence per judged document, asked after the ranking is known]: with
   ``reasons_fn`` (``kdlab label --mode listwise --reasons``) each judged document gets
   :func:`build_reason_prompt` — the query, the document and the verdict (its rank, or left out) —
   and the first sentence of the answer (:func:`parse_reason`) becomes its ``reason``; an answer
   with no sentence in it gives ``reason: null`` (one line printed per such document, and the
   count at the end). The reasons LLM may be the ranking LLM or a cheaper one.

Output rows are kdlab ranking JSONL (:func:`kdlab.data.readers.read_ranking_jsonl` reads them);
each labeled document carries ``label`` (graded), ``llm_rank`` (1-based position in the LLM's
answer, ``null`` when omitted) and ``hard_negative`` (bool), plus its ``teacher_score`` /
``first_stage_score`` when the input had them. The input's own ``label`` is replaced. Documents
are written ranked first (in the LLM's order), then the hard negatives (in pre-ranker order).

A superset of the RRADistill helpers in :mod:`kdlab.labeling` (same names and signatures:
:func:`build_listwise_prompt`, :func:`parse_permutation`, :func:`position_label`,
:func:`rradistill_labels`, :func:`hf_llm_rank_fn`). One deliberate difference:
:func:`parse_permutation` no longer falls back to bare integers found anywhere in the text.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdlab.data.readers import Doc, RankingGroup, ranking_group_to_json, with_scores
from kdlab.data.sources import RankingSource, as_source, read_source
from kdlab.errors import ConfigError
from kdlab.models.backbones import is_quantized, load_generation_model, load_tokenizer, pad_token_id, resolve_dtype
from kdlab.runs import atomic_path

__all__ = [
    "HARD_NEGATIVE_LABEL",
    "GenerateFn",
    "build_listwise_prompt",
    "parse_permutation",
    "position_label",
    "select_candidates",
    "candidate_indices",
    "label_group",
    "build_reason_prompt",
    "parse_reason",
    "add_reasons",
    "iter_listwise_labels",
    "rradistill_labels",
    "hf_generate_fn",
    "hf_llm_rank_fn",
    "listwise_label_file",
]

GenerateFn = Callable[[list[str]], list[str]]
"""Answers of the LLM to a batch of plain prompts, one string per prompt, in order."""

HARD_NEGATIVE_LABEL: float = 0.0
"""Label of a document the LLM left out of its answer (below every ranked document's label)."""


# ------------------------------------------------------------------------------------------ prompt
def build_listwise_prompt(query: str, docs: Sequence[str], max_doc_chars: int = 300) -> str:
    """One listwise ranking prompt (RankGPT style): the documents numbered ``[1] … [n]`` and an
    instruction to answer with identifiers only, most relevant first, e.g. ``[2] > [1] > [3]``.

    Each document's whitespace is collapsed and it is cut to ``max_doc_chars`` characters.
    (The same text as :func:`build_listwise_prompt`.)"""
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


# ------------------------------------------------------------------------------------------ answer
_BRACKETED = re.compile(r"\[\s*(\d+)\s*\]")
_BARE_LIST = re.compile(r"\d+(?:\s*>\s*\d+)*")
_INT = re.compile(r"\d+")


def parse_permutation(answer: str, n: int) -> list[int]:
    """The document identifiers (1-based) in the order the LLM wrote them.

    Accepted identifiers:

    * bracketed ``[k]`` (spaces inside the brackets allowed) anywhere in the answer — other text
      around them is ignored (``"Sure: [3] > [1]"`` → ``[3, 1]``);
    * bare integers only when the whole answer (surrounding whitespace aside) is a ``>``-separated
      list of integers (``"2 > 1 > 3"`` → ``[2, 1, 3]``; ``"2"`` → ``[2]``).

    Numbers in free text never count (``"top 10"``, ``"passage 3 is best"`` → ``[]``). Identifiers
    outside ``1..n`` are ignored; a repeated identifier keeps its first position. An answer with no
    valid identifier (or ``n <= 0``, or a non-string) gives ``[]``. Never raises.
    """
    if not isinstance(answer, str) or n <= 0:
        return []
    tokens = _BRACKETED.findall(answer)
    if not tokens and _BARE_LIST.fullmatch(answer.strip()):
        tokens = _INT.findall(answer)
    seen: set[int] = set()
    out: list[int] = []
    for token in tokens:
        k = int(token)
        if 1 <= k <= n and k not in seen:
            seen.add(k)
            out.append(k)
    return out


def position_label(position: int, n_ranked: int) -> float:
    """Graded label of the document the LLM put at 0-based ``position`` among the ``n_ranked``
    documents its answer ranked: ``label = n_ranked − position``.

    The top document gets ``n_ranked``, the last ranked one 1, and every omitted document
    :data:`HARD_NEGATIVE_LABEL` = 0, below all of them. [paper] omitted documents are irrelevant
    hard negatives; [reading] the graded values (the paper's label scale is not confirmed): linear
    in the position, so pairwise / listwise losses see exactly the LLM's order. The scale depends
    on ``n_ranked`` per query — use ranking losses, not point-wise ones, on these labels.
    """
    return float(n_ranked - position)


# ------------------------------------------------------------------------------------------ candidates
def select_candidates(scores: Sequence[float], top_k: int, bottom_k: int) -> list[int]:
    """Indices shown to the LLM, in pre-ranker order: sort by ``scores`` descending (ties keep
    their index order), keep the ``top_k`` first and the ``bottom_k`` last (still descending).
    With at most ``top_k + bottom_k`` documents, all of them."""
    order = sorted(range(len(scores)), key=lambda j: -float(scores[j]))
    if len(order) <= top_k + bottom_k:
        return order
    return order[:top_k] + (order[len(order) - bottom_k:] if bottom_k > 0 else [])


def candidate_indices(group: RankingGroup, top_k: int, bottom_k: int,
                      prescores: Sequence[float] | None = None) -> list[int]:
    """:func:`select_candidates` of ``group`` by ``prescores`` (one per document), else by the
    documents' ``first_stage_score``.

    A group none of whose documents has a first-stage score keeps its own order (all tied: a
    kdlab JSONL file without scores is taken to list candidates in the first stage's order). Some
    documents with a score and some without is an error (``ValueError`` naming the query)."""
    if prescores is not None:
        if len(prescores) != len(group.docs):
            raise ValueError(
                f"query {group.query_id!r}: {len(prescores)} pre-ranker scores for {len(group.docs)} documents"
            )
        return select_candidates(prescores, top_k, bottom_k)
    raw = [d.first_stage_score for d in group.docs]
    missing = [d.id for d, s in zip(group.docs, raw) if s is None]
    if len(missing) == len(raw):
        return select_candidates([0.0] * len(raw), top_k, bottom_k)
    if missing:
        raise ValueError(
            f"query {group.query_id!r}: document {missing[0]!r} has no first_stage_score while others have "
            f"one; the pre-ranker needs a score for every candidate or for none"
        )
    return select_candidates([float(s) for s in raw if s is not None], top_k, bottom_k)


# ------------------------------------------------------------------------------------------ labels
def _doc_json(doc: Doc, label: float, llm_rank: int | None) -> dict[str, Any]:
    base = dataclasses.replace(with_scores(doc), label=label)
    row = ranking_group_to_json(RankingGroup("", "", (base,)))["docs"][0]
    row["llm_rank"] = llm_rank
    row["hard_negative"] = llm_rank is None
    return row


def label_group(group: RankingGroup, shown: Sequence[int], answer: str) -> dict[str, Any]:
    """The output row of ``group`` given the indices ``shown`` to the LLM (prompt order) and its
    ``answer``: ranked documents first in the LLM's order (``label`` = :func:`position_label`,
    ``llm_rank`` = 1-based position), then the omitted ones in prompt order (``label`` =
    :data:`HARD_NEGATIVE_LABEL`, ``llm_rank`` = null, ``hard_negative`` = true)."""
    docs = [group.docs[j] for j in shown]
    ranking = parse_permutation(answer, len(docs))
    rows = [_doc_json(docs[ident - 1], position_label(pos, len(ranking)), pos + 1)
            for pos, ident in enumerate(ranking)]
    ranked = set(ranking)
    rows += [_doc_json(d, HARD_NEGATIVE_LABEL, None) for i, d in enumerate(docs, start=1) if i not in ranked]
    return {"query_id": group.query_id, "query": group.query, "docs": rows}


def build_reason_prompt(query: str, document: str, llm_rank: int | None, n_ranked: int,
                        max_doc_chars: int = 300) -> str:
    """The prompt that asks for one document's reason, given the LLM's verdict on it: its rank
    among the ``n_ranked`` documents the ranking kept, or ``None`` when it was left out."""
    if llm_rank is not None:
        verdict = f"ranked it {llm_rank} of {n_ranked} by relevance. In one sentence, explain why the passage is relevant"
    else:
        verdict = "left it out of the ranking. In one sentence, explain why the passage is not relevant"
    text = " ".join(document.split())[:max_doc_chars]
    return f"Search query: {query}\nPassage: {text}\nA relevance judge {verdict} to the query.\nReason:"


_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")
_REASON_PREFIX = re.compile(r"^\s*(?:reason\s*:|because\s*:)\s*", re.IGNORECASE)
MIN_REASON_WORDS = 3
MAX_REASON_CHARS = 300


def parse_reason(answer: str) -> str | None:
    """The first sentence of an answer, or None when the answer holds none.

    A leading ``Reason:`` is dropped and whitespace collapsed; the sentence runs to the first ``.``,
    ``!`` or ``?`` followed by a space or the end (the whole answer when there is none); it must have
    at least :data:`MIN_REASON_WORDS` words with a letter in them and is cut to
    :data:`MAX_REASON_CHARS` characters. Never raises."""
    if not isinstance(answer, str):
        return None
    text = " ".join(_REASON_PREFIX.sub("", answer.strip()).split())
    end = _SENTENCE_END.search(text)
    sentence = text[:end.end()] if end else text
    words = [w for w in sentence.split() if any(c.isalpha() for c in w)]
    if len(words) < MIN_REASON_WORDS:
        return None
    return sentence[:MAX_REASON_CHARS]


def add_reasons(rows: list[dict[str, Any]], generate_fn: GenerateFn, max_doc_chars: int = 300,
                chunk: int = 32, on_unparseable: Callable[[str, str, str], None] | None = None) -> None:
    """Give every document of ``rows`` (:func:`label_group` outputs) a ``reason``: the parsed answer
    of ``generate_fn`` to its :func:`build_reason_prompt`, or None (``on_unparseable(query_id,
    doc_id, answer)`` is called then). Prompts go ``chunk`` at a time."""
    jobs = []
    for row in rows:
        n_ranked = sum(d["llm_rank"] is not None for d in row["docs"])
        for doc in row["docs"]:
            document = doc["text"] if "text" in doc else f"{doc.get('title', '')} {doc.get('summary', '')}".strip()
            jobs.append((row, doc, build_reason_prompt(row["query"], document, doc["llm_rank"], n_ranked, max_doc_chars)))
    for start in range(0, len(jobs), chunk):
        part = jobs[start:start + chunk]
        answers = list(generate_fn([prompt for _, _, prompt in part]))
        if len(answers) != len(part):
            raise RuntimeError(f"reasons generate_fn returned {len(answers)} answers for {len(part)} prompts")
        for (row, doc, _), answer in zip(part, answers):
            doc["reason"] = parse_reason(answer)
            if doc["reason"] is None and on_unparseable is not None:
                on_unparseable(str(row["query_id"]), str(doc["id"]), answer)


def _check_counts(top_k: int, bottom_k: int, **positive: int) -> None:
    if top_k < 0 or bottom_k < 0 or top_k + bottom_k < 1:
        raise ConfigError(f"top_k and bottom_k must be >= 0 with at least one document shown; got top_k={top_k}, "
                          f"bottom_k={bottom_k}")
    for name, value in positive.items():
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")


def iter_listwise_labels(
    groups: Sequence[RankingGroup],
    generate_fn: GenerateFn,
    *,
    top_k: int = 10,
    bottom_k: int = 5,
    batch_size: int = 8,
    max_doc_chars: int = 300,
    prescores: Mapping[str, Sequence[float]] | Sequence[Sequence[float]] | None = None,
    reasons_fn: GenerateFn | None = None,
    on_unparseable_reason: Callable[[str, str, str], None] | None = None,
) -> Iterator[list[dict[str, Any]]]:
    """Label ``groups`` ``batch_size`` queries at a time: yields each batch's output rows (see
    :func:`label_group`) after one ``generate_fn(prompts)`` call with that batch's prompts, and,
    with ``reasons_fn``, each judged document's reason (:func:`add_reasons`).

    ``prescores`` (per query id, or parallel to ``groups``) replaces the documents'
    ``first_stage_score`` as the pre-ranker. Every group's candidates are selected (and checked)
    before the first call."""
    _check_counts(top_k, bottom_k, batch_size=batch_size, max_doc_chars=max_doc_chars)
    shown = [
        candidate_indices(
            g, top_k, bottom_k,
            None if prescores is None else (prescores[g.query_id] if isinstance(prescores, Mapping) else prescores[i]),
        )
        for i, g in enumerate(groups)
    ]
    for start in range(0, len(groups), batch_size):
        batch = list(zip(groups[start:start + batch_size], shown[start:start + batch_size]))
        prompts = [build_listwise_prompt(g.query, [g.docs[j].text for j in s], max_doc_chars=max_doc_chars)
                   for g, s in batch]
        answers = list(generate_fn(prompts))
        if len(answers) != len(prompts):
            raise RuntimeError(f"generate_fn returned {len(answers)} answers for {len(prompts)} prompts")
        rows = [label_group(g, s, a) for (g, s), a in zip(batch, answers)]
        if reasons_fn is not None:
            add_reasons(rows, reasons_fn, max_doc_chars, on_unparseable=on_unparseable_reason)
        yield rows


def rradistill_labels(
    groups: Sequence[RankingGroup],
    prescores: Mapping[str, Sequence[float]] | Sequence[Sequence[float]] | None,
    llm_rank_fn: Callable[[str], str],
    top_k: int = 10,
    bottom_k: int = 10,
    max_doc_chars: int = 300,
) -> list[dict[str, Any]]:
    """RRADistill labels for groups in memory, one prompt at a time (``llm_rank_fn(prompt)``),
    on this module's rules; ``prescores=None`` uses the documents' ``first_stage_score``."""
    rows: list[dict[str, Any]] = []
    for batch in iter_listwise_labels(groups, lambda prompts: [llm_rank_fn(p) for p in prompts], top_k=top_k,
                                      bottom_k=bottom_k, batch_size=1, max_doc_chars=max_doc_chars,
                                      prescores=prescores):
        rows.extend(batch)
    return rows


# ------------------------------------------------------------------------------------------ the LLM
def hf_generate_fn(model: nn.Module, tokenizer: Any, *, max_new_tokens: int = 64,
                   use_chat_template: bool = True) -> GenerateFn:
    """A :data:`GenerateFn` backed by a Hugging Face generating model: greedy ``generate`` on the
    whole batch of prompts (each wrapped in the tokenizer's chat template as one user turn when it
    has one and ``use_chat_template``), LEFT padded, inputs on the model's device, the model in eval
    mode during the call (its mode restored after), returning only the newly generated text of each
    row (special tokens dropped, surrounding whitespace stripped). Encoder-decoder models decode their whole output."""
    from transformers import GenerationConfig

    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    enc_dec = bool(getattr(model.config, "is_encoder_decoder", False))
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens, "do_sample": False, "num_beams": 1, "use_cache": True,
        "pad_token_id": pad_token_id(tokenizer),
        "eos_token_id": eos if eos is not None else tokenizer.eos_token_id,
    }
    if enc_dec:
        start = getattr(model.config, "decoder_start_token_id", None)
        kwargs["decoder_start_token_id"] = start if start is not None else kwargs["pad_token_id"]
    config = GenerationConfig(**kwargs)
    templated = use_chat_template and bool(getattr(tokenizer, "chat_template", None))
    max_positions = getattr(model.config, "max_position_embeddings", None)
    warned = False

    def generate(prompts: list[str]) -> list[str]:
        nonlocal warned
        if not prompts:
            return []
        texts = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            if templated else p
            for p in prompts
        ]
        side = tokenizer.padding_side
        tokenizer.padding_side = "left"
        try:
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not templated)
        finally:
            tokenizer.padding_side = side
        length = enc["input_ids"].shape[1]
        if max_positions and length + max_new_tokens > max_positions and not warned:
            warned = True
            warnings.warn(f"listwise prompts reach {length} tokens + {max_new_tokens} new > the model's "
                          f"{max_positions} positions; lower top_k / bottom_k / max_doc_chars", stacklevel=2)
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = model.generate(  # type: ignore[operator]
                    input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device),
                    generation_config=config,
                )
        finally:
            model.train(was_training)
        new = out if enc_dec else out[:, length:]
        return [text.strip() for text in tokenizer.batch_decode(new.cpu(), skip_special_tokens=True)]

    return generate


def hf_llm_rank_fn(model: nn.Module, tokenizer: Any, max_new_tokens: int = 96,
                   use_chat_template: bool = True) -> Callable[[str], str]:
    """One prompt → the new text (:func:`hf_generate_fn` on a batch of one)."""
    generate = hf_generate_fn(model, tokenizer, max_new_tokens=max_new_tokens, use_chat_template=use_chat_template)
    return lambda prompt: generate([prompt])[0]


def _load_llm(llm: str | os.PathLike[str] | nn.Module, tokenizer: str | None, device: str | None,
              dtype: str) -> tuple[nn.Module, Any]:
    """A generating model and its tokenizer through the one loader (:mod:`kdlab.models.backbones`)."""
    if isinstance(llm, nn.Module):
        if tokenizer is None:
            raise TypeError("listwise_label_file takes an LLM name or directory, or a module and tokenizer=NAME")
        if device is not None and not is_quantized(llm):
            llm = llm.to(device)
        return llm, load_tokenizer(tokenizer)
    name = str(llm)
    model = load_generation_model(name, dtype=dtype)
    model = model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return model, load_tokenizer(str(tokenizer or name))


# ------------------------------------------------------------------------------------------ the file
def _write_output(partial: Path, out: Path, groups: Sequence[RankingGroup]) -> None:
    """``out`` from ``partial``'s lines, in the input's order (a resumed partial may hold them in
    another), atomically; ``partial`` removed after."""
    rows: dict[str, str] = {}
    for line in partial.read_text(encoding="utf-8").splitlines():
        if line.strip():
            rows[str(json.loads(line)["query_id"])] = line
    missing = [g.query_id for g in groups if g.query_id not in rows]
    if missing:
        raise RuntimeError(f"{partial}: {len(missing)} groups missing after labeling (first: {missing[0]!r})")
    with atomic_path(out) as tmp:
        tmp.write_text("".join(rows[g.query_id] + "\n" for g in groups), encoding="utf-8")
    partial.unlink()


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


def listwise_label_file(
    llm: str | nn.Module,
    input: RankingSource | str,
    output: str,
    *,
    tokenizer: str | None = None,
    top_k: int = 10,
    bottom_k: int = 5,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    max_doc_chars: int = 300,
    device: str | None = None,
    dtype: str = "float32",
    resume: bool = True,
    progress: bool = True,
    generate_fn: GenerateFn | None = None,
    reasons: bool = False,
    reasons_llm: str | nn.Module | None = None,
    reason_max_new_tokens: int = 48,
    reasons_fn: GenerateFn | None = None,
) -> int:
    """Write RRADistill listwise labels of ``input``'s queries to ``output`` (kdlab ranking JSONL).

    Args:
        llm: a causal LM (or encoder-decoder) by name — a tiny name, an alias from
            ``kdlab models prepare``, a local directory or a hub id, loaded by
            :func:`kdlab.models.backbones.load_generation_model` in ``dtype`` — or a loaded module
            (then ``tokenizer`` is required and ``dtype`` is not applied). Not loaded when
            ``generate_fn`` is given or every query is already in the partial file.
        input: a kdlab JSONL path or any :class:`~kdlab.data.sources.RankingSource`.
        tokenizer: the tokenizer's backbone name (default: ``llm``'s own).
        top_k, bottom_k: candidates shown to the LLM per query, from both ends of the pre-ranker's
            order (``first_stage_score`` descending, ties in the group's order); the paper shows
            top-10 + bottom-10.
        batch_size: queries (prompts) per ``generate`` call and per durable chunk of the partial file.
        max_new_tokens: the answer's token budget (``[12] > `` is ~5 tokens per identifier).
        max_doc_chars: characters of each document in the prompt.
        device: where the model runs (default: a module stays where it is; a loaded name goes to
            CUDA when available, else CPU). Quantized modules are never moved.
        dtype: ``float32 | bfloat16 | float16`` of a model loaded by name (8-bit / 4-bit are not
            offered by ``load_generation_model``; pass a module loaded with
            ``load_backbone(..., quantization=...)`` instead).
        resume: continue from ``<output>.partial`` (False: start over).
        progress: a tqdm bar over queries.
        generate_fn: ``generate_fn(prompts) -> answers`` replaces the model (tests script the LLM).
        reasons: also write a one-sentence ``reason`` per judged document (module docstring, 6.),
            asked of ``reasons_llm`` (default: ``llm`` itself) with ``reason_max_new_tokens``;
            ``reasons_fn`` replaces that model as ``generate_fn`` does the ranking one.

    Returns the number of groups written. Output order = input order.
    """
    from tqdm.auto import tqdm


    _check_counts(top_k, bottom_k, batch_size=batch_size, max_new_tokens=max_new_tokens, max_doc_chars=max_doc_chars,
                  reason_max_new_tokens=reason_max_new_tokens)
    reasons = reasons or reasons_fn is not None
    if not isinstance(llm, nn.Module):
        resolve_dtype(dtype)  # a typo fails before any data is read
    source = as_source(input, "input")
    input_label = source.label()
    groups = read_source(source, "input").groups
    for g in groups:  # checked before the model loads
        candidate_indices(g, top_k, bottom_k)
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    if not resume and partial.exists():
        partial.unlink()
    done = _done_query_ids(partial)
    todo = [g for g in groups if g.query_id not in done]
    if generate_fn is None and todo:
        model, tok = _load_llm(llm, tokenizer, device, dtype)
        generate_fn = hf_generate_fn(model, tok, max_new_tokens=max_new_tokens)
        if reasons and reasons_fn is None and reasons_llm is None:
            reasons_fn = hf_generate_fn(model, tok, max_new_tokens=reason_max_new_tokens)
    if reasons and reasons_fn is None and todo:
        model, tok = _load_llm(reasons_llm if reasons_llm is not None else llm,
                               None if reasons_llm is not None else tokenizer, device, dtype)
        reasons_fn = hf_generate_fn(model, tok, max_new_tokens=reason_max_new_tokens)
    unparseable: list[str] = []

    def report_unparseable(query_id: str, doc_id: str, answer: str) -> None:
        unparseable.append(doc_id)
        if len(unparseable) <= 10:  # one line each, then only the count
            bar.write(f"{input_label}: query {query_id!r}, document {doc_id!r}: unparseable reason "
                      f"{answer[:60]!r} (expected one sentence): no reason")
    bar = tqdm(total=len(groups), initial=len(groups) - len(todo), desc="listwise labels", unit="query",
               disable=not progress)
    try:
        with open(partial, "a", encoding="utf-8", newline="\n") as f:
            if todo:
                assert generate_fn is not None
                for rows in iter_listwise_labels(todo, generate_fn, top_k=top_k, bottom_k=bottom_k,
                                                 batch_size=batch_size, max_doc_chars=max_doc_chars,
                                                 reasons_fn=reasons_fn if reasons else None,
                                                 on_unparseable_reason=report_unparseable):
                    f.write("".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in rows))
                    f.flush()
                    os.fsync(f.fileno())
                    bar.update(len(rows))
    finally:
        bar.close()
    _write_output(partial, out, groups)
    if reasons:
        written, missing = _reason_counts(out)
        print(f"reasons: {written} documents have one, {missing} have none (unparseable answer)", flush=True)
    return len(groups)


def _reason_counts(path: Path) -> tuple[int, int]:
    """Documents of a labelled file with a reason, and without one."""
    have = without = 0
    for line in path.read_text(encoding="utf-8").splitlines():
        for doc in json.loads(line)["docs"] if line.strip() else []:
            if doc.get("reason"):
                have += 1
            else:
                without += 1
    return have, without

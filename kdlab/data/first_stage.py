"""First-stage retrieval with BM25 (the ``bm25s`` library) for users without a run file.

* :func:`bm25_run` — index a collection, retrieve ``top_k`` documents per query: a run in the form
  :func:`~kdlab.data.readers.read_trec_run` returns (``qid → [RunEntry]``, best first), ready for
  :func:`~kdlab.data.readers.assemble_ranking_groups`.
* :func:`bm25_candidate_scores` — BM25 scores of the candidates of given ranking groups (the
  pre-ranker row of a report when the data has candidates but no first-stage scores); IDF and the
  average length come from the union of the groups' distinct documents.
* :func:`describe` — the parameters and library version, for the run directory.

Scoring is bm25s's: ``method="lucene"`` (default) is Lucene's BM25 (≥ 8, no ``k1 + 1`` factor)::

    score(q, d) = Σ_{t in q} idf(t) · tf(t, d) / (tf(t, d) + k1 · (1 − b + b · |d| / avgdl))
    idf(t)      = ln(1 + (N − df(t) + 0.5) / (df(t) + 0.5))

summed over the query's tokens (a repeated query token counts each time), ``|d|`` and ``avgdl``
counted in tokens after stopword removal. Tokens: bm25s's tokenizer (lower-cased unless
``lowercase=False``, the regex ``(?u)\\b\\w\\w+\\b``, bm25s's stopword list ``stopwords``, no
stemming unless ``stemmer`` names a PyStemmer language — PyStemmer is optional). Scores are float32
(bm25s's default). Nothing is downloaded.

Order: a query's entries are sorted by score descending, then document id (as text) ascending, so
ties are deterministic. Every query gets exactly ``top_k`` entries — documents sharing no term with
the query fill the list with score 0 (bm25s's semantics; Lucene would return fewer).

bm25s is imported inside the functions, so importing this module costs nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from kdlab.data.readers import RankingGroup, RunEntry

if TYPE_CHECKING:
    from kdlab.data.collection import TextCollection

BM25Method = Literal["lucene", "robertson", "atire", "bm25l", "bm25+"]
_METHODS = ("lucene", "robertson", "atire", "bm25l", "bm25+")
TOKEN_PATTERN = r"(?u)\b\w\w+\b"  # bm25s's default splitter
_SMALL_TIE_SET = 64  # candidate sets up to 4·k + this are ordered in Python; larger ones in numpy


@dataclass(frozen=True)
class BM25Options:
    """BM25 parameters. ``delta`` is used by ``bm25l`` and ``bm25+`` only; ``stopwords`` is a
    bm25s list name (``"en"``, ``"en_plus"``, ``"de"``, ``"fr"``, ...) or None; ``stemmer`` a
    PyStemmer language (``"english"``), which needs ``pip install PyStemmer``."""

    k1: float = 1.5
    b: float = 0.75
    method: BM25Method = "lucene"
    stopwords: str | None = "en"
    lowercase: bool = True
    delta: float = 0.5
    stemmer: str | None = None

    def __post_init__(self) -> None:
        for name in ("k1", "b", "delta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"BM25Options.{name}: expected a finite number, got {value!r}")
        if self.k1 < 0:
            raise ValueError(f"BM25Options.k1: expected k1 >= 0, got {self.k1}")
        if not 0 <= self.b <= 1:
            raise ValueError(f"BM25Options.b: expected 0 <= b <= 1, got {self.b}")
        if self.delta < 0:
            raise ValueError(f"BM25Options.delta: expected delta >= 0, got {self.delta}")
        if self.method not in _METHODS:
            raise ValueError(f"BM25Options.method: expected one of {', '.join(_METHODS)}, got {self.method!r}")
        if self.stopwords is not None and not isinstance(self.stopwords, str):
            raise ValueError(f"BM25Options.stopwords: expected a stopword list name or None, got {self.stopwords!r}")
        if not isinstance(self.lowercase, bool):
            raise ValueError(f"BM25Options.lowercase: expected true or false, got {self.lowercase!r}")
        if self.stemmer is not None and not isinstance(self.stemmer, str):
            raise ValueError(f"BM25Options.stemmer: expected a PyStemmer language name or None, got {self.stemmer!r}")


def describe(options: BM25Options = BM25Options()) -> dict[str, Any]:
    """The retriever's parameters and library version (JSON-ready), for recording in a run dir."""
    import bm25s

    info: dict[str, Any] = {"retriever": "bm25s", "bm25s_version": bm25s.__version__}
    info.update(asdict(options))
    info["idf_method"] = options.method
    info["token_pattern"] = TOKEN_PATTERN
    info["dtype"] = "float32"
    if options.method not in ("bm25l", "bm25+"):
        info.pop("delta")
    return info


# --------------------------------------------------------------------------------------------------
# bm25s plumbing


def _tokenizer(options: BM25Options) -> Any:
    import bm25s.tokenization as tokenization

    stemmer = None
    if options.stemmer is not None:
        try:
            import Stemmer  # PyStemmer, optional
        except ImportError:
            raise ValueError(f"BM25Options.stemmer={options.stemmer!r} needs PyStemmer (pip install PyStemmer)") from None
        try:
            stemmer = Stemmer.Stemmer(options.stemmer).stemWord
        except KeyError:
            raise ValueError(f"BM25Options.stemmer: PyStemmer has no {options.stemmer!r} stemmer") from None
    try:
        return tokenization.Tokenizer(lower=options.lowercase, splitter=TOKEN_PATTERN,
                                      stopwords=options.stopwords or [], stemmer=stemmer)
    except ValueError:
        raise ValueError(f"BM25Options.stopwords: bm25s has no stopword list {options.stopwords!r} "
                         "(try 'en', 'en_plus', 'de', 'nl', 'fr', 'es', 'pt', 'it', 'ru', 'sv', 'no', "
                         "'zh', 'tr', 'ko', 'da' or None)") from None


class _Index:
    """A bm25s index over documents 0..n-1 plus the tokenizer that made its vocabulary."""

    def __init__(self, texts: Iterable[str], n: int, options: BM25Options, progress: bool) -> None:
        import bm25s
        from bm25s.tokenization import Tokenized

        self.tokenizer = _tokenizer(options)
        token_ids = self.tokenizer.tokenize(texts, update_vocab=True, return_as="ids", length=n,
                                            show_progress=progress)
        if len(token_ids) != n:  # a collection changed under us, or a miscounted mapping
            raise RuntimeError(f"indexed {len(token_ids)} documents, expected {n}")
        vocab = self.tokenizer.get_vocab_dict()
        self.empty_id = vocab.get("")
        self.retriever = bm25s.BM25(k1=options.k1, b=options.b, delta=options.delta, method=options.method,
                                    backend="numpy", dtype="float32")
        self.retriever.index(Tokenized(ids=token_ids, vocab=vocab), show_progress=progress)
        self.n = n

    def query_ids(self, queries: Sequence[str]) -> list[list[int]]:
        """Token ids of each query in the index's vocabulary (unknown tokens dropped)."""
        ids = self.tokenizer.tokenize(list(queries), update_vocab=False, return_as="ids", show_progress=False)
        return [[t for t in q if t != self.empty_id] for q in ids]

    def scores(self, token_ids: list[int]) -> np.ndarray:
        """BM25 of every document for one query (``retriever.get_scores``); zeros for no tokens."""
        if not token_ids:
            return np.zeros(self.n, dtype=np.float32)
        return self.retriever.get_scores(token_ids)

    def scores_of(self, token_ids: list[int], docs: np.ndarray) -> np.ndarray:
        """``scores(token_ids)[docs]`` without scoring the whole corpus: sums the query tokens'
        precomputed contributions from the index's CSC columns (same terms, same order, same
        float32 sums as ``get_scores``)."""
        out = np.zeros(len(docs), dtype=np.float32)
        if not token_ids:
            return out
        index = self._sorted_columns()
        if index is None:
            return self.scores(token_ids)[docs]
        data, indices, indptr = index
        for t in token_ids:
            start, end = int(indptr[t]), int(indptr[t + 1])
            if start == end:
                continue
            column = indices[start:end]
            pos = np.minimum(np.searchsorted(column, docs), len(column) - 1)
            hit = column[pos] == docs
            out[hit] += data[start:end][pos[hit]]
        nonoccurrence = getattr(self.retriever, "nonoccurrence_array", None)
        if nonoccurrence is not None:
            out += nonoccurrence[np.asarray(token_ids, dtype=np.int64)].sum()
        return out

    def _sorted_columns(self) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        cached = getattr(self, "_columns", False)
        if cached is not False:
            return cached  # type: ignore[return-value]
        scores = getattr(self.retriever, "scores", None)
        columns = None
        if isinstance(scores, dict) and {"data", "indices", "indptr"} <= scores.keys():
            data, indices, indptr = (np.asarray(scores[k]) for k in ("data", "indices", "indptr"))
            col_of = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
            if len(indices) > 1 and not np.all((np.diff(indices) > 0) | (np.diff(col_of) > 0)):
                order = np.lexsort((indices, col_of))
                data, indices = data[order], indices[order]
            columns = (data, indices, indptr)
        self._columns = columns
        return columns


def _top_k(scores: np.ndarray, k: int, id_of: Callable[[np.ndarray], list[str]],
           rank_of: Callable[[], np.ndarray]) -> list[tuple[int, float]]:
    """The ``k`` best (document index, score): score descending, then doc id (text) ascending."""
    n = len(scores)
    if k < n:
        kth = np.partition(scores, n - k)[n - k]
        candidates = np.flatnonzero(scores >= kth)
    else:
        kth = None
        candidates = np.arange(n)
    if len(candidates) <= 4 * k + _SMALL_TIE_SET:
        ids = id_of(candidates)
        values = scores[candidates].tolist()
        best = sorted(zip(values, ids, candidates.tolist()), key=lambda r: (-r[0], r[1]))[:k]
        return [(i, v) for v, _, i in best]
    # Many ties at the k-th score (e.g. a query sharing no term with the collection): take every
    # document strictly above it, then the tied ones with the smallest ids.
    above = candidates[scores[candidates] > kth]
    tied = candidates[scores[candidates] == kth]
    rank = rank_of()
    need = k - len(above)
    tied_rank = rank[tied]
    if need < len(tied):
        tied = tied[np.argpartition(tied_rank, need - 1)[:need]] if need > 0 else tied[:0]
    chosen = np.concatenate([above, tied])
    order = np.lexsort((rank[chosen], -scores[chosen].astype(np.float64)))
    chosen = chosen[order]
    return list(zip(chosen.tolist(), scores[chosen].tolist()))


# --------------------------------------------------------------------------------------------------
# Public functions


def bm25_run(collection: TextCollection | Mapping[str, str | tuple[str, str]], queries: Mapping[str, str],
             top_k: int, options: BM25Options = BM25Options(), progress: bool = True) -> dict[str, list[RunEntry]]:
    """Retrieve ``top_k`` documents per query with BM25 over ``collection`` (every document is
    indexed as ``title + " " + text``).

    Returns ``qid → [RunEntry(doc_id, rank, score)]`` best first (rank 1 = best; ties by doc id),
    queries in the order given — the shape :func:`~kdlab.data.readers.read_trec_run` returns.
    ``top_k`` may not exceed the collection's size. Deterministic: same inputs, same run.
    """
    from kdlab.data.collection import TextCollection

    if not isinstance(options, BM25Options):
        raise TypeError(f"options must be a BM25Options, got {type(options).__name__}")
    n = len(collection)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k: expected an integer >= 1, got {top_k!r}")
    if top_k > n:
        raise ValueError(f"top_k={top_k} is larger than the collection ({n} documents): "
                         f"ask for at most {n} documents per query")

    if isinstance(collection, TextCollection):
        file_order = collection._file_order()  # index i ↔ sorted position file_order[i]
        texts: Iterator[str] = (f"{title} {text}" for _, title, text in collection.iter_documents())

        def id_of(indices: np.ndarray) -> list[str]:
            return collection._ids_at(file_order[indices])

        rank_cache: list[np.ndarray] = []

        def rank_of() -> np.ndarray:
            if not rank_cache:
                rank_cache.append(collection._string_rank()[file_order])
            return rank_cache[0]
    else:
        doc_ids = list(collection.keys())
        texts = (_doc_text(collection[d]) for d in doc_ids)

        def id_of(indices: np.ndarray) -> list[str]:
            return [doc_ids[i] for i in indices.tolist()]

        rank_cache = []

        def rank_of() -> np.ndarray:
            if not rank_cache:
                order = sorted(range(n), key=doc_ids.__getitem__)
                rank = np.empty(n, dtype=np.int64)
                rank[np.asarray(order, dtype=np.int64)] = np.arange(n, dtype=np.int64)
                rank_cache.append(rank)
            return rank_cache[0]

    index = _Index(texts, n, options, progress)
    qids = list(queries)
    query_tokens = index.query_ids([queries[q] for q in qids])
    run: dict[str, list[RunEntry]] = {}
    iterator: Iterable[tuple[str, list[int]]] = zip(qids, query_tokens)
    if progress:
        iterator = _progress(iterator, len(qids), "BM25 retrieve")
    for qid, tokens in iterator:
        best = _top_k(index.scores(tokens), top_k, id_of, rank_of)
        ids = id_of(np.asarray([i for i, _ in best], dtype=np.int64))
        run[qid] = [RunEntry(doc_id, rank, float(score)) for rank, (doc_id, (_, score)) in enumerate(zip(ids, best), 1)]
    return run


def bm25_candidate_scores(groups: Sequence[RankingGroup], options: BM25Options = BM25Options(),
                          progress: bool = False) -> list[list[float]]:
    """BM25 score of every candidate of every group for its group's query: ``[[score per doc of
    group 0], ...]``, aligned with ``group.docs``.

    The corpus (document frequencies, average length) is the union of the groups' distinct
    documents by id; a document id seen again keeps the text it had first (``doc.text``: title and
    body). Scores equal what ``retriever.get_scores`` gives for those documents, computed from the
    index's columns so a group costs its own size, not the corpus's.
    """
    if not isinstance(options, BM25Options):
        raise TypeError(f"options must be a BM25Options, got {type(options).__name__}")
    position: dict[str, int] = {}
    texts: list[str] = []
    for group in groups:
        for doc in group.docs:
            if doc.id not in position:
                position[doc.id] = len(texts)
                texts.append(doc.text)
    if not texts:
        return [[] for _ in groups]
    index = _Index(iter(texts), len(texts), options, progress)
    del texts
    query_tokens = index.query_ids([g.query for g in groups])
    out: list[list[float]] = []
    for group, tokens in zip(groups, query_tokens):
        docs = np.fromiter((position[d.id] for d in group.docs), dtype=np.int64, count=len(group.docs))
        out.append(index.scores_of(tokens, docs).astype(np.float64).tolist())
    return out


def _doc_text(entry: str | tuple[str, str]) -> str:
    if isinstance(entry, tuple):
        title, text = entry
        return f"{title} {text}"
    return entry


def _progress(iterable: Iterable[Any], total: int, desc: str) -> Iterable[Any]:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with bm25s's usual installs
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False)


__all__ = ["BM25Method", "BM25Options", "bm25_candidate_scores", "bm25_run", "describe"]

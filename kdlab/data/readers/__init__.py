"""Readers for the formats kdlab users bring, with one-line errors a person can act on.

Every malformed input raises :class:`DataFormatError` naming the file, the line (1-based) and the
field, and saying what was expected, e.g.::

    data.jsonl:17: field 'docs[2].label': expected a number, got 'high'

Readers validate everything up front (they are called from ``DataModule.setup``), so a bad file
fails before any training step rather than in the middle of an epoch.

:func:`assemble_ranking_groups` turns a collection + queries + qrels + run into the same ranking
groups the JSONL reader yields; :mod:`kdlab.data.sources` puts the pieces together for each format
(collections through the offset-indexed :class:`~kdlab.data.collection.TextCollection`), so every
format feeds one data module (write groups with :func:`write_ranking_jsonl`).

One module per format; this package re-exports their public names:

- ``base``: :class:`DataFormatError`, the records (:class:`RankingDoc`, :class:`CollectionDoc`,
  ``Doc``, :class:`RankingGroup`, :func:`with_scores`), :func:`iter_lines` / :func:`iter_jsonl` and
  the private field checks every reader shares
- ``ranking_jsonl``: kdlab's ranking JSONL, read and written (:func:`ranking_group_to_json`)
- ``clicks``: click-log JSONL (:class:`ClickRecord`)
- ``seq2seq``: seq2seq / GSM8K JSONL pairs (:class:`Seq2SeqPair`, ``SEQ2SEQ_FIELDS``)
- ``msmarco``: MS MARCO ``id \\t text`` TSV collection and queries
- ``trec``: TREC qrels and runs, and MS MARCO's three-column runs (:class:`RunEntry`, :func:`read_run`)
- ``beir``: BEIR queries / corpus JSONL and qrels TSV
- ``assemble``: :func:`assemble_ranking_groups`
- ``flagembedding``: FlagEmbedding reranker JSONL, read and written
"""

from __future__ import annotations

from kdlab.data.readers.assemble import assemble_ranking_groups
from kdlab.data.readers.base import (
    CollectionDoc,
    DataFormatError,
    Doc,
    RankingDoc,
    RankingGroup,
    iter_jsonl,
    iter_lines,
    with_scores,
)
from kdlab.data.readers.beir import read_beir_qrels, read_beir_queries
from kdlab.data.readers.clicks import ClickRecord, read_clicks_jsonl
from kdlab.data.readers.flagembedding import (
    flagembedding_record,
    read_flagembedding_jsonl,
    write_flagembedding_jsonl,
)
from kdlab.data.readers.msmarco import (
    read_msmarco_collection,
    read_msmarco_queries,
    read_tsv_texts,
)
from kdlab.data.readers.ranking_jsonl import (
    ranking_group_to_json,
    read_ranking_jsonl,
    write_ranking_jsonl,
)
from kdlab.data.readers.seq2seq import (
    SEQ2SEQ_FIELDS,
    Seq2SeqFields,
    Seq2SeqPair,
    read_seq2seq_jsonl,
)
from kdlab.data.readers.trec import RunEntry, read_run, read_trec_qrels, read_trec_run

__all__ = [
    "ClickRecord", "CollectionDoc", "DataFormatError", "Doc", "RankingDoc", "RankingGroup", "RunEntry", "Seq2SeqPair",
    "assemble_ranking_groups", "flagembedding_record", "iter_jsonl", "iter_lines", "ranking_group_to_json",
    "read_beir_qrels", "read_beir_queries", "read_clicks_jsonl", "read_flagembedding_jsonl",
    "read_msmarco_collection", "read_msmarco_queries", "read_ranking_jsonl", "read_run", "read_seq2seq_jsonl",
    "SEQ2SEQ_FIELDS", "Seq2SeqFields",
    "read_trec_qrels", "read_trec_run", "read_tsv_texts", "with_scores", "write_flagembedding_jsonl", "write_ranking_jsonl",
]

"""``python -m kdlab data``: convert ranking data between formats, or write example files in each."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from kdlab.data.sources import RankingSource
from kdlab.errors import ConfigError


def data_command(action: Literal["convert", "fixtures"], output: str, input: RankingSource | str | None = None,
                 to: Literal["jsonl", "flagembedding"] = "jsonl") -> list[Path]:
    """Convert ranking data between formats (`data convert --input.format=msmarco ... --output F`), or
    write small example files in every format (`data fixtures --output DIR`).

    Args:
        action: convert, or fixtures (BEIR, MS MARCO and FlagEmbedding files from the embedded sample).
        output: convert: the file to write (atomically); fixtures: the directory.
        input: the source: a kdlab JSONL path, or --input.format=jsonl|msmarco|beir|trec|flagembedding
            with its files (--input.path, --input.collection, --input.queries, --input.qrels,
            --input.run, --input.top_k, ...).
        to: jsonl (kdlab ranking groups, with first_stage_score from the run or BM25) or
            flagembedding ({query, pos, neg, pos_scores, neg_scores}; needs teacher scores).
    """
    if action == "fixtures":
        from kdlab.data.fixtures import write_fixtures

        files = write_fixtures(output)
        print(f"wrote {len(files)} files under {output}")
        return files
    if input is None:
        raise ConfigError("data convert needs --input (a kdlab JSONL path, or --input.format=... with its files)")
    from kdlab.data.readers import write_flagembedding_jsonl, write_ranking_jsonl
    from kdlab.data.sources import as_source, read_source

    data = read_source(as_source(input, "input"), "input")
    if to == "flagembedding":
        missing = next((g for g in data.groups if any(d.teacher_score is None for d in g.docs)), None)
        if missing is not None:
            raise ConfigError(f"{data.source.label()}: query {missing.query_id!r} has documents without a teacher_score; "
                              f"FlagEmbedding distillation data needs them: run `python -m kdlab label --teacher "
                              f"<ranker export> --input {data.source.label()} --output <scored.jsonl>` first")
        write_flagembedding_jsonl(output, data.groups)
    else:
        write_ranking_jsonl(output, data.groups)
    docs = sum(len(g.docs) for g in data.groups)
    print(f"wrote {len(data.groups)} queries, {docs} (query, doc) pairs to {output} ({to})")
    return [Path(output)]

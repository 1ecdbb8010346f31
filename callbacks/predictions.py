"""RankingPredictionWriter: ``python -m kdlab predict`` of a ranker writes a TREC run and a JSONL of
scores into its run directory, in input order, from one process or several.

Reads only the prediction dictionaries that ranking stages return from ``predict_step``
(``scores [G, N]``, ``doc_mask``, ``query_index``, ``query_ids``, ``doc_ids``); predictions of any
other shape (a generation stage's) are left alone.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter

from kdlab.runs import write_jsonl_atomic, write_text_atomic

__all__ = ["RankingPredictionWriter"]


def _rows(predictions: Sequence[Any]) -> list[dict[str, Any]]:
    """One row per query: ``{"query_index", "query_id", "docs": [{"id", "score"}]}``."""
    rows = []
    for batch in predictions:
        if not isinstance(batch, dict) or not {"scores", "doc_mask", "query_ids", "doc_ids"} <= set(batch):
            continue
        for g, query_id in enumerate(batch["query_ids"]):
            valid = batch["doc_mask"][g].tolist()
            docs = [{"id": doc_id, "score": float(score)}
                    for doc_id, score, ok in zip(batch["doc_ids"][g], batch["scores"][g].tolist(), valid) if ok]
            rows.append({"query_index": int(batch["query_index"][g]), "query_id": str(query_id), "docs": docs})
    return rows


class RankingPredictionWriter(BasePredictionWriter):
    """Writes ``predictions.trec`` (``qid Q0 docid rank score kdlab``) and ``predictions.jsonl``
    (``{"query_id", "docs": [{"id", "score"}]}``) into ``output_dir`` at the end of ``predict``.

    Under DDP every rank writes its shard, then global rank 0 merges the shards by query index
    (the distributed sampler's padding repeats a few queries: each is kept once), writes both files
    atomically and removes the shards; input order is kept whatever the number of processes.
    """

    def __init__(self, output_dir: str | os.PathLike[str], run_tag: str = "kdlab") -> None:
        super().__init__(write_interval="epoch")
        self.output_dir = Path(output_dir)
        self.run_tag = run_tag

    def _shard(self, rank: int) -> Path:
        return self.output_dir / f"predictions.rank{rank}.jsonl.partial"

    def write_on_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, predictions: Sequence[Any],
                           batch_indices: Sequence[Any]) -> None:
        flat = [p for group in predictions for p in (group if isinstance(group, list) else [group])]
        rows = _rows(flat)
        has_rows = bool(trainer.strategy.reduce_boolean_decision(bool(rows), all=False))
        if not has_rows:
            return
        rank, world = trainer.global_rank, trainer.world_size
        if world > 1:
            write_jsonl_atomic(self._shard(rank), rows)
            trainer.strategy.barrier()
        if rank == 0:
            merged: dict[int, dict[str, Any]] = {}
            shards = [self._shard(r) for r in range(world)] if world > 1 else []
            for shard in shards:
                for line in shard.read_text(encoding="utf-8").splitlines():
                    row = json.loads(line)
                    merged.setdefault(row["query_index"], row)
            for row in rows if world == 1 else []:
                merged.setdefault(row["query_index"], row)
            ordered = [merged[i] for i in sorted(merged)]
            self.write(ordered)
            for shard in shards:
                shard.unlink()
        if world > 1:
            trainer.strategy.barrier()

    def write(self, rows: Sequence[dict[str, Any]]) -> None:
        """Both files, atomically, from rows in input order."""
        lines = []
        for row in rows:
            ranked = sorted(row["docs"], key=lambda d: (-d["score"], d["id"]))
            lines += [f"{row['query_id']} Q0 {d['id']} {rank} {d['score']!r} {self.run_tag}"
                      for rank, d in enumerate(ranked, start=1)]
        write_text_atomic(self.output_dir / "predictions.trec", "".join(line + "\n" for line in lines))
        write_jsonl_atomic(self.output_dir / "predictions.jsonl",
                           ({"query_id": r["query_id"], "docs": r["docs"]} for r in rows))

"""Helpers for the multi-rank tests, importable by `python -m kdlab` subprocesses and their DDP ranks.

* :class:`OrderedToyData`: toy regression data with a world-size-invariant global batch (a fixed,
  seeded permutation read in order; a ``DistributedSampler(shuffle=False)`` then gives rank r
  the items ``r::W``, so the W per-rank batches of step i together are exactly the 1-rank batch i).
* :class:`LossTrace`: per-optimizer-step loss averaged over ranks, written by global rank 0, plus the
  final parameters; every rank also writes which run directory it resolved.
* :class:`FixedScorer` + :class:`ScoredGroups`: a model-free ranker (the scores come with the data) to
  check that retrieval metrics synced over ranks equal the 1-rank value.
* :func:`labelled_ranking_file`: a small ranking JSONL with synthetic ``teacher_score`` fields.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

from kdlab.runs import RUN_DIR_ENV, write_json_atomic
from toy_stage import toy_tensors  # tests/ is on the path of every run this script serves


class OrderedToyData(L.LightningDataModule):
    """Toy regression data; training order = a seeded permutation, the same every epoch, not shuffled
    by the loader (so the global batch does not depend on the number of ranks)."""

    def __init__(self, n: int = 64, batch_size: int = 8, seed: int = 0) -> None:
        super().__init__()
        x, y = toy_tensors(n, seed)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))
        self.x, self.y = x[perm], y[perm]
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        dataset = TensorDataset(self.x, self.y)
        world = self.trainer.world_size if self.trainer is not None else 1
        if world > 1:
            # Our own sampler: for *training* loaders Lightning injects DistributedSampler(shuffle=True)
            # whatever the loader's own sampler was (_process_dataloader sets is_shuffled=True), which
            # would make the global batch depend on the world size. It leaves a DistributedSampler alone.
            sampler = DistributedSampler(dataset, num_replicas=world, rank=self.trainer.global_rank, shuffle=False)
            return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.batch_size)


class LossTrace(L.Callback):
    """Writes ``<out>/trace.json`` (rank 0): the rank-averaged training loss of every optimizer step,
    the first global step this process trained, the world size; and ``<out>/rank<r>.json`` per rank:
    the run directory it resolved (``KDLAB_RUN_DIR`` and ``trainer.default_root_dir``)."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.losses: list[float] = []
        self.steps: list[int] = []
        self._micro: list[torch.Tensor] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.out / f"rank{trainer.global_rank}.json", {
            "env_run_dir": os.environ.get(RUN_DIR_ENV), "default_root_dir": str(trainer.default_root_dir),
            "world_size": trainer.world_size, "pid": os.getpid()})

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        # outputs["loss"] is this micro-batch's loss already divided by accumulate_grad_batches
        # (Lightning hands the hooks the normalised loss), so their sum is the step's mean loss.
        self._micro.append(outputs["loss"].detach().double())
        if (batch_idx + 1) % trainer.accumulate_grad_batches == 0 or trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            local = torch.stack(self._micro).sum()
            self._micro = []
            mean = trainer.strategy.reduce(local, reduce_op="mean")
            self.losses.append(float(mean))
            self.steps.append(int(trainer.global_step))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            params = {k: v.detach().double().flatten().tolist() for k, v in pl_module.state_dict().items()
                      if v.is_floating_point()}
            write_json_atomic(self.out / "trace.json", {
                "losses": self.losses, "steps": self.steps, "world_size": trainer.world_size, "params": params})


# ---------------------------------------------------------------------------------- retrieval metrics
def synthetic_groups(num_queries: int = 40, seed: int = 0) -> list[dict[str, Any]]:
    """Queries with 3..14 candidates, integer labels 0..3 (some queries with no relevant document,
    some with tied scores) and fixed scores."""
    g = torch.Generator().manual_seed(seed)
    groups = []
    for q in range(num_queries):
        n = int(torch.randint(3, 15, (1,), generator=g))
        labels = torch.randint(0, 4, (n,), generator=g).float()
        if q % 7 == 3:
            labels.zero_()
        scores = (labels + 1.5 * torch.randn(n, generator=g)).round(decimals=1)  # rounding makes ties
        groups.append({"query_index": q, "labels": labels.tolist(), "scores": scores.tolist()})
    return groups


def collate_groups(items: list[dict[str, Any]]) -> dict[str, Any]:
    n = max(len(it["labels"]) for it in items)
    labels = torch.zeros(len(items), n)
    scores = torch.zeros(len(items), n)
    mask = torch.zeros(len(items), n, dtype=torch.bool)
    for i, it in enumerate(items):
        k = len(it["labels"])
        labels[i, :k] = torch.tensor(it["labels"])
        scores[i, :k] = torch.tensor(it["scores"])
        mask[i, :k] = True
    return {"labels": labels, "scores": scores, "doc_mask": mask,
            "query_index": torch.tensor([it["query_index"] for it in items])}


class _ListDataset(Dataset):
    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]


class ScoredGroups(L.LightningDataModule):
    """Evaluation groups that carry their own scores (``num_queries`` must divide by the world size,
    or ``DistributedSampler`` pads a rank with duplicated queries)."""

    def __init__(self, num_queries: int = 40, eval_batch_size: int = 3, seed: int = 0) -> None:
        super().__init__()
        self.groups = synthetic_groups(num_queries, seed)
        self.eval_batch_size = eval_batch_size

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_ListDataset(self.groups), batch_size=self.eval_batch_size, collate_fn=collate_groups)

    test_dataloader = val_dataloader


class FixedScorer(L.LightningModule):
    """Logs ``val/ndcg@k``, ``val/mrr@k``, ``val/pnr`` of the scores in the data through
    :class:`kdlab.metrics.RankingMetrics`; also writes each rank's local query ids to ``out``."""

    def __init__(self, k: int = 10, out: str | None = None) -> None:
        super().__init__()
        from kdlab.metrics import RankingMetrics

        self.metrics = RankingMetrics(k=k)
        self.out = out
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[int] = []

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.seen += batch["query_index"].tolist()
        self.metrics.update(batch["scores"], batch["labels"], batch["doc_mask"], batch["query_index"])

    def on_validation_epoch_end(self) -> None:
        for name, value in self.metrics.compute().items():
            self.log(f"val/{name}", value.float())
        self.metrics.reset()
        if self.out:
            Path(self.out).mkdir(parents=True, exist_ok=True)
            (Path(self.out) / f"seen{self.global_rank}.json").write_text(json.dumps(sorted(self.seen)))

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        return torch.optim.SGD(self.parameters(), lr=0.0)


# ---------------------------------------------------------------------------------- a real stage
def labelled_ranking_file(source: str, out: str | Path, num_queries: int, min_negatives: int = 0,
                          max_docs: int | None = None, seed: int = 0) -> Path:
    """The first ``num_queries`` groups of ``source`` with at least ``min_negatives`` documents below
    the top label, each document given a synthetic ``teacher_score`` (label + seeded noise; the
    embedded sample has no teacher scores)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for line in Path(source).read_text().splitlines():
        row = json.loads(line)
        docs = row["docs"][:max_docs] if max_docs else row["docs"]
        labels = [d.get("label") or 0 for d in docs]
        if sum(y < max(labels) for y in labels) < max(min_negatives, 1):
            continue
        for d in docs:
            d["teacher_score"] = round(float(d.get("label") or 0) + float(torch.randn(1, generator=g)), 4)
        rows.append(json.dumps({**row, "docs": docs}))
        if len(rows) == num_queries:
            break
    path = Path(out)
    path.write_text("\n".join(rows) + "\n")
    return path

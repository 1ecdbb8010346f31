"""A/B measurements behind the main job's CPU-budget choices (docs/rank_sft_cpu.md, "Per second").

Given a finished main-job pipeline directory (its CPT export, data and labels), this prints, each
pair measured in one process with the two variants alternating batch by batch (so a slow spell of a
shared machine falls on both alike):

1. seconds per rank SFT step of the main job's teacher (16 layers, LoRA r 16, length chunks of 8,
   96 tokens) with LoRA dropout 0.05 and 0;
2. seconds per training step of the MiniLM student (the main job's batch: 8 groups of 4, 64
   tokens, the packed fast path) with MiniLM's dropout (0.1) and without;
3. teacher labeling of the first ``--label-queries`` labeled training queries in float32 and
   bfloat16 (twice each, alternating), and how far the bf16 scores are from the fp32 ones.

    python scripts/cpu_budget_ab.py runs/pipelines/disranker-quickstart/<run>
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np
import torch


def _step(model: Any, optimizer: torch.optim.Optimizer, batch: dict[str, Any]) -> float:
    started = time.perf_counter()
    model.batch_loss(batch).backward()
    optimizer.step()
    optimizer.zero_grad()
    return time.perf_counter() - started


def alternate(models: list[Any], batches: list[dict[str, Any]], rounds: int = 2) -> list[float]:
    """Mean seconds per step of each model, the models taking each batch in turn (after one warm-up)."""
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4) for m in models]
    for model, optimizer in zip(models, optimizers):
        model.train()
        _step(model, optimizer, batches[0])
    totals = [0.0] * len(models)
    for _ in range(rounds):
        for batch in batches:
            for i, (model, optimizer) in enumerate(zip(models, optimizers)):
                totals[i] += _step(model, optimizer, batch)
    return [t / (rounds * len(batches)) for t in totals]


def dropout_ab(what: str, data: dict[str, Any], build: Callable[[Any], Any], dropouts: tuple[Any, Any],
               names: tuple[str, str], steps: int) -> None:
    """Print the seconds per training step of a stage built by ``build(dropout)`` for each of the
    two ``dropouts``, on the main job's first ``steps`` batches (8 groups of 1 + 3 negatives,
    length-sorted), the two models taking each batch in turn."""
    from kdlab.data import RankingDataModule

    module = RankingDataModule(num_negatives=3, batch_size=8, bucket_by_length=True, **data)
    module.setup("fit")
    batches = [b for _, b in zip(range(steps), module.train_dataloader())]
    models = []
    for dropout in dropouts:
        torch.manual_seed(0)
        models.append(build(dropout))
    on, off = alternate(models, batches)
    print(f"{what} step: {names[0]} {on:.3f} s, {names[1]} {off:.3f} s, ratio {off / on:.3f}")


def teacher_dropout(run: Path, steps: int) -> None:
    from kdlab.stages import TeacherRankSFT

    dropout_ab("rank SFT", {"train": str(run / "data/ranking_train.jsonl"), "val": str(run / "data/ranking_val.jsonl"),
                            "tokenizer": "smollm2-135m", "text_format": "decoder", "max_length": 96},
               lambda dropout: TeacherRankSFT(backbone=str(run / "cpt/model"), num_layers=16, loss="listwise",
                                              lora_rank=16, lora_alpha=32.0, lr=1e-3, length_chunk_size=8,
                                              lora_dropout=dropout),
               (0.05, 0.0), ("LoRA dropout 0.05", "0"), steps)


def student_dropout(run: Path, steps: int) -> None:
    from kdlab.stages import RankDistillStudent

    dropout_ab("student", {"train": str(run / "labels/train.jsonl"), "val": str(run / "data/ranking_val.jsonl"),
                           "tokenizer": "minilm-l6", "text_format": "cross-encoder", "max_length": 64},
               lambda config: RankDistillStudent(backbone="minilm-l6", backbone_config=config, margin_pairs="all",
                                                 length_chunk_size=16, packed_forward=True, fused_adamw=True),
               (None, {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}),
               ("MiniLM dropout 0.1", "0"), steps)


def label_precision(run: Path, queries: int) -> None:
    from scipy.stats import kendalltau

    from kdlab.labeling import score_file

    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "queries.jsonl"
        source.write_text("".join((run / "data/ranking_train_labeled.jsonl").read_text().splitlines(True)[:queries]))
        seconds: dict[str, list[float]] = {}
        for dtype in ("float32", "bfloat16", "float32", "bfloat16"):
            started = time.perf_counter()
            score_file(str(run / "rank_sft_cpt/model"), str(source), str(Path(tmp) / f"{dtype}.jsonl"), resume=False,
                       max_tokens=2048, max_length=96, dtype=dtype, progress=False)
            seconds.setdefault(dtype, []).append(time.perf_counter() - started)
        groups = {dtype: [[d["teacher_score"] for d in json.loads(line)["docs"]]
                          for line in (Path(tmp) / f"{dtype}.jsonl").read_text().splitlines()]
                  for dtype in ("float32", "bfloat16")}
    fp32, bf16 = (np.array([s for g in groups[d] for s in g]) for d in ("float32", "bfloat16"))
    taus = [kendalltau(a, b)[0] for a, b in zip(groups["float32"], groups["bfloat16"])]
    print(f"labels of {queries} queries ({fp32.size} pairs): float32 {' / '.join(f'{s:.1f}' for s in seconds['float32'])} s, "
          f"bfloat16 {' / '.join(f'{s:.1f}' for s in seconds['bfloat16'])} s")
    print(f"bf16 vs fp32 scores: mean |diff| {np.abs(fp32 - bf16).mean():.4f}, max {np.abs(fp32 - bf16).max():.4f}, "
          f"fp32 std {fp32.std():.3f}, correlation {np.corrcoef(fp32, bf16)[0, 1]:.5f}, "
          f"mean per-query Kendall tau {np.mean(taus):.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a finished main-job pipeline directory")
    parser.add_argument("--teacher-steps", type=int, default=3)
    parser.add_argument("--student-steps", type=int, default=8)
    parser.add_argument("--label-queries", type=int, default=32)
    args = parser.parse_args()
    from kdlab.machine import describe_machine, machine_record

    print(describe_machine(machine_record()), f"torch threads {torch.get_num_threads()}")
    teacher_dropout(args.run, args.teacher_steps)
    student_dropout(args.run, args.student_steps)
    label_precision(args.run, args.label_queries)


if __name__ == "__main__":
    main()

"""Validation NDCG@10 / MRR@10 / PNR of an exported rank-SFT teacher on the batches its run
validates on: the figure a run's log lacks when its last step is not a validation step (e.g. an
ablation run whose ``val_check_interval`` counts batches within each epoch).

    python scripts/score_validation.py runs/real/rank-sft-cpu/<variant>/seed0/model --max-length 96 --batches 3

The data module is built as in ``experiments/real/disranker/rank_sft.yaml`` (``eval_batch_size`` 4,
so ``--batches 3`` is the 12 validation queries of ``--trainer.limit_val_batches=3``).
"""

from __future__ import annotations

import argparse

import torch

from kdlab.data import RankingDataModule
from kdlab.metrics import RankingMetrics
from kdlab.models.served import load_rank_teacher
from kdlab.stages._common import group_scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a TeacherRankSFT export (the run's model/ directory)")
    parser.add_argument("--max-length", type=int, default=96)
    parser.add_argument("--batches", type=int, default=3, help="validation batches of 4 queries")
    parser.add_argument("--eval-batch-size", type=int, default=4)
    args = parser.parse_args()
    ranker = load_rank_teacher(args.model)
    data = RankingDataModule(tokenizer=args.model, text_format=ranker.text_format, num_negatives=3,
                             eval_batch_size=args.eval_batch_size, max_length=args.max_length)
    data.setup("validate")
    metrics = RankingMetrics(k=10)
    with torch.no_grad():
        for index, batch in enumerate(data.val_dataloader()):
            if index == args.batches:
                break
            scores = group_scores(ranker(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]), batch)
            metrics.update(scores.float(), batch["labels"], batch["doc_mask"], batch["query_index"])
    values = {name: round(float(value), 4) for name, value in metrics.compute().items()}
    print(f"{args.model}: {values}")


if __name__ == "__main__":
    main()

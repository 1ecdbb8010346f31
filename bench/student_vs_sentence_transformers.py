"""Student training throughput: kdlab's RankDistillStudent vs sentence-transformers' CrossEncoder.

Both sides train the same cross-encoder student (the same initial weights: one seeded
``*ForSequenceClassification`` export that both load), on the same groups (1 positive + n negatives
per query, drawn once by kdlab's ``RankingTrainDataset``; synthetic teacher scores
``label + 0.5·N(0,1)`` unless ``--train`` gives a labeled file), with the same batch size (G groups
= G·(1+n) query-document pairs per step), max_length, fp32, AdamW (same lr, weight decay 0.01 on
matrices only, constant lr, no warmup, no gradient clipping), dropout on, and the same margin-MSE
loss ``mean_{g,j} ((s_pos − s_j) − (t_pos − t_j))²``:

* kdlab: ``RankDistillStudent(alpha=0, beta=1, length_chunk_size=--kdlab-chunk)`` +
  ``RankingDataModule`` through a Lightning ``Trainer`` (no logger, no checkpointing, no progress
  bar, no validation); ``--kdlab-chunk 0`` = the stage's default (one forward over all G·N rows,
  padded to the batch's longest row);
* sentence-transformers: ``CrossEncoder`` + ``losses.MarginMSELoss`` (identity activation: raw
  logits, like kdlab) through ``CrossEncoderTrainer`` (report_to none, no saving, no tqdm).

Each run is a fresh subprocess with ``torch.set_num_threads(--threads)``; the clock starts at the
end of step ``--warmup`` and stops at the end of the last step, so it covers data loading,
tokenization, forward, backward and the optimizer for ``--steps`` steps. Runs alternate
(kdlab, ST, ST, kdlab, …) ``--repeats`` times; the median of each is reported with the ratio.

    python bench/student_vs_sentence_transformers.py                      # MiniLM-L6 (minilm-l6 alias)
    python bench/student_vs_sentence_transformers.py --model tiny-bert    # quick run
    python bench/student_vs_sentence_transformers.py --train labeled.jsonl --steps 50 --batch-size 8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import _common  # noqa: E402  (puts the repo root on sys.path)

SCRIPT = Path(__file__).resolve()


# ------------------------------------------------------------------------------------------ children
def _groups(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The training items kdlab's dataset draws at epoch 0 (positive first, then n negatives)."""
    from kdlab.data.datamodules import RankingTrainDataset
    from kdlab.data.readers import read_ranking_jsonl

    ds = RankingTrainDataset(read_ranking_jsonl(args.data), args.num_negatives, seed=args.seed)
    return [ds[(i, 0)] for i in range(len(ds))]


def fed_tokens(attention_mask: Any, chunk: int) -> int:
    """Token positions the student's forward pays for: the padded batch, or with length chunking
    the rows sorted by length in chunks of ``chunk``, each cut to its longest row."""
    if chunk <= 0 or attention_mask.shape[0] <= chunk:
        return int(attention_mask.numel())
    lengths = sorted(int(n) for n in attention_mask.sum(dim=1))
    return sum(max(lengths[i:i + chunk]) * len(lengths[i:i + chunk]) for i in range(0, len(lengths), chunk))


def child_kdlab(args: argparse.Namespace) -> dict[str, Any]:
    import lightning as L

    from kdlab.data.datamodules import RankingDataModule
    from kdlab.stages.rank_distill_student import RankDistillStudent

    L.seed_everything(args.seed, verbose=False)
    dm = RankingDataModule(train=args.data, val=args.data, tokenizer=args.init_dir,
                           num_negatives=args.num_negatives, batch_size=args.batch_size,
                           max_length=args.max_length, seed=args.seed)
    stage = RankDistillStudent(backbone=args.init_dir, alpha=0.0, beta=1.0, lr=args.lr, weight_decay=0.01,
                               length_chunk_size=args.kdlab_chunk)
    # transformers' from_pretrained returns the model in eval mode and Lightning 2.6 keeps submodule
    # modes as they are, so as shipped the student would train with dropout OFF while the HF/ST
    # Trainer calls model.train(). Put it in train mode so both sides run the same computation.
    stage.train()
    eval_modules_as_shipped = int(args.kdlab_as_shipped)
    if args.kdlab_as_shipped:
        stage.ranker.model.eval()

    class Clock(L.Callback):
        def __init__(self) -> None:
            self.calls = 0
            self.t0 = self.t1 = 0.0
            self.pairs = 0
            self.tokens = 0

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
            self.calls += 1
            if self.calls == args.warmup:
                self.t0 = time.perf_counter()
            elif self.calls > args.warmup:
                self.t1 = time.perf_counter()
                self.pairs += int(batch["doc_mask"].sum())
                self.tokens += fed_tokens(batch["attention_mask"], args.kdlab_chunk)

    clock = Clock()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=args.warmup + args.steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, precision="32-true", callbacks=[clock])
    trainer.fit(stage, datamodule=dm)
    seconds = clock.t1 - clock.t0
    name = "kdlab (as shipped)" if eval_modules_as_shipped else "kdlab"
    return {"framework": name, "steps": clock.calls - args.warmup, "pairs": clock.pairs, "seconds": seconds,
            "pairs_per_s": clock.pairs / seconds, "padded_tokens_per_pair": clock.tokens / max(clock.pairs, 1)}


def child_st(args: argparse.Namespace) -> dict[str, Any]:
    import datasets
    import transformers
    from sentence_transformers.cross_encoder import CrossEncoder, CrossEncoderTrainer, CrossEncoderTrainingArguments
    from sentence_transformers.cross_encoder.losses import MarginMSELoss
    from torch import nn

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    items = _groups(args)
    n = args.num_negatives
    columns: dict[str, list[Any]] = {"query": [], "positive": [], **{f"negative_{j}": [] for j in range(1, n + 1)},
                                     "label": []}
    for it in items:
        texts = [f"{title} {body}".strip() for _, title, body in it["docs"]]
        columns["query"].append(it["query"])
        columns["positive"].append(texts[0])
        for j in range(1, n + 1):
            columns[f"negative_{j}"].append(texts[j])
        columns["label"].append([float(t) for t in it["teacher_scores"]])  # [t_pos, t_neg_1..n]
    train = datasets.Dataset.from_dict(columns)

    model = CrossEncoder(args.init_dir, num_labels=1, max_length=args.max_length, device="cpu")
    loss = MarginMSELoss(model, activation_fn=nn.Identity())
    out_dir = tempfile.mkdtemp(prefix="st-bench-")
    targs = CrossEncoderTrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=args.batch_size, max_steps=args.warmup + args.steps,
        learning_rate=args.lr, weight_decay=0.01, lr_scheduler_type="constant", warmup_steps=0,
        optim="adamw_torch", max_grad_norm=0.0, report_to="none", save_strategy="no", logging_strategy="no",
        eval_strategy="no", disable_tqdm=True, use_cpu=True, dataloader_num_workers=0, seed=args.seed,
        dataloader_drop_last=True,
    )

    class Clock(transformers.TrainerCallback):
        def __init__(self) -> None:
            self.calls = 0
            self.t0 = self.t1 = 0.0

        def on_step_end(self, targs, state, control, **kw):  # type: ignore[no-untyped-def]
            self.calls += 1
            if self.calls == args.warmup:
                self.t0 = time.perf_counter()
            elif self.calls > args.warmup:
                self.t1 = time.perf_counter()

    clock = Clock()
    trainer = CrossEncoderTrainer(model=model, args=targs, train_dataset=train, loss=loss, callbacks=[clock])
    trainer.train()
    seconds = clock.t1 - clock.t0
    steps = clock.calls - args.warmup
    pairs = steps * args.batch_size * (1 + n)
    return {"framework": "sentence-transformers", "steps": steps, "pairs": pairs, "seconds": seconds,
            "pairs_per_s": pairs / seconds}


# ------------------------------------------------------------------------------------------ parent
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="minilm-l6", help="student backbone (minilm-l6, tiny-bert, a path, ...)")
    p.add_argument("--train", default=None, help="ranking JSONL with teacher_score (default: embedded sample "
                                                  "ranking_train.jsonl + synthetic teacher scores)")
    p.add_argument("--batch-size", type=int, default=8, help="query groups per step")
    p.add_argument("--num-negatives", type=int, default=7)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--steps", type=int, default=30, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2, help="runs of each framework (alternating order)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dropout", choices=["on", "off"], default="on",
                   help="on: the model's dropout (0.1) on both sides; off: dropout 0 in the shared init config")
    p.add_argument("--kdlab-chunk", type=int, default=16,
                   help="RankDistillStudent(length_chunk_size=...): rows per length-sorted forward chunk (0 = off)")
    p.add_argument("--kdlab-as-shipped", action="store_true",
                   help="leave kdlab's pretrained student in eval mode (dropout silently off) as it ships today")
    p.add_argument("--child", choices=["kdlab", "st"], help=argparse.SUPPRESS)
    p.add_argument("--init-dir", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.child:
        _common.set_threads(args.threads)
        result = child_kdlab(args) if args.child == "kdlab" else child_st(args)
        _common.emit(result)
        return

    from kdlab.data import sample_path

    work = Path(tempfile.mkdtemp(prefix="kdlab-bench-student-"))
    src = args.train or sample_path("ranking_train.jsonl")
    data = work / "train_labeled.jsonl"
    kept = _common.synthetic_teacher_file(src, data, args.num_negatives, seed=args.seed)
    init_dir = _common.export_student_init(args.model, work / "student_init", seed=args.seed,
                                           no_dropout=args.dropout == "off")
    shared = ["--init-dir", init_dir, "--data", str(data), "--batch-size", str(args.batch_size),
              "--num-negatives", str(args.num_negatives), "--max-length", str(args.max_length),
              "--steps", str(args.steps), "--warmup", str(args.warmup), "--lr", str(args.lr),
              "--threads", str(args.threads), "--seed", str(args.seed), "--kdlab-chunk", str(args.kdlab_chunk)]
    if args.kdlab_as_shipped:
        shared.append("--kdlab-as-shipped")
    group = 1 + args.num_negatives
    print("settings:")
    print(f"  model={args.model}  data={src} ({kept['groups_kept']}/{kept['groups_in']} groups with "
          f"{args.num_negatives} negatives; teacher scores {'from file' if args.train else 'synthetic'})")
    print(f"  batch={args.batch_size} groups x {group} docs = {args.batch_size * group} pairs/step  "
          f"max_length={args.max_length}  fp32  AdamW lr={args.lr} wd=0.01  loss=margin-MSE  "
          f"dropout={args.dropout}{'  (kdlab as shipped: eval mode)' if args.kdlab_as_shipped else ''}")
    print(f"  kdlab: RankDistillStudent(alpha=0, beta=1, length_chunk_size={args.kdlab_chunk})")
    print(f"  steps={args.steps} timed after {args.warmup} warm-up  threads={args.threads}  repeats={args.repeats}")
    print(f"  machine: {_common.machine()}")
    runs: dict[str, list[dict[str, Any]]] = {"kdlab": [], "st": []}
    for r in range(args.repeats):
        for fw in (("kdlab", "st") if r % 2 == 0 else ("st", "kdlab")):
            res = _common.run_child(SCRIPT, ["--child", fw, *shared])
            runs[fw].append(res)
            extra = (f"  padded tokens/pair {res['padded_tokens_per_pair']:.1f}"
                     if "padded_tokens_per_pair" in res else "")
            print(f"  run {r + 1} {res['framework']:>21}: {res['pairs']} pairs in {res['seconds']:.2f} s "
                  f"= {res['pairs_per_s']:.1f} pairs/s{extra}", flush=True)
    kd = statistics.median(x["pairs_per_s"] for x in runs["kdlab"])
    st = statistics.median(x["pairs_per_s"] for x in runs["st"])
    print("result (median of runs, query-document pairs per second of training):")
    print(f"  kdlab RankDistillStudent (Lightning):        {kd:8.1f} samples/s")
    print(f"  sentence-transformers CrossEncoder+MarginMSE: {st:8.1f} samples/s")
    ratio = kd / st
    print(f"  ratio kdlab/ST = {ratio:.2f}x  (target >= 1.3x: {'met' if ratio >= 1.3 else 'MISSED'})")
    print(f"  machine load after: {_common.machine().split('load average ')[1]}")
    print(json.dumps({"kdlab_pairs_per_s": round(kd, 2), "st_pairs_per_s": round(st, 2), "ratio": round(ratio, 3)}))


if __name__ == "__main__":
    main()

"""Student training throughput: kdlab's RankDistillStudent vs sentence-transformers' CrossEncoder.

Both sides train the same cross-encoder student (the same initial weights: one seeded
``*ForSequenceClassification`` export that both load), on the same batches in the same order (1
positive + n negatives per query, drawn by kdlab's ``RankingDataModule`` for its first epoch; ST
gets those groups in that order with a sequential batch sampler; synthetic teacher scores
``label + 0.5·N(0,1)`` unless ``--train`` gives a labeled file), with the same batch size (G groups
= G·(1+n) query-document pairs per step), max_length, fp32, AdamW (same lr, weight decay 0.01 on
matrices only, constant lr, no warmup, no gradient clipping), dropout on, and the same margin-MSE
loss ``mean_{g,j} ((s_pos − s_j) − (t_pos − t_j))²``:

* kdlab: ``RankDistillStudent(alpha=0, beta=1)`` at the stage's defaults (the fast forward:
  packed BERT, attention in length-sorted chunks of ``length_chunk_size`` rows) +
  ``RankingDataModule`` through a Lightning ``Trainer`` (no logger, no checkpointing, no progress
  bar, no validation); ``--kdlab-chunk N`` / ``--kdlab-packed off`` override the stage's
  ``length_chunk_size`` / ``packed_forward`` (``--kdlab-chunk 0``: the plain forward, one padded
  forward over all G·N rows);
* sentence-transformers: ``CrossEncoder`` + ``losses.MarginMSELoss`` (identity activation: raw
  logits, like kdlab) through ``CrossEncoderTrainer`` (report_to none, no saving, no tqdm).

Each run is a fresh subprocess with ``torch.set_num_threads(--threads)``; the clock starts at the
end of step ``--warmup`` and stops at the end of the last step, so it covers data loading,
tokenization, forward, backward and the optimizer for ``--steps`` steps. Runs alternate
(kdlab, ST, ST, kdlab, …) ``--repeats`` times; the median of each is reported with the ratio of
the medians and the median of the per-repeat ratios ("paired": load from other jobs hits both
runs of a repeat alike). Each run also reports its CPU seconds (pairs per CPU-second) and its
achieved FLOP/s (``_common.forward_flops`` over the real lengths it fed, × 3 for a training step)
as a fraction of the fp32 matmul peak that the parent measures at the start and at the end.

    python bench/student_vs_sentence_transformers.py                      # MiniLM-L6 (minilm-l6 alias)
    python bench/student_vs_sentence_transformers.py --model tiny-bert    # quick run
    python bench/student_vs_sentence_transformers.py --train labeled.jsonl --steps 50 --batch-size 8
"""

from __future__ import annotations

import argparse
import inspect
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
TARGET = 1.5


# ------------------------------------------------------------------------------------------ children
def _groups(args: argparse.Namespace, in_batch_order: bool) -> list[dict[str, Any]]:
    """The training items of kdlab's first epoch (positive first, then n negatives): in dataset
    order, or (``in_batch_order``) in the order kdlab's data module yields them, batch after batch."""
    dm = _datamodule(args)
    dm.setup("fit")
    loader = dm.train_dataloader()
    if in_batch_order:
        return [loader.dataset[key] for keys in loader.batch_sampler for key in keys]
    return [loader.dataset[(i, 0)] for i in range(len(loader.dataset))]


def _datamodule(args: argparse.Namespace) -> Any:
    from kdlab.data.datamodules import RankingDataModule

    return RankingDataModule(train=args.data, val=args.data, tokenizer=args.init_dir, num_negatives=args.num_negatives,
                             batch_size=args.batch_size, max_length=args.max_length, seed=args.seed)


def fed_tokens(attention_mask: Any, chunk: int, packed: bool) -> int:
    """Token positions the student's matmuls pay for: the padded batch; with length chunking the
    rows sorted by length in chunks of ``chunk``, each cut to its longest row; packed: the real
    tokens (only attention is padded, per chunk)."""
    if chunk <= 0:
        return int(attention_mask.numel())
    if packed:
        return int(attention_mask.sum())
    if attention_mask.shape[0] <= chunk:
        return int(attention_mask.numel())
    lengths = sorted(int(n) for n in attention_mask.sum(dim=1))
    return sum(max(lengths[i:i + chunk]) * len(lengths[i:i + chunk]) for i in range(0, len(lengths), chunk))


def cpu_seconds() -> float:
    """User + system CPU time of this process (all threads)."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def child_kdlab(args: argparse.Namespace) -> dict[str, Any]:
    import lightning as L

    from kdlab.stages.rank_distill_student import RankDistillStudent, _packable

    overrides: dict[str, Any] = {}
    if args.kdlab_chunk is not None:
        overrides["length_chunk_size"] = args.kdlab_chunk
    if args.kdlab_packed is not None:
        overrides["packed_forward"] = args.kdlab_packed == "on"
    if args.kdlab_fused is not None:
        overrides["fused_adamw"] = args.kdlab_fused == "on"

    class Clock(L.Callback):
        def __init__(self) -> None:
            self.t0 = self.t1 = self.c0 = self.c1 = 0.0
            self.steps = self.pairs = self.tokens = 0
            self.lengths: list[int] = []

        def on_train_start(self, trainer, pl_module):  # type: ignore[no-untyped-def]
            self.chunk = int(pl_module.hparams.length_chunk_size)
            self.packed = (bool(pl_module.hparams.packed_forward) and self.chunk > 0
                           and _packable(pl_module.ranker.model))
            self.t0, self.c0 = time.perf_counter(), cpu_seconds()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
            self.t1, self.c1 = time.perf_counter(), cpu_seconds()
            self.steps += 1
            self.pairs += int(batch["doc_mask"].sum())
            self.tokens += fed_tokens(batch["attention_mask"], self.chunk, self.packed)
            self.lengths.extend(int(n) for n in batch["attention_mask"].sum(dim=1))

    def fit(steps: int, clock: Clock | None) -> RankDistillStudent:
        L.seed_everything(args.seed, verbose=False)
        stage = RankDistillStudent(backbone=args.init_dir, alpha=0.0, beta=1.0, lr=args.lr, weight_decay=0.01,
                                   **overrides)
        # Older checkouts: transformers' from_pretrained returned the model in eval mode and
        # Lightning keeps submodule modes, so the student trained with dropout off; train mode here.
        stage.train()
        if args.kdlab_as_shipped:
            stage.ranker.model.eval()
        trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                            num_sanity_val_steps=0, precision="32-true", callbacks=[clock] if clock else [])
        trainer.fit(stage, datamodule=_datamodule(args))
        return stage

    fit(args.warmup, None)  # untimed: imports, allocator, kernels, first-step set-up
    clock = Clock()
    stage = fit(args.steps, clock)
    chunk, packed = clock.chunk, clock.packed
    seconds = clock.t1 - clock.t0
    name = "kdlab (as shipped)" if args.kdlab_as_shipped else "kdlab"
    flops = _common.TRAIN_FACTOR * _common.forward_flops(stage.ranker.model, clock.lengths)
    return {"framework": name, "steps": clock.steps, "pairs": clock.pairs, "seconds": seconds,
            "pairs_per_s": clock.pairs / seconds, "cpu_s": clock.c1 - clock.c0, "flops": flops,
            "real_tokens_per_pair": sum(clock.lengths) / max(len(clock.lengths), 1),
            "padded_tokens_per_pair": clock.tokens / max(clock.pairs, 1),
            "forward": f"packed, attention chunks of {chunk}" if packed else
            (f"length chunks of {chunk}" if chunk > 0 else "plain (one padded forward)"),
            "optimizer": "AdamW fused" if stage.optimizers().optimizer.defaults.get("fused") else "AdamW"}


def child_st(args: argparse.Namespace) -> dict[str, Any]:
    import datasets
    import transformers
    from sentence_transformers.cross_encoder import CrossEncoder, CrossEncoderTrainer, CrossEncoderTrainingArguments
    from sentence_transformers.cross_encoder.losses import MarginMSELoss
    from torch import nn
    from torch.utils.data import BatchSampler, SequentialSampler

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    items = _groups(args, in_batch_order=args.same_batches)
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

    def in_order(dataset: Any, batch_size: int, drop_last: bool, **_: Any) -> Any:
        """``--same-batches``: kdlab's batches in kdlab's order (``_groups``), not ST's shuffled ones."""
        return BatchSampler(SequentialSampler(dataset), batch_size, drop_last)

    class Clock(transformers.TrainerCallback):
        def __init__(self) -> None:
            self.t0 = self.t1 = self.c0 = self.c1 = 0.0
            self.steps = 0
            self.lengths: list[int] = []
            self.padded = 0

        def on_train_begin(self, targs, state, control, **kw):  # type: ignore[no-untyped-def]
            self.t0, self.c0 = time.perf_counter(), cpu_seconds()

        def on_step_end(self, targs, state, control, **kw):  # type: ignore[no-untyped-def]
            self.t1, self.c1 = time.perf_counter(), cpu_seconds()
            self.steps += 1

    def fit(steps: int, clock: Clock | None) -> Any:
        model = CrossEncoder(args.init_dir, num_labels=1, max_length=args.max_length, device="cpu")
        loss = MarginMSELoss(model, activation_fn=nn.Identity())
        targs = CrossEncoderTrainingArguments(
            output_dir=tempfile.mkdtemp(prefix="st-bench-"), per_device_train_batch_size=args.batch_size,
            max_steps=steps, learning_rate=args.lr, weight_decay=0.01, lr_scheduler_type="constant", warmup_steps=0,
            optim=args.st_optim, max_grad_norm=0.0, report_to="none", save_strategy="no", logging_strategy="no",
            eval_strategy="no", disable_tqdm=True, use_cpu=True, dataloader_num_workers=0, seed=args.seed,
            dataloader_drop_last=True, **({"batch_sampler": in_order} if args.same_batches else {}),
        )
        hf_model = model[0].model  # CrossEncoder -> Transformer module -> *ForSequenceClassification
        if clock is not None:
            def record(module: Any, a: Any, kw: dict[str, Any]) -> None:  # the lengths the timed steps feed
                mask = kw.get("attention_mask", a[1] if len(a) > 1 else None)
                if mask is not None and module.training:
                    clock.lengths.extend(int(n) for n in mask.sum(dim=1))
                    clock.padded += int(mask.numel())

            # ST calls the HF model's forward method directly (no hooks fire there), which calls its
            # base model (BertModel) as a module: the hook goes there.
            hf_model.base_model.register_forward_pre_hook(record, with_kwargs=True)
        CrossEncoderTrainer(model=model, args=targs, train_dataset=train, loss=loss,
                            callbacks=[clock] if clock else []).train()
        return hf_model

    fit(args.warmup, None)  # untimed: imports, allocator, kernels, first-step set-up
    clock = Clock()
    hf_model = fit(args.steps, clock)
    seconds = clock.t1 - clock.t0
    pairs = clock.steps * args.batch_size * (1 + n)
    flops = _common.TRAIN_FACTOR * _common.forward_flops(hf_model, clock.lengths)
    return {"framework": "sentence-transformers", "steps": clock.steps, "pairs": pairs, "seconds": seconds,
            "pairs_per_s": pairs / seconds, "cpu_s": clock.c1 - clock.c0, "flops": flops,
            "real_tokens_per_pair": sum(clock.lengths) / max(len(clock.lengths), 1),
            "padded_tokens_per_pair": clock.padded / max(len(clock.lengths), 1), "optimizer": args.st_optim}


# ------------------------------------------------------------------------------------------ parent
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="minilm-l6", help="student backbone (minilm-l6, tiny-bert, a path, ...)")
    p.add_argument("--train", default=None, help="ranking JSONL with teacher_score (default: embedded sample "
                                                  "ranking_train.jsonl + synthetic teacher scores)")
    p.add_argument("--batch-size", type=int, default=8, help="query groups per step")
    p.add_argument("--num-negatives", type=int, default=7)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--steps", type=int, default=0,
                   help="timed steps (default 0 = one epoch: every group once, so both sides do the same work)")
    p.add_argument("--warmup", type=int, default=3, help="steps of an untimed training run first, in the same process")
    p.add_argument("--same-batches", action="store_true",
                   help="ST trains kdlab's batches in kdlab's order (default: each side batches its own default way: "
                        "kdlab length-bucketed, ST shuffled)")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2, help="runs of each framework (alternating order)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dropout", choices=["on", "off"], default="on",
                   help="on: the model's dropout (0.1) on both sides; off: dropout 0 in the shared init config")
    p.add_argument("--kdlab-chunk", type=int, default=None,
                   help="RankDistillStudent(length_chunk_size=...): rows per length-sorted chunk (0 = the plain "
                        "padded forward); default: the stage's default")
    p.add_argument("--kdlab-packed", choices=["on", "off"], default=None,
                   help="RankDistillStudent(packed_forward=...); default: the stage's default")
    p.add_argument("--kdlab-fused", choices=["on", "off"], default=None,
                   help="RankDistillStudent(fused_adamw=...); default: the stage's default")
    p.add_argument("--st-optim", default="adamw_torch",
                   help="ST's optim (HF TrainingArguments): adamw_torch (its default) or adamw_torch_fused")
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
    from kdlab.stages.rank_distill_student import RankDistillStudent

    peak_start = _common.matmul_peak_gflops(args.threads)
    work = Path(tempfile.mkdtemp(prefix="kdlab-bench-student-"))
    src = args.train or sample_path("ranking_train.jsonl")
    data = work / "train_labeled.jsonl"
    kept = _common.synthetic_teacher_file(src, data, args.num_negatives, seed=args.seed)
    epoch = kept["groups_kept"] // args.batch_size
    if args.steps <= 0:
        args.steps = epoch
    init_dir = _common.export_student_init(args.model, work / "student_init", seed=args.seed,
                                           no_dropout=args.dropout == "off")
    shared = ["--init-dir", init_dir, "--data", str(data), "--batch-size", str(args.batch_size),
              "--num-negatives", str(args.num_negatives), "--max-length", str(args.max_length),
              "--steps", str(args.steps), "--warmup", str(args.warmup), "--lr", str(args.lr),
              "--threads", str(args.threads), "--seed", str(args.seed), "--st-optim", args.st_optim]
    if args.same_batches:
        shared.append("--same-batches")
    if args.kdlab_fused is not None:
        shared += ["--kdlab-fused", args.kdlab_fused]
    if args.kdlab_chunk is not None:
        shared += ["--kdlab-chunk", str(args.kdlab_chunk)]
    if args.kdlab_packed is not None:
        shared += ["--kdlab-packed", args.kdlab_packed]
    if args.kdlab_as_shipped:
        shared.append("--kdlab-as-shipped")
    defaults = inspect.signature(RankDistillStudent).parameters
    chunk = args.kdlab_chunk if args.kdlab_chunk is not None else defaults["length_chunk_size"].default
    packed = (args.kdlab_packed == "on") if args.kdlab_packed is not None else defaults["packed_forward"].default
    fused = (args.kdlab_fused == "on") if args.kdlab_fused is not None else defaults["fused_adamw"].default
    stage_args = (f"length_chunk_size={chunk}, packed_forward={packed}, fused_adamw={fused}"
                  + ("  (the stage's defaults)" if (args.kdlab_chunk, args.kdlab_packed, args.kdlab_fused) == (None,) * 3
                     else ""))
    group = 1 + args.num_negatives
    print("settings:")
    print(f"  model={args.model}  data={src} ({kept['groups_kept']}/{kept['groups_in']} groups with "
          f"{args.num_negatives} negatives; teacher scores {'from file' if args.train else 'synthetic'})")
    print(f"  batch={args.batch_size} groups x {group} docs = {args.batch_size * group} pairs/step  "
          f"max_length={args.max_length}  fp32  AdamW lr={args.lr} wd=0.01  loss=margin-MSE  "
          f"dropout={args.dropout}{'  (kdlab as shipped: eval mode)' if args.kdlab_as_shipped else ''}")
    print(f"  kdlab: RankDistillStudent(alpha=0, beta=1, {stage_args})")
    print(f"  sentence-transformers: CrossEncoder + MarginMSELoss + CrossEncoderTrainer(optim={args.st_optim})")
    print(f"  steps={args.steps} timed ({'one epoch' if args.steps == epoch else f'an epoch is {epoch}'}), after an "
          f"untimed {args.warmup}-step run  threads={args.threads}  repeats={args.repeats}  batches: "
          + ("the same for both (kdlab's)" if args.same_batches else "each side's own (kdlab bucketed, ST shuffled)"))
    print(f"  machine: {_common.machine()}")
    print(f"  {_common.peak_line(peak_start, args.threads)}")
    print("  FLOPs: 3 x forward over the real tokens each side fed (bench/_common.py: forward_flops)", flush=True)
    runs: dict[str, list[dict[str, Any]]] = {"kdlab": [], "st": []}
    for r in range(args.repeats):
        for fw in (("kdlab", "st") if r % 2 == 0 else ("st", "kdlab")):
            res = _common.run_child(SCRIPT, ["--child", fw, *shared])
            runs[fw].append(res)
            print(f"  run {r + 1} {res['framework']:>21}: {res['pairs']} pairs in {res['seconds']:.2f} s "
                  f"= {res['pairs_per_s']:.1f} pairs/s  ({res['pairs'] / res['cpu_s']:.1f} pairs/CPU-s)  "
                  f"tokens/pair real {res['real_tokens_per_pair']:.1f}, fed to matmuls "
                  f"{res['padded_tokens_per_pair']:.1f}  {res['flops'] / res['seconds'] / 1e9:.1f} GFLOP/s", flush=True)
    peak_end = _common.matmul_peak_gflops(args.threads)
    peak = max(peak_start, peak_end)
    kd = statistics.median(x["pairs_per_s"] for x in runs["kdlab"])
    st = statistics.median(x["pairs_per_s"] for x in runs["st"])
    paired = statistics.median(a["pairs_per_s"] / b["pairs_per_s"] for a, b in zip(runs["kdlab"], runs["st"]))
    per_cpu = statistics.median((a["pairs"] / a["cpu_s"]) / (b["pairs"] / b["cpu_s"])
                                for a, b in zip(runs["kdlab"], runs["st"]))
    flops = {fw: statistics.median(x["flops"] / x["seconds"] for x in runs[fw]) for fw in runs}
    print("result (median of runs, query-document pairs per second of training):")
    print(f"  kdlab RankDistillStudent (Lightning):         {kd:8.1f} samples/s   "
          f"({runs['kdlab'][0]['forward']}: {runs['kdlab'][0]['padded_tokens_per_pair']:.1f} tokens/pair in the matmuls)")
    print(f"    {_common.flops_line(flops['kdlab'], 1.0, peak)}")
    print(f"  sentence-transformers CrossEncoder+MarginMSE: {st:8.1f} samples/s   "
          f"(per column of {args.batch_size} pairs: {runs['st'][0]['padded_tokens_per_pair']:.1f} tokens/pair)")
    print(f"    {_common.flops_line(flops['st'], 1.0, peak)}")
    ratio = kd / st
    print(f"  ratio kdlab/ST = {ratio:.2f}x of medians, {paired:.2f}x paired, {per_cpu:.2f}x per CPU-second  "
          f"(target >= {TARGET}x: {'met' if ratio >= TARGET and paired >= TARGET else 'MISSED'})")
    print(f"  fp32 matmul peak: {peak_start:.1f} GFLOP/s at the start, {peak_end:.1f} at the end "
          f"(the larger is the reference; a gap means the machine's load changed)")
    print(f"  machine load after: {_common.machine().split('load average ')[1]}")
    print(json.dumps({"kdlab_pairs_per_s": round(kd, 2), "st_pairs_per_s": round(st, 2), "ratio": round(ratio, 3),
                      "paired_ratio": round(paired, 3), "cpu_ratio": round(per_cpu, 3),
                      "kdlab_gflops": round(flops["kdlab"] / 1e9, 2), "st_gflops": round(flops["st"] / 1e9, 2),
                      "peak_gflops": round(peak, 2), "kdlab_forward": runs["kdlab"][0]["forward"]}))


if __name__ == "__main__":
    main()

"""Teacher labeling: score every (query, document) candidate once, and RRADistill listwise labels.

* :func:`score_file` — a ranker (a :class:`~kdlab.stages.TeacherRankSFT` export directory, a
  cross-encoder, or a ranker module) scores ranking data in any format and writes kdlab JSONL with a
  ``teacher_score`` per document: token-budget batches of length-sorted pairs, Lightning ``predict``
  on any accelerator and several devices (the same file from 1 or N processes), fp32 / bf16 / fp16
  or 8-bit / 4-bit through the teacher loader, a progress bar, and **resumable** after a kill
  (scored batches are appended to per-rank shards; ``output`` is written once, atomically).
RRADistill's listwise labels (an LLM orders the pre-ranker's top-k and bottom-k; omitted documents
become hard negatives) are :mod:`kdlab.listwise`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import nn
from torch.utils.data import DataLoader

from kdlab.data.collators import RankingCollator, TextFormat
from kdlab.data.readers import ranking_group_to_json, with_scores
from kdlab.data.sources import RankingSource, as_source, read_source
from kdlab.defaults import LABEL_BATCH_TOKENS, PAIR_MAX_LENGTH
from kdlab.errors import ConfigError
from kdlab.models.backbones import Quantization, load_tokenizer
from kdlab.models.served import check_teacher_options, load_teacher, text_format_of
from kdlab.protocols import attach_unregistered
from kdlab.runs import atomic_path

__all__ = ["score_file", "token_budget_batches"]


# ------------------------------------------------------------------------------------------ scoring
# ------------------------------------------------------------------------------------------ batches
def token_budget_batches(lengths: Sequence[int], max_tokens: int, max_rows: int | None = None) -> list[list[int]]:
    """Indices of ``lengths`` cut into batches of at most ``max_tokens`` padded tokens.

    Items are sorted by length (stable, so equal lengths keep input order) and packed greedily: a
    batch of ``r`` rows padded to its longest row ``L`` costs ``r · L`` tokens. A row longer than
    the budget gets a batch of its own. The batches depend only on the lengths and the budget —
    not on the number of processes — which is what makes 1 and N processes score identically.
    """
    if max_tokens < 1:
        raise ConfigError(f"max_tokens must be >= 1, got {max_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        widest = max(lengths[i], 1)  # sorted ascending: the new row is the widest so far
        full = (len(current) + 1) * widest > max_tokens or (max_rows is not None and len(current) >= max_rows)
        if current and full:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


class _ScoringModule(L.LightningModule):
    """Lightning wrapper that scores prebuilt batches with a frozen ranker (never a submodule: an
    8-bit model refuses ``.to()``; it is loaded on the rank's own device in ``setup``)."""

    def __init__(self, teacher: str | nn.Module, tokenizer: Any, text_format: str | None, max_length: int,
                 batches: list[list[tuple[int, int, dict[str, list[int]]]]], pending: list[int],
                 dtype: str, quantization: Quantization | None) -> None:
        super().__init__()
        self.source = teacher
        self.tokenizer = tokenizer
        self.text_format = text_format
        self.max_length = max_length
        self.batches = batches
        self.pending = pending
        self.dtype_name = dtype
        self.quantization = quantization
        attach_unregistered(self, "ranker", teacher if isinstance(teacher, nn.Module) else None)
        self.encoder: RankingCollator | None = None

    def setup(self, stage: str) -> None:
        device = self.trainer.strategy.root_device
        if self.ranker is None:
            attach_unregistered(self, "ranker", load_teacher(str(self.source), "ranker", dtype=self.dtype_name,
                                                             quantization=self.quantization, device=device))
        self.encoder = RankingCollator(self.tokenizer, text_format=self.text_format or self.ranker.text_format,
                                       max_length=self.max_length)

    def predict_dataloader(self) -> DataLoader:
        rank, world = self.trainer.global_rank, self.trainer.world_size
        mine = self.pending[rank::world]  # whole batches per rank: the same batches whatever the world size
        return DataLoader(mine, batch_size=None, shuffle=False, collate_fn=self._collate)

    def _collate(self, index: int) -> dict[str, Any]:
        rows = self.batches[index]
        assert self.encoder is not None
        return {"batch_index": index, "keys": [(g, j) for g, j, _ in rows],
                "inputs": self.encoder.pad([enc for _, _, enc in rows])}

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        device = next(iter(self.ranker.parameters())).device
        inputs = {key: value.to(device) for key, value in batch["inputs"].items()}
        with torch.no_grad():
            scores = self.ranker(**inputs).float().cpu().tolist()
        return {"batch_index": batch["batch_index"], "scores": [[g, j, float(s)] for (g, j), s in zip(batch["keys"], scores)]}


class _ShardWriter(BasePredictionWriter):
    """Appends each scored batch to this rank's shard ``<output>.partial/rank<r>.jsonl``: one line
    ``{"batch": i, "scores": [[group, doc, score], ...]}`` per batch, flushed at once and fsynced
    every ``sync_every`` batches and at the end, so a killed run loses at most the batches in flight."""

    def __init__(self, shard_dir: Path, progress: Any, on_batch: Callable[[int], None] | None, sync_every: int = 16) -> None:
        super().__init__(write_interval="batch")
        self.shard_dir = shard_dir
        self.progress = progress
        self.on_batch = on_batch
        self.sync_every = sync_every
        self._file: Any = None
        self._written = 0

    def write_on_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: Any,
                           batch_indices: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._file is None:
            self._file = open(self.shard_dir / f"rank{trainer.global_rank}.jsonl", "a", encoding="utf-8", newline="\n")
        self._file.write(json.dumps({"batch": prediction["batch_index"], "scores": prediction["scores"]}) + "\n")
        self._file.flush()
        self._written += 1
        if self._written % self.sync_every == 0:
            os.fsync(self._file.fileno())
        if self.progress is not None:
            self.progress.update(len(prediction["scores"]))
        if self.on_batch is not None:
            self.on_batch(self._written)

    def close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.close()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.close()


def _read_shards(shard_dir: Path) -> dict[int, list[list[float]]]:
    """Scored batches found in the shards, by batch index; a trailing line cut short by a kill is
    truncated away so appending continues from a clean line boundary."""
    done: dict[int, list[list[float]]] = {}
    for shard in sorted(shard_dir.glob("rank*.jsonl")):
        data = shard.read_bytes()
        cut = data.rfind(b"\n") + 1
        if cut != len(data):
            with open(shard, "r+b") as f:
                f.truncate(cut)
        for line in data[:cut].decode("utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                done[int(row["batch"])] = row["scores"]
    return done


def score_file(
    teacher: str | os.PathLike[str] | nn.Module,
    input_path: RankingSource | str,
    output_path: str,
    max_tokens: int = LABEL_BATCH_TOKENS,
    max_length: int = PAIR_MAX_LENGTH,
    resume: bool = True,
    *,
    tokenizer: str | None = None,
    text_format: TextFormat | None = None,
    accelerator: str = "auto",
    devices: int | str = 1,
    num_nodes: int = 1,
    dtype: str = "float32",
    quantization: Quantization | None = None,
    progress: bool = True,
    on_batch: Callable[[int], None] | None = None,
) -> int:
    """Write ``input_path``'s groups to ``output_path`` with a ``teacher_score`` on every document.

    ``input_path`` is a kdlab JSONL path or any :class:`~kdlab.data.sources.RankingSource`
    (MS MARCO / BEIR / TREC / FlagEmbedding files); the output is kdlab JSONL, in input order.

    How: every (query, document) pair is tokenized once, the pairs are sorted by length and packed
    into batches of at most ``max_tokens`` padded tokens (:func:`token_budget_batches`), and a
    Lightning ``predict`` scores them on ``accelerator`` × ``devices`` × ``num_nodes`` — with several
    processes each scores whole batches ``rank::world`` of the same list, so the file is the same,
    byte for byte, whatever the number of processes (several processes need the command line:
    ``python -m kdlab label --devices N``, which Lightning relaunches once per rank; on several
    machines, ``--num_nodes M`` under torchrun or SLURM's srun, which start every rank, with the
    output on a file system all nodes share: rank 0 merges the shards).

    Resumable: each scored batch is appended to ``<output>.partial/rank<r>.jsonl`` at once; a
    restart (``resume``) scores only the batches not found there — the same batches as before, so
    a resumed file equals an uninterrupted one byte for byte — and only a complete run writes
    ``output`` (atomically), so ``output`` is never half-written.

    Args:
        teacher: a ranker export directory (:func:`kdlab.models.served.load_rank_teacher`, loaded
            on each process's device with ``dtype`` / ``quantization`` through the teacher loader),
            or a ranker module (``DecoderRanker`` / ``SequenceClassificationRanker``) with ``tokenizer``.
        max_tokens: padded tokens per forward pass; max_length: tokens per (query, doc) text.
        text_format: override the teacher's input format (``decoder``: ``query: … document: …`` +
            EOS; ``decoder-prompt``: the yes/no relevance prompt of ``TeacherRankSFT(head_init="prompt")``;
            ``cross-encoder``: tokenizer pair) — the same encoding as the ranking collator. By default
            the teacher's own: the format its export records (``kdlab_score_head.json``).
        on_batch: called with the number of batches this process has written (tests use it to
            simulate an interruption).

    Returns the number of groups in the output.
    """
    from tqdm.auto import tqdm

    if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes < 1:
        raise ConfigError(f"num_nodes: expected an integer >= 1, got {num_nodes!r}")
    groups = read_source(as_source(input_path, "input"), "input").groups  # validated before the model loads
    if isinstance(teacher, nn.Module) and (not hasattr(teacher, "text_format") or tokenizer is None):
        raise TypeError("score_file takes a ranker export directory, or a ranker module "
                        "(kdlab.models.heads.DecoderRanker / SequenceClassificationRanker) and tokenizer=NAME")
    check_teacher_options("ranker", quantization)
    tok = load_tokenizer(str(tokenizer or teacher))
    fmt = text_format or (teacher.text_format if isinstance(teacher, nn.Module) else text_format_of(str(teacher)))
    encoder = RankingCollator(tok, text_format=fmt, max_length=max_length)
    rows = [(g, j, encoder.encode(group.query, doc.text)) for g, group in enumerate(groups)
            for j, doc in enumerate(group.docs)]
    order = token_budget_batches([len(r[2]["input_ids"]) for r in rows], max_tokens)
    batches = [[rows[i] for i in batch] for batch in order]

    out = Path(output_path)
    shard_dir = out.with_name(out.name + ".partial")
    if not resume and shard_dir.exists():
        shutil.rmtree(shard_dir)
    shard_dir.mkdir(parents=True, exist_ok=True)
    done = _read_shards(shard_dir)
    pending = [i for i in range(len(batches)) if i not in done]
    writer = _ShardWriter(shard_dir, None, on_batch)
    module = _ScoringModule(teacher, tok, fmt, max_length, batches, pending, dtype, quantization)
    distributed = _several(devices) or num_nodes > 1
    trainer = L.Trainer(accelerator=accelerator, devices=devices, num_nodes=num_nodes,
                        strategy="ddp" if distributed else "auto",
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False, callbacks=[writer])
    # The bar counts this process's own pairs (rank 0 shows its share when several run).
    mine = pending[trainer.global_rank::trainer.world_size]
    bar = tqdm(total=sum(len(batches[i]) for i in mine), desc="labeling", unit="doc",
               disable=not progress or trainer.global_rank != 0)
    writer.progress = bar
    was_training = teacher.training if isinstance(teacher, nn.Module) else None
    try:
        if pending:
            with warnings.catch_warnings():  # batches are prebuilt: there are no sampler indices to infer
                warnings.filterwarnings("ignore", message="Couldn't infer the batch indices")
                trainer.predict(module, return_predictions=False)
    finally:
        writer.close()
        bar.close()
        if was_training is not None:
            teacher.train(was_training)  # type: ignore[union-attr]
    if trainer.world_size > 1:
        trainer.strategy.barrier("kdlab-label-merge")
        if trainer.global_rank != 0:
            return len(groups)
    scores = _read_shards(shard_dir)
    missing = [i for i in range(len(batches)) if i not in scores]
    if missing:
        raise RuntimeError(f"{shard_dir}: {len(missing)} batches missing after labeling (first: {missing[0]})")
    table: list[list[float]] = [[math.nan] * len(group.docs) for group in groups]
    for batch_scores in scores.values():
        for g, j, s in batch_scores:
            table[int(g)][int(j)] = float(s)
    lines = []
    for group, row in zip(groups, table):
        docs = tuple(with_scores(d, teacher_score=s) for d, s in zip(group.docs, row))
        lines.append(json.dumps(ranking_group_to_json(replace(group, docs=docs)), ensure_ascii=False, allow_nan=False))
    with atomic_path(out) as tmp:
        tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    shutil.rmtree(shard_dir)
    return len(groups)


def _several(devices: int | str) -> bool:
    if isinstance(devices, int):
        return devices > 1 or devices == -1
    text = str(devices).strip()
    return text == "-1" or (text.isdigit() and int(text) > 1) or "," in text.strip(",")


def label_command(teacher: str, input: RankingSource | str, output: str,
                  mode: Literal["pointwise", "listwise"] = "pointwise", max_tokens: int = LABEL_BATCH_TOKENS,
                  max_length: int = PAIR_MAX_LENGTH, resume: bool = True, accelerator: str = "auto",
                  devices: int | str = 1, num_nodes: int = 1,
                  dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32",
                  quantization: Literal["8bit", "4bit"] | None = None, top_k: int = 10, bottom_k: int = 10,
                  queries_per_batch: int = 8, max_new_tokens: int = 64, reasons: bool = False,
                  reasons_llm: str | None = None, reason_max_new_tokens: int = 48) -> list[Path]:
    """Label ranking candidates with a teacher: pointwise scores, or RRADistill listwise labels.

    Args:
        teacher: pointwise: a ranker export directory (TeacherRankSFT, or a one-label cross-encoder);
            listwise: a causal LLM (alias, local directory or hub name).
        input: ranking groups: a kdlab JSONL path, or a source in any format
            (--input.format=beir --input.path=DIR --input.run=RUN, ...).
        output: where to write the labelled groups (kdlab JSONL).
        mode: pointwise (a teacher_score on every document) or listwise (the pre-ranker's top_k and
            bottom_k per query in one prompt; graded labels from the LLM's order, the documents it
            leaves out as hard negatives).
        max_tokens: pointwise: padded tokens per forward pass (pairs sorted by length and packed).
        max_length: pointwise: tokens per (query, doc) text.
        resume: continue from <output>.partial after an interruption.
        accelerator: cpu, gpu/cuda, mps or auto (Lightning's names).
        devices: how many devices (or which, e.g. "0,1"); pointwise runs data parallel on several
            and writes the same file as one.
        num_nodes: pointwise: machines, each with ``devices`` devices; start this command on every
            node with torchrun (``--nnodes M --nproc-per-node D``) or srun, which set the ranks
            (docs/cluster.md); the output must be on a file system every node sees.
        dtype: the teacher's compute dtype; auto: bfloat16 where the GPU or CPU runs it natively
            (AMX / AVX-512 BF16), else float32 (:func:`kdlab.machine.inference_dtype`).
        quantization: pointwise: load the teacher in 8-bit or 4-bit (bitsandbytes).
        top_k, bottom_k: listwise: the pre-ranker's best and worst documents shown to the LLM.
        queries_per_batch: listwise: prompts generated together.
        max_new_tokens: listwise: the length of the LLM's answer.
        reasons: listwise: after each query's ranking, a one-sentence reason per judged document
            (``reason`` beside its label; RRADistill's reasons for RRA-GPT), asked of ``reasons_llm``
            (default: the ranking LLM; the paper uses a smaller one) in ``reason_max_new_tokens``.
    """
    from kdlab.machine import inference_dtype

    dtype = inference_dtype(dtype, accelerator)[0]  # type: ignore[assignment]
    if mode != "listwise" and (reasons or reasons_llm is not None):
        raise ConfigError("--reasons / --reasons_llm: reasons are written by listwise labeling; add --mode listwise")
    if mode == "listwise":
        from kdlab.listwise import listwise_label_file

        if str(devices) not in ("1", "auto") or num_nodes != 1 or quantization is not None:
            raise ConfigError("listwise labeling runs on one device in full precision or --dtype; "
                              "drop --devices/--num_nodes/--quantization (several devices: label shards of the input)")
        device = {"cpu": "cpu", "gpu": "cuda", "cuda": "cuda", "mps": "mps"}.get(accelerator)
        count = listwise_label_file(teacher, input, output, top_k=top_k, bottom_k=bottom_k,
                                    batch_size=queries_per_batch, max_new_tokens=max_new_tokens, device=device,
                                    dtype=dtype, resume=resume, reasons=reasons, reasons_llm=reasons_llm,
                                    reason_max_new_tokens=reason_max_new_tokens)
    else:
        from kdlab.labeling import score_file

        count = score_file(teacher, input, output, max_tokens=max_tokens, max_length=max_length, resume=resume,
                           accelerator=accelerator, devices=devices, num_nodes=num_nodes, dtype=dtype,
                           quantization=quantization)
    if int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0:
        print(f"wrote {count} {mode}-labelled groups to {output}")
    return [Path(output)]

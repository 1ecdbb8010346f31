"""Collators (dynamic padding) and the length-bucketing batch sampler.

Batches are padded to the longest sequence *in the batch*, never to a global maximum: on CPU and
on GPUs alike, padding is wasted compute. Bucketing (grouping similar lengths) cuts it further.

The batch sampler yields ``(index, epoch)`` keys rather than bare indices, so a dataset can draw
per-epoch randomness (training negatives) from a generator seeded by (seed, epoch, index): the
result is identical across runs, across ``num_workers`` and across DDP world sizes for one index.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
from torch.utils.data import BatchSampler, Sampler

from kdlab.defaults import IGNORE_INDEX
from kdlab.models.backbones import pad_token_id
from kdlab.models.text_formats import (  # noqa: F401 - the collators' text formats, importable from here
    PROMPT_ANSWERS,
    REASON_PREFIX,
    RELEVANCE_PROMPT,
    TEXT_FORMATS,
    TextFormat,
    prompt_answer_ids,
)


class EpochSequentialSampler(Sampler[int]):
    """Indices ``0..n-1`` in order, with an ``epoch`` attribute that Lightning sets each epoch
    (it calls ``set_epoch`` on ``batch_sampler.sampler``). Under DDP Lightning swaps it for a
    ``DistributedSampler``, which has the same attribute; the batch sampler reads either."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.size))

    def __len__(self) -> int:
        return self.size


class BucketBatchSampler(BatchSampler):
    """Batches of dataset keys ``(index, epoch)``, optionally grouped by length.

    Per epoch: take the indices of ``sampler`` (this rank's shard under DDP, where Lightning
    injects a ``DistributedSampler`` through the ``sampler`` argument), shuffle them with a
    generator seeded by (seed, epoch) when ``shuffle``; when ``bucket``, cut them into chunks of
    ``batch_size * bucket_multiplier``, sort each chunk by length and cut it into batches; finally
    shuffle the batch order (again seeded). Same seed and epoch → same batches.

    ``world_size_invariant``: under DDP (the inner sampler is a ``DistributedSampler`` of W replicas),
    every rank draws the *global* batches that one process with ``batch_size · W`` would draw, from
    the whole dataset, and keeps items ``rank::W`` of each; so W ranks × ``batch_size`` see exactly
    the data of 1 rank × ``batch_size · W``, step by step (a final global batch with fewer than W
    items is dropped so that no rank gets an empty batch). Off, each rank shuffles and buckets its
    own shard: as good for training, but the data order then depends on W.
    """

    def __init__(
        self,
        sampler: Sampler[int] | Sequence[int],
        batch_size: int,
        drop_last: bool = False,
        *,
        lengths: Sequence[int],
        shuffle: bool = True,
        bucket: bool = True,
        seed: int = 0,
        bucket_multiplier: int = 50,
        world_size_invariant: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.sampler = sampler
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.lengths = list(lengths)
        self.shuffle = shuffle
        self.bucket = bucket
        self.seed = seed
        self.bucket_multiplier = bucket_multiplier
        self.world_size_invariant = world_size_invariant
        self._epoch = 0

    @property
    def epoch(self) -> int:
        return int(getattr(self.sampler, "epoch", self._epoch))

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch here and on the inner sampler (Lightning does the latter itself)."""
        self._epoch = epoch
        if callable(getattr(self.sampler, "set_epoch", None)):
            self.sampler.set_epoch(epoch)

    def _shard(self) -> tuple[int, int]:
        """(world size, rank) of the inner sampler: a ``DistributedSampler``'s, else (1, 0)."""
        return int(getattr(self.sampler, "num_replicas", 1)), int(getattr(self.sampler, "rank", 0))

    def batches(self) -> list[list[int]]:
        """This epoch's batches as lists of dataset indices."""
        epoch = self.epoch
        world, rank = self._shard()
        sharded_globally = self.world_size_invariant and world > 1
        if sharded_globally:
            indices, size = list(range(len(self.lengths))), self.batch_size * world
        else:
            indices, size = list(iter(self.sampler)), self.batch_size
        rng = random.Random(f"bucket:{self.seed}:{epoch}")
        if self.shuffle:
            rng.shuffle(indices)
        if self.bucket:
            chunk = size * max(1, self.bucket_multiplier)
            ordered: list[int] = []
            for start in range(0, len(indices), chunk):
                ordered.extend(sorted(indices[start:start + chunk], key=lambda i: (self.lengths[i], i)))
            indices = ordered
        batches = [indices[i:i + size] for i in range(0, len(indices), size)]
        if self.drop_last and batches and len(batches[-1]) < size:
            batches.pop()
        if self.shuffle and self.bucket:
            rng.shuffle(batches)
        if sharded_globally:
            batches = [batch[rank::world] for batch in batches if len(batch) >= world]
        return batches

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch = self.epoch
        for batch in self.batches():
            yield [(i, epoch) for i in batch]

    def __len__(self) -> int:
        if self.world_size_invariant and self._shard()[0] > 1:
            return len(self.batches())
        n = len(self.sampler)  # type: ignore[arg-type]
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)


def split_key(key: int | tuple[int, int]) -> tuple[int, int]:
    """``(index, epoch)`` from a sampler key; a bare index (plain samplers) means epoch 0."""
    if isinstance(key, tuple):
        return int(key[0]), int(key[1])
    return int(key), 0


def pad_sequences(seqs: Sequence[Sequence[int]], pad_value: int,
                  side: Literal["right", "left"] = "right") -> torch.Tensor:
    """Stack integer sequences into ``[B, T]`` padded to the longest one (``T >= 1``)."""
    width = max([len(s) for s in seqs] + [1])
    out = torch.full((len(seqs), width), pad_value, dtype=torch.long)
    for row, seq in enumerate(seqs):
        if not seq:
            continue
        values = torch.as_tensor(list(seq), dtype=torch.long)
        if side == "right":
            out[row, : len(seq)] = values
        else:
            out[row, width - len(seq):] = values
    return out


class CausalLMCollator:
    """Collate ``{"prompt_ids", "target_ids", "target_text"?}`` items into a causal-LM batch.

    ``input_ids = prompt + target`` right-padded; ``labels`` copy ``input_ids`` with
    ``IGNORE_INDEX`` on the prompt (unless ``loss_on_prompt``) and on padding. With ``with_prompts`` the batch also has
    ``prompt_input_ids``/``prompt_attention_mask`` LEFT-padded (so ``generate`` continues every row
    from its last real token) and ``target_text``.
    """

    def __init__(self, pad_token_id: int, *, loss_on_prompt: bool = False, with_prompts: bool = False) -> None:
        self.pad_token_id = pad_token_id
        self.loss_on_prompt = loss_on_prompt
        self.with_prompts = with_prompts

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        full = [list(it["prompt_ids"]) + list(it["target_ids"]) for it in items]
        labels_rows = []
        for it in items:
            prompt_labels = list(it["prompt_ids"]) if self.loss_on_prompt else [IGNORE_INDEX] * len(it["prompt_ids"])
            labels_rows.append(prompt_labels + list(it["target_ids"]))
        input_ids = pad_sequences(full, self.pad_token_id)
        attention_mask = pad_sequences([[1] * len(s) for s in full], 0)
        batch: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": pad_sequences(labels_rows, IGNORE_INDEX),
        }
        if self.with_prompts:
            prompts = [list(it["prompt_ids"]) for it in items]
            batch["prompt_input_ids"] = pad_sequences(prompts, self.pad_token_id, side="left")
            batch["prompt_attention_mask"] = pad_sequences([[1] * len(p) for p in prompts], 0, side="left")
            batch["target_text"] = [str(it.get("target_text", "")) for it in items]
        return batch


class RankingCollator:
    """Collate ranking groups into the contract batch (see DEVELOPERS.md, "Ranking groups").

    Items: ``{"query", "query_id", "query_index", "docs": [(doc_id, title, body)], "labels",
    "teacher_scores" (list, NaN = missing) }``. Groups shorter than N (``group_size`` if given, else
    the batch's largest group) are padded with ``doc_mask=False`` slots whose text is the query with
    an empty document — real tokens, so no row is all-padding (an all-masked attention row gives NaN
    in some attention kernels). Tokenizing here (not in ``setup``) keeps memory flat for large runs.

    ``cross-encoder`` text: ``tokenizer(query, title + " " + body)`` (``[CLS] q [SEP] d [SEP]``,
    with token_type_ids). ``decoder`` text: ``query: {q} document: {title} {body}`` + EOS, encoded
    without special tokens; rows are right-padded, so the score token is at ``attention_mask.sum(-1) - 1``.
    ``decoder-prompt`` text (``TeacherRankSFT(head_init="prompt")``): :data:`RELEVANCE_PROMPT` with the
    query and ``{title} {body}``, encoded without special tokens and with no EOS, so the score token is
    the prompt's last one; a prompt over ``max_length`` tokens has its document cut (never the question
    after it), see :meth:`encode`.

    ``reason_max_length > 0`` (``decoder`` text; RRA-GPT): a document with a ``reason`` gets
    ``REASON_PREFIX + reason`` (at most ``reason_max_length`` tokens) and EOS appended after its
    ranking tokens, in the same row. The batch then has ``score_positions [B]`` (each row's ranking
    EOS: a causal model's state there sees only the ranking input, exactly as when served) and
    ``reason_labels [B, T]`` (the appended tokens, ``IGNORE_INDEX`` elsewhere).
    """

    def __init__(self, tokenizer: Any, text_format: TextFormat = "cross-encoder",
                 max_length: int = 128, group_size: int | None = None, with_teacher_scores: bool = False,
                 reason_max_length: int = 0) -> None:
        if text_format not in TEXT_FORMATS:
            raise ValueError(f"text_format must be one of {', '.join(map(repr, TEXT_FORMATS))}, got {text_format!r}")
        if text_format == "decoder" and tokenizer.eos_token_id is None:
            raise ValueError("the decoder text format needs a tokenizer with an EOS token")
        self.tokenizer = tokenizer
        self.text_format = text_format
        self.max_length = max_length
        self.group_size = group_size
        self.with_teacher_scores = with_teacher_scores
        if reason_max_length and text_format != "decoder":
            raise ValueError(f"reasons are appended to 'decoder' text only, not {text_format!r}")
        self.reason_max_length = reason_max_length

    def encode(self, query: str, doc_text: str) -> dict[str, list[int]]:
        """Token ids (and token types for cross-encoders) of one (query, document) pair."""
        if self.text_format == "cross-encoder":
            enc = self.tokenizer(query, doc_text, truncation=True, max_length=self.max_length)
            out = {"input_ids": list(enc["input_ids"])}
            if "token_type_ids" in enc:
                out["token_type_ids"] = list(enc["token_type_ids"])
            return out
        if self.text_format == "decoder-prompt":
            return {"input_ids": self._prompt_ids(query, doc_text)}
        text = f"query: {query} document: {doc_text}".rstrip()
        ids = self.tokenizer(text, add_special_tokens=False, truncation=True,
                             max_length=max(1, self.max_length - 1))["input_ids"]
        return {"input_ids": list(ids) + [self.tokenizer.eos_token_id]}

    def _prompt_ids(self, query: str, doc_text: str) -> list[int]:
        """Ids of :data:`RELEVANCE_PROMPT` (no special tokens), at most ``max_length``.

        A prompt that is too long keeps its question: the document is cut to its first ``k`` tokens
        (decoded back to text, so the ids stay the plain tokenization of one string) with ``k``
        lowered until the whole prompt fits; only when even an empty document does not fit (a very
        long query) are the prompt's last ``max_length`` tokens kept.
        """
        tok = self.tokenizer

        def ids_of(document: str) -> list[int]:
            text = RELEVANCE_PROMPT.format(query=query, document=document)
            return list(tok(text, add_special_tokens=False, verbose=False)["input_ids"])

        ids = ids_of(doc_text)
        over = len(ids) - self.max_length
        if over <= 0:
            return ids
        doc_ids = list(tok(doc_text, add_special_tokens=False, verbose=False)["input_ids"])
        keep = len(doc_ids)
        while over > 0 and keep > 0:
            keep = max(0, keep - over)
            ids = ids_of(tok.decode(doc_ids[:keep], skip_special_tokens=True).strip() if keep else "")
            over = len(ids) - self.max_length
        return ids if over <= 0 else ids[-self.max_length:]

    def pad(self, encodings: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        """``input_ids`` / ``attention_mask`` (and ``token_type_ids`` when every encoding has them)
        of :meth:`encode` outputs, right-padded to the longest: the model inputs of a pair batch."""
        batch = {
            "input_ids": pad_sequences([e["input_ids"] for e in encodings], pad_token_id(self.tokenizer)),
            "attention_mask": pad_sequences([[1] * len(e["input_ids"]) for e in encodings], 0),
        }
        if all("token_type_ids" in e for e in encodings):
            batch["token_type_ids"] = pad_sequences([e["token_type_ids"] for e in encodings], 0)
        return batch

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        n = self.group_size or max(len(it["docs"]) for it in items)
        encodings: list[dict[str, list[int]]] = []
        labels = torch.zeros(len(items), n, dtype=torch.float32)
        doc_mask = torch.zeros(len(items), n, dtype=torch.bool)
        teacher = torch.full((len(items), n), float("nan"), dtype=torch.float32)
        doc_ids: list[list[str]] = []
        reasons: list[list[int]] = []
        for g, it in enumerate(items):
            docs = list(it["docs"])[:n]
            item_reasons = it.get("reasons") if self.reason_max_length else None
            ids = []
            for j in range(n):
                reason = None
                if j < len(docs):
                    doc_id, title, body = docs[j]
                    reason = item_reasons[j] if item_reasons else None
                    encodings.append(self.encode(it["query"], f"{title} {body}".strip()))
                    labels[g, j] = float(it["labels"][j])
                    teacher[g, j] = float(it["teacher_scores"][j])
                    doc_mask[g, j] = True
                    ids.append(doc_id)
                else:
                    encodings.append(self.encode(it["query"], ""))
                    ids.append("")
                reasons.append(self._reason_ids(reason) if reason else [])
            doc_ids.append(ids)
        batch: dict[str, Any] = self._reason_rows(encodings, reasons) if self.reason_max_length else dict(self.pad(encodings))
        batch["labels"] = labels
        batch["doc_mask"] = doc_mask
        if self.with_teacher_scores:
            batch["teacher_scores"] = teacher
        batch["query_index"] = torch.tensor([int(it["query_index"]) for it in items], dtype=torch.long)
        batch["group_size"] = n
        batch["doc_ids"] = doc_ids
        batch["query_ids"] = [str(it["query_id"]) for it in items]
        return batch

    def _reason_ids(self, reason: str) -> list[int]:
        ids = self.tokenizer(REASON_PREFIX + reason, add_special_tokens=False, truncation=True,
                             max_length=self.reason_max_length)["input_ids"]
        return [*ids, self.tokenizer.eos_token_id]

    def _reason_rows(self, encodings: list[dict[str, list[int]]], reasons: list[list[int]]) -> dict[str, Any]:
        """Model inputs of RRA-GPT rows: each encoding followed by its reason's ids (class docstring)."""
        rows = [e["input_ids"] + r for e, r in zip(encodings, reasons)]
        return {
            "input_ids": pad_sequences(rows, pad_token_id(self.tokenizer)),
            "attention_mask": pad_sequences([[1] * len(row) for row in rows], 0),
            "score_positions": torch.tensor([len(e["input_ids"]) - 1 for e in encodings], dtype=torch.long),
            "reason_labels": pad_sequences([[IGNORE_INDEX] * len(e["input_ids"]) + r for e, r in zip(encodings, reasons)],
                                           IGNORE_INDEX),
        }


__all__ = [
    "IGNORE_INDEX", "PROMPT_ANSWERS", "REASON_PREFIX", "RELEVANCE_PROMPT", "TEXT_FORMATS", "BucketBatchSampler", "CausalLMCollator",
    "EpochSequentialSampler", "RankingCollator", "TextFormat", "pad_sequences", "prompt_answer_ids", "split_key",
]

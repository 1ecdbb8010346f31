"""LightningDataModules for click logs (CPT), ranking groups (rank SFT / distillation) and seq2seq
(KETCHUP). Every ``__init__`` argument is typed, so LightningCLI exposes it as
``--data.init_args.<name>``; every path defaults to the embedded sample so configs run offline.

Files are read and validated in ``setup()`` — a malformed file raises :class:`DataFormatError`
(file:line:field) before the first training step. Loaders use :class:`BucketBatchSampler`: its
``sampler`` argument is where Lightning injects a ``DistributedSampler`` under DDP, so each rank
gets its own shard and batches stay deterministic from (seed, epoch).
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
from torch.utils.data import DataLoader, Dataset

from kdlab.data.collators import (
    BucketBatchSampler,
    CausalLMCollator,
    EpochSequentialSampler,
    RankingCollator,
    TextFormat,
    split_key,
)
from kdlab.data.embedded import sample_path
from kdlab.data.readers import (
    SEQ2SEQ_FIELDS,
    ClickRecord,
    RankingGroup,
    Seq2SeqFields,
    Seq2SeqPair,
    read_clicks_jsonl,
    read_seq2seq_jsonl,
)
from kdlab.data.sources import RankingSource, as_source, read_source
from kdlab.errors import ConfigError
from kdlab.models.backbones import pad_token_id


def load_data_tokenizer(name: str) -> Any:
    """The tokenizer for ``name`` through the one backbone loader (``tiny-*`` → sample tokenizer)."""
    from kdlab.models.backbones import load_tokenizer

    return load_tokenizer(name)


def _make_loader(dataset: Dataset, collate: Any, lengths: Sequence[int], batch_size: int, *,
                 shuffle: bool, bucket: bool, seed: int, num_workers: int,
                 world_size_invariant: bool = False) -> DataLoader:
    sampler = BucketBatchSampler(EpochSequentialSampler(len(lengths)), batch_size, False,
                                 lengths=lengths, shuffle=shuffle, bucket=bucket, seed=seed,
                                 world_size_invariant=world_size_invariant)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers,
                      persistent_workers=False)


# --------------------------------------------------------------------------------------------------
# Ranking


def _group_lengths(groups: Sequence[RankingGroup]) -> list[int]:
    """A character-count proxy of each group's longest (query, document) pair, for bucketing
    (exact token counts would mean tokenizing every pair up front)."""
    return [len(g.query) + max(len(d.text) for d in g.docs) for g in groups]


def split_paths(kind: str, **given: str | None) -> dict[str, str]:
    """Each split's file: the one given, else the embedded sample's ``<kind>_<split>.jsonl``.

    ``predict`` falls back to the test file (given or sample)."""
    paths = {split: path or sample_path(f"{kind}_{split}.jsonl") for split, path in given.items() if split != "predict"}
    if "predict" in given:
        paths["predict"] = given["predict"] or paths["test"]
    return paths


class RankingTrainDataset(Dataset):
    """Training groups: 1 positive + ``num_negatives`` negatives (``positive-vs-negatives``), or all
    candidates in file order (``all``). Missing labels count as 0.

    The positive is a document with the group's highest label (ties broken at random); negatives are
    drawn without replacement from documents with a strictly lower label. The generator is seeded by
    (seed, epoch, query index), so the draw is the same on every run, worker and rank. Groups whose
    documents all share one label carry no ranking signal and are skipped (``skipped`` counts them).
    """

    def __init__(self, groups: Sequence[RankingGroup], num_negatives: int = 7,
                 sampling: Literal["positive-vs-negatives", "all"] = "positive-vs-negatives", seed: int = 0) -> None:
        if num_negatives < 0:
            raise ValueError(f"num_negatives must be >= 0, got {num_negatives}")
        self.num_negatives = num_negatives
        self.sampling = sampling
        self.seed = seed
        self.entries: list[tuple[int, RankingGroup]] = []
        for index, g in enumerate(groups):
            labels = [d.label or 0.0 for d in g.docs]
            if max(labels) > min(labels):
                self.entries.append((index, g))
        self.skipped = len(groups) - len(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, epoch = split_key(key)
        query_index, g = self.entries[index]
        docs = list(g.docs)
        if self.sampling == "positive-vs-negatives":
            rng = random.Random(f"negatives:{self.seed}:{epoch}:{query_index}")
            labels = [d.label or 0.0 for d in docs]
            top = max(labels)
            positive = rng.choice([d for d, y in zip(docs, labels) if y == top])
            pool = [d for d, y in zip(docs, labels) if y < top]
            negatives = rng.sample(pool, min(self.num_negatives, len(pool)))
            docs = [positive] + negatives
        return _group_item(g, query_index, docs)


class RankingEvalDataset(Dataset):
    """Evaluation groups: every candidate of a query in file order (the first ``max_docs`` if set)."""

    def __init__(self, groups: Sequence[RankingGroup], max_docs: int | None = None) -> None:
        self.groups = list(groups)
        self.max_docs = max_docs

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, _ = split_key(key)
        g = self.groups[index]
        docs = list(g.docs)[: self.max_docs] if self.max_docs else list(g.docs)
        return _group_item(g, index, docs)


def _group_item(g: RankingGroup, query_index: int, docs: Sequence[Any]) -> dict[str, Any]:
    return {
        "query": g.query, "query_id": g.query_id, "query_index": query_index,
        "docs": [(d.id, d.title, d.body) for d in docs],
        "labels": [d.label if d.label is not None else 0.0 for d in docs],
        "teacher_scores": [d.teacher_score if d.teacher_score is not None else math.nan for d in docs],
        "reasons": [d.reason for d in docs],
    }


class RankingDataModule(L.LightningDataModule):
    """Ranking groups for cross-encoder or decoder rankers (batch contract: DEVELOPERS.md).

    ``train``/``val``/``test``/``predict`` are :class:`~kdlab.data.sources.RankingSource` values — a
    format and its files (``{format: msmarco, collection: ..., queries: ..., qrels: ..., run: ...}``)
    — or a plain path, which means a kdlab JSONL file; left ``None`` they read the embedded sample
    (``ranking_{train,val,test}.jsonl``; predict → test). ``batch_size``/``eval_batch_size`` count
    query groups, so a training step sees ``batch_size * (1 + num_negatives)`` sequences.
    ``world_size_invariant``: under DDP the W ranks together train on exactly the batches of one
    process with ``batch_size · W`` (:class:`~kdlab.data.collators.BucketBatchSampler`), e.g. to
    check that 1 and 2 ranks agree.
    ``text_format`` (:class:`~kdlab.data.collators.RankingCollator`): ``cross-encoder`` (a BERT pair),
    ``decoder`` (``query: … document: …`` + EOS) or ``decoder-prompt`` (the yes/no relevance prompt
    that ``TeacherRankSFT(head_init="prompt")`` reads).
    ``reasons`` (``decoder`` text, RRA-GPT): training rows carry each document's LLM ``reason`` after
    its ranking tokens, at most ``reason_max_length`` tokens (:class:`~kdlab.data.collators.RankingCollator`);
    evaluation rows never do.
    """

    def __init__(
        self,
        train: RankingSource | str | None = None,
        val: RankingSource | str | None = None,
        test: RankingSource | str | None = None,
        predict: RankingSource | str | None = None,
        tokenizer: str = "tiny-bert",
        text_format: TextFormat = "cross-encoder",
        num_negatives: int = 7,
        train_group_sampling: Literal["positive-vs-negatives", "all"] = "positive-vs-negatives",
        eval_max_docs: int | None = None,
        batch_size: int = 8,
        eval_batch_size: int = 8,
        max_length: int = 128,
        bucket_by_length: bool = True,
        world_size_invariant: bool = False,
        seed: int = 0,
        num_workers: int = 0,
        reasons: bool = False,
        reason_max_length: int = 48,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if reasons and text_format != "decoder":
            raise ConfigError(f"data.init_args.reasons: reasons train decoder students (text_format: decoder), "
                              f"not {text_format!r}")
        if reason_max_length < 1:
            raise ConfigError(f"data.init_args.reason_max_length: expected an integer >= 1, got {reason_max_length}")
        self.reasons = reasons
        self.reason_max_length = reason_max_length
        for name, value in (("num_negatives", num_negatives), ("eval_max_docs", eval_max_docs or 1)):
            if value < 0 or (name == "eval_max_docs" and value < 1):
                raise ConfigError(f"data.init_args.{name}: expected an integer >= {0 if name == 'num_negatives' else 1}, "
                                  f"got {value}")
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size),
                            ("max_length", max_length)):
            if value < 1:
                raise ConfigError(f"data.init_args.{name}: expected an integer >= 1, got {value}")
        self.world_size_invariant = world_size_invariant
        self.sources = {split: as_source(value, f"data.{split}", sample=f"ranking_{split}.jsonl")
                        for split, value in (("train", train), ("val", val), ("test", test))}
        self.sources["predict"] = as_source(predict, "data.predict") if predict is not None else self.sources["test"]
        self.tokenizer_name = tokenizer
        self.text_format = text_format
        self.num_negatives = num_negatives
        self.train_group_sampling = train_group_sampling
        self.eval_max_docs = eval_max_docs
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.max_length = max_length
        self.bucket_by_length = bucket_by_length
        self.seed = seed
        self.num_workers = num_workers
        self.tokenizer: Any = None
        self.groups: dict[str, list[RankingGroup]] = {}
        self.first_stage: dict[str, dict[str, Any]] = {}

    def data_record(self) -> dict[str, Any]:
        """Each split read so far: its source, its first stage and its size (for the run record)."""
        return {split: {"source": dataclasses.asdict(self.sources[split]), "first_stage": self.first_stage.get(split, {}),
                        "queries": len(groups), "pairs": sum(len(g.docs) for g in groups)}
                for split, groups in self.groups.items()}

    def source_label(self, split: str) -> str:
        """The user's main file of ``split``, for messages."""
        return self.sources[split].label()

    def check_inputs(self, stage: str | None = None) -> None:
        """Read and validate every file ``stage`` will read (all splits when ``None``), and check
        the options against the data — before any model loads (the CLI calls this first)."""
        needed = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}
        for split in needed.get(stage or "", ("train", "val", "test")):
            if split not in self.groups:
                data = read_source(self.sources[split], f"data.{split}")
                self.groups[split], self.first_stage[split] = data.groups, data.first_stage
        if "train" in self.groups and self.train_group_sampling == "positive-vs-negatives" and self.num_negatives:
            largest = max(len(g.docs) for g in self.groups["train"])
            if self.num_negatives > largest - 1:
                raise ConfigError(f"data.init_args.num_negatives={self.num_negatives}, but no query of "
                                  f"{self.source_label('train')} has more than {largest - 1} negatives "
                                  f"({largest} candidates); lower num_negatives or raise the source's top_k")

    def setup(self, stage: str | None = None) -> None:
        """Read (and validate) the files the stage needs; load the tokenizer once."""
        self.check_inputs(stage)
        if self.tokenizer is None:
            self.tokenizer = load_data_tokenizer(self.tokenizer_name)

    def has_teacher_scores(self, split: str) -> bool:
        """Whether any document of ``split`` carries a ``teacher_score``."""
        return any(d.teacher_score is not None for g in self.groups[split] for d in g.docs)

    def has_reasons(self, split: str) -> bool:
        """Whether any document of ``split`` carries an LLM ``reason``."""
        return any(d.reason for g in self.groups[split] for d in g.docs)

    def _collator(self, split: str, group_size: int | None) -> RankingCollator:
        return RankingCollator(self.tokenizer, self.text_format, self.max_length, group_size,
                               with_teacher_scores=self.has_teacher_scores(split),
                               reason_max_length=self.reason_max_length if self.reasons and split == "train" else 0)

    def train_dataloader(self) -> DataLoader:
        dataset = RankingTrainDataset(self.groups["train"], self.num_negatives, self.train_group_sampling, self.seed)
        if len(dataset) == 0:
            raise ConfigError(f"{self.source_label('train')}: no query has two documents with different labels; "
                              "nothing to train a ranker on")
        group_size = 1 + self.num_negatives if self.train_group_sampling == "positive-vs-negatives" else None
        lengths = _group_lengths([g for _, g in dataset.entries])
        return _make_loader(dataset, self._collator("train", group_size), lengths, self.batch_size,
                            shuffle=True, bucket=self.bucket_by_length, seed=self.seed, num_workers=self.num_workers,
                            world_size_invariant=self.world_size_invariant)

    def _eval_loader(self, split: str) -> DataLoader:
        groups = self.groups[split]
        return _make_loader(RankingEvalDataset(groups, self.eval_max_docs), self._collator(split, None),
                            _group_lengths(groups), self.eval_batch_size, shuffle=False,
                            bucket=self.bucket_by_length, seed=self.seed, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader("predict")


# --------------------------------------------------------------------------------------------------
# Causal LM: click logs and seq2seq


class TokenizedDataset(Dataset):
    """Pre-tokenized items (``prompt_ids``, ``target_ids``, ...); keys may be ``(index, epoch)``."""

    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        return self.items[split_key(key)[0]]

    def lengths(self) -> list[int]:
        return [len(it["prompt_ids"]) + len(it["target_ids"]) for it in self.items]


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


class _PromptTargetDataModule(L.LightningDataModule):
    """What the causal-LM data modules share: tokenizer loading, per-split tokenized datasets read in
    ``setup()``, and length-bucketed loaders of :class:`CausalLMCollator` batches.

    A subclass keeps its own typed ``__init__`` (LightningCLI reads the arguments from it), calls
    ``save_hyperparameters()`` there and then :meth:`_configure`; it supplies ``encode`` (one record →
    ``prompt_ids``/``target_ids``) and ``read`` (a split's file → records). ``world_size_invariant``
    makes the training data order independent of the DDP world size (see ``RankingDataModule``).
    """

    with_prompts = False  # also emit left-padded prompts + target text (generation / RL)
    stage_splits: dict[str, tuple[str, ...]] = {"fit": ("train", "val"), "validate": ("val",)}

    def _configure(self, paths: dict[str, str], tokenizer: str, loss_on_prompt: bool, batch_size: int,
                   eval_batch_size: int, bucket_by_length: bool, world_size_invariant: bool, seed: int,
                   num_workers: int) -> None:
        self.world_size_invariant = world_size_invariant
        self.paths = paths
        self.tokenizer_name = tokenizer
        self.loss_on_prompt = loss_on_prompt
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.bucket_by_length = bucket_by_length
        self.seed = seed
        self.num_workers = num_workers
        self.tokenizer: Any = None
        self.datasets: dict[str, TokenizedDataset] = {}

    def encode(self, record: Any) -> dict[str, Any]:  # pragma: no cover - overridden
        raise NotImplementedError

    def read(self, path: str) -> Sequence[Any]:  # pragma: no cover - overridden
        raise NotImplementedError

    def _splits(self, stage: str | None) -> tuple[str, ...]:
        every = tuple(dict.fromkeys(s for splits in self.stage_splits.values() for s in splits if s != "predict"))
        return self.stage_splits.get(stage or "", every)

    def check_inputs(self, stage: str | None = None) -> None:
        """Read and validate every file ``stage`` will read, before any model loads (the CLI calls
        this first; a bad line fails here with file:line, not after a model has loaded)."""
        for split in self._splits(stage):
            self.read(self.paths[split])

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is None:
            self.tokenizer = load_data_tokenizer(self.tokenizer_name)
        for split in self._splits(stage):
            if split not in self.datasets:
                self.datasets[split] = TokenizedDataset([self.encode(r) for r in self.read(self.paths[split])])

    def _loader(self, split: str, shuffle: bool, batch_size: int) -> DataLoader:
        ds = self.datasets[split]
        collate = CausalLMCollator(pad_token_id(self.tokenizer), loss_on_prompt=self.loss_on_prompt,
                                   with_prompts=self.with_prompts)
        return _make_loader(ds, collate, ds.lengths(), batch_size, shuffle=shuffle, bucket=self.bucket_by_length,
                            seed=self.seed, num_workers=self.num_workers,
                            world_size_invariant=self.world_size_invariant and split == "train")

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True, self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False, self.eval_batch_size)


class ClickLogDataModule(_PromptTargetDataModule):
    """Causal-LM batches for continued pre-training on click logs: the prompt is the query
    (``prompt_template``), the target the clicked title + summary (``target_template``) + EOS.
    ``labels`` are ``IGNORE_INDEX`` on the prompt (unless ``loss_on_prompt``) and on padding. Sequences longer
    than ``max_length`` keep the prompt (cut to half of ``max_length`` if needed) and cut the target.
    Validation batches have ``batch_size`` sequences too.
    """

    read = staticmethod(read_clicks_jsonl)

    def __init__(
        self,
        train_path: str | None = None,
        val_path: str | None = None,
        tokenizer: str = "tiny-llama",
        max_length: int = 128,
        loss_on_prompt: bool = False,
        prompt_template: str = "query: {query}\n",
        target_template: str = "{title}\n{summary}",
        batch_size: int = 16,
        bucket_by_length: bool = True,
        world_size_invariant: bool = False,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if max_length < 4:
            raise ValueError(f"max_length must be >= 4, got {max_length}")
        for name, template, keys in (("prompt_template", prompt_template, ("query",)),
                                     ("target_template", target_template, ("title", "summary"))):
            try:
                template.format(**{k: "" for k in keys})
            except (KeyError, IndexError, ValueError) as err:
                raise ValueError(f"{name} {template!r} may only use {{{'}, {'.join(keys)}}}: {err}") from None
        self._configure(split_paths("clicks", train=train_path, val=val_path), tokenizer, loss_on_prompt,
                        batch_size, batch_size, bucket_by_length, world_size_invariant, seed, num_workers)
        self.max_length = max_length
        self.prompt_template = prompt_template
        self.target_template = target_template

    def encode(self, record: ClickRecord) -> dict[str, Any]:
        """Prompt and target token ids of one click (target ends with EOS)."""
        tok = self.tokenizer
        prompt = _ids(tok, self.prompt_template.format(query=record.query))
        prompt = prompt[: self.max_length // 2] if len(prompt) + 2 > self.max_length else prompt
        target = _ids(tok, self.target_template.format(title=record.title, summary=record.summary))
        target = target[: self.max_length - len(prompt) - 1] + [tok.eos_token_id]
        return {"prompt_ids": prompt, "target_ids": target}


class Seq2SeqDataModule(_PromptTargetDataModule):
    """Source → target pairs as causal-LM batches (for CE/KD warm-up) plus what generation and RL
    need: ``prompt_input_ids``/``prompt_attention_mask`` LEFT-padded and ``target_text``.

    The prompt is ``prompt_template`` with the source cut to ``max_source_length`` tokens (the
    template's text around ``{source}`` is kept whole); the target is cut to ``max_target_length``
    tokens and ends with EOS (``target_text``, what generations are scored against, is never cut).
    Paths left ``None`` read the embedded sample; predict → test.

    Files are ``{"source", "target"}`` JSONL or GSM8K's own ``{"question", "answer"}`` JSONL
    (``fields``, as :func:`~kdlab.data.readers.read_seq2seq_jsonl`; ``auto`` tells them apart).
    For GSM8K use e.g. ``prompt_template: "Question: {source}\\nAnswer:"`` (**[code]** the released
    KETCHUP template ``templates/reasoning_T0.txt``; its summarisation and translation templates are
    ``"summarize: {source}"`` and ``"translate English to Dutch: {source}"``) and a
    ``max_target_length`` long enough to keep the final ``#### N`` (GSM8K solutions run to ~200
    tokens), or CE training never sees the answer line.
    """

    with_prompts = True
    stage_splits = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}

    def __init__(
        self,
        train_path: str | None = None,
        val_path: str | None = None,
        test_path: str | None = None,
        predict_path: str | None = None,
        tokenizer: str = "tiny-llama",
        prompt_template: str = "summarize: {source}\nsummary:",
        max_source_length: int = 96,
        max_target_length: int = 32,
        loss_on_prompt: bool = False,
        batch_size: int = 16,
        eval_batch_size: int = 16,
        bucket_by_length: bool = True,
        world_size_invariant: bool = False,
        seed: int = 0,
        num_workers: int = 0,
        fields: Seq2SeqFields = "auto",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if fields != "auto" and fields not in SEQ2SEQ_FIELDS:
            raise ValueError(f"fields must be 'auto' or one of {sorted(SEQ2SEQ_FIELDS)}, got {fields!r}")
        if prompt_template.count("{source}") != 1:
            raise ValueError(f"prompt_template must contain '{{source}}' exactly once, got {prompt_template!r}")
        if max_source_length < 1 or max_target_length < 1:
            raise ValueError("max_source_length and max_target_length must be >= 1")
        paths = split_paths("seq2seq", train=train_path, val=val_path, test=test_path, predict=predict_path)
        self._configure(paths, tokenizer, loss_on_prompt, batch_size, eval_batch_size, bucket_by_length,
                        world_size_invariant, seed, num_workers)
        self.prompt_template = prompt_template
        self.max_source_length = max_source_length
        self.max_target_length = max_target_length
        self.fields: Seq2SeqFields = fields

    def read(self, path: str) -> list[Seq2SeqPair]:
        """A split's pairs (:func:`~kdlab.data.readers.read_seq2seq_jsonl` with ``fields``)."""
        return read_seq2seq_jsonl(path, self.fields)

    def encode(self, pair: Seq2SeqPair) -> dict[str, Any]:
        """Prompt ids (template prefix + truncated source + suffix) and target ids + EOS."""
        tok = self.tokenizer
        prefix, suffix = self.prompt_template.split("{source}")
        prompt = _ids(tok, prefix) + _ids(tok, pair.source)[: self.max_source_length] + _ids(tok, suffix)
        target = _ids(tok, pair.target)[: self.max_target_length] + [tok.eos_token_id]
        return {"prompt_ids": prompt, "target_ids": target, "target_text": pair.target}

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False, self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", False, self.eval_batch_size)


__all__ = [
    "ClickLogDataModule", "RankingDataModule", "RankingEvalDataset", "RankingTrainDataset",
    "Seq2SeqDataModule", "TokenizedDataset", "load_data_tokenizer",
]

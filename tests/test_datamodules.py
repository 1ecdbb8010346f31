"""Data modules and collators: the batch contract, dynamic padding, deterministic bucketing and
sampling, label masking for causal LMs, left-padded prompts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch.utils.data.distributed import DistributedSampler

from kdlab.data.collators import BucketBatchSampler, EpochSequentialSampler, RankingCollator, pad_sequences
from kdlab.data.datamodules import ClickLogDataModule, RankingDataModule, Seq2SeqDataModule
from kdlab.data.readers import DataFormatError
from kdlab.defaults import IGNORE_INDEX
from kdlab.errors import ConfigError
from kdlab.models.backbones import load_tokenizer, pad_token_id


@pytest.fixture(scope="module")
def ranking() -> RankingDataModule:
    dm = RankingDataModule(batch_size=4, eval_batch_size=3, num_negatives=3)
    dm.setup("fit")
    dm.setup("test")
    return dm


def test_ranking_train_batch_contract(ranking: RankingDataModule) -> None:
    batch = next(iter(ranking.train_dataloader()))
    g, n = 4, 4
    assert batch["group_size"] == n
    t = batch["input_ids"].shape[1]
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert batch[key].shape == (g * n, t) and batch[key].dtype == torch.long
    assert batch["labels"].shape == (g, n) and batch["labels"].dtype == torch.float32
    assert batch["doc_mask"].dtype == torch.bool and batch["doc_mask"].all()
    assert batch["query_index"].shape == (g,) and batch["query_index"].dtype == torch.long
    assert "teacher_scores" not in batch  # the sample has none
    assert len(batch["query_ids"]) == g and all(len(ids) == n for ids in batch["doc_ids"])
    # positive first, negatives strictly lower
    assert (batch["labels"][:, :1] > batch["labels"][:, 1:]).all()
    # dynamic padding: the longest row fills the width exactly
    assert batch["attention_mask"].sum(1).max() == t
    # cross-encoder pairs: [CLS] ... [SEP] ... [SEP], second segment typed 1
    tok = ranking.tokenizer
    row = batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
    assert row[0] == tok.cls_token_id and row[-1] == tok.sep_token_id and row.count(tok.sep_token_id) == 2
    assert batch["token_type_ids"][0].max() == 1


def test_ranking_eval_uses_all_candidates_and_pads_groups(ranking: RankingDataModule) -> None:
    groups = ranking.groups["test"]
    seen = 0
    for batch in ranking.test_dataloader():
        n = batch["group_size"]
        assert batch["input_ids"].shape[0] == len(batch["query_ids"]) * n
        for gi, q in enumerate(batch["query_index"].tolist()):
            k = len(groups[q].docs)
            assert batch["doc_mask"][gi].sum() == k
            assert batch["doc_ids"][gi][:k] == [d.id for d in groups[q].docs]
            assert not batch["doc_mask"][gi, k:].any() and (batch["labels"][gi, k:] == 0).all()
            seen += 1
    assert seen == len(groups)
    # padded slots still hold real tokens (no all-masked attention rows)
    assert (batch["attention_mask"].sum(1) > 0).all()


def test_training_sampling_is_deterministic_and_changes_with_epoch(ranking: RankingDataModule) -> None:
    def epoch_batches(dm: RankingDataModule, epoch: int) -> list:
        loader = dm.train_dataloader()
        loader.batch_sampler.set_epoch(epoch)
        return [(b["query_ids"], b["doc_ids"]) for b in loader][:5]

    other = RankingDataModule(batch_size=4, num_negatives=3)
    other.setup("fit")
    assert epoch_batches(ranking, 0) == epoch_batches(other, 0)
    assert epoch_batches(ranking, 0) != epoch_batches(ranking, 1)
    reseeded = RankingDataModule(batch_size=4, num_negatives=3, seed=1)
    reseeded.setup("fit")
    assert epoch_batches(ranking, 0) != epoch_batches(reseeded, 0)


def test_ranking_collator_pad_is_the_pair_batcher(ranking: RankingDataModule) -> None:
    """``RankingCollator.pad`` batches encoded (query, doc) pairs: right padding with the tokenizer's
    pad id, and it is what the group batches are made of."""
    batch = next(iter(ranking.test_dataloader()))
    group = ranking.groups["test"][int(batch["query_index"][0])]
    collator = RankingCollator(ranking.tokenizer, "cross-encoder", max_length=ranking.max_length)
    encodings = [collator.encode(group.query, doc.text) for doc in group.docs]
    padded = collator.pad(encodings)
    lengths = [len(e["input_ids"]) for e in encodings]
    assert set(padded) == {"input_ids", "attention_mask", "token_type_ids"}
    assert padded["input_ids"].shape == (len(encodings), max(lengths))
    assert padded["attention_mask"].sum(1).tolist() == lengths
    pad = pad_token_id(ranking.tokenizer)
    for row, (encoding, n) in enumerate(zip(encodings, lengths)):
        assert padded["input_ids"][row, :n].tolist() == encoding["input_ids"]
        assert padded["token_type_ids"][row, :n].tolist() == encoding["token_type_ids"]
        assert (padded["input_ids"][row, n:] == pad).all() and not padded["attention_mask"][row, n:].any()
    # the first group of the collated batch holds exactly these rows (padded to the batch's width)
    k, width = len(encodings), max(lengths)
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert torch.equal(batch[key][:k, :width], padded[key]), key
    assert (batch["attention_mask"][:k, width:] == 0).all()
    decoder = RankingCollator(load_tokenizer("tiny-llama"), "decoder", max_length=32)
    assert set(decoder.pad([decoder.encode("q", "a doc"), decoder.encode("q", "b")])) == {"input_ids", "attention_mask"}


def test_teacher_scores_nan_where_missing(tmp_path: Path) -> None:
    rows = [{"query_id": "a", "query": "open file", "docs": [
        {"id": "1", "text": "opens a file", "label": 1, "teacher_score": 2.5},
        {"id": "2", "text": "closes a socket", "label": 0}]}]
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dm = RankingDataModule(train=str(path), val=str(path), num_negatives=3, train_group_sampling="all")
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    assert batch["teacher_scores"][0, 0] == 2.5 and math.isnan(batch["teacher_scores"][0, 1])
    train = next(iter(dm.train_dataloader()))
    assert train["group_size"] == 2 and train["labels"].tolist() == [[1.0, 0.0]]


def test_ranking_fewer_docs_than_negatives_padded(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    small = {"query": "q", "docs": [{"id": "1", "text": "a", "label": 1}, {"id": "2", "text": "b", "label": 0}]}
    large = {"query": "r", "docs": [{"id": str(i), "text": f"doc {i}", "label": int(i == 0)} for i in range(4)]}
    path.write_text(json.dumps(small) + "\n" + json.dumps(large) + "\n")
    dm = RankingDataModule(train=str(path), val=str(path), num_negatives=3, bucket_by_length=False)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert sorted(batch["doc_mask"].tolist()) == [[True, True, False, False], [True, True, True, True]]
    assert batch["input_ids"].shape[0] == 8
    # no group at all can give 3 negatives: a config mistake, said before anything trains
    path.write_text(json.dumps(small) + "\n")
    with pytest.raises(ConfigError, match=r"num_negatives=3, but no query of .*r.jsonl has more than 1 negatives"):
        RankingDataModule(train=str(path), val=str(path), num_negatives=3).setup("fit")


def test_decoder_format_ends_with_eos() -> None:
    dm = RankingDataModule(tokenizer="tiny-llama", text_format="decoder", batch_size=2, num_negatives=1)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert "token_type_ids" not in batch
    last = batch["attention_mask"].sum(1) - 1
    eos = dm.tokenizer.eos_token_id
    assert (batch["input_ids"][torch.arange(batch["input_ids"].shape[0]), last] == eos).all()
    assert dm.tokenizer.decode(batch["input_ids"][0][: int(last[0])]).strip().startswith("query:")


def test_malformed_file_fails_in_setup(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"query": "q", "docs": [{"id": "1", "text": "a", "label": "high"}]}\n')
    dm = RankingDataModule(train=str(path))
    with pytest.raises(DataFormatError, match=r"bad\.jsonl:1: field 'docs\[0\]\.label': expected a number"):
        dm.setup("fit")


def test_click_batches_mask_prompt_and_padding() -> None:
    dm = ClickLogDataModule(batch_size=8)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == mask.shape == labels.shape
    assert (labels[mask == 0] == IGNORE_INDEX).all()
    eos, pad = dm.tokenizer.eos_token_id, dm.tokenizer.pad_token_id
    for row in range(ids.shape[0]):
        length = int(mask[row].sum())
        assert mask[row, :length].all() and not mask[row, length:].any()  # right padding
        assert ids[row, length - 1] == eos and labels[row, length - 1] == eos
        n_prompt = int((labels[row, :length] == IGNORE_INDEX).sum())
        assert n_prompt > 0 and (labels[row, n_prompt:length] == ids[row, n_prompt:length]).all()
        assert (ids[row, length:] == pad).all()
    assert mask.sum(1).max() == ids.shape[1]  # padded to the batch's longest only
    prompt_only = (labels[0] == IGNORE_INDEX) & mask[0].bool()
    assert dm.tokenizer.decode(ids[0][prompt_only]).strip().startswith("query:")


def test_click_loss_on_prompt() -> None:
    dm = ClickLogDataModule(batch_size=4, loss_on_prompt=True)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    real = batch["attention_mask"].bool()
    assert (batch["labels"][real] == batch["input_ids"][real]).all()
    assert (batch["labels"][~real] == IGNORE_INDEX).all()


def test_click_max_length_truncates() -> None:
    dm = ClickLogDataModule(batch_size=16, max_length=24)
    dm.setup("fit")
    for batch in dm.train_dataloader():
        assert batch["input_ids"].shape[1] <= 24


def test_seq2seq_prompts_left_padded() -> None:
    dm = Seq2SeqDataModule(batch_size=6, max_source_length=16, max_target_length=8)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    p_ids, p_mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
    assert p_ids.shape == p_mask.shape and len(batch["target_text"]) == p_ids.shape[0]
    tok = dm.tokenizer
    suffix = tok("\nsummary:", add_special_tokens=False)["input_ids"]
    for row in range(p_ids.shape[0]):
        length = int(p_mask[row].sum())
        width = p_ids.shape[1]
        assert not p_mask[row, : width - length].any() and p_mask[row, width - length:].all()  # left padding
        assert p_ids[row, -len(suffix):].tolist() == suffix  # every prompt ends at the right edge
        n_prompt = int((batch["labels"][row] == IGNORE_INDEX).sum() - (1 - batch["attention_mask"][row]).sum())
        assert batch["input_ids"][row, :n_prompt].tolist() == p_ids[row, width - length:].tolist()
    assert (batch["labels"] != IGNORE_INDEX).sum(1).max() <= 9  # target ≤ 8 tokens + EOS
    with pytest.raises(ValueError, match="exactly once"):
        Seq2SeqDataModule(prompt_template="no placeholder")


def test_seq2seq_reads_gsm8k_jsonl_directly() -> None:
    gsm = Path(__file__).parent / "data" / "gsm8k_tiny.jsonl"
    answers = [json.loads(line)["answer"] for line in gsm.read_text(encoding="utf-8").splitlines()]
    dm = Seq2SeqDataModule(train_path=str(gsm), val_path=str(gsm), test_path=str(gsm), batch_size=6,
                           eval_batch_size=6, prompt_template="Question: {source}\nAnswer:", max_target_length=96)
    dm.check_inputs("fit")
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    assert sorted(batch["target_text"]) == sorted(answers)  # the whole solution, "#### N" included
    tok = dm.tokenizer
    prefix = tok("Question:", add_special_tokens=False)["input_ids"]
    suffix = tok("\nAnswer:", add_special_tokens=False)["input_ids"]
    for row in range(batch["prompt_input_ids"].shape[0]):
        length = int(batch["prompt_attention_mask"][row].sum())
        prompt = batch["prompt_input_ids"][row, -length:].tolist()
        assert prompt[: len(prefix)] == prefix and prompt[-len(suffix):] == suffix
        target = batch["labels"][row][batch["labels"][row] != IGNORE_INDEX].tolist()
        assert target[-1] == tok.eos_token_id
        last_line = batch["target_text"][row].rsplit("\n", 1)[-1]  # "#### 6"
        assert last_line.startswith("#### ") and tok.decode(target[:-1]).endswith(last_line)  # not cut off
    # the fields option, and a file in the other layout under it: file:line:field before any model loads
    assert len(Seq2SeqDataModule(train_path=str(gsm), fields="question-answer").read(str(gsm))) == 6
    strict = Seq2SeqDataModule(train_path=str(gsm), fields="source-target")
    with pytest.raises(DataFormatError, match=r"gsm8k_tiny\.jsonl:1: field 'source': .*the fields option chose"):
        strict.check_inputs("fit")
    with pytest.raises(ValueError, match="fields must be"):
        Seq2SeqDataModule(fields="qa")  # type: ignore[arg-type]


def test_bucket_sampler_deterministic_grouped_and_complete() -> None:
    lengths = [(i * 37) % 101 for i in range(200)]

    def make(seed: int) -> BucketBatchSampler:
        return BucketBatchSampler(EpochSequentialSampler(200), 8, lengths=lengths, seed=seed, bucket_multiplier=5)

    a, b = make(0), make(0)
    assert a.batches() == b.batches()
    a.set_epoch(1)
    assert a.batches() != b.batches() and a.epoch == 1
    assert a.batches() != make(1).batches()
    flat = sorted(i for batch in a.batches() for i in batch)
    assert flat == list(range(200)) and len(a) == 25
    spread = sum(max(lengths[i] for i in bt) - min(lengths[i] for i in bt) for bt in a.batches()) / 25
    plain = BucketBatchSampler(EpochSequentialSampler(200), 8, lengths=lengths, bucket=False)
    plain_spread = sum(max(lengths[i] for i in bt) - min(lengths[i] for i in bt) for bt in plain.batches()) / 25
    assert spread < plain_spread / 3
    assert next(iter(a))[0][1] == 1  # keys carry the epoch


def test_bucket_sampler_shards_under_distributed_sampler() -> None:
    lengths = list(range(50))
    shards = []
    for rank in range(2):
        inner = DistributedSampler(range(50), num_replicas=2, rank=rank, shuffle=True, seed=3)
        sampler = BucketBatchSampler(inner, 4, lengths=lengths, seed=0)
        sampler.set_epoch(2)
        assert inner.epoch == 2
        shards.append([i for bt in sampler.batches() for i in bt])
    assert len(shards[0]) == len(shards[1]) == 25
    assert set(shards[0]) | set(shards[1]) == set(range(50))


@pytest.mark.parametrize("bucket", [True, False])
def test_world_size_invariant_sampler_splits_the_one_process_global_batches(bucket: bool) -> None:
    from torch.utils.data import DistributedSampler

    lengths = [(i * 7919) % 97 for i in range(103)]  # 103 items: the last global batch of 8 is short
    one = BucketBatchSampler(EpochSequentialSampler(103), 8, lengths=lengths, seed=3, bucket=bucket,
                             bucket_multiplier=2, world_size_invariant=True)
    ranks = [BucketBatchSampler(DistributedSampler(range(103), num_replicas=2, rank=r, shuffle=True), 4,
                                lengths=lengths, seed=3, bucket=bucket, bucket_multiplier=2,
                                world_size_invariant=True) for r in (0, 1)]
    for epoch in (0, 1):
        for s in (one, *ranks):
            s.set_epoch(epoch)
        global_batches = one.batches()
        per_rank = [r.batches() for r in ranks]
        assert len(per_rank[0]) == len(per_rank[1]) == len(ranks[0]) == len(global_batches)
        for step, batch in enumerate(global_batches):
            assert sorted(per_rank[0][step] + per_rank[1][step]) == sorted(batch), (epoch, step)
            assert abs(len(per_rank[0][step]) - len(per_rank[1][step])) <= 1
    plain = BucketBatchSampler(DistributedSampler(range(103), num_replicas=2, rank=0, shuffle=True), 4,
                               lengths=lengths, seed=3, bucket=bucket, bucket_multiplier=2)
    assert plain.batches() != ranks[0].batches()  # off: each rank orders its own shard


def test_pad_sequences_sides() -> None:
    right = pad_sequences([[1, 2, 3], [4]], 0)
    left = pad_sequences([[1, 2, 3], [4]], 0, side="left")
    assert right.tolist() == [[1, 2, 3], [4, 0, 0]] and left.tolist() == [[1, 2, 3], [0, 0, 4]]


class _Scorer(__import__("lightning").LightningModule):
    """Minimal module: scores are the number of real tokens, to drive Lightning's loops."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def training_step(self, batch, _):
        return (self.w * batch["attention_mask"].sum()).float() ** 2

    def predict_step(self, batch, _):
        return batch["query_ids"]

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_lightning_fit_and_predict_with_bucket_sampler() -> None:
    import lightning as L

    dm = RankingDataModule(batch_size=2, eval_batch_size=4, num_negatives=1)
    trainer = L.Trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(_Scorer(), datamodule=dm)
    assert trainer.train_dataloader.batch_sampler.epoch == 1  # Lightning advanced the epoch
    out = trainer.predict(_Scorer(), datamodule=dm)
    assert sorted(q for batch in out for q in batch) == sorted(g.query_id for g in dm.groups["predict"])

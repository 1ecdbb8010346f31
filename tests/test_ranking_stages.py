"""Ranking stages on the embedded sample with tiny models: fit, export → reload, LoRA, TCL-free serving."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from kdlab.callbacks import TeacherLoader

from kdlab.data.datamodules import ClickLogDataModule, RankingDataModule
from kdlab.labeling import score_file
from kdlab.losses.ranking import hybrid_distill_loss
from kdlab.models.backbones import count_parameters, load_backbone
from kdlab.models.served import SCORE_HEAD_FILE, SCORE_HEAD_META, load_rank_teacher
from kdlab.protocols import ExportsPretrained, HasBatchLoss, NeedsTeacher
from kdlab.stages.rank_distill_student import RankDistillStudent
from kdlab.stages.teacher_cpt import TeacherCPT
from kdlab.stages.teacher_rank_sft import TeacherRankSFT

# The smallest tiny models (kdlab.models.backbones.TINY_CONFIGS): H32, 1 layer, 2 heads.
TINY = "tiny-llama-h32"
TINY_BERT = "tiny-bert-h32"


def _trainer(tmp_path: Path, max_steps: int = 2, **kw: Any) -> L.Trainer:
    defaults: dict[str, Any] = dict(
        max_steps=max_steps, limit_val_batches=2, num_sanity_val_steps=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=str(tmp_path), accelerator="cpu", devices=1, val_check_interval=max_steps, check_val_every_n_epoch=None,
    )
    defaults.update(kw)
    return L.Trainer(**defaults)


def _ranking_dm(text_format: str, tokenizer: str, **kw: Any) -> RankingDataModule:
    args: dict[str, Any] = dict(tokenizer=tokenizer, text_format=text_format, num_negatives=3, batch_size=4,
                                eval_batch_size=4, max_length=64, eval_max_docs=8)
    args.update(kw)
    return RankingDataModule(**args)


def test_protocols() -> None:
    L.seed_everything(0)
    student = RankDistillStudent(backbone=TINY_BERT)
    assert isinstance(student, NeedsTeacher) and not student.needs_teacher
    assert isinstance(student, ExportsPretrained) and isinstance(student, HasBatchLoss)
    live = RankDistillStudent(backbone=TINY_BERT, teacher_source="live")
    assert live.needs_teacher
    cpt = TeacherCPT(backbone=TINY)
    assert isinstance(cpt, ExportsPretrained) and isinstance(cpt, HasBatchLoss)


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_teacher_cpt_fits_logs_perplexity_and_exports(tmp_path: Path, lora_rank: int) -> None:
    L.seed_everything(0)
    stage = TeacherCPT(backbone=TINY, lora_rank=lora_rank, lr=1e-3, warmup_steps=2)
    dm = ClickLogDataModule(tokenizer="tiny-llama", batch_size=8, max_length=64)
    trainer = _trainer(tmp_path)
    trainer.fit(stage, datamodule=dm)
    metrics = trainer.callback_metrics
    assert math.isfinite(float(metrics["train/loss"]))
    assert float(metrics["val/perplexity"]) == pytest.approx(math.exp(float(metrics["val/loss"])), rel=1e-4)
    if lora_rank:
        trainable = sum(p.numel() for p in stage.parameters() if p.requires_grad)
        assert trainable < count_parameters(stage) / 5
    out = tmp_path / "cpt"
    stage.export_pretrained(str(out))
    assert not (out / "adapter_config.json").exists()  # LoRA merged: a plain HF dir
    reloaded = load_backbone(str(out), task="causal-lm").eval()
    batch = next(iter(dm.val_dataloader()))
    stage.eval()
    with torch.no_grad():
        ref = stage(batch["input_ids"], batch["attention_mask"])
        got = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(ref, got, atol=1e-4)
    # the next stage loads it by path
    TeacherRankSFT(backbone=str(out))


@pytest.mark.parametrize("loss,lora_rank", [("hinge", 0), ("listwise", 0), ("ranknet", 4)])
def test_teacher_rank_sft_fits_exports_and_reloads(tmp_path: Path, loss: str, lora_rank: int) -> None:
    L.seed_everything(0)
    stage = TeacherRankSFT(backbone=TINY, loss=loss, lora_rank=lora_rank, lr=1e-3)  # type: ignore[arg-type]
    dm = _ranking_dm("decoder", "tiny-llama")
    trainer = _trainer(tmp_path, limit_predict_batches=1)
    trainer.fit(stage, datamodule=dm)
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    for key in ("val/ndcg@10", "val/mrr@10", "val/pnr"):
        assert key in trainer.callback_metrics
    out = tmp_path / "teacher"
    stage.export_pretrained(str(out))
    assert (out / SCORE_HEAD_FILE).is_file() and (out / SCORE_HEAD_META).is_file()
    teacher = load_rank_teacher(str(out))
    assert teacher.text_format == "decoder"
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    stage.eval()
    with torch.no_grad():
        ref = stage.score_groups(batch)
        got = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).view_as(ref)
    assert torch.allclose(ref, got, atol=1e-4)
    preds = trainer.predict(stage, datamodule=dm)
    assert preds is not None and preds[0]["scores"].shape == preds[0]["doc_mask"].shape
    assert isinstance(preds[0]["query_ids"][0], str) and len(preds[0]["doc_ids"]) == len(preds[0]["query_ids"])


@pytest.fixture(scope="module")
def labeled_train(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 48 training groups scored by a tiny exported TeacherRankSFT (``kdlab label``'s route)."""
    from kdlab.data import sample_path

    base = tmp_path_factory.mktemp("label")
    L.seed_everything(0)
    TeacherRankSFT(backbone=TINY).export_pretrained(str(base / "teacher"))
    subset = base / "train_subset.jsonl"
    subset.write_text("".join(Path(sample_path("ranking_train.jsonl")).read_text().splitlines(True)[:48]))
    out = base / "train_labeled.jsonl"
    score_file(str(base / "teacher"), str(subset), str(out), max_tokens=4096, max_length=64, progress=False)
    return out


@pytest.mark.parametrize("kw", [
    {},
    {"alpha": 0.0, "gt_weight": 0.5, "gt_loss": "hinge"},
    {"use_tcl": True, "tcl_weight": 0.5, "tcl_heads": 2, "standardize_teacher": True},
])
def test_student_fits_on_teacher_scores(tmp_path: Path, labeled_train: Path, kw: dict[str, Any]) -> None:
    L.seed_everything(0)
    stage = RankDistillStudent(backbone=TINY_BERT, lr=1e-3, **kw)
    dm = _ranking_dm("cross-encoder", "tiny-bert", train=str(labeled_train))
    before = {k: v.clone() for k, v in stage.state_dict().items()}
    trainer = _trainer(tmp_path)
    trainer.fit(stage, datamodule=dm)
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    assert "val/ndcg@10" in trainer.callback_metrics
    changed = [k for k, v in stage.state_dict().items() if k in before and not torch.equal(v, before[k])]
    assert any(k.startswith("ranker.") for k in changed)
    if kw.get("use_tcl"):
        assert any(k.startswith("tcl.") for k in changed)
        assert "train/loss_tcl" in trainer.callback_metrics
    if kw.get("standardize_teacher"):
        assert torch.isfinite(stage.teacher_stats).all() and float(stage.teacher_stats[1]) > 0


def test_teacher_standardisation_is_computed_from_the_training_data(tmp_path: Path, labeled_train: Path) -> None:
    """μ, σ are the mean and (population) standard deviation of every valid teacher score the
    training loader yields (``train_group_sampling: all``: every document of every group that has two
    different labels), and the loss compares the student with ``(t − μ) / σ``."""
    L.seed_everything(0)
    stage = RankDistillStudent(backbone=TINY_BERT, lr=1e-3, standardize_teacher=True)
    dm = _ranking_dm("cross-encoder", "tiny-bert", train=str(labeled_train), train_group_sampling="all")
    assert not torch.isfinite(stage.teacher_stats).any()  # not given: computed when training starts
    _trainer(tmp_path, max_steps=1).fit(stage, datamodule=dm)

    groups = [json.loads(line) for line in labeled_train.read_text().splitlines()]
    scores = np.array([d["teacher_score"] for g in groups if len({d["label"] for d in g["docs"]}) > 1
                       for d in g["docs"]], dtype=np.float64)
    assert len(scores) > 100
    mean, std = float(stage.teacher_stats[0]), float(stage.teacher_stats[1])
    assert mean == pytest.approx(float(scores.mean()), rel=1e-5, abs=1e-6)
    assert std == pytest.approx(float(scores.std()), rel=1e-5)

    batch = next(iter(dm.train_dataloader()))
    stage.eval()
    with torch.no_grad():
        loss = stage.batch_loss(batch)
        expected = hybrid_distill_loss(stage.score_groups(batch).float(), (batch["teacher_scores"] - mean) / std,
                                       batch["doc_mask"])
        raw = hybrid_distill_loss(stage.score_groups(batch).float(), batch["teacher_scores"], batch["doc_mask"])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    assert abs(loss.item() - raw.item()) > 1e-3  # standardising changed the targets


def test_tcl_is_training_only_served_model_identical(tmp_path: Path) -> None:
    L.seed_everything(0)
    with_tcl = RankDistillStudent(backbone=TINY_BERT, use_tcl=True, tcl_heads=2)
    without = RankDistillStudent(backbone=TINY_BERT, use_tcl=False)
    without.ranker.load_state_dict(with_tcl.ranker.state_dict())
    assert count_parameters(with_tcl) > count_parameters(without)
    assert count_parameters(with_tcl.served_model()) == count_parameters(without.served_model())
    a, b = tmp_path / "a", tmp_path / "b"
    with_tcl.export_pretrained(str(a))
    without.export_pretrained(str(b))
    ra, rb = load_rank_teacher(str(a)), load_rank_teacher(str(b))
    assert ra.text_format == rb.text_format == "cross-encoder"
    assert count_parameters(ra) == count_parameters(rb) == count_parameters(without.ranker)
    files_a = sorted(p.name for p in a.iterdir())
    assert files_a == sorted(p.name for p in b.iterdir())
    dm = _ranking_dm("cross-encoder", "tiny-bert")
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    with_tcl.eval()
    without.eval()
    with torch.no_grad():
        s1, s2 = with_tcl.score_groups(batch), without.score_groups(batch)
        s3 = ra(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                token_type_ids=batch["token_type_ids"]).view_as(s1)
    assert torch.equal(s1, s2)
    assert torch.allclose(s1, s3, atol=1e-5)


def test_student_decoder_architecture_and_live_teacher(tmp_path: Path) -> None:
    """A decoder student sharing the teacher's tokenizer and text format distils from it live: the
    TeacherLoader callback loads the TeacherRankSFT export (``task="ranker"``) and attaches it."""
    L.seed_everything(0)
    teacher_stage = TeacherRankSFT(backbone=TINY)
    tdir = tmp_path / "teacher"
    teacher_stage.export_pretrained(str(tdir))
    stage = RankDistillStudent(backbone=TINY, architecture="decoder", teacher_source="live", lr=1e-3)
    assert stage.needs_teacher
    dm = _ranking_dm("decoder", "tiny-llama")
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    with pytest.raises(RuntimeError, match="teacher:"):
        stage.batch_loss(batch)  # no teacher attached yet: the error says where to configure one
    loader = TeacherLoader(backbone=str(tdir), task="ranker")
    trainer = _trainer(tmp_path, callbacks=[loader])
    trainer.fit(stage, datamodule=dm)
    assert stage.teacher is loader.teacher and loader.load_count == 1
    assert not any(k.startswith("teacher.") for k in stage.state_dict())
    assert count_parameters(stage) == count_parameters(stage.ranker)
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    # the live scores are the export's: the loss equals the hybrid loss against the reloaded teacher
    reference = load_rank_teacher(str(tdir))
    stage.eval()
    with torch.no_grad():
        teacher_scores = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        expected = hybrid_distill_loss(stage.score_groups(batch).float(), teacher_scores.view(batch["doc_mask"].shape),
                                       batch["doc_mask"])
        assert stage.batch_loss(batch).item() == pytest.approx(expected.item(), rel=1e-4)
    out = tmp_path / "student"
    stage.export_pretrained(str(out))
    assert load_rank_teacher(str(out)).text_format == "decoder"
    with pytest.raises(ValueError, match="use_tcl"):
        RankDistillStudent(backbone="tiny-llama", architecture="decoder", use_tcl=True)


def test_rank_sft_teacher_beats_random_ndcg(tmp_path: Path) -> None:
    """A short rank-SFT run ranks better than random scores (NDCG@10 on its eval groups).

    Evaluated on the 40 training queries it was fitted on (all their candidates): a tiny decoder
    trained from random init for seconds learns these queries but does not yet generalise to the
    held-out val modules (measured: 500 steps -> val NDCG@10 0.479 vs random 0.512), so a held-out
    check needs real weights (slow tests / the pipeline with a prepared alias).
    """
    from kdlab.data import sample_path
    from kdlab.metrics import RankingMetrics

    subset = tmp_path / "subset.jsonl"
    subset.write_text("".join(Path(sample_path("ranking_train.jsonl")).read_text().splitlines(True)[:40]))
    L.seed_everything(0)
    stage = TeacherRankSFT(backbone="tiny-llama", loss="ranknet", lr=3e-3)  # H64, 2 layers
    dm = _ranking_dm("decoder", "tiny-llama", train=str(subset), val=str(subset), batch_size=8,
                     eval_batch_size=8, eval_max_docs=16, max_length=48)
    trainer = _trainer(tmp_path, max_steps=30, limit_val_batches=None)
    trainer.fit(stage, datamodule=dm)
    trained = float(trainer.callback_metrics["val/ndcg@10"])
    dm.setup("validate")
    randoms = []
    for seed in range(5):
        gen = torch.Generator().manual_seed(seed)
        rm = RankingMetrics(k=10)
        for batch in dm.val_dataloader():
            rm.update(torch.rand(batch["doc_mask"].shape, generator=gen), batch["labels"], batch["doc_mask"],
                      batch["query_index"])
        randoms.append(float(rm.compute()["ndcg@10"]))
    random_ndcg = sum(randoms) / len(randoms)
    print(f"rank-SFT ndcg@10 = {trained:.4f}, random = {random_ndcg:.4f}")
    assert trained > random_ndcg + 0.1


def test_live_seq_cls_teacher_output_and_warmup_schedule(tmp_path: Path) -> None:
    """A seq-cls teacher (what the teacher callback loads for ``task: seq-cls``) returns HF logits
    [B, 1]; the student's loss is computed against them."""
    L.seed_everything(0)
    teacher = load_backbone(TINY_BERT, task="seq-cls", num_labels=1).eval()
    stage = RankDistillStudent(backbone=TINY_BERT, teacher_source="live", lr=1e-3, warmup_steps=4)
    stage.attach_teacher(teacher)
    assert "teacher" not in dict(stage.named_children())
    dm = _ranking_dm("cross-encoder", "tiny-bert")
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    stage.eval()
    with torch.no_grad():
        ref = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      token_type_ids=batch["token_type_ids"]).logits[:, 0]
        scores = stage.score_groups(batch).float()
        expected = hybrid_distill_loss(scores, ref.view_as(scores), batch["doc_mask"])
        assert stage.batch_loss(batch).item() == pytest.approx(expected.item(), rel=1e-5)
    opt = stage.configure_optimizers()
    sched = opt["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(6):
        lrs.append(opt["optimizer"].param_groups[0]["lr"])
        opt["optimizer"].step()
        sched.step()
    assert lrs == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])  # (step+1)/warmup · lr

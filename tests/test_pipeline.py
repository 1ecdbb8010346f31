"""The DisRanker pipeline end to end on a tiny config (every step, the labels, the report)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REPO, subprocess_env

from kdlab.pipeline import PipelineConfig, run_pipeline

QUICK = REPO / "experiments" / "quickstart" / "disranker"


def test_tiny_pipeline_writes_complete_report_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    for key, value in subprocess_env().items():
        monkeypatch.setenv(key, value)
    config = PipelineConfig(
        name="tiny", root=str(tmp_path), pipeline_dir=str(tmp_path / "p"),
        cpt_config=str(QUICK / "cpt.yaml"), rank_sft_config=str(QUICK / "rank_sft.yaml"),
        distill_config=str(QUICK / "distill.yaml"),
        step_args={"all": ["--config", str(QUICK / "base.yaml")],
                   "all_after": ["--trainer.max_steps=2", "--trainer.limit_val_batches=1", "--trainer.logger=false"]},
        # One student, the one with most code in it (hybrid loss + TCL): every other variant is the
        # same step with different loss weights, and each subprocess costs ~10 s of imports.
        variants={"hybrid+TCL": ["--model.init_args.use_tcl=true"]},
        max_train_queries=16, max_eval_queries=6,
    )
    report = run_pipeline(config)
    text = report.read_text()
    for row in ("random ordering", "lexical pre-ranker (BM25)", "teacher, no CPT", "teacher, CPT",
                "student, hybrid+TCL"):
        assert f"| {row}" in text, row
    assert "| train | 16 |" in text and "| test | 6 |" in text
    assert "of the teacher's NDCG@10" in text
    rows = json.loads((report.parent / "report.json").read_text())["rows"]
    student = next(r for r in rows if r["model"] == "student, hybrid+TCL")
    teacher = next(r for r in rows if r["model"] == "teacher, CPT")
    assert 0.0 <= student["ndcg@10"] <= 1.0 and student["ms_per_query"] > 0
    assert student["parameters"] < teacher["parameters"]
    assert (report.parent / "report.png").stat().st_size > 5000
    labels = [json.loads(line) for line in (report.parent / "labels" / "train.jsonl").read_text().splitlines()]
    assert len(labels) == 16 and all("teacher_score" in d for g in labels for d in g["docs"])
    assert not (report.parent / "labels" / "test.jsonl").exists()  # evaluation scores test itself
    for step in ("cpt", "rank_sft_cpt", "student_hybrid_tcl"):  # `all_after` wins over each step's own YAML
        assert "max_steps: 2\n" in (report.parent / step / "config.yaml").read_text(), step

    capsys.readouterr()
    run_pipeline(config)  # every step finished: the rerun only re-evaluates
    assert capsys.readouterr().out.count("finished earlier") == 4


def test_test_query_offset_takes_a_fresh_slice_of_the_test_file(tmp_path: Path) -> None:
    from kdlab.data import sample_path
    from kdlab.pipeline import _split_files

    queries = [json.loads(line)["query"] for line in Path(sample_path("ranking_test.jsonl")).read_text().splitlines()]
    splits = _split_files(PipelineConfig(max_eval_queries=5, test_query_offset=50), tmp_path)
    test = [json.loads(line)["query"] for line in Path(splits["test"]).read_text().splitlines()]
    val = [json.loads(line)["query"] for line in Path(splits["val"]).read_text().splitlines()]
    assert test == queries[50:55] and len(val) == 5
    with pytest.raises(ValueError, match="no queries left"):
        _split_files(PipelineConfig(test_query_offset=100), tmp_path / "empty")

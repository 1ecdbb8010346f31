"""The DisRanker pipeline end to end on a tiny config (every step, the labels, the report), on a BEIR
directory and TREC runs with no kdlab-specific field, as a user brings them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import REPO, subprocess_env

import kdlab.pipeline as pipeline
from kdlab.data.fixtures import write_fixtures
from kdlab.evaluation import PRE_RANKER, RANDOM, evaluate_models
from kdlab.pipeline import PipelineConfig, run_pipeline

QUICK = REPO / "experiments" / "quickstart" / "disranker"
METRICS = ("ndcg@10", "mrr@10", "pnr")


def test_tiny_pipeline_writes_complete_report_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    for key, value in subprocess_env().items():
        monkeypatch.setenv(key, value)
    write_fixtures(tmp_path / "fixtures")
    beir = tmp_path / "fixtures" / "beir"
    assert not any(key in path.read_text() for path in beir.rglob("*") if path.is_file()
                   for key in ("first_stage_score", "teacher_score", '"label"', '"docs"'))
    sources = {split: {"format": "beir", "path": str(beir), "run": str(beir / f"run.{qrels}.trec"), "qrels_split": qrels}
               for split, qrels in (("train", "train"), ("val", "dev"), ("test", "test"))}
    config = PipelineConfig(
        train=sources["train"], val=sources["val"], test=sources["test"],
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
    p = report.parent
    text = report.read_text()
    assert "| train | 16 |" in text and "| test | 6 |" in text
    rows = json.loads((p / "report.json").read_text())["rows"]
    by_model = {row["model"]: row for row in rows}
    pre_ranker = "first-stage run (run.test.trec)"
    assert list(by_model) == ["random ordering (mean of 20)", pre_ranker, "teacher, no CPT",
                              "teacher, CPT", "student, hybrid+TCL"]

    # The report's numbers are an evaluation of exactly these models on exactly this test split.
    models = {"random ordering (mean of 20)": RANDOM, pre_ranker: PRE_RANKER,
              "teacher, no CPT": p / "rank_sft_no_cpt" / "model", "teacher, CPT": p / "rank_sft_cpt" / "model",
              "student, hybrid+TCL": p / "student_hybrid_TCL" / "model"}  # kdlab.runs.slug("hybrid+TCL")
    again = {row["model"]: row for row in evaluate_models(models, str(p / "data" / "ranking_test.jsonl"))}
    for name, row in by_model.items():
        for key in (*METRICS, "parameters", "queries"):
            assert row[key] == pytest.approx(again[name][key], abs=1e-6), (name, key)
    student, teacher = by_model["student, hybrid+TCL"], by_model["teacher, CPT"]
    assert student["queries"] == 6 and student["ms_per_query"] > 0
    assert student["parameters"] < teacher["parameters"]

    # Each table row of report.md shows that row's numbers, and each check's verdict follows from them.
    for name, row in by_model.items():
        assert f"| {name} | {row['ndcg@10']:.4f} | {row['mrr@10']:.4f} | {row['pnr']:.3f} |" in text, name
    no_cpt = by_model["teacher, no CPT"]
    verdict = "better than" if teacher["ndcg@10"] > no_cpt["ndcg@10"] else "NOT better than"
    assert (f"The CPT teacher ranks {verdict} the teacher without CPT "
            f"(NDCG@10 {teacher['ndcg@10']:.4f} vs {no_cpt['ndcg@10']:.4f})") in text
    for baseline in ("random ordering (mean of 20)", pre_ranker):
        beats = "beats" if teacher["ndcg@10"] > by_model[baseline]["ndcg@10"] else "does NOT beat"
        assert f"The CPT teacher {beats} {baseline} (NDCG@10" in text, baseline
    ratio_line = next(line for line in text.splitlines() if line.startswith("- student, hybrid+TCL: "))
    shown = float(re.search(r": ([\d.]+)% of the teacher's NDCG@10", ratio_line).group(1)) / 100
    ratio = student["ndcg@10"] / teacher["ndcg@10"]
    assert shown == pytest.approx(ratio, abs=5e-4)
    target = f"the {config.min_student_ratio:.0%} target"
    assert (f"(meets {target})" if ratio >= config.min_student_ratio else f"(does NOT meet {target})") in ratio_line
    assert (p / "report.png").stat().st_size > 5000

    # trec_eval (ir_measures), from the TREC run files kdlab wrote, agrees with every scored row.
    review = json.loads((p / "report.json").read_text())
    assert set(review["trec_eval"]) == set(by_model) - {"random ordering (mean of 20)"}
    for name, check in review["trec_eval"].items():
        assert check["queries_with_tied_scores"] == 0 and check["agrees"], (name, check)
        assert check["ndcg@10"]["abs_diff"] <= 1e-6 and check["mrr@10"]["abs_diff"] <= 1e-6
        assert (p / "trec" / Path(check["run_file"]).parent.name / "run.trec").exists()
    assert "## trec_eval cross-check" in text
    for name in ("teacher, no CPT", "student, hybrid+TCL"):  # paired tests against teacher and pre-ranker
        assert 0 < by_model[name]["p_vs_teacher"] <= 1 and 0 < by_model[name]["p_vs_pre_ranker"] <= 1
    assert json.loads((p / "data" / "first_stage.json").read_text())["test"]["kind"] == "run"

    labels = [json.loads(line) for line in (p / "labels" / "train.jsonl").read_text().splitlines()]
    assert len(labels) == 16 and all("teacher_score" in d for g in labels for d in g["docs"])
    assert not (p / "labels" / "test.jsonl").exists()  # evaluation scores test itself
    for step in ("cpt", "rank_sft_cpt", "student_hybrid_TCL"):  # `all_after` wins over each step's own YAML
        assert "max_steps: 2\n" in (p / step / "config.yaml").read_text(), step

    capsys.readouterr()
    run_pipeline(config)  # every step finished: the rerun only re-evaluates
    assert capsys.readouterr().out.count("finished earlier") == 4


class _Stop(Exception):
    """Raised instead of launching the first step: the test only needs the split files."""


def _splits_only(config: PipelineConfig, monkeypatch: pytest.MonkeyPatch) -> Path:
    def stop(*args: object, **kwargs: object) -> dict[str, float]:
        raise _Stop

    monkeypatch.setattr(pipeline, "launch_run", stop)
    with pytest.raises(_Stop):
        run_pipeline(config)
    return Path(str(config.pipeline_dir)) / "data"


def test_test_query_offset_takes_a_fresh_slice_of_the_test_file(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from kdlab.data import sample_path

    queries = [json.loads(line)["query"] for line in Path(sample_path("ranking_test.jsonl")).read_text().splitlines()]
    data = _splits_only(PipelineConfig(pipeline_dir=str(tmp_path / "p"), max_eval_queries=5, test_query_offset=50),
                        monkeypatch)
    test = [json.loads(line)["query"] for line in (data / "ranking_test.jsonl").read_text().splitlines()]
    val = [json.loads(line)["query"] for line in (data / "ranking_val.jsonl").read_text().splitlines()]
    assert test == queries[50:55] and len(val) == 5
    assert not (data / "ranking_train.jsonl").exists()  # no limit: the training file is used as it is
    with pytest.raises(ValueError, match="no queries left"):
        run_pipeline(PipelineConfig(pipeline_dir=str(tmp_path / "empty"), test_query_offset=len(queries)))

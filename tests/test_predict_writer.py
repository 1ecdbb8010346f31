"""``python -m kdlab predict`` of a ranker writes its scores as a TREC run and a JSONL, in input order."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import REPO

from kdlab.data import sample_path
from kdlab.data.readers import read_ranking_jsonl, read_trec_run
from kdlab.lightning_cli import run_lightning

QUICK = REPO / "experiments" / "quickstart" / "disranker"


def test_predict_writes_trec_run_and_jsonl_in_input_order(tmp_path: Path) -> None:
    lines = Path(sample_path("ranking_test.jsonl")).read_text().splitlines()[:5]
    data = tmp_path / "five.jsonl"
    data.write_text("\n".join(reversed(lines)) + "\n")  # not the sample's order: output must follow the input
    run_dir = run_lightning(["predict", "--config", str(QUICK / "base.yaml"), "--config", str(QUICK / "rank_sft.yaml"),
                             f"--data.init_args.predict={data}", "--trainer.logger=false",
                             f"--run.dir={tmp_path / 'run'}"])
    groups = read_ranking_jsonl(data)
    rows = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert [r["query_id"] for r in rows] == [g.query_id for g in groups]
    assert [[d["id"] for d in r["docs"]] for r in rows] == [[d.id for d in g.docs] for g in groups]
    run = read_trec_run(run_dir / "predictions.trec")
    for row in rows:  # the TREC run ranks the same scores, best first
        ranked = sorted(row["docs"], key=lambda d: (-d["score"], d["id"]))
        assert [(e.doc_id, e.score) for e in run[row["query_id"]]] == [(d["id"], d["score"]) for d in ranked]
    assert not list(run_dir.glob("*.partial"))
    record = json.loads((run_dir / "manifest.json").read_text())["data"]["predict"]  # what was read, recorded
    assert record["queries"] == 5 and record["source"] == {**record["source"], "format": "jsonl", "path": str(data)}

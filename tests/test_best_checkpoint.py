"""model/ holds the best checkpoint's weights by the stage's main validation metric (or the last
step's when the config says so), and the manifest says which."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import REPO

from kdlab.data.sources import RankingSource, read_source
from kdlab.evaluation import evaluate_models
from kdlab.lightning_cli import run_lightning

CONFIG = REPO / "experiments" / "data" / "flagembedding.yaml"


def test_model_dir_is_the_best_checkpoint_by_val_ndcg(tmp_path: Path) -> None:
    run = run_lightning(["fit", "--config", str(CONFIG), "--trainer.max_steps=24", "--trainer.val_check_interval=6",
                         "--model.init_args.lr=0.03",  # a rate that overshoots: the best is not the last
                         "--trainer.enable_progress_bar=false", f"--run.dir={tmp_path / 'best'}"])
    exported = json.loads((run / "manifest.json").read_text())["exported_weights"]
    assert exported["weights"] == "best" and exported["monitor"] == "val/ndcg@10"
    best = Path(exported["checkpoint"])
    assert best.parent == run / "checkpoints" and (run / "checkpoints" / "last.ckpt").is_file()
    # the exported model scores the validation split exactly as the best checkpoint did
    val = read_source(RankingSource(format="flagembedding",
                                    path=str(REPO / "experiments/data/fixtures/flagembedding/dev.jsonl")), "val").groups
    (row,) = evaluate_models({"student": run / "model"}, val, max_length=96)
    assert row["ndcg@10"] == pytest.approx(exported["score"], abs=1e-5)
    state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    # Whether best and last differ depends on the trajectory. On the code of 2026-12-02 this run's val NDCG@10
    # rises to the last step (best == last), so here the test only shows the export is the best checkpoint's;
    # that it is not the last one needs a run whose metric falls (open: see the session note of that day).
    if not any(not torch.equal(state[k], last[k]) for k in state):
        assert exported["checkpoint"].endswith("step24.ckpt")
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 24  # resume point

    again = run_lightning(["fit", "--config", str(CONFIG), "--trainer.max_steps=6", "--trainer.val_check_interval=6",
                           "--trainer.enable_progress_bar=false", "--run.export_weights=last",
                           f"--run.dir={tmp_path / 'last'}"])
    assert json.loads((again / "manifest.json").read_text())["exported_weights"]["weights"] == "last"

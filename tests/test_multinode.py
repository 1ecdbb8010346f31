"""Several machines through Lightning's own launchers: 2 "nodes" × 1 process on localhost (two torchrun
agents with ``--nnodes 2``, static rendezvous, gloo; tests/_two_nodes.py) give what 1 process gives.

* ``kdlab fit --trainer.num_nodes=2``: the same loss trajectory and parameters as 1 process with the
  same global batch (tolerances as in test_multirank: float32 summation order only), both nodes in
  one run directory named after the torchrun job.
* ``kdlab label --num_nodes=2``: the same bytes as 1 process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import subprocess_env
from test_multirank import TOY  # the toy regression, world-size-invariant batches

TESTS = Path(__file__).resolve().parent
TWO_NODES = [sys.executable, str(TESTS / "_two_nodes.py")]
NODE_ARGS = ["--trainer.num_nodes=2", "--trainer.devices=1", "--trainer.strategy=ddp", "--trainer.accelerator=cpu"]


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def _trace(out: Path) -> list[str]:
    return ["--trainer.callbacks+=_ddp_fit_script.LossTrace", f"--trainer.callbacks.init_args.out={out}"]


def test_fit_on_two_nodes_equals_one_process(tmp_path: Path) -> None:
    (tmp_path / "toy.yaml").write_text(TOY)
    kdlab_fit = [sys.executable, "-m", "kdlab", "fit", "--config", "toy.yaml"]
    _run([*kdlab_fit, "--run.name=one", *_trace(tmp_path / "t1")], tmp_path)
    _run([*TWO_NODES, *kdlab_fit, "--run.name=two", *NODE_ARGS, "--data.init_args.batch_size=4",
          *_trace(tmp_path / "t2")], tmp_path)
    one, two = (json.loads((tmp_path / t / "trace.json").read_text()) for t in ("t1", "t2"))
    assert one["world_size"] == 1 and two["world_size"] == 2 and one["steps"] == two["steps"]
    a, b = torch.tensor(one["losses"]), torch.tensor(two["losses"])
    assert not torch.equal(a[0].expand_as(a), a), "the loss must move, or the comparison says nothing"
    torch.testing.assert_close(b, a, rtol=1e-5, atol=0.0)
    for name, value in one["params"].items():
        torch.testing.assert_close(torch.tensor(two["params"][name]), torch.tensor(value), rtol=0.0, atol=1e-5)
    # both nodes resolved the one run directory torchrun's job id names, written by rank 0
    ranks = [json.loads((tmp_path / "t2" / f"rank{r}.json").read_text()) for r in (0, 1)]
    runs = sorted((tmp_path / "runs" / "two").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("job-two-nodes-"), runs
    assert {(tmp_path / r["default_root_dir"]).resolve() for r in ranks} == {runs[0].resolve()}
    manifest = json.loads((runs[0] / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["devices"]["world_size"] == 2


def test_label_on_two_nodes_writes_the_bytes_of_one_process(tmp_path: Path, tiny_ranker_export: Path) -> None:
    from kdlab.data import sample_path
    from kdlab.labeling import score_file

    source = tmp_path / "groups.jsonl"
    source.write_text("".join(Path(sample_path("ranking_val.jsonl")).read_text().splitlines(True)[:20]))
    one = tmp_path / "one.jsonl"
    score_file(str(tiny_ranker_export), str(source), str(one), max_tokens=512, max_length=48, progress=False)
    two = tmp_path / "two.jsonl"
    proc = _run([*TWO_NODES, sys.executable, "-m", "kdlab", "label", f"--teacher={tiny_ranker_export}",
                 f"--input={source}", f"--output={two}", "--max_tokens=512", "--max_length=48",
                 "--accelerator=cpu", "--devices=1", "--num_nodes=2"], tmp_path)
    assert two.read_bytes() == one.read_bytes()
    assert proc.stdout.count("wrote 20 pointwise-labelled groups") == 1  # printed by global rank 0 only
    assert not list(tmp_path.glob("*.partial"))


def test_label_num_nodes_must_be_a_positive_integer(tmp_path: Path, tiny_ranker_export: Path) -> None:
    from kdlab.data import sample_path
    from kdlab.errors import ConfigError
    from kdlab.labeling import score_file

    with pytest.raises(ConfigError, match="num_nodes: expected an integer >= 1, got 0"):
        score_file(str(tiny_ranker_export), sample_path("ranking_val.jsonl"), str(tmp_path / "x.jsonl"),
                   num_nodes=0, progress=False)


def test_the_pipeline_runs_its_training_and_labeling_steps_on_two_nodes(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """``hardware.launcher`` starts each fit and label step on both "nodes" (as ``[srun]`` does in a
    SLURM allocation); the pipeline's own work stays in its process. Every training step ran with
    world size 2, and the teacher's labels are the bytes one process writes with that teacher."""
    from conftest import REPO

    from kdlab.labeling import score_file
    from kdlab.pipeline import BudgetConfig, DataConfig, HardwareConfig, PipelineConfig, RecipeConfig, run_pipeline

    for key, value in subprocess_env().items():
        monkeypatch.setenv(key, value)
    quick = REPO / "experiments" / "quickstart" / "disranker"
    config = PipelineConfig(
        name="two-nodes", root=str(tmp_path), pipeline_dir=str(tmp_path / "p"),
        recipe=RecipeConfig(
            cpt_config=str(quick / "cpt.yaml"), rank_sft_config=str(quick / "rank_sft.yaml"),
            distill_config=str(quick / "distill.yaml"), run_no_cpt_baseline=False,
            step_args={"all": ["--config", str(quick / "base.yaml")],
                       "all_after": ["--trainer.max_steps=2", "--trainer.limit_val_batches=1", "--trainer.logger=false"]},
            variants={"hybrid": []}),
        data=DataConfig(), budget=BudgetConfig(max_train_queries=8, max_eval_queries=4, label_val=False),
        hardware=HardwareConfig(train_accelerator="cpu", train_devices=1, num_nodes=2, label_accelerator="cpu",
                                launcher=[*TWO_NODES]),
    )
    report = run_pipeline(config)
    p = report.parent
    for step in ("cpt", "rank_sft_cpt", "student_hybrid"):
        manifest = json.loads((p / step / "manifest.json").read_text())
        assert manifest["status"] == "finished" and manifest["devices"]["world_size"] == 2, step
    again = tmp_path / "one.jsonl"
    score_file(str(p / "rank_sft_cpt" / "model"), str(p / "data" / "ranking_train.jsonl"), str(again),
               max_tokens=config.budget.label_max_tokens, max_length=config.budget.label_max_length, progress=False)
    assert (p / "labels" / "train.jsonl").read_bytes() == again.read_bytes()
    assert "student, hybrid" in report.read_text()


def test_num_nodes_without_a_launcher_is_a_config_error() -> None:
    from kdlab.errors import ConfigError
    from kdlab.pipeline import HardwareConfig

    with pytest.raises(ConfigError, match=r"hardware.num_nodes > 1 needs hardware.launcher"):
        HardwareConfig(num_nodes=2)
    assert HardwareConfig(train_devices=2).train_args() == ["--trainer.devices=2", "--trainer.strategy=ddp"]
    assert HardwareConfig(train_accelerator="gpu", train_devices=8, num_nodes=4, launcher=["srun"]).train_args() == [
        "--trainer.accelerator=gpu", "--trainer.devices=8", "--trainer.num_nodes=4", "--trainer.strategy=ddp"]
    assert HardwareConfig().train_args() == []

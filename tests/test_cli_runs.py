"""The CLI and the run-directory contract, on a toy stage (no models, seconds per run)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import subprocess_env

from kdlab.cli import condense_parse_error, main
from kdlab.runs import atomic_path, write_json_atomic

TOY = """
model:
  class_path: toy_stage.ToyRegression
  init_args: {hidden: 8}
data:
  class_path: toy_stage.ToyData
trainer:
  max_epochs: 2
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args: {save_dir: ignored}
  enable_progress_bar: false
  enable_model_summary: false
"""


def _kdlab(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kdlab", *args], cwd=tmp_path, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)


def _run_dir(proc: subprocess.CompletedProcess[str], cwd: Path) -> Path:
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("run directory: ")][-1]
    return cwd / line.removeprefix("run directory: ")


@pytest.fixture
def toy_config(tmp_path: Path) -> Path:
    path = tmp_path / "toy.yaml"
    path.write_text(TOY)
    return path


def test_two_runs_have_separate_complete_records_and_same_seed_same_metrics(tmp_path: Path, toy_config: Path) -> None:
    first = _run_dir(_kdlab(tmp_path, "fit", "--config", str(toy_config)), tmp_path)
    second = _run_dir(_kdlab(tmp_path, "fit", "--config", str(toy_config)), tmp_path)
    assert first != second and first.parent == second.parent == tmp_path / "runs" / "toy"
    for run in (first, second):
        config = yaml.safe_load((run / "config.yaml").read_text())
        assert config["seed_everything"] == 0
        assert config["model"]["init_args"]["hidden"] == 8
        assert config["run"]["dir"] is None
        manifest = json.loads((run / "manifest.json").read_text())
        assert manifest["status"] == "finished" and manifest["seed"] == 0
        assert manifest["git"]["sha"] is None or len(manifest["git"]["sha"]) == 40
        assert manifest["versions"]["torch"] and manifest["devices"]["world_size"] == 1
        assert manifest["start_time"] <= manifest["end_time"]
        assert (run / "checkpoints" / "last.ckpt").exists()
        assert not list(run.rglob("*.tmp")), "no temp files left behind"
    metrics = [json.loads((run / "metrics.json").read_text()) for run in (first, second)]
    assert "val/loss" in metrics[0]
    assert metrics[0] == metrics[1], "same config + same seed must give the same metrics"


def test_seed_override_is_recorded_and_changes_the_run(tmp_path: Path, toy_config: Path) -> None:
    run = _run_dir(_kdlab(tmp_path, "fit", "--config", str(toy_config), "--seed_everything=7",
                          "--model.init_args.lr=0.01", "--run.name=seven"), tmp_path)
    assert run.parent.name == "seven"
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["seed_everything"] == 7 and config["model"]["init_args"]["lr"] == 0.01


def test_repeated_config_composes_last_wins(tmp_path: Path, toy_config: Path) -> None:
    override = tmp_path / "override.yaml"
    override.write_text("model:\n  init_args: {hidden: 3}\ntrainer: {max_epochs: 1}\n")
    run = _run_dir(_kdlab(tmp_path, "fit", "--config", str(toy_config), "--config", str(override)), tmp_path)
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"]["init_args"]["hidden"] == 3 and config["trainer"]["max_epochs"] == 1


def test_config_typo_is_one_line_with_suggestion(tmp_path: Path, toy_config: Path) -> None:
    proc = _kdlab(tmp_path, "fit", "--config", str(toy_config), "--model.init_args.hiden=3")
    assert proc.returncode == 2
    err = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert err[-1] == ("error: unknown config key 'model.init_args.hiden' for toy_stage.ToyRegression "
                       "(did you mean 'hidden'?)")
    assert "Traceback" not in proc.stderr


def test_trainer_typo_message() -> None:
    assert condense_parse_error("Subcommand 'fit' does not accept option 'trainer.max_epoch'") == (
        "unknown config key 'trainer.max_epoch' (did you mean 'max_epochs'?)")


def test_help_lists_all_commands(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("fit", "validate", "test", "predict", "pipeline", "label", "sweep", "ablate", "models"):
        assert f"  {command}" in out
    assert main(["fitt"]) == 2
    assert "did you mean 'fit'" in capsys.readouterr().err


def test_checkpoint_reloads_for_test_from_run_directory_alone(tmp_path: Path, toy_config: Path) -> None:
    run = _run_dir(_kdlab(tmp_path, "fit", "--config", str(toy_config)), tmp_path)
    proc = _kdlab(tmp_path, "test", "--config", str(run / "config.yaml"),
                  "--ckpt_path", str(run / "checkpoints" / "last.ckpt"))
    test_run = _run_dir(proc, tmp_path)
    assert test_run != run
    assert "test/loss" in json.loads((test_run / "metrics.json").read_text())


def test_atomic_write_leaves_old_file_when_interrupted(tmp_path: Path) -> None:
    target = tmp_path / "metrics.json"
    write_json_atomic(target, {"a": 1})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text('{"a": 2, "half')
        raise RuntimeError("killed")
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_instantiation_errors_are_one_line(tmp_path: Path, repo_root: Path) -> None:
    """A missing backbone path raised inside jsonargparse's instantiation still reads as one line."""
    proc = _kdlab(tmp_path, "fit", "--config", str(repo_root / "experiments/quickstart/disranker/distill.yaml"),
                  "--model.init_args.backbone=./no-such-model", "--trainer.logger=false")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "error: model path './no-such-model' does not exist"
    assert "Traceback" not in proc.stderr

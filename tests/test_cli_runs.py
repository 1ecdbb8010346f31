"""The CLI and the run-directory contract, mostly on a toy stage (no models, seconds per run); short
class names, the ``teacher:`` group and the model-free command table on tiny models."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import subprocess_env
from kdlab.callbacks.run_record import scalar_metrics

from kdlab.cli import TOOL_COMMANDS, condense_parse_error, main, run_tool, tool_parser
from kdlab.defaults import LABEL_BATCH_TOKENS, PAIR_MAX_LENGTH
from kdlab.lightning_cli import parse_lightning, run_lightning
from kdlab.models.served import load_rank_teacher
from kdlab.runs import atomic_dir, atomic_path, slug, write_json_atomic

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
    # What a run records is the parsed config (the seed test above reads it back from a run), so
    # composition is checked on the parse, in this process.
    override = tmp_path / "override.yaml"
    override.write_text("model:\n  init_args: {hidden: 3}\ntrainer: {max_epochs: 1}\n")
    config = parse_lightning(["fit", "--config", str(toy_config), "--config", str(override)]).fit
    assert config.model.init_args.hidden == 3 and config.trainer.max_epochs == 1


def test_config_typo_is_one_line_with_suggestion(toy_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # In this process: `python -m kdlab` is `sys.exit(main())`; that no traceback reaches a real
    # terminal is checked in a subprocess by test_instantiation_errors_are_one_line.
    assert main(["fit", "--config", str(toy_config), "--model.init_args.hiden=3"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert err[-1] == ("error: unknown config key 'model.init_args.hiden' for toy_stage.ToyRegression "
                       "(did you mean 'hidden'?)")


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
    proc = _kdlab(tmp_path, "fit", "--config", str(repo_root / "experiments/quickstart/disranker/rank_sft.yaml"),
                  "--model.init_args.backbone=./no-such-model", "--trainer.logger=false")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "error: model path './no-such-model' does not exist"
    assert "Traceback" not in proc.stderr


def test_atomic_dir_replaces_whole_or_not_at_all(tmp_path: Path) -> None:
    target = tmp_path / "model"
    with atomic_dir(target) as build:
        (build / "a.txt").write_text("first")
    assert [p.name for p in target.iterdir()] == ["a.txt"]
    with pytest.raises(RuntimeError), atomic_dir(target) as build:
        (build / "b.txt").write_text("half")
        raise RuntimeError("killed mid-export")
    assert [p.name for p in target.iterdir()] == ["a.txt"] and (target / "a.txt").read_text() == "first"
    with atomic_dir(target) as build:
        (build / "c.txt").write_text("second")
    assert [p.name for p in target.iterdir()] == ["c.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"], "no temporary or old directories left"


def test_slug_keeps_safe_characters_only() -> None:
    assert slug("hybrid+TCL") == "hybrid_TCL"
    assert slug("point-only") == "point-only"
    assert slug("K=4, lr 0.5/x") == "K=4__lr_0.5_x"


def test_scalar_metrics_keeps_finite_scalars() -> None:
    metrics = {"a": torch.tensor(1.5), "b": 2, "c": float("nan"), "d": torch.tensor([1.0, 2.0]),
               "e": torch.tensor(float("inf")), "f": "text", "g": torch.tensor(3)}
    assert scalar_metrics(metrics) == {"a": 1.5, "b": 2.0, "g": 3.0}


@pytest.mark.parametrize("override,hint", [
    ("--model.init_args.teacher_path=/some/export",
     "unknown config key 'model.init_args.teacher_path' for kdlab.stages.RankDistillStudent (configure the "
     "teacher under `teacher:` (e.g. --teacher.backbone=DIR --teacher.task=ranker))"),
    ("--model.init_args.student=tiny-bert",
     "unknown config key 'model.init_args.student' for kdlab.stages.RankDistillStudent (the trainable model "
     "is 'backbone' in every stage)"),
])
def test_renamed_init_keys_give_one_line_hints(override: str, hint: str, repo_root: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    distill = repo_root / "experiments" / "quickstart" / "disranker" / "distill.yaml"
    assert main(["fit", "--config", str(distill), override]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err[-1] == f"error: {hint}"
    assert "Traceback" not in "\n".join(err)


def test_renamed_rl_keys_and_moved_callbacks_give_one_line_hints(repo_root: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    ketchup = str(repo_root / "experiments" / "quickstart" / "ketchup.yaml")
    for args, hint in (
        (["--model.init_args.warmup_steps_ce=3"], "(use 'ce_warmup_steps' (the cross-entropy objective schedule))"),
        (["--model.init_args.student_keep_layers=[0]"], "(use 'backbone_keep_layers')"),
        (["--trainer.callbacks+=kdlab.callbacks.TeacherLoader"],
         "TeacherLoader is configured under its own `teacher:` key, not in trainer.callbacks"),
        (["--trainer.callbacks+=GradVariance"],
         "GradVariance is configured under its own `grad_variance:` key, not in trainer.callbacks"),
    ):
        assert main(["fit", "--config", ketchup, *args]) == 2, args
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert err[-1].startswith("error: ") and hint in err[-1], (args, err[-3:])


# ------------------------------------------------------------------------- short names, teacher group
SHORT_NAMES = """
model:
  class_path: RankDistillStudent
  init_args:
    backbone: tiny-llama-h32
    architecture: decoder
    teacher_source: live
    lr: 1.0e-3
data:
  class_path: RankingDataModule
  init_args:
    tokenizer: tiny-llama-h32
    text_format: decoder
    num_negatives: 1
    batch_size: 2
    eval_batch_size: 2
    eval_max_docs: 4
    max_length: 48
trainer:
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
"""


@pytest.fixture
def ranker_export(tiny_ranker_export: Path) -> Path:
    return tiny_ranker_export


def test_short_class_names_parse_and_fast_run_with_a_live_teacher(tmp_path: Path, ranker_export: Path) -> None:
    """``class_path: RankDistillStudent`` / ``RankingDataModule`` resolve without their module, and a
    live teacher comes from the ``teacher:`` group (``--teacher.backbone`` / ``--teacher.task``)."""
    config = tmp_path / "short.yaml"
    config.write_text(SHORT_NAMES)
    teacher = [f"--teacher.backbone={ranker_export}", "--teacher.task=ranker"]
    parsed = parse_lightning(["fit", "--config", str(config), *teacher]).fit
    assert parsed.model.class_path.startswith("kdlab.") and parsed.model.class_path.endswith(".RankDistillStudent")
    assert parsed.data.class_path.startswith("kdlab.") and parsed.data.class_path.endswith(".RankingDataModule")
    assert parsed.teacher.backbone == str(ranker_export) and parsed.teacher.task == "ranker"

    run = run_lightning(["fit", "--config", str(config), *teacher, "--trainer.fast_dev_run=1",
                         f"--run.dir={tmp_path / 'run'}"])
    assert json.loads((run / "manifest.json").read_text())["status"] == "finished"
    recorded = yaml.safe_load((run / "config.yaml").read_text())
    assert recorded["teacher"]["backbone"] == str(ranker_export) and recorded["teacher"]["task"] == "ranker"
    assert recorded["model"]["class_path"].endswith("RankDistillStudent")
    assert "train/loss" in json.loads((run / "metrics.json").read_text())
    assert load_rank_teacher(str(run / "model")).text_format == "decoder"


def test_live_student_without_a_teacher_stops_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "short.yaml"
    config.write_text(SHORT_NAMES)
    assert main(["fit", "--config", str(config), "--trainer.fast_dev_run=1", f"--run.dir={tmp_path / 'run'}"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err[-1].startswith("error: RankDistillStudent needs a teacher: set teacher.backbone"), err[-3:]


# ------------------------------------------------------------------------------------ tool commands
def test_label_command_runs_through_the_tool_table(tmp_path: Path, ranker_export: Path) -> None:
    from kdlab.data import sample_path

    assert set(TOOL_COMMANDS) == {"pipeline", "label", "data", "export", "sweep", "ablate", "models"}
    label = tool_parser("label").parse_args(["--teacher=T", "--input=I", "--output=O"])
    assert (label.max_tokens, label.max_length, label.resume) == (LABEL_BATCH_TOKENS, PAIR_MAX_LENGTH, True)

    source = tmp_path / "groups.jsonl"
    source.write_text("".join(Path(sample_path("ranking_val.jsonl")).read_text().splitlines(True)[:3]))
    output = tmp_path / "labeled.jsonl"
    produced = run_tool("label", [f"--teacher={ranker_export}", f"--input={source}", f"--output={output}",
                                  "--max_length=48"])
    assert produced == [output]
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(rows) == 3 and all(isinstance(d["teacher_score"], float) for r in rows for d in r["docs"])


def test_tool_commands_with_positional_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    sweep = tool_parser("sweep").parse_args(["my_sweep.yaml", "--jobs=3"])
    assert sweep.sweep_file == "my_sweep.yaml" and sweep.jobs == 3 and sweep.dry_run is False
    assert tool_parser("models").parse_args(["prepare", "minilm-l6"]).alias == "minilm-l6"
    assert tool_parser("models").parse_args(["list"]).alias == "all"  # the optional positional's default
    assert run_tool("models", ["list"]) == []
    assert "minilm-l6" in capsys.readouterr().out


def test_listwise_label_mode_is_one_device_and_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    label = tool_parser("label").parse_args(["--teacher=tiny-llama", "--input=I", "--output=O", "--mode=listwise"])
    assert (label.mode, label.top_k, label.bottom_k) == ("listwise", 10, 10)
    assert main(["label", "--teacher=tiny-llama", "--input=I", "--output=O", "--mode=listwise", "--devices=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: listwise labeling runs on one device") and len(err.splitlines()) == 1

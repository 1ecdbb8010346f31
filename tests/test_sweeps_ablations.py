"""Local sweeps and ablations on the toy stage: expansion, resume, tables, reproducibility."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml
from conftest import subprocess_env

from kdlab.ablations import AblationError, load_ablation, paired_p_value, run_ablation, summarize
from kdlab.sweeps import SweepError, expand, load_sweep, render_command, run_sweep

TOY = """
model:
  class_path: toy_stage.ToyRegression
data:
  class_path: toy_stage.ToyData
trainer:
  max_epochs: 1
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  enable_checkpointing: false
"""


@pytest.fixture
def toy_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "toy.yaml").write_text(TOY)
    monkeypatch.chdir(tmp_path)
    for key, value in subprocess_env().items():
        monkeypatch.setenv(key, value)
    return tmp_path


def test_render_command_matches_wandb_macros() -> None:
    argv = render_command(["${env}", "python", "-m", "kdlab", "fit", "--config", "x.yaml", "${args}"],
                          {"model.init_args.k": 4, "model.init_args.alpha": 0.5})
    assert argv == ["fit", "--config", "x.yaml", "--model.init_args.k=4", "--model.init_args.alpha=0.5"]


def test_sweep_file_errors_name_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: grid\nparameters:\n  model.init_args.k: {values: [1, null]}\ncommand:\n  - ${args}\n")
    with pytest.raises(SweepError, match=r"bad.yaml: field 'parameters.model.init_args.k': null"):
        load_sweep(bad)
    bad.write_text("method: grd\nparameters: {a: {values: [1]}}\ncommand:\n  - ${args}\n")
    with pytest.raises(SweepError, match="field 'method'"):
        load_sweep(bad)
    bad.write_text("method: grid\ncommand: [${args}]\n")
    with pytest.raises(SweepError, match=r"bad.yaml:2: not valid YAML"):
        load_sweep(bad)


def test_grid_sweep_runs_resumes_and_writes_csv(toy_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sweep = toy_env / "lr.yaml"
    sweep.write_text(yaml.safe_dump({
        "method": "grid", "metric": {"name": "val/loss", "goal": "minimize"},
        "parameters": {"model.init_args.lr": {"values": [0.01, 0.1]}, "model.init_args.hidden": {"value": 4}},
        "command": ["${env}", "python", "-m", "kdlab", "fit", "--config", "toy.yaml", "${args}"],
    }))
    assert len(expand(load_sweep(sweep))) == 2
    table = run_sweep(str(sweep), root="sweeps", jobs=2)
    rows = list(csv.DictReader(open(table)))
    assert [r["model.init_args.lr"] for r in rows] == ["0.01", "0.1"]
    assert all(float(r["val/loss"]) > 0 and Path(r["run_dir"]).is_dir() for r in rows)
    capsys.readouterr()
    run_sweep(str(sweep), root="sweeps")
    assert capsys.readouterr().out.count("finished earlier") == 2


def test_ablation_is_byte_identical_across_reruns(toy_env: Path) -> None:
    ablation = toy_env / "abl.yaml"
    ablation.write_text(yaml.safe_dump({
        "name": "toy_lr", "base": ["--config", "toy.yaml"], "seeds": [1],
        "variants": {"base": [], "lr=0.2 (fast)": ["--model.init_args.lr=0.2"]},
        "metrics": ["val/loss"], "goals": {"val/loss": "minimize"},
    }))
    first = run_ablation(str(ablation), root="a1", jobs=2)  # both runs at once: order of finishing varies
    second = run_ablation(str(ablation), root="a2", jobs=2)
    assert first.read_bytes() == second.read_bytes()
    text = first.read_text()
    assert "| base |" in text and "| lr=0.2 (fast) |" in text and "**" in text
    # run directories are kdlab.runs.slug(variant): `- _ = .` kept, anything else `_`
    assert sorted(p.name for p in first.parent.iterdir() if p.is_dir()) == ["base", "lr=0.2__fast_"]
    assert (first.parent / "lr=0.2__fast_" / "seed1" / "manifest.json").is_file()
    assert (first.parent / "ablation.png").stat().st_size > 1000


@pytest.mark.slow  # 50 s; the byte-identical rerun above keeps an ablation in the default suite
def test_ablation_setup_commands_reference_rows_and_ratios(toy_env: Path) -> None:
    ablation = toy_env / "abl.yaml"
    ablation.write_text(yaml.safe_dump({
        "name": "toy_ref", "base": ["--config", "toy.yaml"], "seeds": [0],
        "setup": {"untrained": {"command": "validate", "args": ["--config", "toy.yaml"]}},
        "references": ["untrained"], "ratios": ["val/loss"], "report": "report.md",
        "variants": {"base": [], "fast": ["--model.init_args.lr=0.2"]},
        "metrics": ["val/loss"], "goals": {"val/loss": "minimize"},
    }))
    report = run_ablation(str(ablation), root="out")
    assert report.name == "report.md" and report.with_suffix(".png").exists()
    record = yaml.safe_load((report.parent / "setup-untrained" / "manifest.json").read_text())
    assert record["command"] == "validate"
    untrained = yaml.safe_load(report.with_suffix(".json").read_text())["references"]["untrained (setup)"]
    rows = {line.split("|")[1].strip(): line for line in report.read_text().splitlines() if line.startswith("| ")}
    assert f"{untrained['val/loss'][0]:.4f}" in rows["untrained (setup)"]
    base, fast = (yaml.safe_load(report.with_suffix(".json").read_text())["metrics"][v]["val/loss"][0]
                  for v in ("base", "fast"))
    assert rows["base"].rstrip(" |").endswith("1.000")
    assert rows["fast"].rstrip(" |").endswith(f"{fast / base:.3f}")


def test_ablation_file_errors_name_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    common = {"base": ["--config", "x.yaml"], "seeds": [0], "variants": {"a": []}, "metrics": ["val/loss"]}
    for extra, field in (({"references": ["nope"]}, "references"), ({"ratios": ["val/acc"]}, "ratios"),
                         ({"setup": {"t": {"command": "validate"}}}, "setup.t"), ({"report": "a/b.txt"}, "report")):
        bad.write_text(yaml.safe_dump({**common, **extra}))
        with pytest.raises(AblationError, match=f"field '{field}'"):
            load_ablation(bad)


def test_summary_and_paired_test_by_hand() -> None:
    mean, std = summarize([1.0, 2.0, 3.0])
    assert mean == 2.0 and std == 1.0
    # differences 1, 2, 3 → mean 2, sd 1, t = 2 / (1/sqrt 3) = 3.4641, df 2 → p = 0.07418
    assert paired_p_value([2.0, 4.0, 6.0], [1.0, 2.0, 3.0]) == pytest.approx(0.07418, abs=1e-4)
    assert paired_p_value([1.0, 2.0], [1.0, 2.0]) != paired_p_value([1.0, 2.0], [1.0, 2.0])  # NaN: no difference



def test_ablation_substitutes_the_seed_into_arguments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``{seed}`` in the base or a variant becomes the run's seed (e.g. the data order's seed)."""
    import kdlab.ablations as ablations

    launched: list[list[str]] = []

    def record(args: list[str], run_dir: Path, **_: object) -> dict[str, float]:
        launched.append(args)
        return {"val/loss": float(len(launched))}

    monkeypatch.setattr(ablations, "launch_run", record)
    spec = tmp_path / "abl.yaml"
    spec.write_text(yaml.safe_dump({"name": "s", "base": ["--data.init_args.seed={seed}"], "seeds": [3, 7],
                                    "variants": {"a": ["--x={seed}{seed}"]}, "metrics": ["val/loss"]}))
    ablations.run_ablation(str(spec), root=str(tmp_path / "out"))
    assert launched == [["--data.init_args.seed=3", "--x=33", "--seed_everything=3"],
                        ["--data.init_args.seed=7", "--x=77", "--seed_everything=7"]]


def test_a_collapsed_generation_run_is_flagged_and_never_ranked(tmp_path: Path) -> None:
    """``collapse: {reference: start}``: a run shorter than half the start's outputs, or below the
    start's teacher log-likelihood per token, is marked and not bold, however high its ROUGE."""
    from kdlab.ablations import ablation_markdown, collapsed_runs

    path = tmp_path / "a.yaml"
    path.write_text(yaml.safe_dump({
        "name": "c", "base": ["--x"], "setup": {"start": ["--y"]}, "references": ["start"], "seeds": [0, 1],
        "variants": {"ok": [], "short": [], "off-teacher": []}, "collapse": {"reference": "start"},
        "metrics": ["val/rougeL", "val/gen_length", "val/teacher_logprob"]}))
    spec = load_ablation(path)
    start = {"start": {"val/rougeL": 0.12, "val/gen_length": 20.0, "val/teacher_logprob": -2.0}}
    runs = {("ok", 0): (0.13, 19.0, -1.9), ("ok", 1): (0.125, 21.0, -2.0),
            ("short", 0): (0.30, 9.9, -1.0), ("short", 1): (0.31, 12.0, -1.0),  # seed 0: 9.9 < 0.5 × 20
            ("off-teacher", 0): (0.2, 20.0, -2.01), ("off-teacher", 1): (0.2, 20.0, -2.5)}
    results = {cell: dict(zip(spec.metrics, values)) for cell, values in runs.items()}
    collapsed = collapsed_runs(spec, results, start)
    assert collapsed == {"ok": [False, False], "short": [True, False], "off-teacher": [True, True]}
    table = {v: {m: [results[(v, s)][m] for s in spec.seeds] for m in spec.metrics} for v in spec.variants}
    text = ablation_markdown(spec, table, {}, collapsed)
    assert "| short (COLLAPSED 1/2 seeds) | 0.3050 ± 0.0071 |" in text
    assert "| off-teacher (COLLAPSED 2/2 seeds) |" in text
    assert "| ok | **0.1275 ± 0.0035** |" in text  # the best ROUGE among the runs that did not collapse
    with pytest.raises(AblationError, match="collapse"):
        path.write_text(path.read_text().replace("reference: start", "reference: nowhere"))
        load_ablation(path)

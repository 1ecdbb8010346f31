"""Every YAML under experiments/ is parsed against the code, and every stage config runs with
``--trainer.fast_dev_run=1``.

Real-use configs name models and files the test machine does not have (``/path/to/llm``, an alias
of real weights): those values are swapped for tiny models by name (``tiny-llama-h32``,
``tiny-bert-h32``), the teacher (``teacher.backbone``) for a tiny exported causal LM, files for the
embedded sample, and distillation data for a small teacher-scored file. What is tested is that the
YAML's keys, types and class paths match the code and that one training + validation step runs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO

from kdlab.cli import tool_parser
from kdlab.lightning_cli import parse_lightning, run_lightning

EXPERIMENTS = REPO / "experiments"
PLACEHOLDER = re.compile(r"^(/path/to/|PATH/TO/|runs/)|^(smollm2-135m|minilm-l6)$")
MODEL_KEYS = {"backbone", "tokenizer"}
TINY_ENCODER, TINY_DECODER = "tiny-bert-h32", "tiny-llama-h32"


def _kind(data: dict[str, Any]) -> str:
    if "model" in data:
        return "stage"
    if "cpt_config" in (data.get("recipe") or {}):
        return "pipeline"
    if "parameters" in data and "command" in data:
        return "sweep"
    if "variants" in data and "seeds" in data:
        return "ablation"
    return "fragment"


def _all_yamls() -> list[Path]:
    return sorted(p for p in EXPERIMENTS.rglob("*.yaml"))


def _load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text()) or {}


def test_every_yaml_is_known_kind() -> None:
    kinds = {str(p.relative_to(REPO)): _kind(_load(p)) for p in _all_yamls()}
    assert kinds, "no experiment YAMLs found"
    fragments = [p for p, k in kinds.items() if k == "fragment"]
    # fragments are only shared bases, logger add-ons and data domains, each used with a full config below
    assert all(p.endswith("base.yaml") or "/loggers/" in p or "/domains/" in p for p in fragments), fragments


def test_every_domain_composes_with_the_main_job_and_changes_only_data() -> None:
    """experiments/domains/*.yaml go after the main job's config (``--config main --config domain``):
    the result is the main job with other data, and nothing but data, the name and the pre-ranker's
    name may change."""
    from kdlab.cli import tool_parser

    main = EXPERIMENTS / "quickstart" / "disranker.yaml"
    base = tool_parser("pipeline").parse_args(["--config", str(main)]).as_dict()
    domains = sorted((EXPERIMENTS / "domains").glob("*.yaml"))
    assert domains
    for domain in domains:
        assert set(_load(domain)) <= {"name", "data", "report"}, domain
        both = tool_parser("pipeline").parse_args(["--config", str(main), "--config", str(domain)]).as_dict()
        changed = {f"{section}.{key}" for section in both if isinstance(both[section], dict)
                   for key in both[section] if both[section][key] != base[section].get(key)}
        assert changed <= {f"data.{k}" for k in both["data"]} | {"report.pre_ranker_name"}, (domain, changed)
        assert both["recipe"] == base["recipe"] and both["budget"] == base["budget"], domain


@pytest.fixture(scope="module")
def labeled_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Small ranking files with teacher scores (label + a per-document offset) and reasons, for distill configs."""
    from kdlab.data import sample_path

    out = tmp_path_factory.mktemp("labels")
    files = {}
    for split in ("train", "val"):
        rows = [json.loads(line) for line in Path(sample_path(f"ranking_{split}.jsonl")).read_text().splitlines()[:24]]
        for row in rows:
            for j, doc in enumerate(row["docs"]):
                doc["teacher_score"] = float(doc["label"]) - 0.01 * j
                # an LLM's reason, for RRA-GPT configs (other students ignore it)
                doc["reason"] = "The passage answers the query." if doc["label"] else "The passage is off topic."
        path = out / f"{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        files[split] = str(path)
    return files


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An exported tiny causal LM (the quickstart KETCHUP teacher config, one step)."""
    run_dir = tmp_path_factory.mktemp("teacher") / "run"
    run_lightning(["fit", "--config", str(EXPERIMENTS / "quickstart" / "ketchup_teacher.yaml"),
                   "--trainer.fast_dev_run=1", f"--run.dir={run_dir}", "--trainer.logger=false"])
    assert (run_dir / "model" / "config.json").exists()
    return str(run_dir / "model")


# Budgets that real-use configs size for a GPU (a 128-token rollout of 32 sequences, 8 gradient-
# variance rollouts): the fast run keeps the key and its type, at a size a CPU test can afford.
TINY_BUDGETS = {"max_new_tokens": 8, "num_rollouts": 2, "num_samples_per_prompt": 2, "eval_batch_size": 4}


def _tiny_substitute(data: Any, *, encoder: bool, teacher: str, labels: dict[str, str], distill: bool,
                     key: str | None = None) -> Any:
    """Swap real-use placeholders for tiny models / sample data, keeping every key and type."""
    if key == "backbone_keep_layers" and isinstance(data, list):
        return [0]  # a layer the 1-layer tiny-llama-h32 has
    if key in TINY_BUDGETS and isinstance(data, int):
        return min(data, TINY_BUDGETS[key])
    if key == "teacher" and isinstance(data, dict):  # the `teacher:` group (TeacherLoader)
        return {**{k: v for k, v in data.items() if k != "config"}, "backbone": teacher}
    if isinstance(data, dict):
        return {k: _tiny_substitute(v, encoder=encoder, teacher=teacher, labels=labels, distill=distill, key=k)
                for k, v in data.items()}
    if isinstance(data, list):
        return [_tiny_substitute(v, encoder=encoder, teacher=teacher, labels=labels, distill=distill) for v in data]
    if isinstance(data, str) and PLACEHOLDER.search(data):
        if key in MODEL_KEYS:
            return TINY_ENCODER if encoder else TINY_DECODER
        if key in ("train", "val") and distill:
            return labels[key]
        if key and (key.endswith("_path") or key in RANKING_SPLITS):
            return None
    return data


RANKING_SPLITS = ("train", "val", "test", "predict")  # RankingDataModule's sources


def _stage_cases() -> list[tuple[str, list[Path]]]:
    cases = []
    for path in _all_yamls():
        data = _load(path)
        if _kind(data) != "stage":
            continue
        base = path.parent / "base.yaml"
        files = [base, path] if base.exists() and base != path and _kind(_load(base)) == "fragment" else [path]
        cases.append((str(path.relative_to(REPO)), files))
    return cases


def _merge(dst: dict[str, Any], src: dict[str, Any]) -> dict[str, Any]:
    for key, value in src.items():
        if isinstance(value, dict) and isinstance(dst.get(key), dict) and "class_path" not in value:
            _merge(dst[key], value)
        elif isinstance(value, dict) and isinstance(dst.get(key), dict) and value.get("class_path") in (None, dst[key].get("class_path")):
            _merge(dst[key], value)
        else:
            dst[key] = value
    return dst


@pytest.mark.parametrize("name,files", _stage_cases(), ids=[c[0] for c in _stage_cases()])
def test_stage_config_fast_dev_run(name: str, files: list[Path], tmp_path: Path, labeled_files: dict[str, str],
                                   tiny_teacher: str) -> None:
    parse_lightning(["fit", *[a for f in files for a in ("--config", str(f))]])  # the YAML as written
    merged: dict[str, Any] = {}
    for f in files:
        _merge(merged, _load(f))
    model_class = str(merged["model"]["class_path"])
    init = merged["model"].get("init_args") or {}
    encoder = model_class.endswith("RankDistillStudent") and init.get("architecture", "cross-encoder") == "cross-encoder"
    distill = model_class.endswith("RankDistillStudent")
    tiny = _tiny_substitute(merged, encoder=encoder, teacher=tiny_teacher, labels=labeled_files, distill=distill)
    tiny.pop("run", None)
    if distill:
        data_args = tiny["data"].setdefault("init_args", {})
        data_args.update(train=labeled_files["train"], val=labeled_files["val"])
    if distill and (tiny["model"].get("init_args") or {}).get("teacher_source") == "live":
        tiny["model"]["init_args"]["teacher_source"] = "data"
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny, sort_keys=False))
    run_dir = run_lightning(["fit", "--config", str(config), "--trainer.fast_dev_run=1",
                             "--trainer.precision=32-true", "--trainer.accelerator=cpu", "--trainer.devices=1",
                             "--trainer.strategy=auto", f"--run.dir={tmp_path / 'run'}"])
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "finished", name


def test_logger_fragments_compose() -> None:
    base = EXPERIMENTS / "quickstart" / "disranker"
    for fragment in sorted((EXPERIMENTS / "loggers").glob("*.yaml")):
        config = parse_lightning(["fit", "--config", str(base / "base.yaml"), "--config", str(base / "cpt.yaml"),
                                  "--config", str(fragment)])
        assert config.fit.trainer.logger.class_path.startswith("lightning.pytorch.loggers.")


def test_sweep_commands_parse_against_cli() -> None:
    from kdlab.sweeps import expand, load_sweep

    for path in sorted((EXPERIMENTS / "sweeps").glob("*.yaml")):
        for run in expand(load_sweep(path), seed=0)[:3]:
            parse_lightning(run.argv)


def test_ablation_runs_parse_against_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every setup run and variant of every ablation file, as ``run_ablation`` renders it (``{setup.X}``
    substituted), is a command line the CLI accepts. The runs themselves are replaced by a parse."""
    import kdlab.ablations as ablations

    launched: list[tuple[str, list[str], Path]] = []
    parsed: set[tuple[str, ...]] = set()

    def parse_instead_of_running(args: list[str], run_dir: Path, *, label: str | None = None,
                                 command: str = "fit", quiet: bool = True) -> dict[str, float]:
        assert not any("{setup." in arg for arg in args), args
        # A variant's seeds differ only in --seed_everything=N: one parse per variant (~0.5 s each).
        key = (command, *(arg for arg in args if not arg.startswith("--seed_everything=")))
        if key not in parsed:
            parse_lightning([command, *args])
            parsed.add(key)
        launched.append((command, args, Path(run_dir)))
        return {metric: float(len(launched)) for metric in spec.metrics}

    monkeypatch.setattr(ablations, "launch_run", parse_instead_of_running)
    # ~1 s of matplotlib per file; the plot is tested in test_sweeps_ablations.py
    monkeypatch.setattr(ablations, "plot_ablation", lambda *args, **kwargs: None)
    monkeypatch.chdir(REPO)  # ablation files name configs relative to the repository
    for path in sorted(p for p in _all_yamls() if _kind(_load(p)) == "ablation"):
        spec = ablations.load_ablation(path)
        launched.clear()
        report = ablations.run_ablation(str(path), root=str(tmp_path / "ablations"))
        assert len(launched) == len(spec.setup) + len(spec.variants) * len(spec.seeds), path
        assert report.is_file()
        if any("{setup." in arg for arg in spec.base):  # the variants read a setup run's output
            setup_dirs = [str(run_dir.resolve()) for _, _, run_dir in launched[:len(spec.setup)]]
            assert any(d in arg for arg in launched[-1][1] for d in setup_dirs), path


def test_pipeline_configs_parse() -> None:
    for path in sorted(p for p in _all_yamls() if _kind(_load(p)) == "pipeline"):
        cfg = tool_parser("pipeline").parse_args(["--config", str(path)])
        for key in ("cpt_config", "rank_sft_config", "distill_config"):
            assert (REPO / cfg.recipe[key]).exists(), f"{path}: recipe.{key} names a missing file"


def test_the_paper_ketchup_table_builds_every_step() -> None:
    """experiments/ablations/ketchup_table_paper.yaml (the paper's XSum / GSM8K rows, one command):
    every setup run and variant parses as the ablation renders it, keeps the paper's settings, and
    its stage and data module build with tiny stand-ins for the models and files (no weights)."""
    import kdlab.ablations as ablations
    from kdlab.lightning_cli import import_class

    spec = ablations.load_ablation(EXPERIMENTS / "ablations" / "ketchup_table_paper.yaml")
    assert len(spec.variants) == 16 and spec.seeds == [0, 1, 2]
    steps = {f"setup {name}": args for name, args in spec.setup.items()}
    steps.update({name: [*spec.base, *args] for name, args in spec.variants.items()})
    built = {}
    for name, args in steps.items():
        # a setup run's output stands for a placeholder model, so the tiny swap below replaces it
        rendered = [a.replace("{setup.", "/path/to/setup-").replace("}/model", "/model") for a in args]
        cfg = parse_lightning(["fit", *rendered, "--seed_everything=0"]).fit.as_dict()
        init = cfg["model"]["init_args"]
        xsum = "XSum" in name or "xsum" in name
        assert (init["lr"], cfg["trainer"]["accumulate_grad_batches"], cfg["data"]["init_args"]["batch_size"]) == (1e-5, 8, 1)
        assert cfg["trainer"]["max_steps"] == (20000 if xsum else 10000)
        assert cfg["data"]["init_args"]["max_source_length"] == (512 if xsum else 256)
        if init["objective"] == "pg":
            assert (init["greedy_rollouts"], init["kstep_tail"], init["pg_weight"], init["weight_clip"],
                    init["baseline"]) == (True, "last-state", "student-prob", 50.0, "none")
        tiny = _tiny_substitute({k: cfg[k] for k in ("model", "data")}, encoder=False, teacher="unused", labels={},
                                distill=False)
        tiny["data"]["init_args"].update(train_path=None, val_path=None, test_path=None)
        model = import_class(tiny["model"]["class_path"])(**tiny["model"]["init_args"])
        import_class(tiny["data"]["class_path"])(**tiny["data"]["init_args"])
        built[name] = (init["objective"], init["k"], type(model).__name__)
    assert built["XSum KETCHUP K=16"] == ("pg", 16, "RLDistillKStep") and built["setup gsm8k-kl"][0] == "kl"
    assert sorted({k for o, k, _ in built.values() if o == "pg"}) == [1, 2, 4, 8, 16]


def test_generation_runs_write_every_evaluation_example_by_example(tmp_path: Path, tiny_teacher: str) -> None:
    """RLDistillKStep in a run directory writes val_generations/step{N}.jsonl (loader order), whose
    lengths average to the logged val/gen_length: what scripts/ketchup_paired.py compares."""
    run_dir = run_lightning([
        "fit", "--config", str(EXPERIMENTS / "quickstart" / "ketchup.yaml"), f"--teacher.backbone={tiny_teacher}",
        "--model.init_args.max_new_tokens=4", "--model.init_args.ce_warmup_steps=0", "--trainer.max_steps=2",
        "--trainer.val_check_interval=2", "--trainer.check_val_every_n_epoch=null", "--trainer.limit_val_batches=1",
        "--data.init_args.eval_batch_size=3", "--data.init_args.batch_size=2", "--grad_variance.every_n_steps=1000",
        "--trainer.logger=false", f"--run.dir={tmp_path / 'run'}",
    ])
    rows = [json.loads(line) for line in (run_dir / "val_generations" / "step2.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    assert set(rows[0]) == {"prediction", "target", "gen_length", "teacher_logprob"}
    assert all(isinstance(r["teacher_logprob"], float) and r["teacher_logprob"] <= 0 for r in rows)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["val/gen_length"] == pytest.approx(sum(r["gen_length"] for r in rows) / 3)

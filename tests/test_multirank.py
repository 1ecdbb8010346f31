"""Multi-rank: DDP on 2 CPU processes (gloo) through `python -m kdlab fit` equals 1 process with the same
global batch; retrieval metrics synced over 2 ranks equal the 1-rank value; gradient accumulation
(batch 8 × 1) equals (batch 4 × accumulate 2); both ranks of a DDP run share one run directory.

Tolerances (float32 everywhere):
* loss trajectories: relative 1e-5 per step. 1 and 2 ranks compute the same mean gradient, only the
  summation order differs (two half-batch means averaged by the DDP all-reduce vs one mean), i.e.
  rounding at float32 epsilon (~1.2e-7, observed ≤ 1.3e-7 over 16 toy and 8 student steps);
  1e-5 leaves room for that to grow over a few steps and still catches any real difference (a
  different batch, a loss summed instead of averaged, an un-synced gradient: all ≥ 1e-2).
* final parameters: absolute 1e-5 (toy, SGD) and 1e-4 (tiny BERT, AdamW, which divides by
  sqrt(v) and so amplifies rounding in small gradients; observed 3.6e-6).
* retrieval metrics on fixed scores: exact (1e-7; integer-count and per-query states, see
  kdlab.metrics). On a trained student: 1e-5 (the scores differ by rounding only; a near-tie
  flipping the order would change NDCG by far more).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import subprocess_env

DDP = ["--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu"]

TOY = """
model:
  class_path: toy_stage.ToyRegression
  init_args: {hidden: 8, lr: 0.05}
data:
  class_path: _ddp_fit_script.OrderedToyData
  init_args: {n: 64, batch_size: 8}
trainer:
  max_epochs: 2
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
"""

STUDENT = """
model:
  class_path: kdlab.stages.RankDistillStudent
  init_args:
    backbone: tiny-bert
    backbone_config: {{hidden_dropout_prob: 0.0, attention_probs_dropout_prob: 0.0}}
    alpha: 1.0
    beta: 1.0
    lr: 1.0e-3
    weight_decay: 0.0
data:
  class_path: kdlab.data.RankingDataModule
  init_args:
    world_size_invariant: true
    train: {train}
    val: {val}
    num_negatives: 3
    batch_size: 4
    eval_batch_size: 4
    max_length: 64
trainer:
  max_epochs: 1
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  num_sanity_val_steps: 0
"""


def _kdlab(cwd: Path, *args: str) -> Path:
    proc = subprocess.run([sys.executable, "-m", "kdlab", *args], cwd=cwd, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("run directory: ")]
    assert len(lines) == 1, proc.stdout  # printed by rank 0 only
    return cwd / lines[0].removeprefix("run directory: ")


def _trace_args(out: Path) -> list[str]:
    return ["--trainer.callbacks+=_ddp_fit_script.LossTrace", f"--trainer.callbacks.init_args.out={out}"]


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


def _assert_same_trajectory(one: dict, two: dict, params_atol: float, skip: tuple[str, ...] = ()) -> None:
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert one["steps"] == two["steps"]
    a, b = torch.tensor(one["losses"]), torch.tensor(two["losses"])
    assert not torch.equal(a[0].expand_as(a), a), "the loss must move, or the comparison says nothing"
    torch.testing.assert_close(b, a, rtol=1e-5, atol=0.0)
    assert one["params"].keys() == two["params"].keys()
    for name in one["params"]:
        if name in skip:
            continue
        torch.testing.assert_close(torch.tensor(two["params"][name]), torch.tensor(one["params"][name]),
                                   rtol=0.0, atol=params_atol, equal_nan=True, msg=name)


# ------------------------------------------------------------------------------------------ toy stage
@pytest.fixture(scope="module")
def toy_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One 1-rank run (batch 8) and one 2-rank DDP run (batch 4 per rank), no `--run.dir`."""
    cwd = tmp_path_factory.mktemp("toy")
    (cwd / "toy.yaml").write_text(TOY)
    one = _kdlab(cwd, "fit", "--config", "toy.yaml", "--run.name=one", *_trace_args(cwd / "t1"))
    two = _kdlab(cwd, "fit", "--config", "toy.yaml", "--run.name=two", *DDP, "--data.init_args.batch_size=4",
                 *_trace_args(cwd / "t2"))
    return {"cwd": cwd, "one": one, "two": two}


def test_ddp_two_cpu_ranks_same_loss_trajectory_as_one_rank_toy(toy_runs: dict[str, Path]) -> None:
    cwd = toy_runs["cwd"]
    _assert_same_trajectory(_read(cwd / "t1" / "trace.json"), _read(cwd / "t2" / "trace.json"), params_atol=1e-5)
    manifest = _read(toy_runs["two"] / "manifest.json")
    assert manifest["devices"]["world_size"] == 2 and manifest["devices"]["strategy"] == "DDPStrategy"
    assert manifest["status"] == "finished"


def test_ddp_ranks_resolve_one_run_directory_written_once(toy_runs: dict[str, Path]) -> None:
    """Rank 1 is re-launched by Lightning with the parent's environment: it must pick up
    KDLAB_RUN_DIR and not create a run directory of its own."""
    cwd, run = toy_runs["cwd"], toy_runs["two"]
    ranks = [_read(cwd / "t2" / f"rank{r}.json") for r in (0, 1)]
    assert ranks[0]["pid"] != ranks[1]["pid"]
    assert [(cwd / r["default_root_dir"]).resolve() for r in ranks] == [run.resolve()] * 2, ranks
    assert sorted(p.name for p in (cwd / "runs" / "two").iterdir()) == [run.name], "one run directory only"
    assert {p.name for p in run.iterdir()} >= {"config.yaml", "manifest.json", "metrics.json", "checkpoints"}
    assert str(yaml.safe_load((run / "config.yaml").read_text())["trainer"]["devices"]) == "2"
    assert not list(run.rglob("*.tmp"))


def test_a_ddp_run_launched_by_launch_run_equals_the_plain_one(toy_runs: dict[str, Path],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Pipelines, sweeps and ablations launch runs through ``launch_run`` (``python -m kdlab`` in a
    subprocess, output to a log, a progress bar); Lightning then relaunches ``python -m
    kdlab.__main__`` for rank 1. The run equals the DDP run started by hand: the same losses and
    parameters to the last bit, the same metrics, both ranks in one run directory."""
    from kdlab import runs

    cwd = toy_runs["cwd"]
    monkeypatch.chdir(cwd)
    for key, value in subprocess_env().items():
        monkeypatch.setenv(key, value)
    run = cwd / "runs" / "launched"
    metrics = runs.launch_run(["--config", "toy.yaml", "--run.name=launched", *DDP, "--data.init_args.batch_size=4",
                               *_trace_args(cwd / "t3")], run)
    assert _read(cwd / "t3" / "trace.json") == _read(cwd / "t2" / "trace.json")
    assert metrics == _read(toy_runs["two"] / "metrics.json")
    ranks = [_read(cwd / "t3" / f"rank{r}.json") for r in (0, 1)]
    assert ranks[0]["pid"] != ranks[1]["pid"] and [r["world_size"] for r in ranks] == [2, 2]
    assert [(cwd / r["default_root_dir"]).resolve() for r in ranks] == [run.resolve()] * 2


# ------------------------------------------------------------------------------- RankDistillStudent
@pytest.mark.slow  # ~35 s on 2 cores: three processes importing transformers
def test_ddp_rank_distill_student_same_trajectory_and_metrics(tmp_path: Path) -> None:
    from _ddp_fit_script import labelled_ranking_file

    from kdlab.data import sample_path

    train = labelled_ranking_file(sample_path("ranking_train.jsonl"), tmp_path / "train.jsonl", 32, min_negatives=3)
    val = labelled_ranking_file(sample_path("ranking_val.jsonl"), tmp_path / "val.jsonl", 20, max_docs=12)
    (tmp_path / "student.yaml").write_text(STUDENT.format(train=train, val=val))
    common = ["fit", "--config", "student.yaml", "--run.export_model=false"]
    one = _kdlab(tmp_path, *common, "--run.name=one", *_trace_args(tmp_path / "t1"))
    two = _kdlab(tmp_path, *common, "--run.name=two", *DDP, "--data.init_args.batch_size=2",
                 *_trace_args(tmp_path / "t2"))
    _assert_same_trajectory(_read(tmp_path / "t1" / "trace.json"), _read(tmp_path / "t2" / "trace.json"),
                            params_atol=1e-4)
    m1, m2 = _read(one / "metrics.json"), _read(two / "metrics.json")
    for key in ("val/ndcg@10", "val/mrr@10", "val/pnr"):
        assert m2[key] == pytest.approx(m1[key], abs=1e-5), key


# --------------------------------------------------------------------- the causal-LM stages
TINY_LLAMA = "tiny-llama-h32"  # kdlab.models.backbones.TINY_CONFIGS: hidden 32, 1 layer
CAUSAL_STAGES = {
    "TeacherCPT": f"""
model:
  class_path: kdlab.stages.TeacherCPT
  init_args: {{backbone: {TINY_LLAMA}, lr: 1.0e-3, warmup_steps: 2}}
data:
  class_path: kdlab.data.ClickLogDataModule
  init_args: {{tokenizer: tiny-llama, max_length: 48, batch_size: 8, world_size_invariant: true}}
""",
    "TeacherRankSFT": f"""
model:
  class_path: kdlab.stages.TeacherRankSFT
  init_args: {{backbone: {TINY_LLAMA}, loss: listwise, lr: 1.0e-3, warmup_steps: 2}}
data:
  class_path: kdlab.data.RankingDataModule
  init_args: {{tokenizer: tiny-llama, text_format: decoder, num_negatives: 3, batch_size: 4, max_length: 64,
              world_size_invariant: true}}
""",
    "RLDistillKStep-ce": f"""
model:
  class_path: kdlab.stages.rl_distill_kstep.RLDistillKStep
  init_args: {{backbone: {TINY_LLAMA}, tokenizer: tiny-llama, objective: ce, lr: 1.0e-3, warmup_steps: 2}}
data:
  class_path: kdlab.data.Seq2SeqDataModule
  init_args: {{tokenizer: tiny-llama, max_source_length: 32, max_target_length: 12, batch_size: 8,
              world_size_invariant: true}}
""",
}
CAUSAL_TRAINER = """
trainer:
  max_steps: 6
  limit_val_batches: 0
  num_sanity_val_steps: 0
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  enable_checkpointing: false
"""


# TeacherRankSFT runs by default (token means over ranks + ranking groups); the other two stages share
# the token-mean path and run with `-m slow` (about 40 s each on 2 cores).
@pytest.mark.parametrize("stage", [pytest.param(name, marks=[] if name == "TeacherRankSFT" else [pytest.mark.slow])
                                   for name in CAUSAL_STAGES])
def test_ddp_causal_lm_stages_same_trajectory_as_one_rank(stage: str, tmp_path: Path) -> None:
    """TeacherCPT, TeacherRankSFT and RLDistillKStep (cross-entropy objective: the PG objective samples
    rollouts from each rank's own RNG stream, so 1 and 2 ranks agree in distribution, not step by
    step): 1 rank × batch B vs 2 ranks × B/2 with ``world_size_invariant`` data. The token-mean
    losses normalise by the global token count (``global_token_mean``); without it they differed
    by ~1e-4 relative (each rank's tokens weighted by its own count).

    Not compared: TeacherRankSFT's score-head bias. Rank losses depend on score differences only, so
    its gradient is zero in exact arithmetic and float rounding noise, which AdamW scales up to
    steps of size ``lr`` with a random sign: it differs between any two summation orders."""
    (tmp_path / "stage.yaml").write_text(CAUSAL_STAGES[stage] + CAUSAL_TRAINER)
    common = ["fit", "--config", "stage.yaml", "--run.export_model=false", "--seed_everything=0"]
    half = {"TeacherRankSFT": "2"}.get(stage, "4")
    _kdlab(tmp_path, *common, "--run.name=one", *_trace_args(tmp_path / "t1"))
    _kdlab(tmp_path, *common, "--run.name=two", *DDP, f"--data.init_args.batch_size={half}",
           *_trace_args(tmp_path / "t2"))
    one, two = _read(tmp_path / "t1" / "trace.json"), _read(tmp_path / "t2" / "trace.json")
    assert len(one["losses"]) == 6
    _assert_same_trajectory(one, two, params_atol=1e-4,
                            skip=("ranker.head.dense.bias",) if stage == "TeacherRankSFT" else ())


# ---------------------------------------------------------------------------- retrieval metric sync
@pytest.mark.slow  # 45 s; the DDP stage trajectory test keeps 2-vs-1 processes in the default suite
def test_retrieval_metrics_on_two_ranks_equal_one_rank(tmp_path: Path) -> None:
    """Fixed scores (no training), 40 queries of 3..14 documents (so ranks hold different numbers of
    documents), batches of 3 groups with padding: `validate` on 1 and 2 ranks, vs a direct compute."""
    from _ddp_fit_script import collate_groups, synthetic_groups

    from kdlab.metrics import RankingMetrics

    common = ["validate", "--model=_ddp_fit_script.FixedScorer", "--data=_ddp_fit_script.ScoredGroups",
              "--data.init_args.num_queries=40", "--trainer.logger=false", "--trainer.enable_progress_bar=false"]
    one = _kdlab(tmp_path, *common, "--run.name=one", f"--model.init_args.out={tmp_path / 's1'}")
    two = _kdlab(tmp_path, *common, "--run.name=two", *DDP, f"--model.init_args.out={tmp_path / 's2'}")
    m1, m2 = _read(one / "metrics.json"), _read(two / "metrics.json")

    groups = synthetic_groups(40)
    direct = RankingMetrics(k=10)
    direct.update(**{k: v for k, v in collate_groups(groups).items()})
    expected = {f"val/{k}": float(v) for k, v in direct.compute().items()}
    assert set(expected) == {"val/ndcg@10", "val/mrr@10", "val/pnr"}
    for key, value in expected.items():
        assert m1[key] == pytest.approx(value, abs=1e-7), key
        assert m2[key] == pytest.approx(value, abs=1e-7), key

    # each query was scored on exactly one rank (40 divides by 2: no DistributedSampler padding) ...
    seen = [json.loads((tmp_path / "s2" / f"seen{r}.json").read_text()) for r in (0, 1)]
    assert sorted(seen[0] + seen[1]) == list(range(40)) and seen[0] and seen[1]
    # ... and the synced value is not what rank 0 alone would report (so the test can fail)
    local = RankingMetrics(k=10)
    local.update(**collate_groups([groups[i] for i in seen[0]]))
    assert float(local.compute()["ndcg@10"]) != pytest.approx(expected["val/ndcg@10"], abs=1e-4)


# --------------------------------------------------------------------------- gradient accumulation
def _fit_in_process(tmp_path: Path, name: str, model_fn, data, accumulate: int, max_epochs: int) -> dict:  # type: ignore[no-untyped-def]
    import lightning as L
    from _ddp_fit_script import LossTrace

    L.seed_everything(0, verbose=False)
    model = model_fn()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=max_epochs, accumulate_grad_batches=accumulate,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                        deterministic=True, callbacks=[LossTrace(str(tmp_path / name))])
    trainer.fit(model, datamodule=data)
    return _read(tmp_path / name / "trace.json")


def test_grad_accumulation_batch8_equals_batch4_accumulate2_toy(tmp_path: Path) -> None:
    from _ddp_fit_script import OrderedToyData
    from toy_stage import ToyRegression

    full = _fit_in_process(tmp_path, "b8", ToyRegression, OrderedToyData(batch_size=8), 1, 2)
    acc = _fit_in_process(tmp_path, "b4x2", ToyRegression, OrderedToyData(batch_size=4), 2, 2)
    # LossTrace records the mean of the micro-batch losses of each optimizer step
    assert full["steps"] == acc["steps"] == list(range(1, 17))
    torch.testing.assert_close(torch.tensor(acc["losses"]), torch.tensor(full["losses"]), rtol=1e-5, atol=0.0)
    for name in full["params"]:
        torch.testing.assert_close(torch.tensor(acc["params"][name]), torch.tensor(full["params"][name]),
                                   rtol=0.0, atol=1e-5, equal_nan=True, msg=name)


def test_grad_accumulation_rank_distill_student(tmp_path: Path) -> None:
    """The same for the student's hybrid loss (a mean over groups: equal-size groups, so two
    half-batch means averaged = the full-batch mean). Without length bucketing the stock loader
    cuts one seeded shuffle into consecutive batches, so two batches of 4 = one batch of 8."""
    from _ddp_fit_script import labelled_ranking_file

    from kdlab.data import RankingDataModule, sample_path
    from kdlab.stages import RankDistillStudent

    train = labelled_ranking_file(sample_path("ranking_train.jsonl"), tmp_path / "train.jsonl", 16, min_negatives=3)

    def student() -> RankDistillStudent:
        return RankDistillStudent(backbone_config={"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
                                  lr=1e-3, weight_decay=0.0)

    def data(batch_size: int) -> RankingDataModule:
        return RankingDataModule(train=str(train), val=str(train), num_negatives=3,
                                 batch_size=batch_size, max_length=64, bucket_by_length=False)

    full = _fit_in_process(tmp_path, "b8", student, data(8), 1, 2)
    acc = _fit_in_process(tmp_path, "b4x2", student, data(4), 2, 2)
    assert full["steps"] == acc["steps"] == [1, 2, 3, 4]
    torch.testing.assert_close(torch.tensor(acc["losses"]), torch.tensor(full["losses"]), rtol=1e-5, atol=0.0)
    for name in full["params"]:
        torch.testing.assert_close(torch.tensor(acc["params"][name]), torch.tensor(full["params"][name]),
                                   rtol=0.0, atol=1e-4, equal_nan=True, msg=name)

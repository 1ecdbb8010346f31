"""TeacherLoader: frozen teacher on the rank's device, via NeedsTeacher only, never in a checkpoint;
its own `teacher:` config group in the CLI."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from _ddp_teacher_script import TEACHER, TEACHER_CONFIG, VOCAB, DistillToy, toy_loader
from conftest import REPO, subprocess_env
from kdlab.callbacks import TeacherLoader
from kdlab.callbacks.teacher import TeacherConfigError

from kdlab.models.served import load_teacher
from kdlab.protocols import NeedsTeacher


def _trainer(tmp_path: Path, *callbacks: L.Callback, **kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        limit_val_batches=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        callbacks=list(callbacks),
        **{"max_steps": 2, **kwargs},
    )


def _cpu_trainer_stub() -> SimpleNamespace:
    """What ``TeacherLoader.setup`` reads of a trainer: the strategy and its root device."""
    return SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")))


def test_toy_stage_implements_the_protocol() -> None:
    assert isinstance(DistillToy(), NeedsTeacher)


def test_teacher_is_frozen_attached_and_never_checkpointed(tmp_path: Path) -> None:
    loader = TeacherLoader(TEACHER, config=TEACHER_CONFIG)
    stage = DistillToy()
    student_keys = set(stage.state_dict())
    trainer = _trainer(tmp_path, loader)
    trainer.fit(stage, train_dataloaders=toy_loader(), val_dataloaders=toy_loader(n=4))

    teacher = stage.teacher
    assert teacher is loader.teacher and type(teacher).__name__ == "LlamaForCausalLM"
    assert teacher.config.hidden_size == 128 and teacher.config.vocab_size == VOCAB  # tiny-llama-h128, toy vocab
    assert not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    assert set(stage.state_dict()) == student_keys  # not a submodule
    assert all(id(p) not in {id(q) for q in teacher.parameters()} for p in stage.parameters())
    assert "teacher" not in dict(stage.named_modules())
    assert loader.memory_footprint_bytes == teacher.get_memory_footprint()

    ckpts = list((tmp_path / "checkpoints").glob("*.ckpt"))
    assert len(ckpts) == 1
    ckpt = torch.load(ckpts[0], weights_only=False, map_location="cpu")
    assert set(ckpt["state_dict"]) == student_keys
    assert not any("teacher" in k or "layers" in k for k in ckpt["state_dict"])
    teacher_bytes = sum(p.numel() for p in teacher.parameters())
    ckpt_bytes = sum(t.numel() for t in ckpt["state_dict"].values())
    assert ckpt_bytes < teacher_bytes
    assert all(not v for k, v in ckpt.get("callbacks", {}).items() if "TeacherLoader" in k)

    # fit -> validate with the same callback: loaded once, the same object re-attached
    trainer.validate(stage, dataloaders=toy_loader(n=4), verbose=False)
    assert loader.load_count == 1 and stage.teacher is teacher


def test_teacher_actually_drives_the_loss(tmp_path: Path) -> None:
    torch.manual_seed(0)
    stage = DistillToy()
    trainer = _trainer(tmp_path, TeacherLoader(TEACHER, config=TEACHER_CONFIG), max_steps=30)
    before = [p.detach().clone() for p in stage.parameters()]
    trainer.fit(stage, train_dataloaders=toy_loader(n=32))
    assert any(not torch.equal(a, b) for a, b in zip(before, stage.parameters()))
    batch = next(iter(toy_loader()))
    with torch.no_grad():
        trained = stage.loss(batch).item()
        fresh = DistillToy()
        fresh.attach_teacher(stage.teacher)
        untrained = fresh.loss(batch).item()
    assert trained < untrained  # the student moved toward the teacher's distribution


def test_8bit_teacher_on_cpu_is_smaller_and_close(tmp_path: Path) -> None:
    fp32 = TeacherLoader(TEACHER, config=TEACHER_CONFIG)
    int8 = TeacherLoader(TEACHER, config=TEACHER_CONFIG, quantization="8bit")
    stages = [DistillToy(), DistillToy()]
    for loader, stage, sub in zip((fp32, int8), stages, ("a", "b")):
        _trainer(tmp_path / sub, loader, max_steps=1).fit(stage, train_dataloaders=toy_loader())
    import bitsandbytes as bnb

    assert isinstance(int8.teacher.model.layers[0].mlp.up_proj, bnb.nn.Linear8bitLt)
    assert not isinstance(fp32.teacher.model.layers[0].mlp.up_proj, bnb.nn.Linear8bitLt)
    assert int8.memory_footprint_bytes < 0.6 * fp32.memory_footprint_bytes
    ids = next(iter(toy_loader()))[0]
    with torch.no_grad():  # same seed -> same random teacher weights, so outputs are comparable
        a, b = fp32.teacher(input_ids=ids).logits, int8.teacher(input_ids=ids).logits
    assert not torch.equal(a, b)  # really two different (quantized vs full-precision) models
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9
    assert torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1)).min() >= 0.995
    assert all(not p.requires_grad for p in int8.teacher.parameters()) and not int8.teacher.training


def test_adding_the_callback_does_not_shift_the_global_rng() -> None:
    torch.manual_seed(7)
    expected = torch.rand(3)
    loader = TeacherLoader(TEACHER, config=TEACHER_CONFIG)
    torch.manual_seed(7)
    loader.setup(_cpu_trainer_stub(), DistillToy(), "fit")
    assert loader.teacher is not None
    torch.manual_seed(7)
    DistillToy()
    after_stage = torch.rand(3)
    torch.manual_seed(7)
    stage = DistillToy()
    loader.setup(_cpu_trainer_stub(), stage, "fit")
    assert torch.equal(torch.rand(3), after_stage)  # the teacher's random init drew from a forked RNG
    assert not torch.equal(expected, after_stage)  # sanity: building the stage does consume the RNG


def test_no_teacher_when_not_needed_or_not_supported(tmp_path: Path) -> None:
    loader = TeacherLoader(TEACHER, config=TEACHER_CONFIG)
    stage = DistillToy(needs_teacher=False)
    _trainer(tmp_path / "a", loader, max_steps=1).fit(stage, train_dataloaders=toy_loader())
    assert loader.teacher is None and stage.teacher is None and loader.load_count == 0

    class Plain(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Linear(2, 1)

    plain_loader = TeacherLoader(TEACHER, config=TEACHER_CONFIG)
    with pytest.warns(UserWarning, match="does not implement NeedsTeacher"):
        plain_loader.setup(_cpu_trainer_stub(), Plain(), "fit")
    assert plain_loader.teacher is None


def test_no_backbone_fails_fit_for_a_stage_that_needs_a_teacher(tmp_path: Path) -> None:
    """``TeacherLoader()`` (the CLI's default `teacher:` group) loads nothing: a stage that needs a
    teacher stops in ``setup``, before any step, with a message naming the option to set."""
    loader = TeacherLoader()
    assert loader.backbone is None
    stage = DistillToy()
    before = [p.detach().clone() for p in stage.parameters()]
    trainer = _trainer(tmp_path / "a", loader, max_steps=1)
    with pytest.raises(TeacherConfigError, match=r"teacher\.backbone"):
        trainer.fit(stage, train_dataloaders=toy_loader())
    assert trainer.global_step == 0 and loader.load_count == 0 and stage.teacher is None
    assert all(torch.equal(a, b) for a, b in zip(before, stage.parameters()))
    # ... while a stage that needs none trains as usual with the same (empty) configuration.
    plain = DistillToy(needs_teacher=False)
    trainer = _trainer(tmp_path / "b", TeacherLoader(), max_steps=1)
    trainer.fit(plain, train_dataloaders=toy_loader())
    assert trainer.global_step == 1 and plain.teacher is None


def test_8bit_teacher_with_a_sharded_strategy_is_refused_early() -> None:
    from lightning.pytorch.strategies import FSDPStrategy

    loader = TeacherLoader(TEACHER, config=TEACHER_CONFIG, quantization="8bit")
    fake_trainer = SimpleNamespace(strategy=FSDPStrategy())
    with pytest.raises(TeacherConfigError, match="use DDP"):
        loader.setup(fake_trainer, DistillToy(), "fit")
    assert loader.teacher is None and loader.load_count == 0


def test_ranker_teachers_may_be_quantized() -> None:
    # a ranker export loads through the one loader in full precision or 8-bit / 4-bit (labeling and
    # live distillation alike); nothing is loaded at construction
    assert TeacherLoader("some/dir", task="ranker", quantization="8bit").quantization == "8bit"
    assert TeacherLoader("some/dir", task="ranker").quantization is None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(180)
def test_two_rank_ddp_on_cpu_loads_one_teacher_per_rank(tmp_path: Path) -> None:
    env = {**subprocess_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "OMP_NUM_THREADS": "1"}
    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK"):
        env.pop(key, None)
    started = time.time()
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "_ddp_teacher_script.py"), str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=170,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in records] == [0, 1]
    assert records[0]["pid"] != records[1]["pid"]  # one process, one teacher, per rank
    for r in records:
        assert r["world_size"] == 2 and r["backend"] == "gloo"
        assert r["load_count"] == 1
        assert r["teacher_type"] == "LlamaForCausalLM" and r["int8"] == "Linear8bitLt"
        assert r["teacher_device"] == r["root_device"] == "cpu"
        assert r["requires_grad"] is False and r["training"] is False
        assert r["ddp_wrapped"] is True and r["teacher_in_ddp"] is False
        assert r["state_dict_keys"] == ["embed.weight", "head.bias", "head.weight"]
    ckpts = list((tmp_path / "checkpoints").glob("*.ckpt"))
    assert len(ckpts) == 1
    ckpt = torch.load(ckpts[0], weights_only=False, map_location="cpu")
    assert sorted(ckpt["state_dict"]) == ["embed.weight", "head.bias", "head.weight"]
    assert ckpt["state_dict"]["head.weight"].shape == (VOCAB, 16)
    assert time.time() - started < 170


def test_ranker_task_loads_an_exported_rank_teacher_for_live_distillation(tmp_path: Path) -> None:
    """A TeacherRankSFT export (backbone + score head) reaches a student as a frozen scorer, through
    ``load_teacher`` and through the callback alike."""
    from kdlab.stages import TeacherRankSFT

    L.seed_everything(0, verbose=False)
    TeacherRankSFT(backbone="tiny-llama").export_pretrained(str(tmp_path / "teacher"))
    teacher = load_teacher(str(tmp_path / "teacher"), "ranker", device="cpu")
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    ids = torch.randint(5, 100, (3, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        scores = teacher(input_ids=ids, attention_mask=torch.ones_like(ids))
    assert scores.shape == (3,) and torch.isfinite(scores).all() and scores.unique().numel() == 3

    loader = TeacherLoader(backbone=str(tmp_path / "teacher"), task="ranker")
    stage = DistillToy()
    loader.setup(_cpu_trainer_stub(), stage, "fit")
    assert stage.teacher is loader.teacher and not stage.teacher.training
    with torch.no_grad():
        assert torch.allclose(stage.teacher(input_ids=ids, attention_mask=torch.ones_like(ids)), scores)


# ------------------------------------------------------------------------------------ CLI group
TOY_CONFIG = """
model:
  class_path: toy_stage.ToyRegression
data:
  class_path: toy_stage.ToyData
trainer:
  max_steps: 1
  logger: false
  enable_progress_bar: false
  callbacks:
    - class_path: lightning.pytorch.callbacks.LearningRateMonitor
    - class_path: {callback}
      init_args: {init_args}
"""


@pytest.mark.parametrize(("callback", "init_args", "group"), [
    ("kdlab.callbacks.TeacherLoader", "{backbone: tiny-llama}", "teacher"),
    ("kdlab.callbacks.teacher.TeacherLoader", "{backbone: tiny-llama}", "teacher"),
    ("kdlab.callbacks.GradVariance", "{every_n_steps: 5}", "grad_variance"),
])
def test_grouped_callback_in_trainer_callbacks_is_a_one_line_error(
    callback: str, init_args: str, group: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from kdlab.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "old.yaml").write_text(TOY_CONFIG.format(callback=callback, init_args=init_args))
    assert main(["fit", "--config", "old.yaml"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and f"`{group}:`" in err and callback.rsplit(".", 1)[-1] in err
    assert not (tmp_path / "runs").exists()  # refused before a run directory was made


def test_grouped_callback_added_on_the_command_line_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from kdlab.cli import main

    monkeypatch.chdir(tmp_path)
    rc = main(["fit", "--model=toy_stage.ToyRegression", "--data=toy_stage.ToyData", "--trainer.max_steps=1",
               "--trainer.callbacks+=kdlab.callbacks.TeacherLoader"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "`teacher:`" in err, err


@pytest.mark.parametrize("extra", [
    [],
    ["--trainer.callbacks+=lightning.pytorch.callbacks.LearningRateMonitor"],
    ["--trainer.callbacks+=lightning.pytorch.callbacks.LearningRateMonitor",
     "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint"],
])
@pytest.mark.parametrize("before", [True, False])
def test_teacher_backbone_on_the_command_line_reaches_the_loader(
    extra: list[str], before: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--teacher.backbone`` is a group option: it wins over the YAML whatever other callbacks the
    command line adds, before or after it."""
    from kdlab.lightning_cli import parse_lightning

    monkeypatch.chdir(REPO)
    base = ["fit", "--config", "experiments/quickstart/ketchup.yaml"]
    default = parse_lightning(base).fit
    assert default.teacher.backbone == "runs/quickstart/ketchup_teacher/model"  # so "X" below is the override
    override = ["--teacher.backbone=X"]
    cfg = parse_lightning(base + (override + extra if before else extra + override)).fit
    assert cfg.teacher.backbone == "X"
    assert cfg.teacher.task == "causal-lm" and cfg.teacher.quantization is None  # the rest of the YAML group kept
    assert cfg.grad_variance.every_n_steps == 20
    assert len(cfg.trainer.callbacks or []) == len(extra)
    assert not any("TeacherLoader" in str(c.class_path) for c in cfg.trainer.callbacks or [])

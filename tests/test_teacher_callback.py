"""TeacherLoader: frozen teacher on the rank's device, via NeedsTeacher only, never in a checkpoint."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from _ddp_teacher_script import TEACHER_CONFIG, VOCAB, DistillToy, toy_loader
from callbacks.teacher import TeacherLoader
from kdlab.protocols import NeedsTeacher

REPO = Path(__file__).resolve().parents[1]
FP32_CONFIG = {**TEACHER_CONFIG}


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


def test_toy_stage_implements_the_protocol() -> None:
    assert isinstance(DistillToy(), NeedsTeacher)


def test_teacher_is_frozen_attached_and_never_checkpointed(tmp_path: Path) -> None:
    loader = TeacherLoader("tiny-llama", config=FP32_CONFIG)
    stage = DistillToy()
    student_keys = set(stage.state_dict())
    trainer = _trainer(tmp_path, loader)
    trainer.fit(stage, train_dataloaders=toy_loader(), val_dataloaders=toy_loader(n=4))

    teacher = stage.teacher
    assert teacher is loader.teacher and type(teacher).__name__ == "LlamaForCausalLM"
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
    trainer = _trainer(tmp_path, TeacherLoader("tiny-llama", config=FP32_CONFIG), max_steps=30)
    before = [p.detach().clone() for p in stage.parameters()]
    trainer.fit(stage, train_dataloaders=toy_loader(n=32))
    assert any(not torch.equal(a, b) for a, b in zip(before, stage.parameters()))
    batch = next(iter(toy_loader()))
    with torch.no_grad():
        trained = stage._loss(batch).item()
        fresh = DistillToy()
        fresh.attach_teacher(stage.teacher)
        untrained = fresh._loss(batch).item()
    assert trained < untrained  # the student moved toward the teacher's distribution


def test_8bit_teacher_on_cpu_is_smaller_and_close(tmp_path: Path) -> None:
    fp32, int8 = TeacherLoader("tiny-llama", config=FP32_CONFIG), TeacherLoader(
        "tiny-llama", config=FP32_CONFIG, quantization="8bit"
    )
    stages = [DistillToy(), DistillToy()]
    for loader, stage, sub in zip((fp32, int8), stages, ("a", "b")):
        _trainer(tmp_path / sub, loader, max_steps=1).fit(stage, train_dataloaders=toy_loader())
    import bitsandbytes as bnb

    assert isinstance(int8.teacher.model.layers[0].mlp.up_proj, bnb.nn.Linear8bitLt)
    assert int8.memory_footprint_bytes < 0.6 * fp32.memory_footprint_bytes
    ids = next(iter(toy_loader()))[0]
    with torch.no_grad():  # same seed -> same random teacher weights, so outputs are comparable
        a, b = fp32.teacher(input_ids=ids).logits, int8.teacher(input_ids=ids).logits
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9
    assert torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1)).min() >= 0.995
    assert all(not p.requires_grad for p in int8.teacher.parameters()) and not int8.teacher.training


def test_adding_the_callback_does_not_shift_the_global_rng() -> None:
    torch.manual_seed(7)
    expected = torch.rand(3)
    loader = TeacherLoader("tiny-llama", config=FP32_CONFIG)
    torch.manual_seed(7)
    loader.setup(SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu"))), DistillToy(), "fit")
    assert loader.teacher is not None
    torch.manual_seed(7)
    DistillToy()
    after_stage = torch.rand(3)
    torch.manual_seed(7)
    stage = DistillToy()
    loader.setup(SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu"))), stage, "fit")
    assert torch.equal(torch.rand(3), after_stage)  # the teacher's random init drew from a forked RNG
    assert not torch.equal(expected, after_stage)  # sanity: building the stage does consume the RNG


def test_no_teacher_when_not_needed_or_not_supported(tmp_path: Path) -> None:
    loader = TeacherLoader("tiny-llama", config=FP32_CONFIG)
    stage = DistillToy(needs_teacher=False)
    _trainer(tmp_path / "a", loader, max_steps=1).fit(stage, train_dataloaders=toy_loader())
    assert loader.teacher is None and stage.teacher is None

    class Plain(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Linear(2, 1)

    plain_loader = TeacherLoader("tiny-llama", config=FP32_CONFIG)
    with pytest.warns(UserWarning, match="does not implement NeedsTeacher"):
        plain_loader.setup(SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu"))), Plain(), "fit")
    assert plain_loader.teacher is None


def test_8bit_teacher_with_a_sharded_strategy_is_refused_early() -> None:
    from lightning.pytorch.strategies import FSDPStrategy

    loader = TeacherLoader("tiny-llama", config=FP32_CONFIG, quantization="8bit")
    fake_trainer = SimpleNamespace(strategy=FSDPStrategy())
    with pytest.raises(ValueError, match="use DDP"):
        loader.setup(fake_trainer, DistillToy(), "fit")
    assert loader.teacher is None and loader.load_count == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(180)
def test_two_rank_ddp_on_cpu_loads_one_teacher_per_rank(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "OMP_NUM_THREADS": "1",
    }
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


def test_ranker_task_loads_an_exported_rank_teacher_for_live_distillation(tmp_path) -> None:
    """A TeacherRankSFT export (backbone + score head) reaches a student as a frozen scorer."""
    import lightning as L
    import torch

    from callbacks.teacher import TeacherLoader
    from kdlab.stages import TeacherRankSFT

    L.seed_everything(0)
    TeacherRankSFT(backbone="tiny-llama").export_pretrained(str(tmp_path / "teacher"))
    loader = TeacherLoader(backbone=str(tmp_path / "teacher"), task="ranker")
    teacher = loader._load(torch.device("cpu"))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    ids = torch.randint(5, 100, (3, 7))
    scores = teacher(input_ids=ids, attention_mask=torch.ones_like(ids))
    assert scores.shape == (3,)

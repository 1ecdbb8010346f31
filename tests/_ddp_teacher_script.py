"""Helper for ``tests/test_teacher_callback.py``: a toy distillation stage and a 2-rank DDP run on CPU.

Run as a script (``python tests/_ddp_teacher_script.py OUT_DIR``) it trains the toy stage with
``strategy="ddp"``, ``devices=2`` on CPU (gloo), with the teacher loaded by ``TeacherLoader``; each
rank writes ``OUT_DIR/rank<r>.json`` describing the teacher it got, and Lightning writes a checkpoint
under ``OUT_DIR/checkpoints``. Lightning's subprocess launcher re-runs this script for rank 1.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kdlab.protocols import attach_unregistered

VOCAB = 128
#: The toy teacher: tiny-llama-h128 (kdlab.models.backbones.TINY_CONFIGS) over the toy's own vocabulary.
TEACHER = "tiny-llama-h128"
TEACHER_CONFIG: dict[str, Any] = {"vocab_size": VOCAB, "pad_token_id": 0}


class DistillToy(L.LightningModule):
    """A student that matches a live teacher's next-token distribution (KL), via NeedsTeacher only."""

    def __init__(self, needs_teacher: bool = True, vocab: int = VOCAB) -> None:
        super().__init__()
        self.needs_teacher = needs_teacher
        self.embed = nn.Embedding(vocab, 16)
        self.head = nn.Linear(16, vocab)
        attach_unregistered(self, "teacher", None)

    def attach_teacher(self, teacher: nn.Module) -> None:
        attach_unregistered(self, "teacher", teacher)

    def loss(self, batch: Any) -> torch.Tensor:
        """KL(teacher ‖ student) of the next-token distributions (a placeholder loss without a teacher)."""
        ids = batch[0]
        student = self.head(self.embed(ids)).log_softmax(-1)
        if self.teacher is None:
            return -student.mean()
        with torch.no_grad():
            target = self.teacher(input_ids=ids).logits.float().softmax(-1)
        return nn.functional.kl_div(student, target, reduction="batchmean")

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val/loss", self.loss(batch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def toy_loader(n: int = 16, length: int = 12, batch_size: int = 4) -> DataLoader:
    ids = torch.randint(1, VOCAB, (n, length), generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(ids), batch_size=batch_size)


class RecordTeacher(L.Callback):
    """Writes what this rank's stage received, after DDP wrapped the module."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        teacher = pl_module.teacher
        wrapped = trainer.strategy.model
        wrapped_params = {id(p) for p in wrapped.parameters()}
        record = {
            "rank": trainer.global_rank,
            "pid": os.getpid(),
            "teacher_id": id(teacher),
            "teacher_type": type(teacher).__name__,
            "teacher_device": str(next(teacher.parameters()).device),
            "root_device": str(trainer.strategy.root_device),
            "int8": type(teacher.model.layers[0].mlp.up_proj).__name__,
            "requires_grad": any(p.requires_grad for p in teacher.parameters()),
            "training": teacher.training,
            "ddp_wrapped": isinstance(wrapped, DistributedDataParallel),
            "teacher_in_ddp": any(id(p) in wrapped_params for p in teacher.parameters()),
            "backend": dist.get_backend() if dist.is_initialized() else None,
            "world_size": trainer.world_size,
            "load_count": next(cb for cb in trainer.callbacks if type(cb).__name__ == "TeacherLoader").load_count,
            "state_dict_keys": sorted(pl_module.state_dict()),
        }
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def main(out: Path) -> None:
    from kdlab.callbacks import TeacherLoader

    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=2,
        limit_val_batches=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(out),
        callbacks=[
            TeacherLoader(TEACHER, config=TEACHER_CONFIG, quantization="8bit"),
            RecordTeacher(out),
        ],
    )
    trainer.fit(DistillToy(), train_dataloaders=toy_loader(), val_dataloaders=toy_loader(n=4))


if __name__ == "__main__":
    main(Path(sys.argv[1]))

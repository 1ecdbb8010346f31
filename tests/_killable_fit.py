"""Helpers for the kill-and-resume test: a data module that resumes mid-epoch exactly, a callback
that SIGKILLs its own process at a given global step (a deterministic crash), and a callback that
records every training step's loss and the final parameters."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler, TensorDataset

from kdlab.runs import write_json_atomic
from toy_stage import toy_tensors


class _SkippingEpochSampler(Sampler[list[int]]):
    """Batches of a permutation seeded by (seed, epoch); the first ``skip`` batches of ``skip_epoch``
    are left out once (they were trained on before the checkpoint)."""

    def __init__(self, n: int, batch_size: int, seed: int, epoch_fn: Any) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.epoch_fn = epoch_fn  # Lightning calls set_epoch on batch_sampler.sampler only, not on us
        self.skip_epoch, self.skip = -1, 0

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def __iter__(self):  # type: ignore[no-untyped-def]
        epoch = int(self.epoch_fn())
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1000 + epoch)).tolist()
        batches = [perm[i:i + self.batch_size] for i in range(0, self.n, self.batch_size)]
        if epoch == self.skip_epoch:
            batches = batches[self.skip:]
            self.skip_epoch, self.skip = -1, 0
        yield from batches


class ResumableToyData(L.LightningDataModule):
    """Shuffled toy data that resumes mid-epoch exactly.

    A plain ``DataLoader(shuffle=True)`` cannot: its order comes from the global RNG at ``iter()``
    time (not restored by a checkpoint), and Lightning 2.x, on a mid-epoch restart with a loader that
    has no ``state_dict``, restarts the iterator from the first batch while counting the epoch's
    batches from where it stopped — it trains on the first batches again and never sees the rest.
    Here the order is seeded by (seed, epoch) and the number of batches *consumed by training* is
    counted in ``on_before_batch_transfer`` (not at ``next()``: Lightning prefetches one batch ahead)
    and saved by the loader's ``state_dict`` in the checkpoint.
    """

    def __init__(self, n: int = 64, batch_size: int = 8, seed: int = 0) -> None:
        super().__init__()
        self.x, self.y = toy_tensors(n, seed)
        self.sampler = _SkippingEpochSampler(n, batch_size, seed, lambda: self.trainer.current_epoch)
        self.batch_size = batch_size
        self.position_epoch, self.consumed = 0, 0  # where training is, saved with the checkpoint

    def train_dataloader(self) -> DataLoader:
        return _ResumableLoader(self, TensorDataset(self.x, self.y), batch_sampler=self.sampler)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.batch_size)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = self.trainer
        if trainer is not None and trainer.training:
            if trainer.current_epoch != self.position_epoch:
                self.position_epoch, self.consumed = trainer.current_epoch, 0
            self.consumed += 1
        return batch


class _ResumableLoader(DataLoader):
    """A ``DataLoader`` with ``state_dict``/``load_state_dict`` (Lightning's ``_Stateful``): saved in the
    checkpoint's fit-loop state and loaded before the restarted epoch's ``iter()``."""

    def __init__(self, datamodule: ResumableToyData, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.datamodule = datamodule

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.datamodule.position_epoch, "consumed": self.datamodule.consumed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        dm = self.datamodule
        dm.position_epoch, dm.consumed = int(state["epoch"]), int(state["consumed"])
        dm.sampler.skip_epoch, dm.sampler.skip = dm.position_epoch, dm.consumed


class KillAtStep(L.Callback):
    """SIGKILL this process (no cleanup, no hooks, like an OOM kill) once ``global_step == step``.

    Lightning runs checkpoint callbacks after all others in a hook, so a checkpoint due at ``step``
    itself is *not* written; the resume starts from the last one before it."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class StepTrace(L.Callback):
    """Writes ``<out>/trace.json``: the loss and global step of every training step this process ran,
    and the final parameters (one process; Lightning hands ``on_train_batch_end`` the step's loss)."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.losses: list[float] = []
        self.steps: list[int] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        self.losses.append(float(outputs["loss"].detach().double()))
        self.steps.append(int(trainer.global_step))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        params = {k: v.detach().double().flatten().tolist() for k, v in pl_module.state_dict().items()
                  if v.is_floating_point()}
        write_json_atomic(self.out / "trace.json", {"losses": self.losses, "steps": self.steps, "params": params})

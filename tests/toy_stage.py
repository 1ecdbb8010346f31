"""A tiny regression stage and data module for testing the CLI and run records without models."""

from __future__ import annotations

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class ToyRegression(L.LightningModule):
    """Linear regression; ``lr`` and ``hidden`` are typed knobs like a real stage's."""

    def __init__(self, hidden: int = 8, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x).squeeze(-1), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", nn.functional.mse_loss(self.net(x).squeeze(-1), y))

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test/loss", nn.functional.mse_loss(self.net(x).squeeze(-1), y))

    def predict_step(self, batch, batch_idx):
        return self.net(batch[0]).squeeze(-1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def toy_tensors(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` inputs ``x [n, 4]`` and targets ``y = x · w + noise``, drawn from a generator seeded ``seed``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 0.0]) + 0.1 * torch.randn(n, generator=g)
    return x, y


class ToyData(L.LightningDataModule):
    """:func:`toy_tensors`, shuffled by a plain ``DataLoader(shuffle=True)`` for training."""

    def __init__(self, n: int = 64, batch_size: int = 8, seed: int = 0) -> None:
        super().__init__()
        self.x, self.y = toy_tensors(n, seed)
        self.batch_size = batch_size

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.batch_size)

    test_dataloader = val_dataloader
    predict_dataloader = val_dataloader

"""GradVariance: formulas against a hand-derived reference, zero variance for deterministic losses,
and a training trajectory that is bit-identical with and without the callback."""

from __future__ import annotations

import math
import random
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from helpers_rl import cpu_trainer, loader, make_stage, make_teacher, seq2seq_batches
from torch import nn

from kdlab.callbacks import GradVariance
from kdlab.callbacks.grad_variance import select_parameters


class Noisy(L.LightningModule):
    """Linear regression whose ``batch_loss`` adds ``noise · <w, ε>``, ε ~ N(0, I): gradient noise σ² = noise²."""

    def __init__(self, noise: float) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 1)
        self.noise = noise

    def batch_loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        loss = ((self.lin(x).squeeze(-1) - y) ** 2).mean()
        if self.noise:
            loss = loss + self.noise * (self.lin.weight * torch.randn_like(self.lin.weight)).sum()
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.batch_loss(batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 3, generator=g), torch.randn(8, generator=g)


def test_deterministic_loss_has_zero_variance() -> None:
    torch.manual_seed(0)
    module = Noisy(0.0)
    res = GradVariance(num_rollouts=5).measure(module, _batch())
    assert res["trace"] == 0.0 and res["ratio"] == 0.0
    assert res["mean_sq_norm"] > 0
    assert res["noise_scale"] == 0.0  # S = 0, |G|² > 0
    assert res["num_params"] == 4  # weight 3 + bias 1


def test_formulas_match_reference_and_side_effects_are_undone() -> None:
    torch.manual_seed(0)
    module = Noisy(0.5)
    module.eval()
    sentinel = [torch.full_like(p, 7.0) for p in module.parameters()]
    for p, s in zip(module.parameters(), sentinel):
        p.grad = s
    batch = _batch()
    m = 6
    torch.manual_seed(42)
    random.seed(1)
    np.random.seed(2)
    res = GradVariance(num_rollouts=m).measure(module, batch)
    # RNG streams restored: the next draws are those of an untouched stream
    after = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(42)
    random.seed(1)
    np.random.seed(2)
    assert torch.equal(after[0], torch.rand(3)) and after[1] == random.random() and after[2] == np.random.rand()
    # .grad restored (same tensors), mode restored
    assert all(p.grad is s for p, s in zip(module.parameters(), sentinel))
    assert not module.training
    # reference: the same M gradients, stacked
    torch.manual_seed(42)
    params = list(module.parameters())
    grads = torch.stack([
        torch.cat([g.reshape(-1) for g in torch.autograd.grad(module.batch_loss(batch), params)]).double()
        for _ in range(m)
    ])
    mean = grads.mean(0)
    trace = grads.var(0, unbiased=True).sum().item()
    assert res["trace"] == pytest.approx(trace, rel=1e-9)
    assert res["mean_sq_norm"] == pytest.approx(mean.pow(2).sum().item(), rel=1e-9)
    assert res["ratio"] == pytest.approx(trace / mean.pow(2).sum().item(), rel=1e-9)
    # B_simple = tr(Σ) / |G|²_unbiased with |G|²_unbiased = |ḡ|² − tr(Σ)/M
    g2 = mean.pow(2).sum().item() - trace / m
    assert res["noise_scale"] == pytest.approx(trace / g2, rel=1e-9) if g2 > 0 else math.isnan(res["noise_scale"])
    # noise only on the 3 weights with σ = 0.5 → E[trace] = 3 · 0.25; loose sanity bound
    assert 0 < res["trace"] < 3


def test_noise_scale_needs_four_rollouts() -> None:
    torch.manual_seed(0)
    res = GradVariance(num_rollouts=3).measure(Noisy(0.5), _batch())
    assert math.isnan(res["noise_scale"]) and res["trace"] > 0


def test_select_parameters() -> None:
    class Stack(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.layers = nn.ModuleList([nn.Linear(4, 4) for _ in range(4)])

    net = Stack()
    assert len(select_parameters(net)) == 9  # small: everything
    names = [n for n, _ in select_parameters(net, small_model_params=10, last_n_layers=2)]
    assert names == ["layers.2.weight", "layers.2.bias", "layers.3.weight", "layers.3.bias"]
    assert [n for n, _ in select_parameters(net, param_filter=r"embed")] == ["embed.weight"]
    with pytest.raises(ValueError, match="matches no"):
        select_parameters(net, param_filter="nothing")
    with pytest.raises(ValueError):
        GradVariance(num_rollouts=1)


def _fit_rl(callback: GradVariance | None) -> tuple[dict[str, torch.Tensor], L.Trainer]:
    stage = make_stage(k=2)
    stage.attach_teacher(make_teacher())
    batches = seq2seq_batches(4, 2)
    L.seed_everything(7, verbose=False)
    trainer = cpu_trainer(3, limit_val_batches=0, callbacks=[callback] if callback else [])
    trainer.fit(stage, train_dataloaders=loader(batches))
    return {k: v.clone() for k, v in stage.student.state_dict().items()}, trainer


def test_training_trajectory_identical_with_and_without_callback() -> None:
    plain, _ = _fit_rl(None)
    cb = GradVariance(every_n_steps=1, num_rollouts=3)
    measured, trainer = _fit_rl(cb)
    assert plain.keys() == measured.keys()
    assert all(torch.equal(plain[k], measured[k]) for k in plain)
    assert [h["step"] for h in cb.history] == [1.0, 2.0, 3.0]
    assert all(h["trace"] > 0 and h["mean_sq_norm"] > 0 for h in cb.history)  # on-policy rollouts are noisy
    for key in ("grad_var/trace", "grad_var/mean_sq_norm", "grad_var/ratio", "grad_var/noise_scale"):
        assert key in trainer.callback_metrics
    # sanity: the trajectory does depend on the random stream, so "identical" above is a real check
    stage = make_stage(k=2)
    stage.attach_teacher(make_teacher())
    L.seed_everything(8, verbose=False)
    cpu_trainer(3, limit_val_batches=0).fit(stage, train_dataloaders=loader(seq2seq_batches(4, 2)))
    assert not all(torch.equal(plain[k], v) for k, v in stage.student.state_dict().items())


def test_off_by_default() -> None:
    """``GradVariance()`` (every_n_steps None, as the CLI's ``grad_variance:`` group defaults) measures nothing."""
    cb = GradVariance()
    assert cb.every_n_steps is None
    calls: list[int] = []
    measure = cb.measure

    def counting_measure(*args: Any, **kwargs: Any) -> dict[str, float]:
        calls.append(1)
        return measure(*args, **kwargs)

    cb.measure = counting_measure  # type: ignore[method-assign]
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*_batch()), batch_size=2)
    trainer = cpu_trainer(4, limit_val_batches=0, callbacks=[cb])
    trainer.fit(Noisy(0.5), train_dataloaders=data)
    assert calls == [] and cb.history == []
    assert not any(key.startswith("grad_var/") for key in trainer.callback_metrics)
    on = GradVariance(every_n_steps=2, num_rollouts=2)  # the same run, switched on, does measure
    trainer = cpu_trainer(4, limit_val_batches=0, callbacks=[on])
    trainer.fit(Noisy(0.5), train_dataloaders=data)
    assert [h["step"] for h in on.history] == [2.0, 4.0]
    assert "grad_var/trace" in trainer.callback_metrics
    assert cb.state_dict() == {"history": []}
    with pytest.raises(ValueError, match="every_n_steps"):
        GradVariance(every_n_steps=0)

"""GradVariance — measure the variance of a stage's gradient estimates, off the training path.

Every ``every_n_steps`` optimiser steps, on one fixed batch (the first training batch seen, kept on
CPU), the callback calls ``pl_module.batch_loss(batch)`` M = ``num_rollouts`` times (the
:class:`kdlab.protocols.HasBatchLoss` protocol: fresh randomness, e.g. fresh on-policy rollouts, on
every call), takes the gradient ``g_i`` of each over a parameter subset with ``torch.autograd.grad``
and logs::

    ḡ            = (1/M) Σ_i g_i
    trace        = tr(Σ̂) = Σ_p (1/(M−1)) Σ_i (g_{i,p} − ḡ_p)²   (sum of unbiased per-parameter variances)
    mean_sq_norm = |ḡ|²
    ratio        = trace / |ḡ|²
    noise_scale  = B_simple = S / |G|²                             (McCandlish et al. 2018, App. A; M ≥ 4)
        with batch sizes B_small = 1 rollout and B_big = M rollouts:
        |G|² ≈ (M |ḡ|² − mean_i |g_i|²) / (M − 1)                  (unbiased |G|²; can be ≤ 0 → NaN logged)
        S    ≈ (mean_i |g_i|² − |ḡ|²) / (1 − 1/M)  = trace         (identical to the unbiased trace)

One "rollout" = one ``batch_loss`` call on the whole fixed batch, so the noise scale is in units of
such batches.

**Cost per measurement**: M forward + M backward passes of ``batch_loss`` (for RL stages also M
generations of the batch, and M teacher forward passes), plus 2 float64 vectors of the subset's
size (Welford mean and M2). With ``every_n_steps = n`` the overhead is about ``M / n`` training steps.

**Off the training path**: gradients come from ``torch.autograd.grad`` (``.grad`` is not written; it is
nonetheless saved and restored for every parameter), the RNG states (torch CPU, all CUDA devices,
Python ``random``, NumPy) are saved and restored so training's random stream is unchanged, the
modules' train/eval modes are restored, and the optimiser is never touched. Measurements are kept in
``self.history`` (a list of dicts) and logged as ``grad_var/*`` (visible in ``trainer.callback_metrics``).
"""

from __future__ import annotations

import math

import random
import re
from typing import Any, Optional

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import move_data_to_device
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn

from kdlab.protocols import HasBatchLoss

__all__ = ["GradVariance", "select_parameters"]

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|block|blocks)\.(\d+)\.")


def select_parameters(
    module: nn.Module, param_filter: str | None = None, small_model_params: int = 5_000_000, last_n_layers: int = 2
) -> list[tuple[str, nn.Parameter]]:
    """The trainable parameters to measure.

    ``param_filter`` (a regex, ``re.search`` on the parameter name) if given; else all trainable
    parameters when there are fewer than ``small_model_params``; else those of the last
    ``last_n_layers`` numbered layers (``…layers.<i>.…`` / ``layer`` / ``h`` / ``block``), falling back to
    the last 10% of parameter tensors when no numbered layers are found.
    """
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    if param_filter is not None:
        pattern = re.compile(param_filter)
        chosen = [(n, p) for n, p in named if pattern.search(n)]
        if not chosen:
            raise ValueError(f"param_filter {param_filter!r} matches no trainable parameter of {type(module).__name__}")
        return chosen
    if sum(p.numel() for _, p in named) < small_model_params:
        return named
    indices = {int(m.group(1)) for n, _ in named if (m := _LAYER_RE.search(n))}
    if indices:
        keep = set(sorted(indices)[-last_n_layers:])
        return [(n, p) for n, p in named if (m := _LAYER_RE.search(n)) and int(m.group(1)) in keep]
    return named[-max(1, len(named) // 10):]


class _RNGState:
    """Snapshot of every random stream training might draw from."""

    def __init__(self) -> None:
        self.torch = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        self.python = random.getstate()
        self.numpy = np.random.get_state()

    def restore(self) -> None:
        torch.set_rng_state(self.torch)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
        random.setstate(self.python)
        np.random.set_state(self.numpy)


class GradVariance(L.Callback):
    """Log the variance of gradient estimates of any :class:`~kdlab.protocols.HasBatchLoss` stage.

    The CLI gives it its own config group, ``grad_variance:`` (``--grad_variance.every_n_steps=20``);
    it measures nothing until ``every_n_steps`` is set.

    Args:
        every_n_steps: measure after every n-th optimiser step (``global_step % n == 0``); None: off.
        num_rollouts: M ≥ 2 independent ``batch_loss`` calls per measurement (noise scale needs M ≥ 4).
        param_filter: regex selecting parameters by name; None = all if the model is small, else the
            last ``last_n_layers`` layers (see :func:`select_parameters`).
        small_model_params: "small" threshold for the default subset (trainable parameter count).
        last_n_layers: layers kept by the default subset of a large model.
        measure_at_start: also measure before the first optimiser step (at ``global_step == 0``).
    """

    def __init__(
        self,
        every_n_steps: Optional[int] = None,
        num_rollouts: int = 8,
        param_filter: str | None = None,
        small_model_params: int = 5_000_000,
        last_n_layers: int = 2,
        measure_at_start: bool = False,
    ) -> None:
        super().__init__()
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps must be ≥ 1, got {every_n_steps}")
        if num_rollouts < 2:
            raise ValueError(f"num_rollouts must be ≥ 2 to estimate a variance, got {num_rollouts}")
        self.every_n_steps = every_n_steps
        self.num_rollouts = num_rollouts
        self.param_filter = param_filter
        self.small_model_params = small_model_params
        self.last_n_layers = last_n_layers
        self.measure_at_start = measure_at_start
        self.history: list[dict[str, float]] = []
        self._batch: Any = None
        self._last_step: int | None = None

    # ------------------------------------------------------------------ hooks
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.every_n_steps is None:
            return
        if self._batch is None:
            self._batch = move_data_to_device(_clone(batch), torch.device("cpu"))
        if self.measure_at_start and trainer.global_step == 0 and self._last_step is None:
            self._maybe_measure(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self.every_n_steps is not None and step > 0 and step % self.every_n_steps == 0:
            self._maybe_measure(trainer, pl_module)

    def _maybe_measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        if self._last_step == step:  # gradient accumulation: several batch ends per optimiser step
            return
        self._last_step = step
        if not isinstance(pl_module, HasBatchLoss):
            rank_zero_warn(f"GradVariance: {type(pl_module).__name__} has no batch_loss(batch); nothing measured")
            return
        result = self.measure(pl_module, self._batch)
        result["step"] = float(step)
        self.history.append(result)
        for key in ("trace", "mean_sq_norm", "ratio", "noise_scale"):
            pl_module.log(f"grad_var/{key}", result[key], on_step=True, on_epoch=False, batch_size=1)
            # The run's summary (metrics.json, ablation tables): the mean over every measurement so far,
            # less noisy than the last one.
            values = [h[key] for h in self.history if math.isfinite(h[key])]
            if values:
                pl_module.log(f"grad_var/{key}_mean", sum(values) / len(values), on_step=True, on_epoch=False,
                              batch_size=1)

    # ------------------------------------------------------------------ measurement
    def measure(self, pl_module: nn.Module, batch: Any) -> dict[str, float]:
        """M gradient estimates on ``batch`` → trace, |ḡ|², ratio, noise scale (see the module docstring).

        Restores ``.grad``, the RNG streams and the modules' modes before returning.
        """
        params = [p for _, p in select_parameters(pl_module, self.param_filter, self.small_model_params, self.last_n_layers)]
        saved_grads = [p.grad for p in pl_module.parameters()]
        modes = [(m, m.training) for m in pl_module.modules()]
        rng = _RNGState()
        device = next(pl_module.parameters()).device
        on_device = move_data_to_device(batch, device)
        m = self.num_rollouts
        mean: Tensor | None = None
        m2: Tensor | None = None
        sum_sq_norms = 0.0
        try:
            with torch.enable_grad():
                for i in range(m):
                    loss = pl_module.batch_loss(on_device)  # type: ignore[attr-defined]
                    grads = torch.autograd.grad(loss, params, allow_unused=True)
                    flat = torch.cat([
                        (g if g is not None else torch.zeros_like(p)).detach().reshape(-1).to(torch.float64)
                        for g, p in zip(grads, params)
                    ])
                    del loss, grads
                    sum_sq_norms += float(flat.pow(2).sum())
                    if mean is None:
                        mean, m2 = flat.clone(), torch.zeros_like(flat)
                    else:  # Welford: exact zeros when every estimate is identical
                        delta = flat - mean
                        mean += delta / (i + 1)
                        m2 += delta * (flat - mean)
        finally:
            for p, g in zip(pl_module.parameters(), saved_grads):
                p.grad = g
            rng.restore()
            for module, was_training in modes:
                module.training = was_training
        assert mean is not None and m2 is not None
        trace = float(m2.sum()) / (m - 1)
        mean_sq = float(mean.pow(2).sum())
        ratio = trace / mean_sq if mean_sq > 0 else (0.0 if trace == 0 else float("inf"))
        noise_scale = float("nan")
        if m >= 4:
            g2_unbiased = (m * mean_sq - sum_sq_norms / m) / (m - 1)
            if g2_unbiased > 0:
                noise_scale = trace / g2_unbiased
        return {
            "trace": trace,
            "mean_sq_norm": mean_sq,
            "ratio": ratio,
            "noise_scale": noise_scale,
            "num_rollouts": float(m),
            "num_params": float(mean.numel()),
        }

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))


def _clone(batch: Any) -> Any:
    """Detach and copy the tensors of a batch (the training loop may reuse or modify the originals)."""
    from lightning.fabric.utilities.apply_func import apply_to_collection

    return apply_to_collection(batch, Tensor, lambda t: t.detach().clone())

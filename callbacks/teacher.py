"""Load a frozen teacher on each rank's own device and hand it to the stage through ``NeedsTeacher``.

Why a callback and not the stage's ``__init__``: the teacher must land on the rank's device
(``trainer.strategy.root_device``), which is only known once the strategy set up its environment,
and it must never become part of the module that DDP wraps or that checkpoints save. In Lightning 2.6
``Trainer._run`` calls ``strategy.setup_environment()`` (device chosen), then the ``setup`` hooks
(callbacks first, then the module), then ``strategy.setup()`` (moves and DDP-wraps the module); so
``Callback.setup`` is exactly the window we need. The teacher is handed over with
``pl_module.attach_teacher`` which stores it unregistered (``kdlab.protocols.attach_unregistered``):
not a submodule, not in ``state_dict()``, not moved by ``.to()``, not seen by DDP.

8-bit / 4-bit teachers (bitsandbytes) refuse ``.to()``; they are loaded directly onto the device.

The CLI gives this callback its own config group, ``teacher:`` (``--teacher.backbone=DIR``,
``--teacher.quantization=8bit``), so it is always present and no config depends on the order of
``trainer.callbacks``; with ``backbone: null`` (the default) it loads nothing.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn

from kdlab.models.backbones import Quantization
from kdlab.models.served import (
    TeacherConfigError,
    TeacherTask,
    check_teacher_options,
    load_teacher,
)
from kdlab.protocols import NeedsTeacher, is_sharded_strategy

log = logging.getLogger(__name__)


class TeacherLoader(L.Callback):
    """Loads the frozen teacher once per rank and attaches it to a stage that needs one.

    Args:
        backbone: anything :func:`kdlab.models.backbones.load_backbone` accepts (``tiny-llama``,
            an alias such as ``smollm2-135m``, a local directory, a hub id); None: no teacher (a
            stage that needs one then stops before training with a one-line error).
        task: which head the teacher needs: ``causal-lm`` (token distributions, generation),
            ``encoder`` (last hidden state, no LM head), ``seq-cls``, or ``ranker``: an exported
            ranker directory (a TeacherRankSFT export with its score head, or a cross-encoder),
            loaded with :func:`kdlab.models.served.load_rank_teacher` so a student can distil from
            live teacher scores (full precision only).
        config: tiny-model config overrides, or config attribute overrides for pretrained models.
        dtype: ``float32`` | ``bfloat16`` | ``float16`` (compute dtype for quantized teachers).
        quantization: ``8bit`` / ``4bit`` through bitsandbytes, or None for full precision.
        trust_remote_code: run code shipped with the checkpoint; only when the config says so.
        num_labels: head size for ``seq-cls`` teachers.
        seed: seed for a randomly initialised (tiny) teacher; drawn from a forked RNG so that adding
            this callback does not shift the global random stream the student and data use.
    """

    def __init__(
        self,
        backbone: Optional[str] = None,
        task: TeacherTask = "causal-lm",
        config: Optional[dict[str, Any]] = None,
        dtype: str = "float32",
        quantization: Optional[Quantization] = None,
        trust_remote_code: bool = False,
        num_labels: int = 1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_teacher_options(task, quantization)  # a bad combination fails at config time, in one line
        self.backbone = backbone
        self.task = task
        self.config = dict(config) if config else None
        self.dtype = dtype
        self.quantization = quantization
        self.trust_remote_code = trust_remote_code
        self.num_labels = num_labels
        self.seed = seed
        self._teacher: nn.Module | None = None
        self._device: torch.device | None = None
        self.memory_footprint_bytes: int | None = None
        self.load_count = 0

    @property
    def teacher(self) -> nn.Module | None:
        """The loaded teacher (None before ``setup``), for inspection by tests and tools."""
        return self._teacher

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Load (once) and attach the teacher; runs after the device is set, before DDP wraps the module."""
        if self.backbone is None and not getattr(pl_module, "needs_teacher", False):
            return  # nothing configured, nothing needed
        if not isinstance(pl_module, NeedsTeacher):
            rank_zero_warn(
                f"TeacherLoader: {type(pl_module).__name__} does not implement NeedsTeacher "
                "(needs_teacher + attach_teacher); no teacher loaded"
            )
            return
        if not pl_module.needs_teacher:
            return
        if self.backbone is None:
            raise TeacherConfigError(
                f"{type(pl_module).__name__} needs a teacher: set teacher.backbone (YAML `teacher: "
                "{backbone: DIR, task: ...}` or --teacher.backbone=DIR)"
            )
        strategy = trainer.strategy
        if self.quantization == "8bit" and is_sharded_strategy(strategy):
            raise TeacherConfigError(
                f"an 8-bit teacher cannot be used with {type(strategy).__name__}: bitsandbytes int8 weights "
                "cannot be sharded; use DDP (strategy: ddp), or a bfloat16 teacher"
            )
        device = strategy.root_device
        if self._teacher is None or self._device != device:
            self._teacher = self._load(device)
            self._device = device
            self.load_count += 1
            self._log_footprint(trainer)
        pl_module.attach_teacher(self._teacher)

    def _load(self, device: torch.device) -> nn.Module:
        """Load onto ``device`` (quantized models directly, via ``device_map``), frozen and in eval mode."""
        assert self.backbone is not None
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            return load_teacher(self.backbone, self.task, config=self.config, dtype=self.dtype,
                                quantization=self.quantization, device=device,
                                trust_remote_code=self.trust_remote_code, num_labels=self.num_labels)

    def _log_footprint(self, trainer: L.Trainer) -> None:
        teacher = self._teacher
        assert teacher is not None
        getter = getattr(teacher, "get_memory_footprint", None)
        if callable(getter):
            footprint = int(getter())
        else:
            footprint = sum(t.numel() * t.element_size() for t in list(teacher.parameters()) + list(teacher.buffers()))
        self.memory_footprint_bytes = footprint
        precision = self.quantization or self.dtype
        rank_zero_info(
            f"TeacherLoader: {self.backbone} ({self.task}, {precision}) on {self._device}: "
            f"{footprint / 2**20:.1f} MiB"
        )
        log.debug("teacher loaded on rank %s", getattr(trainer, "global_rank", 0))

    def state_dict(self) -> dict[str, Any]:
        """Nothing of the teacher goes into checkpoints (it is reloaded from ``backbone``)."""
        return {}


__all__ = ["TeacherConfigError", "TeacherLoader"]

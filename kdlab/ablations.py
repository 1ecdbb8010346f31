"""``python -m kdlab ablate``: named variants × seeds of one base config, with a paired test.

An ablation file::

    name: disranker_loss
    command: fit                       # the Lightning subcommand of every run
    base: [--config, experiments/quickstart/disranker/distill.yaml]
    setup:                             # optional runs made once, before the variants, in order
      teacher: [--config, experiments/quickstart/ketchup_teacher.yaml]
      teacher-eval: {command: validate, args: [--config, eval.yaml]}   # a non-fit setup run
    references: [teacher-eval]         # setup runs shown as extra rows of the table
    ratios: [grad_var/trace_mean]      # add "mean / mean of the first variant" for these metrics
    report: ablation.md                # the table's file name (its .png/.json beside it)
    variants:                          # the FIRST variant is the reference of the paired tests
      hybrid: []
      point-only: [--model.init_args.beta=0]
    seeds: [0, 1, 2]
    metrics: [val/ndcg@10, val/pnr]
    goals: {val/loss: minimize}        # default: maximize
    collapse: {reference: student}     # generation: flag runs whose outputs collapsed (below)

``{setup.NAME}`` anywhere in an argument, or inside a config file passed with ``--config``, is
replaced by that setup run's directory (e.g. ``{setup.teacher}/model``); ``{seed}`` in a variant's
or the base's argument by the run's seed (e.g. ``--data.init_args.seed={seed}``: the data order
follows the seed too, which matters where nothing else is random, such as greedy rollouts). Run directories are
``ROOT/NAME/<variant>/seed<k>``: a rerun skips finished runs, and the tables depend only on the
metrics, so the same ablation on the same machine gives byte-identical tables.

``collapse`` (generation ablations): a run whose mean generated length (``length``, default
``val/gen_length``) is below ``min_length_ratio`` (default 0.5) × the ``reference`` setup run's, or
whose teacher log-likelihood per token (``loglik``, default ``val/teacher_logprob``) is below the
reference's, has collapsed: its row says so (``COLLAPSED k/n seeds``) and it is never the bold best.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kdlab.runs import (
    atomic_path,
    launch_run,
    slug,
    write_json_atomic,
    write_text_atomic,
)


class AblationError(ValueError):
    """A malformed ablation file: the message names the file and the field."""


@dataclass
class AblationSpec:
    name: str
    base: list[str]
    variants: dict[str, list[str]]
    seeds: list[int]
    metrics: list[str]
    command: str = "fit"
    setup: dict[str, list[str]] = field(default_factory=dict)
    setup_commands: dict[str, str] = field(default_factory=dict)
    goals: dict[str, str] = field(default_factory=dict)
    references: list[str] = field(default_factory=list)
    ratios: list[str] = field(default_factory=list)
    report: str = "ablation.md"
    collapse: dict[str, Any] = field(default_factory=dict)


def load_ablation(path: str | Path) -> AblationSpec:
    path = Path(path)
    if not path.exists():
        raise AblationError(f"{path}: no such ablation file")
    raw = yaml.safe_load(path.read_text())
    if not isinstance(raw, dict):
        raise AblationError(f"{path}: expected a mapping with base, variants, seeds, metrics")

    def need(key: str, kind: type, what: str) -> Any:
        value = raw.get(key)
        if not isinstance(value, kind) or not value:
            raise AblationError(f"{path}: field '{key}': expected {what}, got {value!r}")
        return value

    variants = need("variants", dict, "a mapping of variant name → list of overrides")
    for name, overrides in variants.items():
        if not isinstance(overrides, list):
            raise AblationError(f"{path}: field 'variants.{name}': expected a list of CLI overrides")
    seeds = need("seeds", list, "a list of integer seeds")
    if not all(isinstance(s, int) for s in seeds):
        raise AblationError(f"{path}: field 'seeds': expected integers, got {seeds!r}")
    setup: dict[str, list[str]] = {}
    setup_commands: dict[str, str] = {}
    for name, entry in (raw.get("setup") or {}).items():
        if isinstance(entry, dict):
            args, setup_commands[str(name)] = entry.get("args"), str(entry.get("command", "fit"))
        else:
            args = entry
        if not isinstance(args, list):
            raise AblationError(f"{path}: field 'setup.{name}': expected a list of CLI arguments or "
                                "{command: ..., args: [...]}")
        setup[str(name)] = [str(a) for a in args]
    references = [str(r) for r in raw.get("references") or []]
    unknown = [r for r in references if r not in setup]
    if unknown:
        raise AblationError(f"{path}: field 'references': {unknown} are not setup runs (have {list(setup)})")
    metrics = [str(m) for m in need("metrics", list, "a list of metric names")]
    ratios = [str(m) for m in raw.get("ratios") or []]
    if set(ratios) - set(metrics):
        raise AblationError(f"{path}: field 'ratios': {sorted(set(ratios) - set(metrics))} are not in 'metrics'")
    collapse = dict(raw.get("collapse") or {})
    if collapse:
        unknown_keys = set(collapse) - {"reference", "length", "loglik", "min_length_ratio"}
        if unknown_keys or collapse.get("reference") not in setup:
            raise AblationError(f"{path}: field 'collapse': expected {{reference: <a setup run>, length?, loglik?, "
                                f"min_length_ratio?}} with reference one of {list(setup)}, got {collapse!r}")
        collapse = {"length": "val/gen_length", "loglik": "val/teacher_logprob", "min_length_ratio": 0.5, **collapse}
    report = str(raw.get("report", "ablation.md"))
    if not report.endswith(".md") or "/" in report:
        raise AblationError(f"{path}: field 'report': expected a file name ending in .md, got {report!r}")
    return AblationSpec(
        name=str(raw.get("name") or path.stem),
        base=[str(a) for a in need("base", list, "a list of CLI arguments")],
        variants={str(k): [str(a) for a in v] for k, v in variants.items()},
        seeds=seeds,
        metrics=metrics,
        command=str(raw.get("command", "fit")),
        setup=setup,
        setup_commands=setup_commands,
        goals={str(k): str(v) for k, v in (raw.get("goals") or {}).items()},
        references=references,
        ratios=ratios,
        report=report,
        collapse=collapse,
    )


def _render_args(args: list[str], setup_dirs: dict[str, Path], configs_dir: Path) -> list[str]:
    """Substitute ``{setup.NAME}`` in arguments and in the config files they name."""

    def sub(text: str) -> str:
        for name, directory in setup_dirs.items():
            text = text.replace(f"{{setup.{name}}}", str(directory))
        return text

    out: list[str] = []
    previous = ""
    for arg in args:
        arg = sub(arg)
        if previous in ("--config", "-c") and "{setup." in Path(arg).read_text():
            rendered = sub(Path(arg).read_text())
            digest = hashlib.sha1(rendered.encode()).hexdigest()[:8]
            target = configs_dir / f"{Path(arg).stem}-{digest}.yaml"
            write_text_atomic(target, rendered)
            arg = str(target)
        out.append(arg)
        previous = arg
    return out


def run_ablation(config_path: str, root: str = "runs/ablations", jobs: int = 1) -> Path:
    """Run every variant × seed (resumable) and write the report (``ablation.md`` unless the file's
    ``report`` says otherwise) with its ``.json`` and ``.png`` beside it."""
    spec = load_ablation(config_path)
    out_dir = Path(root) / spec.name
    setup_dirs: dict[str, Path] = {}
    setup_metrics: dict[str, dict[str, float]] = {}
    for name, args in spec.setup.items():
        run_dir = out_dir / f"setup-{name}"
        setup_metrics[name] = launch_run(_render_args(args, setup_dirs, out_dir / "configs"), run_dir,
                                         command=spec.setup_commands.get(name, "fit"), label=f"setup {name}")
        setup_dirs[name] = run_dir.resolve()

    cells = [(variant, seed) for variant in spec.variants for seed in spec.seeds]

    def one(cell: tuple[str, int]) -> dict[str, float]:
        variant, seed = cell
        cell_args = [arg.replace("{seed}", str(seed)) for arg in [*spec.base, *spec.variants[variant]]]
        args = _render_args([*cell_args, f"--seed_everything={seed}"], setup_dirs,
                            out_dir / "configs")
        return launch_run(args, out_dir / slug(variant) / f"seed{seed}", command=spec.command,
                          label=f"{spec.name}: {variant}, seed {seed}")

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        results = dict(zip(cells, pool.map(one, cells)))
    table = {variant: {m: [results[(variant, s)].get(m, math.nan) for s in spec.seeds] for m in spec.metrics}
             for variant in spec.variants}
    references = {f"{name} (setup)": {m: [setup_metrics[name].get(m, math.nan)] for m in spec.metrics}
                  for name in spec.references}
    report = out_dir / spec.report
    collapsed = collapsed_runs(spec, results, setup_metrics)
    write_json_atomic(report.with_suffix(".json"), {"seeds": spec.seeds, "metrics": table, "references": references,
                                                    "collapsed": collapsed})
    plot_ablation(spec, table, report.with_suffix(".png"), references)
    write_text_atomic(report, ablation_markdown(spec, table, references, collapsed))
    return report


def collapsed_runs(spec: AblationSpec, results: dict[tuple[str, int], dict[str, float]],
                   setup_metrics: dict[str, dict[str, float]]) -> dict[str, list[bool]]:
    """Per variant, per seed: whether the run's outputs collapsed against the ``collapse`` reference
    (module docstring); empty without a ``collapse`` field."""
    rule = spec.collapse
    if not rule:
        return {}
    start = setup_metrics.get(rule["reference"], {})
    start_length, start_loglik = start.get(rule["length"], math.nan), start.get(rule["loglik"], math.nan)

    def collapsed(metrics: dict[str, float]) -> bool:
        length, loglik = metrics.get(rule["length"], math.nan), metrics.get(rule["loglik"], math.nan)
        return bool(length < float(rule["min_length_ratio"]) * start_length or loglik < start_loglik)

    return {variant: [collapsed(results[(variant, seed)]) for seed in spec.seeds] for variant in spec.variants}


def summarize(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1; 0 for a single seed), NaNs ignored."""
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return math.nan, math.nan
    mean = sum(finite) / len(finite)
    if len(finite) == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in finite) / (len(finite) - 1))


def paired_p_value(values: list[float], reference: list[float]) -> float:
    """Two-sided paired t-test across seeds (scipy); NaN when undefined (n < 2 or no variance)."""
    from scipy import stats

    pairs = [(a, b) for a, b in zip(values, reference) if not (math.isnan(a) or math.isnan(b))]
    if len(pairs) < 2:
        return math.nan
    diffs = [a - b for a, b in pairs]
    if all(d == diffs[0] for d in diffs):
        return math.nan  # no spread in the differences: the t statistic is undefined
    return float(stats.ttest_rel([a for a, _ in pairs], [b for _, b in pairs]).pvalue)


def ablation_markdown(spec: AblationSpec, table: dict[str, dict[str, list[float]]],
                      references: dict[str, dict[str, list[float]]] | None = None,
                      collapsed: dict[str, list[bool]] | None = None) -> str:
    """The report: one row per variant (mean ± std, paired p against the first variant, ratios),
    then the reference rows (setup runs, one value each, no test), then every per-seed value. A
    variant with a collapsed run (``collapsed``) is marked and left out of the bold best."""
    variants = list(spec.variants)
    collapsed = collapsed or {}
    ranked = [v for v in variants if not any(collapsed.get(v, []))]
    reference = variants[0]
    references = references or {}
    ratio_note = (f" × {reference} = variant mean / `{reference}` mean." if spec.ratios else "")
    lines = [f"# Ablation: {spec.name}", "",
             f"Seeds: {', '.join(map(str, spec.seeds))} · command: `{spec.command}` · base: `{' '.join(spec.base)}`",
             f"Mean ± sample std over seeds; best mean per metric in **bold**; p = two-sided paired t-test "
             f"across seeds against `{reference}` (– where undefined).{ratio_note}", "",
             "| variant | " + " | ".join(spec.metrics) + " | " + " | ".join(f"p ({m})" for m in spec.metrics)
             + "".join(f" | {m} × {reference}" for m in spec.ratios) + " |",
             "|---" * (1 + 2 * len(spec.metrics) + len(spec.ratios)) + "|"]
    best: dict[str, float] = {}
    for metric in spec.metrics:
        means = [summarize(table[v][metric])[0] for v in ranked]
        finite = [m for m in means if not math.isnan(m)]
        if finite:
            best[metric] = (min if spec.goals.get(metric) == "minimize" else max)(finite)
    for variant in variants:
        cells, pvalues = [], []
        for metric in spec.metrics:
            mean, std = summarize(table[variant][metric])
            text = "n/a" if math.isnan(mean) else f"{mean:.4f} ± {std:.4f}"
            cells.append(f"**{text}**" if metric in best and mean == best[metric] and variant in ranked else text)
            p = math.nan if variant == reference else paired_p_value(table[variant][metric], table[reference][metric])
            pvalues.append("–" if math.isnan(p) else f"{p:.3g}")
        ratios = []
        for metric in spec.ratios:
            num, den = summarize(table[variant][metric])[0], summarize(table[reference][metric])[0]
            ratios.append("n/a" if math.isnan(num) or math.isnan(den) or den == 0 else f"{num / den:.3f}")
        flag = sum(collapsed.get(variant, []))
        label = f"{variant} (COLLAPSED {flag}/{len(spec.seeds)} seeds)" if flag else variant
        lines.append(f"| {label} | " + " | ".join(cells) + " | " + " | ".join(pvalues)
                     + "".join(f" | {r}" for r in ratios) + " |")
    for name, row in references.items():
        cells = ["n/a" if math.isnan(row[m][0]) else f"{row[m][0]:.4f}" for m in spec.metrics]
        lines.append(f"| {name} | " + " | ".join(cells) + " |" + " – |" * (len(spec.metrics) + len(spec.ratios)))
    if spec.collapse:
        rule = spec.collapse
        lines += ["", f"Collapsed: a run with {rule['length']} below {rule['min_length_ratio']} × `{rule['reference']}`'s, "
                      f"or {rule['loglik']} below `{rule['reference']}`'s; such rows are not ranked (never bold)."]
    lines += ["", "Per-seed values:", ""]
    for variant in variants:
        for metric in spec.metrics:
            lines.append(f"- {variant} · {metric}: " + ", ".join(f"{v:.6g}" for v in table[variant][metric]))
    return "\n".join(lines) + "\n"


def plot_ablation(spec: AblationSpec, table: dict[str, dict[str, list[float]]], path: Path,
                  references: dict[str, dict[str, list[float]]] | None = None) -> None:
    """One bar chart per metric (mean ± std over seeds); reference rows (setup runs such as "before
    RL") as horizontal lines (dashed, dotted, …), so a variant reads against them at a glance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(spec.variants)
    ncols = min(3, len(spec.metrics))
    nrows = math.ceil(len(spec.metrics) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.5 * ncols, 4 * nrows), squeeze=False)
    for ax in axes.flat[len(spec.metrics):]:
        ax.set_visible(False)
    for ax, metric in zip(axes.flat, spec.metrics):
        stats = [summarize(table[v][metric]) for v in variants]
        ax.bar(range(len(variants)), [s[0] for s in stats], yerr=[s[1] for s in stats], capsize=4, color="#4c72b0")
        styles = itertools.cycle(zip(("--", ":", "-."), ("#c44e52", "#55a868", "#8172b2")))
        for (name, row), (style, color) in zip((references or {}).items(), styles):
            if not math.isnan(row[metric][0]):
                ax.axhline(row[metric][0], linestyle=style, color=color, linewidth=1.4, label=name)
        if references and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
        ax.set_xticks(range(len(variants)), variants, rotation=30, ha="right")
        ax.set_title(metric)
    fig.suptitle(f"{spec.name} (mean ± std over {len(spec.seeds)} seeds)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png", metadata={"Software": None})
    plt.close(fig)


def ablate_command(config: str, root: str = "runs/ablations", jobs: int = 1) -> list[Path]:
    """Run named variants × seeds of a base config and write ablation.md + a bar chart.

    Args:
        config: an ablation YAML.
        root: where the ablation's runs go.
        jobs: runs in parallel.
    """
    report = run_ablation(config, root=root, jobs=jobs)
    print(f"ablation report: {report}")
    return [report]

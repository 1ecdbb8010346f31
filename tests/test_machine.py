"""The machine record of every run manifest: CPU model, cores, vector extensions, torch's kernel level."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from kdlab import machine

X86_AVX512 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9654 96-Core Processor
flags\t\t: fpu vme sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 avx512f avx512dq avx512bw avx512_vnni avx512_bf16

processor\t: 1
model name\t: AMD EPYC 9654 96-Core Processor
flags\t\t: fpu vme sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 avx512f avx512dq avx512bw avx512_vnni avx512_bf16
"""

ARM = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp sve
CPU implementer\t: 0x41
CPU architecture: 8
"""


def test_record_on_this_machine_is_complete_and_json() -> None:
    record = machine.machine_record()
    assert set(record) == {"cpu_model", "architecture", "logical_cores", "usable_cores", "cpu_flags",
                           "torch_cpu_capability", "torch_threads", "gpus"}
    assert json.loads(json.dumps(record)) == record
    assert record["logical_cores"] and record["logical_cores"] >= 1
    assert set(record["cpu_flags"]) <= set(machine.CPU_FLAGS)
    assert record["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert record["torch_threads"] == torch.get_num_threads()
    assert record["gpus"] == ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
                              if torch.cuda.is_available() else [])
    line = machine.describe_machine(record)
    assert "\n" not in line and f"{record['logical_cores']} logical cores" in line
    assert f"torch CPU capability {record['torch_cpu_capability']}" in line
    print(line)  # `pytest -s` shows this machine's line


def test_x86_flags_and_the_one_line_description(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "cpuinfo").write_text(X86_AVX512)
    monkeypatch.setattr(machine, "CPUINFO", tmp_path / "cpuinfo")
    record = machine.machine_record()
    assert record["cpu_model"] == "AMD EPYC 9654 96-Core Processor"
    assert record["cpu_flags"] == ["sse4_2", "avx", "f16c", "fma", "avx2", "avx512f", "avx512_vnni", "avx512_bf16"]
    record.update(logical_cores=2, usable_cores=2, torch_cpu_capability="AVX512", gpus=[])
    assert machine.describe_machine(record) == (
        "AMD EPYC 9654 96-Core Processor (2 logical cores; AVX2, AVX-512F, AVX-512 VNNI, AVX-512 BF16; "
        "torch CPU capability AVX512)")
    record.update(logical_cores=64, usable_cores=2, gpus=["NVIDIA H200", "NVIDIA H200"])
    assert machine.describe_machine(record).endswith("(64 logical cores, 2 usable; AVX2, AVX-512F, AVX-512 VNNI, "
                                                     "AVX-512 BF16; torch CPU capability AVX512; GPU: 2× NVIDIA H200)")


def test_arm_features(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "cpuinfo").write_text(ARM)
    monkeypatch.setattr(machine, "CPUINFO", tmp_path / "cpuinfo")
    monkeypatch.setattr(machine.platform, "processor", lambda: "")
    monkeypatch.setattr(machine.platform, "machine", lambda: "aarch64")
    record = machine.machine_record()
    assert record["cpu_model"] is None and record["architecture"] == "aarch64"
    assert record["cpu_flags"] == ["asimd", "asimddp", "asimdhp", "sve"]
    record.update(logical_cores=4, usable_cores=4, torch_cpu_capability="SVE256")
    assert machine.describe_machine(record) == (
        "aarch64 (4 logical cores; NEON, NEON dot product, NEON FP16, SVE; torch CPU capability SVE256)")


def test_no_proc_cpuinfo_and_no_torch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine without /proc/cpuinfo (macOS, Windows) and even without torch still gets a record."""
    monkeypatch.setattr(machine, "CPUINFO", tmp_path / "missing")
    monkeypatch.setattr(machine.platform, "system", lambda: "Windows")
    monkeypatch.setattr(machine.platform, "processor", lambda: "Intel64 Family 6 Model 85 Stepping 7, GenuineIntel")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    record = machine.machine_record()
    assert record["cpu_model"] == "Intel64 Family 6 Model 85 Stepping 7, GenuineIntel"
    assert record["cpu_flags"] == [] and record["torch_cpu_capability"] is None and record["gpus"] == []
    line = machine.describe_machine(record)
    assert line.startswith("Intel64 Family 6 Model 85 Stepping 7, GenuineIntel (") and "no vector extensions" in line
    monkeypatch.setattr(machine.platform, "processor", lambda: "")
    monkeypatch.setattr(machine.platform, "machine", lambda: "")
    assert machine.machine_record()["cpu_model"] is None
    assert machine.describe_machine({}) == "unknown machine" and machine.describe_machine(None) == "unknown machine"


def test_run_manifest_records_the_machine(tmp_path: Path) -> None:
    from kdlab.callbacks.run_record import RunRecord

    record = RunRecord(tmp_path / "run", "seed_everything: 0\n", seed=0, command="fit")
    trainer = SimpleNamespace(
        is_global_zero=True, accelerator=SimpleNamespace(), world_size=1, num_nodes=1, datamodule=None,
        strategy=SimpleNamespace(root_device=torch.device("cpu")),
    )
    record.setup(trainer, torch.nn.Linear(1, 1), "fit")  # type: ignore[arg-type]
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["machine"] == machine.machine_record() | {"torch_threads": manifest["machine"]["torch_threads"]}
    assert re.match(r".+ \(\d+ logical cores", machine.describe_machine(manifest["machine"]))


def test_auto_inference_dtype_is_bf16_only_where_the_cpu_has_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``auto`` scores in bf16 on a CPU with native bf16 (AVX-512 BF16 / AMX-BF16 / ARM BF16) and in
    fp32 elsewhere, where bf16 is emulated; an explicit dtype is never changed."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    x86, arm, amx = tmp_path / "x86", tmp_path / "arm", tmp_path / "amx"
    x86.write_text(X86_AVX512)
    arm.write_text(ARM)
    amx.write_text("model name\t: Intel(R) Xeon(R) Processor\nflags\t\t: avx2 avx512f amx_tile amx_bf16 amx_int8\n")
    assert machine.inference_dtype("auto", "cpu", x86) == ("bfloat16", "auto: this CPU has AVX-512 BF16")
    assert machine.inference_dtype("auto", "auto", amx) == ("bfloat16", "auto: this CPU has AMX-BF16")
    assert machine.inference_dtype("auto", "cpu", arm) == ("float32", "auto: this CPU has no native bf16")
    assert machine.inference_dtype("auto", "cpu", tmp_path / "missing") == ("float32", "auto: this CPU has no native bf16")
    assert machine.inference_dtype("float32", "cpu", x86) == ("float32", "as configured")
    assert machine.inference_dtype("bfloat16", "cpu", arm) == ("bfloat16", "as configured")


def test_steal_share_from_two_proc_stat_readings(tmp_path: Path) -> None:
    """Steal = the steal ticks' share of all ticks between two readings of /proc/stat's cpu line."""
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 0 20 800 5 0 5 70 0 0\ncpu0 50 0 10 400 2 0 2 35 0 0\nintr 1\n")
    before = machine.cpu_time_counters(stat)
    assert before == {"user": 100, "nice": 0, "system": 20, "idle": 800, "iowait": 5, "irq": 0, "softirq": 5,
                      "steal": 70}
    stat.write_text("cpu  250 0 30 820 5 0 5 170 0 0\n")  # +150 user, +10 system, +20 idle, +100 steal
    after = machine.cpu_time_counters(stat)
    assert machine.steal_share(before, after) == pytest.approx(100 / 280)
    assert machine.steal_share(before, before) is None  # no time passed
    assert machine.steal_share(None, after) is None
    assert machine.cpu_time_counters(tmp_path / "missing") is None
    stat.write_text("intr 1\n")
    assert machine.cpu_time_counters(stat) is None

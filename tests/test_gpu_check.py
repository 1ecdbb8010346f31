"""bench/gpu_check.sh: syntax, and its --dry-run on a CPU-only machine (every step listed and
skipped, every command pointing at files that exist in the repository)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.sh"
STEPS = ["pytest_gpu", "make_ranker", "label_fp32", "label_bf16", "label_8bit", "ketchup_teacher", "ketchup_8bit",
         "rl_bench"]
# A repository-relative file named in a command: dir/.../name.ext
REPO_PATH = re.compile(r"^(?:[\w.-]+/)+[\w.-]+\.(?:py|yaml|yml|jsonl|json|sh|txt)$")

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def repo_paths(command: str) -> list[str]:
    """Relative file paths in a shell command (also as the value of ``--opt=PATH``)."""
    found = []
    for token in re.split(r"[\s'\"]+", command):
        for part in (token, token.split("=", 1)[-1]):
            if REPO_PATH.match(part) and not part.startswith("/"):
                found.append(part)
    return found


def test_syntax() -> None:
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], dict, Path]:
    tmp = tmp_path_factory.mktemp("gpu_check")
    out = tmp / "x.json"
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out", str(out), "--workdir", str(tmp / "work")],
                          cwd=tmp, capture_output=True, text=True, timeout=120)
    data = json.loads(out.read_text()) if out.exists() else {}
    return proc, data, tmp


def test_dry_run_exits_0_and_writes_every_step_skipped(dry_run) -> None:
    proc, data, _ = dry_run
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert data["dry_run"] is True
    assert [s["name"] for s in data["steps"]] == STEPS
    assert all(s["status"] == "skipped (dry run)" for s in data["steps"]), [s["status"] for s in data["steps"]]
    assert data["summary"] == {"ok": 0, "failed": 0, "skipped": len(STEPS)}
    assert all(s["command"] and s["timeout_s"] > 0 for s in data["steps"])


def test_dry_run_prints_every_command(dry_run) -> None:
    proc, data, _ = dry_run
    printed = [line for line in proc.stdout.splitlines() if line.startswith("+ [")]
    for step in data["steps"]:
        assert any(line.startswith(f"+ [{step['name']}]") and step["command"] in line for line in printed), step["name"]
    assert any("pip install torch " in line and "2.13.0" not in line.split("(")[0] for line in printed)


def test_commands_refer_to_files_that_exist(dry_run) -> None:
    proc, data, _ = dry_run
    commands = [s["command"] for s in data["steps"]] + [line for line in proc.stdout.splitlines() if line.startswith("+ [")]
    named = {p for c in commands for p in repo_paths(c)}
    expected = {"tests/test_gpu.py", "bench/rl_step_vs_trl.py", "experiments/quickstart/ketchup.yaml",
                "experiments/quickstart/ketchup_teacher.yaml", "kdlab/data/sample/ranking_val.jsonl"}
    assert expected <= named, expected - named
    assert [p for p in named if not (REPO / p).is_file()] == []
    by_name = {s["name"]: s["command"] for s in data["steps"]}
    assert "-m pytest" in by_name["pytest_gpu"] and "tests/test_gpu.py" in by_name["pytest_gpu"]
    assert "--dtype=bfloat16" in by_name["label_bf16"] and "--accelerator=gpu" in by_name["label_bf16"]
    assert "--quantization=8bit" in by_name["label_8bit"]
    assert "--teacher.quantization=8bit" in by_name["ketchup_8bit"] and "--trainer.accelerator=gpu" in by_name["ketchup_8bit"]
    assert "--device cuda" in by_name["rl_bench"]


def test_unknown_option_is_refused() -> None:
    proc = subprocess.run(["bash", str(SCRIPT), "--frobnicate"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "unknown option" in proc.stderr

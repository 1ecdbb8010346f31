"""Shared test setup: offline, quiet, deterministic; one compute thread per pytest-xdist worker."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
REPO = TESTS_DIR.parent
sys.path.insert(0, str(TESTS_DIR))

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Each xdist worker (and every process it starts) computes on one thread: two workers share the
    # cores instead of four threads crowding two of them.
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def subprocess_env() -> dict[str, str]:
    """Environment for `python -m kdlab` subprocesses: the repo and tests importable, offline."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(TESTS_DIR), env.get("PYTHONPATH", "")])
    env["WANDB_MODE"] = "offline"
    env.pop("KDLAB_RUN_DIR", None)
    return env


@pytest.fixture
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def tiny_ranker_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded tiny TeacherRankSFT export (``tiny-llama-h32``): the teacher of a live distillation,
    of ``kdlab label`` and of ``score_file``."""
    import lightning as L

    from kdlab.stages import TeacherRankSFT

    L.seed_everything(0)
    out = tmp_path_factory.mktemp("ranker") / "model"
    TeacherRankSFT(backbone="tiny-llama-h32").export_pretrained(str(out))
    return out

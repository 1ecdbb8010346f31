"""Shared test setup: offline, quiet, single-threaded, deterministic."""

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

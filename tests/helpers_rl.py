"""Shared helpers of the RLDistillKStep tests (test_rl_distill, test_grad_variance, test_gpu).

A plain module, not a test file: tests import from here, never from each other.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import Logger

from kdlab.data import sample_path
from kdlab.models.backbones import load_tokenizer, pad_token_id
from kdlab.models.served import load_teacher
from kdlab.stages.rl_distill_kstep import RLDistillKStep

#: The smallest tiny Llama (hidden 32, 1 layer): student and teacher of the CPU tests.
TINY = "tiny-llama-h32"


def seq2seq_batches(n: int = 4, batch_size: int = 2, max_src: int = 12, max_tgt: int = 8) -> list[dict[str, Any]]:
    """Causal-LM + generation batches from the embedded seq2seq sample (the DEVELOPERS.md batch contract)."""
    tok = load_tokenizer("tiny-llama")
    pad = pad_token_id(tok)
    rows = [json.loads(line) for line in Path(sample_path("seq2seq_train.jsonl")).read_text().splitlines()[:n]]
    batches = []
    for start in range(0, n, batch_size):
        chunk = rows[start:start + batch_size]
        prompts = [[tok.bos_token_id] + tok(r["source"], add_special_tokens=False)["input_ids"][:max_src] for r in chunk]
        targets = [tok(r["target"], add_special_tokens=False)["input_ids"][:max_tgt] + [tok.eos_token_id] for r in chunk]
        p_len = max(len(p) for p in prompts)
        f_len = max(len(p) + len(t) for p, t in zip(prompts, targets))
        b = len(chunk)
        batch = {
            "input_ids": torch.full((b, f_len), pad), "attention_mask": torch.zeros(b, f_len, dtype=torch.long),
            "labels": torch.full((b, f_len), -100),
            "prompt_input_ids": torch.full((b, p_len), pad),
            "prompt_attention_mask": torch.zeros(b, p_len, dtype=torch.long),
            "target_text": [r["target"] for r in chunk],
        }
        for i, (p, t) in enumerate(zip(prompts, targets)):
            full = p + t
            batch["input_ids"][i, :len(full)] = torch.tensor(full)
            batch["attention_mask"][i, :len(full)] = 1
            batch["labels"][i, len(p):len(full)] = torch.tensor(t)
            batch["prompt_input_ids"][i, p_len - len(p):] = torch.tensor(p)
            batch["prompt_attention_mask"][i, p_len - len(p):] = 1
        batches.append(batch)
    return batches


def make_stage(**kwargs: Any) -> RLDistillKStep:
    """A seeded tiny RLDistillKStep (same weights for the same arguments)."""
    L.seed_everything(0, verbose=False)
    args: dict[str, Any] = {"backbone": TINY, "max_new_tokens": 6, "lr": 1e-3, "num_samples_per_prompt": 2}
    args.update(kwargs)
    return RLDistillKStep(**args)


def make_teacher() -> torch.nn.Module:
    """A frozen tiny teacher with weights different from :func:`make_stage`'s student."""
    torch.manual_seed(123)
    return load_teacher(TINY, "causal-lm")


def loader(batches: list[dict[str, Any]]) -> torch.utils.data.DataLoader:
    """Pre-collated batches as a DataLoader (a bare list would be read as several dataloaders)."""
    return torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)


def cpu_trainer(max_steps: int, **kwargs: Any) -> L.Trainer:
    """A quiet single-process CPU trainer."""
    defaults: dict[str, Any] = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
                                "enable_model_summary": False}
    return L.Trainer(max_steps=max_steps, accelerator="cpu", **{**defaults, **kwargs})


class MemoryLogger(Logger):
    """Keeps every ``log_metrics`` call as ``(step, metrics)`` (use with ``log_every_n_steps=1``).

    Lightning sends every key logged so far with each call (a key not logged this step keeps its
    last value), so compare values, not mere presence."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> str:
        return "0"

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.records.append((int(step if step is not None else -1), dict(metrics)))


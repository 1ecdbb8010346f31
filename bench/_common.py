"""Helpers shared by the ranking benchmarks (student training, labeling throughput).

* :func:`machine` — a one-line description of the CPU this ran on (model, cores, load average).
* :func:`synthetic_teacher_file` — a copy of a ranking JSONL file with a deterministic synthetic
  ``teacher_score`` on every document (``label + 0.5 · N(0, 1)``, seeded), keeping only groups that
  can give ``1 positive + n negatives`` (so both trainers see exactly the same groups).
* :func:`export_student_init` — the student's initial weights (a one-label ``*ForSequenceClassification``
  + tokenizer) saved to a directory, so two trainers start from the *same* weights.
* :func:`run_child` — run this script again in a subprocess and read its JSON result (last stdout line).
* :func:`matmul_peak_gflops`, :func:`forward_flops`, :func:`flops_line` — the achieved FLOP/s of a
  benchmark and its fraction of this machine's fp32 matmul peak, measured in the same run.

FLOP accounting (every benchmark counts the same way, so a ratio of FLOP/s equals the ratio of
throughputs; see :func:`forward_flops`): the *useful* work of the real tokens only, padding not
counted (so padding a side feeds its model shows as a lower fraction of peak), multiply-adds as 2
FLOPs; a training step (forward + backward) = 3 × the forward (backward ≈ 2 × forward: gradients of
activations and of weights); embedding look-ups, norms, activations, softmax, dropout and the
optimizer are not counted (a few % of a transformer's matmuls).
"""

from __future__ import annotations

import json
import os
import platform
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

RESULT_PREFIX = "BENCH_RESULT "


def machine() -> str:
    """``CPU model, N logical cores, load average a/b/c`` (Linux; falls back to platform info)."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = "/".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "n/a"
    return f"{model}, {os.cpu_count()} logical cores, load average {load} (1/5/15 min)"


def set_threads(threads: int) -> None:
    """Same intra-op threads everywhere (the children set it before any work)."""
    import torch

    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)


# ------------------------------------------------------------------------------------------ FLOP/s
def matmul_peak_gflops(threads: int | None = None, n: int = 2048, repeats: int = 5, device: str = "cpu") -> float:
    """This machine's fp32 matmul peak as measured now: ``torch.matmul`` of two ``n × n`` fp32
    matrices (``2·n³`` FLOPs each; 17.2 GFLOP at n = 2048), best of ``repeats`` after one untimed
    warm-up, with ``threads`` intra-op threads (default: as set) on ``device`` (CUDA: plain fp32,
    TF32 off for the measurement). GFLOP/s."""
    import time

    import torch

    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        g = torch.Generator(device="cpu").manual_seed(0)
        a = torch.randn(n, n, generator=g).to(device)
        b = torch.randn(n, n, generator=g).to(device)
        cuda = torch.device(device).type == "cuda"
        best = float("inf")
        for i in range(repeats + 1):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            torch.matmul(a, b)
            if cuda:
                torch.cuda.synchronize()
            if i:  # the first is the warm-up
                best = min(best, time.perf_counter() - start)
        return 2.0 * n**3 / best / 1e9
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.set_num_threads(previous)


PER_ROW_MODULES = ("pooler", "classifier", "score")
"""Linear layers under a module whose name contains one of these run once per row (the ``[CLS]``
pooler and head of a cross-encoder, a last-token score head), not once per token."""


def matmul_weights(model: Any) -> tuple[int, int]:
    """``(per-token, per-row)`` weight counts of ``model``'s matmuls: every ``nn.Linear`` (and GPT-2
    ``Conv1D``) weight, split by :data:`PER_ROW_MODULES`. A tied LM head counts (it is a matmul per
    token); embeddings do not (look-ups)."""
    from torch import nn

    per_token = per_row = 0
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if weight is None or not (isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"):
            continue
        if any(part in name for part in PER_ROW_MODULES):
            per_row += weight.numel()
        else:
            per_token += weight.numel()
    return per_token, per_row


def attention_shape(config: Any) -> tuple[int, int]:
    """``(layers, d_attn)`` of a transformer config: layers with self-attention and the width of
    their queries (heads × head size)."""
    config = getattr(config, "text_config", None) or config
    layers = next((getattr(config, k) for k in ("num_hidden_layers", "n_layer", "num_layers") if hasattr(config, k)), None)
    heads = next((getattr(config, k) for k in ("num_attention_heads", "n_head", "num_heads") if hasattr(config, k)), None)
    hidden = next((getattr(config, k) for k in ("hidden_size", "n_embd", "d_model") if hasattr(config, k)), None)
    if layers is None or heads is None or hidden is None:
        raise ValueError(f"cannot read layers / heads / hidden size from {type(config).__name__}")
    head_dim = getattr(config, "head_dim", None) or getattr(config, "d_kv", None) or hidden // heads
    return int(layers), int(heads) * int(head_dim)


def forward_flops(model: Any, lengths: Any, *, causal: bool = False) -> float:
    """FLOPs of one forward pass of ``model`` (a transformers model, or anything with ``.config``
    and ``nn.Linear`` layers) over rows of these *real* lengths (tokens, padding excluded):

    ``Σ_rows [ 2·W_tok·n + 2·W_row + 2·2·layers·d_attn·A(n) ]``

    * ``W_tok``, ``W_row``: the matmul weights run per token / per row (:func:`matmul_weights`), so
      ``2·W·n`` are the linear layers (Q, K, V, output, feed-forward, an LM head) and ``2·W_row``
      the pooler / score head;
    * attention: ``Q·Kᵀ`` and ``softmax·V`` are ``n_keys · d_attn`` multiply-adds each per query and
      layer, so ``2·2·layers·d_attn`` per (query, key) pair; ``A(n) = n²`` pairs for a bidirectional
      encoder, ``n(n+1)/2`` for a causal decoder (each token attends to itself and those before it;
      a KV-cache generation does the same work).

    For a training step multiply by 3 (:data:`TRAIN_FACTOR`)."""
    per_token, per_row = matmul_weights(model)
    layers, d_attn = attention_shape(model.config)
    total = 0.0
    for n in lengths:
        n = float(n)
        pairs = n * (n + 1) / 2 if causal else n * n
        total += 2.0 * per_token * n + 2.0 * per_row + 4.0 * layers * d_attn * pairs
    return total


TRAIN_FACTOR = 3.0
"""A training step's FLOPs over its forward's: forward 1 + backward 2 (activation and weight gradients)."""


def meta_model(directory: str, task: str = "encoder") -> Any:
    """``directory``'s model built on the meta device (weights not read, no memory), for
    :func:`forward_flops` where the measuring process does not hold the model: ``encoder`` =
    ``AutoModel`` (no head), ``seq-cls`` = ``AutoModelForSequenceClassification``, ``causal-lm``."""
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(directory)
    cls = {"encoder": transformers.AutoModel, "seq-cls": transformers.AutoModelForSequenceClassification,
           "causal-lm": transformers.AutoModelForCausalLM}[task]
    with torch.device("meta"):
        return cls.from_config(config)


def flops_line(flops: float, seconds: float, peak_gflops: float) -> str:
    """``achieved X GFLOP/s = Y% of the measured fp32 matmul peak Z GFLOP/s``."""
    achieved = flops / seconds / 1e9
    return (f"achieved {achieved:.1f} GFLOP/s = {100.0 * achieved / peak_gflops:.1f}% of the measured fp32 matmul "
            f"peak {peak_gflops:.1f} GFLOP/s")


def peak_line(gflops: float, threads: int, device: str = "cpu", n: int = 2048) -> str:
    """How the peak was measured, for the settings block."""
    return (f"fp32 matmul peak measured in this run: {gflops:.1f} GFLOP/s on {device} (torch.matmul {n}x{n} fp32, "
            f"best of 5, {threads} threads)")


def synthetic_teacher_file(src: str | Path, dst: str | Path, num_negatives: int, seed: int = 0) -> dict[str, int]:
    """Write ``src``'s groups to ``dst`` with ``teacher_score = label + 0.5 · N(0, 1)`` where a
    document has no ``teacher_score`` yet (existing scores are kept), dropping groups that do not
    have ``num_negatives`` documents with a label strictly below the group's best label.

    Returns ``{"groups_in", "groups_kept"}``.
    """
    rng = random.Random(f"synthetic-teacher:{seed}")
    kept = 0
    rows_in = [json.loads(line) for line in Path(src).read_text(encoding="utf-8").splitlines() if line.strip()]
    with open(dst, "w", encoding="utf-8") as f:
        for row in rows_in:
            labels = [float(d.get("label") or 0.0) for d in row["docs"]]
            top = max(labels)
            if sum(1 for y in labels if y < top) < num_negatives:
                continue
            for d, y in zip(row["docs"], labels):
                if d.get("teacher_score") is None:
                    d["teacher_score"] = round(y + 0.5 * rng.gauss(0.0, 1.0), 6)
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            kept += 1
    return {"groups_in": len(rows_in), "groups_kept": kept}


def export_student_init(model: str, directory: str | Path, seed: int = 0, no_dropout: bool = False) -> str:
    """Save ``model``'s seq-cls initial weights (score head seeded) and tokenizer to ``directory``
    (``no_dropout``: with hidden and attention dropout set to 0 in the saved config)."""
    import lightning as L

    from kdlab.models.backbones import load_backbone
    from kdlab.models.served import save_served_model

    L.seed_everything(seed, verbose=False)
    net = load_backbone(model, task="seq-cls", num_labels=1)
    if no_dropout:
        for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout"):
            if hasattr(net.config, key):
                setattr(net.config, key, 0.0)
    save_served_model(net, model, directory, stage="bench")
    return str(directory)


def run_child(script: str | Path, args: list[str], timeout: float | None = None) -> dict[str, Any]:
    """Run ``python script *args`` and return the JSON after the last ``BENCH_RESULT`` line."""
    proc = subprocess.run([sys.executable, str(script), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    sys.stderr.write(proc.stdout[-4000:] + "\n" + proc.stderr[-4000:] + "\n")
    raise SystemExit(f"child {args[:2]} failed (rc={proc.returncode})")


def emit(result: dict[str, Any]) -> None:
    """Print a child's result for :func:`run_child`."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)

"""SmolLM2-135M teacher: 8-bit (bitsandbytes) vs fp32 on the embedded sample's real text.

Why: an 8-bit teacher is worth it only if it keeps the teacher's predictions while costing less
memory; this prints the figures a user needs to decide (footprint ratio, perplexity ratio, top-1
next-token agreement, forward-time ratio), on CPU and, when a GPU is present, on CUDA too; and
each forward's achieved FLOP/s as a fraction of the device's fp32 matmul peak measured in the same
run (``bench/_common.py``: ``forward_flops`` of the fp32 model over the real tokens, causal, LM
head included; the 8-bit model is credited with the same FLOPs).

    python -m kdlab models prepare smollm2-135m   # once
    python bench/teacher_8bit.py [--n 8] [--max-len 128] [--model smollm2-135m]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

import sys

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402  (puts the repo root on sys.path)
from kdlab.models.backbones import load_backbone, load_tokenizer  # noqa: E402

SAMPLE = Path(__file__).resolve().parents[1] / "kdlab" / "data" / "sample" / "seq2seq_val.jsonl"


def sample_texts(path: Path, n: int) -> list[str]:
    """The first ``n`` seq2seq pairs as plain text (docstring body, then its summary line)."""
    texts: list[str] = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            texts.append(f"{row['target']}\n{row['source']}")
            if len(texts) == n:
                break
    if not texts:
        raise SystemExit(f"{path}: no text to benchmark on")
    return texts


@torch.no_grad()
def evaluate(model: torch.nn.Module, batch: dict[str, torch.Tensor], repeats: int) -> dict[str, Any]:
    """Mean next-token NLL over real (non-pad) tokens, argmax predictions, and best-of forward time."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    model(input_ids=ids[:1, :8], attention_mask=mask[:1, :8])  # warm-up (kernels, allocator)
    times = []
    for _ in range(repeats):
        if ids.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        logits = model(input_ids=ids, attention_mask=mask).logits
        if ids.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    logits = logits[:, :-1].float()
    target = ids[:, 1:]
    valid = mask[:, 1:].bool()
    nll = torch.nn.functional.cross_entropy(logits[valid], target[valid], reduction="mean").item()
    return {"nll": nll, "top1": logits.argmax(-1)[valid].cpu(), "seconds": min(times)}


def compare(name: str, device: str, batch: dict[str, torch.Tensor], repeats: int) -> dict[str, float]:
    """Load fp32 and 8-bit on ``device`` (8-bit directly there: it refuses ``.to()``) and compare."""
    batch = {k: v.to(device) for k, v in batch.items()}
    fp32 = load_backbone(name, "causal-lm", device=device).eval()
    ref = evaluate(fp32, batch, repeats)
    flops = _common.forward_flops(fp32, batch["attention_mask"].sum(dim=1).tolist(), causal=True)
    peak = _common.matmul_peak_gflops(device=device)
    fp32_bytes = fp32.get_memory_footprint()
    del fp32
    int8 = load_backbone(name, "causal-lm", quantization="8bit", device=device).eval()
    out = evaluate(int8, batch, repeats)
    int8_bytes = int8.get_memory_footprint()
    del int8
    return {
        "fp32 footprint MB": fp32_bytes / 1e6,
        "8-bit footprint MB": int8_bytes / 1e6,
        "footprint ratio (8-bit/fp32)": int8_bytes / fp32_bytes,
        "fp32 perplexity": math.exp(ref["nll"]),
        "8-bit perplexity": math.exp(out["nll"]),
        "perplexity ratio (8-bit/fp32)": math.exp(out["nll"] - ref["nll"]),
        "top-1 next-token agreement": (ref["top1"] == out["top1"]).float().mean().item(),
        "fp32 forward s": ref["seconds"],
        "8-bit forward s": out["seconds"],
        "forward time ratio (8-bit/fp32)": out["seconds"] / ref["seconds"],
        "fp32 matmul peak GFLOP/s": peak,
        "fp32 forward GFLOP/s": flops / ref["seconds"] / 1e9,
        "fp32 forward % of fp32 peak": 100.0 * flops / ref["seconds"] / 1e9 / peak,
        "8-bit forward GFLOP/s": flops / out["seconds"] / 1e9,
        "8-bit forward % of fp32 peak": 100.0 * flops / out["seconds"] / 1e9 / peak,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="alias, directory or hub id of a causal LM")
    parser.add_argument("--data", type=Path, default=SAMPLE, help="seq2seq JSONL (source, target)")
    parser.add_argument("--n", type=int, default=8, help="number of texts")
    parser.add_argument("--max-len", type=int, default=128, help="tokens per text (truncated)")
    parser.add_argument("--repeats", type=int, default=2, help="forward passes timed (best kept)")
    args = parser.parse_args(argv)

    tok = load_tokenizer(args.model)
    texts = sample_texts(args.data, args.n)
    batch = dict(tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=args.max_len))
    n_tokens = int(batch["attention_mask"].sum())
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    results = {dev: compare(args.model, dev, batch, args.repeats) for dev in devices}

    print(f"\n{args.model}: {len(texts)} texts from {args.data.name}, {n_tokens} tokens "
          f"(max {args.max_len}/text), torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    header = f"| {'metric':<32} | " + " | ".join(f"{d:>10}" for d in devices) + " |"
    print(header)
    print("|" + "-" * 34 + "|" + "|".join("-" * 12 for _ in devices) + "|")
    for key in results["cpu"]:
        print(f"| {key:<32} | " + " | ".join(f"{results[d][key]:>10.3f}" for d in devices) + " |")
    for d in devices:
        r = results[d]
        for kind in ("fp32", "8-bit"):
            print(f"{d} {kind} forward: achieved {r[kind + ' forward GFLOP/s']:.1f} GFLOP/s = "
                  f"{r[kind + ' forward % of fp32 peak']:.1f}% of the measured fp32 matmul peak "
                  f"{r['fp32 matmul peak GFLOP/s']:.1f} GFLOP/s")


if __name__ == "__main__":
    main()

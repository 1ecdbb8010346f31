"""On-policy step throughput: RLDistillKStep vs TRL's GKDTrainer (lmbda = 1, fully on-policy).

Both sides get the same student and teacher weights (tiny Llamas by default, sharing the embedded
sample tokenizer), the same prompts (embedded seq2seq sample, left-padded), the same sampling
distribution (temperature 1, top-k off, top-p 1, ``max_new_tokens``, KV cache) and the same batch
size. Each side samples its own default way: TRL through HF ``generate``, kdlab through
``kdlab.models.sampling.sample_causal`` (a lean KV-cache loop with inverse-CDF draws);
``--kdlab-sampler hf-generate`` makes kdlab use ``generate`` too, to see what the loop is worth. One
"on-policy step" = sample continuations with the student, score them with the teacher, compute the
loss and backpropagate (TRL: ``GKDTrainer.training_step``; kdlab: ``RLDistillKStep.batch_loss`` +
``backward``); the optimiser step is excluded from both.

Printed: generated tokens per second of the whole step (valid generated tokens up to and including
EOS, divided by the step's wall time) and of generation alone, for each, and the ratio kdlab / TRL;
and each side's achieved FLOP/s as a fraction of the fp32 matmul peak measured in the same run on
the same device and threads (``bench/_common.py``). A step's nominal FLOPs, per row of prompt
length p and g generated tokens (n = p + g; ``F(n)`` = a causal forward over n real tokens, LM head
included, ``_common.forward_flops``): the student's KV-cache generation ≈ ``F_s(n)``, the teacher's
scoring ``F_t(n)``, the student's loss forward + backward ``3·F_s(n)``: ``4·F_s(n) + F_t(n)``
(g = the side's mean generated tokens per row).
Usage::

    python bench/rl_step_vs_trl.py [--steps 5] [--batch-size 8] [--max-new-tokens 32] \
        [--student-config '{"hidden_size": 64}'] [--teacher-config '{"hidden_size": 128}'] [--threads 2] \
        [--device cuda] [--kdlab-sampler hf-generate]
    # real weights: the SmolLM2-135M teacher and its first 10 layers as the student (the real KETCHUP table's pair)
    python bench/rl_step_vs_trl.py --teacher smollm2-135m --student smollm2-135m --student-config '{"num_hidden_layers": 10}'
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
import torch  # noqa: E402

from kdlab.data import sample_path  # noqa: E402
from kdlab.models.backbones import load_backbone, load_tokenizer  # noqa: E402
from kdlab.models.served import load_teacher, save_served_model  # noqa: E402
from kdlab.stages.rl_distill_kstep import RLDistillKStep  # noqa: E402


def prompts(tok: Any, n: int, max_src: int) -> list[list[int]]:
    lines = Path(sample_path("seq2seq_train.jsonl")).read_text().splitlines()
    if len(lines) < n:
        raise SystemExit(f"the embedded sample has {len(lines)} prompts; (steps + 1) × batch size = {n} are needed: "
                         "lower --steps or --batch-size")
    rows = [json.loads(line) for line in lines[:n]]
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    return [bos + tok("summarize: " + r["source"], add_special_tokens=False)["input_ids"][:max_src] + tok(
        "\nsummary:", add_special_tokens=False)["input_ids"] for r in rows]


def left_pad(batch: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in batch)
    ids = torch.full((len(batch), width), pad)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    for i, p in enumerate(batch):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids, mask


def _sync(device: str) -> None:
    """Wait for queued GPU work so that wall-clock times cover it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_kdlab(student_dir: str, teacher: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]],
                max_new_tokens: int, k: int, device: str, sampler: str, tokenizer: str) -> dict[str, float]:
    stage = RLDistillKStep(backbone=student_dir, tokenizer=tokenizer, k=k, max_new_tokens=max_new_tokens,
                           num_samples_per_prompt=1, baseline="batch-mean", sampler=sampler).to(device)
    stage.attach_teacher(teacher)
    stage.train()
    gen_time = [0.0]
    orig = stage.rollout

    def timed_rollout(*a: Any, **kw: Any) -> Any:
        ro = orig(*a, **kw)
        gen_time[0] += ro.seconds
        counts.append(ro.num_generated)
        return ro

    stage.rollout = timed_rollout  # type: ignore[method-assign]
    counts: list[int] = []
    times: list[float] = []
    gen: list[float] = []
    for i, (ids, mask) in enumerate(batches):
        batch = {"prompt_input_ids": ids.to(device), "prompt_attention_mask": mask.to(device)}
        gen_time[0] = 0.0
        _sync(device)
        start = time.perf_counter()
        stage.batch_loss(batch).backward()
        _sync(device)
        times.append(time.perf_counter() - start)
        gen.append(gen_time[0])
        stage.student.zero_grad(set_to_none=True)
    return _summary(counts[1:], times[1:], gen[1:])  # first step = warm-up


def bench_trl(student_dir: str, teacher: torch.nn.Module, tok: Any, batches: list[tuple[torch.Tensor, torch.Tensor]],
              max_new_tokens: int, device: str) -> dict[str, float]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    student = AutoModelForCausalLM.from_pretrained(student_dir)
    rows = [{"idx": i} for i in range(len(batches))]

    def collate(features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids, mask = batches[features[0]["idx"]]
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100),  # only counted for num_items_in_batch; GKD relabels
                "prompts": ids, "prompt_attention_mask": mask}

    out_dir = tempfile.mkdtemp(prefix="gkd-bench-")
    args = GKDConfig(output_dir=out_dir, per_device_train_batch_size=1, max_steps=len(batches), lmbda=1.0, beta=0.0,
                     temperature=1.0, max_new_tokens=max_new_tokens, report_to="none", use_cpu=device == "cpu", logging_steps=1000,
                     save_strategy="no", learning_rate=1e-5, disable_dropout=True, dataloader_num_workers=0,
                     max_length=None, gradient_checkpointing=False, bf16=False, fp16=False)  # fp32 + KV cache, like kdlab
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, data_collator=collate,
                         train_dataset=Dataset.from_list(rows), processing_class=tok)
    trainer.generation_config.eos_token_id = tok.eos_token_id
    counts: list[int] = []
    times: list[float] = []
    gen: list[float] = []
    orig_gen = GKDTrainer.generate_on_policy_outputs
    gen_time = [0.0]
    threads: list[int] = []

    def timed_gen(model: Any, inputs: Any, generation_config: Any) -> Any:
        _sync(device)
        start = time.perf_counter()
        out = orig_gen(model, inputs, generation_config)
        _sync(device)
        gen_time[0] += time.perf_counter() - start
        counts.append(int(out[1][:, inputs["prompts"].shape[1]:].sum()))
        threads.append(torch.get_num_threads())
        return out

    trainer.generate_on_policy_outputs = timed_gen  # type: ignore[method-assign]
    orig_step = trainer.training_step

    def timed_step(*a: Any, **kw: Any) -> Any:
        gen_time[0] = 0.0
        _sync(device)
        start = time.perf_counter()
        loss = orig_step(*a, **kw)
        _sync(device)
        times.append(time.perf_counter() - start)
        gen.append(gen_time[0])
        return loss

    trainer.training_step = timed_step  # type: ignore[method-assign]
    trainer.train()
    result = _summary(counts[1:], times[1:], gen[1:])
    result["threads_during_generation"] = float(min(threads))
    return result


def _summary(counts: list[int], times: list[float], gen: list[float]) -> dict[str, float]:
    tokens = sum(counts)
    return {"steps": len(times), "tokens": tokens, "step_s_median": statistics.median(times),
            "tokens_per_s": tokens / sum(times), "gen_tokens_per_s": tokens / sum(gen)}


def step_flops(student: torch.nn.Module, teacher: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]],
               tokens: int) -> float:
    """Nominal FLOPs of the timed steps (``batches[1:]``) that generated ``tokens`` tokens in all
    (module docstring): ``Σ_rows 4·F_s(p + g) + F_t(p + g)``, g = mean generated tokens per row."""
    prompt_lengths = [int(n) for _, mask in batches[1:] for n in mask.sum(dim=1)]
    mean_generated = tokens / max(len(prompt_lengths), 1)
    lengths = [p + mean_generated for p in prompt_lengths]
    return (4.0 * _common.forward_flops(student, lengths, causal=True)
            + _common.forward_flops(teacher, lengths, causal=True))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="measured steps (one extra warm-up step)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--max-source-tokens", type=int, default=48)
    parser.add_argument("--k", type=int, default=4)
    # tiny-llama defaults; a real --teacher / --student keeps its own config unless one is given
    parser.add_argument("--student-config", type=json.loads, default=None)
    parser.add_argument("--teacher-config", type=json.loads, default=None)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    parser.add_argument("--kdlab-sampler", default="kdlab", choices=["kdlab", "hf-generate"])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (TRL then runs through accelerate on the GPU)")
    parser.add_argument("--teacher", default="tiny-llama", help="the teacher: a tiny name, an alias (smollm2-135m) or a path")
    parser.add_argument("--student", default="tiny-llama",
                        help="the student's backbone (its --student-config, e.g. {\"num_hidden_layers\": 10}, cuts real weights)")
    ns = parser.parse_args(argv)
    tiny = {"student": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
                        "intermediate_size": 128},
            "teacher": {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
                        "intermediate_size": 256}}
    for side in ("student", "teacher"):
        if getattr(ns, f"{side}_config") is None and getattr(ns, side) == "tiny-llama":
            setattr(ns, f"{side}_config", tiny[side])
    if ns.threads:
        torch.set_num_threads(ns.threads)
    tok = load_tokenizer(ns.student)
    if load_tokenizer(ns.teacher).get_vocab() != tok.get_vocab():
        raise SystemExit(f"--teacher {ns.teacher} and --student {ns.student} must share a tokenizer")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    torch.manual_seed(0)
    student = load_backbone(ns.student, "causal-lm", config=ns.student_config)
    teacher = load_teacher(ns.teacher, "causal-lm", config=ns.teacher_config, device=ns.device)
    student_dir = tempfile.mkdtemp(prefix="bench-student-")
    save_served_model(student, ns.student, student_dir, stage="bench")
    n = (ns.steps + 1) * ns.batch_size
    ps = prompts(tok, n, ns.max_source_tokens)
    batches = [left_pad(ps[i:i + ns.batch_size], tok.pad_token_id) for i in range(0, n, ns.batch_size)]
    print(f"device={ns.device} threads={torch.get_num_threads()} batch={ns.batch_size} max_new_tokens={ns.max_new_tokens} "
          f"steps={ns.steps} (+1 warm-up) student={sum(p.numel() for p in student.parameters()):,} params "
          f"teacher={sum(p.numel() for p in teacher.parameters()):,} params")
    peak_start = _common.matmul_peak_gflops(device=ns.device)
    print(f"machine: {_common.machine()}")
    print(_common.peak_line(peak_start, torch.get_num_threads(), ns.device))
    torch.manual_seed(1)
    ours = bench_kdlab(student_dir, teacher, batches, ns.max_new_tokens, ns.k, ns.device, ns.kdlab_sampler, ns.student)
    torch.manual_seed(1)
    theirs = bench_trl(student_dir, teacher, tok, batches, ns.max_new_tokens, ns.device)
    for name, r in ((f"kdlab RLDistillKStep ({ns.kdlab_sampler})", ours), ("TRL GKDTrainer (lmbda=1, beta=0)", theirs)):
        print(f"{name:36s} tokens={r['tokens']:5d}  step median {r['step_s_median'] * 1000:7.1f} ms  "
              f"step tokens/s {r['tokens_per_s']:8.1f}  generation-only tokens/s {r['gen_tokens_per_s']:8.1f}")
    peak = max(peak_start, _common.matmul_peak_gflops(device=ns.device))
    for name, r in (("kdlab", ours), ("TRL", theirs)):
        flops = step_flops(student, teacher, batches, r["tokens"])
        print(f"{name:>6}: {_common.flops_line(flops, r['tokens'] / r['tokens_per_s'], peak)}"
              f"  ({flops / r['tokens'] / 1e6:.2f} MFLOP per generated token)")
    print(f"torch threads inside TRL's generation: {int(theirs['threads_during_generation'])}")
    print(f"ratio kdlab/TRL: step tokens/s {ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x   "
          f"generation-only {ours['gen_tokens_per_s'] / theirs['gen_tokens_per_s']:.2f}x   (target >= 1.5x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

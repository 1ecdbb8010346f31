"""Labeling throughput: ``kdlab.labeling.score_file`` vs the tools a user would otherwise reach for.

Two comparisons on the same (query, document) pairs (the embedded sample's val + test groups, the
first ``--pairs``), the same machine, fp32, the same threads:

1. **Cross-encoder teacher vs sentence-transformers.** A one-label ``*ForSequenceClassification``
   (``--model``: ``minilm-l6`` after ``python -m kdlab models prepare minilm-l6``, or ``tiny-bert``)
   exported once as a kdlab seq-cls directory (seeded head) that both sides load.

   * ``kdlab``: ``score_file(dir, input, output, max_tokens=B · max_length, max_length)`` — the token
     budget equivalent of B rows padded to ``max_length``; with the defaults (B = 32, ST's own
     default, max_length 192) that is kdlab's default budget (6144); with another B,
     ``kdlab-default`` (the default budget) runs as well; ``--kdlab-max-tokens N`` adds
     ``kdlab-tokens``, ``score_file`` with ``max_tokens=N`` (``kdlab label --max_tokens N``);
   * ``st``: ``CrossEncoder(dir, max_length=max_length, activation_fn=Identity()).predict(pairs,
     batch_size=B)`` (ST sorts the pairs by character length, tokenizes each batch, pads it to its
     longest row); raw logits, so the scores compare with kdlab's.

2. **Decoder teacher vs a padded Hugging Face loop.** A :class:`~kdlab.stages.TeacherRankSFT`
   export (``--decoder``: ``tiny-llama-h256`` by default, ``smollm2-135m`` when prepared):
   ``kdlab-dec`` = ``score_file`` with the budget ``B · max_length``; ``hf-dec`` = what one writes by
   hand: pairs in file order, batches of B, each tokenized and right-padded to its own longest row
   (no sorting), one forward of the exported ranker (``load_rank_teacher``) per batch.

Every side is timed end to end: load the model, read the JSONL, tokenize, score, write the JSONL
with a ``teacher_score`` per document (the non-kdlab sides use kdlab's reader and writer, so only
the scoring differs). Each side lives in its own process (started together, imports and an
untimed warm-up run on 4 groups, then idle until asked), so no side warms another and the ~15 s of
imports are paid once; repeat r runs the sides back to back (order flipped every other repeat).
Reported: wall-clock pairs/s (median), the ratio of the medians, the median of the per-repeat
ratios ("paired": on a machine shared with other jobs, load hits both sides of a repeat alike)
and the ratio per CPU-second. The outputs are compared score by score: ``max |diff|`` must be
< 1e-4, else the sides did not do the same work. Each side's achieved FLOP/s (the forward FLOPs of
the real tokens, ``_common.forward_flops``, over its end-to-end seconds: load, read and write
included) is printed as a fraction of the fp32 matmul peak that the parent measures (same threads)
at the start and at the end of the run.

    python bench/labeling_throughput.py                                   # minilm-l6 + tiny-llama-h256, 1600 pairs
    python bench/labeling_throughput.py --model tiny-bert --decoder tiny-llama-h32 --pairs 200   # quick
    python bench/labeling_throughput.py --pairs 0 --batch-size 64         # all 3151 pairs, B = 64
    python bench/labeling_throughput.py --decoder smollm2-135m --only decoder --pairs 400
    python bench/labeling_throughput.py --only seq-cls --kdlab-max-tokens 2048   # + a smaller budget (CPU)
    python bench/labeling_throughput.py --profile kdlab --pairs 300       # cProfile one kdlab run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import _common  # noqa: E402  (puts the repo root on sys.path)

SCRIPT = Path(__file__).resolve()
SEQ_SIDES = ("kdlab", "kdlab-default", "kdlab-tokens", "st")
DEC_SIDES = ("kdlab-dec", "hf-dec")
LABELS = {
    "kdlab": "kdlab score_file (max_tokens = B*max_length)",
    "kdlab-default": "kdlab score_file (default max_tokens)",
    "kdlab-tokens": "kdlab score_file (max_tokens = --kdlab-max-tokens)",
    "st": "sentence-transformers CrossEncoder.predict",
    "kdlab-dec": "kdlab score_file (max_tokens = B*max_length)",
    "hf-dec": "HF loop, batches of B padded to longest",
}
TARGET = 1.3
peaks: list[float] = []  # the fp32 matmul peak measured at the start (and at the end) of the run


def peak() -> float:
    return max(peaks)


def _flops_later(flops_per_s: float) -> Any:
    """A result line, rendered at the end (against the larger of the two peaks)."""
    return lambda: f"    {_common.flops_line(flops_per_s, 1.0, peak())}"


# ------------------------------------------------------------------------------------------ teachers
def make_seq_cls(model: str, directory: Path, seed: int) -> str:
    return _common.export_student_init(model, directory, seed=seed)


def make_decoder(backbone: str, directory: Path, seed: int) -> str:
    import lightning as L

    from kdlab.stages.teacher_rank_sft import TeacherRankSFT

    L.seed_everything(seed, verbose=False)
    TeacherRankSFT(backbone=backbone).export_pretrained(str(directory))
    return str(directory)


# ------------------------------------------------------------------------------------------ sides
def _write_scored(groups: list[Any], scores: list[list[float]], output_path: str) -> None:
    from dataclasses import replace

    from kdlab.data.readers import ranking_group_to_json, with_scores

    with open(output_path, "w", encoding="utf-8") as f:
        for g, sc in zip(groups, scores):
            docs = tuple(with_scores(d, teacher_score=s) for d, s in zip(g.docs, sc))
            f.write(json.dumps(ranking_group_to_json(replace(g, docs=docs)), ensure_ascii=False) + "\n")


def run_kdlab(teacher: str, input_path: str, output_path: str, args: argparse.Namespace, side: str) -> dict[str, Any]:
    from kdlab.labeling import score_file

    budget = {"kdlab-default": None, "kdlab-tokens": args.kdlab_max_tokens}.get(side, args.batch_size * args.max_length)
    kwargs = {} if budget is None else {"max_tokens": budget}
    score_file(teacher, input_path, output_path, max_length=args.max_length, resume=False, progress=False, **kwargs)
    return {}


def run_st(teacher: str, input_path: str, output_path: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import transformers
    from sentence_transformers import CrossEncoder

    from kdlab.data.readers import read_ranking_jsonl

    transformers.logging.set_verbosity_error()
    t0 = time.perf_counter()
    model = CrossEncoder(teacher, num_labels=1, max_length=args.max_length, device="cpu",
                         activation_fn=torch.nn.Identity())
    t1 = time.perf_counter()
    groups = read_ranking_jsonl(input_path)
    pairs = [(g.query, d.text) for g in groups for d in g.docs]
    t2 = time.perf_counter()
    flat = model.predict(pairs, batch_size=args.batch_size, show_progress_bar=False, convert_to_numpy=True).tolist()
    t3 = time.perf_counter()
    scores, k = [], 0
    for g in groups:
        scores.append([float(s) for s in flat[k:k + len(g.docs)]])
        k += len(g.docs)
    _write_scored(groups, scores, output_path)
    return {"load_s": t1 - t0, "predict_s": t3 - t2}


def run_hf_padded(teacher: str, input_path: str, output_path: str, args: argparse.Namespace) -> dict[str, Any]:
    """File order, batches of ``batch_size`` pairs, each right-padded to its longest row."""
    import torch

    from kdlab.data.readers import read_ranking_jsonl
    from kdlab.models.backbones import load_tokenizer, pad_token_id
    from kdlab.models.served import load_rank_teacher

    t0 = time.perf_counter()
    model = load_rank_teacher(teacher)
    tok = load_tokenizer(teacher)
    t1 = time.perf_counter()
    groups = read_ranking_jsonl(input_path)
    pairs = [(gi, j, g.query, d.text) for gi, g in enumerate(groups) for j, d in enumerate(g.docs)]
    scores: list[list[float]] = [[0.0] * len(g.docs) for g in groups]
    pad_id, eos = pad_token_id(tok), tok.eos_token_id
    t2 = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(pairs), args.batch_size):
            chunk = pairs[start:start + args.batch_size]
            if model.text_format == "cross-encoder":
                enc = tok([c[2] for c in chunk], [c[3] for c in chunk], padding=True, truncation=True,
                          max_length=args.max_length, return_tensors="pt")
                inputs = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
            else:  # decoder text: "query: q document: d" + EOS, right-padded to the batch's longest row
                texts = [f"query: {c[2]} document: {c[3]}".rstrip() for c in chunk]
                ids = [row + [eos] for row in tok(texts, add_special_tokens=False, truncation=True,
                                                  max_length=args.max_length - 1)["input_ids"]]
                width = max(len(r) for r in ids)
                inputs = {"input_ids": torch.tensor([r + [pad_id] * (width - len(r)) for r in ids]),
                          "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in ids])}
            for (gi, j, _, _), s in zip(chunk, model(**inputs).float().tolist()):
                scores[gi][j] = float(s)
    t3 = time.perf_counter()
    _write_scored(groups, scores, output_path)
    return {"load_s": t1 - t0, "predict_s": t3 - t2}


def run_side(side: str, teacher: str, input_path: str, output_path: str, args: argparse.Namespace) -> dict[str, Any]:
    if side.startswith("kdlab"):
        return run_kdlab(teacher, input_path, output_path, args, side)
    if side == "st":
        return run_st(teacher, input_path, output_path, args)
    return run_hf_padded(teacher, input_path, output_path, args)


def count_pairs(path: str | Path) -> int:
    return sum(len(json.loads(line)["docs"]) for line in Path(path).read_text(encoding="utf-8").splitlines()
               if line.strip())


def cpu_seconds() -> float:
    """User + system CPU time of this process (all its threads) so far."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def timed_run(args: argparse.Namespace, output: str, profile_out: str | None = None) -> dict[str, Any]:
    """One timed end-to-end run of this child's side on ``args.input`` (wall and CPU time)."""
    c0 = cpu_seconds()
    if profile_out:
        import cProfile

        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.runcall(run_side, args.child, args.teacher, args.input, output, args)
        seconds = time.perf_counter() - t0
        prof.dump_stats(profile_out)
        extra: dict[str, Any] = {}
    else:
        t0 = time.perf_counter()
        extra = run_side(args.child, args.teacher, args.input, output, args)
        seconds = time.perf_counter() - t0
    cpu = cpu_seconds() - c0
    n = count_pairs(args.input)
    return {"side": args.child, "pairs": n, "seconds": seconds, "pairs_per_s": n / seconds, "cpu_s": cpu,
            "pairs_per_cpu_s": n / cpu, **extra}


def serve(args: argparse.Namespace) -> None:
    """A side's process: imports and an untimed warm-up run, then one timed run per ``run OUTPUT
    [PROFILE]`` line on stdin (result line per run), until ``quit``. One process per side, kept for
    all its repeats, so the imports (~15 s here) are paid once and no side warms another."""
    import sys

    run_side(args.child, args.teacher, args.warmup_input, str(Path(args.input).with_suffix(f".{args.child}.warmup.jsonl")), args)
    _common.emit({"ready": args.child})
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        _common.emit(timed_run(args, cmd[1], cmd[2] if len(cmd) > 2 else None))


class Side:
    """A running :func:`serve` child."""

    def __init__(self, side: str, argv: list[str], log: Path) -> None:
        import subprocess
        import sys

        self.side = side
        self.log = log
        self.proc = subprocess.Popen([sys.executable, str(SCRIPT), *argv], cwd=_common.ROOT, text=True, bufsize=1,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(log, "w"))

    def result(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(_common.RESULT_PREFIX):
                return json.loads(line[len(_common.RESULT_PREFIX):])
        raise SystemExit(f"side {self.side} died (rc={self.proc.wait()}); its log:\n{self.log.read_text()[-4000:]}")

    def run(self, output: Path, profile_out: Path | None = None) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"run {output}" + (f" {profile_out}" if profile_out else "") + "\n")
        self.proc.stdin.flush()
        return self.result()

    def close(self) -> None:
        if self.proc.poll() is None and self.proc.stdin is not None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


# ------------------------------------------------------------------------------------------ parent
def token_stats(teacher: str, input_path: str, batch_size: int, max_length: int, extra_budget: int = 0) -> dict[str, float]:
    """Mean tokens per pair fed to the model: real, kdlab's budget batches (B·max_length and default),
    ST's batches (B pairs sorted by characters, longest first, each padded to its longest row),
    B rows in file order padded to their longest (the HF loop)."""
    from kdlab.data.collators import RankingCollator
    from kdlab.data.readers import read_ranking_jsonl
    from kdlab.defaults import LABEL_BATCH_TOKENS
    from kdlab.labeling import token_budget_batches
    from kdlab.models.backbones import load_tokenizer
    from kdlab.models.served import SCORE_HEAD_META

    fmt = "decoder" if (Path(teacher) / SCORE_HEAD_META).is_file() else "cross-encoder"
    enc = RankingCollator(load_tokenizer(teacher), text_format=fmt, max_length=max_length)
    pairs = [(g.query, d.text) for g in read_ranking_jsonl(input_path) for d in g.docs]
    lens = [len(enc.encode(q, t)["input_ids"]) for q, t in pairs]
    n = len(lens)
    by_chars = sorted(range(n), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    st = sum(max(lens[i] for i in by_chars[k:k + batch_size]) * len(by_chars[k:k + batch_size])
             for k in range(0, n, batch_size)) / n

    def budget(tokens: int) -> tuple[float, float]:
        bs = token_budget_batches(lens, tokens)
        return sum(max(lens[i] for i in b) * len(b) for b in bs) / n, n / len(bs)

    file_order = sum(max(lens[i:i + batch_size]) * len(lens[i:i + batch_size]) for i in range(0, n, batch_size)) / n
    (eq, eq_rows), (de, de_rows) = budget(batch_size * max_length), budget(LABEL_BATCH_TOKENS)
    return {"lengths": lens, "real": sum(lens) / n, "budget": eq, "budget_rows": eq_rows, "default": de, "default_rows": de_rows,
            "file_order": file_order, "st": st, **({"tokens": budget(extra_budget)[0]} if extra_budget else {})}


def read_scores(path: Path) -> list[float]:
    return [d["teacher_score"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
            for d in json.loads(line)["docs"]]


def write_input(args: argparse.Namespace, work: Path, pairs: int, name: str) -> tuple[Path, Path, str]:
    """The timed input (val + test groups, or --input; the first ``pairs`` pairs) and the warm-up file."""
    from kdlab.data import sample_path

    sources = [Path(args.input)] if args.input else [Path(sample_path("ranking_val.jsonl")),
                                                     Path(sample_path("ranking_test.jsonl"))]
    rows, total = [], 0
    for src in sources:
        for line in src.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            if pairs and total + len(row["docs"]) > pairs:
                row["docs"] = row["docs"][:pairs - total]
            if row["docs"]:
                rows.append(row)
                total += len(row["docs"])
            if pairs and total >= pairs:
                break
        if pairs and total >= pairs:
            break
    data, warm = work / name, work / "warmup.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    warm.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[:4]), encoding="utf-8")
    return data, warm, " + ".join(str(s) for s in sources) + f" ({len(rows)} groups, {total} pairs)"


def child_args(side: str, teacher: str, data: Path, warm: Path, args: argparse.Namespace) -> list[str]:
    return ["--child", side, "--teacher", teacher, "--input", str(data), "--warmup-input", str(warm),
            "--batch-size", str(args.batch_size), "--max-length", str(args.max_length), "--threads", str(args.threads),
            "--kdlab-max-tokens", str(args.kdlab_max_tokens)]


def start(sides: dict[str, tuple[str, Path]], warm: Path, work: Path, args: argparse.Namespace) -> dict[str, Side]:
    """Start one process per side (``{side: (teacher, input)}``) together and wait until each has
    imported and run its warm-up: no timed run overlaps another side's start-up."""
    procs = {s: Side(s, child_args(s, teacher, data, warm, args), work / f"{s}.log") for s, (teacher, data) in sides.items()}
    for proc in procs.values():
        proc.result()
    return procs


def compare(title: str, sides: tuple[str, ...], procs: dict[str, Side], work: Path,
            args: argparse.Namespace, flops: float) -> dict[str, list[dict[str, Any]]]:
    """Every side's runs: repeat r runs the sides back to back (order flipped every other repeat)."""
    print(f"\n{title}", flush=True)
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in sides}
    for r in range(args.repeats):
        for side in (sides if r % 2 == 0 else tuple(reversed(sides))):
            res = procs[side].run(work / f"{side}.jsonl")
            runs[side].append(res)
            split = (f"  (load {res['load_s']:.2f} s, scoring {res['predict_s']:.2f} s)" if "load_s" in res else "")
            print(f"  run {r + 1} {side:>13}: {res['pairs']} pairs in {res['seconds']:6.2f} s = "
                  f"{res['pairs_per_s']:7.1f} pairs/s  (CPU {res['cpu_s']:6.1f} s = {res['pairs_per_cpu_s']:6.1f} "
                  f"pairs/CPU-s)  {flops / res['seconds'] / 1e9:.1f} GFLOP/s{split}", flush=True)
    return runs


def summarize(runs: dict[str, list[dict[str, Any]]], a: str, b: str) -> dict[str, float]:
    """Medians of ``a`` and ``b`` (pairs/s, pairs per CPU-second) and the ratio a/b: of the medians,
    and the median of the per-repeat ratios (the two sides ran back to back, so load that other
    jobs put on a shared machine hits both alike)."""
    med = {s: statistics.median(x["pairs_per_s"] for x in runs[s]) for s in runs}
    paired = statistics.median(x["pairs_per_s"] / y["pairs_per_s"] for x, y in zip(runs[a], runs[b]))
    cpu = statistics.median(x["pairs_per_cpu_s"] / y["pairs_per_cpu_s"] for x, y in zip(runs[a], runs[b]))
    return {**med, "ratio": med[a] / med[b], "paired": paired, "cpu": cpu}


def profile(args: argparse.Namespace, teacher: str, data: Path, warm: Path, work: Path) -> None:
    import pstats

    out = work / "profile.pstats"
    side = args.profile
    proc = start({side: (teacher, data)}, warm, work, args)[side]
    try:
        res = proc.run(work / f"{side}.jsonl", out)
    finally:
        proc.close()
    print(f"\nprofile of one {side} run (after warm-up, under cProfile): {res['pairs']} pairs in {res['seconds']:.2f} s")
    stats = pstats.Stats(str(out))
    stats.sort_stats("cumulative").print_stats(args.profile_lines)
    stats.sort_stats("tottime").print_stats(args.profile_lines // 2)


def measure(args: argparse.Namespace, procs: dict[str, Side], seq_sides: tuple[str, ...], seq_dir: str, data: Path,
            dec_dir: str, dec_data: Path, work: Path, do_seq: bool, do_dec: bool) -> dict[str, Any]:
    """Run both comparisons on the started side processes; print the result lines, return the JSON."""
    from kdlab.defaults import LABEL_BATCH_TOKENS

    result: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "machine": _common.machine(), "pairs": count_pairs(data),
                              "batch_size": args.batch_size, "max_length": args.max_length, "threads": args.threads,
                              "repeats": args.repeats}
    lines: list[Any] = []  # strings, or callables: FLOP/s lines, rendered once the end-of-run peak is measured
    if do_seq:
        same_budget = args.batch_size * args.max_length == LABEL_BATCH_TOKENS
        sides = seq_sides
        t = token_stats(seq_dir, str(data), args.batch_size, args.max_length, args.kdlab_max_tokens)
        lengths = t.pop("lengths")
        flops = _common.forward_flops(_common.meta_model(seq_dir, "seq-cls"), lengths)
        print(f"  {args.model} tokens/pair fed: real {t['real']:.1f}, kdlab budget {t['budget']:.1f} "
              f"({t['budget_rows']:.0f} rows/batch)"
              + ("" if same_budget else f", kdlab default {t['default']:.1f} ({t['default_rows']:.0f} rows/batch)")
              + f", ST {t['st']:.1f} ({args.batch_size} rows/batch)")
        runs = compare(f"cross-encoder teacher ({args.model}): kdlab vs sentence-transformers", sides, procs, work, args,
                       flops)
        st = read_scores(work / "st.jsonl")
        kd_sides = [s for s in sides if s != "st"]
        diff = max(max(abs(a - b) for a, b in zip(read_scores(work / f"{s}.jsonl"), st)) for s in kd_sides)
        verdicts = []
        for s in kd_sides:
            r = summarize(runs, s, "st")
            label = (LABELS[s] + (" = default" if same_budget and s == "kdlab" else "")).replace(
                "--kdlab-max-tokens", str(args.kdlab_max_tokens))
            lines.append(f"  {label:<56} {r[s]:8.1f} pairs/s")
            lines.append(f"    {_common.flops_line(flops * r[s] / len(lengths), 1.0, peak())}")
            lines.append(f"  {'  ratio to ST: of medians':<56} {r['ratio']:8.2f}x   paired {r['paired']:.2f}x   "
                         f"per CPU-second {r['cpu']:.2f}x")
            short = {"kdlab": f"max_tokens {args.batch_size * args.max_length}", "kdlab-default": "default max_tokens",
                     "kdlab-tokens": f"max_tokens {args.kdlab_max_tokens}"}[s]
            verdicts.append(f"{short}: {'met' if r['paired'] >= TARGET else 'NOT met'} ({r['paired']:.2f}x)")
            result.update({f"{s}_pairs_per_s": round(r[s], 2), f"{s}_ratio_vs_st": round(r["ratio"], 3),
                           f"{s}_paired_ratio_vs_st": round(r["paired"], 3), f"{s}_cpu_ratio_vs_st": round(r["cpu"], 3)})
        st_rate = statistics.median(x['pairs_per_s'] for x in runs['st'])
        lines.append(f"  {LABELS['st']:<56} {st_rate:8.1f} pairs/s")
        lines.append(_flops_later(flops * st_rate / len(lengths)))
        result["seq_forward_gflop"] = round(flops / 1e9, 3)
        lines.append(f"  target kdlab/ST >= {TARGET}x (paired): " + "; ".join(verdicts))
        lines.append(f"  padded tokens/pair: ST {t['st']:.1f} / kdlab {t['budget']:.1f} = {t['st'] / t['budget']:.2f}"
                     + (f"; kdlab max_tokens {args.kdlab_max_tokens}: {t['tokens']:.1f}" if args.kdlab_max_tokens else ""))
        lines.append(f"  max |score diff| kdlab vs ST over {len(st)} pairs: {diff:.2e} "
                     f"({'OK, same work' if diff < 1e-4 else 'DIFFERENT WORK'})")
        result.update({"model": args.model, "st_pairs_per_s": round(statistics.median(x["pairs_per_s"] for x in runs["st"]), 2),
                       "max_abs_diff_vs_st": diff, "tokens_per_pair": {k: round(v, 1) for k, v in t.items()}})
    if do_dec:
        t = token_stats(dec_dir, str(dec_data), args.batch_size, args.max_length)
        lengths = t.pop("lengths")
        flops = _common.forward_flops(_common.meta_model(dec_dir, "encoder"), lengths, causal=True)
        print(f"\n  {args.decoder} tokens/pair fed: real {t['real']:.1f}, kdlab budget {t['budget']:.1f}, "
              f"HF loop (file order) {t['file_order']:.1f}")
        runs = compare(f"decoder teacher (TeacherRankSFT {args.decoder}): kdlab vs padded HF loop", DEC_SIDES,
                       procs, work, args, flops)
        diff = max(abs(a - b) for a, b in zip(read_scores(work / "kdlab-dec.jsonl"), read_scores(work / "hf-dec.jsonl")))
        r = summarize(runs, "kdlab-dec", "hf-dec")
        for s in DEC_SIDES:
            lines.append(f"  {LABELS[s]:<56} {r[s]:8.1f} pairs/s   [decoder {args.decoder}]")
            lines.append(_flops_later(flops * r[s] / len(lengths)))
        result["dec_forward_gflop"] = round(flops / 1e9, 3)
        lines.append(f"  ratio kdlab/HF loop: of medians {r['ratio']:.2f}x   paired {r['paired']:.2f}x   "
                     f"per CPU-second {r['cpu']:.2f}x;  max |score diff| {diff:.2e} ({'OK' if diff < 1e-4 else 'DIFFERENT WORK'})")
        result.update({"decoder": args.decoder, **{f"{s}_pairs_per_s": round(r[s], 2) for s in DEC_SIDES},
                       "ratio_dec_vs_hf": round(r["ratio"], 3), "paired_ratio_dec_vs_hf": round(r["paired"], 3),
                       "cpu_ratio_dec_vs_hf": round(r["cpu"], 3), "max_abs_diff_dec": diff,
                       "dec_pairs": count_pairs(dec_data), "dec_tokens_per_pair": {k: round(v, 1) for k, v in t.items()}})
    peaks.append(_common.matmul_peak_gflops(args.threads))
    print("\nresult (median of runs, end-to-end pairs/s: load, read, tokenize, score, write):")
    print("\n".join(line() if callable(line) else line for line in lines))
    print(f"  fp32 matmul peak: {peaks[0]:.1f} GFLOP/s at the start, {peaks[-1]:.1f} at the end (the larger is the "
          "reference; a gap means the machine's load changed); FLOPs: the forward over the real tokens")
    result["peak_gflops"] = round(peak(), 2)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="minilm-l6", help="seq-cls teacher backbone (minilm-l6 alias, tiny-bert, dir)")
    p.add_argument("--decoder", default="tiny-llama-h256",
                   help="TeacherRankSFT backbone of the decoder teacher (tiny-llama-h256, smollm2-135m; 'none' skips)")
    p.add_argument("--input", default=None, help="ranking JSONL (default: the embedded sample's val + test groups)")
    p.add_argument("--pairs", type=int, default=1600, help="use the first N pairs (0 = all 3151)")
    p.add_argument("--decoder-pairs", type=int, default=800,
                   help="the decoder comparison's first N pairs (0 = as --pairs); keeps the default run ~5 min")
    p.add_argument("--batch-size", type=int, default=32,
                   help="B: ST / HF-loop batch (ST's default 32); kdlab budget = B * max_length (32*192 = its default)")
    p.add_argument("--max-length", type=int, default=192)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--kdlab-max-tokens", type=int, default=0,
                   help="also run kdlab with this token budget (e.g. 2048, smaller batches for a CPU); 0 = no")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", choices=["seq-cls", "decoder"], default=None, help="run one comparison only")
    p.add_argument("--profile", choices=[*SEQ_SIDES, *DEC_SIDES], default=None,
                   help="instead of the comparison: cProfile one run of this side and print the top entries")
    p.add_argument("--profile-lines", type=int, default=40)
    p.add_argument("--child", choices=[*SEQ_SIDES, *DEC_SIDES], help=argparse.SUPPRESS)
    p.add_argument("--teacher", help=argparse.SUPPRESS)
    p.add_argument("--warmup-input", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.child:
        _common.set_threads(args.threads)
        serve(args)
        return
    if args.repeats < 1:
        raise SystemExit("--repeats must be >= 1")

    from kdlab.defaults import LABEL_BATCH_TOKENS

    t_start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="kdlab-bench-label-"))
    data, warm, described = write_input(args, work, args.pairs, "input.jsonl")
    dec_pairs = args.decoder_pairs or args.pairs
    dec_data, _, dec_described = write_input(args, work, dec_pairs, "input_dec.jsonl")
    do_seq = args.only in (None, "seq-cls") and (args.profile is None or args.profile in SEQ_SIDES)
    do_dec = (args.decoder != "none" and args.only in (None, "decoder")
              and (args.profile is None or args.profile in DEC_SIDES))
    seq_dir = make_seq_cls(args.model, work / "seq_cls", args.seed) if do_seq else ""
    dec_dir = make_decoder(args.decoder, work / "decoder", args.seed) if do_dec else ""
    print("settings:")
    print(f"  input={described}" + ("" if dec_pairs == args.pairs or not do_dec else f"; decoder: first {dec_described}"))
    print(f"  B={args.batch_size}  max_length={args.max_length}  kdlab budget=B*max_length={args.batch_size * args.max_length}"
          f" tokens (default {LABEL_BATCH_TOKENS})  fp32  threads={args.threads}  repeats={args.repeats} (+1 warm-up each)")
    if do_seq:
        print(f"  seq-cls teacher: {args.model} exported to {seq_dir}")
    if do_dec:
        print(f"  decoder teacher: TeacherRankSFT({args.decoder}) exported to {dec_dir}")
    print(f"  machine: {_common.machine()}")
    peaks.append(_common.matmul_peak_gflops(args.threads))
    print(f"  {_common.peak_line(peaks[0], args.threads)}")
    if args.profile:
        profile(args, *((seq_dir, data) if args.profile in SEQ_SIDES else (dec_dir, dec_data)), warm, work)
        return
    same_budget = args.batch_size * args.max_length == LABEL_BATCH_TOKENS
    seq_sides = tuple(s for s in SEQ_SIDES if not (s == "kdlab-default" and same_budget)
                      and not (s == "kdlab-tokens" and not args.kdlab_max_tokens))
    plan = {**({s: (seq_dir, data) for s in seq_sides} if do_seq else {}),
            **({s: (dec_dir, dec_data) for s in DEC_SIDES} if do_dec else {})}
    print(f"  starting {len(plan)} side processes (imports + warm-up) ...", flush=True)
    procs = start(plan, warm, work, args)
    try:
        result = measure(args, procs, seq_sides, seq_dir, data, dec_dir, dec_data, work, do_seq, do_dec)
    finally:
        for proc in procs.values():
            proc.close()
    print(f"  total wall time {time.perf_counter() - t_start:.0f} s; load after: "
          f"{_common.machine().split('load average ')[1]}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()

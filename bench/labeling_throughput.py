"""Labeling throughput: ``kdlab.labeling.score_file`` vs a naive padded Hugging Face loop.

Both sides score every (query, document) pair of the same ranking JSONL file with the same teacher
(loaded by :func:`kdlab.models.export.load_rank_teacher` from the same export directory), the same batch
size and the same ``max_length``, in fp32 under ``torch.no_grad``, and write the same output (the
groups with a ``teacher_score`` per document):

* kdlab: ``score_file(teacher_dir, input, output, batch_size, max_length, resume=False)`` — chunks of
  64 groups, pairs sorted by token length, each batch padded to its longest row, durable appends;
* naive: pairs in file order, cut into batches of ``batch_size``, the tokenizer called per batch with
  ``padding="max_length"`` (every row padded to ``max_length``), one forward per batch, the output
  written at the end.

Timed end to end (load teacher + tokenizer, read, tokenize, score, write), each side in a fresh
subprocess with ``torch.set_num_threads(--threads)`` after an untimed warm-up on the first groups;
runs alternate ``--repeats`` times and the medians are compared. The scores of the two outputs
are compared too (they must agree up to float noise: padding is masked out).

    python bench/labeling_throughput.py                                  # MiniLM-L6 cross-encoder teacher
    python bench/labeling_throughput.py --make-teacher tiny-llama        # TeacherRankSFT export (decoder text)
    python bench/labeling_throughput.py --teacher runs/rank_sft/export --input my_groups.jsonl
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

import _common  # noqa: E402  (puts the repo root on sys.path)

SCRIPT = Path(__file__).resolve()

# ------------------------------------------------------------------------------------------ teachers
def make_teacher(kind: str, directory: Path, seed: int) -> str:
    """A teacher export: ``minilm-l6`` (one-label seq-cls cross-encoder, seeded head) or
    ``tiny-llama`` (a :class:`TeacherRankSFT` on ``tiny-llama-h256``, 256-wide, 4 layers, decoder text)."""
    if kind == "tiny-llama":
        import lightning as L

        from kdlab.stages.teacher_rank_sft import TeacherRankSFT

        L.seed_everything(seed, verbose=False)
        TeacherRankSFT(backbone="tiny-llama-h256").export_pretrained(str(directory))
        return str(directory)
    return _common.export_student_init(kind, directory, seed=seed)


# ------------------------------------------------------------------------------------------ naive loop
def naive_score_file(teacher_dir: str, input_path: str, output_path: str, batch_size: int, max_length: int) -> int:
    """File order, fixed-size batches, every row padded to ``max_length``; returns the pair count."""
    import torch

    from kdlab.data.readers import ranking_group_to_json, read_ranking_jsonl, with_scores
    from kdlab.models.backbones import load_tokenizer, pad_token_id
    from kdlab.models.export import load_rank_teacher

    model = load_rank_teacher(teacher_dir)
    tok = load_tokenizer(teacher_dir)
    fmt = model.text_format
    groups = read_ranking_jsonl(input_path)
    pairs = [(gi, j, g.query, d.text) for gi, g in enumerate(groups) for j, d in enumerate(g.docs)]
    scores: list[list[float]] = [[0.0] * len(g.docs) for g in groups]
    pad_id = pad_token_id(tok)
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            if fmt == "cross-encoder":
                enc = tok([c[2] for c in chunk], [c[3] for c in chunk], padding="max_length", truncation=True,
                          max_length=max_length, return_tensors="pt")
                kwargs = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
            else:  # decoder text: "query: q document: d" + EOS, right padding to max_length
                texts = [f"query: {c[2]} document: {c[3]}".rstrip() for c in chunk]
                ids = tok(texts, add_special_tokens=False, truncation=True, max_length=max_length - 1)["input_ids"]
                input_ids = torch.full((len(ids), max_length), pad_id, dtype=torch.long)
                mask = torch.zeros((len(ids), max_length), dtype=torch.long)
                for r, row in enumerate(ids):
                    row = list(row) + [tok.eos_token_id]
                    input_ids[r, :len(row)] = torch.tensor(row)
                    mask[r, :len(row)] = 1
                kwargs = {"input_ids": input_ids, "attention_mask": mask}
            out = model(**kwargs).float().tolist()
            for (gi, j, _, _), s in zip(chunk, out):
                scores[gi][j] = float(s)
    from dataclasses import replace

    with open(output_path, "w", encoding="utf-8") as f:
        for g, sc in zip(groups, scores):
            docs = tuple(with_scores(d, teacher_score=s) for d, s in zip(g.docs, sc))
            f.write(json.dumps(ranking_group_to_json(replace(g, docs=docs)), ensure_ascii=False) + "\n")
    return len(pairs)


def kdlab_score_file(teacher_dir: str, input_path: str, output_path: str, batch_size: int, max_length: int) -> int:
    from kdlab.labeling import score_file

    score_file(teacher_dir, input_path, output_path, batch_size=batch_size, max_length=max_length,
               resume=False, progress=False)
    return sum(len(json.loads(line)["docs"]) for line in Path(input_path).read_text().splitlines() if line.strip())


# ------------------------------------------------------------------------------------------ children
def child(args: argparse.Namespace) -> dict[str, Any]:
    fn = kdlab_score_file if args.child == "kdlab" else naive_score_file
    fn(args.teacher, args.warmup_input, args.output + ".warmup", args.batch_size, args.max_length)  # untimed
    t0 = time.perf_counter()
    n = fn(args.teacher, args.input, args.output, args.batch_size, args.max_length)
    seconds = time.perf_counter() - t0
    return {"side": args.child, "pairs": n, "seconds": seconds, "pairs_per_s": n / seconds}


def padded_tokens(teacher_dir: str, input_path: str, batch_size: int, max_length: int) -> dict[str, float]:
    """Mean tokens per pair that each side feeds the model (real, kdlab bucketed, naive)."""
    from kdlab.data.collators import RankingCollator
    from kdlab.data.readers import read_ranking_jsonl
    from kdlab.defaults import LABEL_CHUNK_GROUPS
    from kdlab.models.backbones import load_tokenizer
    from kdlab.models.export import SCORE_HEAD_META

    fmt = "decoder" if (Path(teacher_dir) / SCORE_HEAD_META).is_file() else "cross-encoder"
    enc = RankingCollator(load_tokenizer(teacher_dir), text_format=fmt, max_length=max_length)
    groups = read_ranking_jsonl(input_path)
    real_total, bucketed = 0, 0
    for start in range(0, len(groups), LABEL_CHUNK_GROUPS):
        chunk = groups[start:start + LABEL_CHUNK_GROUPS]
        lens = sorted(len(enc.encode(g.query, d.text)["input_ids"]) for g in chunk for d in g.docs)
        real_total += sum(lens)
        bucketed += sum(max(lens[i:i + batch_size]) * len(lens[i:i + batch_size]) for i in range(0, len(lens), batch_size))
    n = sum(len(g.docs) for g in groups)
    return {"real": real_total / n, "kdlab": bucketed / n, "naive": float(max_length)}


# ------------------------------------------------------------------------------------------ parent
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default=None, help="teacher export dir (TeacherRankSFT export or seq-cls)")
    p.add_argument("--make-teacher", default="minilm-l6", choices=["minilm-l6", "tiny-llama", "tiny-bert"],
                   help="teacher to build when --teacher is not given")
    p.add_argument("--input", default=None, help="ranking JSONL (default: embedded ranking_train.jsonl)")
    p.add_argument("--max-groups", type=int, default=0, help="use only the first N groups (0 = all)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", choices=["kdlab", "naive"], help=argparse.SUPPRESS)
    p.add_argument("--output", help=argparse.SUPPRESS)
    p.add_argument("--warmup-input", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.child:
        _common.set_threads(args.threads)
        _common.emit(child(args))
        return

    from kdlab.data import sample_path

    work = Path(tempfile.mkdtemp(prefix="kdlab-bench-label-"))
    src = Path(args.input or sample_path("ranking_train.jsonl"))
    lines = [line for line in src.read_text(encoding="utf-8").splitlines() if line.strip()]
    if args.max_groups:
        lines = lines[:args.max_groups]
    data = work / "input.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    warm = work / "warmup.jsonl"
    warm.write_text("\n".join(lines[:4]) + "\n", encoding="utf-8")
    teacher = args.teacher or make_teacher(args.make_teacher, work / "teacher", args.seed)
    n_pairs = sum(len(json.loads(line)["docs"]) for line in lines)
    toks = padded_tokens(teacher, str(data), args.batch_size, args.max_length)
    print("settings:")
    print(f"  teacher={args.teacher or args.make_teacher + ' (built: ' + teacher + ')'}")
    print(f"  input={src} ({len(lines)} groups, {n_pairs} pairs)  batch={args.batch_size} pairs  "
          f"max_length={args.max_length}  fp32  no_grad  threads={args.threads}  repeats={args.repeats}")
    print(f"  tokens/pair fed to the model: real {toks['real']:.1f}, kdlab bucketed {toks['kdlab']:.1f}, "
          f"naive {toks['naive']:.0f}")
    print(f"  machine: {_common.machine()}")
    runs: dict[str, list[dict[str, Any]]] = {"kdlab": [], "naive": []}
    for r in range(args.repeats):
        for side in (("kdlab", "naive") if r % 2 == 0 else ("naive", "kdlab")):
            res = _common.run_child(SCRIPT, ["--child", side, "--teacher", teacher, "--input", str(data),
                                             "--warmup-input", str(warm), "--output", str(work / f"{side}.jsonl"),
                                             "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
                                             "--threads", str(args.threads)])
            runs[side].append(res)
            print(f"  run {r + 1} {side:>5}: {res['pairs']} pairs in {res['seconds']:.2f} s = "
                  f"{res['pairs_per_s']:.1f} pairs/s", flush=True)
    a = [d["teacher_score"] for line in (work / "kdlab.jsonl").read_text().splitlines() for d in json.loads(line)["docs"]]
    b = [d["teacher_score"] for line in (work / "naive.jsonl").read_text().splitlines() for d in json.loads(line)["docs"]]
    diff = max(abs(x - y) for x, y in zip(a, b))
    kd = statistics.median(x["pairs_per_s"] for x in runs["kdlab"])
    nv = statistics.median(x["pairs_per_s"] for x in runs["naive"])
    print("result (median of runs, end-to-end pairs per second):")
    print(f"  kdlab score_file (length-bucketed): {kd:8.1f} pairs/s")
    print(f"  naive padded HF loop:               {nv:8.1f} pairs/s")
    ratio = kd / nv
    print(f"  ratio kdlab/naive = {ratio:.2f}x  (target >= 2x: {'met' if ratio >= 2 else 'MISSED'})")
    print(f"  max |score difference| between the two outputs: {diff:.2e} over {len(a)} pairs")
    print(f"  machine load after: {_common.machine().split('load average ')[1]}")
    print(json.dumps({"kdlab_pairs_per_s": round(kd, 2), "naive_pairs_per_s": round(nv, 2), "ratio": round(ratio, 3),
                      "max_abs_diff": diff}))


if __name__ == "__main__":
    main()

"""Ranking groups from a large MS MARCO-like collection: offset index (TextCollection) vs dict reader.

Writes a synthetic collection (``pid \\t text``, integer pids, ~55 words / ~330 bytes per passage
drawn from a fixed 50 k-word vocabulary with a Zipf-like distribution, seeded), a queries file, a
TREC run (``--queries`` × ``--top-k`` random pids) and qrels (one relevant passage per query, in
the run for 80 % of the queries). Then, in a fresh child process each (so peak RSS is the reading
alone), builds the ranking groups exactly as a config ``{format: msmarco, collection, queries, qrels,
run, top_k}`` makes kdlab do (``kdlab.data.sources.read_source``: offset-indexed collection, every
file validated, groups whose documents read their texts from the collection when asked), then
reads every candidate's text once, as an epoch of a data loader would. Prints the time to build the
groups, the time to read the texts, peak RSS (``ru_maxrss``) and the ratio peak RSS / collection
file size. ``--with-dict-peer`` measures the old path too
(``read_msmarco_collection`` into a dict: several GB at 2 M passages).

Targets (2-core machine, 2 M passages): total < 60 s, peak RSS < 0.25 × the collection's size.

    python bench/collection_scale.py                       # 2 M passages, 10 k queries, top-20
    python bench/collection_scale.py --with-dict-peer
    python bench/collection_scale.py --passages 200000 --queries 2000 --keep --workdir /tmp/cs
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, flops_line, machine, matmul_peak_gflops, peak_line, run_child  # noqa: E402

VOCAB_SIZE = 50_000
WORDS_PER_PASSAGE = (35, 76)  # uniform in [35, 75]: mean 55
WRITE_CHUNK = 100_000  # passages per write
TARGET_SECONDS = 60.0
TARGET_RSS_RATIO = 0.25


# --------------------------------------------------------------------------------------------------
# Synthetic data (numpy-vectorised)


def _vocabulary(rng) -> tuple[list[bytes], "object"]:
    """``VOCAB_SIZE`` distinct lowercase words, short ones first (frequent words are short), and
    their Zipf-like sampling probabilities p(r) ∝ 1 / (r + 2.7)^1.1."""
    import numpy as np

    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", dtype=np.uint8)
    words: list[bytes] = []
    seen: set[bytes] = set()
    while len(words) < VOCAB_SIZE:
        r = len(words)
        length = int(min(12, 2 + int(r ** 0.19) + rng.integers(0, 2)))
        w = letters[rng.integers(0, 26, length)].tobytes()
        if w not in seen:
            seen.add(w)
            words.append(w)
    ranks = np.arange(VOCAB_SIZE, dtype=np.float64)
    p = 1.0 / (ranks + 2.7) ** 1.1
    return words, p / p.sum()


def _passage_bodies(rng, words_flat, starts, lengths, cdf, n: int) -> tuple[bytes, "object"]:
    """``n`` passage bodies as one byte string and their end offsets: words sampled from ``cdf``,
    joined by spaces, assembled with a single gather (no Python loop over words)."""
    import numpy as np

    counts = rng.integers(*WORDS_PER_PASSAGE, size=n)
    tokens = np.searchsorted(cdf, rng.random(int(counts.sum())), side="right").clip(0, len(starts) - 1)
    tok_len = lengths[tokens] + 1  # word + the space after it
    out_end = np.cumsum(tok_len)
    out_start = out_end - tok_len
    total = int(out_end[-1])
    shift = np.repeat(starts[tokens] - out_start, tok_len)
    buf = words_flat[np.arange(total, dtype=np.int64) + shift]
    passage_end = out_end[np.cumsum(counts) - 1]  # offset just past each passage's trailing space
    return buf.tobytes(), passage_end


class ZipfText:
    """The synthetic text of every scale benchmark: ``VOCAB_SIZE`` words, a Zipf-like draw, from one
    seeded generator (``rng``, also used for whatever the caller draws next)."""

    def __init__(self, rng) -> None:
        import numpy as np

        self.rng = rng
        words, p = _vocabulary(rng)
        self.words_flat = np.frombuffer(b" ".join(words) + b" ", dtype=np.uint8)
        self.lengths = np.array([len(w) for w in words], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.lengths + 1)[:-1]])
        self.cdf = np.cumsum(p)
        self.cdf[-1] = 1.0

    def bodies(self, n: int, rng=None) -> tuple[bytes, "object"]:
        """:func:`_passage_bodies` of ``n`` passages (from ``rng``, default the generator's own)."""
        return _passage_bodies(rng or self.rng, self.words_flat, self.starts, self.lengths, self.cdf, n)

    def write_collection(self, path: Path, passages: int) -> None:
        """``pid \t text`` lines, pids 0..passages-1, written ``WRITE_CHUNK`` passages at a time."""
        import numpy as np

        with open(path, "wb") as f:
            for first in range(0, passages, WRITE_CHUNK):
                n = min(WRITE_CHUNK, passages - first)
                body, ends = self.bodies(n)
                begins = np.concatenate([[0], ends[:-1]]).tolist()
                ends = (ends - 1).tolist()  # drop each passage's trailing space
                f.write(b"".join(b"%d\t%s\n" % (first + i, body[b:e]) for i, (b, e) in enumerate(zip(begins, ends))))


def write_dataset(workdir: Path, passages: int, queries: int, top_k: int, seed: int) -> dict[str, object]:
    import numpy as np

    rng = np.random.default_rng(seed)
    text = ZipfText(rng)
    t0 = time.perf_counter()
    collection = workdir / "collection.tsv"
    text.write_collection(collection, passages)
    write_s = time.perf_counter() - t0

    qids = rng.choice(np.arange(1_000_000, 1_000_000 + 100 * queries), size=queries, replace=False)
    q_body, q_ends = text.bodies(queries, np.random.default_rng(seed + 1))
    q_begins = np.concatenate([[0], q_ends[:-1]]).tolist()
    with open(workdir / "queries.tsv", "wb") as f:
        f.write(b"".join(b"%d\t%s\n" % (q, q_body[b:e - 1][:60].strip())
                         for q, b, e in zip(qids.tolist(), q_begins, q_ends.tolist())))

    pids = rng.integers(0, passages, size=(queries, top_k))
    for row in range(queries):  # distinct pids within a query (collisions are rare)
        while len(set(pids[row].tolist())) < top_k:
            pids[row] = rng.integers(0, passages, size=top_k)
    scores = -np.sort(-rng.uniform(5.0, 30.0, size=(queries, top_k)), axis=1)
    with open(workdir / "run.trec", "w", encoding="utf-8") as f:
        for q, row, srow in zip(qids.tolist(), pids.tolist(), scores.tolist()):
            f.write("".join(f"{q} Q0 {pid} {rank} {s:.4f} synthetic\n" for rank, (pid, s) in enumerate(zip(row, srow), 1)))
    in_run = rng.random(queries) < 0.8
    pick = rng.integers(0, top_k, size=queries)
    other = rng.integers(0, passages, size=queries)
    with open(workdir / "qrels.txt", "w", encoding="utf-8") as f:
        for i, q in enumerate(qids.tolist()):
            pid = int(pids[i, pick[i]]) if in_run[i] else int(other[i])
            f.write(f"{q} 0 {pid} 1\n")
    return {"collection_bytes": collection.stat().st_size, "write_s": round(write_s, 2),
            "total_write_s": round(time.perf_counter() - t0, 2)}


# --------------------------------------------------------------------------------------------------
# The measured child


def _rss_mib() -> float:
    """Current resident set size (Linux /proc), MiB."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def _hwm_kib() -> int | None:
    """``VmHWM`` (peak RSS of this process image alone, Linux), KiB: a cross-check of
    ``ru_maxrss``, which on Linux also carries the parent's RSS at fork over ``exec`` — why the
    parent of the measured children stays small (the data are written by a child too)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def child(mode: str, workdir: Path, top_k: int, trace: bool = False) -> None:
    if trace:
        import tracemalloc

        tracemalloc.start()
    from kdlab.data.readers import (
        assemble_ranking_groups,
        read_msmarco_collection,
        read_msmarco_queries,
        read_trec_qrels,
        read_trec_run,
    )

    if mode == "index":
        import numpy  # noqa: F401  (counted in the baseline, as kdlab imports it anyway)

        from kdlab.data.collection import TextCollection
        from kdlab.data.sources import RankingSource, read_source
    rss: dict[str, float] = {"imports": _rss_mib()}
    t0 = time.perf_counter()
    if mode == "index":
        # exactly what a config `{format: msmarco, ...}` makes kdlab do (data module, label, pipeline)
        source = RankingSource(format="msmarco", collection=str(workdir / "collection.tsv"),
                               queries=str(workdir / "queries.tsv"), qrels=str(workdir / "qrels.txt"),
                               run=str(workdir / "run.trec"), top_k=top_k)
        groups = read_source(source, "train", cache=False).groups
        corpus = groups[0].docs[0]._store if groups and hasattr(groups[0].docs[0], "_store") else None
        t1 = t0
    else:
        corpus = read_msmarco_collection(workdir / "collection.tsv")
        doc_ids = corpus.keys()
        t1 = time.perf_counter()
        rss["collection"] = _rss_mib()
        queries = read_msmarco_queries(workdir / "queries.tsv")
        qrels = read_trec_qrels(workdir / "qrels.txt", doc_ids=doc_ids, query_ids=queries)
        run = read_trec_run(workdir / "run.trec", doc_ids=doc_ids, query_ids=queries)
        rss["run"] = _rss_mib()
        groups = assemble_ranking_groups(queries, corpus, qrels, run, top_k=top_k)
    t2 = time.perf_counter()
    rss["groups"] = _rss_mib()
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Every candidate's text read once, as one epoch of a data loader would (nothing kept).
    chars = sum(len(d.text) for g in groups for d in g.docs)
    t3 = time.perf_counter()
    if trace:
        _print_trace(tracemalloc.take_snapshot(), tracemalloc.get_traced_memory())
    emit({"mode": mode, "index_s": round(t1 - t0, 2), "groups_s": round(t2 - t1, 2), "total_s": round(t2 - t0, 2),
          "texts_s": round(t3 - t2, 2), "text_chars": chars,
          "peak_rss_kib": peak_kib, "vm_hwm_kib": _hwm_kib(), "rss_mib": {k: round(v, 1) for k, v in rss.items()},
          "groups": len(groups), "docs": sum(len(g.docs) for g in groups),
          "index_bytes": getattr(corpus, "nbytes", None) if mode == "index" else None})


def _print_trace(snapshot, traced: tuple[int, int]) -> None:
    """Where the Python heap is once the groups are built: by allocating line, largest first."""
    import tracemalloc

    snapshot = snapshot.filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
    stats = snapshot.statistics("lineno")
    total = sum(s.size for s in stats)
    print(f"TRACE heap after groups {total / 2**20:.1f} MiB (traced now {traced[0] / 2**20:.1f} MiB, "
          f"traced peak {traced[1] / 2**20:.1f} MiB); largest allocation sites:")
    for s in stats[:12]:
        frame = s.traceback[0]
        print(f"TRACE {s.size / 2**20:8.1f} MiB {s.count:9d} blocks  {frame.filename.split('/kdlab/')[-1]}:{frame.lineno}")


# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--passages", type=int, default=2_000_000)
    ap.add_argument("--queries", type=int, default=10_000)
    ap.add_argument("--top-k", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=None, help="where to write the data (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the written data (and reuse it when it is there)")
    ap.add_argument("--with-dict-peer", action="store_true", help="also measure the dict reader (GBs of RAM)")
    ap.add_argument("--trace", action="store_true",
                    help="also rerun the TextCollection child under tracemalloc and print where the heap goes")
    ap.add_argument("--child", choices=["write", "index", "dict", "trace", "peak"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child == "peak":  # in a child: torch in this (parent) process would raise the children's ru_maxrss
        import torch

        emit({"peak": matmul_peak_gflops(), "threads": torch.get_num_threads()})
        return 0
    if args.child == "write":
        emit(write_dataset(args.workdir, args.passages, args.queries, args.top_k, args.seed))
        return 0
    if args.child:
        child("index" if args.child == "trace" else args.child, args.workdir, args.top_k, trace=args.child == "trace")
        return 0

    print(f"date     {_dt.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"machine  {machine()}")
    print(f"settings passages={args.passages} queries={args.queries} top_k={args.top_k} seed={args.seed}")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="kdlab-collection-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        collection = workdir / "collection.tsv"
        files = [collection, workdir / "queries.tsv", workdir / "run.trec", workdir / "qrels.txt"]
        if args.keep and all(f.is_file() for f in files):
            print(f"data     reusing {workdir}")
        else:
            info = run_child(__file__, ["--child", "write", "--workdir", str(workdir), "--passages", str(args.passages),
                                        "--queries", str(args.queries), "--top-k", str(args.top_k),
                                        "--seed", str(args.seed)])
            print(f"data     wrote {workdir}: collection in {info['write_s']} s, all files in {info['total_write_s']} s")
        size = collection.stat().st_size
        print(f"         collection.tsv {size / 2**20:.1f} MiB ({size / args.passages:.0f} bytes/passage)")

        results = [run_child(__file__, ["--child", "index", "--workdir", str(workdir), "--top-k", str(args.top_k)])]
        if args.with_dict_peer:
            results.append(run_child(__file__, ["--child", "dict", "--workdir", str(workdir), "--top-k", str(args.top_k)]))
        for r in results:
            name = "TextCollection (offset index)" if r["mode"] == "index" else "read_msmarco_collection (dict)"
            peak = r["peak_rss_kib"] * 1024
            print(f"\n{name}")
            if r["mode"] == "index":
                print(f"  read + validate + build groups {r['total_s']:7.2f} s   ({r['groups']} groups, {r['docs']} "
                      f"documents); then every candidate's text read once: {r['texts_s']:.2f} s")
            else:
                print(f"  read/index {r['index_s']:7.2f} s   groups {r['groups_s']:6.2f} s   total {r['total_s']:7.2f} s"
                      f"   ({r['groups']} groups, {r['docs']} documents)")
            hwm = f" (VmHWM {r['vm_hwm_kib'] / 1024:.1f} MiB)" if r.get("vm_hwm_kib") else ""
            print(f"  peak RSS {peak / 2**20:8.1f} MiB = {peak / size:.3f} x the collection file{hwm}")
            print("  RSS after " + ", ".join(f"{k} {v:.0f}" for k, v in r["rss_mib"].items()) + " MiB")
            if r.get("index_bytes") is not None:
                print(f"  index arrays {r['index_bytes'] / 2**20:.1f} MiB")
            if r["mode"] == "index":
                ok_t = r["total_s"] < TARGET_SECONDS
                ok_m = peak < TARGET_RSS_RATIO * size
                print(f"  total < {TARGET_SECONDS:.0f} s: {'PASS' if ok_t else 'FAIL'}   "
                      f"peak RSS < {TARGET_RSS_RATIO} x file: {'PASS' if ok_m else 'FAIL'}")
        if args.trace:
            proc = subprocess.run([sys.executable, __file__, "--child", "trace", "--workdir", str(workdir),
                                   "--top-k", str(args.top_k)], capture_output=True, text=True, check=True)
            print("\ntracemalloc (TextCollection child rerun; slower, figures above are without it)")
            for line in proc.stdout.splitlines():
                if line.startswith("TRACE "):
                    print("  " + line[len("TRACE "):])
        if len(results) == 2:
            a, b = results
            print(f"\nratios index/dict: total time {a['total_s'] / b['total_s']:.2f}x, "
                  f"peak RSS {a['peak_rss_kib'] / b['peak_rss_kib']:.3f}x")
        # Every benchmark reports its FLOP/s against this machine's fp32 matmul peak, measured in the
        # same run (here in a child, after the measurements); this one runs no model.
        matmul = run_child(__file__, ["--child", "peak"])
        print(f"\n{peak_line(matmul['peak'], matmul['threads'])}")
        print(f"FLOP/s: no model runs here (reading, validating and indexing text only): "
              f"{flops_line(0.0, 1.0, matmul['peak'])}")
        emit({"collection_bytes": size, "results": results, "peak_gflops": round(matmul["peak"], 2)})
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
        elif not args.keep:
            for name in ("collection.tsv", "queries.tsv", "run.trec", "qrels.txt"):
                (workdir / name).unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

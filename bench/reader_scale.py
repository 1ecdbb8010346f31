"""Every MS MARCO reader at MS MARCO's size: wall time and peak RSS, each in a fresh process.

Writes synthetic files shaped like MS MARCO passage (``collection.tsv`` of ``--passages`` passages,
8.8 M by default, ~55 words each from a 50 k-word Zipf vocabulary — the generator of
``bench/collection_scale.py``; ``queries.tsv``; a TREC run of ``--queries`` × ``--depth`` lines,
10 k × 1000 = 10 M by default, each query's candidates distinct and written best first as
BM25 runs are; qrels with one relevant passage per query), then reads each file with the reader
kdlab uses, one child process per reader so each peak RSS (``VmHWM``) is that reader's alone:

* ``collection`` — :meth:`kdlab.data.collection.TextCollection.open` (the offset index);
* ``queries`` — :func:`kdlab.data.readers.read_tsv_texts`;
* ``qrels`` — :func:`kdlab.data.readers.read_trec_qrels`;
* ``run`` — :func:`kdlab.data.readers.read_run` with ``top_k`` (each query's best ``top_k`` kept
  while reading: memory O(queries × top_k));
* ``run (whole)`` — the same file with ``top_k=None`` (every line kept: what the reader did
  before it streamed), only with ``--with-whole``;
* ``read_source`` — the whole ``{format: msmarco, collection, queries, qrels, run, top_k}`` source
  as a data module, ``kdlab label`` or the pipeline reads it: every id of the run and qrels checked
  against the collection's index, groups built.

Goals (2-core machine): the run's 10 M lines read in < 60 s and < 1 GiB peak RSS.

    python bench/reader_scale.py                                   # 8.8 M passages, 10 M-line run
    python bench/reader_scale.py --passages 1000000 --queries 2000 --depth 1000 --keep --workdir /tmp/rs
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, machine, run_child  # noqa: E402
from collection_scale import ZipfText, _hwm_kib  # noqa: E402

RUN_SECONDS_GOAL = 60.0
RUN_RSS_GOAL_MIB = 1024.0
FILES = ("collection.tsv", "queries.tsv", "qrels.txt", "run.trec")


def write_dataset(workdir: Path, passages: int, queries: int, depth: int, seed: int) -> dict[str, float]:
    import numpy as np

    rng = np.random.default_rng(seed)
    text = ZipfText(rng)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    text.write_collection(workdir / "collection.tsv", passages)
    seconds["collection"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    qids = (1_000_000 + rng.permutation(100 * queries)[:queries]).tolist()
    q_body, q_ends = text.bodies(queries)
    q_begins = np.concatenate([[0], q_ends[:-1]]).tolist()
    with open(workdir / "queries.tsv", "wb") as f:
        f.write(b"".join(b"%d\t%s\n" % (q, q_body[b:e - 1][:60].strip() or b"query")
                         for q, b, e in zip(qids, q_begins, q_ends.tolist())))
    # distinct candidates per query: a random start plus a stride that cannot wrap onto itself
    stride = max(1, passages // depth)
    relevant = []
    with open(workdir / "run.trec", "wb") as f:
        for lo in range(0, queries, 1000):
            block = qids[lo:lo + 1000]
            pids = (rng.integers(0, passages, size=(len(block), 1)) + stride * np.arange(depth)) % passages
            scores = -np.sort(-rng.uniform(5.0, 30.0, size=(len(block), depth)), axis=1)
            relevant += pids[np.arange(len(block)), rng.integers(0, depth, size=len(block))].tolist()
            f.write(b"".join(b"%d Q0 %d %d %.4f bm25\n" % (q, pid, rank, s)
                             for q, prow, srow in zip(block, pids.tolist(), scores.tolist())
                             for rank, (pid, s) in enumerate(zip(prow, srow), 1)))
    with open(workdir / "qrels.txt", "wb") as f:
        f.write(b"".join(b"%d 0 %d 1\n" % (q, pid) for q, pid in zip(qids, relevant)))
    seconds["queries, run, qrels"] = time.perf_counter() - t0
    return {k: round(v, 1) for k, v in seconds.items()}


def measure(reader: str, workdir: Path, top_k: int) -> dict[str, object]:
    """Run one reader in this (fresh) process; wall time and this process's peak RSS."""
    from kdlab.data.collection import TextCollection
    from kdlab.data.readers import read_run, read_trec_qrels, read_tsv_texts
    from kdlab.data.sources import RankingSource, read_source

    base_kib = _hwm_kib() or 0
    t0 = time.perf_counter()
    if reader == "collection":
        with TextCollection.open(workdir / "collection.tsv") as collection:
            size = f"{len(collection)} passages, index {collection.nbytes / 2**20:.0f} MiB"
    elif reader == "queries":
        size = f"{len(read_tsv_texts(workdir / 'queries.tsv', 'qid'))} queries"
    elif reader == "qrels":
        size = f"{sum(map(len, read_trec_qrels(workdir / 'qrels.txt').values()))} judgements"
    elif reader in ("run", "run-whole"):
        run = read_run(workdir / "run.trec", allow_msmarco_tsv=True, top_k=top_k if reader == "run" else None)
        size = f"{len(run)} queries, {sum(map(len, run.values()))} entries kept"
    else:
        source = RankingSource(format="msmarco", collection=str(workdir / "collection.tsv"),
                               queries=str(workdir / "queries.tsv"), qrels=str(workdir / "qrels.txt"),
                               run=str(workdir / "run.trec"), top_k=top_k)
        groups = read_source(source, "train", cache=False).groups
        size = f"{len(groups)} groups, {sum(len(g.docs) for g in groups)} documents"
    seconds = time.perf_counter() - t0
    return {"reader": reader, "seconds": round(seconds, 2), "peak_rss_mib": round((_hwm_kib() or 0) / 1024, 1),
            "baseline_rss_mib": round(base_kib / 1024, 1), "result": size}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--passages", type=int, default=8_841_823)
    ap.add_argument("--queries", type=int, default=10_000)
    ap.add_argument("--depth", type=int, default=1000, help="run lines per query")
    ap.add_argument("--top-k", type=int, default=20, help="candidates kept per query")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=None, help="where to write the data (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the written data (and reuse it when it is there)")
    ap.add_argument("--with-whole", action="store_true", help="also read the run keeping every line (GBs)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child == "write":
        emit(write_dataset(args.workdir, args.passages, args.queries, args.depth, args.seed))
        return 0
    if args.child:
        emit(measure(args.child, args.workdir, args.top_k))
        return 0

    print(f"date     {_dt.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"machine  {machine()}")
    print(f"settings passages={args.passages} queries={args.queries} depth={args.depth} top_k={args.top_k} "
          f"seed={args.seed}")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="kdlab-reader-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        if args.keep and all((workdir / f).is_file() for f in FILES):
            print(f"data     reusing {workdir}")
        else:
            wrote = run_child(__file__, ["--child", "write", "--workdir", str(workdir), "--passages", str(args.passages),
                                         "--queries", str(args.queries), "--depth", str(args.depth),
                                         "--seed", str(args.seed)])
            print("data     wrote " + ", ".join(f"{k} in {v} s" for k, v in wrote.items()))
        for name in FILES:
            path = workdir / name
            print(f"         {name:15s} {os.path.getsize(path) / 2**20:9.1f} MiB")
        readers = ["collection", "queries", "qrels", "run"] + (["run-whole"] if args.with_whole else []) + ["source"]
        print(f"\n{'reader':34s} {'wall s':>8s} {'peak RSS MiB':>13s} {'(start)':>8s}  result")
        results = []
        for reader in readers:
            r = run_child(__file__, ["--child", reader, "--workdir", str(workdir), "--top-k", str(args.top_k)])
            results.append(r)
            label = {"collection": "TextCollection.open (offset index)", "queries": "read_tsv_texts (queries)",
                     "qrels": "read_trec_qrels", "run": f"read_run top_k={args.top_k}",
                     "run-whole": "read_run top_k=None (every line)", "source": f"read_source (all, top_k={args.top_k})"}
            print(f"{label[reader]:34s} {r['seconds']:8.2f} {r['peak_rss_mib']:13.1f} {r['baseline_rss_mib']:8.1f}  "
                  f"{r['result']}")
        run = next(r for r in results if r["reader"] == "run")
        lines = args.queries * args.depth
        print(f"\nrun: {lines / 1e6:.1f} M lines in {run['seconds']:.1f} s ({lines / run['seconds'] / 1e3:.0f} k lines/s), "
              f"peak RSS {run['peak_rss_mib']:.0f} MiB — goals < {RUN_SECONDS_GOAL:.0f} s: "
              f"{'PASS' if run['seconds'] < RUN_SECONDS_GOAL else 'FAIL'}, < {RUN_RSS_GOAL_MIB:.0f} MiB: "
              f"{'PASS' if run['peak_rss_mib'] < RUN_RSS_GOAL_MIB else 'FAIL'}")
        emit({"passages": args.passages, "queries": args.queries, "depth": args.depth, "top_k": args.top_k,
              "results": results})
    finally:
        if not args.keep:
            for name in FILES:
                (workdir / name).unlink(missing_ok=True)
            if args.workdir is None:
                shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""kdlab's BM25 first stage (bm25s) at 1 M and 2 M synthetic MS MARCO-shaped passages: index time,
peak RSS, queries/s — beside bm25s's own ``retrieve`` on the same index, and bm25s's README figures.

For each size, a child process writes ``collection.tsv`` (the generator of
``bench/collection_scale.py``: ~55 words per passage from a 50 k-word Zipf vocabulary) and
``--queries`` queries (~8 words from the same vocabulary); a fresh child then opens the collection
as kdlab does (:class:`~kdlab.data.collection.TextCollection`), builds kdlab's BM25 index
(``kdlab.data.first_stage``: bm25s's tokenizer and ``BM25(method="lucene", backend="numpy")``),
retrieves ``--top-k`` per query the way :func:`~kdlab.data.first_stage.bm25_run` does (one
``get_scores`` per query, deterministic tie order), then runs bm25s's own ``retrieve`` (one
thread) over the same index and queries. Prints index seconds, RSS after indexing, peak RSS, and
queries/s for both, then the growth from the smallest size to the largest and what 8.8 M would
need by linear extrapolation (index and retrieval are linear in the collection for a fixed query
set).

Peer figures (bm25s README, single-threaded Xeon @ 2.70 GHz): MS MARCO (8.8 M passages, 300 M+
tokens) 12.2 queries/s; RAM after indexing in memory 10.21 GB for MS MARCO and 4.36 GB for NQ
(2.68 M passages, 100 M+ tokens). Synthetic passages carry ~55 tokens each (MS MARCO ~35 after
stopwords), so the index here is larger per passage than MS MARCO's.

    python bench/first_stage_scale.py                        # 1 M and 2 M passages, 200 queries
    python bench/first_stage_scale.py --passages 100000 300000 --queries 50
"""

from __future__ import annotations

import argparse
import datetime as _dt
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, machine, run_child  # noqa: E402
from collection_scale import ZipfText, _hwm_kib, _rss_mib  # noqa: E402

MSMARCO_PASSAGES = 8_841_823
PEER = {"msmarco_qps": 12.2, "msmarco_ram_gb": 10.21, "nq_ram_gb": 4.36, "nq_passages": 2_681_468}


def write(workdir: Path, passages: int, queries: int, seed: int) -> dict[str, float]:
    import numpy as np

    text = ZipfText(np.random.default_rng(seed))
    t0 = time.perf_counter()
    text.write_collection(workdir / "collection.tsv", passages)
    body, ends = text.bodies(queries, np.random.default_rng(seed + 1))  # the same queries at every size
    begins = np.concatenate([[0], ends[:-1]]).tolist()
    with open(workdir / "queries.tsv", "wb") as f:
        f.write(b"".join(b"%d\t%s\n" % (i, b" ".join(body[b:e - 1].split()[:8]))
                         for i, (b, e) in enumerate(zip(begins, ends.tolist()))))
    return {"write_s": round(time.perf_counter() - t0, 1)}


def measure(workdir: Path, top_k: int) -> dict[str, object]:
    import numpy as np

    from kdlab.data.collection import TextCollection
    from kdlab.data.first_stage import BM25Options, _Index, _top_k
    from kdlab.data.readers import read_tsv_texts

    start_mib = _rss_mib()
    collection = TextCollection.open(workdir / "collection.tsv")
    queries = read_tsv_texts(workdir / "queries.tsv", "qid")
    n = len(collection)
    t0 = time.perf_counter()
    texts = (f"{title} {text}" for _, title, text in collection.iter_documents())
    index = _Index(texts, n, BM25Options(), progress=False)
    index_s = time.perf_counter() - t0
    index_rss = _rss_mib()
    tokens = int(index.retriever.scores["indices"].shape[0]) if isinstance(index.retriever.scores, dict) else None

    file_order = collection._file_order()
    rank_cache: list[np.ndarray] = []

    def id_of(indices: np.ndarray) -> list[str]:
        return collection._ids_at(file_order[indices])

    def rank_of() -> np.ndarray:
        if not rank_cache:
            rank_cache.append(collection._string_rank()[file_order])
        return rank_cache[0]

    query_tokens = index.query_ids(list(queries.values()))
    t0 = time.perf_counter()
    kdlab_best = [_top_k(index.scores(q), top_k, id_of, rank_of) for q in query_tokens]
    kdlab_s = time.perf_counter() - t0

    from bm25s.tokenization import Tokenized

    vocab = index.tokenizer.get_vocab_dict()
    t0 = time.perf_counter()
    peer_docs, _ = index.retriever.retrieve(Tokenized(ids=query_tokens, vocab=vocab), k=top_k, n_threads=1,
                                            show_progress=False)
    peer_s = time.perf_counter() - t0
    # Both must find the same top-1 where it is not tied (a check that both ran the same scoring).
    same_top1 = float(np.mean([best[0][0] == int(docs[0]) for best, docs in zip(kdlab_best, peer_docs)]))
    return {"passages": n, "queries": len(query_tokens), "index_s": round(index_s, 1),
            "index_nonzeros": tokens, "start_rss_mib": round(start_mib, 1), "index_rss_mib": round(index_rss, 1),
            "peak_rss_mib": round((_hwm_kib() or 0) / 1024, 1),
            "kdlab_qps": round(len(query_tokens) / kdlab_s, 2), "bm25s_qps": round(len(query_tokens) / peer_s, 2),
            "same_top1": round(same_top1, 3)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--passages", type=int, nargs="+", default=[1_000_000, 2_000_000])
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--top-k", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--child", choices=["write", "measure"], help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child == "write":
        emit(write(args.workdir, args.size, args.queries, args.seed))
        return 0
    if args.child == "measure":
        emit(measure(args.workdir, args.top_k))
        return 0

    print(f"date     {_dt.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"machine  {machine()}")
    print(f"settings passages={args.passages} queries={args.queries} top_k={args.top_k} seed={args.seed}")
    root = args.workdir or Path(tempfile.mkdtemp(prefix="kdlab-first-stage-scale-"))
    results = []
    try:
        print(f"\n{'passages':>10s} {'index s':>8s} {'nonzeros':>12s} {'RSS after index MiB':>20s} {'peak MiB':>9s} "
              f"{'kdlab q/s':>10s} {'bm25s q/s':>10s} {'same top-1':>10s}")
        for size in args.passages:
            workdir = root / str(size)
            workdir.mkdir(parents=True, exist_ok=True)
            run_child(__file__, ["--child", "write", "--workdir", str(workdir), "--size", str(size),
                                 "--queries", str(args.queries), "--seed", str(args.seed)])
            r = run_child(__file__, ["--child", "measure", "--workdir", str(workdir), "--top-k", str(args.top_k)])
            results.append(r)
            print(f"{r['passages']:10d} {r['index_s']:8.1f} {r['index_nonzeros'] or 0:12d} {r['index_rss_mib']:20.0f} "
                  f"{r['peak_rss_mib']:9.0f} {r['kdlab_qps']:10.2f} {r['bm25s_qps']:10.2f} {r['same_top1']:10.3f}")
            shutil.rmtree(workdir, ignore_errors=True)
        if len(results) >= 2:
            a, b = results[0], results[-1]
            scale = b["passages"] / a["passages"]
            grow = {k: b[k] / a[k] for k in ("index_s", "peak_rss_mib", "index_rss_mib")}
            print(f"\ngrowth {a['passages']} → {b['passages']} passages (×{scale:.1f}): index time ×{grow['index_s']:.2f}, "
                  f"RSS after index ×{grow['index_rss_mib']:.2f}, peak RSS ×{grow['peak_rss_mib']:.2f}, "
                  f"kdlab q/s ×{b['kdlab_qps'] / a['kdlab_qps']:.2f}")
            per_passage = (b["peak_rss_mib"] - a["peak_rss_mib"]) / (b["passages"] - a["passages"])
            peak_88 = b["peak_rss_mib"] + per_passage * (MSMARCO_PASSAGES - b["passages"])
            index_88 = b["index_s"] / b["passages"] * MSMARCO_PASSAGES
            qps_88 = b["kdlab_qps"] * b["passages"] / MSMARCO_PASSAGES
            print(f"8.8 M passages, extrapolated linearly: peak RSS ≈ {peak_88 / 1024:.1f} GiB, index ≈ {index_88 / 60:.0f} min, "
                  f"kdlab ≈ {qps_88:.1f} q/s, bm25s ≈ {b['bm25s_qps'] * b['passages'] / MSMARCO_PASSAGES:.1f} q/s")
        print(f"peer (bm25s README, 1 thread): MS MARCO {PEER['msmarco_qps']} q/s; RAM after in-memory index "
              f"{PEER['msmarco_ram_gb']} GB (MS MARCO 8.8 M), {PEER['nq_ram_gb']} GB (NQ 2.68 M)")
        emit({"results": results, "peer": PEER})
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

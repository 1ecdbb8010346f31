#!/usr/bin/env python
"""Build kdlab's embedded sample data (``kdlab/data/sample/``) from the standard library's docstrings.

Why docstrings: they are real English text about real functions, they ship with every Python
interpreter (no download, no licence surprises: PSF License), and a function's one-line summary
paired with the rest of its docstring gives a natural query → document relevance signal.

Everything here is deterministic: the module list is pinned, docstrings are read with ``ast`` from the
modules' source files (nothing is imported, so the platform and installed packages do not leak in),
every collection is sorted, floats are rounded and JSON is written with fixed separators. Running the
script twice with the same Python version gives byte-identical output; ``tests/test_sample.py``
checks that.

Usage::

    python scripts/build_sample.py                 # writes kdlab/data/sample/
    python scripts/build_sample.py --out /tmp/s    # writes elsewhere (tests use this)
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import random
import re
import sys
import sysconfig
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "kdlab" / "data" / "sample"

# Pinned module lists; the split is by module so that val/test queries come from modules never seen
# in training (their documents are held out too: each split's candidates come from its own modules).
TRAIN_MODULES: tuple[str, ...] = (
    "_pyio", "argparse", "ast", "asyncio.base_events", "asyncio.events", "asyncio.locks",
    "asyncio.protocols", "asyncio.queues", "asyncio.streams", "asyncio.tasks", "asyncio.transports",
    "base64", "bdb", "bisect", "calendar", "cmd", "code", "collections", "concurrent.futures._base",
    "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "difflib", "dis",
    "doctest", "email._policybase", "email.header", "email.message", "email.parser", "email.policy",
    "email.utils", "enum", "fileinput", "ftplib", "functools", "getopt", "gettext", "graphlib",
    "gzip", "heapq", "hmac", "http.client", "http.cookiejar", "http.server", "imaplib",
    "importlib.abc", "importlib.metadata", "inspect", "ipaddress", "json", "linecache", "locale",
    "logging", "logging.handlers", "mailbox", "multiprocessing.pool", "numbers", "optparse", "os",
    "pdb", "pickle", "pkgutil", "platform", "plistlib", "poplib", "pprint", "pydoc", "queue",
    "random", "re", "reprlib", "sched", "selectors", "shlex", "site", "smtplib", "socket",
    "socketserver", "ssl", "string", "subprocess", "symtable", "sysconfig", "textwrap", "threading",
    "timeit", "tkinter", "tokenize", "trace", "traceback", "turtle", "typing", "unittest.case",
    "unittest.mock", "urllib.request", "uuid", "warnings", "weakref", "webbrowser",
    "wsgiref.handlers", "wsgiref.headers", "xml.dom.minidom", "xmlrpc.client",
)
VAL_MODULES: tuple[str, ...] = (
    "_pydecimal", "fractions", "statistics", "urllib.parse", "xml.etree.ElementTree",
    "xml.sax.handler", "xmlrpc.server",
)
TEST_MODULES: tuple[str, ...] = (
    "bz2", "codecs", "fnmatch", "glob", "lzma", "mimetypes", "netrc", "pathlib", "posixpath",
    "quopri", "secrets", "shutil", "tarfile", "tempfile", "tkinter.ttk", "zipfile", "zipimport",
    "zoneinfo._zoneinfo",
)
SPLIT_MODULES: dict[str, tuple[str, ...]] = {
    "train": TRAIN_MODULES, "val": VAL_MODULES, "test": TEST_MODULES,
}

N_RANKING_QUERIES = {"train": 320, "val": 100, "test": 100}
N_CLICKS = {"train": 1000, "val": 150}
N_SEQ2SEQ = {"train": 600, "val": 100, "test": 100}
N_CANDIDATES = 16
MAX_DOC_WORDS = 32          # document summary = first words of the docstring body
MAX_SOURCE_WORDS = 60       # seq2seq source length
MIN_BODY_WORDS = 8
MIN_QUERY_WORDS, MAX_QUERY_WORDS = 3, 30
BM25_K1, BM25_B = 0.9, 0.4  # Anserini's defaults
SEED = 20240501
VOCAB_SIZE = 4096
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<s>", "</s>")

# Words too common to count as "sharing a query word" in the label rule.
STOPWORDS = frozenset(
    "a an and are as at be by for from if in into is it its of on or that the this to with "
    "return returns true false none not self object given new value values".split()
)
_TOKEN_RE = re.compile(r"[a-z0-9]+")


@dataclass(frozen=True)
class DocRecord:
    """One documented function or method: its query (summary line) and its document (the rest)."""

    qualname: str     # "module.Class.method"
    module: str
    owner: str        # "module" or "module.Class": the label rule's "same class" unit
    query: str        # docstring summary line
    body: str         # docstring without the summary, whitespace collapsed


def tokenize(text: str) -> list[str]:
    """Lowercase alphanumeric tokens; splits qualified names on dots and underscores, so a title
    like ``json.dumps`` matches the query word ``dumps``."""
    return _TOKEN_RE.findall(text.lower())


def _words(text: str, limit: int) -> str:
    return " ".join(text.split()[:limit])


def _split_docstring(doc: str) -> tuple[str, str] | None:
    """Split a cleaned docstring into (summary line, body). The summary is the first paragraph
    (PEP 257; covers summaries wrapped onto two lines) or, for a one-paragraph docstring, its first
    sentence. Too short/long summaries and doctest-only bodies are rejected."""
    paragraphs = [p for p in re.split(r"\n\s*\n", doc.strip()) if p.strip()]
    if len(paragraphs) >= 2:
        summary = " ".join(paragraphs[0].split())
        body = " ".join(" ".join(paragraphs[1:]).split())
    else:  # one paragraph: its first sentence is the summary
        parts = re.split(r"(?<=[.!?])\s+(?=[A-Z])", " ".join(doc.split()), maxsplit=1)
        if len(parts) < 2:
            return None
        summary, body = parts
    if not (MIN_QUERY_WORDS <= len(summary.split()) <= MAX_QUERY_WORDS):
        return None
    if len(body.split()) < MIN_BODY_WORDS or ">>>" in summary:
        return None
    return summary, body


def module_source(module: str) -> Path:
    """The source file of a standard-library module, located under ``sysconfig``'s stdlib directory
    (not via import machinery: frozen modules such as ``os`` report no file there)."""
    base = Path(sysconfig.get_paths()["stdlib"]).joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    raise RuntimeError(f"module {module!r} has no Python source under {base.parent}")


def read_module(module: str) -> list[DocRecord]:
    """Documented top-level functions and methods of a module, read from its source with ``ast``."""
    tree = ast.parse(module_source(module).read_text(encoding="utf-8"))
    records: list[DocRecord] = []

    def visit_function(node: ast.AST, owner: str) -> None:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return
        if node.name.startswith("_"):
            return
        doc = ast.get_docstring(node, clean=True)
        if not doc:
            return
        parts = _split_docstring(doc)
        if parts is None:
            return
        records.append(DocRecord(f"{owner}.{node.name}", module, owner, parts[0], parts[1]))

    for node in tree.body:
        visit_function(node, module)
        if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            for child in node.body:
                visit_function(child, f"{module}.{node.name}")
    return records


def collect(modules: Iterable[str]) -> list[DocRecord]:
    """Records of several modules, deduplicated: one record per qualified name, and queries whose
    summary text is shared by another function are dropped (their relevance would be ambiguous)."""
    seen: dict[str, DocRecord] = {}
    for module in sorted(modules):
        for rec in read_module(module):
            seen.setdefault(rec.qualname, rec)
    records = sorted(seen.values(), key=lambda r: r.qualname)
    counts = Counter(r.query.lower() for r in records)
    return [r for r in records if counts[r.query.lower()] == 1]


class BM25:
    """Okapi BM25 over a fixed list of documents (the lexical pre-ranker that picks candidates)."""

    def __init__(self, docs: Sequence[list[str]], k1: float = BM25_K1, b: float = BM25_B) -> None:
        self.k1, self.b = k1, b
        self.tfs = [Counter(d) for d in docs]
        self.lengths = [len(d) for d in docs]
        self.avgdl = sum(self.lengths) / max(1, len(docs))
        df: Counter[str] = Counter()
        for tf in self.tfs:
            df.update(tf.keys())
        n = len(docs)
        self.idf = {t: math.log(1.0 + (n - c + 0.5) / (c + 0.5)) for t, c in df.items()}
        self.postings: dict[str, list[int]] = {}
        for i, tf in enumerate(self.tfs):
            for t in tf:
                self.postings.setdefault(t, []).append(i)

    def score(self, query: list[str], index: int) -> float:
        tf, dl = self.tfs[index], self.lengths[index]
        norm = self.k1 * (1.0 - self.b + self.b * dl / self.avgdl)
        total = 0.0
        for t in query:
            f = tf.get(t, 0)
            if f:
                total += self.idf[t] * f * (self.k1 + 1.0) / (f + norm)
        return total

    def top_k(self, query: list[str], k: int) -> list[tuple[int, float]]:
        """The k best documents as (index, score), score descending then index ascending."""
        candidates = sorted({i for t in set(query) for i in self.postings.get(t, ())})
        scored = [(i, self.score(query, i)) for i in candidates]
        scored.sort(key=lambda x: (-x[1], x[0]))
        return scored[:k]


def label_for(source: DocRecord, doc: DocRecord, query_words: set[str]) -> int:
    """Graded relevance rule (also stated in SOURCE.md):
    3 = the function the query was written for; 2 = another method of the same class sharing a
    query content word; 1 = another function of the same module sharing a query content word;
    0 = otherwise."""
    if doc.qualname == source.qualname:
        return 3
    shares = bool(query_words & set(tokenize(doc.qualname + " " + doc.body)))
    if not shares:
        return 0
    if doc.owner == source.owner and doc.owner != doc.module:
        return 2
    if doc.module == source.module:
        return 1
    return 0


def doc_text(rec: DocRecord) -> tuple[str, str]:
    """(title, summary) shown for a document."""
    return rec.qualname, _words(rec.body, MAX_DOC_WORDS)


def build_ranking(records: list[DocRecord], n_queries: int, rng: random.Random, split: str) -> list[dict]:
    """Ranking groups of one split: each query's top BM25 candidates from the split's documents,
    with the source document forced in (replacing the last candidate) when BM25 missed it."""
    titles_summaries = [doc_text(r) for r in records]
    index = BM25([tokenize(t + " " + s) for t, s in titles_summaries])
    order = list(range(len(records)))
    rng.shuffle(order)
    groups = []
    for qi in sorted(order[:n_queries]):
        source = records[qi]
        q_tokens = tokenize(source.query)
        hits = index.top_k(q_tokens, N_CANDIDATES)
        if qi not in {i for i, _ in hits}:
            hits = hits[: N_CANDIDATES - 1] + [(qi, index.score(q_tokens, qi))]
        q_words = set(q_tokens) - STOPWORDS
        docs = []
        for i, score in hits:
            title, summary = titles_summaries[i]
            docs.append({
                "id": records[i].qualname, "title": title, "summary": summary,
                "label": label_for(source, records[i], q_words), "first_stage_score": round(score, 4),
            })
        groups.append({"query_id": f"{split}:{source.qualname}", "query": source.query, "docs": docs})
    return groups


def ndcg_at_k(labels_in_rank_order: Sequence[float], k: int = 10) -> float:
    """NDCG@k with exponential gain 2^rel − 1 and log2 discount; 0 for a query without relevant docs."""
    def dcg(labels: Sequence[float]) -> float:
        return sum((2.0 ** rel - 1.0) / math.log2(i + 2) for i, rel in enumerate(labels[:k]))
    ideal = dcg(sorted(labels_in_rank_order, reverse=True))
    return dcg(labels_in_rank_order) / ideal if ideal > 0 else 0.0


def bm25_ndcg(groups: list[dict], k: int = 10) -> float:
    """Mean NDCG@k of the stored BM25 order (ties broken by file order)."""
    values = []
    for g in groups:
        ranked = sorted(range(len(g["docs"])), key=lambda i: (-g["docs"][i]["first_stage_score"], i))
        values.append(ndcg_at_k([g["docs"][i]["label"] for i in ranked], k))
    return sum(values) / len(values)


def random_ndcg(groups: list[dict], k: int = 10, trials: int = 20, seed: int = 0) -> float:
    """Mean NDCG@k of random orderings (the no-signal reference)."""
    rng = random.Random(seed)
    values = []
    for g in groups:
        labels = [d["label"] for d in g["docs"]]
        for _ in range(trials):
            shuffled = labels[:]
            rng.shuffle(shuffled)
            values.append(ndcg_at_k(shuffled, k))
    return sum(values) / len(values)


def _dump_jsonl(path: Path, rows: Iterable[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n")


def build_tokenizer(texts: list[str], out_dir: Path) -> None:
    """Train a byte-level BPE tokenizer on the sample text and save it in the layout
    ``transformers.AutoTokenizer.from_pretrained`` reads.

    Pair encoding yields ``[CLS] q [SEP] d [SEP]`` with token_type_ids (BERT cross-encoder);
    causal-LM callers use ``add_special_tokens=False`` and append ``</s>`` themselves."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 512,
        "padding_side": "right",
        "pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
        "mask_token": "[MASK]", "bos_token": "<s>", "eos_token": "</s>",
        "model_input_names": ["input_ids", "token_type_ids", "attention_mask"],
        "clean_up_tokenization_spaces": False,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    special = {k: config[k] for k in ("pad_token", "unk_token", "cls_token", "sep_token",
                                       "mask_token", "bos_token", "eos_token")}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2, sort_keys=True) + "\n")


SOURCE_TEMPLATE = """# kdlab embedded sample — provenance

Built by `scripts/build_sample.py` from the docstrings of the Python {version} standard library
(read with `ast` from the modules' source files; nothing imported). Rebuilding with the same Python
minor version gives byte-identical files (`tests/test_sample.py` checks this).

**License**: the docstrings are part of Python and are distributed under the
Python Software Foundation License (PSF License Agreement, https://docs.python.org/3/license.html).

## Modules (split by module; val/test modules are held out from training)
- train: {train}
- val: {val}
- test: {test}

## Files
| file | rows |
|---|---|
{table}

## Ranking groups (`ranking_*.jsonl`)
Query = a public function's/method's docstring summary line (first paragraph, {qmin}-{qmax} words);
documents = functions of the same split: title = qualified name (`module.Class.method`), summary =
the first {doc_words} words of the docstring after the summary. Candidates = the top {k} by BM25
(k1={k1}, b={b}, over title + summary, lowercase alphanumeric tokens) among the split's documents;
when BM25 misses the source function it replaces the last candidate. `first_stage_score` = that score.
Queries whose summary text is shared by two functions are dropped.

Graded labels (`label`):
- 3 = the function the query was written for;
- 2 = another method of the same class that shares a query content word (stopwords excluded);
- 1 = another function of the same module that shares a query content word;
- 0 = otherwise.

BM25 pre-ranker NDCG@10 (gain 2^rel − 1, log2 discount) on test: {bm25_ndcg:.4f}; random
ordering of the same candidates: {random_ndcg:.4f}.

## Click logs (`clicks_*.jsonl`)
`{{"query", "title", "summary"}}`: a query (summary line) and the document it was written for,
standing in for a clicked result. Train/val from the train/val modules.

## Seq2seq (`seq2seq_*.jsonl`)
`{{"source", "target"}}`: source = docstring body (first {src_words} words), target = summary line.

## Tokenizer (`tokenizer/`)
Byte-level BPE (HuggingFace `tokenizers`), vocabulary {vocab}, trained on all sample text;
special tokens {special}. Pair encoding gives `[CLS] q [SEP] d [SEP]` with token_type_ids;
causal-LM use passes `add_special_tokens=False` and appends `</s>`.
"""


def build(out_dir: Path) -> dict[str, float]:
    """Write the whole sample into ``out_dir`` and return summary statistics."""
    out_dir.mkdir(parents=True, exist_ok=True)
    split_records = {split: collect(mods) for split, mods in SPLIT_MODULES.items()}
    counts: dict[str, int] = {}
    texts: list[str] = []
    ranking: dict[str, list[dict]] = {}
    for split, records in split_records.items():
        groups = build_ranking(records, N_RANKING_QUERIES[split], random.Random(f"{SEED}:{split}:rank"), split)
        ranking[split] = groups
        _dump_jsonl(out_dir / f"ranking_{split}.jsonl", groups)
        counts[f"ranking_{split}.jsonl"] = len(groups)

        pool = list(records)
        random.Random(f"{SEED}:{split}:seq").shuffle(pool)
        if split in N_CLICKS:
            clicks = sorted(pool[: N_CLICKS[split]], key=lambda r: r.qualname)
            rows = [{"query": r.query, "title": doc_text(r)[0], "summary": doc_text(r)[1]} for r in clicks]
            _dump_jsonl(out_dir / f"clicks_{split}.jsonl", rows)
            counts[f"clicks_{split}.jsonl"] = len(rows)
        pairs = sorted(pool[: N_SEQ2SEQ[split]], key=lambda r: r.qualname)
        rows = [{"source": _words(r.body, MAX_SOURCE_WORDS), "target": r.query} for r in pairs]
        _dump_jsonl(out_dir / f"seq2seq_{split}.jsonl", rows)
        counts[f"seq2seq_{split}.jsonl"] = len(rows)
        for r in records:
            texts.append(f"{r.qualname} {r.query} {_words(r.body, MAX_SOURCE_WORDS)}")

    texts.extend(["query:", "document:", "summarize:", "summary:"])
    build_tokenizer(texts, out_dir / "tokenizer")

    stats = {"bm25_ndcg10_test": bm25_ndcg(ranking["test"]), "random_ndcg10_test": random_ndcg(ranking["test"])}
    table = "\n".join(f"| `{name}` | {n} |" for name, n in sorted(counts.items()))
    (out_dir / "SOURCE.md").write_text(SOURCE_TEMPLATE.format(
        version=f"{sys.version_info.major}.{sys.version_info.minor}",
        train=", ".join(TRAIN_MODULES), val=", ".join(VAL_MODULES), test=", ".join(TEST_MODULES),
        table=table, qmin=MIN_QUERY_WORDS, qmax=MAX_QUERY_WORDS, doc_words=MAX_DOC_WORDS,
        k=N_CANDIDATES, k1=BM25_K1, b=BM25_B, bm25_ndcg=stats["bm25_ndcg10_test"],
        random_ndcg=stats["random_ndcg10_test"], src_words=MAX_SOURCE_WORDS, vocab=VOCAB_SIZE,
        special=", ".join(f"`{t}`" for t in SPECIAL_TOKENS),
    ), encoding="utf-8")
    stats.update({k: float(v) for k, v in counts.items()})
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    stats = build(args.out)
    for key, value in sorted(stats.items()):
        print(f"{key}: {value:.4f}" if isinstance(value, float) and not value.is_integer() else f"{key}: {int(value)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

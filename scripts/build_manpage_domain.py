#!/usr/bin/env python
"""A second ranking domain, built offline from this machine's manual pages: for checking, never tuning.

Why manual pages: real English reference text about real programs, on every Debian-family machine
(``/usr/share/man``, sections 1 and 8), under the free licences of the Debian main packages that
install them — and nothing like the Python docstrings the embedded sample is built from. The files
are written locally (``runs/domains/manpages/`` by default) and never committed or redistributed.

The same shape as the embedded sample (``scripts/build_sample.py``, whose BM25, tokenizer and NDCG
this script reuses), so the main job runs on it with only the data changed:

* query = a page's NAME line after the dash (``ls - list directory contents`` → ``list directory
  contents``), 3–14 words; document = title (the page's name) + the first 32 words of its
  DESCRIPTION section after its first sentence (which mostly restates the NAME line: keeping it
  would make the domain a word-matching exercise), roff markup removed; pages without either,
  ``.so`` redirects, names with spaces (the ~15 k Google Cloud SDK subcommand pages, one family)
  and duplicate queries are skipped;
* splits by program family (the name up to its first ``-``/``_``/``.``, so ``git-commit`` and
  ``git-log`` stay together), hashed: train / val / test families never overlap, and each split's
  candidates come from its own documents;
* ``ranking_{train,val,test}.jsonl``: 320 / 100 / 100 queries, each with the top 16 BM25 candidates
  (k1 0.9, b 0.4, the sample's) of its split, the source page forced in, and pages drawn at random
  from the split (BM25 score 0) where fewer than 16 share a query word; graded labels: 3 = the page
  the query was written for, 1 = another page of the same family sharing a query content word,
  0 = otherwise;
* ``clicks_{train,val}.jsonl``: 1000 / 150 (query, title, summary) of the train / val pages, for CPT.

Deterministic for a given set of installed pages (sorted, seeded). Prints the sizes and the BM25 and
random NDCG@10 of the test split.

    python scripts/build_manpage_domain.py                      # → runs/domains/manpages/
    python -m kdlab pipeline --config experiments/domains/manpages.yaml   # the main job, data changed
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import random
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_sample import (  # noqa: E402
    BM25,
    N_CANDIDATES,
    STOPWORDS,
    _dump_jsonl,
    bm25_ndcg,
    random_ndcg,
    tokenize,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "runs" / "domains" / "manpages"
SECTIONS = ("/usr/share/man/man1", "/usr/share/man/man8")
N_RANKING = {"train": 320, "val": 100, "test": 100}
N_CLICKS = {"train": 1000, "val": 150}
SPLIT_SHARES = (("train", 0.7), ("val", 0.15), ("test", 0.15))
QUERY_WORDS = (3, 14)
DOC_WORDS, MIN_DOC_WORDS = 32, 15
SEED = "manpages-20261207"

_FONT = re.compile(r"\\f(\[[^\]]*\]|\(..|.)")
_SPECIAL = {"\\(em": "—", "\\(en": "–", "\\(aq": "'", "\\(dq": '"', "\\(lq": '"', "\\(rq": '"', "\\(oq": "'",
            "\\(cq": "'", "\\(bu": "•", "\\(co": "©", "\\(mu": "×", "\\(ga": "`", "\\(ti": "~", "\\(ha": "^"}
_DROP = re.compile(r"\\(\*\[[^\]]*\]|\*\(..|\*.|s[+-]?\d+|s\[[^\]]*\]|[&|^%c:]|n\[[^\]]*\]|n\(..|n.|\(..|\[[^\]]*\]|\".*$)")
_TEXT_MACROS = {".B", ".I", ".BR", ".RB", ".IR", ".RI", ".BI", ".IB", ".SM", ".SB"}


def clean_roff(line: str) -> str:
    """One line of roff as plain text: fonts, escapes and comments removed."""
    for key, value in _SPECIAL.items():
        line = line.replace(key, value)
    line = _FONT.sub("", line).replace("\\-", "-").replace("\\e", "\\").replace("\\ ", " ").replace("\\~", " ")
    return _DROP.sub("", line).replace("\\", "")


def sections(text: str) -> dict[str, list[str]]:
    """A page's sections (``.SH`` headings, upper-cased) → their text lines, markup removed."""
    out: dict[str, list[str]] = {}
    current: list[str] | None = None
    for raw in text.splitlines():
        if raw.startswith((".SH", ".Sh")):
            name = clean_roff(raw[3:]).strip().strip('"').upper()
            current = out.setdefault(name, [])
            continue
        if current is None or raw.startswith(("'", ".\\\"", '.\\"')):
            continue
        if raw.startswith("."):
            macro, _, rest = raw.partition(" ")
            if macro not in _TEXT_MACROS:
                continue
            raw = " ".join(part.strip('"') for part in re.findall(r'"[^"]*"|\S+', rest))
        text_line = clean_roff(raw).strip()
        if text_line:
            current.append(text_line)
    return out


def read_page(path: Path) -> tuple[str, str, str] | None:
    """(name, query, description words) of one page, or None when it has no usable NAME/DESCRIPTION."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except OSError:
        return None
    text = raw.decode("utf-8", errors="replace")
    if text.lstrip().startswith(".so "):
        return None
    parts = sections(text)
    name_lines = " ".join(parts.get("NAME", []))
    match = re.match(r"\s*(.+?)\s+[-—–]+\s+(.+)$", name_lines)
    description = " ".join(" ".join(parts.get("DESCRIPTION", [])).split())
    if not match or not description:
        return None
    first_sentence = re.match(r".+?[.!?](?=\s+[A-Z(])\s+", description)
    if first_sentence and len(description[first_sentence.end():].split()) >= MIN_DOC_WORDS:
        description = description[first_sentence.end():]
    name = match.group(1).split(",")[0].strip()
    query = " ".join(match.group(2).split()).rstrip(".")
    if not (QUERY_WORDS[0] <= len(query.split()) <= QUERY_WORDS[1]) or len(description.split()) < MIN_DOC_WORDS:
        return None
    if not re.fullmatch(r"[\w.+\[-]+", name):
        return None
    return name, query, " ".join(description.split()[:DOC_WORDS])


def family(name: str) -> str:
    return re.split(r"[-_.]", name, maxsplit=1)[0].lower()


def split_of(name: str) -> str:
    """The split of a program family: a hash of the family, so the split never depends on the order."""
    u = int(hashlib.sha256(f"{SEED}:{family(name)}".encode()).hexdigest()[:8], 16) / 2**32
    total = 0.0
    for split, share in SPLIT_SHARES:
        total += share
        if u < total:
            return split
    return SPLIT_SHARES[-1][0]


def collect(section_dirs: tuple[str, ...] = SECTIONS) -> list[tuple[str, str, str]]:
    pages: dict[str, tuple[str, str, str]] = {}
    seen_queries: set[str] = set()
    files = sorted(p for d in section_dirs if Path(d).is_dir() for p in Path(d).iterdir() if p.is_file())
    for path in files:
        page = read_page(path)
        if page is None or page[0] in pages or page[1].lower() in seen_queries:
            continue
        pages[page[0]] = page
        seen_queries.add(page[1].lower())
    return [pages[name] for name in sorted(pages)]


def label(source: tuple[str, str, str], doc: tuple[str, str, str], query_words: set[str]) -> int:
    if doc[0] == source[0]:
        return 3
    if family(doc[0]) == family(source[0]) and query_words & set(tokenize(doc[0] + " " + doc[2])):
        return 1
    return 0


def build_ranking(pages: list[tuple[str, str, str]], n: int, split: str) -> list[dict]:
    index = BM25([tokenize(name + " " + body) for name, _, body in pages])
    order = list(range(len(pages)))
    random.Random(f"{SEED}:{split}:rank").shuffle(order)
    groups = []
    for qi in sorted(order[:n]):
        source = pages[qi]
        q_tokens = tokenize(source[1])
        hits = index.top_k(q_tokens, N_CANDIDATES)
        if qi not in {i for i, _ in hits}:
            hits = hits[:N_CANDIDATES - 1] + [(qi, index.score(q_tokens, qi))]
        if len(hits) < N_CANDIDATES:  # too few pages share a query word: fill with random pages of the split
            taken = {i for i, _ in hits}
            rest = [i for i in range(len(pages)) if i not in taken]
            fill = random.Random(f"{SEED}:{split}:fill:{qi}").sample(rest, N_CANDIDATES - len(hits))
            hits = hits + [(i, 0.0) for i in sorted(fill)]
        words = set(q_tokens) - STOPWORDS
        docs = [{"id": pages[i][0], "title": pages[i][0], "summary": pages[i][2],
                 "label": label(source, pages[i], words), "first_stage_score": round(score, 4)} for i, score in hits]
        groups.append({"query_id": f"{split}:{source[0]}", "query": source[1], "docs": docs})
    return groups


def build(out: Path) -> dict[str, float]:
    pages = collect()
    by_split: dict[str, list[tuple[str, str, str]]] = {s: [] for s, _ in SPLIT_SHARES}
    for page in pages:
        by_split[split_of(page[0])].append(page)
    out.mkdir(parents=True, exist_ok=True)
    stats: dict[str, float] = {"pages": len(pages), **{f"pages_{s}": len(p) for s, p in by_split.items()}}
    for split, split_pages in by_split.items():
        groups = build_ranking(split_pages, N_RANKING[split], split)
        _dump_jsonl(out / f"ranking_{split}.jsonl", groups)
        stats[f"ranking_{split}"] = len(groups)
        if split == "test":
            stats["bm25_ndcg10_test"] = bm25_ndcg(groups)
            stats["random_ndcg10_test"] = random_ndcg(groups)
        if split in N_CLICKS:
            pool = list(split_pages)
            random.Random(f"{SEED}:{split}:clicks").shuffle(pool)
            rows = [{"query": q, "title": name, "summary": body} for name, q, body in sorted(pool[:N_CLICKS[split]])]
            _dump_jsonl(out / f"clicks_{split}.jsonl", rows)
            stats[f"clicks_{split}"] = len(rows)
    (out / "SOURCE.md").write_text(
        "# Manual-page ranking domain (built locally, not redistributed)\n\n"
        f"Built by `python scripts/build_manpage_domain.py` from {len(pages)} pages of {', '.join(SECTIONS)} "
        "(free licences of the Debian main packages that installed them). Rules: the script's docstring.\n\n"
        + "".join(f"- {k}: {v if isinstance(v, int) else round(v, 4)}\n" for k, v in stats.items()), encoding="utf-8")
    return stats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    stats = build(args.out)
    for key, value in stats.items():
        print(f"{key:20s} {value if isinstance(value, int) else round(value, 4)}")
    if stats["ranking_train"] < N_RANKING["train"] or stats["ranking_test"] < N_RANKING["test"]:
        print("too few pages on this machine for the sample's sizes", file=sys.stderr)
        return 1
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The embedded sample: reproducible from the generator, well-formed, and carrying a learning signal."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

from kdlab.data import SAMPLE_DIR, sample_path

REPO = Path(__file__).resolve().parent.parent


def _load_builder():
    spec = importlib.util.spec_from_file_location("build_sample", REPO / "scripts" / "build_sample.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules["build_sample"] = module
    spec.loader.exec_module(module)
    return module


def _recorded_python() -> str:
    text = (SAMPLE_DIR / "SOURCE.md").read_text(encoding="utf-8")
    match = re.search(r"Python (\d+\.\d+) standard library", text)
    assert match, "SOURCE.md must record the Python version"
    return match.group(1)


def _read(name: str) -> list[dict]:
    with open(sample_path(name), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_rebuild_is_byte_identical(tmp_path: Path) -> None:
    if _recorded_python() != f"{sys.version_info.major}.{sys.version_info.minor}":
        pytest.skip(f"sample built with Python {_recorded_python()}; docstrings differ across versions")
    builder = _load_builder()
    builder.build(tmp_path)
    committed = sorted(p.relative_to(SAMPLE_DIR) for p in SAMPLE_DIR.rglob("*") if p.is_file())
    rebuilt = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert committed == rebuilt
    for rel in committed:
        assert (SAMPLE_DIR / rel).read_bytes() == (tmp_path / rel).read_bytes(), f"{rel} differs"


def test_ranking_files_shape_and_size() -> None:
    for split in ("train", "val", "test"):
        path = Path(sample_path(f"ranking_{split}.jsonl"))
        assert path.stat().st_size < 1.5 * 1024 * 1024
        groups = _read(f"ranking_{split}.jsonl")
        assert len(groups) >= 100
        for g in groups:
            assert isinstance(g["query_id"], str) and g["query"]
            labels = [d["label"] for d in g["docs"]]
            assert labels.count(3) == 1, "the source document must be among the candidates exactly once"
            ids = [d["id"] for d in g["docs"]]
            assert len(set(ids)) == len(ids)
            for d in g["docs"]:
                assert set(d) == {"id", "title", "summary", "label", "first_stage_score"}


def test_splits_are_held_out_by_module() -> None:
    def modules(split: str) -> set[str]:
        return {g["query_id"].split(":", 1)[1].rsplit(".", 1)[0].split(".")[0] for g in _read(f"ranking_{split}.jsonl")}

    train_docs = {d["id"] for g in _read("ranking_train.jsonl") for d in g["docs"]}
    test_docs = {d["id"] for g in _read("ranking_test.jsonl") for d in g["docs"]}
    assert not train_docs & test_docs
    assert "tarfile" in modules("test") and "tarfile" not in modules("train")


def test_bm25_pre_ranker_beats_random_on_test() -> None:
    builder = _load_builder()
    groups = _read("ranking_test.jsonl")
    bm25 = builder.bm25_ndcg(groups, 10)
    rand = builder.random_ndcg(groups, 10)
    assert bm25 > rand + 0.15, (bm25, rand)


def test_ndcg_helper_hand_computed() -> None:
    builder = _load_builder()
    assert builder.ndcg_at_k([3, 0, 0], 10) == pytest.approx(1.0)
    # gains 2^1-1=1 at rank 2 only; ideal puts it at rank 1: (1/log2(3)) / 1
    assert builder.ndcg_at_k([0, 1], 10) == pytest.approx(1 / 1.584962500721156)
    assert builder.ndcg_at_k([0, 0], 10) == 0.0


def test_causal_and_seq2seq_files() -> None:
    clicks = _read("clicks_train.jsonl")
    assert len(clicks) >= 500 and all(set(r) == {"query", "title", "summary"} for r in clicks)
    for split in ("train", "val", "test"):
        rows = _read(f"seq2seq_{split}.jsonl")
        assert len(rows) >= 100 and all(r["source"] and r["target"] for r in rows)


def test_tokenizer_loads_and_encodes_pairs() -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(sample_path("tokenizer"))
    assert len(tok) == 4096
    for attr, text in [("pad_token", "[PAD]"), ("unk_token", "[UNK]"), ("cls_token", "[CLS]"),
                       ("sep_token", "[SEP]"), ("mask_token", "[MASK]"), ("bos_token", "<s>"),
                       ("eos_token", "</s>")]:
        assert getattr(tok, attr) == text
    enc = tok("read a file", "tarfile.open opens a file")
    ids, types = enc["input_ids"], enc["token_type_ids"]
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    first_sep = ids.index(tok.sep_token_id)
    assert set(types[: first_sep + 1]) == {0} and set(types[first_sep + 1 :]) == {1}
    plain = tok("read a file", add_special_tokens=False)["input_ids"]
    assert tok.cls_token_id not in plain and tok.sep_token_id not in plain
    assert tok.decode(plain).strip() == "read a file"


def test_sample_path_unknown_lists_names() -> None:
    with pytest.raises(FileNotFoundError, match="ranking_train.jsonl"):
        sample_path("no_such_file")

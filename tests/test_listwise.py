"""RRADistill listwise labels (kdlab.listwise): strict permutation parsing, top-k/bottom-k by the
first stage's score, hand-checked labels and hard negatives, batching and resuming give the same
file, left-padded batched generation, and a tiny real causal LM end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from kdlab.data import sample_path
from kdlab.data.readers import RankingDoc, RankingGroup, read_ranking_jsonl, write_ranking_jsonl
from kdlab.errors import ConfigError
from kdlab.listwise import (
    build_listwise_prompt,
    candidate_indices,
    hf_generate_fn,
    listwise_label_file,
    parse_permutation,
    rradistill_labels,
    select_candidates,
)
from kdlab.models.backbones import load_generation_model, load_tokenizer


class Interrupted(RuntimeError):
    pass


# ------------------------------------------------------------------------------------------ parsing
@pytest.mark.parametrize("answer,n,expected", [
    ("[2] > [1] > [3]", 3, [2, 1, 3]),
    ("[2]>[1]", 3, [2, 1]),
    ("[ 3 ] > [1]", 3, [3, 1]),
    ("[2] > [2] > [1] > [2]", 3, [2, 1]),  # duplicates: the first occurrence wins
    ("[4] > [9] > [0] > [1]", 4, [4, 1]),  # out of range ignored
    ("Sure! The ranking is: [3] > [1]. Passage [5] is irrelevant.", 4, [3, 1]),  # text around brackets
    ("Passage 2 is best: [2] > [1], then 3 and top 10", 3, [2, 1]),  # bare numbers ignored beside brackets
    ("2 > 1 > 3", 3, [2, 1, 3]),
    ("  2>1 >  3\n", 3, [2, 1, 3]),
    ("3 > 3 > 7 > 1", 3, [3, 1]),
    ("2", 3, [2]),
    ("top 10", 20, []),
    ("The top 10 passages are all relevant.", 20, []),
    ("passage 3 is best", 5, []),
    ("2 > 1 > 3 because passage 2 mentions it", 3, []),  # not exactly a list: nothing
    ("2, 1, 3", 3, []),
    ("1.5 > 2", 3, []),
    ("I cannot rank these passages.", 5, []),
    ("", 5, []),
    ("[1] > [2]", 0, []),
    (None, 3, []),
])
def test_parse_permutation(answer: Any, n: int, expected: list[int]) -> None:
    assert parse_permutation(answer, n) == expected


def test_prompt_numbers_documents() -> None:
    prompt = build_listwise_prompt("q?", ["alpha  doc", "beta " * 100], max_doc_chars=20)
    assert "[1] alpha doc\n" in prompt and f"[2] {('beta ' * 5)[:20]}\n" in prompt
    assert "[3]" not in prompt.split("Search query")[0]


# ------------------------------------------------------------------------------------------ candidates
def test_select_candidates_top_bottom_ties() -> None:
    scores = [0.5, 0.9, 0.5, 0.1, 0.9, 0.3, 0.5]  # descending, ties in index order: 1 4 0 2 6 5 3
    assert select_candidates(scores, 2, 2) == [1, 4, 5, 3]
    assert select_candidates(scores, 3, 0) == [1, 4, 0]  # the tie at the cut keeps the group's order
    assert select_candidates(scores, 1, 3) == [1, 6, 5, 3]
    assert select_candidates(scores, 4, 3) == [1, 4, 0, 2, 6, 5, 3]  # all when they fit
    assert select_candidates(scores, 10, 10) == [1, 4, 0, 2, 6, 5, 3]


def _doc(i: int, score: float | None, label: float | None = 0.0) -> RankingDoc:
    return RankingDoc(id=f"d{i}", title=f"title {i}", body=f"body {i}", label=label, first_stage_score=score)


def test_candidate_indices_by_first_stage_score() -> None:
    group = RankingGroup("q", "query", tuple(_doc(i, s) for i, s in enumerate([0.5, 0.9, 0.5, 0.1])))
    assert candidate_indices(group, 1, 1) == [1, 3]
    assert candidate_indices(group, 1, 1, prescores=[3.0, 2.0, 1.0, 0.0]) == [0, 3]
    unscored = RankingGroup("q", "query", tuple(_doc(i, None) for i in range(5)))
    assert candidate_indices(unscored, 2, 1) == [0, 1, 4]  # no scores at all: the group's order
    mixed = RankingGroup("q7", "query", (_doc(0, 1.0), _doc(1, None)))
    with pytest.raises(ValueError, match="'q7'.*'d1' has no first_stage_score"):
        candidate_indices(mixed, 1, 1)


# ------------------------------------------------------------------------------------------ labels
def test_scripted_answer_labels_and_hard_negatives(tmp_path: Path) -> None:
    scores = [0.2, 0.8, 0.5, 0.5, 0.1, 0.9, 0.3, 0.7]
    group = RankingGroup("q1", "what is it", tuple(_doc(i, s, label=1.0 if i == 2 else 0.0)
                                                    for i, s in enumerate(scores)))
    src = tmp_path / "in.jsonl"
    write_ranking_jsonl(src, [group])
    prompts: list[list[str]] = []

    def llm(batch: list[str]) -> list[str]:
        prompts.append(batch)
        return ["Ranking: [4] > [1] > [4] > [9] > [2]. Passage 3 is off topic."]

    out = tmp_path / "out.jsonl"
    assert listwise_label_file("unused", str(src), str(out), top_k=3, bottom_k=2, progress=False, generate_fn=llm) == 1
    # pre-ranker order d5 d1 d7 (d2 d3 d6 dropped) d0 d4 → prompt [1]=d5 [2]=d1 [3]=d7 [4]=d0 [5]=d4
    assert len(prompts) == 1 and len(prompts[0]) == 1
    assert all(f"[{k}] title {i} body {i}\n" in prompts[0][0] for k, i in enumerate([5, 1, 7, 0, 4], start=1))
    assert "[6]" not in prompts[0][0]

    def doc(i: int, label: float, rank: int | None) -> dict[str, Any]:
        return {"id": f"d{i}", "title": f"title {i}", "summary": f"body {i}", "label": label,
                "first_stage_score": scores[i], "llm_rank": rank, "hard_negative": rank is None}

    expected = {"query_id": "q1", "query": "what is it", "docs": [
        doc(0, 3.0, 1), doc(5, 2.0, 2), doc(1, 1.0, 3),  # [4] > [1] > [2]: labels 3, 2, 1
        doc(7, 0.0, None), doc(4, 0.0, None),  # left out: hard negatives, in prompt order
    ]}
    text = out.read_text()
    assert text.endswith("\n") and text.count("\n") == 1
    assert json.loads(text) == expected
    back = read_ranking_jsonl(out)[0]
    assert [(d.id, d.label) for d in back.docs] == [("d0", 3.0), ("d5", 2.0), ("d1", 1.0), ("d7", 0.0), ("d4", 0.0)]
    assert not (tmp_path / "out.jsonl.partial").exists()


def test_rradistill_labels_superset_of_labeling() -> None:
    group = RankingGroup("q1", "what is it", tuple(_doc(i, None) for i in range(8)))
    rows = rradistill_labels([group], {"q1": [float(i) for i in range(8)]},
                             lambda p: "[3] > [1] > [3] > [9] garbage", top_k=2, bottom_k=2)
    docs = rows[0]["docs"]  # shown: d7, d6, d1, d0
    assert [d["id"] for d in docs] == ["d1", "d7", "d6", "d0"]
    assert [d["label"] for d in docs] == [2.0, 1.0, 0.0, 0.0]
    assert [d["hard_negative"] for d in docs] == [False, False, True, True]
    assert [d["llm_rank"] for d in docs] == [1, 2, None, None]
    with pytest.raises(ValueError, match="pre-ranker scores"):
        rradistill_labels([group], [[0.1]], lambda p: "")


# ------------------------------------------------------------------------------------------ batching, resuming
def _groups(n: int = 7) -> list[RankingGroup]:
    groups = []
    for q in range(n):
        k = 3 + (q * 5) % 9  # 3 .. 11 documents
        docs = tuple(RankingDoc(id=f"q{q}d{i}", title=f"t{q}.{i}", body=f"body of {q} {i}",
                                first_stage_score=float((i * 7 + q) % 5)) for i in range(k))
        groups.append(RankingGroup(f"q{q}", f"query {q}", docs))
    return groups


def _scripted(prompt: str) -> str:
    """A deterministic answer per prompt: some ids in some order, a duplicate, an out-of-range id."""
    n = int(prompt.split("I will give you ", 1)[1].split(" ", 1)[0])
    q = int(prompt.split("search query: query ", 1)[1].split("\n", 1)[0])
    ids = [(q + 2 * j) % n + 1 for j in range(q % 4 + 1)]
    return " > ".join(f"[{i}]" for i in ids + [ids[0], n + 3])


@pytest.fixture
def groups_file(tmp_path: Path) -> Path:
    path = tmp_path / "groups.jsonl"
    write_ranking_jsonl(path, _groups())
    return path


def _run(src: Path, out: Path, batch_size: int, calls: list[list[str]] | None = None, fail_on: int | None = None,
         **kwargs: Any) -> int:
    def llm(prompts: list[str]) -> list[str]:
        if calls is not None:
            calls.append(prompts)
        if fail_on is not None and calls is not None and len(calls) == fail_on:
            raise Interrupted("simulated kill")
        return [_scripted(p) for p in prompts]

    return listwise_label_file("unused", str(src), str(out), top_k=3, bottom_k=2, batch_size=batch_size,
                               progress=False, generate_fn=llm, **kwargs)


def test_batching_gives_the_same_file(tmp_path: Path, groups_file: Path) -> None:
    _run(groups_file, tmp_path / "b1.jsonl", 1)
    reference = (tmp_path / "b1.jsonl").read_bytes()
    for bs in (2, 3, 8):
        calls: list[list[str]] = []
        assert _run(groups_file, tmp_path / f"b{bs}.jsonl", bs, calls) == 7
        assert [len(c) for c in calls] == [min(bs, 7 - i) for i in range(0, 7, bs)]
        assert (tmp_path / f"b{bs}.jsonl").read_bytes() == reference
    rows = [json.loads(line) for line in reference.decode().splitlines()]
    assert [r["query_id"] for r in rows] == [f"q{q}" for q in range(7)]
    assert any(d["hard_negative"] for r in rows for d in r["docs"])
    assert any(not d["hard_negative"] for r in rows for d in r["docs"])


def test_interrupted_run_resumes_to_the_same_file(tmp_path: Path, groups_file: Path) -> None:
    full = tmp_path / "full.jsonl"
    _run(groups_file, full, 2)

    out = tmp_path / "resumed.jsonl"
    partial = tmp_path / "resumed.jsonl.partial"
    calls: list[list[str]] = []
    with pytest.raises(Interrupted):
        _run(groups_file, out, 2, calls, fail_on=2)  # the first chunk (q0, q1) is durable, then a kill
    assert not out.exists()
    assert [json.loads(line)["query_id"] for line in partial.read_text().splitlines()] == ["q0", "q1"]
    with open(partial, "a") as f:
        f.write('{"query_id": "q2", "query": "que')  # a write cut short

    calls = []
    assert _run(groups_file, out, 2, calls) == 7
    asked = [p.split("search query: ", 1)[1].split("\n", 1)[0] for c in calls for p in c]
    assert asked == [f"query {q}" for q in range(2, 7)]  # done groups are not asked again
    assert out.read_bytes() == full.read_bytes()
    assert not partial.exists()

    calls = []  # resume=False starts over
    partial.write_text(full.read_text().splitlines(True)[0])
    _run(groups_file, out, 4, calls, resume=False)
    assert sum(len(c) for c in calls) == 7 and out.read_bytes() == full.read_bytes()


def test_options_checked_before_work(tmp_path: Path, groups_file: Path) -> None:
    for bad in ({"top_k": 0, "bottom_k": 0}, {"top_k": -1}, {"batch_size": 0}, {"max_new_tokens": 0}):
        with pytest.raises(ConfigError):
            listwise_label_file("unused", str(groups_file), str(tmp_path / "o.jsonl"), progress=False,
                                generate_fn=lambda p: [""] * len(p), **bad)
    with pytest.raises(ValueError, match="dtype"):
        listwise_label_file("tiny-llama", str(groups_file), str(tmp_path / "o.jsonl"), dtype="fp32", progress=False)
    with pytest.raises(TypeError, match="tokenizer=NAME"):
        listwise_label_file(nn.Linear(1, 1), str(groups_file), str(tmp_path / "o.jsonl"), progress=False)
    assert not list(tmp_path.glob("o.jsonl*"))


# ------------------------------------------------------------------------------------------ the LLM
class _FakeLM(nn.Module):
    """Records what ``generate`` receives and appends a fixed answer to every row."""

    def __init__(self, answer_ids: list[int]) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(is_encoder_decoder=False, max_position_embeddings=100_000)
        self.generation_config = SimpleNamespace(eos_token_id=None)
        self.answer = torch.tensor([answer_ids])
        self.seen: list[dict[str, Any]] = []

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, generation_config: Any) -> torch.Tensor:
        self.seen.append({"input_ids": input_ids, "attention_mask": attention_mask, "training": self.training,
                          "config": generation_config})
        return torch.cat([input_ids, self.answer.expand(input_ids.shape[0], -1)], dim=1)


def test_hf_generate_fn_left_pads_and_decodes_new_tokens() -> None:
    tok = load_tokenizer("tiny-llama")
    model = _FakeLM(tok("[2] > [1]", add_special_tokens=False)["input_ids"])
    model.train()
    side = tok.padding_side
    generate = hf_generate_fn(model, tok, max_new_tokens=7)
    answers = generate(["a short prompt", "a much longer prompt with many more words in it"])
    assert answers == ["[2] > [1]", "[2] > [1]"]
    seen = model.seen[0]
    mask = seen["attention_mask"]
    assert mask[0, 0] == 0 and mask[0, -1] == 1 and mask[1].all()  # LEFT padding
    assert not seen["training"] and model.training  # eval during generate, mode restored
    assert seen["config"].do_sample is False and seen["config"].max_new_tokens == 7
    assert tok.padding_side == side  # the tokenizer's own setting restored

    tok.chat_template = ("{% for m in messages %}<user>{{ m['content'] }}</user>{% endfor %}"
                         "{% if add_generation_prompt %}<bot>{% endif %}")
    generate = hf_generate_fn(model, tok, max_new_tokens=7)
    assert generate(["hello"]) == ["[2] > [1]"]
    text = tok.decode(model.seen[-1]["input_ids"][0]).strip()
    assert text.startswith("<user>hello</user>") and text.endswith("<bot>")
    assert generate([]) == []


def test_tiny_causal_lm_end_to_end(tmp_path: Path) -> None:
    lines = Path(sample_path("ranking_val.jsonl")).read_text().splitlines(True)[:2]
    src = tmp_path / "two.jsonl"
    src.write_text("".join(lines))
    groups = read_ranking_jsonl(src)
    kwargs = {"top_k": 3, "bottom_k": 2, "max_doc_chars": 60}
    out = tmp_path / "labels.jsonl"
    torch.manual_seed(0)
    assert listwise_label_file("tiny-llama", str(src), str(out), batch_size=2, max_new_tokens=12, device="cpu",
                               progress=False, **kwargs) == 2

    # the same model again (same seed), asked directly: which documents did it rank?
    torch.manual_seed(0)
    model, tok = load_generation_model("tiny-llama"), load_tokenizer("tiny-llama")
    shown = [candidate_indices(g, 3, 2) for g in groups]
    prompts = [build_listwise_prompt(g.query, [g.docs[j].text for j in s], max_doc_chars=60)
               for g, s in zip(groups, shown)]
    answers = hf_generate_fn(model, tok, max_new_tokens=12)(prompts)

    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["query_id"] for r in rows] == [g.query_id for g in groups]
    assert len(read_ranking_jsonl(out)) == 2  # well-formed ranking JSONL
    for row, group, s, answer in zip(rows, groups, shown, answers):
        ids = [d["id"] for d in row["docs"]]
        assert sorted(ids) == sorted(group.docs[j].id for j in s) and len(set(ids)) == len(ids) == 5
        ranked_ids = [group.docs[s[k - 1]].id for k in parse_permutation(answer, len(s))]
        assert [d["id"] for d in row["docs"] if not d["hard_negative"]] == ranked_ids
        m = len(ranked_ids)
        for d in row["docs"]:
            assert d["hard_negative"] is (d["llm_rank"] is None)
            expected_label = 0.0 if d["hard_negative"] else float(m - d["llm_rank"] + 1)
            assert d["label"] == expected_label and math.isfinite(d["first_stage_score"])
        assert [d["llm_rank"] for d in row["docs"]][:m] == list(range(1, m + 1))

"""Labeling: resumable scoring equals an uninterrupted run; what a teacher may be; permutation
parsing; RRADistill labels."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from kdlab.data import sample_path
from kdlab.data.collators import RankingCollator
from kdlab.data.readers import RankingDoc, RankingGroup, read_ranking_jsonl
from kdlab.labeling import score_file, token_budget_batches
from kdlab.listwise import build_listwise_prompt, parse_permutation, rradistill_labels
from kdlab.models.backbones import load_tokenizer
from kdlab.models.served import load_rank_teacher
from kdlab.stages.teacher_rank_sft import TeacherRankSFT


class Interrupted(RuntimeError):
    pass


@pytest.fixture
def teacher_dir(tiny_ranker_export: Path) -> Path:
    return tiny_ranker_export


@pytest.fixture(scope="module")
def small_input(tmp_path_factory: pytest.TempPathFactory) -> Path:
    lines = Path(sample_path("ranking_val.jsonl")).read_text().splitlines(True)[:20]
    path = tmp_path_factory.mktemp("input") / "groups.jsonl"
    path.write_text("".join(lines))
    return path


def test_resumed_labeling_equals_uninterrupted(tmp_path: Path, teacher_dir: Path, small_input: Path) -> None:
    full = tmp_path / "full.jsonl"
    n = score_file(str(teacher_dir), str(small_input), str(full), max_tokens=512, max_length=48, progress=False)
    assert n == 20

    out = tmp_path / "resumed.jsonl"
    shards = tmp_path / "resumed.jsonl.partial"
    calls: list[int] = []

    def crash(done: int) -> None:
        calls.append(done)
        if done >= 3:
            raise Interrupted("simulated kill")

    with pytest.raises(Interrupted):
        score_file(str(teacher_dir), str(small_input), str(out), max_tokens=512, max_length=48, progress=False,
                   on_batch=crash)
    assert calls == [1, 2, 3]
    assert not out.exists()  # never a half-written output
    assert len((shards / "rank0.jsonl").read_text().splitlines()) == 3
    # a write cut short mid-line is tolerated (truncated away) on restart
    with open(shards / "rank0.jsonl", "a") as f:
        f.write('{"batch": 7, "sco')
    seen: list[int] = []
    score_file(str(teacher_dir), str(small_input), str(out), max_tokens=512, max_length=48, progress=False,
               on_batch=seen.append)
    assert seen and seen[-1] == len(seen)  # only the missing batches were scored, once each
    assert not shards.exists()
    assert out.read_bytes() == full.read_bytes()  # the same batches, so the same bytes

    groups = read_ranking_jsonl(str(out))
    src = read_ranking_jsonl(str(small_input))
    assert [g.query_id for g in groups] == [g.query_id for g in src]
    assert all(d.teacher_score is not None for g in groups for d in g.docs)
    assert [d.label for d in groups[0].docs] == [d.label for d in src[0].docs]


def test_two_processes_label_the_same_file_as_one(tmp_path: Path, teacher_dir: Path, small_input: Path) -> None:
    """`kdlab label --devices 2` on CPU (DDP over gloo): each process scores whole batches of the same
    token-budget list, so the file is byte for byte the one process's."""
    import subprocess
    import sys

    from conftest import subprocess_env

    one = tmp_path / "one.jsonl"
    score_file(str(teacher_dir), str(small_input), str(one), max_tokens=512, max_length=48, progress=False)
    two = tmp_path / "two.jsonl"
    proc = subprocess.run([sys.executable, "-m", "kdlab", "label", f"--teacher={teacher_dir}", f"--input={small_input}",
                           f"--output={two}", "--max_tokens=512", "--max_length=48", "--accelerator=cpu", "--devices=2"],
                          capture_output=True, text=True, env=subprocess_env(), cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert two.read_bytes() == one.read_bytes()
    assert not list(tmp_path.glob("*.partial"))


def test_8bit_teacher_labels_through_the_same_loader(tmp_path: Path, teacher_dir: Path, small_input: Path) -> None:
    """bitsandbytes runs 8-bit layers on the CPU too: the same command, the same ranking, close scores."""
    full, int8 = tmp_path / "fp32.jsonl", tmp_path / "int8.jsonl"
    score_file(str(teacher_dir), str(small_input), str(full), max_tokens=2048, max_length=48, progress=False)
    score_file(str(teacher_dir), str(small_input), str(int8), max_tokens=2048, max_length=48, progress=False,
               quantization="8bit")
    a = torch.tensor([d.teacher_score for g in read_ranking_jsonl(str(full)) for d in g.docs])
    b = torch.tensor([d.teacher_score for g in read_ranking_jsonl(str(int8)) for d in g.docs])
    assert not torch.equal(a, b)  # really the quantized model
    assert torch.corrcoef(torch.stack([a, b]))[0, 1] >= 0.99


def test_token_budget_batches_pack_sorted_lengths_within_the_budget() -> None:
    lengths = [5, 3, 9, 3, 4, 20, 1]
    batches = token_budget_batches(lengths, max_tokens=12)
    # sorted: 1 (i6), 3 (i1), 3 (i3), 4 (i4), 5 (i0), 9 (i2), 20 (i5)
    # [i6, i1, i3] costs 3·3 = 9; + i4 → 4·4 = 16 > 12: new batch [i4, i0] 2·5 = 10; + i2 → 3·9 > 12;
    # [i2] 9; + i5 → 2·20 > 12; [i5] alone (longer than the budget: a batch of its own)
    assert batches == [[6, 1, 3], [4, 0], [2], [5]]
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert token_budget_batches([2] * 10, max_tokens=8, max_rows=3) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    with pytest.raises(ValueError, match="max_tokens must be >= 1"):
        token_budget_batches(lengths, max_tokens=0)


def test_scores_match_the_teacher_and_ignore_bucketing(tmp_path: Path, teacher_dir: Path, small_input: Path) -> None:
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    score_file(str(teacher_dir), str(small_input), str(a), max_tokens=48, max_length=48, progress=False)
    score_file(str(teacher_dir), str(small_input), str(b), max_tokens=4096, max_length=48, progress=False,
               resume=False)
    sa = [d.teacher_score for g in read_ranking_jsonl(str(a)) for d in g.docs]
    sb = [d.teacher_score for g in read_ranking_jsonl(str(b)) for d in g.docs]
    assert sa == pytest.approx(sb, abs=1e-4)  # batch composition / padding does not change scores
    # and equal the teacher applied to one unpadded pair
    teacher = load_rank_teacher(str(teacher_dir))
    g = read_ranking_jsonl(str(small_input))[0]
    enc = RankingCollator(load_tokenizer(str(teacher_dir)), "decoder", max_length=48).encode(g.query, g.docs[0].text)
    ids = torch.tensor([enc["input_ids"]])
    with torch.no_grad():
        direct = teacher(input_ids=ids, attention_mask=torch.ones_like(ids)).item()
    assert sa[0] == pytest.approx(direct, abs=1e-4)


def test_a_ranker_module_with_its_tokenizer_scores_like_its_export(tmp_path: Path, teacher_dir: Path,
                                                                   small_input: Path) -> None:
    from_dir, from_module = tmp_path / "dir.jsonl", tmp_path / "module.jsonl"
    score_file(str(teacher_dir), str(small_input), str(from_dir), max_length=48, progress=False)
    ranker = load_rank_teacher(str(teacher_dir))
    assert ranker.text_format == "decoder"  # the class says how its inputs are built
    score_file(ranker, str(small_input), str(from_module), max_length=48, progress=False, tokenizer="tiny-llama")
    assert from_module.read_bytes() == from_dir.read_bytes()


def test_score_file_refuses_a_stage_or_a_module_without_tokenizer(tmp_path: Path, teacher_dir: Path,
                                                                  small_input: Path) -> None:
    L.seed_everything(0)
    stage = TeacherRankSFT(backbone="tiny-llama-h32")
    out = tmp_path / "out.jsonl"
    with pytest.raises(TypeError, match="export directory"):  # export the stage first
        score_file(stage, str(small_input), str(out), tokenizer="tiny-llama", progress=False)
    with pytest.raises(TypeError, match="tokenizer=NAME"):
        score_file(load_rank_teacher(str(teacher_dir)), str(small_input), str(out), progress=False)
    assert not out.exists() and not (tmp_path / "out.jsonl.partial").exists()


@pytest.mark.parametrize("text,n,expected", [
    ("[2] > [1] > [3]", 3, [2, 1, 3]),
    ("[2] > [2] > [1]", 3, [2, 1]),  # duplicate dropped, first kept
    ("[4] > [9] > [0] > [1]", 4, [4, 1]),  # out of range ignored
    ("Sure! The ranking is: [ 3 ] > [1]. Passage [5] is irrelevant.", 4, [3, 1]),
    ("3 > 1 > 2", 3, [3, 1, 2]),  # bare numbers when no brackets
    ("2, 2, 7, 1.5, 1", 3, []),  # free-text numbers are never taken as identifiers
    ("I cannot rank these passages.", 5, []),
    ("", 5, []),
    ("[1] > [2]", 0, []),
])
def test_parse_permutation_malformed(text: str, n: int, expected: list[int]) -> None:
    assert parse_permutation(text, n) == expected


def _group(n: int) -> RankingGroup:
    docs = tuple(RankingDoc(id=f"d{i}", title=f"title {i}", body=f"body {i}", label=0.0) for i in range(n))
    return RankingGroup("q1", "what is it", docs)


def test_listwise_prompt_numbers_documents() -> None:
    prompt = build_listwise_prompt("q?", ["alpha  doc", "beta"])
    assert "[1] alpha doc" in prompt and "[2] beta" in prompt and "[3]" not in prompt.split("Answer")[0]


def test_rradistill_labels_top_bottom_and_hard_negatives() -> None:
    group = _group(8)
    prescores = [float(i) for i in range(8)]  # d7 best ... d0 worst
    prompts: list[str] = []

    def llm(prompt: str) -> str:
        prompts.append(prompt)
        return "[3] > [1] > [3] > [9] garbage"  # shown order: d7, d6, d1, d0

    rows = rradistill_labels([group], {"q1": prescores}, llm, top_k=2, bottom_k=2)
    assert len(prompts) == 1
    assert "[1] title 7 body 7" in prompts[0] and "[4] title 0 body 0" in prompts[0]
    docs = rows[0]["docs"]
    assert [d["id"] for d in docs] == ["d1", "d7", "d6", "d0"]
    assert [d["label"] for d in docs] == [2.0, 1.0, 0.0, 0.0]
    assert [d["hard_negative"] for d in docs] == [False, False, True, True]
    assert [d.get("llm_rank") for d in docs] == [1, 2, None, None]
    # the rows are valid ranking JSONL
    path_rows = json.loads(json.dumps(rows[0]))
    assert path_rows["query_id"] == "q1"


def test_rradistill_labels_small_group_and_bad_prescores() -> None:
    rows = rradistill_labels([_group(3)], [[0.1, 0.3, 0.2]], lambda p: "nothing useful", top_k=10, bottom_k=10)
    docs = rows[0]["docs"]
    assert [d["id"] for d in docs] == ["d1", "d2", "d0"] and all(d["hard_negative"] for d in docs)
    with pytest.raises(ValueError, match="pre-ranker scores"):
        rradistill_labels([_group(3)], [[0.1]], lambda p: "")

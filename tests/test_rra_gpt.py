"""RRADistill's decoder student (RRA-GPT): the LLM's reasons as labels, the joint loss by hand, the
one-row training layout, and a served model that is the ranking layer alone."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from kdlab.data.collators import RankingCollator
from kdlab.data.readers import RankingDoc, RankingGroup, read_ranking_jsonl, write_ranking_jsonl
from kdlab.defaults import IGNORE_INDEX
from kdlab.errors import ConfigError
from kdlab.listwise import build_reason_prompt, listwise_label_file, parse_reason
from kdlab.losses.ranking import rank_and_reasons_loss
from kdlab.models.backbones import load_tokenizer


# ----------------------------------------------------------------------------------- the joint loss
def test_joint_loss_by_hand() -> None:
    """L = L_rank + λ · mean_i −log softmax(z_i)[y_i] over the non-ignored targets.
    z_1 = (0, 0, 0), y_1 = 1: −log(1/3) = ln 3; z_2 = (ln 3, 0, 0), y_2 = 0: −log(3/5) = ln(5/3);
    an ignored position between them. Mean = (ln 3 + ln 5 − ln 3) / 2 = ln(5)/2; λ = 2: L = 0.5 + ln 5."""
    logits = torch.tensor([[0.0, 0.0, 0.0], [7.0, -2.0, 1.0], [math.log(3.0), 0.0, 0.0]], requires_grad=True)
    targets = torch.tensor([1, IGNORE_INDEX, 0])
    loss, reason = rank_and_reasons_loss(torch.tensor(0.5), logits, targets, reasons_weight=2.0)
    assert reason.item() == pytest.approx(math.log(5.0) / 2, abs=1e-6)
    assert loss.item() == pytest.approx(0.5 + math.log(5.0), abs=1e-6)
    loss.backward()
    # dL/dz_i = λ / |R| · (softmax(z_i) − onehot(y_i)); the ignored row gets nothing
    expected = torch.tensor([[1 / 3, 1 / 3 - 1, 1 / 3], [0.0, 0.0, 0.0], [3 / 5 - 1, 1 / 5, 1 / 5]])
    torch.testing.assert_close(logits.grad, expected, atol=1e-6, rtol=0)


def test_joint_loss_limits() -> None:
    rank = torch.tensor(1.25)
    logits = torch.randn(2, 4, 5, requires_grad=True)
    none = torch.full((2, 4), IGNORE_INDEX)
    loss, reason = rank_and_reasons_loss(rank, logits, none, 3.0)  # no reason token: L = L_rank, no NaN
    assert reason.item() == 0.0 and loss.item() == 1.25
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))
    targets = torch.randint(0, 5, (2, 4))
    assert rank_and_reasons_loss(rank, logits, targets, 0.0)[0].item() == 1.25  # λ = 0: ranking alone
    assert rank_and_reasons_loss(rank, logits, targets, 1.0)[1].item() > 0.0
    with pytest.raises(ValueError, match="reasons_weight"):
        rank_and_reasons_loss(rank, logits, targets, -0.1)


# -------------------------------------------------------------------------------------- reasons
@pytest.mark.parametrize("answer,expected", [
    ("Reason: The passage defines the term. It also lists uses.", "The passage defines the term."),
    ("  because: it talks about cats!  more", "it talks about cats!"),
    ("It mentions the capital of France", "It mentions the capital of France"),
    ("yes", None), ("", None), ("[1] > [2] > [3]", None), ("... !", None),
])
def test_parse_reason_keeps_the_first_sentence(answer: str, expected: str | None) -> None:
    assert parse_reason(answer) == expected


def test_reason_prompt_states_the_verdict() -> None:
    assert "ranked it 2 of 5" in build_reason_prompt("q", "d", 2, 5)
    assert "left it out" in build_reason_prompt("q", "d", None, 5)


def _groups() -> list[RankingGroup]:
    return [RankingGroup(f"q{q}", f"query {q}", tuple(
        RankingDoc(f"d{q}-{i}", "", f"text {q} {i}", first_stage_score=float(10 - i)) for i in range(5)))
        for q in range(5)]


def _rank(prompts: list[str]) -> list[str]:
    return ["[2] > [1] > [3]" for _ in prompts]


def _reasons(calls: list[int]):
    def generate(prompts: list[str]) -> list[str]:
        calls.append(len(prompts))
        # one document in each query cannot be parsed: a bare "no"
        return ["no" if "text 0 4" in p or "text 3 4" in p else f"Because {p.split('Passage: ')[1].split(chr(10))[0]} matches."
                for p in prompts]
    return generate


def test_listwise_reasons_are_written_beside_the_labels(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "groups.jsonl"
    write_ranking_jsonl(src, _groups())
    out = tmp_path / "labels.jsonl"
    calls: list[int] = []
    listwise_label_file("unused", str(src), str(out), top_k=3, bottom_k=1, batch_size=2, progress=False,
                        generate_fn=_rank, reasons_fn=_reasons(calls))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    docs = [d for r in rows for d in r["docs"]]
    assert len(docs) == 20 and calls == [8, 8, 4]  # 4 judged documents per query, batched by query batch
    assert docs[0]["reason"] == "Because text 0 1 matches." and docs[0]["llm_rank"] == 1
    missing = [(r["query_id"], d["id"]) for r in rows for d in r["docs"] if d["reason"] is None]
    assert missing == [("q0", "d0-4"), ("q3", "d3-4")]
    printed = capsys.readouterr().out
    assert "reasons: 18 documents have one, 2 have none (unparseable answer)" in printed
    back = read_ranking_jsonl(out)  # the reader keeps them
    assert back[0].docs[0].reason == "Because text 0 1 matches." and back[0].docs[3].reason is None


def test_reasons_resume_to_the_same_file(tmp_path: Path) -> None:
    src = tmp_path / "groups.jsonl"
    write_ranking_jsonl(src, _groups())
    full = tmp_path / "full.jsonl"
    listwise_label_file("unused", str(src), str(full), top_k=3, bottom_k=1, batch_size=2, progress=False,
                        generate_fn=_rank, reasons_fn=_reasons([]))

    class Killed(RuntimeError):
        pass

    calls: list[int] = []
    generate = _reasons(calls)

    def dies_on_the_second_batch(prompts: list[str]) -> list[str]:
        if len(calls) == 1:
            raise Killed
        return generate(prompts)

    out = tmp_path / "resumed.jsonl"
    with pytest.raises(Killed):
        listwise_label_file("unused", str(src), str(out), top_k=3, bottom_k=1, batch_size=2, progress=False,
                            generate_fn=_rank, reasons_fn=dies_on_the_second_batch)
    calls.clear()
    listwise_label_file("unused", str(src), str(out), top_k=3, bottom_k=1, batch_size=2, progress=False,
                        generate_fn=_rank, reasons_fn=generate)
    assert calls == [8, 4] and out.read_bytes() == full.read_bytes()


def test_reasons_need_listwise_mode(tmp_path: Path) -> None:
    from kdlab.labeling import label_command

    with pytest.raises(ConfigError, match="add --mode listwise"):
        label_command("unused", str(tmp_path / "x.jsonl"), str(tmp_path / "y.jsonl"), reasons=True)


# ------------------------------------------------------------------------------ the training rows
def _item(reasons: list[str | None]) -> dict[str, Any]:
    return {"query": "what is x", "query_id": "q", "query_index": 0,
            "docs": [("a", "", "x is a letter"), ("b", "", "nothing here"), ("c", "", "more")][:len(reasons)],
            "labels": [1.0, 0.0, 0.0][:len(reasons)], "teacher_scores": [0.0] * len(reasons), "reasons": reasons}


def test_reason_rows_keep_the_ranking_tokens_and_label_only_the_reason() -> None:
    tok = load_tokenizer("tiny-llama")
    plain = RankingCollator(tok, "decoder", 32)(items := [_item(["It defines x.", None, "More is said."])])
    rows = RankingCollator(tok, "decoder", 32, reason_max_length=6)(items)
    lengths = plain["attention_mask"].sum(-1)
    assert torch.equal(rows["score_positions"], lengths - 1)
    for r in range(3):
        n = int(lengths[r])
        assert torch.equal(rows["input_ids"][r, :n], plain["input_ids"][r, :n])  # ranking tokens unchanged
        assert (rows["reason_labels"][r, :n] == IGNORE_INDEX).all()
    assert (rows["reason_labels"][1] == IGNORE_INDEX).all()  # no reason: nothing to learn
    reason_tokens = rows["reason_labels"][0][rows["reason_labels"][0] != IGNORE_INDEX]
    assert len(reason_tokens) <= 6 + 1 and int(reason_tokens[-1]) == tok.eos_token_id
    with pytest.raises(ValueError, match="decoder"):
        RankingCollator(tok, "cross-encoder", 32, reason_max_length=6)


# ---------------------------------------------------------------------------------------- stage
def _student(reasons_weight: float | None) -> Any:
    from kdlab.stages import RankDistillStudent

    torch.manual_seed(0)
    return RankDistillStudent(backbone="tiny-llama", architecture="decoder", reasons_weight=reasons_weight,
                              alpha=0.0, beta=0.0, gt_weight=1.0, length_chunk_size=0)


def test_the_trained_score_is_the_served_score_and_lambda_weighs_the_reasons() -> None:
    """The score read at each row's ranking EOS (reason appended after it) equals the served
    ranker's score of the ranking input alone (causal attention); the loss is L_rank + λ·L_reason."""
    tok = load_tokenizer("tiny-llama")
    items = [_item(["It defines x.", None, "More is said."]), _item(["Short one.", "Another reason here.", None])]
    plain = RankingCollator(tok, "decoder", 32)(items)
    rows = RankingCollator(tok, "decoder", 32, reason_max_length=8)(items)
    student = _student(2.0).eval()
    with torch.no_grad():
        trained, logits, targets = student._reason_rows(rows)
        served = student.score_groups(plain)
        torch.testing.assert_close(trained, served, atol=1e-5, rtol=1e-5)
        loss, main, reason = student._losses(rows)
    assert len(targets) == int((rows["reason_labels"][:, 1:] != IGNORE_INDEX).sum()) > 0
    assert loss.item() == pytest.approx(main.item() + 2.0 * reason.item(), rel=1e-6)
    student.hparams.reasons_weight = 0.0
    with torch.no_grad():
        loss0, main0, _ = student._losses(rows)
    assert loss0.item() == pytest.approx(main0.item()) and main0.item() == pytest.approx(main.item())


def test_reason_options_are_checked_before_any_model_loads() -> None:
    from kdlab.stages import RankDistillStudent

    with pytest.raises(ConfigError, match="reasons_weight"):
        RankDistillStudent.check_options({"architecture": "cross-encoder", "reasons_weight": 1.0})
    with pytest.raises(ConfigError, match="reasons_weight"):
        RankDistillStudent.check_options({"architecture": "decoder", "reasons_weight": -1.0})
    with pytest.raises(ConfigError, match="text_format: decoder"):
        from kdlab.data import RankingDataModule

        RankingDataModule(reasons=True, text_format="cross-encoder")


def test_rra_gpt_exports_the_ranking_layer_alone(tmp_path: Path) -> None:
    """The export is a decoder ranker (base + score head), no LM head; it scores as the stage does."""
    from kdlab.models.served import load_rank_teacher

    student = _student(1.0).eval()
    student.export_pretrained(str(tmp_path / "model"))
    served = load_rank_teacher(str(tmp_path / "model")).eval()
    assert not any("reason" in name or "lm_head" in name for name, _ in served.named_parameters())
    tok = load_tokenizer("tiny-llama")
    batch = RankingCollator(tok, "decoder", 32)([_item(["a", "b", "c"])])
    with torch.no_grad():
        torch.testing.assert_close(served(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).flatten(),
                                   student(batch["input_ids"], batch["attention_mask"]).flatten(), atol=1e-5, rtol=1e-5)


def test_reasons_is_a_bare_flag_on_the_command_line(tmp_path: Path) -> None:
    """``kdlab label --reasons`` (no value) parses as ``--reasons=true``."""
    from kdlab.cli import run_tool

    with pytest.raises(ConfigError, match="add --mode listwise"):
        run_tool("label", ["--teacher", "unused", "--input", str(tmp_path / "x.jsonl"), "--output",
                           str(tmp_path / "y.jsonl"), "--reasons"])

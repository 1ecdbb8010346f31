"""The KETCHUP paper's tasks and metrics: the final-number extractor on GSM8K-style solutions and
free text (hand-checked), answer accuracy as a DDP-summable Metric, the task → main-metric table,
and TaskMetrics as a drop-in superset of the RL stage's GenerationMetrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sacrebleu
import torch
from torchmetrics.text.rouge import ROUGEScore
from torchmetrics.utilities.data import dim_zero_sum

from kdlab.metrics import (
    GENERATION_METRIC_KEYS,
    TASKS,
    AnswerAccuracy,
    TaskMetrics,
    extract_final_number,
    main_generation_metric,
    normalize_number,
    resolve_val_metric,
)

GSM8K_TINY = Path(__file__).parent / "data" / "gsm8k_tiny.jsonl"


def _gsm8k_answers() -> list[str]:
    return [json.loads(line)["answer"] for line in GSM8K_TINY.read_text(encoding="utf-8").splitlines()]


# ------------------------------------------------------------------------------------ extractor


def test_gsm8k_references_read_after_the_last_hashes() -> None:
    # the fixture's solutions end with "#### N"; their working has other numbers (and <<a*b=c>> notes)
    assert [extract_final_number(a) for a in _gsm8k_answers()] == ["6", "200", "140", "1350", "2.4", "-3"]
    assert [extract_final_number(a, strict=True) for a in _gsm8k_answers()] == ["6", "200", "140", "1350", "2.4", "-3"]


@pytest.mark.parametrize("text, expected", [
    # free text: "answer is" / "answer:" decides, else the last number
    ("so the answer is 1,234.", "1234"),
    ("She pays $18.", "18"),
    ("-3.5", "-3.5"),
    ("The answer is 42 apples", "42"),
    ("The answer is 42 apples, 2 more than the 40 she had.", "42"),  # first number after the marker
    ("Here are the top 10 tricks. After 3 steps we get 12. The answer is 7, not 10.", "7"),
    ("From the top 10 list she keeps 4 books.", "4"),  # no marker: the last number
    ("The answer is: 6. Question: If there are 3 cars and 2 more arrive", "6"),  # few-shot run-on
    ("ANSWER: 9", "9"),
    ("Final answer = 15", "15"),
    ("The answer is unclear, maybe 12", "12"),
    ("She has 3 apples, so the answer is", "3"),  # no number after the marker: the last number
    # the #### rule beats the others; the last #### counts
    ("The answer is 5.\n#### 6", "6"),
    ("#### 3\nwait\n#### 4", "4"),
    ("We got 5.\n####", "5"),  # hashes with no number after them are not rule 1
    ("#### $140", "140"),
    ("#### -3", "-3"),
    ("####1,350", "1350"),
    # no number at all
    ("I cannot tell.", None),
    ("", None),
    ("COVID19 spreads", None),  # digits glued to a word are not a number
    # normalisation
    ("3.0", "3"),
    ("3.50", "3.5"),
    ("It costs 4.", "4"),  # a sentence's full stop is not a decimal point
    ("1,000,000", "1000000"),
    ("scores 1,2", "2"),  # not a thousands group: two numbers
    ("1,2345", "2345"),
    ("+5", "5"),
    ("\u22124 degrees", "-4"),  # Unicode minus
    ("-0", "0"),
    ("007", "7"),
    ("0.125", "0.125"),
    ("-$18.50", "-18.5"),
    ("50%", "50"),
    ("the 2nd step", "2"),
    ("10-3", "3"),  # subtraction, not a sign
    ("x = -3", "-3"),
    ("1/2", "0.5"),  # fractions: exact rationals, terminating ones as decimals
    ("2/6", "1/3"),
    ("The answer is 48/2", "24"),
    ("5/0", None),
])
def test_extract_final_number(text: str, expected: str | None) -> None:
    assert extract_final_number(text) == expected


def test_strict_reads_only_hashes_as_the_released_code() -> None:
    assert extract_final_number("The answer is 5", strict=True) is None
    assert extract_final_number("so 12 - 4 = 8", strict=True) is None
    assert extract_final_number("step 2 ... #### 8", strict=True) == "8"
    assert extract_final_number("# 7", strict=True) == "7"  # the released ANS_RE is "#+ (number)"


def test_normalize_number() -> None:
    assert normalize_number("$1,234.50") == "1234.5"
    assert normalize_number("about 3.000 litres") == "3"
    assert normalize_number("3/4") == "0.75"
    assert normalize_number("1/3") == "1/3"
    assert normalize_number("abc") is None
    assert normalize_number("0.1") == normalize_number("1/10") == "0.1"


# ------------------------------------------------------------------------------ AnswerAccuracy


def test_answer_accuracy_hand_checked() -> None:
    refs = _gsm8k_answers()[:4]  # 6, 200, 140, 1350
    preds = ["... #### 6", "The answer is 200 pages.", "I think she needs 141 dollars", "no idea"]
    metric = AnswerAccuracy()
    metric.update(preds, refs)
    assert metric.compute().item() == pytest.approx(2 / 4)
    assert int(metric.correct) == 2 and int(metric.total) == 4
    metric.update(["1,350 plants", "it is 2.40 each", "-3"], _gsm8k_answers()[3:])  # 3 more right
    assert metric.compute().item() == pytest.approx(5 / 7)

    strict = AnswerAccuracy(strict=True)
    strict.update(preds, refs)  # only "#### 6" is read
    assert strict.compute().item() == pytest.approx(1 / 4)


def test_answer_accuracy_none_never_equals() -> None:
    metric = AnswerAccuracy()
    metric.update(["no number", "still none", "5"], ["none here", "#### 3", "no answer"])
    assert metric.compute().item() == 0.0
    metric.update(["3.0"], ["#### 3"])
    assert metric.compute().item() == pytest.approx(1 / 4)


def test_answer_accuracy_sum_states_merge_like_ddp_and_empty_input() -> None:
    preds = ["#### 6", "200", "no", "1350", "2.4", "3"]
    refs = _gsm8k_answers()
    whole, rank0, rank1 = AnswerAccuracy(), AnswerAccuracy(), AnswerAccuracy()
    whole.update(preds, refs)
    rank0.update(preds[:2], refs[:2])
    rank1.update(preds[2:], refs[2:])
    rank0.merge_state(rank1)  # what the "sum" reduction does across ranks
    assert int(rank0.correct) == int(whole.correct) == 4 and int(rank0.total) == int(whole.total) == 6
    assert rank0.compute().item() == whole.compute().item() == pytest.approx(4 / 6)
    assert whole._reductions == {"correct": dim_zero_sum, "total": dim_zero_sum}  # noqa: SLF001 - DDP contract

    empty = AnswerAccuracy()
    empty.update([], [])
    assert empty.compute().item() == 0.0
    whole.reset()
    assert int(whole.total) == 0 and whole.compute().item() == 0.0


def test_answer_accuracy_bad_input_is_refused() -> None:
    metric = AnswerAccuracy()
    with pytest.raises(ValueError, match="equal length"):
        metric.update(["1", "2"], ["1"])
    with pytest.raises(ValueError, match="equal length"):
        metric.update("12", ["1", "2"])  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ tasks


def test_tasks_and_main_metric() -> None:
    assert TASKS == {"summarization": "rouge1", "translation": "bleu", "math": "accuracy"}
    assert main_generation_metric("summarization") == ("rouge1", "max")
    assert main_generation_metric("translation") == ("bleu", "max")
    assert main_generation_metric("math") == ("accuracy", "max")
    with pytest.raises(ValueError, match=r"task must be one of \['summarization', 'translation', 'math'\]"):
        main_generation_metric("dialogue")  # type: ignore[arg-type]
    assert set(TASKS.values()) <= set(GENERATION_METRIC_KEYS)


def test_resolve_val_metric() -> None:
    assert resolve_val_metric() == ("rougeL", "max")  # the stage's metric before tasks existed
    assert resolve_val_metric(task="math") == ("accuracy", "max")
    assert resolve_val_metric("rouge2", task="math") == ("rouge2", "max")  # explicit wins
    assert resolve_val_metric("val/bleu") == ("bleu", "max")
    assert resolve_val_metric("teacher_logprob") == ("teacher_logprob", "max")
    with pytest.raises(ValueError, match="val_metric must be one of"):
        resolve_val_metric("gen_length")  # no direction to select by
    with pytest.raises(ValueError, match="val_metric must be one of"):
        resolve_val_metric("rouge-l")
    with pytest.raises(ValueError, match="task must be one of"):
        resolve_val_metric(task="qa")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ TaskMetrics


def test_task_metrics_hand_checked_values() -> None:
    metrics = TaskMetrics()
    metrics.update(["the cat sat on the mat"], ["the cat is on the mat"])
    metrics.gen_length.update(torch.tensor([6.0]))
    out = metrics.compute()
    assert set(out) == {"rouge1", "rouge2", "rougeL", "bleu", "accuracy", "gen_length"}
    # unigrams: the×2, cat, on, mat shared → P = R = 5/6; bigrams: "the cat", "on the", "the mat" of
    # 5 each → 3/5; LCS "the cat on the mat" → 5/6
    assert out["rouge1"].item() == pytest.approx(5 / 6, abs=1e-6)
    assert out["rouge2"].item() == pytest.approx(3 / 5, abs=1e-6)
    assert out["rougeL"].item() == pytest.approx(5 / 6, abs=1e-6)
    expected_bleu = sacrebleu.corpus_bleu(["the cat sat on the mat"], [["the cat is on the mat"]]).score / 100
    assert out["bleu"].item() == pytest.approx(expected_bleu, abs=1e-6) and expected_bleu > 0.19
    assert out["accuracy"].item() == 0.0  # neither text has a number
    assert out["gen_length"].item() == 6.0
    metrics.teacher_logprob.update(torch.tensor([-1.0, -3.0]))
    assert metrics.compute()["teacher_logprob"].item() == pytest.approx(-2.0)


def test_task_metrics_matches_separate_metrics_across_updates() -> None:
    preds = ["He reads 200 pages. #### 200", "She needs 150 more. #### 150", "the answer is 1,350 plants"]
    refs = _gsm8k_answers()[1:4]
    metrics = TaskMetrics()
    metrics.update(preds[:1], refs[:1])
    metrics.update(preds[1:], refs[1:])
    out = metrics.compute()
    rouge = ROUGEScore(rouge_keys=("rouge1", "rouge2", "rougeL"))
    rouge.update(preds, refs)
    expected = rouge.compute()
    for key in ("rouge1", "rouge2", "rougeL"):
        assert out[key].item() == pytest.approx(expected[f"{key}_fmeasure"].item(), abs=1e-6)
    assert out["bleu"].item() == pytest.approx(sacrebleu.corpus_bleu(preds, [refs]).score / 100, abs=1e-6)
    assert out["accuracy"].item() == pytest.approx(2 / 3)  # 200 and 1350 right, 150 ≠ 140
    metrics.reset()
    assert int(metrics.accuracy.total) == 0 and int(metrics.bleu.totals.sum()) == 0


def test_task_metrics_is_a_drop_in_for_generation_metrics() -> None:
    """The stage's GenerationMetrics interface: attributes rouge/bleu/teacher_logprob/gen_length,
    fed one by one; compute() then returns exactly GenerationMetrics' keys (no accuracy)."""
    metrics = TaskMetrics()
    for name in ("rouge", "bleu", "teacher_logprob", "gen_length", "accuracy"):
        assert isinstance(getattr(metrics, name), torch.nn.Module)
    preds, targets = ["a b c", "d e"], ["a b d", "d e"]
    metrics.rouge.update(preds, targets)
    metrics.bleu.update(preds, [[t] for t in targets])
    metrics.gen_length.update(torch.tensor([3.0, 2.0]))
    assert set(metrics.compute()) == {"rouge1", "rouge2", "rougeL", "bleu", "gen_length"}
    assert list(metrics.parameters()) == [] and metrics.state_dict() == {}  # nothing lands in checkpoints
    strict = TaskMetrics(strict_answers=True)
    strict.update(["the answer is 6"], ["#### 6"])
    assert strict.compute()["accuracy"].item() == 0.0

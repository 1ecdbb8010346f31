"""SacreBLEU as a torchmetrics Metric: equal to sacreBLEU's corpus BLEU / 100 across split updates,
smoothed on short outputs (hand-computed), exact under a simulated DDP merge, 0 on no input."""

from __future__ import annotations

import math

import pytest
import sacrebleu
import torch
from torchmetrics.text import BLEUScore

from kdlab.metrics import SacreBLEU

EXAMPLES = [
    (
        ["the cat sat on the mat .", "a dog barked at the mailman all day long", "hello world, how are you?"],
        ["the cat is on the mat .", "the dog barked at the postman all day", "hello world, how are you today?"],
    ),
    (
        ["It is a guide to action which ensures that the military always obeys the commands of the party."],
        ["It is a guide to action that ensures that the military will forever heed Party commands."],
    ),
    (
        ["one two three four five", "six", "", "Numbers 1,000.5 and 2-3 (tokenised by 13a)!"],
        ["one two three four five six", "six seven", "nothing", "Numbers 1,000.5 and 2-3 (tokenised by 13a)."],
    ),
]


@pytest.mark.parametrize("hyps, refs", EXAMPLES)
def test_equals_sacrebleu_corpus_bleu_across_updates(hyps: list[str], refs: list[str]) -> None:
    metric = SacreBLEU()
    cut = max(1, len(hyps) // 2)
    metric.update(hyps[:cut], [[r] for r in refs[:cut]])
    metric.update(hyps[cut:], [[r] for r in refs[cut:]])
    assert metric.compute().item() == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score / 100, abs=1e-6)


def test_smoothing_options_and_multiple_references() -> None:
    hyps, refs = EXAMPLES[0]
    for method in ("none", "floor", "add-k"):
        metric = SacreBLEU(smooth_method=method)  # type: ignore[arg-type]
        metric.update(hyps, [[r] for r in refs])
        expected = sacrebleu.corpus_bleu(hyps, [refs], smooth_method=method).score / 100
        assert metric.compute().item() == pytest.approx(expected, abs=1e-6)
    # a varying number of references per segment: sacreBLEU takes streams padded with None
    second = ["a cat sat on the mat .", None, "hello world, how are you?"]
    metric = SacreBLEU()
    metric.update(hyps, [[refs[0], second[0]], [refs[1]], [refs[2], second[2]]])
    expected = sacrebleu.corpus_bleu(hyps, [refs, second]).score / 100  # type: ignore[list-item]
    assert metric.compute().item() == pytest.approx(expected, abs=1e-6)


def test_short_output_gets_a_non_zero_smoothed_score() -> None:
    hyp, ref = "the cat sat on a mat", "the cat is on the mat"
    # 1-grams: the, cat, on, mat match -> 4/6; 2-grams: "the cat" -> 1/5; 3-grams 0/4; 4-grams 0/3.
    # exp smoothing: the k-th zero-match order gets 1 / (2^k * total) -> 1/8, then 1/12; BP = 1
    expected = math.exp((math.log(4 / 6) + math.log(1 / 5) + math.log(1 / 8) + math.log(1 / 12)) / 4)
    metric = SacreBLEU()
    metric.update([hyp], [[ref]])
    assert metric.compute().item() == pytest.approx(expected, abs=1e-6)
    assert expected > 0.19
    unsmoothed = BLEUScore()
    unsmoothed.update([hyp], [[ref]])
    assert unsmoothed.compute().item() == 0.0  # what the RL stage printed before


def test_sum_states_merge_like_ddp_and_empty_input() -> None:
    hyps, refs = EXAMPLES[2]
    whole, rank0, rank1 = SacreBLEU(), SacreBLEU(), SacreBLEU()
    whole.update(hyps, [[r] for r in refs])
    rank0.update(hyps[:2], [[r] for r in refs[:2]])
    rank1.update(hyps[2:], [[r] for r in refs[2:]])
    rank0.merge_state(rank1)  # what the "sum" reduction does across ranks
    assert torch.equal(rank0.matches, whole.matches) and torch.equal(rank0.totals, whole.totals)
    assert rank0.hyp_len == whole.hyp_len and rank0.ref_len == whole.ref_len
    assert rank0.compute().item() == whole.compute().item()

    empty = SacreBLEU()
    empty.update([], [])
    assert SacreBLEU().compute().item() == 0.0  # never updated
    assert empty.compute().item() == 0.0
    whole.reset()
    assert whole.compute().item() == 0.0 and int(whole.totals.sum()) == 0


def test_bad_input_is_refused() -> None:
    metric = SacreBLEU()
    with pytest.raises(ValueError, match="as long as target"):
        metric.update(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="as long as target"):
        metric.update("a b", [["a b"]])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-empty sequence of reference strings"):
        metric.update(["a"], ["a"])
    with pytest.raises(ValueError, match="smooth_method"):
        SacreBLEU(smooth_method="laplace")  # type: ignore[arg-type]


def test_defaults_are_bleu4_13a_as_the_released_ketchup_evaluation() -> None:
    """KETCHUP's EN→NL BLEU-4 [code]: ``sacrebleu.corpus_bleu(hyps, [refs])`` with sacreBLEU's defaults
    (order 4, ``13a`` tokens, exp smoothing, case-sensitive); kdlab's score is that / 100."""
    from sacrebleu.metrics import BLEU

    metric, reference = SacreBLEU(), BLEU()
    assert metric.max_ngram_order == reference.max_ngram_order == 4
    assert metric.smooth_method == reference.smooth_method == "exp"
    assert type(metric._extractor.tokenizer).__name__ == type(reference.tokenizer).__name__ == "Tokenizer13a"
    assert metric._extractor.lowercase is reference.lowercase is False
    # 13a splits punctuation from words: "mat." matches "mat ." exactly, so the sentence scores 1
    metric.update(["The cat sat on the mat."], [["The cat sat on the mat ."]])
    assert metric.compute().item() == pytest.approx(1.0)
    lower = SacreBLEU()
    lower.update(["the cat sat on the mat."], [["The cat sat on the mat ."]])  # case matters by default
    assert lower.compute().item() == pytest.approx(
        sacrebleu.corpus_bleu(["the cat sat on the mat."], [["The cat sat on the mat ."]]).score / 100, abs=1e-6)
    assert lower.compute().item() < 1.0

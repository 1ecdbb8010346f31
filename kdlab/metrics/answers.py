"""Answer accuracy for math word problems (GSM8K): a final-number extractor and a torchmetrics
``Metric`` that compares the final numbers of predictions and references.

Extraction (:func:`extract_final_number`), in order; the first rule that finds a number wins:

1. ``####`` — the number right after the last run of ``#`` that is followed (after optional
   spaces and ``$``) by a number. GSM8K's reference solutions end with ``#### 42``.
   **[code]** the released KETCHUP evaluation (``evaluation.py`` / ``utils/accuracy.py``,
   ``ANS_RE = r"#+ (\\-?[0-9\\.\\,]+)"``) reads predictions by this rule only; ``strict=True``
   does the same here.
2. ``answer is`` / ``answer:`` / ``answer =`` (any case) — the first number after the last such
   phrase (the few-shot template of the released code ends its solutions with "The answer is: 6.").
   When no number follows the last phrase, rule 3 decides.
3. Otherwise the last number in the text (lm-evaluation-harness' "flexible extract" reading).
   **[ours]** rules 2–3 read free text that the released code would count as invalid.

A *number* is an optional ``-`` (or ``−``), an optional ``$``, digits with optional thousands
separators (``1,234`` — only groups of exactly three digits; ``1,2`` is two numbers), an optional
decimal part (``3.5``; a sentence's final ``.`` is not one) and an optional ``/denominator``
(``1/2``). A ``-`` glued to a preceding word or digit is subtraction, not a sign (``10-3`` → 3);
digits glued to a preceding letter are not a number (``COVID19``); units and symbols after a
number are ignored (``18%``, ``42 apples``, ``10th``); a leading ``+`` is dropped.

Normalisation (**[ours]**, so that equal values compare equal as strings): the number is read as an
exact rational and written canonically — an integer as ``"42"`` (``"3.0"`` → ``"3"``, ``"-0"`` →
``"0"``), a terminating decimal without trailing zeros (``"3.50"`` → ``"3.5"``; ``"1/2"`` →
``"0.5"``), any other fraction reduced (``"2/6"`` → ``"1/3"``); a zero denominator gives None.
So ``"1/2"`` equals ``"0.5"``, but ``"0.333"`` does not equal ``"1/3"``. The released code compares
floats with tolerance 1e-4; GSM8K's answers are integers, where both agree.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from fractions import Fraction

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["AnswerAccuracy", "extract_final_number", "normalize_number"]

# one number: sign (not glued to a preceding word/digit/point), optional $, integer part with
# thousands groups of exactly three digits (or plain digits), decimals, optional /denominator
_NUMBER = (
    r"(?<![\w.])(?P<sign>[-\u2212]?)\$?"
    r"(?P<int>\d{1,3}(?:,\d{3})+(?!\d)|\d+)"
    r"(?:\.(?P<frac>\d+))?"
    r"(?:/(?P<den>\d+))?"
)
_NUMBER_RE = re.compile(_NUMBER)
_HASH_RE = re.compile(r"#+[ \t]*" + _NUMBER)
_ANSWER_RE = re.compile(r"\banswer\s*(?:is\b|:|=)", re.IGNORECASE)


def _canonical(value: Fraction) -> str:
    """``42``, ``3.5``, ``-0.125`` or ``1/3``: one spelling per rational number."""
    num, den = value.numerator, value.denominator
    if den == 1:
        return str(num)
    twos = fives = 0
    rest = den
    while rest % 2 == 0:
        rest //= 2
        twos += 1
    while rest % 5 == 0:
        rest //= 5
        fives += 1
    if rest != 1:  # not a terminating decimal
        return f"{num}/{den}"
    places = max(twos, fives)
    digits = str(abs(num) * (10**places // den)).rjust(places + 1, "0")
    text = f"{digits[:-places]}.{digits[-places:]}".rstrip("0")
    return ("-" if num < 0 else "") + text


def _from_match(match: re.Match[str]) -> str | None:
    whole = match.group("int").replace(",", "")
    frac = match.group("frac")
    value = Fraction(f"{whole}.{frac}") if frac else Fraction(int(whole))
    den = match.group("den")
    if den is not None:
        if int(den) == 0:
            return None
        value /= int(den)
    if match.group("sign"):
        value = -value
    return _canonical(value)


def normalize_number(text: str) -> str | None:
    """The canonical spelling of the first number in ``text`` (module docstring), or None.

    ``normalize_number("$1,234.50")`` → ``"1234.5"``; ``normalize_number("3.0")`` → ``"3"``.
    """
    match = _NUMBER_RE.search(text)
    return None if match is None else _from_match(match)


def extract_final_number(text: str, *, strict: bool = False) -> str | None:
    """The final answer of a math solution as a canonical number string, or None if it has none.

    Rules and normalisation in the module docstring: the number after the last ``####``; else the
    first number after the last "answer is" / "answer:"; else the last number. ``strict=True`` keeps
    rule 1 only (**[code]** the released KETCHUP evaluation: a prediction without ``#### N`` is
    invalid). Examples: ``"... #### 1,234"`` → ``"1234"``; ``"so the answer is $18."`` → ``"18"``;
    ``"The answer is 42 apples"`` → ``"42"``; ``"-3.50"`` → ``"-3.5"``; ``"no idea"`` → None.
    """
    hashes = list(_HASH_RE.finditer(text))
    if hashes:
        return _from_match(hashes[-1])
    if strict:
        return None
    markers = list(_ANSWER_RE.finditer(text))
    if markers:
        after = _NUMBER_RE.search(text, markers[-1].end())
        if after is not None:
            return _from_match(after)
    numbers = list(_NUMBER_RE.finditer(text))
    return _from_match(numbers[-1]) if numbers else None


class AnswerAccuracy(Metric):
    """Fraction of predictions whose final number (:func:`extract_final_number`) equals the
    reference's; a prediction or reference without a number never counts as correct.

    ``update(preds, targets)``: one reference string per prediction (GSM8K's full solution
    ``"... #### 42"`` or a bare ``"42"``). ``strict`` applies to predictions only (references are
    always read with all three rules): ``True`` counts a prediction only when it ends its solution
    with ``#### N``, as the released KETCHUP evaluation does **[code]**.

    States ``correct`` and ``total`` are integer ``sum`` states, so the value under DDP equals the
    single-process value. On a **0–1** scale (the paper reports %). With no input the score is 0.
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    correct: Tensor
    total: Tensor

    def __init__(self, strict: bool = False, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.strict = strict
        self.add_state("correct", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Sequence[str], targets: Sequence[str]) -> None:  # type: ignore[override]
        """Count ``preds[i]`` correct when its final number equals ``targets[i]``'s."""
        if isinstance(preds, str) or isinstance(targets, str) or len(preds) != len(targets):
            raise ValueError(
                "preds and targets must be sequences of strings of equal length; got "
                f"{type(preds).__name__} of {len(preds)} and {type(targets).__name__} of {len(targets)}"
            )
        hits = 0
        for pred, target in zip(preds, targets):
            gold = extract_final_number(target)
            hits += gold is not None and extract_final_number(pred, strict=self.strict) == gold
        self.correct += hits
        self.total += len(preds)

    def compute(self) -> Tensor:
        """``correct / total`` as a float32 scalar (0 when nothing was added)."""
        total = int(self.total)
        value = int(self.correct) / total if total else 0.0
        return torch.tensor(value, dtype=torch.float32, device=self.correct.device)

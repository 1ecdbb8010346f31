"""The text formats of ranking inputs, and the relevance prompt a ``decoder-prompt`` ranker reads.

Kept beside the models (not the collators that build the text) because a model directory records
its format and prompt (:mod:`kdlab.models.served`) and an export's card prints them.
"""

from __future__ import annotations

from typing import Any, Literal

__all__ = ["PROMPT_ANSWERS", "REASON_PREFIX", "RELEVANCE_PROMPT", "TEXT_FORMATS", "TextFormat", "prompt_answer_ids"]

#: The text formats of ranking inputs (:class:`RankingCollator`).
TextFormat = Literal["cross-encoder", "decoder", "decoder-prompt"]
TEXT_FORMATS: tuple[str, ...] = ("cross-encoder", "decoder", "decoder-prompt")

#: The ``decoder-prompt`` text: a relevance question whose answer is one token, scored at the
#: prompt's last position (the ``:`` after ``Answer``); no EOS is appended.
RELEVANCE_PROMPT = ("Query: {query}\nDocument: {document}\n"
                    "Is the document relevant to the query? Answer yes or no.\nAnswer:")
#: What precedes an LLM's reason appended after a ``decoder`` ranking input (RRA-GPT's training rows).
REASON_PREFIX = " reason: "
#: Spellings of the (yes, no) answer tried in order by :func:`prompt_answer_ids`.
PROMPT_ANSWERS: tuple[tuple[str, str], ...] = ((" yes", " no"), ("yes", "no"), (" Yes", " No"), ("Yes", "No"))


def prompt_answer_ids(tokenizer: Any) -> tuple[int, int, str, str]:
    """``(yes_id, no_id, yes_spelling, no_spelling)``: the answer tokens of :data:`RELEVANCE_PROMPT`.

    The first pair of :data:`PROMPT_ANSWERS` whose two spellings are one token each (SmolLM2:
    ``" yes"`` / ``" no"``). A tokenizer without such a pair (kdlab's small sample tokenizer splits
    ``" yes"`` into ``" y" + "es"``) falls back to the *first* token of ``" yes"`` and ``" no"``: the
    logit of starting the answer with each word.
    """
    def ids(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    for yes, no in PROMPT_ANSWERS:
        y, n = ids(yes), ids(no)
        if len(y) == 1 and len(n) == 1 and y != n:
            return y[0], n[0], yes, no
    yes, no = PROMPT_ANSWERS[0]
    y, n = ids(yes), ids(no)
    if not y or not n or y[0] == n[0]:
        raise ValueError(f"the tokenizer cannot tell the answers {yes!r} and {no!r} apart by their first token")
    return y[0], n[0], tokenizer.convert_ids_to_tokens(y[0]), tokenizer.convert_ids_to_tokens(n[0])

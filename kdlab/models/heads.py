"""Score heads: last-token scoring for decoder rankers, and RRADistill's Term Control Layer.

``LastTokenScore`` (DisRanker / RankLLaMA): ``s(q, d) = w · h_last + b`` where ``h_last`` is the
last-layer hidden state of the final non-padding token (the appended EOS; in the ``decoder-prompt``
text format the relevance prompt's last token, see :meth:`LastTokenScore.init_from_answers`).

``TermControlLayer`` (RRADistill, arXiv 2410.18097) — **our reading** of the paper, which names the
layer and says it injects term-matching signals and can be dropped at inference but does not give
its exact form here: Token Selection keeps the query tokens plus the document tokens whose id also
occurs in the query; one extra multi-head attention layer runs over the encoder's last hidden
states with keys/values restricted to the selected positions; its output at the selected positions
is mean-pooled and mapped to an auxiliary scalar score. It is a training-time auxiliary head only.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

__all__ = [
    "last_token_pool", "last_token_index", "LastTokenScore", "select_term_tokens", "TermControlLayer",
    "DecoderRanker", "SequenceClassificationRanker",
]


def last_token_index(attention_mask: Tensor) -> Tensor:
    """Index ``[B]`` of the last position with ``attention_mask == 1`` in each row.

    ``argmax_t (t · mask_t)``: right padding gives ``len − 1``, left padding gives ``T − 1``; a row
    with no real token gives 0. Never assumes the last column is real.
    """
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * positions).argmax(dim=1)


def last_token_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Hidden state ``[B, H]`` of each row's final non-padding token (``hidden [B, T, H]``)."""
    idx = last_token_index(attention_mask)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]


class LastTokenScore(nn.Module):
    """``s = Linear(H → 1)(last_token_pool(hidden, attention_mask))``, shape ``[B]``.

    The bias starts at 0. Rank losses (hinge, RankNet, listwise) are shift-invariant and never move
    it, so a random start would only add an arbitrary constant to every teacher label, and a
    standard ``*ForSequenceClassification`` export (whose ``score`` layer has no bias) could not
    reproduce the scores exactly. (The weight's random draw is unchanged.)
    """

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.dense = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.dense.bias)

    @torch.no_grad()
    def init_from_answers(self, output_embeddings: nn.Module, yes_id: int, no_id: int) -> None:
        """Start the head at the LM's own yes/no judgement: ``w = E_out[yes] − E_out[no]`` and
        ``b = b_out[yes] − b_out[no]`` (0 for an LM head without bias, as Llama / SmolLM2).

        ``output_embeddings`` is the causal LM's ``get_output_embeddings()`` (the LM-head rows, tied to
        the input embeddings or not). A base decoder's last hidden state is taken after the final norm,
        so on the same hidden state ``s = logit(yes) − logit(no)`` of the untouched causal LM
        (up to float rounding; not for LMs that transform logits after the head, e.g. Gemma-2's soft cap).
        """
        weight = output_embeddings.weight
        diff = weight[yes_id].float() - weight[no_id].float()
        self.dense.weight.copy_(diff.reshape(1, -1).to(device=self.dense.weight.device, dtype=self.dense.weight.dtype))
        bias = getattr(output_embeddings, "bias", None)
        shift = float(bias[yes_id].float() - bias[no_id].float()) if bias is not None else 0.0
        self.dense.bias.fill_(shift)

    def forward(self, hidden_states: Tensor, attention_mask: Tensor) -> Tensor:
        pooled = last_token_pool(hidden_states, attention_mask)
        return self.dense(pooled.to(self.dense.weight.dtype)).squeeze(-1)


def select_term_tokens(
    input_ids: Tensor,
    token_type_ids: Tensor,
    attention_mask: Tensor,
    special_ids: Iterable[int],
) -> Tensor:
    """Token Selection (RRADistill, our reading), boolean ``[B, T]``.

    ``query_t = mask_t ∧ type_t = 0 ∧ id_t ∉ special``;
    ``doc_t = mask_t ∧ type_t = 1 ∧ id_t ∉ special ∧ ∃u: query_u ∧ id_u = id_t``;
    selected = ``query ∨ doc`` (exact sub-word id match within the same row).
    """
    real = attention_mask.bool()
    specials = torch.tensor(sorted(set(int(i) for i in special_ids)), device=input_ids.device, dtype=input_ids.dtype)
    not_special = ~torch.isin(input_ids, specials) if specials.numel() else torch.ones_like(real)
    content = real & not_special
    query = content & (token_type_ids == 0)
    doc = content & (token_type_ids == 1)
    same_id = input_ids.unsqueeze(2) == input_ids.unsqueeze(1)  # [B, T(doc), T(query)]
    matches_query = (same_id & query.unsqueeze(1)).any(dim=2)
    return query | (doc & matches_query)


class TermControlLayer(nn.Module):
    """Auxiliary term-matching score head over the encoder's last hidden states (training only).

    With ``X = hidden [B, T, H]`` and selection ``S [B, T]``:
    ``Z = LayerNorm(X + MHA(X, X, X; key_padding_mask = ¬S))``,
    ``p = Σ_t S_t Z_t / Σ_t S_t``, ``s_tcl = Linear(H → 1)(p)``.
    A row with nothing selected falls back to its first token (``[CLS]``) so attention is defined.
    """

    def __init__(self, hidden_size: int, num_heads: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        if hidden_size % num_heads != 0:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by tcl heads {num_heads}")
        self.attention = nn.MultiheadAttention(hidden_size, num_heads, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(hidden_size)
        self.score = nn.Linear(hidden_size, 1)

    def forward(self, hidden_states: Tensor, selection: Tensor) -> Tensor:
        sel = selection.bool().clone()
        empty = ~sel.any(dim=1)
        sel[:, 0] |= empty
        x = hidden_states.to(self.score.weight.dtype)
        attended, _ = self.attention(x, x, x, key_padding_mask=~sel, need_weights=False)
        z = self.norm(x + attended)
        w = sel.unsqueeze(-1).to(z.dtype)
        pooled = (z * w).sum(dim=1) / w.sum(dim=1).clamp(min=1.0)
        return self.score(pooled).squeeze(-1)


class DecoderRanker(nn.Module):
    """The served decoder ranker: a base decoder (no LM head) + :class:`LastTokenScore`.

    ``forward(input_ids, attention_mask) -> [B]`` scores (any padding side) at each row's last real
    token: the appended EOS (``decoder`` text) or the relevance prompt's last token (``decoder-prompt``).
    ``text_format`` names how its inputs are built (:class:`kdlab.data.collators.RankingCollator`).
    """

    text_format = "decoder"

    def __init__(self, backbone: nn.Module, hidden_size: int, text_format: str = "decoder") -> None:
        super().__init__()
        if text_format not in ("decoder", "decoder-prompt"):
            raise ValueError(f"a decoder ranker reads 'decoder' or 'decoder-prompt' text, got {text_format!r}")
        self.backbone = backbone
        self.head = LastTokenScore(hidden_size)
        self.text_format = text_format

    def forward(self, input_ids: Tensor, attention_mask: Tensor, **_: Tensor) -> Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(hidden, attention_mask)


class SequenceClassificationRanker(nn.Module):
    """Wraps a ``*ForSequenceClassification`` model with one label (a cross-encoder such as
    ``BertForSequenceClassification``: ``[CLS]`` → pooler → linear) as ``forward(...) -> [B]``."""

    text_format = "cross-encoder"

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None, **_: Tensor
    ) -> Tensor:
        kwargs = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits[:, 0]

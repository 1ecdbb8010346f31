"""Last-token pooling under left/right padding; term selection on a hand example; TCL shape/masking."""

from __future__ import annotations

import torch
import transformers

from kdlab.models.heads import (
    DecoderRanker,
    LastTokenScore,
    SequenceClassificationRanker,
    TermControlLayer,
    last_token_index,
    last_token_pool,
    select_term_tokens,
)


def test_last_token_index_left_and_right() -> None:
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert last_token_index(right).tolist() == [2, 4, 0]
    assert last_token_index(left).tolist() == [4, 4]
    hidden = torch.arange(2 * 5 * 1).float().view(2, 5, 1)
    assert last_token_pool(hidden, right[:2]).view(-1).tolist() == [2.0, 9.0]


def test_last_token_score_identical_under_left_and_right_padding() -> None:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0,
    )
    model = transformers.LlamaModel(cfg).eval()
    head = LastTokenScore(16)
    seqs = [[5, 6, 7, 8, 9], [11, 12, 13]]
    t = 5
    right = torch.tensor([s + [0] * (t - len(s)) for s in seqs])
    right_mask = torch.tensor([[1] * len(s) + [0] * (t - len(s)) for s in seqs])
    left = torch.tensor([[0] * (t - len(s)) + s for s in seqs])
    left_mask = torch.tensor([[0] * (t - len(s)) + [1] * len(s) for s in seqs])
    with torch.no_grad():
        s_right = head(model(input_ids=right, attention_mask=right_mask).last_hidden_state, right_mask)
        s_left = head(model(input_ids=left, attention_mask=left_mask).last_hidden_state, left_mask)
        # naive "-1" pooling is wrong under right padding: it would read a pad position
        naive = head.dense(model(input_ids=right, attention_mask=right_mask).last_hidden_state[:, -1]).squeeze(-1)
    assert s_right.shape == (2,)
    assert torch.allclose(s_right, s_left, atol=1e-5)
    assert not torch.allclose(naive[1], s_right[1], atol=1e-5)


def test_select_term_tokens_hand_example() -> None:
    # [CLS]=1 [SEP]=2 [PAD]=0 ; query "7 8" ; doc "9 8 7 8 3" ; one row padded
    ids = torch.tensor([
        [1, 7, 8, 2, 9, 8, 7, 8, 3, 2],
        [1, 4, 2, 4, 5, 2, 0, 0, 0, 0],
    ])
    types = torch.tensor([
        [0, 0, 0, 0, 1, 1, 1, 1, 1, 1],
        [0, 0, 0, 1, 1, 1, 0, 0, 0, 0],
    ])
    mask = (ids != 0).long()
    sel = select_term_tokens(ids, types, mask, special_ids=[0, 1, 2])
    assert sel[0].nonzero().view(-1).tolist() == [1, 2, 5, 6, 7]
    assert sel[1].nonzero().view(-1).tolist() == [1, 3]


def test_term_control_layer_ignores_unselected_positions() -> None:
    torch.manual_seed(0)
    tcl = TermControlLayer(8, num_heads=2).eval()
    hidden = torch.randn(2, 6, 8)
    sel = torch.tensor([[0, 1, 1, 0, 1, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    out = tcl(hidden, sel)
    assert out.shape == (2,) and torch.isfinite(out).all()
    changed = hidden.clone()
    changed[0, [0, 3, 5]] = 100.0  # unselected positions of row 0
    assert torch.allclose(tcl(changed, sel)[0], out[0], atol=1e-5)
    changed[0, 1] = 5.0  # a selected position matters
    assert not torch.allclose(tcl(changed, sel)[0], out[0], atol=1e-5)


def test_rankers_name_their_text_format() -> None:
    """A ranker module says how its (query, document) inputs are built, so labeling and evaluation
    encode them the way it was trained (kdlab.data.collators.RankingCollator)."""
    assert DecoderRanker.text_format == "decoder"
    assert SequenceClassificationRanker.text_format == "cross-encoder"
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, pad_token_id=0)
    ranker = DecoderRanker(transformers.LlamaModel(cfg), 16).eval()
    assert ranker.text_format == "decoder"
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        scores = ranker(input_ids=ids, attention_mask=mask)
        alone = ranker(input_ids=ids[1:, :2], attention_mask=mask[1:, :2])
    assert scores.shape == (2,) and torch.allclose(scores[1:], alone, atol=1e-5)

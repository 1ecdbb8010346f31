"""RankDistillStudent's fast forward (packed BERT / length chunks) is the default and computes what
the plain padded forward computes: same scores, same gradients, same parameter update."""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch

from kdlab.data.datamodules import RankingDataModule
from kdlab.data import sample_path
from kdlab.stages import rank_distill_student as rds
from kdlab.stages.rank_distill_student import RankDistillStudent

# Two layers, so the layer loop is exercised; no dropout where updates are compared.
BERT = "tiny-bert-h32"
BERT_CONFIG: dict[str, Any] = {"num_hidden_layers": 2}
NO_DROPOUT: dict[str, Any] = {**BERT_CONFIG, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def _batch(text_format: str = "cross-encoder", tokenizer: str = "tiny-bert", batch_size: int = 6) -> dict[str, Any]:
    """A training batch of the embedded sample: lengths vary a lot within it (padded to the longest)."""
    dm = RankingDataModule(train=sample_path("ranking_train.jsonl"), val=sample_path("ranking_val.jsonl"),
                           tokenizer=tokenizer, text_format=text_format, num_negatives=3, batch_size=batch_size,
                           max_length=96, seed=0)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    lengths = batch["attention_mask"].sum(dim=1)
    assert int(lengths.min()) < int(lengths.max()) == batch["attention_mask"].shape[1]
    batch["teacher_scores"] = batch["labels"] + 0.3 * torch.randn(batch["labels"].shape,
                                                                  generator=torch.Generator().manual_seed(0))
    return batch


def _pair(config: dict[str, Any], common: dict[str, Any] | None = None,
          **fast: Any) -> tuple[RankDistillStudent, RankDistillStudent]:
    """(plain, fast) students with the same weights; ``common`` options go to both."""
    L.seed_everything(0)
    common = {"lr": 1e-3, **(common or {})}
    plain = RankDistillStudent(backbone=BERT, backbone_config=config, length_chunk_size=0, **common)
    fast_stage = RankDistillStudent(backbone=BERT, backbone_config=config, **common, **fast)
    fast_stage.load_state_dict(plain.state_dict())
    return plain, fast_stage


def test_fast_path_is_the_default() -> None:
    stage = RankDistillStudent(backbone=BERT)
    assert stage.hparams.length_chunk_size > 0 and stage.hparams.packed_forward is True
    assert rds._packable(stage.ranker.model)
    RankDistillStudent.check_options({})  # a config without the options is valid


@pytest.mark.parametrize("fast", [{}, {"length_chunk_size": 4}, {"packed_forward": False, "length_chunk_size": 4}],
                         ids=["default", "packed-4", "chunks-4"])
def test_fast_scores_equal_the_plain_forward(fast: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    batch = _batch()
    plain, stage = _pair(BERT_CONFIG, **fast)
    calls = {"packed": 0, "chunked": 0}
    for name, key in (("_packed_bert", "packed"), ("length_chunked_scores", "chunked")):
        original = getattr(rds, name)

        def counted(*args: Any, _original: Any = original, _key: str = key, **kw: Any) -> Any:
            calls[_key] += 1
            return _original(*args, **kw)

        monkeypatch.setattr(rds, name, counted)
    plain.eval()
    stage.eval()
    with torch.no_grad():
        want = plain.score_groups(batch)
        got = stage.score_groups(batch)
    assert calls["packed" if fast.get("packed_forward", True) else "chunked"] == 1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_packed_forward_matches_on_a_multi_layer_bert_with_real_sizes() -> None:
    """A MiniLM-shaped (H384, 12 heads) random BERT: bigger sums, same scores."""
    config = {"hidden_size": 384, "num_attention_heads": 12, "intermediate_size": 1536, "num_hidden_layers": 2}
    batch = _batch()
    plain, stage = _pair(config, length_chunk_size=5)
    plain.eval()
    stage.eval()
    with torch.no_grad():
        torch.testing.assert_close(stage.score_groups(batch), plain.score_groups(batch), rtol=1e-5, atol=1e-5)


def _one_step(stage: RankDistillStudent, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """One optimizer step of the stage's own optimizer (AdamW) on ``batch``; returns the update."""
    before = {k: v.detach().clone() for k, v in stage.named_parameters()}
    optimizer = stage.configure_optimizers()["optimizer"]
    stage.batch_loss(batch).backward()
    optimizer.step()
    return {k: v.detach() - before[k] for k, v in stage.named_parameters()}


@pytest.mark.parametrize("fast", [{}, {"packed_forward": False, "length_chunk_size": 4},
                                  {"common": {"use_tcl": True, "tcl_heads": 2}}],
                         ids=["packed", "chunks", "packed-tcl"])
def test_fast_training_step_gives_the_same_gradients_and_update(fast: dict[str, Any]) -> None:
    """Dropout off (its masks are drawn over other shapes on the fast path: same distribution,
    another draw), plain vs fast: same gradients, and the same AdamW step to ~1e-6."""
    batch = _batch()
    common = {"alpha": 1.0, "beta": 1.0, "gt_weight": 0.5, **fast.pop("common", {})}
    plain, stage = _pair(NO_DROPOUT, common=common, **fast)
    plain.train()
    stage.train()
    want = _one_step(plain, batch)
    got = _one_step(stage, batch)
    grads_plain = {k: p.grad for k, p in plain.named_parameters()}
    for key, param in stage.named_parameters():
        if grads_plain[key] is None:
            assert param.grad is None or not param.grad.any(), key
            continue
        torch.testing.assert_close(param.grad, grads_plain[key], rtol=1e-4, atol=1e-6, msg=key)
    # AdamW's first step is lr · g / (|g| + eps) per entry: a sign where |g| >> eps, so compare the
    # update only where the gradient is clearly non-zero (elsewhere both are ~0 or noise-level).
    for key, delta in got.items():
        g = grads_plain[key]
        if g is None:
            continue
        clear = g.abs() > 1e-6
        torch.testing.assert_close(delta[clear], want[key][clear], rtol=0, atol=1e-6, msg=key)


def test_left_padded_rows_take_the_plain_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    batch = _batch()
    plain, stage = _pair(BERT_CONFIG)
    mask = batch["attention_mask"]
    left = {k: torch.stack([torch.roll(row, int(row.numel() - m.sum())) for row, m in zip(batch[k], mask)])
            for k in ("input_ids", "attention_mask", "token_type_ids")}
    monkeypatch.setattr(rds, "_packed_bert", lambda *a, **k: pytest.fail("left padding must not be packed"))
    stage.eval()
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(stage(**left), plain(**left))


def test_decoder_student_length_chunks_equal_the_plain_forward() -> None:
    batch = _batch(text_format="decoder", tokenizer="tiny-llama-h32")
    L.seed_everything(0)
    plain = RankDistillStudent(backbone="tiny-llama-h32", architecture="decoder", length_chunk_size=0)
    stage = RankDistillStudent(backbone="tiny-llama-h32", architecture="decoder", length_chunk_size=4)
    stage.load_state_dict(plain.state_dict())
    assert not rds._packable(stage.ranker)
    plain.eval()
    stage.eval()
    with torch.no_grad():
        torch.testing.assert_close(stage.score_groups(batch), plain.score_groups(batch), rtol=1e-5, atol=1e-5)


def test_fused_adamw_is_the_default_and_steps_like_the_loop() -> None:
    """``fused_adamw`` (default): the same AdamW update as PyTorch's per-tensor loop, to float rounding."""
    batch = _batch()
    L.seed_everything(0)
    fused = RankDistillStudent(backbone=BERT, backbone_config=NO_DROPOUT, lr=1e-3, warmup_steps=3)
    loop = RankDistillStudent(backbone=BERT, backbone_config=NO_DROPOUT, lr=1e-3, warmup_steps=3, fused_adamw=False)
    loop.load_state_dict(fused.state_dict())
    configs = {"fused": fused.configure_optimizers(), "loop": loop.configure_optimizers()}
    assert configs["fused"]["optimizer"].defaults["fused"] is True
    assert not configs["loop"]["optimizer"].defaults.get("fused")
    for _ in range(3):  # lr warm-up steps through the scheduler too
        for stage, config in ((fused, configs["fused"]), (loop, configs["loop"])):
            stage.zero_grad()
            stage.batch_loss(batch).backward()
            config["optimizer"].step()
            config["lr_scheduler"]["scheduler"].step()
    assert [g["lr"] for g in configs["fused"]["optimizer"].param_groups] == \
        [g["lr"] for g in configs["loop"]["optimizer"].param_groups]
    assert [len(g["params"]) for g in configs["fused"]["optimizer"].param_groups] == \
        [len(g["params"]) for g in configs["loop"]["optimizer"].param_groups]
    for (key, a), (_, b) in zip(fused.named_parameters(), loop.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=key)


def test_dropout_of_the_packed_forward_keeps_1_minus_p_and_scales() -> None:
    drop = torch.nn.Dropout(0.1)
    x = torch.ones(1_000_000)
    torch.manual_seed(0)
    y = rds._dropout(x, drop)
    assert abs(float((y == 0).float().mean()) - 0.1) < 2e-3
    values = torch.unique(y).tolist()
    assert len(values) == 2 and values[0] == 0.0 and values[1] == pytest.approx(1 / 0.9)
    assert abs(float(y.mean()) - 1.0) < 3e-3
    drop.eval()
    assert rds._dropout(x, drop) is x


def test_packed_forward_without_token_types_and_in_training_mode() -> None:
    batch = _batch()
    plain, stage = _pair(BERT_CONFIG)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    plain.eval()
    stage.eval()
    with torch.no_grad():
        torch.testing.assert_close(stage(**inputs), plain(**inputs), rtol=1e-5, atol=1e-5)
    stage.train()  # dropout on: other scores, finite, and a gradient for every weight that the scores use
    scores = stage(**inputs)
    assert torch.isfinite(scores).all() and not torch.allclose(scores, plain(**inputs))
    scores.sum().backward()
    assert all(p.grad is not None for n, p in stage.ranker.named_parameters() if "token_type" not in n)


def test_sharding_strategies_take_the_length_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """FSDP / DeepSpeed gather a layer's weights when the layer module is called, which the packed
    forward never does: under them the stage falls back to length chunks (which call the model)."""
    stage = RankDistillStudent(backbone=BERT, backbone_config=BERT_CONFIG)
    assert not stage._sharded()

    class FSDPStrategy:  # the name is what is checked
        pass

    monkeypatch.setattr(stage, "_trainer", type("T", (), {"strategy": FSDPStrategy()})(), raising=False)
    assert stage._sharded()
    monkeypatch.setattr(rds, "_packed_bert", lambda *a, **k: pytest.fail("sharded parameters must not be packed"))
    batch = _batch()
    stage.eval()
    with torch.no_grad():
        assert stage.score_groups(batch).shape == batch["doc_mask"].shape

"""TeacherRankSFT's CPU-budget options: training only the last layers, and the training-time clock
logged beside each validation (learning curves against seconds, scripts/plot_curves.py)."""

from __future__ import annotations

import pytest
import torch

from kdlab.errors import ConfigError
from kdlab.stages import TeacherRankSFT


def _group_batch(n_groups: int = 2, n_docs: int = 3, length: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 200, (n_groups * n_docs, length), generator=g)
    labels = torch.zeros(n_groups, n_docs)
    labels[:, 0] = 1.0
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
            "doc_mask": torch.ones(n_groups, n_docs, dtype=torch.bool)}


def test_train_last_layers_updates_only_the_top_layers_and_the_head() -> None:
    torch.manual_seed(0)
    stage = TeacherRankSFT(backbone="tiny-llama", backbone_config={"num_hidden_layers": 3}, loss="listwise",
                           train_last_layers=1, lr=1e-2)
    names = {n for n, p in stage.named_parameters() if p.requires_grad}
    assert names and all(n.startswith(("ranker.backbone.layers.2.", "ranker.backbone.norm.", "ranker.head."))
                         for n in names)
    assert any(n.startswith("ranker.head.") for n in names)
    before = {n: p.detach().clone() for n, p in stage.named_parameters()}
    optimizer = stage.configure_optimizers()["optimizer"]
    stage.batch_loss(_group_batch()).backward()
    optimizer.step()
    changed = {n for n, p in stage.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= names
    assert all(p.grad is None for n, p in stage.named_parameters() if n not in names)  # no gradient below


@pytest.mark.parametrize("kwargs,match", [
    ({"train_last_layers": 1, "lora_rank": 4}, "lora_rank=0"),
])
def test_train_last_layers_with_lora_fails_in_one_line(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as err:
        TeacherRankSFT(backbone="tiny-llama-h32", **kwargs)
    assert "\n" not in str(err.value)


def test_out_of_range_layer_count_names_the_limit() -> None:
    with pytest.raises(ValueError, match=r"\[1, 2\]"):
        TeacherRankSFT(backbone="tiny-llama", train_last_layers=3)


def test_training_seconds_are_logged_with_validation() -> None:
    import lightning as L

    torch.manual_seed(0)
    stage = TeacherRankSFT(backbone="tiny-llama-h32", loss="listwise")
    batch = {**_group_batch(), "query_index": torch.arange(2)}
    data = torch.utils.data.DataLoader([batch] * 4, batch_size=None)
    trainer = L.Trainer(max_steps=4, val_check_interval=2, limit_val_batches=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", num_sanity_val_steps=0)
    trainer.fit(stage, train_dataloaders=data, val_dataloaders=torch.utils.data.DataLoader([batch], batch_size=None))
    seconds = float(trainer.callback_metrics["time/train_s"])
    assert 0 < seconds < 60 and "val/ndcg@10" in trainer.callback_metrics


def test_num_layers_keeps_the_first_layers_and_the_final_norm(tmp_path) -> None:
    """A 3-layer LLM cut to its first 2 layers scores from norm(h_2) of the uncut model, and its
    export reloads as the same 2-layer ranker (config, weights and scores)."""
    from kdlab.models.served import load_rank_teacher

    torch.manual_seed(0)
    full = TeacherRankSFT(backbone="tiny-llama", backbone_config={"num_hidden_layers": 3}, loss="listwise")
    cut = TeacherRankSFT(backbone="tiny-llama", backbone_config={"num_hidden_layers": 3}, num_layers=2,
                         loss="listwise")
    cut.load_state_dict({k: v for k, v in full.state_dict().items() if ".layers.2." not in k})
    assert len(cut.ranker.backbone.layers) == 2 and cut.ranker.backbone.config.num_hidden_layers == 2
    batch = _group_batch()
    full.eval(), cut.eval()
    with torch.no_grad():
        hidden = full.ranker.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                      output_hidden_states=True).hidden_states[2]
        expected = full.ranker.head(full.ranker.backbone.norm(hidden), batch["attention_mask"])
        scores = cut(batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(scores, expected.reshape(scores.shape))
    assert not torch.allclose(scores, full(batch["input_ids"], batch["attention_mask"]).detach())

    cut.export_pretrained(str(tmp_path / "model"))
    reloaded = load_rank_teacher(str(tmp_path / "model"))
    assert len(reloaded.backbone.layers) == 2
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]),
                                   scores)


def test_num_layers_out_of_range_fails_in_one_line() -> None:
    with pytest.raises(ConfigError, match=r"num_layers: expected an integer in \[1, 2\].*got 3") as err:
        TeacherRankSFT(backbone="tiny-llama", num_layers=3)
    assert "\n" not in str(err.value)


def test_length_chunked_forward_scores_and_trains_like_the_padded_one() -> None:
    """``length_chunk_size``: rows sorted by length and run in chunks cut to their longest row give
    the padded forward's scores and gradients (right padding, the decoder collator's layout)."""
    torch.manual_seed(0)
    plain = TeacherRankSFT(backbone="tiny-llama", loss="listwise", lora_rank=4)
    chunked = TeacherRankSFT(backbone="tiny-llama", loss="listwise", lora_rank=4, length_chunk_size=2)
    chunked.load_state_dict(plain.state_dict())
    batch = _group_batch(n_groups=2, n_docs=3, length=9)
    lengths = torch.tensor([9, 3, 5, 7, 2, 6])
    batch["attention_mask"] = (torch.arange(9)[None, :] < lengths[:, None]).long()
    for stage in (plain, chunked):
        stage.eval()
        stage.batch_loss(batch).backward()
    torch.testing.assert_close(chunked.score_groups(batch), plain.score_groups(batch), rtol=1e-5, atol=1e-5)
    grads = {n: p.grad for n, p in plain.named_parameters() if p.grad is not None}
    assert grads
    for name, param in chunked.named_parameters():
        if name in grads:
            torch.testing.assert_close(param.grad, grads[name], rtol=1e-4, atol=1e-6)
    with pytest.raises(ConfigError, match="length_chunk_size: expected an integer >= 0, got -1"):
        TeacherRankSFT.check_options({"length_chunk_size": -1})


def test_linear_lr_schedule_warms_up_then_decays_to_zero_at_the_last_step() -> None:
    from kdlab.stages._common import linear_warmup

    factor = linear_warmup(2, total_steps=6)
    assert [factor(s) for s in range(7)] == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0])
    assert [linear_warmup(2)(s) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]  # constant: as before
    with pytest.raises(ConfigError, match=r"lr_schedule: expected one of \['constant', 'linear'\], got 'cosine'"):
        TeacherRankSFT.check_options({"lr_schedule": "cosine"})
    from kdlab.stages import RankDistillStudent

    with pytest.raises(ConfigError, match="lr_schedule"):
        RankDistillStudent.check_options({"lr_schedule": "cosine"})


def test_linear_lr_schedule_spans_the_trainers_steps() -> None:
    import lightning as L

    torch.manual_seed(0)
    stage = TeacherRankSFT(backbone="tiny-llama-h32", loss="listwise", lr=1e-2, warmup_steps=1, lr_schedule="linear")
    batch = {**_group_batch(), "query_index": torch.arange(2)}
    data = torch.utils.data.DataLoader([batch] * 4, batch_size=None)
    rates = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):  # type: ignore[no-untyped-def]
            rates.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[Record()], limit_val_batches=0)
    trainer.fit(stage, train_dataloaders=data)
    assert rates == pytest.approx([1e-2, 1e-2, 1e-2 * 2 / 3, 1e-2 * 1 / 3])


def test_head_lr_puts_the_score_head_in_its_own_groups() -> None:
    stage = TeacherRankSFT(backbone="tiny-llama-h32", loss="listwise", lora_rank=4, lr=1e-4, head_lr=1e-2)
    optimizer = stage.configure_optimizers()["optimizer"]
    names = {id(p): n for n, p in stage.named_parameters()}
    by_lr: dict[float, set[str]] = {}
    for group in optimizer.param_groups:
        by_lr.setdefault(group["lr"], set()).update(names[id(p)] for p in group["params"])
    assert by_lr[1e-2] == {"ranker.head.dense.weight", "ranker.head.dense.bias"}
    assert by_lr[1e-4] and all("lora_" in n for n in by_lr[1e-4])
    decay = {g["weight_decay"] for g in optimizer.param_groups if g["lr"] == 1e-2}
    assert decay == {0.0, 0.01}  # the head's weight decays, its bias does not
    with pytest.raises(ConfigError, match="head_lr: expected a learning rate > 0 or null, got 0"):
        TeacherRankSFT.check_options({"head_lr": 0})

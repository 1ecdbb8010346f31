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

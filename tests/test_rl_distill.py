"""RLDistillKStep: rollouts, teacher scoring alignment, PG/CE/KD objectives, vocab checks, enc-dec."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from helpers_rl import (
    TINY,
    MemoryLogger,
    cpu_trainer,
    loader,
    make_stage,
    make_teacher,
    seq2seq_batches,
)
from transformers import GenerationConfig

from kdlab.losses.returns import induced_rewards, kstep_returns
from kdlab.metrics.generation import TaskMetrics
from kdlab.models.backbones import (
    VocabularyMismatchError,
    assert_same_vocabulary,
    load_backbone,
    load_tokenizer,
    pad_token_id,
)
from kdlab.models.served import freeze


def _sampling_config(max_new_tokens: int, **extra: Any) -> GenerationConfig:
    """What the stage asks ``generate`` for when it samples (temperature 1, no top-k/top-p), written
    out independently of the stage, with the per-step logits returned."""
    tok = load_tokenizer("tiny-llama")
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                            pad_token_id=pad_token_id(tok), eos_token_id=[tok.eos_token_id], use_cache=True,
                            output_logits=True, return_dict_in_generate=True, **extra)


def test_rollout_logprobs_match_generate() -> None:
    stage = make_stage(sampler="hf-generate")
    batch = seq2seq_batches(2, 2)[0]
    torch.manual_seed(5)
    out = stage.student.generate(input_ids=batch["prompt_input_ids"].repeat_interleave(2, 0),
                                 attention_mask=batch["prompt_attention_mask"].repeat_interleave(2, 0),
                                 generation_config=_sampling_config(6))
    torch.manual_seed(5)
    ro = stage.rollout(batch["prompt_input_ids"], batch["prompt_attention_mask"])
    p = batch["prompt_input_ids"].shape[1]
    assert torch.equal(ro.actions, out.sequences[:, p:])
    gen_logp = torch.log_softmax(torch.stack(out.logits, 1), -1).gather(-1, ro.actions.unsqueeze(-1)).squeeze(-1)
    lp = stage.student_action_logprobs(ro)
    assert torch.allclose(lp[ro.action_mask], gen_logp[ro.action_mask], atol=1e-5)
    assert lp[~ro.action_mask].eq(0).all()


@pytest.mark.parametrize("sampler", ["kdlab", "hf-generate"])
def test_rollout_mask_stops_at_first_stop_token_and_layout(sampler: str) -> None:
    first = make_stage(sampler=sampler, max_new_tokens=12)
    batch = seq2seq_batches(4, 4)[0]
    torch.manual_seed(5)
    free = first.rollout(batch["prompt_input_ids"], batch["prompt_attention_mask"])
    # A random tiny model rarely emits its EOS: make the two most frequent sampled tokens the stop
    # tokens of a second, identically initialised stage (eos_token_ids: several stop tokens).
    counts = torch.bincount(free.actions.flatten())
    stops = counts.topk(2).indices.tolist()
    pad = pad_token_id(first.tokenizer)
    stage = make_stage(sampler=sampler, max_new_tokens=12, eos_token_ids=stops)
    torch.manual_seed(5)
    ro = stage.rollout(batch["prompt_input_ids"], batch["prompt_attention_mask"])
    assert ro.actions.shape[0] == 8 and ro.actions.shape[1] <= 12
    hit = [next((i for i, t in enumerate(row) if t in stops), None) for row in ro.actions.tolist()]
    assert any(h is not None and h < ro.actions.shape[1] - 1 for h in hit)  # a row stops early
    for row, m, h in zip(ro.actions.tolist(), ro.action_mask.tolist(), hit):
        end = h if h is not None else len(row) - 1
        assert m == [i <= end for i in range(len(row))]
        assert all(t == pad for t in row[end + 1:])  # pad after the stop token, as generate lays it out
    p = ro.prompt_ids.shape[1]
    assert torch.equal(ro.full_ids[:, p:], ro.actions) and torch.equal(ro.full_mask[:, p:], ro.action_mask.long())
    # Up to its first stop token a row is the stage-without-stop-tokens' row (same seed, same weights).
    for i, h in enumerate(hit):
        n = (h + 1) if h is not None else ro.actions.shape[1]
        assert ro.actions[i, :n].tolist() == free.actions[i, :n].tolist()


def test_teacher_scoring_is_padding_invariant() -> None:
    """Batched teacher logits (prompts left-padded to different widths, continuations padded after
    their stop token) equal an unpadded per-row forward pass."""
    batch = seq2seq_batches(2, 2)[0]
    pad = pad_token_id(load_tokenizer("tiny-llama"))
    prompt_ids, prompt_mask = batch["prompt_input_ids"].clone(), batch["prompt_attention_mask"].clone()
    prompt_ids[1, :5], prompt_mask[1, :5] = pad, 0  # row 1: a shorter, left-padded prompt
    first = make_stage(num_samples_per_prompt=1, max_new_tokens=8)
    torch.manual_seed(3)
    free = first.rollout(prompt_ids, prompt_mask)
    stop = int(free.actions[0, 2])  # row 0 stops at its third token at the latest
    stage = make_stage(num_samples_per_prompt=1, max_new_tokens=8, eos_token_ids=[stop])
    teacher = make_teacher()
    stage.attach_teacher(teacher)
    torch.manual_seed(3)
    ro = stage.rollout(prompt_ids, prompt_mask)
    assert not ro.action_mask[0].all() and ro.prompt_mask[1, 0] == 0  # padding on both sides
    batched = stage.teacher_action_logits(ro)
    for i in range(2):
        prompt = prompt_ids[i][prompt_mask[i].bool()]
        acts = ro.actions[i][ro.action_mask[i]]
        ids = torch.cat([prompt, acts]).unsqueeze(0)
        logits = teacher(input_ids=ids).logits[0, len(prompt) - 1:-1]
        assert torch.allclose(batched[i, : len(acts)], logits, atol=1e-4)


def test_pg_training_steps_and_validation() -> None:
    stage = make_stage(k=2, objective="pg")
    stage.attach_teacher(make_teacher())
    before = {k: v.clone() for k, v in stage.student.state_dict().items()}
    batches = seq2seq_batches(4, 2)
    trainer = cpu_trainer(4, limit_val_batches=1, num_sanity_val_steps=0)
    trainer.fit(stage, train_dataloaders=loader(batches), val_dataloaders=loader(batches[:1]))
    m = trainer.callback_metrics
    for key in ("train/reward_mean", "train/return_mean", "train/pg_loss", "train/gen_tokens_per_s",
                "val/rouge1", "val/rouge2", "val/rougeL", "val/bleu", "val/gen_length", "val/teacher_logprob"):
        assert key in m and torch.isfinite(m[key]), key
    assert "train/ce_loss" not in m
    assert m["train/gen_tokens_per_s"] > 0
    assert m["val/teacher_logprob"] < 0  # a log-probability
    assert 0 < m["val/gen_length"] <= 6
    assert not all(torch.equal(before[k], v) for k, v in stage.student.state_dict().items())
    assert not any(k.startswith("teacher") for k in stage.state_dict())
    assert all(not n.startswith("teacher") for n, _ in stage.named_parameters())


def test_validation_and_test_have_their_own_metrics() -> None:
    stage = make_stage(objective="ce")
    assert isinstance(stage.val_metrics, TaskMetrics) and isinstance(stage.test_metrics, TaskMetrics)
    assert stage.val_metrics is not stage.test_metrics
    batches = seq2seq_batches(4, 2)
    stage.validation_step(batches[0], 0)
    stage.validation_step(batches[1], 1)
    assert stage.val_metrics.gen_length.update_count == 2 and stage.test_metrics.gen_length.update_count == 0
    val = stage.val_metrics.compute()
    assert set(val) == {"rouge1", "rouge2", "rougeL", "bleu", "accuracy", "gen_length"}  # no teacher: no teacher_logprob
    stage.test_step(batches[0], 0)
    assert stage.test_metrics.gen_length.update_count == 1
    stage.val_metrics.reset()
    assert stage.val_metrics.gen_length.update_count == 0 and stage.test_metrics.gen_length.update_count == 1
    # Through a Trainer: `test` logs test/*, and the test epoch leaves its metrics reset.
    trainer = cpu_trainer(1)
    results = trainer.test(stage, dataloaders=loader(batches[:1]), verbose=False)
    assert {"test/rouge1", "test/rougeL", "test/bleu", "test/gen_length"} <= set(results[0])
    assert not any(key.startswith("val/") for key in results[0])
    assert stage.test_metrics.gen_length.update_count == 0


def test_pg_loss_uses_kstep_returns() -> None:
    """The stage's PG loss equals the loss rebuilt from its own pieces (same rollout)."""
    stage = make_stage(k=3, baseline="none", num_samples_per_prompt=1)
    stage.attach_teacher(make_teacher())
    batch = seq2seq_batches(2, 2)[0]
    torch.manual_seed(9)
    loss = stage.batch_loss(batch)
    torch.manual_seed(9)
    ro = stage.rollout(batch["prompt_input_ids"], batch["prompt_attention_mask"])
    g = kstep_returns(induced_rewards(stage.teacher_action_logits(ro), ro.actions, ro.action_mask, k=3), ro.action_mask, 3)
    lp = stage.student_action_logprobs(ro)
    expected = -(g * lp)[ro.action_mask].sum() / ro.action_mask.sum()
    assert torch.allclose(loss, expected, atol=1e-5)
    # K = 1 returns differ from K = 3 ones on this rollout: the comparison above depends on K.
    g1 = kstep_returns(induced_rewards(stage.teacher_action_logits(ro), ro.actions, ro.action_mask, k=1), ro.action_mask, 1)
    assert not torch.allclose(-(g1 * lp)[ro.action_mask].sum() / ro.action_mask.sum(), expected, atol=1e-5)


def test_batch_loss_fresh_rollouts_no_state_change() -> None:
    stage = make_stage(baseline="running-mean")
    stage.attach_teacher(make_teacher())
    batch = seq2seq_batches(2, 2)[0]
    a, b = stage.batch_loss(batch), stage.batch_loss(batch)
    assert a.requires_grad and not torch.equal(a, b)
    assert torch.isnan(stage.return_running_mean)  # only training_step updates the running mean


def test_vocab_mismatch_error_names_both_sizes() -> None:
    stage = make_stage()
    teacher = load_backbone(TINY, "causal-lm", config={"vocab_size": 1000})
    with pytest.raises(VocabularyMismatchError, match=r"1000.*4096"):
        stage.attach_teacher(teacher)
    assert stage.teacher is None


def test_needs_teacher_by_objective() -> None:
    assert make_stage(objective="pg").needs_teacher
    assert make_stage(objective="kd").needs_teacher
    assert not make_stage(objective="ce").needs_teacher
    assert make_stage(objective="ce", teacher_for_eval=True).needs_teacher
    stage = make_stage(objective="pg")
    with pytest.raises(RuntimeError, match="teacher"):
        stage.batch_loss(seq2seq_batches(2, 2)[0])


def test_ce_objective_matches_manual_cross_entropy_and_trains() -> None:
    stage = make_stage(objective="ce", lr=1e-2)
    batch = seq2seq_batches(2, 2)[0]
    loss = stage.batch_loss(batch)
    logits = stage.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    manual = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100)
    assert torch.allclose(loss, manual, atol=1e-5)
    trainer = cpu_trainer(5, limit_val_batches=0)
    trainer.fit(stage, train_dataloaders=loader([batch]))
    assert stage.batch_loss(batch) < loss


def test_kd_objective_zero_for_identical_teacher_and_positive_otherwise() -> None:
    stage = make_stage(objective="kd", kd_temperature=2.0)
    batch = seq2seq_batches(2, 2)[0]
    clone = load_backbone(TINY, "causal-lm")
    clone.load_state_dict(stage.student.state_dict())
    stage.attach_teacher(freeze(clone))
    assert stage.batch_loss(batch).abs().item() < 1e-6
    teacher = make_teacher()
    stage.attach_teacher(teacher)
    loss = stage.batch_loss(batch)
    # manual: τ² · mean over target tokens of KL(softmax(t/τ) ‖ softmax(s/τ))
    s = stage.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1] / 2
    t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1] / 2
    m = batch["labels"][:, 1:] != -100
    kl = (t.softmax(-1) * (t.log_softmax(-1) - s.log_softmax(-1))).sum(-1)
    assert loss.item() > 0
    assert loss.item() == pytest.approx(4 * kl[m].mean().item(), rel=1e-5)


def test_ce_warmup_then_pg() -> None:
    """``ce_warmup_steps=2``: the first two optimiser steps train CE on the references, then PG."""
    stage = make_stage(objective="pg", ce_warmup_steps=2)
    stage.attach_teacher(make_teacher())
    logger = MemoryLogger()
    trainer = cpu_trainer(4, limit_val_batches=0, logger=logger, log_every_n_steps=1)
    trainer.fit(stage, train_dataloaders=loader(seq2seq_batches(8, 2)))
    records = dict(logger.records)  # step -> metrics (Lightning re-sends a key's last value later on)
    assert sorted(records) == [0, 1, 2, 3]
    for step in (0, 1):
        assert "train/pg_loss" not in records[step]
        assert records[step]["train/loss"] == records[step]["train/ce_loss"]
    for step in (2, 3):
        assert records[step]["train/loss"] == records[step]["train/pg_loss"]
        assert records[step]["train/loss"] != records[step]["train/ce_loss"]


def test_lr_warmup_uses_the_shared_optimizer() -> None:
    """``warmup_steps`` is the learning-rate warmup: lr · min(1, (step + 1) / warmup_steps) per step."""
    stage = make_stage(objective="ce", lr=1e-2, warmup_steps=4)
    config = stage.configure_optimizers()
    assert isinstance(config["optimizer"], torch.optim.AdamW)
    assert config["lr_scheduler"]["interval"] == "step"
    lrs: list[float] = []

    class RecordLR(L.Callback):
        def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer = cpu_trainer(6, limit_val_batches=0, callbacks=[RecordLR()])
    trainer.fit(make_stage(objective="ce", lr=1e-2, warmup_steps=4), train_dataloaders=loader(seq2seq_batches(4, 2)))
    assert lrs == pytest.approx([2.5e-3, 5e-3, 7.5e-3, 1e-2, 1e-2, 1e-2])


def test_export_pretrained_roundtrip(tmp_path: Path) -> None:
    stage = make_stage(objective="ce")
    out = tmp_path / "student"
    stage.export_pretrained(str(out))
    stage.export_pretrained(str(out))  # overwrite in place
    reloaded = load_backbone(str(out), "causal-lm")
    ids = torch.tensor([[5, 10, 20]])
    assert torch.allclose(reloaded(input_ids=ids).logits, stage.student(input_ids=ids).logits)
    assert (out / "tokenizer.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["student"]


def test_encoder_decoder_student(tmp_path: Path) -> None:
    from transformers import T5Config, T5ForConditionalGeneration

    tok = load_tokenizer("tiny-llama")
    pad = pad_token_id(tok)
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=2,
                   pad_token_id=pad, eos_token_id=tok.eos_token_id, decoder_start_token_id=pad)
    T5ForConditionalGeneration(cfg).save_pretrained(tmp_path / "t5")

    def t5_stage(objective: str) -> Any:
        return make_stage(backbone=str(tmp_path / "t5"), tokenizer="tiny-llama", k=2, objective=objective)

    stage = t5_stage("pg")
    assert stage.is_encoder_decoder
    stage.attach_teacher(make_teacher())
    batch = seq2seq_batches(2, 2)[0]
    assert stage.student.training  # loaded for training (dropout on), as every backbone is
    stage.student.eval()  # rollouts generate in eval mode
    torch.manual_seed(4)
    out = stage.student.generate(input_ids=batch["prompt_input_ids"].repeat_interleave(2, 0),
                                 attention_mask=batch["prompt_attention_mask"].repeat_interleave(2, 0),
                                 generation_config=_sampling_config(6, decoder_start_token_id=pad))
    torch.manual_seed(4)
    ro = stage.rollout(batch["prompt_input_ids"], batch["prompt_attention_mask"])
    assert torch.equal(ro.actions, out.sequences[:, 1:])
    gen_logp = torch.log_softmax(torch.stack(out.logits, 1), -1).gather(-1, ro.actions.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(stage.student_action_logprobs(ro)[ro.action_mask], gen_logp[ro.action_mask], atol=1e-5)
    loss = stage.batch_loss(batch)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in stage.student.parameters())
    ce = t5_stage("ce")
    assert not ce.needs_teacher and torch.isfinite(ce.batch_loss(batch)) and ce.batch_loss(batch) > 0
    kd = t5_stage("kd")
    kd.attach_teacher(make_teacher())
    assert torch.isfinite(kd.batch_loss(batch)) and kd.batch_loss(batch) > 0


def test_student_built_from_teacher_layers_shares_vocabulary(tmp_path: Path) -> None:
    teacher = load_backbone(TINY, "causal-lm", config={"num_hidden_layers": 3})
    teacher.save_pretrained(tmp_path / "teacher")
    load_tokenizer("tiny-llama").save_pretrained(tmp_path / "teacher")
    stage = make_stage(backbone=str(tmp_path / "teacher"), backbone_keep_layers=[0, 2])
    assert stage.student.config.num_hidden_layers == 2
    assert stage.student.training
    layer_1 = stage.student.model.layers[1].self_attn.q_proj.weight
    assert torch.equal(layer_1, teacher.model.layers[2].self_attn.q_proj.weight)
    assert not torch.equal(layer_1, teacher.model.layers[1].self_attn.q_proj.weight)
    assert_same_vocabulary(load_tokenizer(str(tmp_path / "teacher")), stage.tokenizer)  # same vocabulary
    stage.attach_teacher(freeze(teacher))  # same logit width: accepted
    assert stage.teacher is teacher

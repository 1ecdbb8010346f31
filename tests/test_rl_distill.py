"""RLDistillKStep: rollouts, teacher scoring alignment, PG/CE/KD objectives, vocab checks, enc-dec."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from kdlab.data import sample_path
from kdlab.losses.returns import induced_rewards, kstep_returns
from kdlab.models.backbones import VocabularyMismatchError, load_backbone, load_tokenizer
from kdlab.stages.rl_distill_kstep import RLDistillKStep

TINY = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
        "intermediate_size": 64}


def seq2seq_batches(n: int = 4, batch_size: int = 2, max_src: int = 12, max_tgt: int = 8) -> list[dict[str, Any]]:
    """Causal-LM + generation batches from the embedded seq2seq sample (the DEVELOPERS.md batch contract)."""
    tok = load_tokenizer("tiny-llama")
    rows = [json.loads(line) for line in Path(sample_path("seq2seq_train.jsonl")).read_text().splitlines()[:n]]
    batches = []
    for start in range(0, n, batch_size):
        chunk = rows[start:start + batch_size]
        prompts = [[tok.bos_token_id] + tok(r["source"], add_special_tokens=False)["input_ids"][:max_src] for r in chunk]
        targets = [tok(r["target"], add_special_tokens=False)["input_ids"][:max_tgt] + [tok.eos_token_id] for r in chunk]
        p_len = max(len(p) for p in prompts)
        f_len = max(len(p) + len(t) for p, t in zip(prompts, targets))
        b = len(chunk)
        batch = {
            "input_ids": torch.full((b, f_len), tok.pad_token_id), "attention_mask": torch.zeros(b, f_len, dtype=torch.long),
            "labels": torch.full((b, f_len), -100),
            "prompt_input_ids": torch.full((b, p_len), tok.pad_token_id),
            "prompt_attention_mask": torch.zeros(b, p_len, dtype=torch.long),
            "target_text": [r["target"] for r in chunk],
        }
        for i, (p, t) in enumerate(zip(prompts, targets)):
            full = p + t
            batch["input_ids"][i, :len(full)] = torch.tensor(full)
            batch["attention_mask"][i, :len(full)] = 1
            batch["labels"][i, len(p):len(full)] = torch.tensor(t)
            batch["prompt_input_ids"][i, p_len - len(p):] = torch.tensor(p)
            batch["prompt_attention_mask"][i, p_len - len(p):] = 1
        batches.append(batch)
    return batches


def make_stage(**kwargs: Any) -> RLDistillKStep:
    L.seed_everything(0)
    args: dict[str, Any] = {"student_config": TINY, "max_new_tokens": 6, "lr": 1e-3, "num_samples_per_prompt": 2}
    args.update(kwargs)
    return RLDistillKStep(**args)


def make_teacher() -> torch.nn.Module:
    torch.manual_seed(123)
    return load_backbone("tiny-llama", "causal-lm", config=TINY).eval().requires_grad_(False)


def loader(batches: list[dict[str, Any]]) -> torch.utils.data.DataLoader:
    """Pre-collated batches as a DataLoader (a bare list would be read as several dataloaders)."""
    return torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)


def _trainer(max_steps: int, **kwargs: Any) -> L.Trainer:
    return L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, **kwargs)


def test_rollout_logprobs_match_generate() -> None:
    stage = make_stage(sampler="hf-generate")
    batch = seq2seq_batches(2, 2)[0]
    gc = stage._generation_config(False, 6)
    gc.output_logits, gc.return_dict_in_generate = True, True
    torch.manual_seed(5)
    out = stage.student.generate(input_ids=batch["prompt_input_ids"].repeat_interleave(2, 0),
                                 attention_mask=batch["prompt_attention_mask"].repeat_interleave(2, 0), generation_config=gc)
    torch.manual_seed(5)
    ro = stage.rollout(batch["prompt_input_ids"], batch["prompt_attention_mask"])
    p = batch["prompt_input_ids"].shape[1]
    assert torch.equal(ro.actions, out.sequences[:, p:])
    gen_logp = torch.log_softmax(torch.stack(out.logits, 1), -1).gather(-1, ro.actions.unsqueeze(-1)).squeeze(-1)
    lp = stage.student_action_logprobs(ro)
    assert torch.allclose(lp[ro.action_mask], gen_logp[ro.action_mask], atol=1e-5)


@pytest.mark.parametrize("sampler", ["kdlab", "hf-generate"])
def test_rollout_mask_stops_at_first_eos_and_layout(sampler: str) -> None:
    stage = make_stage(sampler=sampler, max_new_tokens=12)
    batch = seq2seq_batches(4, 4)[0]
    torch.manual_seed(5)
    first = stage.rollout(batch["prompt_input_ids"], batch["prompt_attention_mask"])
    # A random tiny model rarely emits its EOS: make the most frequent sampled token the EOS.
    eos, pad = int(first.actions.flatten().mode().values), stage._pad_id
    stage._eos_ids = [eos]
    torch.manual_seed(5)
    ro = stage.rollout(batch["prompt_input_ids"], batch["prompt_attention_mask"])
    assert ro.actions.shape[0] == 8 and ro.actions.shape[1] <= 12
    assert any(eos in row for row in ro.actions.tolist())  # the EOS branch is exercised
    for row, m in zip(ro.actions.tolist(), ro.action_mask.tolist()):
        first = row.index(eos) if eos in row else len(row) - 1
        assert m == [i <= first for i in range(len(row))]
        assert all(t == pad for t in row[first + 1:])  # pad after EOS, as generate lays it out
    p = ro.prompt_ids.shape[1]
    assert torch.equal(ro.full_ids[:, p:], ro.actions) and torch.equal(ro.full_mask[:, p:], ro.action_mask.long())


def test_teacher_scoring_is_padding_invariant() -> None:
    """Batched (left-padded) teacher logits equal an unpadded per-row forward pass."""
    stage = make_stage(num_samples_per_prompt=1)
    teacher = make_teacher()
    stage.attach_teacher(teacher)
    batch = seq2seq_batches(2, 2)[0]
    torch.manual_seed(3)
    ro = stage.rollout(batch["prompt_input_ids"], batch["prompt_attention_mask"])
    batched = stage.teacher_action_logits(ro)
    for i in range(2):
        prompt = batch["prompt_input_ids"][i][batch["prompt_attention_mask"][i].bool()]
        acts = ro.actions[i][ro.action_mask[i]]
        ids = torch.cat([prompt, acts]).unsqueeze(0)
        logits = teacher(input_ids=ids).logits[0, len(prompt) - 1:-1]
        assert torch.allclose(batched[i, : len(acts)], logits, atol=1e-4)


def test_pg_training_steps_and_validation() -> None:
    stage = make_stage(k=2, objective="pg")
    stage.attach_teacher(make_teacher())
    before = {k: v.clone() for k, v in stage.student.state_dict().items()}
    batches = seq2seq_batches(4, 2)
    trainer = _trainer(4, limit_val_batches=1, num_sanity_val_steps=0)
    trainer.fit(stage, train_dataloaders=loader(batches), val_dataloaders=loader(batches[:1]))
    m = trainer.callback_metrics
    for key in ("train/reward_mean", "train/return_mean", "train/pg_loss", "train/gen_tokens_per_s",
                "val/rouge1", "val/rouge2", "val/rougeL", "val/bleu", "val/teacher_logprob"):
        assert key in m and torch.isfinite(m[key]), key
    assert m["train/gen_tokens_per_s"] > 0
    assert m["val/teacher_logprob"] < 0  # a log-probability
    assert not all(torch.equal(before[k], v) for k, v in stage.student.state_dict().items())
    assert not any(k.startswith("teacher") for k in stage.state_dict())
    assert all(not n.startswith("teacher") for n, _ in stage.named_parameters())


def test_pg_loss_uses_kstep_returns() -> None:
    """The stage's PG loss equals the loss rebuilt from its own pieces (same rollout)."""
    stage = make_stage(k=3, baseline="none", num_samples_per_prompt=1)
    stage.attach_teacher(make_teacher())
    batch = seq2seq_batches(2, 2)[0]
    torch.manual_seed(9)
    loss, stats = stage._pg_loss(batch)
    torch.manual_seed(9)
    ro = stage.rollout(batch["prompt_input_ids"], batch["prompt_attention_mask"])
    g = kstep_returns(induced_rewards(stage.teacher_action_logits(ro), ro.actions, ro.action_mask, k=3), ro.action_mask, 3)
    lp = stage.student_action_logprobs(ro)
    expected = -(g * lp)[ro.action_mask].sum() / ro.action_mask.sum()
    assert torch.allclose(loss, expected, atol=1e-5)


def test_batch_loss_fresh_rollouts_no_state_change() -> None:
    stage = make_stage(baseline="running-mean")
    stage.attach_teacher(make_teacher())
    batch = seq2seq_batches(2, 2)[0]
    a, b = stage.batch_loss(batch), stage.batch_loss(batch)
    assert a.requires_grad and not torch.equal(a, b)
    assert torch.isnan(stage.return_running_mean)  # only training_step updates the running mean


def test_vocab_mismatch_error_names_both_sizes() -> None:
    stage = make_stage()
    teacher = load_backbone("tiny-llama", "causal-lm", config={**TINY, "vocab_size": 1000})
    with pytest.raises(VocabularyMismatchError, match=r"1000.*4096"):
        stage.attach_teacher(teacher)
    assert stage.teacher is None


def test_needs_teacher_by_objective() -> None:
    assert make_stage(objective="pg").needs_teacher
    assert make_stage(objective="kd").needs_teacher
    assert not make_stage(objective="ce").needs_teacher
    stage = make_stage(objective="pg")
    with pytest.raises(RuntimeError, match="TeacherLoader"):
        stage.batch_loss(seq2seq_batches(2, 2)[0])


def test_ce_objective_matches_manual_cross_entropy_and_trains() -> None:
    stage = make_stage(objective="ce", lr=1e-2)
    batch = seq2seq_batches(2, 2)[0]
    loss = stage.batch_loss(batch)
    logits = stage.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    manual = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100)
    assert torch.allclose(loss, manual, atol=1e-5)
    trainer = _trainer(5, limit_val_batches=0)
    trainer.fit(stage, train_dataloaders=loader([batch]))
    assert stage.batch_loss(batch) < loss


def test_kd_objective_zero_for_identical_teacher_and_positive_otherwise() -> None:
    stage = make_stage(objective="kd", kd_temperature=2.0)
    batch = seq2seq_batches(2, 2)[0]
    clone = load_backbone("tiny-llama", "causal-lm", config=TINY)
    clone.load_state_dict(stage.student.state_dict())
    stage.attach_teacher(clone)
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


def test_warmup_ce_then_pg() -> None:
    stage = make_stage(objective="pg", warmup_steps_ce=2)
    stage.attach_teacher(make_teacher())
    trainer = _trainer(2, limit_val_batches=0)
    trainer.fit(stage, train_dataloaders=loader(seq2seq_batches(4, 2)))
    assert "train/ce_loss" in trainer.callback_metrics and "train/pg_loss" not in trainer.callback_metrics
    assert stage._active_objective() == "pg"


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
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=2,
                   pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id)
    T5ForConditionalGeneration(cfg).save_pretrained(tmp_path / "t5")
    stage = make_stage(student=str(tmp_path / "t5"), student_config=None, tokenizer="tiny-llama", k=2)
    assert stage.is_encoder_decoder
    stage.attach_teacher(make_teacher())
    batch = seq2seq_batches(2, 2)[0]
    gc = stage._generation_config(False, 6)
    gc.output_logits, gc.return_dict_in_generate = True, True
    torch.manual_seed(4)
    out = stage.student.generate(input_ids=batch["prompt_input_ids"].repeat_interleave(2, 0),
                                 attention_mask=batch["prompt_attention_mask"].repeat_interleave(2, 0), generation_config=gc)
    torch.manual_seed(4)
    ro = stage.rollout(batch["prompt_input_ids"], batch["prompt_attention_mask"])
    assert torch.equal(ro.actions, out.sequences[:, 1:])
    gen_logp = torch.log_softmax(torch.stack(out.logits, 1), -1).gather(-1, ro.actions.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(stage.student_action_logprobs(ro)[ro.action_mask], gen_logp[ro.action_mask], atol=1e-5)
    loss = stage.batch_loss(batch)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in stage.student.parameters())
    for objective in ("ce", "kd"):
        stage.hparams.objective = objective
        assert torch.isfinite(stage.batch_loss(batch))


def test_student_built_from_teacher_layers_shares_vocabulary(tmp_path: Path) -> None:
    teacher = load_backbone("tiny-llama", "causal-lm", config={**TINY, "num_hidden_layers": 3})
    teacher.save_pretrained(tmp_path / "teacher")
    load_tokenizer("tiny-llama").save_pretrained(tmp_path / "teacher")
    stage = make_stage(student=str(tmp_path / "teacher"), student_config=None, student_keep_layers=[0, 2])
    assert stage.student.config.num_hidden_layers == 2
    assert stage.student.training
    layer_1 = stage.student.model.layers[1].self_attn.q_proj.weight
    assert torch.equal(layer_1, teacher.model.layers[2].self_attn.q_proj.weight)
    stage.attach_teacher(teacher, load_tokenizer("tiny-llama"))  # same vocabulary: accepted

"""KETCHUP's table as objectives of RLDistillKStep (SeqKD, KL, TVD, JS, LLMR / KETCHUP with the
released estimator), encoder-decoder teachers, and the paper's configs fast-run with tiny models.

Each objective's loss is rebuilt by hand from the stage's own pieces (the teacher's greedy output
from ``generate``, the pure losses of :mod:`kdlab.losses`) and compared, and its limit case checked
(a teacher identical to the student gives 0)."""

from __future__ import annotations

from typing import Any

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO
from helpers_rl import TINY, make_stage, make_teacher, seq2seq_batches
from transformers import GenerationConfig

from kdlab.errors import ConfigError
from kdlab.lightning_cli import run_lightning
from kdlab.losses.returns import induced_rewards, kstep_returns, kstep_returns_from_logits, policy_gradient_loss
from kdlab.models.backbones import load_backbone, load_tokenizer, pad_token_id
from kdlab.models.served import freeze, load_teacher

OFFICIAL = {"greedy_rollouts": True, "kstep_tail": "last-state", "pg_weight": "student-prob", "weight_clip": 50.0,
            "baseline": "none", "state_value": "max"}


def _teacher_greedy_reference(teacher: torch.nn.Module, batch: dict, max_new_tokens: int) -> torch.Tensor:
    """The teacher's greedy continuations by HF ``generate``, written independently of the stage."""
    tok = load_tokenizer("tiny-llama")
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                              pad_token_id=pad_token_id(tok), eos_token_id=[tok.eos_token_id])
    out = teacher.generate(input_ids=batch["prompt_input_ids"], attention_mask=batch["prompt_attention_mask"],
                           generation_config=config)
    return out[:, batch["prompt_input_ids"].shape[1]:]


def _identical_teacher(stage: torch.nn.Module) -> torch.nn.Module:
    clone = load_backbone(TINY, "causal-lm")
    clone.load_state_dict(stage.student.state_dict())
    return freeze(clone)


def test_teacher_outputs_are_greedy_generate_and_cached_once_per_prompt() -> None:
    stage = make_stage(objective="seqkd", max_new_tokens=6)
    teacher = make_teacher()
    stage.attach_teacher(teacher)
    batch = seq2seq_batches(2, 2)[0]
    ro = stage.teacher_rollout(batch["prompt_input_ids"], batch["prompt_attention_mask"])
    expected = _teacher_greedy_reference(teacher, batch, 6)
    assert torch.equal(ro.actions[ro.action_mask], expected[:, : ro.actions.shape[1]][ro.action_mask])
    assert len(stage._teacher_outputs) == 2
    calls = []
    handle = teacher.register_forward_hook(lambda *args: calls.append(1))
    again = stage.teacher_rollout(batch["prompt_input_ids"], batch["prompt_attention_mask"])
    handle.remove()
    assert calls == [] and torch.equal(again.actions, ro.actions)  # no second generation


def test_seqkd_is_cross_entropy_on_the_teacher_greedy_output() -> None:
    stage = make_stage(objective="seqkd", max_new_tokens=6)
    stage.attach_teacher(make_teacher())
    batch = seq2seq_batches(2, 2)[0]
    loss = stage.batch_loss(batch)
    ro = stage.teacher_rollout(batch["prompt_input_ids"], batch["prompt_attention_mask"])
    logits = stage.student(input_ids=ro.full_ids, attention_mask=ro.full_mask, position_ids=ro.position_ids).logits
    n, p = ro.actions.shape[1], ro.prompt_ids.shape[1]
    manual = F.cross_entropy(logits[:, p - 1: p - 1 + n][ro.action_mask], ro.actions[ro.action_mask])
    assert loss.item() == pytest.approx(manual.item(), rel=1e-5)


def test_kl_tvd_js_are_zero_for_an_identical_teacher_and_positive_otherwise() -> None:
    batch = seq2seq_batches(2, 2)[0]
    for objective in ("kl", "tvd", "js"):
        stage = make_stage(objective=objective, max_new_tokens=6)
        stage.attach_teacher(_identical_teacher(stage))
        assert stage.batch_loss(batch).abs().item() < 1e-5, objective
        stage = make_stage(objective=objective, max_new_tokens=6)
        stage.attach_teacher(make_teacher())
        loss = stage.batch_loss(batch)
        assert loss.item() > 0 and loss.requires_grad, objective


def test_kl_on_teacher_outputs_by_hand_and_tvd_averages_both_sequences() -> None:
    batch = seq2seq_batches(2, 2)[0]
    stage = make_stage(objective="kl", max_new_tokens=6, kd_temperature=2.0)
    stage.attach_teacher(make_teacher())
    loss = stage.batch_loss(batch)
    ro = stage.teacher_rollout(batch["prompt_input_ids"], batch["prompt_attention_mask"])
    s, t = stage.student_action_logits(ro) / 2, stage.teacher_action_logits(ro) / 2
    kl = (t.softmax(-1) * (t.log_softmax(-1) - s.log_softmax(-1))).sum(-1)
    assert loss.item() == pytest.approx(4 * kl[ro.action_mask].mean().item(), rel=1e-5)
    # TVD: ½ (mean over the student's sequence) + ½ (mean over the teacher's); greedy student
    stage = make_stage(objective="tvd", max_new_tokens=6, greedy_rollouts=True)
    stage.attach_teacher(make_teacher())
    loss = stage.batch_loss(batch)
    parts = []
    for ro in (stage.rollout(batch["prompt_input_ids"], batch["prompt_attention_mask"], greedy=True),
               stage.teacher_rollout(batch["prompt_input_ids"], batch["prompt_attention_mask"])):
        ps, pt = stage.student_action_logits(ro).softmax(-1), stage.teacher_action_logits(ro).softmax(-1)
        parts.append((0.5 * (ps - pt).abs().sum(-1))[ro.action_mask].mean())
    assert loss.item() == pytest.approx(0.5 * (parts[0] + parts[1]).item(), rel=1e-5)


def test_official_estimator_rebuilt_from_the_pure_functions() -> None:
    """greedy rollout → last-state K-step returns → clip(G·π) weight, no baseline."""
    batch = seq2seq_batches(2, 2)[0]
    stage = make_stage(objective="pg", k=2, max_new_tokens=6, **OFFICIAL)
    stage.attach_teacher(make_teacher())
    loss = stage.batch_loss(batch)
    ro = stage.rollout(batch["prompt_input_ids"], batch["prompt_attention_mask"], greedy=True)
    assert ro.actions.shape[0] == 2  # greedy: one continuation per prompt
    _, g = kstep_returns_from_logits(stage.teacher_action_logits(ro), ro.actions, ro.action_mask, k=2,
                                     kstep_tail="last-state")
    lp = stage.student_action_logprobs(ro)
    weight = (g * lp.detach().exp()).clamp(-50, 50)
    manual = -(weight * lp)[ro.action_mask].sum() / ro.action_mask.sum()
    assert loss.item() == pytest.approx(manual.item(), rel=1e-5, abs=1e-6)
    # the defaults (zero tail, REINFORCE) give another loss on the same greedy rollout
    ours = policy_gradient_loss(lp, kstep_returns_from_logits(stage.teacher_action_logits(ro), ro.actions,
                                                              ro.action_mask, k=2)[1], ro.action_mask, "none").loss
    assert not torch.isclose(ours, loss)
    assert torch.equal(stage.batch_loss(batch), loss)  # greedy: the same loss every call


@pytest.mark.parametrize("baseline", ["mean", "min-variance", "teacher-expected", "running-mean"])
def test_every_baseline_trains_a_step(baseline: str) -> None:
    stage = make_stage(objective="pg", k=2, max_new_tokens=4, baseline=baseline)
    stage.attach_teacher(make_teacher())
    loss = stage.training_step(seq2seq_batches(2, 2)[0], 0)
    loss.backward()
    assert torch.isfinite(loss) and any(p.grad is not None for p in stage.student.parameters())


@pytest.mark.parametrize("option,value,field", [
    ("weight_clip", 0.0, "weight_clip"), ("js_beta", 1.0, "js_beta"), ("reward_divisor", 0.0, "reward_divisor"),
    ("teacher_kl_weight", -0.1, "teacher_kl_weight"), ("start_kl_weight", -1.0, "start_kl_weight"),
    ("teacher_logit_normalization", "log-softmax", "teacher_logit_normalization"),  # with center_logits on
])
def test_bad_estimator_options_fail_in_one_line(option: str, value: float, field: str) -> None:
    with pytest.raises(ConfigError, match=f"model.init_args.{field}") as err:
        make_stage(**{option: value})
    assert "\n" not in str(err.value)


def test_encoder_decoder_teacher_scores_and_generates_for_both_student_kinds() -> None:
    """A T5 teacher: its logits predicting each action equal its own forward on [start] ⊕ actions;
    every objective runs for a T5 student and for a decoder-only one."""
    torch.manual_seed(1)
    teacher = load_teacher("tiny-t5", "causal-lm", config={"d_model": 32, "d_ff": 64, "num_layers": 1})
    batch = seq2seq_batches(2, 2)[0]
    for student in ("tiny-t5", TINY):
        for objective in ("pg", "seqkd", "kl", "tvd", "js", "kd"):
            stage = make_stage(backbone=student, objective=objective, k=2, max_new_tokens=5,
                               backbone_config={"d_model": 32, "d_ff": 64, "num_layers": 1} if student == "tiny-t5" else None)
            stage.attach_teacher(teacher)
            loss = stage.batch_loss(batch)
            loss.backward()
            assert torch.isfinite(loss), (student, objective)
    ro = stage.rollout(batch["prompt_input_ids"], batch["prompt_attention_mask"])
    start = torch.full_like(ro.actions[:, :1], teacher.config.decoder_start_token_id)
    with torch.no_grad():
        direct = teacher(input_ids=ro.prompt_ids, attention_mask=ro.prompt_mask,
                         decoder_input_ids=torch.cat([start, ro.actions[:, :-1]], 1)).logits
    got = stage.teacher_action_logits(ro)
    torch.testing.assert_close(got[ro.action_mask], direct[ro.action_mask], atol=1e-5, rtol=0)


def test_t5_teacher_to_t5_student_ketchup_fast_dev_run(tmp_path: Path) -> None:
    """The released XSum recipe's config, with tiny T5 models and the embedded sample."""
    run_dir = run_lightning([
        "fit", "--config", str(REPO / "experiments" / "ketchup" / "xsum_flan_t5.yaml"),
        "--model.init_args.backbone=tiny-t5", "--model.init_args.tokenizer=tiny-t5",
        "--data.init_args.tokenizer=tiny-t5", "--teacher.backbone=tiny-t5-h128", "--teacher.dtype=float32",
        "--teacher.quantization=null", "--data.init_args.train_path=null", "--data.init_args.val_path=null",
        "--data.init_args.test_path=null", "--data.init_args.max_source_length=32",
        "--model.init_args.max_new_tokens=6", "--data.init_args.eval_batch_size=4", "--trainer.fast_dev_run=1",
        "--trainer.accelerator=cpu", "--trainer.precision=32-true", f"--run.dir={tmp_path / 'run'}",
        "--trainer.logger=false",
    ])
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "finished"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert "train/pg_loss" in metrics and "val/rouge1" in metrics


def _rollout_kl(p_logits: torch.Tensor, q_logits: torch.Tensor, mask: torch.Tensor) -> float:
    """mean over valid positions of KL(softmax(p) ‖ softmax(q)), written out."""
    p, log_p, log_q = p_logits.softmax(-1), p_logits.log_softmax(-1), q_logits.log_softmax(-1)
    return (p * (log_p - log_q)).sum(-1)[mask].mean().item()


def _added_term_and_rollout(stage: Any, batch: dict[str, Any], option: str) -> tuple[float, Any]:
    """The loss with ``option`` on minus the loss with it set to 0, on one seeded rollout, and that rollout."""
    torch.manual_seed(4)
    with_term = stage.batch_loss(batch)
    setattr(stage.hparams, option, 0.0)
    torch.manual_seed(4)
    without = stage.batch_loss(batch)
    torch.manual_seed(4)
    return (with_term - without).item(), stage.rollout(batch["prompt_input_ids"], batch["prompt_attention_mask"])


def test_teacher_kl_regulariser_adds_beta_times_on_policy_forward_kl() -> None:
    """pg + β_T·KL(p_T ‖ π_θ) on the same rollout: the difference to β_T = 0 is β_T times the KL
    written out from the two models' logits."""
    stage = make_stage(objective="pg", k=2, max_new_tokens=5, baseline="none", teacher_kl_weight=0.5)
    stage.attach_teacher(make_teacher())
    added, ro = _added_term_and_rollout(stage, seq2seq_batches(2, 2)[0], "teacher_kl_weight")
    kl = _rollout_kl(stage.teacher_action_logits(ro), stage.student_action_logits(ro).detach(), ro.action_mask)
    assert kl > 0
    assert added == pytest.approx(0.5 * kl, rel=1e-4)


def test_start_kl_regulariser_is_zero_at_the_start_and_pulls_back_after_a_change() -> None:
    """KL(π_θ ‖ π_0): 0 while the student is its start; after the student
    moves, the term equals β_0 · the KL written out, and π_0 is not a parameter or in the checkpoint."""
    stage = make_stage(objective="pg", k=1, max_new_tokens=5, baseline="none", start_kl_weight=2.0)
    stage.attach_teacher(make_teacher())
    batch = seq2seq_batches(2, 2)[0]
    assert not any(name.startswith("start_policy") for name in stage.state_dict())
    assert all(not p.requires_grad for p in stage.start_policy.parameters())
    torch.manual_seed(4)
    ro = stage.rollout(batch["prompt_input_ids"], batch["prompt_attention_mask"])
    assert _rollout_kl(stage.student_action_logits(ro).detach(), stage.start_policy_action_logits(ro), ro.action_mask) \
        == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        stage.student.get_output_embeddings().weight.add_(0.05 * torch.randn_like(stage.student.get_output_embeddings().weight))
    added, ro = _added_term_and_rollout(stage, batch, "start_kl_weight")
    kl = _rollout_kl(stage.student_action_logits(ro).detach(), stage.start_policy_action_logits(ro), ro.action_mask)
    assert kl > 1e-4
    assert added == pytest.approx(2.0 * kl, rel=1e-4)


def test_log_softmax_normalisation_makes_the_return_the_teachers_continuation_loglik() -> None:
    """teacher_logit_normalization=log-softmax, state_value=logsumexp, K=1: G_t = Σ_{i≥t} log p_T(a_i|s_i)."""
    stage = make_stage(objective="pg", k=1, max_new_tokens=5, baseline="none", state_value="logsumexp",
                       center_logits=False, teacher_logit_normalization="log-softmax", num_samples_per_prompt=1)
    stage.attach_teacher(make_teacher())
    batch = seq2seq_batches(2, 2)[0]
    torch.manual_seed(4)
    loss = stage.batch_loss(batch)
    torch.manual_seed(4)
    ro = stage.rollout(batch["prompt_input_ids"], batch["prompt_attention_mask"])
    log_pt = stage.teacher_action_logits(ro).log_softmax(-1).gather(-1, ro.actions.unsqueeze(-1)).squeeze(-1)
    log_pt = log_pt.masked_fill(~ro.action_mask, 0.0)
    returns = log_pt.flip(-1).cumsum(-1).flip(-1)
    lp = stage.student_action_logprobs(ro).detach()
    expected = -(returns * lp)[ro.action_mask].sum() / ro.action_mask.sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_length_normalised_returns_enter_the_pg_loss() -> None:
    """return_normalization=length: the loss is −mean_t (G_t / (n − t)) log π on the same rollout."""
    stage = make_stage(objective="pg", k=2, max_new_tokens=5, baseline="none", return_normalization="length")
    stage.attach_teacher(make_teacher())
    batch = seq2seq_batches(2, 2)[0]
    torch.manual_seed(4)
    loss = stage.batch_loss(batch)
    torch.manual_seed(4)
    ro = stage.rollout(batch["prompt_input_ids"], batch["prompt_attention_mask"])
    returns = kstep_returns(induced_rewards(stage.teacher_action_logits(ro), ro.actions, ro.action_mask, k=2),
                            ro.action_mask, 2)
    remaining = ro.action_mask.long().flip(-1).cumsum(-1).flip(-1).clamp_min(1)
    lp = stage.student_action_logprobs(ro).detach()
    expected = -((returns / remaining) * lp)[ro.action_mask].sum() / ro.action_mask.sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)

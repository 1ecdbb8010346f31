"""CUDA paths: the 8-bit teacher on the GPU rank, a KETCHUP step on the GPU, the sampling loop on CUDA.

Skipped without a GPU (CI has none); run on a GPU machine with ``python -m pytest -q tests/test_gpu.py``.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from helpers_rl import loader, seq2seq_batches

from kdlab.callbacks import TeacherLoader
from kdlab.models.backbones import load_backbone, load_tokenizer, pad_token_id
from kdlab.models.sampling import sample_causal
from kdlab.stages.rl_distill_kstep import RLDistillKStep

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# The KETCHUP teacher: tiny-llama resized to H256 / I512 (no named tiny model has that size);
# the student: tiny-llama itself (H64, 2 layers).
TEACHER_OVERRIDES = {"hidden_size": 256, "intermediate_size": 512}
STUDENT = "tiny-llama"


def test_8bit_teacher_lands_on_the_gpu_and_matches_fp32(tmp_path: Path) -> None:
    import bitsandbytes as bnb

    from _ddp_teacher_script import TEACHER, TEACHER_CONFIG, DistillToy, toy_loader

    loaders = {q: TeacherLoader(TEACHER, config=TEACHER_CONFIG, quantization=q) for q in (None, "8bit")}
    for sub, teacher_loader in loaders.items():
        L.Trainer(accelerator="gpu", devices=1, max_steps=1, logger=False, enable_progress_bar=False,
                  enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path / str(sub)),
                  callbacks=[teacher_loader]).fit(DistillToy(), train_dataloaders=toy_loader())
    fp32, int8 = loaders[None].teacher, loaders["8bit"].teacher
    layer = int8.model.layers[0].mlp.up_proj
    assert isinstance(layer, bnb.nn.Linear8bitLt) and layer.weight.device.type == "cuda"
    assert layer.weight.dtype == torch.int8
    assert loaders["8bit"].memory_footprint_bytes < 0.6 * loaders[None].memory_footprint_bytes
    ids = next(iter(toy_loader()))[0].cuda()
    with torch.no_grad():
        a, b = fp32(input_ids=ids).logits.float(), int8(input_ids=ids).logits.float()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9
    assert torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1)).min() >= 0.99


def test_ketchup_pg_steps_on_the_gpu_with_an_8bit_teacher() -> None:
    import bitsandbytes as bnb

    L.seed_everything(0)
    stage = RLDistillKStep(backbone=STUDENT, k=2, max_new_tokens=8, num_samples_per_prompt=2, lr=1e-3)
    before = {n: p.detach().clone() for n, p in stage.student.named_parameters()}
    teacher_loader = TeacherLoader("tiny-llama", config=TEACHER_OVERRIDES, quantization="8bit")
    student_devices: list[str] = []  # read during training: Lightning moves the module back to the CPU at teardown
    record = L.pytorch.callbacks.LambdaCallback(
        on_train_batch_end=lambda trainer, module, *_: student_devices.append(next(module.parameters()).device.type))
    trainer = L.Trainer(accelerator="gpu", devices=1, max_steps=3, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, callbacks=[teacher_loader, record])
    trainer.fit(stage, train_dataloaders=loader(seq2seq_batches(12, 4)))
    assert trainer.global_step == 3 and student_devices == ["cuda"] * 3
    q_proj = stage.teacher.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear8bitLt) and q_proj.weight.device.type == "cuda"
    moved = [n for n, p in stage.student.named_parameters() if not torch.equal(p.detach().cpu(), before[n])]
    assert moved, "three PG steps left every student parameter unchanged"
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in seq2seq_batches(4, 4)[0].items()}
    loss = stage.cuda().batch_loss(batch)
    assert loss.device.type == "cuda" and torch.isfinite(loss)


def test_greedy_sampling_loop_equals_generate_on_cuda() -> None:
    torch.manual_seed(0)
    model = load_backbone(STUDENT, "causal-lm").cuda().eval()
    pad = pad_token_id(load_tokenizer("tiny-llama"))
    ids = torch.randint(5, model.config.vocab_size, (6, 11), device="cuda")
    mask = torch.ones_like(ids)
    mask[2, :5] = 0
    ours = sample_causal(model, ids, mask, 16, eos_ids=[], pad_id=pad, greedy=True)
    theirs = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False,
                            pad_token_id=pad, eos_token_id=None)[:, ids.shape[1]:]
    assert torch.equal(ours, theirs)
    # The sampled path's distribution on CUDA: tests/test_sampling.py runs its frequency test on
    # every available device, CUDA included.


def test_labeling_on_cuda_in_bf16_and_8bit_agrees_with_fp32(tmp_path: Path) -> None:
    """`kdlab label` on cuda:0: bf16 and 8-bit teachers score like the fp32 one (same ranking, close scores)."""
    import json

    from kdlab.data import sample_path
    from kdlab.labeling import score_file
    from kdlab.stages.teacher_rank_sft import TeacherRankSFT

    L.seed_everything(0)
    TeacherRankSFT(backbone="tiny-llama", backbone_config=TEACHER_OVERRIDES).export_pretrained(str(tmp_path / "t"))
    data = tmp_path / "groups.jsonl"
    data.write_text("".join(Path(sample_path("ranking_val.jsonl")).read_text().splitlines(True)[:8]))
    scores = {}
    for name, options in {"fp32": {}, "bf16": {"dtype": "bfloat16"}, "8bit": {"quantization": "8bit"}}.items():
        out = tmp_path / f"{name}.jsonl"
        score_file(str(tmp_path / "t"), str(data), str(out), accelerator="gpu", devices=[0], progress=False, **options)
        scores[name] = torch.tensor([d["teacher_score"] for line in out.read_text().splitlines()
                                     for d in json.loads(line)["docs"]])
    for name in ("bf16", "8bit"):
        assert torch.corrcoef(torch.stack([scores["fp32"], scores[name]]))[0, 1] >= 0.99, name

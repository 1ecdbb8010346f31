"""``TeacherRankSFT(head_init="prompt")``: the score head starts at the LLM's zero-shot yes/no
judgement on the ``decoder-prompt`` text, and every place that scores with the teacher (training,
evaluation, labeling, export) reads that same text; the default (``zero``) is unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from kdlab.data import sample_path
from kdlab.data.collators import RELEVANCE_PROMPT, RankingCollator, prompt_answer_ids
from kdlab.data.datamodules import RankingDataModule
from kdlab.data.readers import read_ranking_jsonl
from kdlab.errors import ConfigError
from kdlab.export import export_model, model_card
from kdlab.labeling import score_file
from kdlab.models.backbones import load_backbone, load_tokenizer
from kdlab.models.heads import DecoderRanker
from kdlab.models.served import SCORE_HEAD_META, load_rank_teacher, text_format_of
from kdlab.stages import TeacherRankSFT


def _causal_lm_dir(root: Path, tied: bool) -> Path:
    """A seeded tiny-Llama causal LM saved as a checkpoint directory (with the sample tokenizer)."""
    out = root / ("tied" if tied else "untied")
    L.seed_everything(0)
    lm = load_backbone("tiny-llama-h32", task="causal-lm", config={"tie_word_embeddings": tied})
    lm.save_pretrained(str(out))
    load_tokenizer("tiny-llama").save_pretrained(str(out))
    return out


def _train_batch(tokenizer: str, text_format: str = "decoder-prompt") -> dict:
    """A real training batch of the embedded sample, in ``text_format``."""
    dm = RankingDataModule(train=sample_path("ranking_train.jsonl"), tokenizer=tokenizer, text_format=text_format,
                           num_negatives=3, batch_size=2, max_length=128)
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


@pytest.mark.parametrize("tied", [False, True])
def test_step0_score_is_the_causal_lms_yes_minus_no_logit(tmp_path: Path, tied: bool) -> None:
    from transformers import AutoModelForCausalLM

    model_dir = _causal_lm_dir(tmp_path, tied)
    stage = TeacherRankSFT(backbone=str(model_dir), head_init="prompt").eval()
    assert stage.ranker.text_format == "decoder-prompt"
    assert float(stage.ranker.head.dense.bias) == 0.0
    batch = _train_batch(str(model_dir))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    last = mask.sum(dim=1) - 1
    rows = torch.arange(ids.shape[0])
    tok = load_tokenizer(str(model_dir))
    assert not (ids[rows, last] == tok.eos_token_id).any()  # the prompt's own last token, no EOS
    assert tok.decode(ids[0, : int(last[0]) + 1]).endswith("\nAnswer:")
    with torch.no_grad():
        scores = stage(ids, mask)
        lm = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
        logits = lm(input_ids=ids, attention_mask=mask).logits[rows, last]
    yes, no, _, _ = prompt_answer_ids(tok)
    torch.testing.assert_close(scores, logits[:, yes] - logits[:, no], atol=1e-5, rtol=0)
    assert scores.std() > 0  # a real judgement, not a constant


def test_answer_tokens_are_one_token_where_the_tokenizer_has_them() -> None:
    tok = load_tokenizer("tiny-llama")
    yes, no, _, _ = prompt_answer_ids(tok)
    # The sample tokenizer splits " yes": the first token of each answer stands for it.
    assert yes == tok(" yes", add_special_tokens=False)["input_ids"][0]
    assert [no] == tok(" no", add_special_tokens=False)["input_ids"]


def test_default_head_init_is_unchanged() -> None:
    """Unset, ``zero`` and the old construction (encoder load + DecoderRanker) give the same weights
    and scores: a random weight, bias 0, ``decoder`` text."""
    batch = _train_batch("tiny-llama", "decoder")
    L.seed_everything(0)
    unset = TeacherRankSFT(backbone="tiny-llama-h32").eval()
    L.seed_everything(0)
    zero = TeacherRankSFT(backbone="tiny-llama-h32", head_init="zero").eval()
    L.seed_everything(0)
    base = load_backbone("tiny-llama-h32", task="encoder")
    old = DecoderRanker(base, int(base.config.hidden_size)).eval()
    for stage in (unset, zero):
        assert stage.ranker.text_format == "decoder"
        state = stage.ranker.state_dict()
        assert state.keys() == old.state_dict().keys()
        assert all(torch.equal(state[k], v) for k, v in old.state_dict().items())
    assert float(unset.ranker.head.dense.bias) == 0.0
    with torch.no_grad():
        want = old(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        assert torch.equal(unset(batch["input_ids"], batch["attention_mask"]), want)


@pytest.mark.parametrize("head_init,text_format", [("prompt", "decoder"), ("zero", "decoder-prompt")])
def test_a_text_format_mismatch_is_one_line_before_training(head_init: str, text_format: str) -> None:
    from kdlab.lightning_cli import check_inputs_before_loading, parse_lightning

    cfg = parse_lightning(["fit", "--model=TeacherRankSFT", f"--model.init_args.head_init={head_init}",
                           "--model.init_args.backbone=tiny-llama-h32", "--data=RankingDataModule",
                           f"--data.init_args.text_format={text_format}", "--data.init_args.tokenizer=tiny-llama"]).fit
    with pytest.raises(ConfigError) as err:
        check_inputs_before_loading(cfg, "fit")
    message = str(err.value)
    assert "\n" not in message and "data.init_args.text_format" in message and "model.init_args.head_init" in message
    with pytest.raises(ConfigError, match="head_init"):
        TeacherRankSFT.check_options({"head_init": "random"})
    good = "decoder-prompt" if head_init == "prompt" else "decoder"
    matching = parse_lightning(["fit", "--model=TeacherRankSFT", f"--model.init_args.head_init={head_init}",
                                "--data=RankingDataModule", f"--data.init_args.text_format={good}"]).fit
    check_inputs_before_loading(matching, "fit")  # the matching pair passes


def test_fast_dev_run_with_lora(tmp_path: Path) -> None:
    L.seed_everything(0)
    stage = TeacherRankSFT(backbone="tiny-llama-h32", head_init="prompt", lora_rank=4, loss="listwise", lr=1e-3)
    trainable = {n for n, p in stage.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trainable) and {"ranker.head.dense.weight", "ranker.head.dense.bias"} <= trainable
    head = stage.ranker.head.dense.weight.detach().clone()
    dm = RankingDataModule(tokenizer="tiny-llama", text_format="decoder-prompt", num_negatives=3, batch_size=2,
                           eval_batch_size=2, eval_max_docs=4, max_length=96)
    trainer = L.Trainer(fast_dev_run=True, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(stage, datamodule=dm)
    assert not torch.equal(stage.ranker.head.dense.weight, head)
    assert "val/ndcg@10" in trainer.callback_metrics


def test_train_last_layers_with_prompt_head() -> None:
    stage = TeacherRankSFT(backbone="tiny-llama-h32", head_init="prompt", train_last_layers=1)
    trainable = {n for n, p in stage.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("ranker.backbone.layers.0.", "ranker.backbone.norm.", "ranker.head."))
                             for n in trainable)


@pytest.fixture(scope="module")
def prompt_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A head_init=prompt teacher exported as a run's model/ (what the pipeline labels with)."""
    run = tmp_path_factory.mktemp("prompt-run")
    L.seed_everything(0)
    TeacherRankSFT(backbone="tiny-llama-h32", head_init="prompt").export_pretrained(str(run / "model"))
    return run


def test_export_records_the_prompt_and_labeling_reads_it(prompt_export: Path, tmp_path: Path) -> None:
    model_dir = prompt_export / "model"
    meta = json.loads((model_dir / SCORE_HEAD_META).read_text())
    assert meta["text_format"] == "decoder-prompt" and meta["prompt"] == RELEVANCE_PROMPT
    assert text_format_of(model_dir) == "decoder-prompt"
    teacher = load_rank_teacher(str(model_dir))
    assert teacher.text_format == "decoder-prompt"
    lines = Path(sample_path("ranking_val.jsonl")).read_text().splitlines(True)[:3]
    source = tmp_path / "groups.jsonl"
    source.write_text("".join(lines))
    out = tmp_path / "scored.jsonl"
    score_file(str(model_dir), str(source), str(out), max_length=96, accelerator="cpu", progress=False)
    got = [d.teacher_score for g in read_ranking_jsonl(str(out)) for d in g.docs]
    tok = load_tokenizer(str(model_dir))
    groups = read_ranking_jsonl(str(source))

    def direct(text_format: str) -> list[float]:
        encoder = RankingCollator(tok, text_format, max_length=96)
        batch = encoder.pad([encoder.encode(g.query, d.text) for g in groups for d in g.docs])
        with torch.no_grad():
            return teacher(**batch).tolist()

    assert got == pytest.approx(direct("decoder-prompt"), abs=1e-4)
    assert got != pytest.approx(direct("decoder"), abs=1e-4)
    # The pipeline's labeling step reads the recorded format too: the same file.
    from kdlab.pipeline import BudgetConfig, HardwareConfig, PipelineConfig
    from kdlab.pipeline.run import label_split

    piped = label_split(model_dir, str(source), tmp_path / "piped.jsonl",
                        PipelineConfig(hardware=HardwareConfig(label_accelerator="cpu"), budget=BudgetConfig(label_max_length=96)), "float32")
    assert piped.read_bytes() == out.read_bytes()


def test_hf_export_of_a_prompt_teacher_scores_the_prompt_in_plain_transformers(prompt_export: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = export_model(prompt_export, "hf")
    pairs = [("what is python", "Python is a language."), ("sort a list", "sorted returns a new sorted list.")]
    teacher = load_rank_teacher(str(prompt_export / "model"))
    encoder = RankingCollator(load_tokenizer(str(prompt_export / "model")), "decoder-prompt", max_length=512)
    batch = encoder.pad([encoder.encode(q, d) for q, d in pairs])
    tok = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    theirs_batch = tok([RELEVANCE_PROMPT.format(query=q, document=d) for q, d in pairs], add_special_tokens=False,
                       padding=True, return_tensors="pt")  # as the card says
    assert torch.equal(theirs_batch["attention_mask"], batch["attention_mask"])
    with torch.no_grad():
        ours = teacher(**batch)
        theirs = model(**theirs_batch).logits[:, 0]
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    card = model_card(prompt_export / "model", "hf")
    assert "Is the document relevant to the query? Answer yes or no." in card and "add_special_tokens=False" in card

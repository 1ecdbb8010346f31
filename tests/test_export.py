"""Exports a user's serving stack loads (``kdlab.export.export_model``): each proven to score
like kdlab on padded batches, each with a model card whose numbers are the run's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from conftest import subprocess_env

from kdlab.data import sample_path
from kdlab.data.collators import RankingCollator
from kdlab.export import ExportError, distinct_pad_token_id, export_model, model_card
from kdlab.models.backbones import load_backbone, load_tokenizer
from kdlab.models.heads import SequenceClassificationRanker
from kdlab.models.served import load_rank_teacher, save_served_model
from kdlab.stages import TeacherRankSFT

METRICS = {"val/ndcg@10": 0.4123456, "test/ndcg@10": 0.3987654, "test/mrr@10": 0.5, "train/loss": 1.25e-3}
DATA = {"train": {"source": {"format": "jsonl", "path": "train.jsonl"}, "first_stage": {}, "queries": 173, "pairs": 2595},
        "val": {"source": {"format": "jsonl", "path": "val.jsonl"}, "first_stage": {}, "queries": 21, "pairs": 315}}
SHA = "0123456789abcdef0123456789abcdef01234567"


def _pairs() -> list[tuple[str, str]]:
    """Real sample texts of very different lengths (so every batch is padded)."""
    rows = [json.loads(line) for line in Path(sample_path("ranking_test.jsonl")).read_text().splitlines()[:2]]
    pairs = [(r["query"], f"{d['title']} {d['summary']}".strip()) for r in rows for d in r["docs"][:3]]
    return pairs + [("short", "tiny")]


def _write_run(run: Path, stage: str, init_args: dict, teacher: str | None = None) -> None:
    config = {"seed_everything": 0, "model": {"class_path": f"kdlab.stages.{stage}", "init_args": init_args},
              "teacher": {"backbone": teacher, "task": "ranker"}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "manifest.json").write_text(json.dumps({
        "command": "fit", "stage": stage, "status": "finished", "seed": 0, "git": {"sha": SHA, "dirty": False},
        "versions": {"kdlab": "0.1.0"}, "data": DATA}))
    (run / "metrics.json").write_text(json.dumps(METRICS))


@pytest.fixture(scope="module")
def ce_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fake RankDistillStudent run: a seeded tiny-BERT one-label classifier under model/."""
    run = tmp_path_factory.mktemp("ce-run")
    L.seed_everything(0)
    ranker = SequenceClassificationRanker(load_backbone("tiny-bert", task="seq-cls", num_labels=1))
    save_served_model(ranker, "tiny-bert", run / "model", stage="RankDistillStudent")
    _write_run(run, "RankDistillStudent", {"backbone": "tiny-bert", "architecture": "cross-encoder", "alpha": 1.0,
                                           "beta": 0.25, "teacher_source": "data"})
    return run


@pytest.fixture(scope="module")
def dec_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fake TeacherRankSFT run: a seeded tiny-Llama decoder ranker (score-head bias 0, as rank losses leave it)."""
    run = tmp_path_factory.mktemp("dec-run")
    L.seed_everything(0)
    TeacherRankSFT(backbone="tiny-llama-h32").export_pretrained(str(run / "model"))
    _write_run(run, "TeacherRankSFT", {"backbone": "tiny-llama-h32", "loss": "hinge", "margin": 1.0, "lora_rank": 0},
               teacher="runs/llm/model")
    return run


def _kdlab_scores(model_dir: Path, pairs: list[tuple[str, str]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """kdlab's own scores: the reloaded ranker on its collator's right-padded batch."""
    ranker = load_rank_teacher(str(model_dir))
    encoder = RankingCollator(load_tokenizer(str(model_dir)), ranker.text_format, max_length=512)
    batch = encoder.pad([encoder.encode(q, d) for q, d in pairs])
    assert (batch["attention_mask"] == 0).any(), "the batch must be padded"
    with torch.no_grad():
        return ranker(**batch), batch


# ------------------------------------------------------------------------------ cross-encoder
def test_cross_encoder_export_loads_in_sentence_transformers_with_kdlab_scores(ce_run: Path) -> None:
    from sentence_transformers import CrossEncoder

    out = export_model(ce_run, "cross-encoder")
    assert out == ce_run / "export" / "cross-encoder"
    assert sorted(p.name for p in (ce_run / "export").iterdir()) == ["cross-encoder"]  # no temp dir left
    pairs = _pairs()
    ours, _ = _kdlab_scores(ce_run / "model", pairs)
    model = CrossEncoder(str(out), device="cpu")
    assert isinstance(model.activation_fn, torch.nn.Identity)
    theirs = torch.as_tensor(model.predict(pairs, batch_size=len(pairs)))
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


def test_hf_export_of_a_cross_encoder_is_a_plain_classifier(ce_run: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = export_model(ce_run, "hf", tmp_path / "hf")
    pairs = _pairs()
    ours, _ = _kdlab_scores(ce_run / "model", pairs)
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    batch = tok([q for q, _ in pairs], [d for _, d in pairs], padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        theirs = model(**batch).logits[:, 0]
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


def test_decoder_ranker_is_refused_as_a_cross_encoder_in_one_line(dec_run: Path) -> None:
    with pytest.raises(ExportError) as err:
        export_model(dec_run, "cross-encoder")
    assert "--format hf" in str(err.value) and "\n" not in str(err.value)
    assert not (dec_run / "export").exists()


# -------------------------------------------------------------------------- hf (decoder ranker)
_PLAIN_TRANSFORMERS = """
import json, sys, torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
path, pairs = sys.argv[1], json.loads(sys.argv[2])
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForSequenceClassification.from_pretrained(path).eval()
batch = tok([f"query: {q} document: {d}".rstrip() for q, d in pairs], padding=True, truncation=True,
            return_tensors="pt")
with torch.no_grad():
    logits = model(**batch).logits[:, 0]
print(json.dumps({"logits": logits.tolist(), "bias": model.config.kdlab_score_bias, "class": type(model).__name__,
                  "input_ids": batch["input_ids"].tolist(), "mask": batch["attention_mask"].tolist(),
                  "pad": model.config.pad_token_id, "eos": tok.eos_token_id,
                  "kdlab_imported": any(m == "kdlab" or m.startswith("kdlab.") for m in sys.modules)}))
"""


def _plain_transformers_scores(out: Path, pairs: list[tuple[str, str]]) -> dict:
    proc = subprocess.run([sys.executable, "-c", _PLAIN_TRANSFORMERS, str(out), json.dumps(pairs)],
                          capture_output=True, text=True, env=subprocess_env(), cwd=out, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_hf_export_of_a_decoder_scores_like_kdlab_in_plain_transformers(dec_run: Path) -> None:
    out = export_model(dec_run, "hf")
    pairs = _pairs()
    ours, batch = _kdlab_scores(dec_run / "model", pairs)
    got = _plain_transformers_scores(out, pairs)
    assert got["class"] == "LlamaForSequenceClassification" and not got["kdlab_imported"]
    assert got["pad"] != got["eos"]
    mask = torch.tensor(got["mask"])
    assert torch.equal(mask, batch["attention_mask"])  # same tokens: the saved tokenizer appends the EOS itself
    assert torch.equal(torch.tensor(got["input_ids"])[mask.bool()], batch["input_ids"][batch["attention_mask"].bool()])
    logits = torch.tensor(got["logits"])
    # The score head's bias starts at 0 and rank losses never move it: the same scores, not shifted.
    assert got["bias"] == 0.0
    torch.testing.assert_close(logits, ours, atol=1e-5, rtol=0)
    assert torch.equal(torch.argsort(logits), torch.argsort(ours))
    record = json.loads((out / "kdlab_export.json").read_text())
    assert record["max_abs_diff"] <= 1e-5 and record["eos_appended_by_tokenizer"] is True


def test_hf_export_of_a_decoder_with_a_trained_bias_records_the_shift(tmp_path: Path) -> None:
    """A head whose bias moved (e.g. a pointwise loss) cannot be held by HF's bias-free `score`:
    the logits are kdlab's scores minus that constant, recorded in the config and the card."""
    run = tmp_path / "run"
    L.seed_everything(0)
    ranker = TeacherRankSFT(backbone="tiny-llama-h32")
    with torch.no_grad():
        ranker.ranker.head.dense.bias.fill_(0.375)
    ranker.export_pretrained(str(run / "model"))
    _write_run(run, "TeacherRankSFT", {"backbone": "tiny-llama-h32", "loss": "hinge", "margin": 1.0, "lora_rank": 0},
               teacher="runs/llm/model")
    out = export_model(run, "hf")
    pairs = _pairs()[:3]
    ours, _ = _kdlab_scores(run / "model", pairs)
    got = _plain_transformers_scores(out, pairs)
    assert got["bias"] == 0.375
    torch.testing.assert_close(torch.tensor(got["logits"]) + 0.375, ours, atol=1e-5, rtol=0)
    assert "kdlab_score_bias" in (out / "README.md").read_text()


def test_pad_token_is_never_the_eos_a_decoder_classifier_scores() -> None:
    tok = load_tokenizer("tiny-llama-h32")
    tok.pad_token = tok.eos_token
    pad, added = distinct_pad_token_id(tok)
    assert pad != tok.eos_token_id and tok.pad_token_id == pad and not added


# ------------------------------------------------------------------------------------- onnx
@pytest.mark.parametrize("which", ["ce_run", "dec_run"])
def test_onnx_export_scores_like_kdlab_in_onnxruntime(which: str, request: pytest.FixtureRequest,
                                                      tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ort = pytest.importorskip("onnxruntime")
    run = request.getfixturevalue(which)
    out = export_model(run, "onnx", tmp_path / "onnx")
    assert "PyTorch" in capsys.readouterr().out
    pairs = _pairs()
    ours, batch = _kdlab_scores(run / "model", pairs)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    assert names[:2] == ["input_ids", "attention_mask"] and [o.name for o in session.get_outputs()] == ["scores"]
    assert all(isinstance(d, str) for i in session.get_inputs() for d in i.shape)  # dynamic batch and sequence
    theirs = torch.as_tensor(session.run(["scores"], {n: batch[n].numpy() for n in names})[0])
    assert theirs.shape == (len(pairs),)
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
    record = json.loads((out / "kdlab_export.json").read_text())
    assert record["exporter"] == "torchscript" and record["opset"] == 17
    assert record["latency"]["pytorch_ms"] > 0 and record["latency"]["onnxruntime_ms"] > 0
    assert (out / "tokenizer.json").is_file() and "onnxruntime" in (out / "README.md").read_text()


@pytest.mark.slow  # ~15 s: the torch.export-based exporter traces for far longer than the TorchScript one
def test_onnx_falls_back_to_the_torch_export_based_exporter(dec_run: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import kdlab.export.onnx as onnx_export

    real = onnx_export._torch_onnx_export

    def no_torchscript(*args, exporter: str, **kwargs):  # type: ignore[no-untyped-def]
        if exporter == "torchscript":
            raise RuntimeError("TorchScript exporter removed")
        return real(*args, exporter=exporter, **kwargs)

    monkeypatch.setattr(onnx_export, "_torch_onnx_export", no_torchscript)
    out = export_model(dec_run, "onnx", tmp_path / "onnx")
    record = json.loads((out / "kdlab_export.json").read_text())
    assert record["exporter"] == "dynamo" and "TorchScript exporter removed" in record["exporter_failures"][0]
    pairs = _pairs()
    ours, batch = _kdlab_scores(dec_run / "model", pairs)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    theirs = torch.as_tensor(session.run(["scores"], {n: batch[n].numpy() for n in ("input_ids", "attention_mask")})[0])
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------- the card
def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---", 2)[1])


def test_model_card_numbers_are_the_runs(ce_run: Path, dec_run: Path) -> None:
    card = model_card(ce_run, "cross-encoder")
    front = _front_matter(card)
    assert front["library_name"] == "sentence-transformers" and front["pipeline_tag"] == "text-ranking"
    assert front["license"] == "apache-2.0" and "base_model" not in front  # a tiny config is no hub model
    assert front["tags"][:3] == ["kdlab", "distillation", "cross-encoder"]
    metrics = json.loads((ce_run / "metrics.json").read_text())
    rows = {}
    for line in card.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 2:
            rows[cells[0]] = cells[1]
    for key, value in metrics.items():
        assert float(rows[key]) == pytest.approx(value, rel=1e-5), key
    assert "| train | 173 | 2595 |" in card and "| val | 21 | 315 |" in card
    assert rows["alpha"] == "1" and rows["beta"] == "0.25"
    assert SHA in card and "`0.1.0`" in card and "RankDistillStudent" in card
    assert "CrossEncoder(" in card
    decoder = model_card(dec_run, "hf")
    front = _front_matter(decoder)
    assert front["library_name"] == "transformers" and front["pipeline_tag"] == "text-classification"
    assert "cross-encoder" not in front["tags"] and "reranker" in front["tags"]
    assert "query: {query} document: {title} {body}" in decoder and "runs/llm/model" in decoder


# ------------------------------------------------------------------------- user errors, atomicity
def test_user_errors_are_one_line(ce_run: Path, tmp_path: Path) -> None:
    no_model = tmp_path / "run"
    no_model.mkdir()
    (no_model / "manifest.json").write_text("{}")
    cases = [(no_model, "cross-encoder", None, "without model/"),
             (ce_run, "torchscript", None, "unknown export format"),
             (ce_run, "hf", ce_run, "would replace"),
             (tmp_path / "missing", "hf", None, "not a directory")]
    for path, fmt, output, words in cases:
        with pytest.raises(ExportError) as err:
            export_model(path, fmt, output)  # type: ignore[arg-type]
        assert words in str(err.value) and "\n" not in str(err.value)


def test_a_failed_export_leaves_the_previous_one(ce_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import kdlab.export as export

    out = export_model(ce_run, "hf", tmp_path / "hf")
    before = sorted(p.name for p in out.iterdir())

    def broken(source, build, **_):  # type: ignore[no-untyped-def]
        (build / "config.json").write_text("{half")
        raise RuntimeError("killed mid-export")

    monkeypatch.setitem(export.EXPORTERS, "hf", broken)
    with pytest.raises(RuntimeError):
        export_model(ce_run, "hf", out)
    assert sorted(p.name for p in out.iterdir()) == before
    assert json.loads((out / "config.json").read_text())["sentence_transformers"]["activation_fn"].endswith("Identity")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]

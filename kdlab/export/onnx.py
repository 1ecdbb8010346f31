"""The ``onnx`` export: kdlab's own scorer as ``model.onnx``, checked against PyTorch in onnxruntime."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdlab.export.source import (
    ONNX_TOLERANCE,
    PROBE_PAIRS,
    ExportError,
    ExportSource,
    median_ms,
    pair_encoder,
    probe_batch,
    save_tokenizer,
)
from kdlab.models.backbones import load_tokenizer
from kdlab.models.served import load_rank_teacher


class _OnnxScorer(nn.Module):
    """``scores [B]`` of a kdlab ranker from explicit tensor inputs (what the ONNX graph computes)."""

    def __init__(self, ranker: nn.Module, with_token_types: bool) -> None:
        super().__init__()
        self.ranker = ranker
        self.with_token_types = with_token_types

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        if self.with_token_types:
            return self.ranker(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return self.ranker(input_ids=input_ids, attention_mask=attention_mask)


def _onnx_modules() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxruntime
    except ImportError as err:
        raise ExportError(f"the onnx export needs onnx and onnxruntime ({err.name} is missing): "
                          "pip install onnx onnxruntime") from None
    return onnx, onnxruntime


ONNX_EXPORTERS: tuple[str, ...] = ("torchscript", "dynamo")


def _torch_onnx_export(scorer: nn.Module, batch: dict[str, torch.Tensor], names: list[str], path: Path, *,
                       exporter: str, opset: int, max_length: int) -> None:
    """Write ``scorer`` to ``path`` with ``torch.onnx.export`` and dynamic ``batch`` / ``sequence`` axes.

    ``torchscript`` (``dynamo=False``) emits the requested opset natively (17 by default), needs no
    ``onnxscript``, takes about a second for the tiny models and writes the same bytes on every run;
    torch 2.13 deprecates it. ``dynamo`` (the torch.export-based exporter, torch's default) needs
    ``onnxscript``, is also byte-stable but ~20x slower here, and below opset 18 converts down from
    18, which can fail and then keeps 18 (the card reports the opset the file really has).
    """
    import warnings

    args = tuple(batch[n] for n in names)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            torch.onnx.export(scorer, args, str(path), input_names=names, output_names=["scores"], opset_version=opset,
                              dynamo=False, dynamic_axes={**{n: {0: "batch", 1: "sequence"} for n in names},
                                                          "scores": {0: "batch"}})
            return
        try:
            import onnxscript  # noqa: F401 - the torch.export-based exporter needs it
        except ImportError:
            raise ExportError("the torch.export-based ONNX exporter needs onnxscript: pip install onnxscript") from None
        big = sum(p.numel() * p.element_size() for p in scorer.parameters()) > 1_800_000_000
        batch_dim, seq_dim = torch.export.Dim("batch"), torch.export.Dim("sequence", max=max(max_length, 8))
        torch.onnx.export(scorer, args, str(path), input_names=names, output_names=["scores"], opset_version=opset,
                          dynamo=True, external_data=big, verbose=False,
                          dynamic_shapes={n: {0: batch_dim, 1: seq_dim} for n in names})


def export_onnx(source: ExportSource, out: Path, *, max_length: int, opset: int) -> dict[str, Any]:
    """``model.onnx`` (dynamic batch and sequence axes, output ``scores``) + tokenizer.

    The graph is kdlab's own scorer (:class:`~kdlab.models.heads.DecoderRanker` — last real token by
    the attention mask, head bias included — or the classifier's logit), so ONNX scores are kdlab's.
    Each exporter of :data:`ONNX_EXPORTERS` is tried in turn until one writes a graph that
    onnxruntime runs like PyTorch on three batch shapes (a traced graph that baked a shape in fails
    that check); the one used is recorded.
    """
    onnx, ort = _onnx_modules()
    ranker = load_rank_teacher(str(source.model_dir))
    encoder = pair_encoder(load_tokenizer(str(source.model_dir)), ranker.text_format, max_length)
    batch = probe_batch(encoder)
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in batch]
    scorer = _OnnxScorer(ranker, "token_type_ids" in names).eval()
    checks = [batch, probe_batch(encoder, repeat=2), encoder.pad([encoder.encode(*PROBE_PAIRS[-1])])]
    with torch.no_grad():
        expected = [scorer(*(c[n] for n in names)).numpy() for c in checks]
    timed = checks[1]
    with torch.inference_mode():  # before any onnxruntime session: its spinning threads would slow PyTorch
        torch_ms = median_ms(lambda: scorer(*(timed[n] for n in names)))
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    path = out / "model.onnx"
    failures: list[str] = []
    for exporter in ONNX_EXPORTERS:
        for leftover in out.glob("model.onnx*"):
            leftover.unlink()
        try:
            _torch_onnx_export(scorer, batch, names, path, exporter=exporter, opset=opset, max_length=max_length)
            onnx.checker.check_model(str(path))
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            diff = max(float(abs(session.run(["scores"], {n: c[n].numpy() for n in names})[0] - want).max())
                       for c, want in zip(checks, expected))
        except ExportError:
            raise
        except Exception as err:  # noqa: BLE001 - this exporter could not do it: try the next one
            failures.append(f"{exporter}: {type(err).__name__}: {(str(err).splitlines() or [''])[0]}")
            continue
        if diff <= ONNX_TOLERANCE:
            break
        failures.append(f"{exporter}: onnxruntime differs from PyTorch by {diff:.3g} > {ONNX_TOLERANCE}")
    else:
        raise RuntimeError("no ONNX exporter wrote a graph that scores like kdlab: " + "; ".join(failures))
    written_opset = max(int(o.version) for o in onnx.load(str(path), load_external_data=False).opset_import
                        if o.domain in ("", "ai.onnx"))

    def run_ort(b: dict[str, torch.Tensor]) -> Any:
        return session.run(["scores"], {n: b[n].numpy() for n in names})[0]

    ort_ms = median_ms(lambda: run_ort(timed))
    shape = tuple(timed["input_ids"].shape)
    latency = {"batch": shape[0], "tokens": shape[1], "repeats": 10, "threads": torch.get_num_threads(),
               "pytorch_ms": round(torch_ms, 3), "onnxruntime_ms": round(ort_ms, 3)}
    print(f"[kdlab] onnx latency, batch {shape[0]} x {shape[1]} tokens, median of 10 on {latency['threads']} "
          f"thread(s): PyTorch {torch_ms:.2f} ms | onnxruntime {ort_ms:.2f} ms", flush=True)
    eos_appended = save_tokenizer(source, out, max_length, text_format=ranker.text_format)
    return {"max_length": max_length, "opset": written_opset, "exporter": exporter, "exporter_failures": failures,
            "inputs": names, "output": "scores", "max_abs_diff": diff, "latency": latency,
            "eos_appended_by_tokenizer": eos_appended, "score_bias_shift": 0.0}

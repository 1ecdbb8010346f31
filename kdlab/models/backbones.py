"""The one backbone loader: tiny random models, prepared aliases, local directories and hub ids.

Every stage, callback and script gets its models and tokenizers from here so that the rules of the
house hold in one place:

* ``name`` is a tiny model by name (:data:`TINY_CONFIGS`: ``tiny-llama``, ``tiny-bert``, ...; random
  init from ``LlamaConfig`` / ``BertConfig``, resized by ``config``; vocabulary = the embedded
  sample tokenizer), an alias made by
  ``python -m kdlab models prepare`` (``smollm2-135m``, ``minilm-l6``), a local directory or a hub id;
* ``trust_remote_code`` only when asked, safetensors preferred, ``dtype`` explicit;
* 8-bit / 4-bit weights through bitsandbytes are loaded directly onto their device (quantized models
  refuse ``.to()``), also for tiny configs (built, saved to a temp dir, reloaded quantized);
* scoring never pays for the LM head: ``task="encoder"`` on a decoder returns the base model.

Tiny models are initialised from the global RNG: seed first (``lightning.seed_everything``).
"""

from __future__ import annotations

import copy
import functools
import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Union

import torch

from kdlab.models.prepare import ALIASES, alias_dir, is_ready

if TYPE_CHECKING:  # pragma: no cover - typing only
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Task = Literal["causal-lm", "encoder", "seq-cls"]
Quantization = Literal["8bit", "4bit"]
TASKS: tuple[str, ...] = ("causal-lm", "encoder", "seq-cls")
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

#: Where the embedded sample tokenizer lives (a module attribute so tests can point it elsewhere).
SAMPLE_TOKENIZER_DIR: Path = Path(__file__).resolve().parents[1] / "data" / "sample" / "tokenizer"

#: Small defaults for the tiny configs; ``config`` overrides any of them.
TINY_LLAMA_DEFAULTS: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "intermediate_size": 128,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}
TINY_BERT_DEFAULTS: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
}
TINY_T5_DEFAULTS: dict[str, Any] = {
    "d_model": 64,
    "d_kv": 16,
    "d_ff": 128,
    "num_layers": 2,
    "num_heads": 4,
    "dropout_rate": 0.0,
    "tie_word_embeddings": False,
}
_MICRO: dict[str, Any] = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}

#: Tiny random-init models by name (as litgpt's ``Config.from_name``): name → (family, size over the
#: family's defaults). ``tiny-llama`` / ``tiny-bert`` are the quickstart students, ``tiny-llama-h128``
#: its teachers, the ``-h32`` ones the smallest that tests train, ``tiny-llama-h256`` the benchmarks'. A config's ``backbone_config``
#: still overrides any field.
TINY_CONFIGS: dict[str, tuple[Literal["llama", "bert", "t5"], dict[str, Any]]] = {
    "tiny-llama": ("llama", {}),
    "tiny-llama-h128": ("llama", {"hidden_size": 128, "intermediate_size": 256}),
    "tiny-llama-h32": ("llama", {**_MICRO, "num_key_value_heads": 2}),
    "tiny-llama-h256": ("llama", {"hidden_size": 256, "num_hidden_layers": 4, "intermediate_size": 1024}),
    "tiny-bert": ("bert", {}),
    "tiny-bert-h32": ("bert", dict(_MICRO)),
    # Encoder-decoder (KETCHUP's Flan-T5 / T5 setting): the -h128 one is the tests' teacher.
    "tiny-t5": ("t5", {}),
    "tiny-t5-h128": ("t5", {"d_model": 128, "d_ff": 256, "d_kv": 32}),
}
TINY_NAMES: tuple[str, ...] = tuple(TINY_CONFIGS)


class BackboneError(ValueError):
    """A user's mistake in naming or configuring a backbone; the message is one actionable line."""


class VocabularyMismatchError(ValueError):
    """Teacher and student tokenizers differ, so token-level distillation would compare nonsense."""


# --------------------------------------------------------------------------------------- helpers
def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Map ``"float32" | "bfloat16" | "float16"`` (or a torch dtype) to a torch dtype.

    Configs carry dtypes as strings; a typo must fail here with the allowed values, not deep inside
    ``from_pretrained``.
    """
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise BackboneError(f"unsupported dtype {dtype}; use one of {sorted(DTYPES)}")
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise BackboneError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}") from None


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise BackboneError(f"unknown task {task!r}; use one of {list(TASKS)}")


def looks_like_path(name: str) -> bool:
    """True when ``name`` is clearly meant as a filesystem path rather than an alias or hub id.

    Hub ids contain ``/`` too (``org/model``), so only names starting with ``.``, ``/`` or ``~`` or
    containing ``os.sep`` on a system where it is not ``/`` count as paths, plus ``org/model`` names
    that exist on disk (resolved before this check).
    """
    if name.startswith((".", "/", "~")):
        return True
    return os.sep != "/" and os.sep in name


def resolve_name(name: str) -> tuple[Literal["tiny", "local", "hub"], str]:
    """Classify ``name`` and return ``(kind, location)``.

    ``tiny`` names are returned unchanged, aliases resolve to their prepared cache directory
    (error with the fixing command when not prepared), existing directories resolve to themselves,
    path-like names that do not exist raise, anything else is taken as a hub id.
    """
    if name in TINY_NAMES:
        return "tiny", name
    if name in ALIASES:
        target = alias_dir(name)
        if not is_ready(target):
            raise BackboneError(
                f"model alias {name!r} is not prepared at {target}; run: python -m kdlab models prepare {name}"
            )
        return "local", str(target)
    expanded = Path(name).expanduser()
    if expanded.is_dir():
        return "local", str(expanded)
    if looks_like_path(name) or expanded.exists():
        if expanded.exists():
            raise BackboneError(f"model path {name!r} is not a directory (expected a Hugging Face model directory)")
        raise BackboneError(f"model path {name!r} does not exist")
    return "hub", name


@functools.lru_cache(maxsize=8)
def _tokenizer_special_ids(directory: str) -> tuple[int, int | None, int | None, int | None]:
    """``(vocab_size, pad, bos, eos)`` of the tokenizer in ``directory``, cached per path."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(directory)
    return len(tok), pad_token_id(tok), tok.bos_token_id, tok.eos_token_id


def sample_tokenizer_dir() -> Path:
    """The embedded sample tokenizer's directory; a clear error when it has not been built."""
    directory = Path(SAMPLE_TOKENIZER_DIR)
    if not directory.is_dir():
        raise BackboneError(
            f"embedded sample tokenizer missing at {directory}; run: python scripts/build_sample.py"
        )
    return directory


def tiny_config(name: str, config: dict[str, Any] | None = None, *, num_labels: int = 1) -> Any:
    """The ``LlamaConfig`` / ``BertConfig`` of tiny model ``name`` (:data:`TINY_CONFIGS`): family
    defaults < the name's size < sample vocab < ``config``.

    Vocabulary size and pad/bos/eos ids come from the embedded sample tokenizer so that tiny models
    and the sample data always agree; ``config`` may still override them (e.g. a test's own vocab).
    """
    from transformers import BertConfig, LlamaConfig, T5Config

    if name not in TINY_CONFIGS:
        raise BackboneError(f"unknown tiny model {name!r}; use one of {list(TINY_CONFIGS)}")
    family, size = TINY_CONFIGS[name]
    overrides = dict(config or {})
    if "vocab_size" in overrides:
        vocab = {"vocab_size": overrides["vocab_size"]}
    else:
        vocab_size, pad, bos, eos = _tokenizer_special_ids(str(sample_tokenizer_dir()))
        vocab = {"vocab_size": vocab_size, "pad_token_id": pad}
        if family == "llama":
            vocab.update(bos_token_id=bos, eos_token_id=eos)
        if family == "t5":  # T5 starts decoding from the pad token
            vocab.update(eos_token_id=eos, decoder_start_token_id=pad)
    if family == "llama":
        cfg = LlamaConfig(**{**TINY_LLAMA_DEFAULTS, **size, **vocab, **overrides})
    elif family == "t5":
        cfg = T5Config(**{**TINY_T5_DEFAULTS, **size, **vocab, **overrides})
    else:
        cfg = BertConfig(**{**TINY_BERT_DEFAULTS, **size, **vocab, **overrides})
    cfg.num_labels = num_labels
    return cfg


def task_model_class(task: Task, family: Literal["auto", "auto-seq2seq", "llama", "bert", "t5"] = "auto") -> type:
    """The model class for ``task``: an ``Auto*`` class, or the concrete Llama/BERT/T5 class for tiny models.

    ``encoder`` maps to the base model (``AutoModel`` / ``LlamaModel`` / ``BertModel``) so that scoring
    reads the last hidden state without computing the vocabulary-sized LM head. ``causal-lm`` means
    "a language model that generates": for an encoder-decoder (``auto-seq2seq``, T5) that is the
    ``*ForConditionalGeneration`` model (``AutoModelForSeq2SeqLM``).
    """
    import transformers as tf

    _check_task(task)
    table: dict[str, dict[str, str]] = {
        "auto": {"causal-lm": "AutoModelForCausalLM", "encoder": "AutoModel", "seq-cls": "AutoModelForSequenceClassification"},
        "auto-seq2seq": {"causal-lm": "AutoModelForSeq2SeqLM", "encoder": "", "seq-cls": ""},
        "llama": {"causal-lm": "LlamaForCausalLM", "encoder": "LlamaModel", "seq-cls": "LlamaForSequenceClassification"},
        "bert": {"causal-lm": "", "encoder": "BertModel", "seq-cls": "BertForSequenceClassification"},
        "t5": {"causal-lm": "T5ForConditionalGeneration", "encoder": "", "seq-cls": ""},
    }
    cls_name = table[family][task]
    if not cls_name:
        kinds = {"bert": "BERT is an encoder", "t5": "T5 is an encoder-decoder generator",
                 "auto-seq2seq": "an encoder-decoder generates"}
        raise BackboneError(f"task {task!r} is not available for {family} models ({kinds[family]})")
    return getattr(tf, cls_name)


def is_encoder_decoder_dir(location: str, local: bool) -> bool:
    """Whether the Hugging Face config at ``location`` is an encoder-decoder (T5, BART, ...)."""
    from transformers import AutoConfig

    return bool(getattr(AutoConfig.from_pretrained(location, local_files_only=local), "is_encoder_decoder", False))


def _quantization_config(quantization: str | None, dtype: torch.dtype) -> Any:
    if quantization is None:
        return None
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
        )
    raise BackboneError(f"unknown quantization {quantization!r}; use '8bit', '4bit' or null")


def _device_map(device: str | torch.device | None) -> dict[str, Any]:
    """bitsandbytes places weights while loading, so the device goes into ``device_map``."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return {"": dev}


def _load_pretrained(
    cls: type,
    location: str,
    *,
    dtype: torch.dtype,
    quantization: str | None,
    device: str | torch.device | None,
    trust_remote_code: bool,
    local: bool,
    extra: dict[str, Any] | None = None,
) -> PreTrainedModel:
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code, **(extra or {})}
    if local:
        kwargs["local_files_only"] = True
        if any(Path(location).glob("*.safetensors")):
            kwargs["use_safetensors"] = True
    qcfg = _quantization_config(quantization, dtype)
    if qcfg is not None:
        kwargs["quantization_config"] = qcfg
        kwargs["device_map"] = _device_map(device)
    model = cls.from_pretrained(location, **kwargs)
    if qcfg is None:
        # from_pretrained returns eval mode and Lightning keeps submodule modes as found: a stage
        # fine-tuning a pretrained backbone would silently train without dropout. Frozen users
        # (teachers, labeling, evaluation) call eval() themselves.
        model.train()
        if device is not None:
            model = model.to(device)
    return model


# ------------------------------------------------------------------------------------- public API
def load_backbone(
    name: str,
    task: Task = "encoder",
    *,
    config: dict[str, Any] | None = None,
    dtype: str = "float32",
    quantization: Quantization | None = None,
    device: Union[str, torch.device, None] = None,
    trust_remote_code: bool = False,
    num_labels: int = 1,
) -> PreTrainedModel:
    """Load (or build) a backbone for ``task``.

    Args:
        name: a tiny model name (:data:`TINY_CONFIGS`), a prepared alias (``smollm2-135m``, ``minilm-l6``),
            a local Hugging Face directory, or a hub id.
        task: ``causal-lm`` (with LM head), ``encoder`` (base model, last hidden state; for a decoder
            this skips the LM head) or ``seq-cls`` (with a ``num_labels`` classification head).
        config: for tiny models, overrides of the small defaults; for pretrained models, attribute
            overrides passed to ``from_pretrained`` (e.g. ``{"hidden_dropout_prob": 0.0}``).
        dtype: ``float32`` | ``bfloat16`` | ``float16``.
        quantization: ``8bit`` / ``4bit`` through bitsandbytes, loaded directly onto ``device``.
        device: where to put the model (default: CPU).
        trust_remote_code: run code shipped with a checkpoint; off unless the config asks for it.
        num_labels: size of the ``seq-cls`` head.
    """
    _check_task(task)
    torch_dtype = resolve_dtype(dtype)
    kind, location = resolve_name(name)
    if kind == "tiny":
        return _build_tiny(
            location, task, config=config, dtype=torch_dtype, quantization=quantization,
            device=device, num_labels=num_labels,
        )
    extra: dict[str, Any] = dict(config or {})
    if task == "seq-cls":
        extra.setdefault("num_labels", num_labels)
    family: Literal["auto", "auto-seq2seq"] = "auto"
    if task == "causal-lm" and is_encoder_decoder_dir(location, kind == "local"):
        family = "auto-seq2seq"
    model = _load_pretrained(
        task_model_class(task, family), location, dtype=torch_dtype, quantization=quantization,
        device=device, trust_remote_code=trust_remote_code, local=kind == "local", extra=extra,
    )
    if task == "seq-cls" and getattr(model.config, "pad_token_id", None) is None:
        # Decoder classifiers pool the last non-pad token and refuse batches without a pad id.
        eos = getattr(model.config, "eos_token_id", None)
        model.config.pad_token_id = eos[0] if isinstance(eos, list) else eos
    return model


def load_generation_model(name: str, config: dict[str, Any] | None = None, dtype: str = "float32") -> PreTrainedModel:
    """A model that generates: a decoder-only causal LM, or an encoder-decoder (``tiny-t5``, a T5 /
    Flan-T5 directory: ``AutoModelForSeq2SeqLM``) — :func:`load_backbone` with ``task="causal-lm"``."""
    return load_backbone(name, "causal-lm", config=config, dtype=dtype)


def _build_tiny(
    name: str,
    task: Task,
    *,
    config: dict[str, Any] | None,
    dtype: torch.dtype,
    quantization: str | None,
    device: str | torch.device | None,
    num_labels: int,
) -> PreTrainedModel:
    """Random-init a tiny model; quantized variants go through a temp dir to load with bitsandbytes."""
    family = TINY_CONFIGS[name][0]
    cls = task_model_class(task, family)
    cfg = tiny_config(name, config, num_labels=num_labels)
    model = cls(cfg)
    if quantization is None:
        model = model.to(dtype)
        return model.to(device) if device is not None else model
    with tempfile.TemporaryDirectory(prefix="kdlab-tiny-") as tmp:
        # Not ``model.save_pretrained``: under torch.distributed, transformers 5 writes only on rank 0,
        # and each rank's temp dir is its own. ``save_model`` also de-duplicates tied weights.
        from safetensors.torch import save_model

        model.config.save_pretrained(tmp)
        save_model(model, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        del model
        return _load_pretrained(
            cls, tmp, dtype=dtype, quantization=quantization, device=device,
            trust_remote_code=False, local=True,
        )


def load_tokenizer(name: str, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer that belongs to backbone ``name`` (tiny names → the embedded sample tokenizer).

    A missing pad token is set to EOS: batching needs one, and decoders (Llama, SmolLM2) ship none.
    """
    from transformers import AutoTokenizer

    kind, location = resolve_name(name)
    if kind == "tiny":
        location = str(sample_tokenizer_dir())
    tok = AutoTokenizer.from_pretrained(
        location, trust_remote_code=trust_remote_code, local_files_only=kind != "hub"
    )
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def count_parameters(*modules: torch.nn.Module) -> int:
    """Total number of parameters (trainable or not) of ``modules``."""
    return sum(p.numel() for m in modules for p in m.parameters())


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id every batch pads with: the tokenizer's pad token, else EOS, else 0.

    :func:`load_tokenizer` already sets a missing pad token to EOS; the rule is written once here
    for tokenizers that come from elsewhere. Padding is always masked, so only its presence matters.
    """
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate[0] if isinstance(candidate, (list, tuple)) else candidate)
    return 0


def is_quantized(model: torch.nn.Module) -> bool:
    """True for bitsandbytes-loaded models, which refuse ``.to()`` and cannot be copied layer-wise."""
    return bool(
        getattr(model, "is_loaded_in_8bit", False)
        or getattr(model, "is_loaded_in_4bit", False)
        or getattr(model, "hf_quantizer", None) is not None
    )


_LAYER_KEY = re.compile(r"^(?P<prefix>(?:.*\.)?(?:layers|layer|h))\.(?P<idx>\d+)\.(?P<rest>.+)$")


def build_student_from_teacher(
    teacher_name_or_model: Union[str, PreTrainedModel],
    keep_layers: Union[list[int], Literal["every-other"]] = "every-other",
    *,
    dtype: str = "float32",
    device: Union[str, torch.device, None] = None,
    config: dict[str, Any] | None = None,
    teacher_config: dict[str, Any] | None = None,
) -> PreTrainedModel:
    """A smaller causal LM that keeps a subset of the teacher's layers (DistilBERT-style init).

    The student is the teacher's own class with ``num_hidden_layers = len(keep_layers)``; embeddings,
    final norm and LM head are copied, and student layer ``j`` starts from teacher layer
    ``keep_layers[j]``. The vocabulary is therefore the teacher's, which token-level distillation
    (KETCHUP) requires. ``"every-other"`` keeps layers 0, 2, 4, ... as DistilBERT did.

    Args:
        teacher_name_or_model: a name for :func:`load_backbone` (loaded as ``causal-lm`` in fp32) or
            an already loaded, non-quantized model.
        keep_layers: teacher layer indices, strictly increasing, or ``"every-other"``.
        dtype: the student's dtype.
        device: where to put the student.
        config: extra config overrides for the student (e.g. dropout); the layer count is set here.
        teacher_config: ``config`` for :func:`load_backbone` when the teacher is given by name
            (e.g. the size of a ``tiny-llama`` teacher).
    """
    if isinstance(teacher_name_or_model, str):
        teacher = load_backbone(teacher_name_or_model, "causal-lm", config=teacher_config)
    else:
        teacher = teacher_name_or_model
    if is_quantized(teacher):
        raise BackboneError("cannot build a student from a quantized teacher; load the teacher in float32")
    n_teacher = int(teacher.config.num_hidden_layers)
    if keep_layers == "every-other":
        keep = list(range(0, n_teacher, 2))
    else:
        keep = [int(i) for i in keep_layers]
    if not keep:
        raise BackboneError("keep_layers is empty; keep at least one teacher layer")
    if any(i < 0 or i >= n_teacher for i in keep) or keep != sorted(set(keep)):
        raise BackboneError(
            f"keep_layers must be strictly increasing indices in [0, {n_teacher}); got {keep}"
        )
    student_cfg = copy.deepcopy(teacher.config)
    student_cfg.num_hidden_layers = len(keep)
    layer_types = getattr(student_cfg, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == n_teacher:
        student_cfg.layer_types = [layer_types[i] for i in keep]
    for key, value in (config or {}).items():
        setattr(student_cfg, key, value)
    student = type(teacher)(student_cfg)
    teacher_sd = teacher.state_dict()
    new_sd: dict[str, torch.Tensor] = {}
    for key in student.state_dict():
        match = _LAYER_KEY.match(key)
        source = key
        if match:
            source = f"{match['prefix']}.{keep[int(match['idx'])]}.{match['rest']}"
        if source not in teacher_sd:
            raise BackboneError(f"student weight {key!r} has no teacher counterpart {source!r}")
        new_sd[key] = teacher_sd[source].detach().clone()
    student.load_state_dict(new_sd, strict=True)
    if getattr(student_cfg, "tie_word_embeddings", False):
        student.tie_weights()
    student = student.to(resolve_dtype(dtype))
    return student.to(device) if device is not None else student


def assert_same_vocabulary(tok_a: PreTrainedTokenizerBase, tok_b: PreTrainedTokenizerBase) -> None:
    """Raise :class:`VocabularyMismatchError` unless both tokenizers map the same ids to the same tokens.

    Token-level distillation compares distributions id by id; a different vocabulary would silently
    train on garbage. The message names both sizes and the first differing id.
    """
    name_a = getattr(tok_a, "name_or_path", "tokenizer A") or "tokenizer A"
    name_b = getattr(tok_b, "name_or_path", "tokenizer B") or "tokenizer B"
    vocab_a = {i: t for t, i in tok_a.get_vocab().items()}
    vocab_b = {i: t for t, i in tok_b.get_vocab().items()}
    size_a, size_b = len(tok_a), len(tok_b)
    if size_a == size_b and vocab_a == vocab_b:
        return
    first = next(
        (i for i in range(max(size_a, size_b, len(vocab_a), len(vocab_b))) if vocab_a.get(i) != vocab_b.get(i)),
        None,
    )
    where = (
        f"; first difference at id {first}: {vocab_a.get(first)!r} vs {vocab_b.get(first)!r}"
        if first is not None
        else ""
    )
    raise VocabularyMismatchError(
        f"vocabularies differ: {name_a} has {size_a} tokens, {name_b} has {size_b} tokens{where}"
    )


__all__ = [
    "BackboneError",
    "VocabularyMismatchError",
    "TINY_CONFIGS",
    "TINY_NAMES",
    "TASKS",
    "DTYPES",
    "resolve_dtype",
    "resolve_name",
    "looks_like_path",
    "tiny_config",
    "task_model_class",
    "load_backbone",
    "load_tokenizer",
    "load_generation_model",
    "count_parameters",
    "pad_token_id",
    "is_quantized",
    "build_student_from_teacher",
    "assert_same_vocabulary",
    "sample_tokenizer_dir",
]

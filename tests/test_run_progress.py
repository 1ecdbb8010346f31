"""Progress of launched runs: the run record's ``progress.json`` (child side) and the progress bar
:func:`kdlab.runs.launch_run` draws from it (parent side); Ctrl-C stops the child. Toy stage and
fake children: seconds per test."""

from __future__ import annotations

import _thread
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import lightning as L
import pytest
from conftest import REPO, TESTS_DIR
from kdlab.callbacks import run_record
from kdlab.callbacks.run_record import RunRecord

# The toy run of the CLI tests: 64 examples in batches of 8, 8 steps an epoch, 16 in 2 epochs;
# 8 validation batches.
from test_cli_runs import TOY  # noqa: E402
from toy_stage import ToyData, ToyRegression

from kdlab import runs
from kdlab.runs import PROGRESS_FILE, RunFailed, launch_run, read_progress


# ----------------------------------------------------------------------------- child side
def _trainer(run_dir: Path, command: str) -> L.Trainer:
    record = RunRecord(run_dir, "x: 1\n", seed=0, command=command, export_model=False)
    return L.Trainer(max_epochs=2, callbacks=[record], logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)


@pytest.fixture
def progress_writes(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Every progress.json the run record writes, in order (still written to disk too)."""
    writes: list[dict] = []
    real = run_record.write_json_atomic

    def spy(path, obj, durable=True):  # type: ignore[no-untyped-def]
        if Path(path).name == PROGRESS_FILE:
            assert durable is False, "progress.json is rewritten every second: no fsync"
            writes.append(dict(obj))
        real(path, obj, durable=durable)

    monkeypatch.setattr(run_record, "write_json_atomic", spy)
    return writes


def test_fit_writes_steps_and_total_at_start_and_end_and_throttles(
        tmp_path: Path, progress_writes: list[dict], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(run_record, "PROGRESS_EVERY_S", 1e9)  # only the forced writes
    before = time.time()
    _trainer(tmp_path, "fit").fit(ToyRegression(), datamodule=ToyData())
    assert [(w["stage"], w["step"], w["total"]) for w in progress_writes] == [("fit", 0, 16), ("fit", 16, 16)]
    on_disk = json.loads((tmp_path / PROGRESS_FILE).read_text())
    assert on_disk == progress_writes[-1] and set(on_disk) == {"stage", "step", "total", "epoch", "time"}
    assert before <= on_disk["time"] <= time.time() and isinstance(on_disk["epoch"], int)
    assert read_progress(tmp_path, since=before) == on_disk
    assert read_progress(tmp_path, since=time.time() + 10) is None, "older than the launch: ignored"
    assert not list(tmp_path.glob(".*.tmp"))


def test_fit_reports_every_step_and_its_validations_when_unthrottled(
        tmp_path: Path, progress_writes: list[dict], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(run_record, "PROGRESS_EVERY_S", 0.0)
    _trainer(tmp_path, "fit").fit(ToyRegression(), datamodule=ToyData())
    fit = [w["step"] for w in progress_writes if w["stage"] == "fit"]
    assert fit == [0, *range(1, 17), 16] and {w["total"] for w in progress_writes if w["stage"] == "fit"} == {16}
    validate = [(w["step"], w["total"]) for w in progress_writes if w["stage"] == "validate"]
    assert validate == [(i, 8) for i in range(9)] * 2, "two validations (one an epoch), no sanity check"


@pytest.mark.parametrize("command", ["validate", "test", "predict"])
def test_evaluation_commands_count_batches(tmp_path: Path, progress_writes: list[dict],
                                           monkeypatch: pytest.MonkeyPatch, command: str) -> None:
    monkeypatch.setattr(run_record, "PROGRESS_EVERY_S", 1e9)
    getattr(_trainer(tmp_path, command), command)(ToyRegression(), datamodule=ToyData())
    assert [(w["stage"], w["step"], w["total"]) for w in progress_writes] == [(command, 0, 8), (command, 8, 8)]


# ----------------------------------------------------------------------------- parent side
@pytest.fixture
def kdlab_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Children of launch_run can import kdlab and the toy stage; the test runs in tmp_path."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "toy.yaml"
    config.write_text(TOY)
    return config


def test_launch_run_shows_a_bar_and_returns_the_metrics(kdlab_env: Path, tmp_path: Path,
                                                        capfd: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "runs" / "toy"
    metrics = launch_run(["--config", str(kdlab_env)], run_dir, label="pipeline step toy")
    out, err = capfd.readouterr()
    assert "val/loss" in metrics and metrics == json.loads((run_dir / "metrics.json").read_text())
    assert f"[kdlab] pipeline step toy: started (log: {run_dir}.log)" in out
    assert "[kdlab] pipeline step toy: finished" in out
    assert "pipeline step toy: 100%" in err and "16/16 steps [" in err, err
    assert err.rstrip().endswith("steps/s]"), "the bar ends on its last state"
    progress = json.loads((run_dir / PROGRESS_FILE).read_text())
    assert (progress["stage"], progress["step"], progress["total"]) == ("fit", 16, 16)


def test_a_failing_child_raises_with_its_log_tail_and_no_bar(kdlab_env: Path, tmp_path: Path,
                                                            capfd: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "runs" / "bad"
    with pytest.raises(RunFailed) as failure:
        launch_run(["--config", str(kdlab_env), "--model.init_args.hidden=many"], run_dir, label="bad run")
    message = str(failure.value)
    assert message.startswith("bad run failed (exit ") and f"log: {run_dir}.log" in message
    assert message.splitlines()[-1].startswith("error: bad value for 'model.init_args.hidden'"), message
    out, err = capfd.readouterr()
    assert "[kdlab] bad run: started" in out and "finished" not in out
    assert "steps" not in err, "no progress was written, so no bar"


def test_ctrl_c_stops_a_launched_run_gracefully(kdlab_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               request: pytest.FixtureRequest) -> None:
    """Ctrl-C while a launched ``python -m kdlab`` run trains: the run stops through Lightning's
    graceful shutdown (its manifest says ``interrupted``) before KeyboardInterrupt reaches the caller."""
    monkeypatch.setattr(runs, "INTERRUPT_GRACE_SECONDS", (0.5, 30.0, 5.0))
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # see the test above
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous))
    run_dir = tmp_path / "runs" / "long"

    def interrupt_once_it_trains() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and read_progress(run_dir) is None:
            time.sleep(0.2)
        _thread.interrupt_main()

    threading.Thread(target=interrupt_once_it_trains, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        launch_run(["--config", str(kdlab_env), "--trainer.max_epochs=100000"], run_dir, label="long")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "interrupted" and "KeyboardInterrupt" in manifest["error"]


def _fake_child(tmp_path: Path, body: str) -> list[str]:
    """A stand-in for `python -m kdlab`: a short script that writes progress.json like a run."""
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent("""
        import json, os, signal, sys, time
        run_dir = sys.argv[1]

        def progress(stage, step, total):
            tmp = os.path.join(run_dir, ".progress.tmp")
            with open(tmp, "w") as f:
                json.dump({"stage": stage, "step": step, "total": total, "epoch": 0, "time": time.time()}, f)
            os.replace(tmp, os.path.join(run_dir, "progress.json"))
    """) + textwrap.dedent(body))
    return [sys.executable, str(script), str(tmp_path)]


def test_the_bar_switches_to_a_validation_and_back(tmp_path: Path, capfd: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runs, "BAR_REDRAW_SECONDS", {"tty": 0.0, "file": 0.0})
    monkeypatch.setattr(runs, "POLL_SECONDS", 0.05)
    (tmp_path / PROGRESS_FILE).write_text(json.dumps({"stage": "fit", "step": 99, "total": 100, "time": 0.0}))
    cmd = _fake_child(tmp_path, """
        for stage, step, total in [("fit", 0, 10), ("fit", 5, 10), ("validate", 2, 4), ("fit", 10, 10)]:
            progress(stage, step, total)
            time.sleep(0.3)
    """)
    with open(tmp_path / "log", "w") as log:
        assert runs._run_child(cmd, log, dict(os.environ), tmp_path, "step toy", quiet=True) == 0
    err = capfd.readouterr().err
    assert "99/100" not in err, "a progress.json older than the launch is not shown"
    assert "step toy:  50%" in err and "5/10 steps" in err
    assert "step toy (validation):  50%" in err and "2/4 batches" in err
    assert err.rstrip().split("\r")[-1].startswith("step toy: 100%") and "10/10 steps" in err


def test_unknown_total_and_quiet_false(tmp_path: Path, capfd: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runs, "POLL_SECONDS", 0.05)
    cmd = _fake_child(tmp_path, """
        progress("fit", 3, None)
        time.sleep(0.3)
        print("child output")
    """)
    with open(tmp_path / "log", "w") as log:
        assert runs._run_child(cmd, log, dict(os.environ), tmp_path, "open-ended", quiet=True) == 0
    assert "open-ended: 3 steps [" in capfd.readouterr().err
    with open(tmp_path / "log", "w") as log:
        assert runs._run_child(cmd, log, dict(os.environ), tmp_path, "loud", quiet=False) == 0
    out, err = capfd.readouterr()
    assert "child output" in out and "loud" not in err, "output on the terminal, no bar"


@pytest.mark.parametrize("ignores_sigint", [False, True])
def test_ctrl_c_stops_the_child_and_is_raised_again(tmp_path: Path, capfd: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch, ignores_sigint: bool,
                                                    request: pytest.FixtureRequest) -> None:
    monkeypatch.setattr(runs, "INTERRUPT_GRACE_SECONDS", (0.2, 0.5, 5.0))
    monkeypatch.setattr(runs, "POLL_SECONDS", 0.05)
    marker = tmp_path / "stopped"
    cmd = _fake_child(tmp_path, f"""
        def stop(signum, frame):
            open({str(marker)!r}, "w").write(signal.Signals(signum).name)
            sys.exit(1)
        signal.signal(signal.SIGINT, signal.SIG_IGN if {ignores_sigint} else stop)
        signal.signal(signal.SIGTERM, stop)
        progress("fit", 1, 10)
        time.sleep(60)
    """)
    # interrupt_main does nothing while SIGINT is ignored or default, which an earlier test of the
    # session (or a launcher) may have left behind: give this process Python's own Ctrl-C handler.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous))
    threading.Timer(1.0, _thread.interrupt_main).start()  # Ctrl-C in the parent only
    started = time.monotonic()
    procs: list[subprocess.Popen] = []
    real_popen = subprocess.Popen

    def popen(*args, **kwargs):  # type: ignore[no-untyped-def]
        procs.append(real_popen(*args, **kwargs))
        return procs[-1]

    monkeypatch.setattr(runs.subprocess, "Popen", popen)
    with open(tmp_path / "log", "w") as log, pytest.raises(KeyboardInterrupt):
        runs._run_child(cmd, log, dict(os.environ), tmp_path, "toy", quiet=True)
    assert procs[0].poll() is not None, "no orphan left running"
    assert marker.read_text() == ("SIGTERM" if ignores_sigint else "SIGINT")
    assert time.monotonic() - started < 10
    err = capfd.readouterr().err
    assert "1/10 steps" in err and "[kdlab] toy: interrupted, stopping the run" in err

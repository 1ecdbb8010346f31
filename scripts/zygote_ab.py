"""A/B of how :func:`kdlab.runs.launch_run` starts a run: forked from the zygote (the default) or as
a fresh ``python -m kdlab`` process (``KDLAB_ZYGOTE=0``). Each pair alternates, so a slow spell of a
shared machine falls on both alike.

1. The test suite's toy fit (16 steps, a few seconds of work) launched ``--toy-runs`` times each way:
   wall seconds per launch, and whether the metrics agree to every digit (the first forked launch
   also starts the zygote: its time includes the imports).
2. With a finished main-job pipeline directory: ``--sft-steps`` steps of its rank SFT (no validation,
   no export) each way, twice: the seconds inside the run (its manifest's start and end) and per
   launch, to show that a forked run computes as fast as a fresh one.

    python scripts/zygote_ab.py [runs/pipelines/disranker-quickstart/<run>]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _launch(args: list[str], run_dir: Path, forked: bool) -> tuple[float, float, dict[str, float]]:
    """(wall seconds, seconds inside the run, metrics) of one launch."""
    from kdlab import runs

    os.environ[runs.ZYGOTE_ENV] = "1" if forked else "0"
    started = time.perf_counter()
    metrics = runs.launch_run(args, run_dir, label=f"{'forked' if forked else 'fresh'} {run_dir.name}")
    wall = time.perf_counter() - started
    manifest = json.loads((run_dir / "manifest.json").read_text())
    inside = (dt.datetime.fromisoformat(manifest["end_time"]) - dt.datetime.fromisoformat(manifest["start_time"]))
    return wall, inside.total_seconds(), metrics


def toy(work: Path, launches: int) -> None:
    sys.path.insert(0, str(REPO / "tests"))
    from test_cli_runs import TOY

    config = work / "toy.yaml"
    config.write_text(TOY)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])
    walls: dict[bool, list[float]] = {True: [], False: []}
    metrics: dict[bool, list[dict[str, float]]] = {True: [], False: []}
    for i in range(launches):
        for forked in (True, False):
            wall, _, found = _launch(["--config", str(config)], work / f"toy{i}-{'forked' if forked else 'fresh'}", forked)
            walls[forked].append(wall)
            metrics[forked].append(found)
    same = all(m == metrics[False][0] for m in metrics[True] + metrics[False])
    print(f"toy fit, s per launch: forked {' / '.join(f'{w:.2f}' for w in walls[True])} (the first starts the zygote), "
          f"fresh {' / '.join(f'{w:.2f}' for w in walls[False])}; metrics identical: {same}")


def rank_sft(work: Path, pipeline: Path, steps: int) -> None:
    argv = json.loads((pipeline / "rank_sft_cpt" / "manifest.json").read_text())["argv"][2:]
    keep = [a for a in argv if not a.startswith(("--run.", "--trainer.max_steps", "--trainer.val_check_interval",
                                                 "--trainer.limit_val_batches"))]
    args = [*keep, f"--trainer.max_steps={steps}", "--trainer.limit_val_batches=0", "--run.export_model=false"]
    for i, forked in enumerate((False, True, False, True)):
        wall, inside, _ = _launch(args, work / f"sft{i}-{'forked' if forked else 'fresh'}", forked)
        print(f"rank SFT, {steps} steps, {'forked' if forked else 'fresh '}: {inside:.0f} s inside the run, "
              f"{wall:.1f} s per launch", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pipeline", type=Path, nargs="?", help="a finished main-job pipeline directory")
    parser.add_argument("--toy-runs", type=int, default=3)
    parser.add_argument("--sft-steps", type=int, default=8)
    args = parser.parse_args()
    from kdlab.machine import describe_machine, machine_record

    print(describe_machine(machine_record()))
    with tempfile.TemporaryDirectory() as tmp:
        toy(Path(tmp), args.toy_runs)
        if args.pipeline is not None:
            os.chdir(args.pipeline.resolve().parents[3])  # the pipeline's paths are relative to its clone
            rank_sft(Path(tmp), args.pipeline.resolve(), args.sft_steps)


if __name__ == "__main__":
    main()

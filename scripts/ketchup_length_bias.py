"""Why the real-weight PG runs shorten their outputs: the induced return against the output length.

Samples ``--samples`` continuations (temperature 1, the search's rollouts) of every held-out prompt
from a student, scores them with the teacher exactly as ``objective: pg`` does (centred logits,
``V = max``, zero tail) and prints, for each K, the Spearman correlation of the first token's return
``G_0`` (and of the per-token mean return) with the continuation's length, and ``G_0`` by length
bucket. A negative correlation means that, on the student's own samples, shorter continuations
earn more return: a policy gradient on it pushes the student to stop early.

    python scripts/ketchup_length_bias.py --student runs/real/ketchup-table-smollm2/setup-student/model \\
        --teacher runs/real/ketchup-table-smollm2/setup-teacher/model
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    import torch
    import yaml
    from scipy import stats

    from kdlab.data import Seq2SeqDataModule
    from kdlab.losses.returns import kstep_returns_from_logits
    from kdlab.models.served import load_teacher
    from kdlab.stages.rl_distill_kstep import RLDistillKStep

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", required=True, help="the student export (e.g. setup-student/model)")
    parser.add_argument("--teacher", required=True, help="the teacher export (e.g. setup-teacher/model)")
    parser.add_argument("--data-config", default=str(REPO / "experiments/real/ketchup/base.yaml"),
                        help="a config whose data.init_args build the prompts")
    parser.add_argument("--split", default="val", choices=["val", "test"])
    parser.add_argument("--samples", type=int, default=2, help="continuations per prompt")
    parser.add_argument("--k", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    data_args = dict(yaml.safe_load(Path(args.data_config).read_text())["data"]["init_args"])
    data = Seq2SeqDataModule(**data_args)
    data.setup("fit" if args.split == "val" else "test")
    loader = data.val_dataloader() if args.split == "val" else data.test_dataloader()
    stage = RLDistillKStep(backbone=args.student, tokenizer=data_args["tokenizer"], max_new_tokens=args.max_new_tokens,
                           num_samples_per_prompt=args.samples)
    stage.attach_teacher(load_teacher(args.teacher, "causal-lm"))
    lengths: list[int] = []
    first_returns: dict[int, list[float]] = {k: [] for k in args.k}
    mean_returns: dict[int, list[float]] = {k: [] for k in args.k}
    with torch.no_grad():
        for batch in loader:
            ro = stage.rollout(batch["prompt_input_ids"], batch["prompt_attention_mask"])
            t_logits = stage.teacher_action_logits(ro)
            n = ro.action_mask.sum(-1)
            lengths.extend(int(v) for v in n)
            for k in args.k:
                _, returns = kstep_returns_from_logits(t_logits, ro.actions, ro.action_mask, k=k)
                first_returns[k].extend(float(v) for v in returns[:, 0])
                mean_returns[k].extend(float(v) for v in returns.sum(-1) / n.clamp_min(1))
    print(f"{len(lengths)} sampled continuations ({args.samples} per prompt, T = 1) of the {args.split} prompts; "
          f"length mean {statistics.fmean(lengths):.2f}, min {min(lengths)}, max {max(lengths)}")
    buckets = [(1, 6), (7, 10), (11, 15), (16, args.max_new_tokens)]
    header = " | ".join(f"G_0, length {lo}-{hi}" for lo, hi in buckets)
    print(f"| K | Spearman(G_0, length) | p | Spearman(mean_t G_t, length) | {header} |")
    print("|---|---|---|---|" + "---|" * len(buckets))
    for k in args.k:
        rho, p = stats.spearmanr(first_returns[k], lengths)
        rho_mean, _ = stats.spearmanr(mean_returns[k], lengths)
        cells = []
        for lo, hi in buckets:
            values = [g for g, n in zip(first_returns[k], lengths) if lo <= n <= hi]
            cells.append(f"{statistics.fmean(values):.1f} (n {len(values)})" if values else "–")
        print(f"| {k} | {rho:+.3f} | {p:.2g} | {rho_mean:+.3f} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

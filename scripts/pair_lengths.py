"""How many tokens the main job's (query, document) pairs have, for the student (MiniLM-L6, a
cross-encoder pair) and the teacher (SmolLM2-135M, query and document in one text), and the mean
length each input limit leaves: is a shorter input a saving?

    python scripts/pair_lengths.py runs/pipelines/disranker-quickstart/<run>/labels/train.jsonl
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from kdlab.data.readers import read_ranking_jsonl
from kdlab.models.backbones import load_tokenizer

LIMITS = {"minilm-l6": (64, 56, 48), "smollm2-135m": (96, 80, 64)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ranking", type=Path, help="a ranking JSONL file (the labeled training queries)")
    args = parser.parse_args()
    groups = read_ranking_jsonl(str(args.ranking))
    for alias, limits in LIMITS.items():
        tokenizer = load_tokenizer(alias)
        if alias == "minilm-l6":
            lengths = [len(tokenizer(g.query, d.text)["input_ids"]) for g in groups for d in g.docs]
        else:
            lengths = [len(tokenizer(f"{g.query} {d.text}")["input_ids"]) for g in groups for d in g.docs]
        found = np.array(lengths)
        quartiles = " / ".join(f"{q:.0f}" for q in np.percentile(found, [10, 25, 50, 75, 90]))
        kept = ", ".join(f"{limit}: {np.minimum(found, limit).mean():.1f}" for limit in limits)
        print(f"{alias}: {found.size} pairs, tokens at the 10/25/50/75/90th percentiles {quartiles}; "
              f"mean tokens read at each limit: {kept}")


if __name__ == "__main__":
    main()

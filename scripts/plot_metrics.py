"""Plot metrics of one or more runs against steps, from their metrics.jsonl.

    python scripts/plot_metrics.py RUN_DIR [RUN_DIR ...] --keys eval/win_rate eval/gold_win_rate \
        --out docs/plot.png [--title TEXT]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--keys", nargs="+", default=["eval/win_rate"])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--title", default="")
    args = parser.parse_args()
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for run in args.runs:
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        for key in args.keys:
            points = [(r["step"], r[key]) for r in rows if key in r]
            label = key if len(args.runs) == 1 else f"{run.name}: {key}"
            ax.plot(*zip(*points), marker="o", label=label)
    ax.set_xlabel("optimizer step")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(args.title)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(args.out)


if __name__ == "__main__":
    main()

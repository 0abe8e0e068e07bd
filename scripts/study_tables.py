"""The paper's tables and Fig. 4 from the study's experiments (configs/study/), for docs/RESULTS.md.

Reads each experiment's results.csv and run directories, and prints Markdown: Table 1 beside the
paper's numbers, BPO's gain over each baseline per loss (paired by task and seed, with 95 %
stratified-bootstrap intervals), the F sweep (Fig. 4), the gold reference (Fig. 5) and training
stability with LoRA (Figs. 6 and 7). Writes the F-sweep plot.

    python scripts/study_tables.py --study runs/study --plot docs/study/fig4_sweep.png
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from bpo import stats  # noqa: E402

TASKS = ("digest", "quiz", "guard")
PAPER_TASKS = {"digest": "TL;DR", "quiz": "Helpfulness", "guard": "Harmlessness"}
PAPER = {  # Table 1 of arXiv 2406.12168 (DPO loss), win rate (%) vs the human reference
    "sft": (38.8, 66.2, 51.2),
    "offline_dpo": (72.0, 82.2, 77.5),
    "on_policy_dpo": (77.2, 90.6, 96.9),
    "on_policy_bpo": (89.5, 93.5, 97.7),
}
METHODS = ("offline_dpo", "on_policy_dpo", "on_policy_bpo")


def read(experiment: Path) -> list[dict]:
    """Finished runs of an experiment, with win_rate as a float."""
    with open(experiment / "results.csv", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["status"] == "done"]
    for r in rows:
        r["win_rate"] = float(r["win_rate"])
    return rows


def cell(rows: list[dict], **match: str) -> list[float]:
    """Win rates (%) of the runs whose fields equal `match`, in seed order."""
    chosen = [r for r in rows if all(r.get(k) == str(v) for k, v in match.items())]
    return [100 * r["win_rate"] for r in sorted(chosen, key=lambda r: int(r["seed"]))]


def mean_std(xs: list[float]) -> str:
    if not xs:
        return "-"
    std = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.fmean(xs):.1f} ± {std:.1f}"


def sft_win_rate(study: Path, task: str) -> float:
    return 100 * json.loads((study / "sft" / task / "summary.json").read_text())["win_rate"]


def table1(study: Path, rows: list[dict]) -> list[str]:
    """Table 1 in the paper's layout: ours (mean ± std over seeds) beside the paper's."""
    head = " | ".join(f"{t} ({PAPER_TASKS[t]})" for t in TASKS)
    lines = [f"| method | loss | {head} |", "| --- | --- |" + " --- |" * len(TASKS)]
    sft = [f"{sft_win_rate(study, t):.1f} ({p})" for t, p in zip(TASKS, PAPER["sft"])]
    lines.append(f"| SFT | - | {' | '.join(sft)} |")
    for loss in ("dpo", "ipo", "slic"):
        for method in METHODS:
            ours = [mean_std(cell(rows, **{"task.name": t, "method": method, "loss": loss}))
                    for t in TASKS]  # fmt: skip
            if loss == "dpo":
                ours = [f"{o} ({p})" for o, p in zip(ours, PAPER[method])]
            lines.append(f"| {method} | {loss} | {' | '.join(ours)} |")
    return lines


def gains(rows: list[dict], a: str, b: str, losses=("dpo", "ipo", "slic")) -> list[str]:
    """Mean win-rate gain of method a over b, paired by task and seed, per loss and pooled."""
    lines = [
        f"| loss | {a} − {b} (points) | 95 % interval | pairs | {a} better in |",
        "| --- | --- | --- | --- | --- |",
    ]
    for group in (*((loss,) for loss in losses), losses):
        strata = []
        for task in TASKS:
            for loss in group:
                xa = cell(rows, **{"task.name": task, "method": a, "loss": loss})
                xb = cell(rows, **{"task.name": task, "method": b, "loss": loss})
                if xa and len(xa) == len(xb):
                    strata.append(np.subtract(xa, xb))
        iv = stats.stratified_bootstrap(strata, np.mean)
        diffs = np.concatenate(strata)
        name = group[0] if len(group) == 1 else "all"
        lines.append(
            f"| {name} | {iv.point:+.1f} | [{iv.low:+.1f}, {iv.high:+.1f}] | {len(diffs)} "
            f"| {int((diffs > 0).sum())} of {len(diffs)} |"
        )
    return lines


def frequency(rows: list[dict], sweep: list[dict], plot: Path | None) -> list[str]:
    """Fig. 4: BPO (DPO) win rate against F; F = 1 and F = T come from Table 1's runs."""
    tasks = sorted({r["task.name"] for r in sweep}, key=TASKS.index)
    fs = sorted({int(r["F"]) for r in sweep})
    T = int(sweep[0]["T"])
    lines = [
        "| task | F = 1 (offline DPO) | "
        + " | ".join(f"F = {f}" for f in fs)
        + f" | F = T = {T} (on-policy BPO) | on-policy DPO |",
        "| --- |" + " --- |" * (len(fs) + 3),
    ]
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for task in tasks:
        points = {1: cell(rows, **{"task.name": task, "method": "offline_dpo", "loss": "dpo"})}
        points |= {f: cell(sweep, **{"task.name": task, "F": f}) for f in fs}
        points[T] = cell(rows, **{"task.name": task, "method": "on_policy_bpo", "loss": "dpo"})
        dpo = cell(rows, **{"task.name": task, "method": "on_policy_dpo", "loss": "dpo"})
        lines.append(
            f"| {task} | "
            + " | ".join(mean_std(points[f]) for f in points)
            + f" | {mean_std(dpo)} |"
        )
        xs = sorted(points)
        line = ax.errorbar(
            xs, [statistics.fmean(points[x]) for x in xs],
            [statistics.stdev(points[x]) for x in xs], marker="o", capsize=3, label=f"{task}: BPO",
        )  # fmt: skip
        ax.axhline(statistics.fmean(dpo), ls="--", color=line[0].get_color(),
                   label=f"{task}: on-policy DPO")  # fmt: skip
    if plot is not None:
        ax.set(xscale="log", xlabel="annotation phases F (N_total fixed)", ylabel="win rate (%)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        plot.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(plot, dpi=120)
    plt.close(fig)
    return lines


def gold(rows: list[dict], gold_rows: list[dict]) -> list[str]:
    """Fig. 5: on-policy DPO with the sft reference, with the gold reference, and on-policy BPO."""
    lines = [
        "| task | on-policy DPO, sft reference | on-policy DPO, gold reference "
        "| gold − sft reference (points) | on-policy BPO (= the gold reference model) |",
        "| --- | --- | --- | --- | --- |",
    ]
    strata = []
    for task in TASKS:
        sft = cell(rows, **{"task.name": task, "method": "on_policy_dpo", "loss": "dpo"})
        with_gold = cell(gold_rows, **{"task.name": task})
        bpo = cell(rows, **{"task.name": task, "method": "on_policy_bpo", "loss": "dpo"})
        strata.append(np.subtract(with_gold, sft))
        lines.append(
            f"| {task} | {mean_std(sft)} | {mean_std(with_gold)} "
            f"| {strata[-1].mean():+.1f} | {mean_std(bpo)} |"
        )
    iv = stats.stratified_bootstrap(strata, np.mean)
    lines.append(f"| all | | | {iv.point:+.1f} [{iv.low:+.1f}, {iv.high:+.1f}] | |")
    return lines


def stability(experiment: Path, key: str) -> list[str]:
    """Figs. 6 and 7: final win rate, its spread over seeds, and the worst fall from a peak."""
    rows = read(experiment)
    lines = [
        f"| {key} | final win rate (%) | 95 % interval of the mean "
        "| worst fall from a peak (points) | runs collapsed |",
        "| --- | --- | --- | --- | --- |",
    ]
    for value in dict.fromkeys(r[key] for r in rows):
        runs = [r for r in rows if r[key] == value]
        falls = []
        for r in runs:
            with open(Path(r["run_dir"]) / "metrics.jsonl", encoding="utf-8") as f:
                curve = [
                    100 * m["eval/win_rate"] for m in map(json.loads, f) if "eval/win_rate" in m
                ]
            falls.append(max(np.maximum.accumulate(curve) - curve))
        collapsed = sum(bool(r.get("collapsed_at_step")) for r in runs)
        finals = [100 * r["win_rate"] for r in runs]
        iv = stats.stratified_bootstrap([finals], np.mean)
        lines.append(
            f"| {value} | {mean_std(finals)} | [{iv.low:.1f}, {iv.high:.1f}] "
            f"| {statistics.fmean(falls):.1f} (max {max(falls):.1f}) | {collapsed} of {len(runs)} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", type=Path, default=Path("runs/study"))
    parser.add_argument("--plot", type=Path, default=None, help="where to write the F sweep")
    args = parser.parse_args()
    rows = read(args.study / "table1")
    sweep = read(args.study / "fig4_frequency")
    sections = [
        ("Table 1: win rate (%) vs the reference; ours mean ± std over 3 seeds (paper)",
         table1(args.study, rows)),
        *((f"On-policy BPO − {b}", gains(rows, "on_policy_bpo", b))
          for b in ("on_policy_dpo", "offline_dpo")),
        ("On-policy DPO − offline_dpo", gains(rows, "on_policy_dpo", "offline_dpo")),
        ("Fig. 4: BPO (DPO) against F", frequency(rows, sweep, args.plot)),
        ("Fig. 5: a gold reference", gold(rows, read(args.study / "fig5_gold"))),
        ("Fig. 6: LoRA members", stability(args.study / "fig6_ensemble", "lora.members")),
        ("Fig. 6, T = 300", stability(args.study / "fig6_ensemble_long", "lora.members")),
        ("Fig. 7: EMA reference, one LoRA", stability(args.study / "fig7_ema", "ema_tau")),
    ]  # fmt: skip
    for title, lines in sections:
        print(f"### {title}\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

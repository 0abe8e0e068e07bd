"""An experiment's RESULTS.md and plots, from its results.csv rows and run directories.

Runs are grouped into *labels* (their grid values other than task, loss and seed, e.g. a method
or an F), compared per cell (mean ± std over seeds, in the paper's layout: a column per task),
in aggregate across tasks × losses × seeds (median / IQM / mean with 95 % stratified-bootstrap
intervals, Agarwal et al. 2021) and head to head on the same evaluation prompts.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from safetensors import safe_open  # noqa: E402

from bpo import stats  # noqa: E402
from bpo.config import ExperimentConfig  # noqa: E402
from bpo.experiments import sft_path  # noqa: E402

STRATA = ("task.name", "loss")  # what an aggregate pools over, beside seeds
REPLICATE = "seed"


def label_keys(cfg: ExperimentConfig) -> list[str]:
    """The grid fields that tell compared variants apart (not task, loss, seed or one value)."""
    return [k for k, v in cfg.grid.items() if k not in (*STRATA, REPLICATE) and len(v) > 1]


def label(row: dict, keys: list[str]) -> str:
    """A run's variant name, e.g. `on_policy_bpo` or `F=2`."""
    if not keys:
        return "all"
    if keys == ["method"]:
        return str(row["method"])
    return ", ".join(f"{k}={row[k]}" for k in keys)


def write_report(cfg: ExperimentConfig, rows: list[dict], wall_seconds: float) -> Path:
    """Write RESULTS.md and the PNG plots into the experiment directory; return RESULTS.md."""
    root = Path(cfg.output_dir)
    keys = label_keys(cfg)
    done = [{**r, "label": label(r, keys)} for r in rows if r["status"] == "done"]
    failed = [r for r in rows if r["status"] == "failed"]
    lines = [
        f"# Experiment `{root.name}`",
        "",
        f"Command: `bpo experiment {root / 'experiment.yaml'}`. Runs: {len(rows)} "
        f"({len(done)} done, {len(failed)} failed); their training times add up to "
        f"{sum(float(r['wall_seconds']) for r in done) / 60:.0f} min; this invocation took "
        f"{wall_seconds / 60:.1f} min.",
        "",
        _budget(done),
        "",
    ]
    if failed:
        lines += ["Failed runs:", ""]
        lines += [f"- `{Path(r['run_dir']).name}`: {r.get('error', '')}" for r in failed]
        lines.append("")
    collapsed = [r for r in done if r.get("collapsed_at_step") is not None]
    if collapsed:
        lines += [
            "Runs that stopped early because the policy collapsed to one response per prompt",
            "(no pair left to annotate; their last evaluation counts):",
            "",
        ]
        lines += [
            f"- `{Path(r['run_dir']).name}` at step {r['collapsed_at_step']}" for r in collapsed
        ]
        lines.append("")
    lines += _cell_section(cfg, done)
    if len({r.get(REPLICATE) for r in done}) > 1:
        lines += _aggregate_section(cfg, done, root)
    for a, b in cfg.versus:
        lines += _versus_section(cfg, done, a, b)
    lines += _plots(cfg, done, keys, root)
    path = root / "RESULTS.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _budget(done: list[dict]) -> str:
    """T, B, N_total, F and the model size of the runs, as one sentence; when the runs do not
    share one budget, each (T, B) with its runs' labels, so no table reads as a like-for-like
    comparison that is not one."""
    if not done:
        return "No run has finished yet."
    first = done[0]
    config = OmegaConf.load(Path(first["run_dir"]) / "config.yaml")
    params = _parameters(Path(config["model"]["path"]))
    model = f"a {params / 1e6:.2f} M-parameter model" if params else f"`{config['model']['path']}`"
    fs = sorted({int(r["annotation_phases"]) for r in done})
    budgets: dict[tuple[int, int], list[str]] = {}
    for r in done:
        budgets.setdefault((int(r["T"]), int(r["B"])), []).append(r["label"])
    if len(budgets) == 1:
        size = (
            f"Budget per run: T = {first['T']} steps, B = {first['B']} pairs, N_total = T·B = "
            f"{first['N_total']} pairs"
        )
    else:
        size = "Budgets differ between runs (compare rows only at one budget): " + "; ".join(
            f"T = {t}, B = {b}, N_total = {t * b} pairs ({', '.join(sorted(set(labels)))})"
            for (t, b), labels in sorted(budgets.items())
        )
    return (
        f"{size}, F ∈ {{{', '.join(map(str, fs))}}}; {config['finetune']} "
        f"fine-tuning of {model}, lr {config['lr']}, "
        f"β = {config['beta']}; {config['sampling']['max_new_tokens']} new tokens."
    )


def _parameters(model_dir: Path) -> int:
    """Parameter count of a local safetensors checkpoint, from its headers (0 for a Hub id)."""
    total = 0
    for file in model_dir.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            total += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return total


def _cell_section(cfg: ExperimentConfig, done: list[dict]) -> list[str]:
    """Mean ± std over seeds per cell: a row per label (and loss), a column per task."""
    tasks = list(dict.fromkeys(r["task.name"] for r in done))
    has_loss = "loss" in cfg.grid
    cells = stats.cell_table(
        done,
        score=cfg.score,
        keys=("label", "loss", "task.name") if has_loss else ("label", "task.name"),
    )
    table: dict[tuple, dict[str, str]] = defaultdict(dict)
    if cfg.sft is not None:  # the starting point: each task's SFT model (one run, seed 0)
        sft_row = ("sft", "nll") if has_loss else ("sft",)
        for task in tasks:
            summary = sft_path(cfg, task) / "summary.json"
            if summary.is_file():
                table[sft_row][task] = f"{100 * json.loads(summary.read_text())[cfg.score]:.1f}"
    for c in cells:
        row_key = (c["label"], c["loss"]) if has_loss else (c["label"],)
        table[row_key][c["task.name"]] = f"{100 * c['mean']:.1f} ± {100 * c['std']:.1f}"
    head = ["variant", *(["loss"] if has_loss else []), *tasks]
    lines = [
        f"## {cfg.score} (%) per cell: mean ± std over seeds",
        "",
        "| " + " | ".join(head) + " |",
        "|" + " --- |" * len(head),
    ]
    for row_key, by_task in table.items():
        lines.append("| " + " | ".join([*row_key, *(by_task.get(t, "-") for t in tasks)]) + " |")
    n = max((c["n"] for c in cells), default=0)
    return [*lines, "", f"(n = {n} seeds per cell.)", ""]


def _aggregate_section(cfg: ExperimentConfig, done: list[dict], root: Path) -> list[str]:
    """Median / IQM / mean across tasks × losses × seeds with stratified-bootstrap intervals."""
    strata = tuple(s for s in STRATA if s in cfg.grid)
    table = stats.aggregate_table(
        done, score=cfg.score, by="label", strata=strata, n_resamples=cfg.n_resamples
    )
    lines = [
        f"## Aggregate {cfg.score} (%) across {' × '.join([*strata, 'seeds'])}, "
        "95 % stratified-bootstrap intervals",
        "",
        "| variant | runs | median | IQM | mean |",
        "| --- | --- | --- | --- | --- |",
    ]
    for t in table:
        cis = " | ".join(stats.format_interval(t[name]) for name in stats.AGGREGATES)
        lines.append(f"| {t['label']} | {t['n_runs']} | {cis} |")
    _plot_aggregates(table, root / "aggregates.png")
    return [*lines, "", "![aggregates](aggregates.png)", ""]


def _versus_section(cfg: ExperimentConfig, done: list[dict], a: str, b: str) -> list[str]:
    """Win rate of `a` over `b` on the same prompts, per task, pooled over losses and seeds."""
    by = cfg.compare_by
    others = [k for k in cfg.grid if k != by]
    index = {(str(r[by]), *(str(r[k]) for k in others)): r for r in done}
    pooled: dict[str, tuple[list[float], list[float]]] = defaultdict(lambda: ([], []))
    for key, row_a in index.items():
        row_b = index.get((b, *key[1:]))
        if key[0] != a or row_b is None:
            continue
        for task in (row_a["task.name"], "all"):
            pooled[task][0].extend(_rewards(row_a))
            pooled[task][1].extend(_rewards(row_b))
    lines = [f"## Head to head: {a} vs {b} (win rate of {a}, strictly higher reward)", ""]
    if not pooled:
        return [*lines, "No matching pairs of finished runs.", ""]
    if any(None in side for pair in pooled.values() for side in pair):
        return [*lines, "Needs per-prompt rewards; the runs were judged by a pairwise model.", ""]
    lines += [
        "| task | prompts | win rate of A (%) | win rate of B (%) |",
        "| --- | --- | --- | --- |",
    ]
    for task, (ra, rb) in sorted(pooled.items(), key=lambda item: item[0] == "all"):
        ab = stats.head_to_head_interval(ra, rb, n_resamples=cfg.n_resamples)
        ba = stats.head_to_head_interval(rb, ra, n_resamples=cfg.n_resamples)
        lines.append(
            f"| {task} | {len(ra)} | {stats.format_interval(ab)} | {stats.format_interval(ba)} |"
        )
    return [*lines, "", "(Ties count for neither; the intervals bootstrap over prompts.)", ""]


def _rewards(row: dict) -> list[float]:
    path = Path(row["run_dir"]) / "eval_outputs.jsonl"
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["reward"] for line in f]


def _curves(done: list[dict]) -> dict[str, dict[str, dict[int, list[float]]]]:
    """task -> label -> step -> win rates of the runs' evaluations.

    A run that stopped early (collapsed) keeps its last evaluation at the later steps of the
    runs that went on, so every mean is over the same runs.
    """
    runs: dict = defaultdict(lambda: defaultdict(list))  # task -> label -> [{step: win rate}]
    for r in done:
        with open(Path(r["run_dir"]) / "metrics.jsonl", encoding="utf-8") as f:
            curve = {
                m["step"]: m["eval/win_rate"] for m in map(json.loads, f) if "eval/win_rate" in m
            }
        runs[r["task.name"]][r["label"]].append((curve, r.get("collapsed_at_step") is not None))
    curves: dict = defaultdict(dict)
    for task, by_label in runs.items():
        for name, group in by_label.items():
            full = [c for c, collapsed in group if not collapsed] or [c for c, _ in group]
            steps = sorted({s for c in full for s in c})
            curves[task][name] = {
                s: [c[max(k for k in c if k <= s)] for c, _ in group] for s in steps
            }
    return curves


def _plots(cfg: ExperimentConfig, done: list[dict], keys: list[str], root: Path) -> list[str]:
    """Win rate against steps per task and, for one numeric variant field, score against it."""
    if not done:
        return []
    curves = _curves(done)
    fig, axes = plt.subplots(1, len(curves), figsize=(4.5 * len(curves), 3.4), squeeze=False)
    for ax, (task, by_label) in zip(axes[0], curves.items()):
        for name, by_step in by_label.items():
            steps = sorted(by_step)
            mean = [statistics.fmean(by_step[s]) for s in steps]
            std = [_std(by_step[s]) for s in steps]
            ax.plot(steps, [100 * m for m in mean], label=name)
            ax.fill_between(
                steps,
                [100 * (m - s) for m, s in zip(mean, std)],
                [100 * (m + s) for m, s in zip(mean, std)],
                alpha=0.2,
            )
        ax.set(title=task, xlabel="optimizer step", ylabel="win rate vs reference (%)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(root / "curves.png", dpi=120)
    plt.close(fig)
    lines = ["## Plots", "", "![win rate against steps](curves.png)", ""]
    if len(keys) == 1 and all(isinstance(r[keys[0]], int | float) for r in done):
        name = keys[0].replace(".", "_")
        _plot_score_vs(cfg, done, keys[0], root / f"{name}.png")
        lines += [f"![{cfg.score} against {keys[0]}]({name}.png)", ""]
    return lines


def _plot_score_vs(cfg: ExperimentConfig, done: list[dict], key: str, path: Path) -> None:
    by_task: dict = defaultdict(lambda: defaultdict(list))
    for r in done:
        by_task[r["task.name"]][r[key]].append(r[cfg.score])
    fig, ax = plt.subplots(figsize=(4.8, 3.4))
    for task, by_x in by_task.items():
        xs = sorted(by_x)
        ax.errorbar(
            xs, [100 * statistics.fmean(by_x[x]) for x in xs], [100 * _std(by_x[x]) for x in xs],
            marker="o", capsize=3, label=task,
        )  # fmt: skip
    if key == "F":
        ax.set_xscale("log")
    ax.set(xlabel=key, ylabel=f"final {cfg.score} (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_aggregates(table: list[dict], path: Path) -> None:
    """Intervals per variant for each aggregate, as rliable draws them."""
    fig, axes = plt.subplots(1, 3, figsize=(11, 0.5 * len(table) + 1.4), sharey=True)
    for ax, name in zip(axes, stats.AGGREGATES):
        for y, t in enumerate(table):
            iv = t[name]
            ax.barh(y, 100 * (iv.high - iv.low), left=100 * iv.low, height=0.6, alpha=0.6)
            ax.plot([100 * iv.point] * 2, [y - 0.3, y + 0.3], color="k")
        ax.set(title=name, xlabel="win rate (%)")
    axes[0].set_yticks(range(len(table)), [t["label"] for t in table])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _std(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0

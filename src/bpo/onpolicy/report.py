"""`bpo study-report ROOT`: the runs under ROOT (ROOT/<reward>/<data>-<method>/seed*/) as a table of
mean (standard error) over seeds beside Tajwar et al.'s Table 3, and plots of reward against
gradient steps, of reward against KL(π_θ‖π_ref), and of DPO / IPO's implicit rewards."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from bpo.checks import ConfigError  # noqa: E402
from bpo.onpolicy.bandit import REWARDS  # noqa: E402
from bpo.rundir import RunDir  # noqa: E402

PAPER_TABLE3 = {  # Tajwar et al. 2024, Table 3, bandit R1: mean (standard error) over 5 seeds
    ("r1", "offline", "dpo"): "0.82 (0.04)",
    ("r1", "offline", "ipo"): "0.82 (0.04)",
    ("r1", "on_policy", "ppo"): "0.92 (0.01)",
    ("r1", "on_policy", "rwr"): "0.88 (0.01)",
    ("r1", "on_policy", "dpo"): "0.92 (0.01)",
    ("r1", "on_policy", "ipo"): "0.92 (0.01)",
}


EARLY = 100
"""Gradient steps at which the table also reads the reward (the first evaluation at or after)."""


def paper_scale(reward: float, name: str) -> float:
    """Our reward on the authors' scale: their mean runs over 9 response tokens and the prompt,
    a uniformly drawn action; ours over 10 response tokens after a context token."""
    uniform = REWARDS[name](torch.arange(100)[:, None]).mean().item()  # E over a uniform token
    return 0.9 * reward + 0.1 * uniform


def _mean_se(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var / n)


def write_report(root: str | Path) -> Path:
    """RESULTS.md and curves.png in `root`; returns RESULTS.md."""
    root = Path(root)
    lines = [
        f"# Sample-based fine-tuning runs under `{root}`",
        "",
        f"Made by `bpo study-report {root}`. Reward: mean gold reward of π_θ's samples at the "
        "end; on the paper's scale: 0.9·reward + 0.1·E_uniform[R(a)] (the authors average over "
        "9 response tokens and a random prompt token). KL: mean log π_θ(y) − log π_ref(y) of "
        "those samples. Length: tokens before EOS. Mean (standard error) over seeds.",
        "",
        f"| reward | data | method | seeds | steps | reward at {EARLY} steps | reward "
        "| paper scale | Table 3 | KL | length |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    header = len(lines)
    for reward_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for cell in sorted(p for p in reward_dir.iterdir() if p.is_dir()):
            seeds = sorted(cell.glob("seed*/summary.json"))
            if not seeds:
                continue
            summaries = [json.loads(s.read_text()) for s in seeds]
            data, method = cell.name.split("-", 1)
            reward, se = _mean_se([s["reward"] for s in summaries])
            kl, kl_se = _mean_se([s["kl"] for s in summaries])
            length, length_se = _mean_se([s["length"] for s in summaries])
            paper = PAPER_TABLE3.get((reward_dir.name, data, method), "")
            scaled = (
                f"{paper_scale(reward, reward_dir.name):.2f}" if reward_dir.name in REWARDS else ""
            )
            curves = [_series(s.parent, "eval/reward", "eval/kl") for s in seeds]
            early, early_se = _mean_se([next(r for step, r, _ in c if step >= EARLY or
                                             step == c[-1][0]) for c in curves])  # fmt: skip
            lines.append(
                f"| {reward_dir.name.upper()} | {data} | {method} | {len(summaries)} | "
                f"{summaries[0]['steps']} | {early:.3f} ({early_se:.3f}) | {reward:.3f} ({se:.3f}) "
                f"| {scaled} | {paper} | {kl:.1f} ({kl_se:.1f}) | {length:.2f} ({length_se:.2f}) |"
            )
            steps = [step for step, _, _ in curves[0]]
            mean_reward = [sum(c[i][1] for c in curves) / len(curves) for i in range(len(steps))]
            mean_kl = [sum(c[i][2] for c in curves) / len(curves) for i in range(len(steps))]
            label = f"{reward_dir.name} {data} {method}"
            axes[0].plot(steps, mean_reward, label=label)
            axes[1].plot(mean_kl, mean_reward, marker=".", label=label)
            implicit = _series(seeds[0].parent, "rewards/chosen", "rewards/rejected")
            if implicit:
                line = axes[2].plot([i[0] for i in implicit], [i[1] for i in implicit],
                                    label=f"{label} y_w")  # fmt: skip
                axes[2].plot([i[0] for i in implicit], [i[2] for i in implicit], ls="--",
                             color=line[0].get_color(), label=f"{label} y_l")  # fmt: skip
    if len(lines) == header:
        raise ConfigError(
            f"root: no runs under {root} (ROOT/<task>/<data>-<method>/seed*/summary.json); give "
            "the folder the study's runs were written into"
        )
    axes[0].set(xlabel="gradient steps", ylabel="reward of π_θ's samples", title="reward")
    axes[1].set(xlabel="KL(π_θ‖π_ref)", ylabel="reward", title="KL-reward trade-off")
    axes[2].set(xlabel="gradient steps", ylabel="β·log π_θ(y)/π_ref(y) (π_β for BPO)",
                title="implicit rewards of y_w (solid), y_l (dashed), first seed")  # fmt: skip
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(root / "curves.png", dpi=110)
    plt.close(fig)
    lines += ["", "![reward and KL-reward curves](curves.png)", ""]
    path = root / "RESULTS.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _series(run_dir: Path, *keys: str) -> list[tuple]:
    """(step, *values of `keys`) of each metrics record of a run that has `keys[0]`."""
    records = RunDir(run_dir).read_metrics()
    return [(r["step"], *(r[k] for k in keys)) for r in records if keys[0] in r]

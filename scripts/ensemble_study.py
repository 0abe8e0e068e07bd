"""The paper's Fig. 6 at CPU scale: does a 5-member LoRA ensemble stabilise online DAP?

Runs on-policy BPO and on-policy DPO on `digest` with k = 1 and k = 5 LoRA members, several
seeds, from the SFT model `bpo demo` writes; skips cells already finished; then plots win rate
against steps (mean ± std over seeds) and prints a Markdown table of the final figures.

    python scripts/ensemble_study.py --sft-model runs/demo/sft/model --out runs/ensemble-study \
        --plot docs/ensemble_size.png
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

METHODS = ("on_policy_dpo", "on_policy_bpo")
MEMBERS = (1, 5)


def run_cell(args: tuple[str, str, int, int, list[str]]) -> str:
    """Train one cell in this worker process (one thread: cells run side by side)."""
    import torch
    from transformers.utils import logging as hf_logging

    from bpo.config import TrainConfig, load_config
    from bpo.online import train

    out, method, members, seed, overrides = args
    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()
    if (Path(out) / "summary.json").is_file() or (Path(out) / "collapsed.json").is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)  # an unfinished cell starts again
    cfg = load_config(TrainConfig, overrides=[
        f"output_dir={out}", f"method={method}", f"lora.members={members}", f"seed={seed}",
        *overrides])  # fmt: skip
    try:
        train(cfg, progress=False)
    except RuntimeError as e:  # the policy collapsed: no two distinct samples left to annotate
        steps = [json.loads(line).get("step", 0) for line in open(Path(out) / "metrics.jsonl")]
        (Path(out) / "collapsed.json").write_text(json.dumps({"step": max(steps), "error": str(e)}))
    return out


def evals(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "eval/win_rate" in r]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sft-model", default="runs/demo/sft/model")
    parser.add_argument("--out", default="runs/ensemble-study")
    parser.add_argument("--plot", default="docs/ensemble_size.png")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("overrides", nargs="*", help="key=value for every cell")
    args = parser.parse_args()
    base = [f"model.path={args.sft_model}", "finetune=lora", "lora.r=16", "lora.alpha=32",
            "lr=1e-3", "T=300", "B=16", "sampling.max_new_tokens=10", "eval.every=50",
            *args.overrides]  # fmt: skip
    cells = [(str(Path(args.out) / f"{m}-k{k}-s{s}"), m, k, s, base)
             for m in METHODS for k in MEMBERS for s in args.seeds]  # fmt: skip
    with ProcessPoolExecutor(args.jobs) as pool:
        for done in pool.map(run_cell, cells):
            print("done", done, flush=True)

    fig, axes = plt.subplots(1, len(METHODS), figsize=(10, 3.8), sharey=True)
    print("| method | members | final win rate (%) | final reward | KL(π‖π_sft) | runs |")
    print("| --- | --- | --- | --- | --- | --- |")
    for ax, method in zip(axes, METHODS):
        for k in MEMBERS:
            runs = [Path(c[0]) for c in cells if c[1] == method and c[2] == k]
            # a collapsed run stops; from there on it counts with its last win rate
            steps = max(([e["step"] for e in evals(r)] for r in runs), key=len)
            series = [[100 * e["eval/win_rate"] for e in evals(r)] for r in runs]
            series = [s + [s[-1]] * (len(steps) - len(s)) for s in series]
            mean = [statistics.mean(v) for v in zip(*series)]
            std = [statistics.pstdev(v) for v in zip(*series)]
            ax.plot(steps, mean, marker="o", label=f"k = {k}")
            ax.fill_between(steps, [m - s for m, s in zip(mean, std)],
                            [m + s for m, s in zip(mean, std)], alpha=0.2)  # fmt: skip
            finals = [evals(r)[-1] for r in runs]  # the last evaluation, before any collapse
            win = [100 * f["eval/win_rate"] for f in finals]
            collapsed = [json.loads((r / "collapsed.json").read_text())["step"]
                         for r in runs if (r / "collapsed.json").is_file()]  # fmt: skip
            note = f" (collapsed at step {', '.join(map(str, collapsed))})" if collapsed else ""
            print(
                f"| {method} | {k} | {statistics.mean(win):.1f} ± {statistics.pstdev(win):.1f} "
                f"| {statistics.mean(f['eval/reward'] for f in finals):.3f} "
                f"| {statistics.mean(f['eval/kl_sft'] for f in finals):.2f} "
                f"| {len(runs)}{note} |"
            )
        ax.set_title(method.replace("_", " "))
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_ylabel("win rate vs reference (%)")
    fig.suptitle("LoRA ensemble size on digest (mean ± std over seeds)")
    fig.tight_layout()
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=120)
    print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()

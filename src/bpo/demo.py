"""`bpo demo`: the whole method on the built-in `digest` task, on a CPU, in minutes.

Builds a tiny Llama and a word-level tokenizer, saves them with `save_pretrained`, runs SFT on
the noisy demonstrations, then offline DPO, on-policy DPO and on-policy BPO with the same
annotation budget N_total = T·B, and prints their win rates against the reference summaries.
"""

from __future__ import annotations

import time
from pathlib import Path

from bpo.config import SFTConfig, TrainConfig, load_config
from bpo.online import train
from bpo.sft import sft
from bpo.tasks import task_tokenizer
from bpo.tiny import build_tiny_llama

DEMO_MODEL = {"hidden_size": 96, "num_layers": 3, "num_heads": 3}
DEMO_SFT = ["epochs=6", "lr=3e-3", "batch_size=32", "sampling.max_new_tokens=10"]
DEMO_TRAIN = [
    "finetune=full",
    "lr=3e-4",
    "T=300",
    "B=16",
    "beta=0.1",
    "sampling.max_new_tokens=10",
    "eval.every=50",
]
DEMO_METHODS = ("offline_dpo", "on_policy_dpo", "on_policy_bpo")
QUICK_MODEL = {"hidden_size": 32, "num_layers": 2, "num_heads": 2}
QUICK = ["task.n_sft=64", "task.n_align=64", "task.n_eval=16"]
QUICK_SFT = [*QUICK, "epochs=1"]
QUICK_TRAIN = [*QUICK, "T=4", "B=4", "eval.every=0"]


def run_demo(
    out: str | Path = "runs/demo",
    sft_overrides: list[str] = (),
    train_overrides: list[str] = (),
    methods: tuple[str, ...] = DEMO_METHODS,
    progress: bool = True,
    quick: bool = False,
    task: str = "digest",
) -> list[dict]:
    """Run the demo on the built-in `task` into `out`; return one summary per stage (SFT first).

    `quick` shrinks the model, the data and T to a seconds-long check of an installation.
    """
    out = Path(out)
    started = time.perf_counter()
    if quick:
        sft_overrides = [*QUICK_SFT, *sft_overrides]
        train_overrides = [*QUICK_TRAIN, *train_overrides]
    sft_overrides = [f"task.name={task}", *sft_overrides]
    train_overrides = [f"task.name={task}", *train_overrides]
    model = QUICK_MODEL if quick else DEMO_MODEL
    base = build_tiny_llama(task_tokenizer(task), out / "base", **model)
    sft_cfg = load_config(
        SFTConfig,
        overrides=[f"output_dir={out / 'sft'}", f"model.path={base}", *DEMO_SFT, *sft_overrides],
    )
    summaries = [sft(sft_cfg, progress=progress)]
    for method in methods:
        cfg = load_config(
            TrainConfig,
            overrides=[
                f"output_dir={out / method}",
                f"model.path={out / 'sft' / 'model'}",
                f"method={method}",
                *DEMO_TRAIN,
                *train_overrides,
            ],
        )
        summaries.append(train(cfg, progress=progress))
    print(format_table(summaries, time.perf_counter() - started))
    return summaries


def format_table(summaries: list[dict], wall_seconds: float) -> str:
    """A Markdown table of the stages' win rates, rewards, KL and wall times."""
    lines = [
        "| method | loss | F | pairs | win rate | reward | KL(π‖π_sft) | length | seconds |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in summaries:
        lines.append(
            f"| {s['method']} | {s['loss']} | {s['F']} | {s['pairs_annotated']} "
            f"| {100 * s['win_rate']:.1f} % | {s['reward']:.3f} | {s.get('kl_sft', 0.0):.2f} "
            f"| {s['length']:.2f} | {s['wall_seconds']:.0f} |"
        )
    lines.append(f"\nTotal wall time: {wall_seconds:.0f} s")
    return "\n".join(lines)

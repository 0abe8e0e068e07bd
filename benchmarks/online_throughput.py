"""Online DPO end to end: bpo (on-policy BPO, on-policy DPO) against TRL's OnlineDPOTrainer.

Same model, prompts, batch (16 prompts, 2 samples each: 16 pairs per step), max_new_tokens,
temperature 1 (no top-k / top-p), Python reward (the digest task's gold reward), learning rate and
training mode (full fine-tuning or one LoRA), every run in a fresh child process of this one,
variants A/B/C interleaved over several repetitions. Prints, per model and mode:

  1. pairs per second (median over repetitions of each run's median step), and the ratios;
  2. peak resident memory of each child process;
  3. the per-stage wall time of a bpo step (sampling, annotation, behavior log-probs, pool, update);
  4. the same on a larger model (about 25 M parameters), where weights dominate memory and TRL's
     reference copy shows.

    pip install -e ".[bench]"            # trl, a benchmark-only dependency
    python benchmarks/online_throughput.py [--repeats 3] [--steps 12] [--threads 1]

A step is timed from its start to the end of the optimizer step: for bpo the `time/step` of
metrics.jsonl, for TRL a callback's on_step_begin → on_step_end. The first `--warmup` steps of
each run are left out. bpo's evaluation (8 prompts, at the start and the end) is outside the
timed steps; its KL estimate is off (TRL has none), so neither keeps an extra π_sft copy for it.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

B = 16  # prompts per step = pairs per step
MAX_NEW_TOKENS = 10
LR = {  # (model, mode) -> learning rate; the large model needs a small one not to collapse
    ("tiny", "full"): 3e-4, ("tiny", "lora"): 1e-3,
    ("large", "full"): 1e-5, ("large", "lora"): 1e-4,
}  # fmt: skip
LORA_R, LORA_ALPHA = 16, 32
MODELS = {  # name -> build_tiny_llama sizes
    "tiny": {"hidden_size": 96, "num_layers": 3, "num_heads": 3},
    "large": {"hidden_size": 512, "num_layers": 8, "num_heads": 8},
}
VARIANTS = ("bpo on_policy_bpo", "bpo on_policy_dpo", "trl online_dpo")


def child(spec: dict) -> dict:
    """One run in this (fresh) process: steps per second, peak memory, bpo's stages."""
    import torch

    torch.set_num_threads(spec["threads"])
    run = (run_bpo if spec["impl"] == "bpo" else run_trl)(spec)
    w = spec["warmup"]
    return {
        "pairs_per_s": B / statistics.median(run["step_seconds"][w:]),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "stages_ms": {k: 1000 * statistics.median(v[w:]) for k, v in run["stages"].items()},
        "prompts_per_pair": run["prompts_per_pair"],
    }


def run_bpo(spec: dict) -> dict:
    from bpo.config import TrainConfig, load_config
    from bpo.online import train
    from bpo.rundir import RunDir

    out = Path(spec["out"])
    overrides = [
        f"output_dir={out}", f"model.path={spec['model']}", f"method={spec['method']}",
        f"finetune={spec['finetune']}", f"lora.r={LORA_R}", f"lora.alpha={LORA_ALPHA}",
        f"lr={spec['lr']}", f"T={spec['steps']}", f"B={B}", "beta=0.1", "annotator.ties=random",
        f"sampling.max_new_tokens={MAX_NEW_TOKENS}", "eval.every=0", "eval.n_prompts=8",
        "eval.kl=false", "device=cpu", "task.n_sft=0", "task.n_align=2000", "task.n_eval=8",
    ]  # fmt: skip
    summary = train(load_config(TrainConfig, overrides=overrides), progress=False)
    steps = [r for r in RunDir(out).read_metrics() if "loss" in r]
    stages = {
        k.removeprefix("time/"): [r.get(k, 0.0) for r in steps]
        for k in steps[0]
        if k.startswith("time/") and k != "time/step"
    }
    # bpo drops pairs of identical responses and samples more prompts in their place (TRL trains
    # on them, with a zero loss); ties are broken at random in both
    per_pair = summary["prompts_sampled"] / summary["pairs_annotated"]
    return {"step_seconds": [r["time/step"] for r in steps], "stages": stages,
            "prompts_per_pair": per_pair}  # fmt: skip


def run_trl(spec: dict) -> dict:
    import warnings

    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    from bpo.config import TaskConfig
    from bpo.tasks import load_task
    from bpo.tasks.digest import reward

    warnings.filterwarnings("ignore")
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"])
    # TRL tokenizes prompts without special tokens, bpo with them: the literal <bos> gives both
    # the same ids; the reward reads the prompt without it
    bos = tokenizer.bos_token + " "
    prompts = load_task(TaskConfig(name="digest", n_sft=0, n_align=2000, n_eval=8)).align_prompts

    def gold(prompts, completions, **_) -> list[float]:
        return [reward(p.removeprefix(bos), c) for p, c in zip(prompts, completions)]

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.seconds: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self.started)

    args = OnlineDPOConfig(
        output_dir=spec["out"], use_cpu=True, bf16=False, gradient_checkpointing=False,
        per_device_train_batch_size=B, gradient_accumulation_steps=1, max_steps=spec["steps"],
        learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, beta=0.1, loss_type="sigmoid", max_new_tokens=MAX_NEW_TOKENS,
        temperature=1.0, top_k=0, top_p=1.0, disable_dropout=True, logging_steps=1,
        report_to="none", save_strategy="no", eval_strategy="no", seed=0,
    )  # fmt: skip
    peft_config = None
    if spec["finetune"] == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                 target_modules="all-linear", task_type="CAUSAL_LM")  # fmt: skip
    timer = Timer()
    trainer = OnlineDPOTrainer(
        model=model, reward_funcs=gold, args=args,
        train_dataset=Dataset.from_dict({"prompt": [bos + p for p in prompts]}),
        processing_class=tokenizer, peft_config=peft_config, callbacks=[timer],
    )  # fmt: skip
    trainer.train()
    return {"step_seconds": timer.seconds, "stages": {}, "prompts_per_pair": 1.0}


def build_models(root: Path, names: list[str]) -> dict[str, str]:
    from bpo.tasks.digest import build_tokenizer
    from bpo.tiny import build_tiny_llama

    return {n: str(build_tiny_llama(build_tokenizer(), root / n, **MODELS[n])) for n in names}


def spawn(spec: dict) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True
    )
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"child {spec} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12, help="steps per run (tiny model)")
    parser.add_argument("--large-steps", type=int, default=5, help="steps per run (large model)")
    parser.add_argument("--warmup", type=int, default=2, help="first steps of a run left out")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per child")
    parser.add_argument("--models", default="tiny,large")
    parser.add_argument("--modes", default="full,lora", help="training modes (tiny model)")
    parser.add_argument("--large-modes", default="full", help="training modes (large model)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(json.loads(args.child))), flush=True)
        return
    root = Path(tempfile.mkdtemp(prefix="bpo_bench_"))
    models = build_models(root, args.models.split(","))
    results: dict[tuple[str, str, str], list[dict]] = {}
    for rep in range(args.repeats):
        for name, path in models.items():
            for mode in (args.modes if name == "tiny" else args.large_modes).split(","):
                for variant in VARIANTS:  # A/B/C interleaved within each repetition
                    impl, method = variant.split()
                    steps = args.steps if name == "tiny" else args.large_steps
                    spec = {"impl": impl, "method": method, "finetune": mode, "model": path,
                            "lr": LR[(name, mode)], "steps": steps,
                            "warmup": min(args.warmup, steps - 1), "threads": args.threads,
                            "out": str(root / f"{name}-{mode}-{impl}-{method}-{rep}")}  # fmt: skip
                    results.setdefault((name, mode, variant), []).append(spawn(spec))
                    print(f"rep {rep} {name} {mode} {variant}: "
                          f"{results[(name, mode, variant)][-1]['pairs_per_s']:.1f} pairs/s",
                          file=sys.stderr, flush=True)  # fmt: skip
    print(report(results, args))


def report(results: dict[tuple[str, str, str], list[dict]], args: argparse.Namespace) -> str:
    """Markdown tables: throughput and memory with ratios to TRL, then bpo's stages."""
    med = lambda runs, key: statistics.median(r[key] for r in runs)  # noqa: E731
    lines = [
        f"{args.repeats} repetitions, {args.threads} torch thread(s) per run, B = {B} pairs per "
        f"step, {MAX_NEW_TOKENS} new tokens; medians.",
        "",
        "| model | mode | variant | pairs/s | × TRL | peak RSS (MB) | × TRL | prompts/pair |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for (name, mode, variant), runs in results.items():
        trl = results[(name, mode, "trl online_dpo")]
        speed, rss = med(runs, "pairs_per_s"), med(runs, "peak_rss_mb")
        per_pair = med(runs, "prompts_per_pair")
        lines.append(
            f"| {name} | {mode} | {variant} | {speed:.1f} | {speed / med(trl, 'pairs_per_s'):.2f} "
            f"| {rss:.0f} | {rss / med(trl, 'peak_rss_mb'):.2f} | {per_pair:.2f} |"
        )
    lines += ["", "bpo step by stage (ms, medians):", ""]
    stages = sorted({s for (_, _, v), runs in results.items() if v.startswith("bpo")
                     for r in runs for s in r["stages_ms"]})  # fmt: skip
    lines += [
        f"| model | mode | variant | {' | '.join(stages)} |",
        "|" + " --- |" * (3 + len(stages)),
    ]
    for (name, mode, variant), runs in results.items():
        if variant.startswith("bpo"):
            cells = [statistics.median(r["stages_ms"].get(s, 0.0) for r in runs) for s in stages]
            lines.append(
                f"| {name} | {mode} | {variant} | " + " | ".join(f"{c:.1f}" for c in cells) + " |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()

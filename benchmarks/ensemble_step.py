"""LoRA-ensemble speed: time per optimizer step and end-to-end pairs per second.

Compares, on the demo model (`bpo demo`'s tiny Llama), side by side in one process, A/B/C
interleaved over several repetitions:
  k = 1            one peft LoRA;
  k = 5 batched    bpo's ensemble: one forward/backward over the batch repeated 5 times;
  k = 5 sequential the BPO paper's code: one peft model with 5 adapters, for each member
                   set_adapter, forward, backward, clip, its own optimizer step.
Then end-to-end on-policy BPO (sampling + annotation + update) with k = 1 and k = 5.

    python benchmarks/ensemble_step.py [--repeats 5] [--steps 10] [--threads 2]
    python benchmarks/ensemble_step.py --device cuda [--hidden-size 512 --num-layers 8 ...]

On CUDA the timers are read after `torch.cuda.synchronize()`, so a step's queued kernels count
in its own time. `--hidden-size`, `--num-layers` and `--num-heads` replace the demo model by a
larger random Llama of the same tokenizer.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from bpo.config import LoraConfig, ModelConfig, TrainConfig, load_config
from bpo.demo import DEMO_MODEL
from bpo.losses import dpo_loss
from bpo.online import dap_update, train
from bpo.policy import Policy, disable_dropout
from bpo.pool import PairBatch, PreferencePair
from bpo.reference import BehaviorReference
from bpo.sequences import sequence_logps
from bpo.tasks.digest import build_tokenizer, make_task
from bpo.tiny import build_tiny_llama

R, ALPHA, B, K = 16, 32.0, 16, 5


def make_batches(policy: Policy, n: int, seed: int = 0) -> list[PairBatch]:
    """n batches of B pairs: digest prompts with random 3–8 token responses."""
    rng = random.Random(seed)
    prompts = policy.encode_prompts(make_task(seed, 0, n * B, 0).align_prompts)
    batches = []
    for j in range(n):
        pairs = []
        for p in prompts[j * B : (j + 1) * B]:
            chosen, rejected = (
                [rng.randrange(4, 66) for _ in range(rng.randint(3, 8))] + [2] for _ in "wl"
            )
            pairs.append(PreferencePair("", "", "", p, chosen, rejected, -10.0, -11.0, 0, 1.0))
        batches.append(PairBatch(pairs, policy.device, policy.pad_id))
    return batches


class Sequential:
    """The paper's loop: one peft model holding k adapters, trained one after another."""

    def __init__(self, model_path: str, device: torch.device) -> None:
        lm = AutoModelForCausalLM.from_pretrained(model_path).to(device)
        config = PeftLoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear",
                                lora_dropout=0.0)  # fmt: skip
        self.model = get_peft_model(lm, config, adapter_name="m0")
        for i in range(1, K):
            self.model.add_adapter(f"m{i}", config)
        disable_dropout(self.model)
        self.optimizers = []
        for i in range(K):
            params = [p for n, p in self.model.named_parameters() if f".m{i}." in n]
            self.optimizers.append(torch.optim.AdamW(params, lr=1e-4))

    def step(self, batch: PairBatch, cfg: TrainConfig) -> None:
        behavior = batch.behavior_chosen.to(batch.device), batch.behavior_rejected.to(batch.device)
        for i, optimizer in enumerate(self.optimizers):
            self.model.set_adapter(f"m{i}")  # also makes only m{i} trainable
            logps = sequence_logps(self.model, *batch.packed)
            chosen, rejected = logps.chunk(2)
            loss = dpo_loss(chosen, rejected, *behavior, cfg.beta).losses.mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(optimizer.param_groups[0]["params"], 1.0)
            optimizer.step()


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels (CUDA runs them asynchronously); no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, batches, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    for batch in batches:
        step(batch)
    synchronize(device)
    return (time.perf_counter() - start) / len(batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--e2e-steps", type=int, default=20)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up steps of each variant")
    parser.add_argument("--hidden-size", type=int, default=DEMO_MODEL["hidden_size"])
    parser.add_argument("--num-layers", type=int, default=DEMO_MODEL["num_layers"])
    parser.add_argument("--num-heads", type=int, default=DEMO_MODEL["num_heads"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()
    device = torch.device(args.device)
    tmp = Path(tempfile.mkdtemp())
    size = {"hidden_size": args.hidden_size, "num_layers": args.num_layers,
            "num_heads": args.num_heads}  # fmt: skip
    model_path = str(build_tiny_llama(build_tokenizer(), tmp / "model", **size))
    cfg = load_config(TrainConfig, overrides=[f"model.path={model_path}", "method=bpo", "F=1"])
    accelerator = Accelerator(cpu=device.type == "cpu")

    def bpo_step(members: int):
        policy = Policy.load(ModelConfig(model_path), "lora",
                             LoraConfig(r=R, alpha=ALPHA, members=members), 0, device)  # fmt: skip
        optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-4)
        reference = BehaviorReference()
        return policy, lambda batch: dap_update(
            policy, reference, batch.pairs, dpo_loss, cfg, optimizer, accelerator
        )

    single, single_step = bpo_step(1)
    _, batched_step = bpo_step(K)
    sequential = Sequential(model_path, device)
    batches = make_batches(single, args.steps)
    variants = {
        "k=1 (peft)": single_step,
        f"k={K} batched (bpo)": batched_step,
        f"k={K} sequential (paper)": lambda b: sequential.step(b, cfg),
    }
    for step in variants.values():  # warm-up
        for i in range(args.warmup):
            step(batches[i % len(batches)])
    synchronize(device)
    times = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, step in variants.items():
            times[name].append(time_steps(step, batches, device))
    med = {name: statistics.median(t) for name, t in times.items()}
    if size != DEMO_MODEL:
        n_params = sum(p.numel() for p in single.model.get_base_model().parameters())
        print(f"Model: hidden {args.hidden_size}, {args.num_layers} layers, "
              f"{args.num_heads} heads, {n_params / 1e6:.2f} M parameters\n")  # fmt: skip
    where = f"{args.threads} threads"
    if device.type == "cuda":
        where = f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    print(f"## Time per optimizer step (B = {B} pairs, r = {R}, {where}, "
          f"median of {args.repeats} × {args.steps} steps)\n")  # fmt: skip
    print("| variant | ms / step | vs k=1 |")
    print("| --- | --- | --- |")
    for name, t in med.items():
        print(f"| {name} | {1000 * t:.1f} | {t / med['k=1 (peft)']:.2f}× |")
    ratio = med[f"k={K} sequential (paper)"] / med[f"k={K} batched (bpo)"]
    print(f"\nk={K} batched is {ratio:.2f}× faster than the sequential loop.\n")

    rates = {1: [], K: []}
    for rep in range(max(1, args.repeats // 2)):
        for members in (1, K):
            run_cfg = load_config(TrainConfig, overrides=[
                f"output_dir={tmp / f'e2e-{members}-{rep}'}", f"model.path={model_path}",
                "method=on_policy_bpo", f"T={args.e2e_steps}", f"B={B}", "lora.r=16",
                "lora.alpha=32", f"lora.members={members}", "sampling.max_new_tokens=10",
                "eval.every=0", "eval.n_prompts=1", "eval.kl=false", "task.n_sft=0",
                "task.n_eval=1", f"device={args.device}"])  # fmt: skip
            summary = train(run_cfg, progress=False)
            rates[members].append(summary["pairs_annotated"] / summary["wall_seconds"])
    one, five = statistics.median(rates[1]), statistics.median(rates[K])
    print(f"## End-to-end on-policy BPO ({args.e2e_steps} steps of {B} pairs, "
          f"median of {len(rates[1])})\n")  # fmt: skip
    print("| members | pairs / s |")
    print("| --- | --- |")
    print(f"| 1 | {one:.1f} |\n| {K} | {five:.1f} |")
    print(f"\nk={K} runs at {five / one:.2f}× the pairs per second of k=1.")


if __name__ == "__main__":
    main()

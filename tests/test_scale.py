"""The memory-saving paths change no result: gradient accumulation over micro-batches and
gradient checkpointing end where the plain run ends; bf16 autocast trains."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from bpo.config import SFTConfig, load_config
from bpo.online import train
from bpo.rundir import RunDir
from bpo.sft import sft

from .conftest import TINY_TASK


def _weights(run_dir, name: str) -> dict[str, torch.Tensor]:
    return load_file(RunDir(run_dir).path / name)


@pytest.mark.parametrize(
    "setting",
    [["finetune=full"], ["finetune=lora", "lora.r=4", "lora.members=2"]],
    ids=["full", "lora-ensemble"],
)
def test_accumulation_and_checkpointing_give_the_plain_update(train_config, setting):
    runs = {
        name: train_config(name, "method=online_dpo", "F=2", *setting, *extra)
        for name, extra in (
            ("plain", []),
            ("micro", ["micro_batch_size=3"]),  # B = 4: micro-batches of 3 and 1 pairs
            ("checkpointing", ["gradient_checkpointing=true"]),
        )
    }
    losses = {}
    for name, cfg in runs.items():
        train(cfg, progress=False)
        losses[name] = [r["loss"] for r in RunDir(cfg.output_dir).read_metrics() if "loss" in r]
    file = (
        "policy/model.safetensors"
        if setting == ["finetune=full"]
        else "policy/ensemble.safetensors"
    )
    plain = _weights(runs["plain"].output_dir, file)
    for name in ("micro", "checkpointing"):
        assert losses[name] == pytest.approx(losses["plain"], abs=1e-5)
        other = _weights(runs[name].output_dir, file)
        for key, w in plain.items():
            torch.testing.assert_close(other[key], w, atol=1e-5, rtol=1e-4, msg=f"{name}: {key}")


def test_sft_accumulation_and_checkpointing_give_the_plain_update(tiny_model, tmp_path):
    def run(name: str, *extra: str) -> dict[str, torch.Tensor]:
        cfg = load_config(
            SFTConfig,
            overrides=[f"output_dir={tmp_path / name}", f"model.path={tiny_model}", *TINY_TASK,
                       "epochs=1", "batch_size=10", "device=cpu", "eval.n_prompts=4",
                       "sampling.max_new_tokens=4", *extra],
        )  # fmt: skip
        sft(cfg, progress=False)
        return load_file(tmp_path / name / "model" / "model.safetensors")

    plain = run("plain")
    for name, extra in (("micro", "micro_batch_size=4"), ("ckpt", "gradient_checkpointing=true")):
        other = run(name, extra)
        for key, w in plain.items():
            torch.testing.assert_close(other[key], w, atol=1e-5, rtol=1e-4, msg=f"{name}: {key}")


def test_bf16_autocast_trains(train_config):
    cfg = train_config("bf16", "method=on_policy_bpo", "precision=bf16")
    summary = train(cfg, progress=False)
    losses = [r["loss"] for r in RunDir(cfg.output_dir).read_metrics() if "loss" in r]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert 0.0 <= summary["win_rate"] <= 1.0


def test_ensemble_adapters_stay_float32_on_a_bf16_model(tiny_model):
    """Adam's small updates would vanish in bf16 adapters; the forward casts them instead, so a
    bf16 base samples and trains without autocast."""
    from bpo.config import LoraConfig, ModelConfig, SamplingConfig
    from bpo.policy import Policy
    from bpo.sequences import pack

    cpu = torch.device("cpu")
    policy = Policy.load(
        ModelConfig(tiny_model, "bfloat16"), "lora", LoraConfig(r=4, members=2), 0, cpu
    )
    assert {p.dtype for p in policy.trainable_parameters()} == {torch.float32}
    prompts = policy.encode_prompts(["the cat sat", "a dog ran"])
    responses = policy.generate(prompts, SamplingConfig(max_new_tokens=4), seed=0)
    with policy.training():
        packed = pack(prompts * 2, responses * 2, policy.pad_id, cpu)
        policy.member_logps(*packed).sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32
               for p in policy.trainable_parameters())  # fmt: skip

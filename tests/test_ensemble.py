"""LoRA ensembles: exact merge, peft export, per-member training, k = 1 equals a single LoRA."""

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from bpo.config import LoraConfig, ModelConfig
from bpo.ensemble import LoraEnsemble, target_names
from bpo.export import export_run
from bpo.online import train
from bpo.policy import Policy
from bpo.rundir import RunDir

CPU = torch.device("cpu")


def randomize(ensemble: LoraEnsemble, seed: int = 0) -> None:
    """Move every member off B = 0 so that merges have something to average."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ensemble.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=g))


def logits(model, ids):
    return model(input_ids=ids).logits


@pytest.fixture
def ids():
    return torch.randint(4, 66, (3, 12), generator=torch.Generator().manual_seed(1))


def test_members_have_distinct_initialisations(tiny_model):
    policy = Policy.load(ModelConfig(tiny_model), "lora", LoraConfig(r=4, members=3), 0, CPU)
    A = next(iter(policy.ensemble.layers.values())).lora_A  # (3, r, in)
    assert not torch.equal(A[0], A[1]) and not torch.equal(A[1], A[2])
    assert all(layer.lora_B.abs().sum() == 0 for layer in policy.ensemble.layers.values())


def test_merged_mode_is_the_mean_of_the_members(tiny_model, ids):
    """Merged logits equal the base with (1/k) Σ s·B_i·A_i added to each targeted weight."""
    policy = Policy.load(ModelConfig(tiny_model), "lora", LoraConfig(r=4, members=3), 0, CPU)
    randomize(policy.ensemble)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        for name, layer in policy.ensemble.layers.items():
            mean = (
                sum(layer.scaling * layer.lora_B[i] @ layer.lora_A[i] for i in range(3)) / 3
            )  # (out, in)
            base.get_submodule(name).weight += mean
        torch.testing.assert_close(logits(policy.model, ids), logits(base, ids), atol=1e-5, rtol=0)


def test_per_member_mode_runs_each_member_alone(tiny_model, ids):
    """Chunk i of a k·n batch gets exactly what member i alone (k = 1 merge) would give."""
    policy = Policy.load(ModelConfig(tiny_model), "lora", LoraConfig(r=4, members=3), 0, CPU)
    randomize(policy.ensemble)
    with torch.no_grad(), policy.ensemble.per_member():
        batched = logits(policy.model, ids.repeat(3, 1)).view(3, *ids.shape, -1)
    for i in range(3):
        alone = Policy.load(ModelConfig(tiny_model), "lora", LoraConfig(r=4, members=3), 0, CPU)
        with torch.no_grad():
            for name, layer in alone.ensemble.layers.items():
                src = policy.ensemble.layers[name]
                layer.lora_A.copy_(src.lora_A[i].expand_as(layer.lora_A))
                layer.lora_B.copy_(src.lora_B[i].expand_as(layer.lora_B))
            torch.testing.assert_close(batched[i], logits(alone.model, ids), atol=1e-5, rtol=0)


def test_per_member_gradient_clipping(tiny_model):
    policy = Policy.load(ModelConfig(tiny_model), "lora", LoraConfig(r=4, members=2), 0, CPU)
    params = policy.ensemble.parameters()
    for p in params:
        p.grad = torch.ones_like(p)
        p.grad[1] *= 1e-4  # member 1's gradient is tiny and must stay untouched
    expected_1 = [p.grad[1].clone() for p in params]
    norms = policy.clip_grad_norm_(1.0)
    assert norms[0] > 1.0 > norms[1]
    member_0 = torch.cat([p.grad[0].flatten() for p in params]).norm()
    assert member_0.item() == pytest.approx(1.0, rel=1e-4)
    for p, e in zip(params, expected_1):
        assert torch.equal(p.grad[1], e)


def test_export_agrees_with_the_merge_and_loads_with_plain_peft(train_config, ids):
    cfg = train_config("ens", "method=on_policy_bpo", "lora.members=3", "lora.r=4")
    train(cfg, progress=False)
    out = export_run(cfg.output_dir, RunDir(cfg.output_dir).path / "export")
    policy = Policy.load(
        cfg.model, "lora", cfg.lora, 0, CPU, adapter_path=RunDir(cfg.output_dir).policy
    )
    with torch.no_grad():
        expected = logits(policy.model, ids)
        merged = AutoModelForCausalLM.from_pretrained(out["merged"])
        adapter = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(cfg.model.path), out["adapter"]
        )
        torch.testing.assert_close(logits(merged, ids), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(logits(adapter, ids), expected, atol=1e-5, rtol=0)
        assert adapter.peft_config["default"].r == 12  # k·r
        member = load_file(f"{out['members']}/1/adapter_model.safetensors")
        name, layer = next(iter(policy.ensemble.layers.items()))
        key = next(k for k in member if name in k and "lora_A" in k)
        torch.testing.assert_close(member[key], layer.lora_A[1])


def test_peft_linear_weighted_adapter_is_not_the_mean(tiny_model, ids):
    """peft's add_weighted_adapter(..., "linear") adds cross terms B_i·A_j: with weights 1/k,
    k identical adapters give k times the delta, not the delta. Do not 'simplify' back to it."""
    lm = AutoModelForCausalLM.from_pretrained(tiny_model)
    config = PeftLoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
    model = get_peft_model(lm, config, adapter_name="m0")
    model.add_adapter("m1", config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "lora_A") and "m0" in module.lora_A:
                for part in (module.lora_A, module.lora_B):
                    part["m0"].weight.copy_(0.1 * torch.randn(part["m0"].weight.shape, generator=g))
                    part["m1"].weight.copy_(part["m0"].weight)  # identical members
    model.add_weighted_adapter(["m0", "m1"], [0.5, 0.5], "linear_merge", combination_type="linear")
    with torch.no_grad():
        model.set_adapter("m0")
        one = logits(model, ids)  # the exact mean of two identical members is either member
        model.set_adapter("linear_merge")
        linear = logits(model, ids)
    assert (linear - one).abs().max() > 1e-3


def test_k1_ensemble_trains_like_a_single_peft_lora(train_config, tiny_model):
    """Same initial A and B, same batches, same reference: the ensemble path with k = 1 takes
    the same optimizer steps as a plain peft LoRA."""
    from accelerate import Accelerator

    from bpo.losses import dpo_loss
    from bpo.online import dap_update
    from bpo.pool import PreferencePool
    from bpo.reference import SnapshotReference

    cfg = train_config("pairs", "method=offline_dpo", "T=3")
    train(cfg, progress=False)
    pairs = PreferencePool.read(RunDir(cfg.output_dir).pool)
    single = Policy.load(ModelConfig(tiny_model), "lora", LoraConfig(r=4), 0, CPU)
    lm = AutoModelForCausalLM.from_pretrained(tiny_model)
    names = target_names(lm, "all-linear")
    ensemble = LoraEnsemble(lm, LoraConfig(r=4), 1, names)
    peft_params = dict(single.model.named_parameters())
    with torch.no_grad():
        for name, layer in ensemble.layers.items():
            layer.lora_A[0].copy_(peft_params[f"base_model.model.{name}.lora_A.default.weight"])
            layer.lora_B[0].copy_(peft_params[f"base_model.model.{name}.lora_B.default.weight"])
    k1 = Policy(lm, single.tokenizer, CPU, ensemble)
    accelerator = Accelerator(cpu=True)
    for policy in (single, k1):
        reference = SnapshotReference(policy)
        optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-2)
        for t in range(3):
            batch = pairs[4 * t : 4 * t + 4]
            dap_update(policy, reference, batch, dpo_loss, cfg, optimizer, accelerator)
    for name, layer in ensemble.layers.items():
        torch.testing.assert_close(
            layer.lora_A[0], peft_params[f"base_model.model.{name}.lora_A.default.weight"],
            atol=1e-6, rtol=1e-5)  # fmt: skip
        torch.testing.assert_close(
            layer.lora_B[0], peft_params[f"base_model.model.{name}.lora_B.default.weight"],
            atol=1e-6, rtol=1e-5)  # fmt: skip
    assert any(layer.lora_B.abs().sum() > 0 for layer in ensemble.layers.values())


def test_sft_trains_all_members_and_preference_starts_from_them(tiny_model, tmp_path):
    from bpo.config import SFTConfig, TrainConfig, load_config
    from bpo.sft import sft
    from tests.conftest import TINY_TASK

    small = [*TINY_TASK, "device=cpu", "sampling.max_new_tokens=6", "eval.n_prompts=8"]
    sft_cfg = load_config(SFTConfig, overrides=[
        f"output_dir={tmp_path / 'sft'}", f"model.path={tiny_model}", "finetune=lora",
        "lora.members=2", "lora.r=4", "epochs=1", "lr=1e-2", *small])  # fmt: skip
    sft(sft_cfg, progress=False)
    saved = load_file(tmp_path / "sft" / "policy" / "ensemble.safetensors")
    B = next(v for k, v in saved.items() if k.endswith("lora_B"))
    assert B[0].abs().sum() > 0 and not torch.equal(B[0], B[1])
    cfg = load_config(TrainConfig, overrides=[
        f"output_dir={tmp_path / 'bpo'}", f"model.path={tiny_model}", "method=on_policy_bpo",
        "T=2", "B=2", f"lora.init_from={tmp_path / 'sft' / 'policy'}", *small])  # fmt: skip
    summary = train(cfg, progress=False)
    assert summary["pairs_annotated"] == 4

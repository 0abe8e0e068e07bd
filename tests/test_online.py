"""Algorithm 1: phases, budget, stored behavior log-probs, and the reference rules' identities."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from bpo.config import LoraConfig, ModelConfig
from bpo.online import train
from bpo.policy import Policy
from bpo.pool import PreferencePool
from bpo.rundir import RunDir


def adapter_weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(RunDir(run_dir).policy / "adapter_model.safetensors")


@pytest.mark.parametrize("F", [1, 2, 4])
def test_phases_budget_and_single_use(train_config, F):
    """T = 4, B = 4: phases start at t % K == 0, add M = K·B pairs each, N_total = 16 for all F."""
    cfg = train_config(f"F{F}", f"F={F}", "reference=behavior")
    summary = train(cfg, progress=False)
    run = RunDir(cfg.output_dir)
    K, M = 4 // F, 4 * (4 // F)
    pairs = PreferencePool.read(run.pool)
    assert len(pairs) == cfg.N_total == 16
    assert [sum(p.phase == f for p in pairs) for f in range(F)] == [M] * F
    steps = [r for r in run.read_metrics() if "loss" in r]
    assert [r["phase"] for r in steps] == [t // K for t in range(4)]
    assert [r["pairs_annotated"] for r in steps] == [(t // K + 1) * M for t in range(4)]
    assert summary["pairs_annotated"] == summary["pairs_used"] == 16
    assert summary["annotation_phases"] == F
    assert summary["annotator_calls"] >= 16


def test_pool_pops_without_replacement(tmp_path):
    pool = PreferencePool(tmp_path / "pool.jsonl")
    make = dict(prompt="x", chosen="a", rejected="b", prompt_ids=[1], chosen_ids=[2],
                rejected_ids=[3], behavior_chosen_logp=-1.0, behavior_rejected_logp=-2.0,
                phase=0)  # fmt: skip
    from bpo.pool import PreferencePair

    pool.add([PreferencePair(**make, margin=float(i)) for i in range(6)])
    first, second = pool.pop(4), pool.pop(2)
    assert [p.margin for p in first + second] == [0, 1, 2, 3, 4, 5]
    with pytest.raises(RuntimeError, match="1 pairs asked, 0 left"):
        pool.pop(1)
    assert len(PreferencePool.read(tmp_path / "pool.jsonl")) == 6


def test_stored_behavior_logps_are_teacher_forced(train_config, tiny_model):
    """BPO with F = 1: the behavior model is the initial policy; recompute each pair alone."""
    cfg = train_config("offline", "method=bpo", "F=1")
    train(cfg, progress=False)
    behavior = Policy.load(ModelConfig(tiny_model), "full", LoraConfig(), 0, torch.device("cpu"))
    for pair in PreferencePool.read(RunDir(cfg.output_dir).pool):
        chosen = behavior.logps([pair.prompt_ids], [pair.chosen_ids]).item()
        rejected = behavior.logps([pair.prompt_ids], [pair.rejected_ids]).item()
        assert pair.behavior_chosen_logp == pytest.approx(chosen, abs=1e-5)
        assert pair.behavior_rejected_logp == pytest.approx(rejected, abs=1e-5)


def test_on_policy_bpo_first_update_sees_the_behavior(train_config):
    """K = 1: each batch is fresh, so π_θ = π_β at its update, h = 0 and the DPO loss is log 2."""
    cfg = train_config("onbpo", "method=on_policy_bpo")
    train(cfg, progress=False)
    steps = [r for r in RunDir(cfg.output_dir).read_metrics() if "loss" in r]
    for r in steps:
        assert r["loss"] == pytest.approx(math.log(2), abs=1e-5)
        assert r["rewards/margins"] == pytest.approx(0.0, abs=1e-5)


def test_bpo_at_F1_is_offline_dpo(train_config):
    """DESIGN.md: offline DPO is BPO at F = 1 (π_β = π_sft); same seed, same parameters."""
    bpo = train_config("bpo", "method=bpo", "F=1")
    dpo = train_config("dpo", "method=offline_dpo")
    train(bpo, progress=False)
    train(dpo, progress=False)
    a, b = adapter_weights(bpo.output_dir), adapter_weights(dpo.output_dir)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)  # it did train


def test_ema_with_tau_zero_is_sft(train_config):
    ema = train_config("ema", "method=on_policy_dpo", "reference=ema", "ema_tau=0.0")
    sft = train_config("sft", "method=on_policy_dpo", "reference=sft")
    train(ema, progress=False)
    train(sft, progress=False)
    a, b = adapter_weights(ema.output_dir), adapter_weights(sft.output_dir)
    for k in a:
        assert torch.equal(a[k], b[k])


def test_ema_moves_and_gold_reference_runs(train_config, tiny_model):
    """A gold reference equal to π_sft gives the sft run; an EMA with τ > 0 gives another."""
    gold = train_config("gold", "method=on_policy_dpo", "reference=gold",
                        f"reference_path={tiny_model}")  # fmt: skip
    sft = train_config("sft", "method=on_policy_dpo")
    ema = train_config("ema", "method=on_policy_dpo", "reference=ema", "ema_tau=0.5")
    for cfg in (gold, sft, ema):
        train(cfg, progress=False)
    a, b, c = (adapter_weights(x.output_dir) for x in (gold, sft, ema))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    assert any(not torch.allclose(b[k], c[k]) for k in b)


def test_run_directory_contract(train_config):
    cfg = train_config("contract", "method=bpo", "F=2", "eval.every=2")
    train(cfg, progress=False)
    run = RunDir(cfg.output_dir)
    summary = json.loads(run.summary.read_text())
    for key in ("method", "loss", "reference", "F", "T", "pairs_annotated",
                "annotation_phases", "win_rate", "wall_seconds"):  # fmt: skip
        assert key in summary
    assert summary["method"] == "bpo" and summary["reference"] == "behavior"
    assert "method: bpo" in run.config.read_text()
    evals = [r["step"] for r in run.read_metrics() if "eval/win_rate" in r]
    assert evals == [0, 2, 4]
    step = next(r for r in run.read_metrics() if "loss" in r)
    for name in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins",
                 "rewards/accuracies", "logps/chosen", "logps/rejected"):  # fmt: skip
        assert name in step
    assert (run.policy / "adapter_config.json").is_file()
    with pytest.raises(FileExistsError, match="already holds a run"):
        train(cfg, progress=False)


def test_same_seed_same_metrics(train_config):
    a = train_config("a", "method=on_policy_bpo", "seed=3")
    b = train_config("b", "method=on_policy_bpo", "seed=3")
    train(a, progress=False)
    train(b, progress=False)

    def strip(rows: list[dict]) -> list[dict]:  # timings vary run to run
        return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]

    assert strip(RunDir(a.output_dir).read_metrics()) == strip(RunDir(b.output_dir).read_metrics())


def test_final_greedy_outputs_are_kept_with_their_gold_rewards(train_config):
    from bpo.tasks.digest import reward

    cfg = train_config("outputs", "method=on_policy_bpo")
    train(cfg, progress=False)
    rows = [json.loads(line) for line in RunDir(cfg.output_dir).eval_outputs.open()]
    assert len(rows) == cfg.eval.n_prompts
    assert all(r["reward"] == reward(r["prompt"], r["response"]) for r in rows)


def test_a_collapsed_policy_stops_the_run_and_keeps_it(train_config):
    """top_k = 1 samples one response per prompt: no pair can be formed, so the run stops at its
    first phase with a warning, evaluates, and says where it stopped."""
    cfg = train_config("collapsed", "method=on_policy_bpo", "sampling.top_k=1")
    with pytest.warns(UserWarning, match="stopping after 0 of 4 steps"):
        summary = train(cfg, progress=False)
    assert summary["collapsed_at_step"] == 0 and summary["pairs_used"] == 0
    assert RunDir(cfg.output_dir).eval_outputs.is_file()
    assert (
        train(train_config("fine", "method=on_policy_bpo"), progress=False)["collapsed_at_step"]
        is None
    )


def test_pairs_annotated_before_a_collapse_are_kept(train_config, monkeypatch):
    """A phase that collapses part-way still puts the pairs it annotated in the pool."""
    import bpo.online
    from bpo.pairs import PolicyCollapsed, collect_pairs

    def collapse_in_phase_1(*args, **kwargs):
        pairs, stats = collect_pairs(*args, **kwargs)
        if args[7] == 1:  # phase
            raise PolicyCollapsed("annotation phase 1: only 3 of 8 pairs", pairs[:3], stats)
        return pairs, stats

    monkeypatch.setattr(bpo.online, "collect_pairs", collapse_in_phase_1)
    cfg = train_config("partial", "method=bpo", "F=2")  # T = 4, B = 4: M = 8 pairs a phase
    with pytest.warns(UserWarning, match="stopping after 2 of 4 steps"):
        summary = train(cfg, progress=False)
    pool = PreferencePool.read(RunDir(cfg.output_dir).pool)
    assert [p.phase for p in pool] == [0] * 8 + [1] * 3
    assert summary["pairs_annotated"] == 11 and summary["collapsed_at_step"] == 2


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_own_logps_shortcut_changes_no_result(train_config, monkeypatch, finetune):
    """On-policy BPO with one model takes π_ref's log-probs from the update's own forward
    (no stored values, no second pass). The same run with them computed at collection and
    stored, and the same run with them recomputed by a reference forward (an EMA reference with
    τ = 1, θ' = θ before every step), give the same losses and parameters."""
    import bpo.online
    import bpo.reference

    runs = {"own": train_config("own", "method=on_policy_bpo", f"finetune={finetune}")}
    runs["recomputed"] = train_config(
        "recomputed", "method=on_policy_dpo", "reference=ema", "ema_tau=1.0", f"finetune={finetune}"
    )
    for name in runs:
        train(runs[name], progress=False)
    monkeypatch.setattr(bpo.reference, "reads_own_logps", lambda cfg, policy: False)
    monkeypatch.setattr(bpo.online, "stores_behavior_logps", lambda cfg, policy: True)
    runs["stored"] = train_config("stored", "method=on_policy_bpo", f"finetune={finetune}")
    train(runs["stored"], progress=False)
    assert all(
        p.behavior_chosen_logp is None
        for p in PreferencePool.read(RunDir(runs["own"].output_dir).pool)
    )
    assert all(
        p.behavior_chosen_logp is not None
        for p in PreferencePool.read(RunDir(runs["stored"].output_dir).pool)
    )
    losses = {
        n: [r["loss"] for r in RunDir(c.output_dir).read_metrics() if "loss" in r]
        for n, c in runs.items()
    }
    file = "model.safetensors" if finetune == "full" else "adapter_model.safetensors"
    weights = {n: load_file(RunDir(c.output_dir).policy / file) for n, c in runs.items()}
    for name in ("stored", "recomputed"):
        assert losses[name] == pytest.approx(losses["own"], abs=1e-5)
        for key, w in weights["own"].items():
            torch.testing.assert_close(
                weights[name][key], w, atol=1e-5, rtol=1e-4, msg=f"{name}: {key}"
            )

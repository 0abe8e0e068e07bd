"""`bpo study` / `bpo bandit`: the loop of Tajwar et al. (2404.14367) on bpo's engine — which
log-probs each method reads, the bandit's task, and runs that must learn."""

from __future__ import annotations

import json

import pytest
import torch

from bpo.cli import main
from bpo.config import ConfigError, load_config
from bpo.losses import ipo_loss
from bpo.onpolicy.config import StudyConfig, bandit_settings
from bpo.onpolicy.study import Samples, method_loss, run_study


def batch() -> Samples:
    """Two prompts × 3 samples; prompt 0's rewards 1 > 0.5 > 0, prompt 1's all tie."""
    return Samples(
        prompt_ids=[[0]] * 6,
        response_ids=[[i] for i in range(6)],
        rewards=torch.tensor([0.0, 1.0, 0.5, 0.2, 0.2, 0.2]),
        group=torch.tensor([0, 0, 0, 1, 1, 1]),
        behavior_logps=torch.tensor([-1.0, -2.0, -3.0, -1.0, -1.0, -1.0]),
        reference_logps=torch.tensor([-4.0, -5.0, -6.0, -4.0, -4.0, -4.0]),
    )


def config(*overrides: str) -> StudyConfig:
    return load_config(StudyConfig, overrides=["beta=0.5", *overrides])


def test_take_keeps_whole_prompts_renumbered_in_order():
    part = batch().take([1, 0])
    assert part.group.tolist() == [1, 1, 1, 0, 0, 0]  # prompt 1 became 0, prompt 0 became 1
    assert part.rewards.tolist() == pytest.approx([0.0, 1.0, 0.5, 0.2, 0.2, 0.2])


@pytest.mark.parametrize("reference, stored", [("sft", "reference_logps"),
                                               ("behavior", "behavior_logps")])  # fmt: skip
def test_ipo_reads_the_reference_it_is_given(reference, stored):
    """Prompt 0's ordered pairs by reward are (1, 2), (1, 0), (2, 0) — chosen first; prompt 1's
    ties give none. BPO (behavior) reads log π_β stored at collection, sft reads log π_ref."""
    logps = torch.tensor([-0.5, -0.7, -0.9, -0.1, -0.2, -0.3])
    loss, metrics = method_loss(config("method=ipo", f"reference={reference}"), batch(), logps)
    ref = getattr(batch(), stored)
    chosen, rejected = torch.tensor([1, 1, 2]), torch.tensor([0, 2, 0])
    expected = ipo_loss(logps[chosen], logps[rejected], ref[chosen], ref[rejected], 0.5)
    assert metrics["pairs"] == 3
    assert loss.item() == pytest.approx(expected.losses.mean().item())


def test_pref_ft_and_best_of_n_push_up_the_right_samples():
    """pref_ft: −log π of each pair's y_w (samples 1, 1, 2): (0.7 + 0.7 + 0.9) / 3. best-of-N:
    prompt 0's best is sample 1, prompt 1's tie goes to its first sample, 3: (0.7 + 0.1) / 2."""
    logps = torch.tensor([-0.5, -0.7, -0.9, -0.1, -0.2, -0.3])
    loss, _ = method_loss(config("method=pref_ft"), batch(), logps)
    assert loss.item() == pytest.approx((0.7 + 0.7 + 0.9) / 3)
    loss, _ = method_loss(config("method=best_of_n"), batch(), logps)
    assert loss.item() == pytest.approx((0.7 + 0.1) / 2)


def test_ppo_ratio_is_to_the_sampling_policy():
    """At log π_θ = log π_β every ratio is 1, nothing is clipped, and the loss is −mean(Â) = 0
    (Â standardised per prompt); log π_ref does not enter."""
    b = batch()
    loss, metrics = method_loss(config("method=ppo"), b, b.behavior_logps.clone())
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    assert metrics["ppo/clip_fraction"] == 0.0


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"^reference: behavior \(BPO\) is a reference for dpo"):
        config("method=ppo", "reference=behavior")
    with pytest.raises(ConfigError, match=r"^minibatch: 20 prompts per step, but B=10"):
        config("B=10", "minibatch=20")
    with pytest.raises(ConfigError, match=r"^data: offline, but ppo is an on-policy"):
        config("method=ppo", "data=offline")
    with pytest.raises(ConfigError, match=r"^N: must be >= 2"):
        config("N=1")
    with pytest.raises(
        ConfigError, match=r"^reuse: 1 steps × minibatch 4 prompts .* raise reuse to 4"
    ):
        config("B=16", "minibatch=4", "reuse=1")
    with pytest.raises(ConfigError, match=r"^B: 32 prompts per iteration, but the offline dataset"):
        config("data=offline", "B=32", "minibatch=32", "offline_prompts=16")
    with pytest.raises(ConfigError, match=r"^beta: RWR's weights exp\(Â/β\) reach exp\(108\)"):
        config("method=rwr", "beta=0.05", "N=30")
    with pytest.raises(ConfigError, match=r"^reference: behavior with data=offline is offline DPO"):
        config("method=dpo", "reference=behavior", "data=offline")


def bandit(tmp_path, method: str, data: str = "on_policy", **fields) -> StudyConfig:
    values = bandit_settings(data, method) | {"output_dir": str(tmp_path / f"{data}-{method}")}
    values |= {"iterations": 3, "eval_every": 3, "eval_samples": 100} | fields
    if data == "offline":
        values |= {"offline_prompts": 20, "B": 20, "minibatch": 20, "reuse": 20}
    return load_config(StudyConfig, values=values)


def test_on_policy_ipo_climbs_r1_and_logs_each_step(tmp_path):
    """R1 peaks at token 70, where π_ref has little mass: 30 steps of on-policy IPO must lift
    the mean reward of π_θ's samples well above π_ref's (measured: 0.05 -> 0.9)."""
    summary = run_study(bandit(tmp_path, "ipo"), progress=False)
    metrics = [json.loads(line) for line in (tmp_path / "on_policy-ipo" / "metrics.jsonl").open()]
    start = metrics[0]["eval/reward"]
    assert summary["steps"] == 30 and len([m for m in metrics if "loss" in m]) == 30
    assert start < 0.2 and summary["reward"] > start + 0.4
    assert summary["kl"] > 0
    assert {"rewards/chosen", "rewards/rejected", "logps/chosen"} <= set(metrics[1])


def test_offline_data_is_sampled_once_from_the_reference(tmp_path):
    """Offline IPO draws its batches from one dataset of π_ref's samples: with B = the dataset,
    every iteration sees the same batch reward."""
    run_study(bandit(tmp_path, "ipo", data="offline"), progress=False)
    metrics = [json.loads(line) for line in (tmp_path / "offline-ipo" / "metrics.jsonl").open()]
    batch_rewards = {round(m["reward/batch"], 9) for m in metrics if "reward/batch" in m}
    assert len(batch_rewards) == 1


def test_bandit_reward_gives_non_actions_nothing(tmp_path):
    from bpo.onpolicy.tasks import load_study_task

    task = load_study_task(bandit(tmp_path, "ipo"), tmp_path)
    rewards = task.reward([[100]] * 2, [[70] * 10, [70] * 5 + [100] * 5], None)
    assert rewards == pytest.approx([1.0, 0.5])


def test_cli_bandit_writes_a_run_directory(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["bandit", "--reward", "r2", "--method", "ipo", "--bpo", "--out", str(out),
            "iterations=1", "reuse=2", "eval_samples=20"]  # fmt: skip
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["reference"] == "behavior" and summary["task"] == "bandit_r2"
    assert (out / "config.yaml").is_file() and (out / "reference" / "config.json").is_file()


def test_report_averages_seeds_beside_the_paper(tmp_path):
    """Two seeds at reward 0.9 and 1.0: mean 0.95, standard error sd/√2 = 0.0707/1.414 = 0.05;
    on the paper's scale 0.9·0.95 + 0.1·E_uniform[R1] = 0.855 + 0.1·(10√π/100 ≈ 0.177) ≈ 0.87."""
    from bpo.onpolicy.report import write_report

    for seed, reward in ((0, 0.9), (1, 1.0)):
        run = tmp_path / "r1" / "on_policy-ipo" / f"seed{seed}"
        run.mkdir(parents=True)
        summary = {"reward": reward, "kl": 10.0, "steps": 5, "length": 10.0}
        (run / "summary.json").write_text(json.dumps(summary))
        evals = [{"step": s, "eval/reward": reward, "eval/kl": 2.0 * s} for s in (0, 5)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals))
    report = write_report(tmp_path).read_text()
    row = "| R1 | on_policy | ipo | 2 | 5 | 0.950 (0.050) | 0.950 (0.050) | 0.87 | 0.92 (0.01) |"
    assert row in report
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_skewed_picks_lean_long_and_are_plain_without_skew(monkeypatch):
    """Candidates of lengths 0..7 in random order: picks truncated from below at an exponential
    threshold (mean 4) 95 % of the time are longer on average than the first N (measured: 5.3 vs
    3.5 over 400 prompts); with the skew off they are the first N."""
    import random

    import bpo.onpolicy.tasks as tasks

    rng = random.Random(0)
    candidates = [rng.sample(range(8), 8) for _ in range(400)]
    picks = [tasks.skewed(c, 2, random.Random(i), 4.0) for i, c in enumerate(candidates)]
    skewed_mean = sum(c[i] for c, p in zip(candidates, picks) for i in p) / 800
    plain_mean = sum(c[i] for c in candidates for i in (0, 1)) / 800
    assert skewed_mean > plain_mean + 1.0
    assert all(len(set(p)) == 2 for p in picks)
    monkeypatch.setattr(tasks, "SKEW_PROBABILITY", 0.0)
    assert tasks.skewed([5, 0, 3], 2, random.Random(0), 4.0) == [0, 1]


def test_response_length_leaves_out_eos():
    from bpo.onpolicy.tasks import response_length

    assert response_length([5, 6, 2], eos_id=2) == 2
    assert response_length([2], eos_id=2) == 0
    assert response_length([5, 6, 7], eos_id=2) == 3


@pytest.mark.parametrize("task, data", [("min_length", "on_policy"),
                                        ("mode_length", "on_policy"),
                                        ("skew_length", "offline")])  # fmt: skip
def test_length_tasks_run_and_score_by_length(tmp_path, tiny_model, task, data):
    values = {
        "output_dir": str(tmp_path / task), "task": task, "model_path": tiny_model,
        "method": "dpo", "data": data, "B": 4, "N": 3, "minibatch": 2, "reuse": 2,
        "iterations": 2, "offline_prompts": 8, "eval_every": 2, "eval_samples": 16,
        "sampling": {"max_new_tokens": 6},
    }  # fmt: skip
    summary = run_study(load_config(StudyConfig, values=values), progress=False)
    assert summary["steps"] == 4 and 0 <= summary["length"] <= 6
    if task != "mode_length":
        assert summary["reward"] == pytest.approx(-summary["length"])


def test_length_tasks_need_a_model(tmp_path):
    from bpo.onpolicy.tasks import load_study_task

    with pytest.raises(ConfigError, match=r"^model_path: the min_length task starts from"):
        load_study_task(load_config(StudyConfig, overrides=["task=min_length"]), tmp_path)


@pytest.mark.parametrize("method", ["rwr", "reinforce", "best_of_n_negative"])
def test_sample_methods_weigh_each_sample_as_their_loss_says(method):
    """The loop hands its per-prompt groups to the losses of bpo.onpolicy.losses unchanged:
    the same value as calling the loss on the whole minibatch by hand."""
    from bpo.onpolicy import losses

    b = batch()
    logps = torch.tensor([-0.5, -0.7, -0.9, -0.1, -0.2, -0.3])
    cfg = config(f"method={method}", "beta=1.0")
    loss, _ = method_loss(cfg, b, logps)
    if method == "rwr":
        expected = losses.rwr_loss(logps, b.rewards, 1.0, b.group).losses
    elif method == "reinforce":
        expected = losses.reinforce_loss(logps, b.rewards, b.group).losses
    else:
        best = torch.tensor([False, True, False, True, False, False])  # ties: the first sampled
        worse = torch.tensor([True, False, True, False, False, False])  # prompt 1 ties its best
        expected = losses.negative_gradient_loss(logps, best, b.group, 1.0,
                                                 cfg.negative_threshold, worse).losses  # fmt: skip
    assert loss.item() == pytest.approx(expected.mean().item())


def test_bandit_then_study_report_from_the_cli(tmp_path, monkeypatch, capsys):
    """`bpo bandit` writes where `bpo study-report` reads; an empty root is an error."""
    monkeypatch.chdir(tmp_path)
    for seed in (0, 1):
        assert main(["bandit", "--reward", "r1", "--method", "ipo", "iterations=1", "reuse=1",
                     "eval_samples=20", f"seed={seed}"]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["study-report", "runs/bandit"]) == 0
    assert "| R1 | on_policy | ipo | 2 | 1 |" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    assert main(["study-report", "empty"]) == 2
    assert "root: no runs under empty" in capsys.readouterr().err


def test_ties_with_the_best_are_not_pushed_down_and_tied_minibatches_take_no_step():
    """Prompt 1's three samples tie: best-of-N's negative term leaves all of them alone (its loss
    is −log π of the first alone, 0.1, over 3 samples); a minibatch of tied prompts has no pair,
    and DPO then takes no optimizer step."""
    b = batch().take([1])
    logps = torch.tensor([-0.1, -0.2, -0.3])
    loss, metrics = method_loss(config("method=best_of_n_negative"), b, logps)
    assert loss.item() == pytest.approx(0.1 / 3) and metrics["negative/active"] == 0.0
    loss, metrics = method_loss(config("method=dpo"), b, logps)
    assert loss is None and metrics["pairs"] == 0

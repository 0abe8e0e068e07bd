"""Reward-model and preference-model training: the Bradley-Terry loss by hand, held-out accuracy
that a tiny model must actually learn on digest pairs, the saved models loaded by the annotators
that use them, pairs from a pool, and the `bpo train-rm` / `bpo train-pm` commands."""

import json
import math
import random

import pytest
import torch

from bpo.annotators import PreferenceModelAnnotator, RewardModelAnnotator
from bpo.cli import main
from bpo.config import (
    ConfigError,
    TrainConfig,
    load_config,
)
from bpo.online import train
from bpo.pool import PreferencePair, PreferencePool
from bpo.reward_model import (
    Pair,
    bradley_terry_loss,
    load_pairs,
    split_by_prompt,
    train_preference_model,
    train_reward_model,
)
from bpo.rm_config import PreferenceModelConfig, RewardModelConfig
from bpo.rundir import RunDir

DIGEST_PAIRS = ["data.task.n_sft=0", "data.task.n_eval=0", "data.task.n_align=2000"]
"""2000 alignment prompts, two candidate summaries each: about 1430 training pairs, 160 held out
and 410 ties dropped."""
LEARN = [*DIGEST_PAIRS, "epochs=2", "batch_size=16", "lr=1e-3", "device=cpu", "eval_every=60"]
"""About 180 steps, a few seconds on one CPU thread."""
LABELS = "labels=[cat,dog]"
"""Two single tokens of the digest tokenizer, which has neither A nor B."""
SMOKE = ["data.task.n_sft=0", "data.task.n_eval=0", "data.task.n_align=40", "batch_size=8",
         "data.eval_fraction=0.25", "device=cpu"]  # fmt: skip


def test_bradley_terry_loss_by_hand():
    """r_w − r_l = 1, 0, −2: −log σ(1) = log(1 + e^−1) = 0.31326, −log σ(0) = log 2 = 0.69315,
    −log σ(−2) = log(1 + e^2) = 2.12693; ∂/∂r_w = −σ(−(r_w − r_l)) = −0.26894 at margin 1, and
    ∂/∂r_l is its opposite."""
    chosen = torch.tensor([2.0, 0.0, -1.0], requires_grad=True)
    rejected = torch.tensor([1.0, 0.0, 1.0], requires_grad=True)
    losses = bradley_terry_loss(chosen, rejected)
    assert losses.tolist() == pytest.approx([0.31326, 0.69315, 2.12693], abs=1e-5)
    assert losses[0].item() == pytest.approx(math.log1p(math.exp(-1)), abs=1e-7)
    losses.sum().backward()
    assert chosen.grad[0].item() == pytest.approx(-0.26894, abs=1e-5)
    assert (chosen.grad == -rejected.grad).all()


def test_split_holds_out_whole_prompts():
    pairs = [Pair(f"x{i % 10}", f"w{i}", f"l{i}") for i in range(40)]  # 10 prompts, 4 pairs each
    train_pairs, held = split_by_prompt(pairs, 0.2, random.Random(0))
    assert len({p.prompt for p in held}) == 2 and len(held) == 8 and len(train_pairs) == 32
    assert not {p.prompt for p in held} & {p.prompt for p in train_pairs}


@pytest.fixture(scope="module")
def reward_run(tiny_model, tmp_path_factory) -> tuple[RewardModelConfig, dict]:
    out = tmp_path_factory.mktemp("rm") / "run"
    cfg = load_config(
        RewardModelConfig, overrides=[f"output_dir={out}", f"model.path={tiny_model}", *LEARN]
    )
    return cfg, train_reward_model(cfg, progress=False)


def test_reward_model_learns_held_out_preferences(reward_run):
    """Measured: accuracy 0.73 at seed 0 (0.73-0.81 over seeds 0-3); chance is 0.5 and the
    "ends with `.`, then longer wins" heuristic gets 0.66 on such pairs."""
    cfg, summary = reward_run
    assert summary["accuracy"] > 0.65
    assert summary["eval_loss"] < math.log(2) - 0.1  # better than the untrained σ(0)
    assert summary["method"] == "reward_model" and summary["loss"] == "bradley_terry"
    assert summary["pairs"] + summary["eval_pairs"] + summary["dropped_ties"] == 2000
    assert summary["dropped_ties"] > 0 and summary["T"] == 2 * math.ceil(summary["pairs"] / 16)
    metrics = RunDir(cfg.output_dir).read_metrics()
    evals = [m for m in metrics if "eval/accuracy" in m]
    assert [m["step"] for m in evals] == [60, 120, 180, summary["T"]][: len(evals)]
    assert evals[-1]["eval/accuracy"] == summary["accuracy"]
    assert {"rewards/margins", "rewards/accuracies", "grad_norm"} <= set(metrics[0])


def test_trained_reward_model_loads_as_annotator(reward_run):
    cfg, summary = reward_run
    held = load_pairs(cfg.data, cfg.seed).eval
    rm = RewardModelAnnotator(f"{cfg.output_dir}/model", "pair", batch_size=64)
    margins = rm.compare([p.prompt for p in held], [p.chosen for p in held],
                         [p.rejected for p in held])  # fmt: skip
    assert len(held) == summary["eval_pairs"]
    assert sum(m > 0 for m in margins) / len(held) == pytest.approx(summary["accuracy"])


@pytest.fixture(scope="module")
def preference_run(tiny_model, tmp_path_factory) -> tuple[PreferenceModelConfig, dict]:
    out = tmp_path_factory.mktemp("pm") / "run"
    cfg = load_config(
        PreferenceModelConfig,
        overrides=[f"output_dir={out}", f"model.path={tiny_model}", *LEARN, LABELS],
    )
    return cfg, train_preference_model(cfg, progress=False)


def test_preference_model_learns_and_loads_as_annotator(preference_run):
    """Measured: accuracy 0.73 at seed 0 (0.73-0.80 over seeds 0-3)."""
    cfg, summary = preference_run
    assert summary["method"] == "preference_model" and summary["accuracy"] > 0.65
    losses = [m["loss"] for m in RunDir(cfg.output_dir).read_metrics() if "loss" in m]
    assert sum(losses[-20:]) < sum(losses[:20]) * 0.8  # the label-token loss went down
    held = load_pairs(cfg.data, cfg.seed).eval
    pm = PreferenceModelAnnotator(f"{cfg.output_dir}/model", labels=("cat", "dog"))
    prefs = pm.compare([p.prompt for p in held], [p.chosen for p in held],
                       [p.rejected for p in held])  # fmt: skip
    assert sum(p > 0 for p in prefs) / len(held) == pytest.approx(summary["accuracy"])


def test_trained_preference_model_annotates_a_run(preference_run, train_config):
    cfg, _ = preference_run
    run = train_config(
        "pm-annotated", "method=offline_dpo", "annotator.type=preference_model",
        f"annotator.path={cfg.output_dir}/model", "annotator.labels=[cat,dog]",
    )  # fmt: skip
    assert train(run, progress=False)["pairs_annotated"] == 16


def test_cli_trains_a_reward_model(tiny_model, tmp_path, capsys):
    out = tmp_path / "rm"
    assert main(["train-rm", f"model.path={tiny_model}", f"output_dir={out}", *SMOKE]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary == json.loads(capsys.readouterr().out)
    assert summary["method"] == "reward_model" and 0 <= summary["accuracy"] <= 1
    assert (out / "config.yaml").is_file() and (out / "metrics.jsonl").is_file()
    RewardModelAnnotator(str(out / "model")).score(["a"], ["b"])


def test_cli_trains_a_preference_model_from_a_pool(tiny_model, tmp_path, capsys):
    """Pool pairs come as `bpo train` writes them; prompts repeat, and the split keeps each
    prompt's pairs together."""
    pool = PreferencePool(tmp_path / "pool.jsonl")
    rng = random.Random(0)
    words = ["cat", "dog", "rent", "job", "."]
    pool.add([
        PreferencePair(f"my {rng.choice(words)} tl;dr:", " ".join(rng.sample(words, 3)),
                       rng.choice(words), [], [], [], 0.0, 0.0, 0, 1.0)
        for _ in range(30)
    ])  # fmt: skip
    out = tmp_path / "pm"
    args = ["train-pm", f"model.path={tiny_model}", f"output_dir={out}", f"data.pool={pool.path}",
            LABELS, "data.eval_fraction=0.4", "batch_size=8", "device=cpu"]  # fmt: skip
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["pairs"] + summary["eval_pairs"] == 30 and summary["dropped_ties"] == 0
    PreferenceModelAnnotator(str(out / "model"), labels=("cat", "dog")).compare(["a"], ["b"], ["c"])


def test_errors_name_the_field(tiny_model, tmp_path, capsys):
    base = [f"model.path={tiny_model}", *SMOKE]
    assert main(["train-rm", *base, "data.eval_fraction=1.5"]) == 2
    assert "train-rm: error: data.eval_fraction: must lie strictly between 0 and 1" in (
        capsys.readouterr().err
    )
    assert main(["train-rm", *base, "encodng=chat"]) == 2
    assert "encodng: unknown field" in capsys.readouterr().err
    assert main(["train-rm", *base, f"output_dir={tmp_path / 'chat'}", "encoding=chat"]) == 2
    assert "encoding: chat, but the tokenizer" in capsys.readouterr().err
    assert main(["train-pm", *base, f"output_dir={tmp_path / 'ab'}"]) == 2  # digest has no A, B
    assert "labels: the tokenizer of" in capsys.readouterr().err
    assert main(["train-pm", *base, "labels=[cat,cat]"]) == 2
    assert "labels: must be two distinct strings" in capsys.readouterr().err
    assert main(["train-pm", *base, "data.pool=missing.jsonl"]) == 2
    assert "data.task: set but data.pool='missing.jsonl'" in capsys.readouterr().err
    pool = [
        f"model.path={tiny_model}",
        f"output_dir={tmp_path / 'pool'}",
        "data.pool=missing.jsonl",
    ]
    assert main(["train-pm", *pool]) == 2
    assert "data.pool: no file at missing.jsonl" in capsys.readouterr().err


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["annotator.labels=[cat,dog]"], r"^annotator\.labels: .* annotator\.type=function"),
        (["annotator.type=reward_model", "annotator.path=x", "annotator.answer_prefix=x"],
         r"^annotator\.answer_prefix: .* annotator\.type=reward_model does not read it"),
        (["annotator.type=preference_model", "annotator.path=x", "annotator.labels=[A]"],
         r"^annotator\.labels: must be two distinct strings"),
    ],
)  # fmt: skip
def test_annotator_labels_only_for_a_preference_model(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TrainConfig, overrides=["model.path=m", "method=offline_dpo", *overrides])


@pytest.mark.parametrize("command", ["train-rm", "train-pm"])
def test_interrupted_and_resumed_ends_where_an_uninterrupted_run_ends(
    command, tiny_model, tmp_path, monkeypatch, capsys
):
    """A run stopped during its 4th step (after the checkpoint at step 2, with an evaluation
    logged at step 1) and resumed gives the uninterrupted run's metrics and weights, bit for
    bit; `--resume` of the finished run is refused."""
    from safetensors.torch import load_file

    def args(name: str) -> list[str]:
        extra = [LABELS] if command == "train-pm" else []
        return [command, f"model.path={tiny_model}", f"output_dir={tmp_path / name}", *SMOKE,
                "batch_size=4", "lr=1e-3", "checkpoint_every=2", "eval_every=1",
                *extra]  # fmt: skip

    assert main(args("whole")) == 0
    step, calls = torch.optim.AdamW.step, {"n": 0}

    def crash_at_4(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", crash_at_4)
    with pytest.raises(KeyboardInterrupt):
        main(args("resumed"))
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    assert [p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir()] == ["step-000002"]
    assert main([*args("resumed"), "--resume"]) == 0
    whole, resumed = RunDir(tmp_path / "whole"), RunDir(tmp_path / "resumed")
    assert resumed.read_metrics() == whole.read_metrics()
    a, b = (load_file(run.path / "model" / "model.safetensors") for run in (whole, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()
    assert main([*args("resumed"), "--resume"]) == 2
    assert "has finished (summary.json); nothing to resume" in capsys.readouterr().err

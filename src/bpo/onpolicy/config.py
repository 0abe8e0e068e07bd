"""Config of `bpo study`: one method of Tajwar et al. 2024 (arXiv 2404.14367) on one task."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from bpo.checks import ConfigError, positive
from bpo.config import SamplingConfig, load_config
from bpo.onpolicy.losses import NEGATIVE_GRADIENT_THRESHOLD

Method = Literal[
    "pref_ft", "best_of_n", "best_of_n_negative", "rwr", "reinforce", "ppo", "dpo", "ipo"
]  # fmt: skip
PAIR_METHODS = ("pref_ft", "dpo", "ipo")
"""Methods trained on the ordered pairs of each prompt's samples (r(y_w) > r(y_l)). Pref-FT's
NLL runs over each pair's y_w, so a prompt's best sample counts N − 1 times, its worst never."""
StudyTask = Literal["bandit_r1", "bandit_r2", "min_length", "mode_length", "skew_length"]


@dataclass
class StudyConfig:
    """A sample-based preference fine-tuning run: each iteration samples N responses for B
    prompts (from π_θ on-policy, or from a fixed dataset offline), scores them with the task's
    gold reward, and takes `reuse` gradient steps on minibatches of those prompts."""

    output_dir: str = "runs/study"
    """Run directory (config.yaml, metrics.jsonl, summary.json)."""
    task: StudyTask = "bandit_r1"
    """The didactic bandit with reward R1 or R2 (App. I) or a length task (Sec. 4)."""
    model_path: str | None = None
    """π_ref's checkpoint, where fine-tuning starts; None for the bandit: one is built and
    fitted to π_ref in the run directory."""
    method: Method = "ipo"
    """pref_ft, best_of_n, best_of_n_negative, rwr, reinforce, ppo, dpo or ipo."""
    reference: Literal["sft", "behavior"] = "sft"
    """π_ref of dpo / ipo: the starting policy (sft) or the policy that sampled the batch
    (behavior: BPO, arXiv 2406.12168)."""
    data: Literal["on_policy", "offline"] = "on_policy"
    """Sample every iteration from π_θ, or draw from responses sampled once from π_ref."""
    iterations: int = 100
    """Data collection iterations."""
    B: int = 16
    """Prompts sampled per iteration (the paper's data per iteration), N responses each."""
    N: int = 10
    """Responses per prompt."""
    minibatch: int = 16
    """Prompts per gradient step (each with its N samples or its ordered pairs)."""
    reuse: int = 1
    """Gradient steps per collected batch (the paper's sample reuse T)."""
    offline_prompts: int = 1024
    """Prompts of the offline dataset, N responses each from π_ref (data=offline)."""
    ipo_average_logps: bool = False
    """IPO on length-averaged log-probs; False: summed, as the authors' bandit code sums (DESIGN's
    default for `bpo train` is averaged)."""
    beta: float = 0.05
    """τ of IPO, β of DPO, the temperature of RWR's weights, the weight of best-of-N's
    negative term."""
    clip: float = 0.2
    """PPO's ε: the ratio π_θ/π_sampling is clipped to [1 − ε, 1 + ε]."""
    negative_threshold: float = NEGATIVE_GRADIENT_THRESHOLD
    """best_of_n_negative pushes y down only while log π(y) − log π(y_best) exceeds this."""
    lr: float = 1e-4
    """Adam learning rate."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    eval_every: int = 10
    """Measure the reward and KL of π_θ's samples every this many iterations (and at the end)."""
    eval_samples: int = 512
    """Responses sampled from π_θ at each evaluation."""
    seed: int = 0
    """Seed of sampling, the offline dataset, the minibatch order and the bandit's π_ref fit."""
    device: str = "cpu"
    """cpu or cuda."""

    def __post_init__(self) -> None:
        positive(self, "iterations", "B", "minibatch", "reuse", "offline_prompts", "eval_samples",
                 "eval_every")  # fmt: skip
        if self.N < 2:
            raise ConfigError(f"N: must be >= 2 (pairs and best-of-N need two), got {self.N}")
        if self.minibatch > self.B:
            raise ConfigError(
                f"minibatch: {self.minibatch} prompts per step, but B={self.B} per iteration; "
                f"set minibatch <= B"
            )
        if self.reuse * self.minibatch < self.B:
            raise ConfigError(
                f"reuse: {self.reuse} steps × minibatch {self.minibatch} prompts train on fewer "
                f"than the B={self.B} prompts sampled per iteration; raise reuse to "
                f"{-(-self.B // self.minibatch)} or lower B"
            )
        if self.data == "offline" and self.B > self.offline_prompts:
            raise ConfigError(
                f"B: {self.B} prompts per iteration, but the offline dataset has "
                f"offline_prompts={self.offline_prompts}; set B <= offline_prompts"
            )
        if self.method == "rwr" and (self.N - 1) ** 0.5 / self.beta > 80:
            raise ConfigError(
                f"beta: RWR's weights exp(Â/β) reach exp({(self.N - 1) ** 0.5 / self.beta:.0f}) "
                f"with N={self.N}, beta={self.beta} and overflow; set beta >= "
                f"{(self.N - 1) ** 0.5 / 80:.3f} (e.g. beta=1)"
            )
        if self.beta <= 0 or self.clip <= 0 or self.lr <= 0:
            raise ConfigError(
                f"beta, clip, lr: must be > 0, got beta={self.beta}, clip={self.clip}, lr={self.lr}"
            )
        if self.reference == "behavior" and self.method not in ("dpo", "ipo"):
            raise ConfigError(
                f"reference: behavior (BPO) is a reference for dpo / ipo, got method="
                f"{self.method}; set method=dpo or ipo, or reference=sft"
            )
        if self.reference == "behavior" and self.data == "offline":
            raise ConfigError(
                "reference: behavior with data=offline is offline DPO / IPO (the dataset's "
                "sampler is π_ref); set reference=sft"
            )
        if self.data == "offline" and self.method in ("ppo", "reinforce"):
            raise ConfigError(
                f"data: offline, but {self.method} is an on-policy policy-gradient method; set "
                "data=on_policy"
            )


def bandit_settings(data: str, method: str) -> dict:
    """The authors' bandit settings (github.com/Asap7772/understanding-rlhf, scripts/): on-policy,
    10 prompts × 10 samples per iteration, 100 iterations of 10 full-batch steps; offline, one
    dataset of 100 prompts × 10 samples from π_ref and 100 full-batch steps. Adam at 1e-2 for
    DPO / IPO (their value); 1e-3 for the sample-based methods, which have no released scripts
    for the transformer bandit; RWR's temperature 1 (τ = 0.05 elsewhere)."""
    shape = (
        {"B": 10, "iterations": 100, "reuse": 10, "minibatch": 10}
        if data == "on_policy"
        else {"B": 100, "offline_prompts": 100, "iterations": 1, "reuse": 100, "minibatch": 100}
    )
    lr = 1e-2 if method in ("dpo", "ipo") else 1e-3
    beta = 1.0 if method == "rwr" else 0.05  # RWR: exp(Â/0.05) would reach e^60
    return {"data": data, "method": method, "N": 10, "lr": lr, "beta": beta, **shape,
            "sampling": {"max_new_tokens": 10}, "eval_every": 10, "eval_samples": 400}  # fmt: skip


def bandit_config(
    reward: str, method: str, data: str, bpo: bool, out: str | None, overrides: list[str]
) -> StudyConfig:
    """`bpo bandit`'s run: the authors' settings for `data` and `method`, the behavior reference
    with `bpo`, written to `out` or runs/bandit/<reward>/<data>-<method>/seed<seed> (the layout
    `bpo study-report` reads), then `overrides`."""
    seed = next((o.split("=", 1)[1] for o in overrides if o.startswith("seed=")), 0)
    name = f"{data}-{'bpo_' if bpo else ''}{method}"
    values = bandit_settings(data, method) | {
        "task": f"bandit_{reward}",
        "reference": "behavior" if bpo else "sft",
        "output_dir": out or f"runs/bandit/{reward}/{name}/seed{seed}",
    }
    return load_config(StudyConfig, values=values, overrides=overrides)

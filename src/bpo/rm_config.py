"""Configs of `bpo train-rm` and `bpo train-pm`: reward and preference models trained on pairs
(RLHF Workflow, arXiv 2405.07863)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from omegaconf import MISSING

from bpo.checks import ConfigError, positive, validate_checkpoints, validate_labels
from bpo.config import ModelConfig, TaskConfig


@dataclass
class PairDataConfig:
    """Preference pairs (x, y_w, y_l) to train a reward or preference model on."""

    pool: str | None = None
    """A `pool.jsonl` written by `bpo train`: train on its annotated pairs; None: make pairs from
    `task`."""
    task: TaskConfig = field(default_factory=TaskConfig)
    """Built-in task whose alignment prompts each get two sampled candidate responses, labelled by
    the task's gold reward (ties dropped). Only read when `pool` is None."""
    eval_fraction: float = 0.1
    """Fraction of the prompts held out (with all their pairs) to measure preference accuracy."""


@dataclass
class PairTrainingConfig:
    """What reward-model and preference-model training share (RLHF Workflow, arXiv 2405.07863)."""

    output_dir: str = MISSING
    """Run directory; the trained model is saved under `model/`."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: PairDataConfig = field(default_factory=PairDataConfig)
    max_length: int = 640
    """Most tokens per model input; longer inputs are truncated (as the annotator that loads the
    model truncates), counted and warned of."""
    epochs: int = 1
    """Passes over the training pairs."""
    batch_size: int = 32
    """Preference pairs per optimizer step (also pairs per forward when evaluating)."""
    lr: float = 2e-6
    """AdamW learning rate (RLHFlow's 8B Bradley-Terry reward models use 2e-6)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up steps, then cosine decay to 0."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm; 0 turns clipping off."""
    eval_every: int = 0
    """Measure held-out accuracy every this many optimizer steps (and at the end); 0: only at
    the end."""
    checkpoint_every: int = 200
    """Write a checkpoint (weights, optimizer, scheduler) every this many steps, for
    `--resume`; 0: none."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints are kept."""
    seed: int = 0
    """Seed of a new head's initialisation, the candidate responses, the held-out split, the
    order a preference model sees two responses in, and the data order."""
    device: str = "auto"
    """auto (accelerate picks), cpu or cuda."""
    precision: Literal["no", "bf16", "fp16"] = "no"
    """Mixed precision (accelerate)."""

    def __post_init__(self) -> None:
        positive(self, "epochs", "batch_size", "max_length")
        validate_checkpoints(self)
        if self.lr <= 0:
            raise ConfigError(f"lr: must be > 0, got {self.lr}; set e.g. lr=2e-6")
        if self.eval_every < 0:
            raise ConfigError(
                f"eval_every: must be >= 0 (0: only at the end), got {self.eval_every}"
            )
        if not 0 < self.data.eval_fraction < 1:
            raise ConfigError(
                f"data.eval_fraction: must lie strictly between 0 and 1, got "
                f"{self.data.eval_fraction}; the default holds out 0.1 of the prompts"
            )
        if self.data.pool is not None and self.data.task != TaskConfig():
            raise ConfigError(
                f"data.task: set but data.pool={self.data.pool!r} is used instead; remove "
                "data.task or data.pool"
            )


@dataclass
class RewardModelConfig(PairTrainingConfig):
    """A Bradley-Terry reward model: a sequence classifier with one output trained by maximum
    likelihood on preference pairs (RLHF Workflow, arXiv 2405.07863, Sec. 2)."""

    output_dir: str = "runs/reward_model"
    """Run directory; the reward model is saved under `model/` (load it with
    `annotator.type=reward_model annotator.path=<output_dir>/model`)."""
    encoding: Literal["pair", "chat"] = "pair"
    """How the model reads (x, y), as `annotator.encoding`: the tokenizer's text pair or a
    user/assistant chat through the tokenizer's chat template."""


@dataclass
class PreferenceModelConfig(PairTrainingConfig):
    """A pairwise preference model: a causal LM trained to name the better of two shown responses
    with its next token (RLHF Workflow, arXiv 2405.07863, Sec. 2)."""

    output_dir: str = "runs/preference_model"
    """Run directory; the preference model is saved under `model/` (load it with
    `annotator.type=preference_model annotator.path=<output_dir>/model`)."""
    lr: float = 5e-6
    """AdamW learning rate (RLHFlow's 8B preference models use 5e-6)."""
    labels: list[str] = field(default_factory=lambda: ["A", "B"])
    """The answers "first is better" and "second is better": two single tokens of the
    tokenizer, as `annotator.labels`."""
    answer_prefix: str = " [BEST] "
    """Text after the two responses that the answer follows, as `annotator.answer_prefix`."""

    def __post_init__(self) -> None:
        super().__post_init__()
        validate_labels(self.labels, "labels")

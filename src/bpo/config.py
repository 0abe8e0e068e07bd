"""Typed run configurations: YAML in, `key=value` overrides, resolved YAML out.

Every hyperparameter is a dataclass field with a one-line docstring. OmegaConf merges the schema,
the YAML file and the command-line overrides, rejecting unknown keys and mistyped values.
Derived quantities (K, M, N_total) are properties, never settable.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, TypeVar

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, ValidationError

from bpo.checks import (
    ConfigError,
    positive,
    resolve_method,
    validate_annotator,
    validate_checkpoints,
    validate_device,
    validate_lora,
    validate_sampling,
    validate_task,
    validate_train,
)
from bpo.losses import canonical_loss_name

Method = Literal["offline_dpo", "online_dpo", "on_policy_dpo", "bpo", "on_policy_bpo"]
ReferenceRule = Literal["behavior", "sft", "gold", "ema"]


@dataclass
class ModelConfig:
    path: str = MISSING
    """Hub id or local folder of a causal LM, loaded with `from_pretrained`."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype the weights are loaded in."""


@dataclass
class LoraConfig:
    r: int = 8
    """LoRA rank."""
    alpha: float = 16.0
    """LoRA scaling numerator: the delta is (alpha / r)·B·A."""
    target_modules: str = "all-linear"
    """peft's `target_modules`: "all-linear" or comma-separated module names."""
    members: int = 1
    """Ensemble size k: members trained together, merged as the mean of their deltas."""
    init_from: str | None = None
    """Start from a saved LoRA (a run's `policy/`, e.g. an SFT run's k members); None: fresh."""


@dataclass
class TaskConfig:
    name: Literal["digest", "quiz", "guard", "tldr", "hh_helpful", "hh_harmless"] = "digest"
    """A built-in task (digest, quiz, guard: prompts, demonstrations, references and a gold
    reward, made from a seed) or one of the paper's datasets (tldr, hh_helpful, hh_harmless),
    loaded with `datasets.load_dataset`."""
    seed: int = 0
    """Seed of the task's data generator, or of a dataset's shuffle into SFT / alignment sets."""
    n_sft: int | None = 4000
    """Number of SFT demonstrations; None (datasets only): every row not taken for alignment."""
    n_align: int = 2000
    """Number of alignment prompts (sampled during annotation phases)."""
    n_eval: int = 256
    """Number of held-out evaluation prompts with references."""
    dataset: str | None = None
    """Datasets only: Hub id, local folder, or one data file (.json/.jsonl/.csv, optionally .gz,
    or .parquet: its one split is "train"); None: CarperAI/openai_summarize_tldr for tldr,
    Anthropic/hh-rlhf for hh_*."""
    data_dir: str | None = None
    """Datasets only: `data_dir` of `load_dataset`; None: helpful-base / harmless-base for hh_*,
    none for tldr."""
    train_split: str = "train"
    """Datasets only: split the SFT demonstrations and the alignment prompts come from
    (disjoint: the alignment prompts are drawn first)."""
    eval_split: str = "test"
    """Datasets only: split the held-out evaluation prompts and references come from."""
    prompt_column: str = "prompt"
    """tldr: column holding the "SUBREDDIT: ... TITLE: ... POST: ... TL;DR:" prompt."""
    label_column: str = "label"
    """tldr: column holding the human summary (the SFT target and the evaluation reference)."""
    chosen_column: str = "chosen"
    """hh_*: column holding the preferred "\n\nHuman: ... \n\nAssistant: ..." transcript."""
    max_prompt_tokens: int | None = None
    """Datasets only: longest prompt in the policy's tokens; longer ones are truncated (the end of
    a conversation, the start of a post is kept) and counted, or rejected (`long_prompts`)."""
    long_prompts: Literal["truncate", "error"] = "truncate"
    """What a prompt longer than `max_prompt_tokens` gets: truncated (counted in the summary and
    warned of), or an error naming the row."""

    def __post_init__(self) -> None:
        validate_task(self)


@dataclass
class SamplingConfig:
    temperature: float = 1.0
    """Sampling temperature for collection (DESIGN: 1)."""
    top_k: int = 0
    """Top-k filter; 0 turns it off (DESIGN: off)."""
    top_p: float = 1.0
    """Nucleus filter; 1.0 turns it off (DESIGN: off)."""
    max_new_tokens: int = 16
    """Most tokens generated per response."""
    batch_size: int = 64
    """Most sequences per `generate` call (hf backend)."""
    backend: Literal["hf", "vllm"] = "hf"
    """Who samples responses: transformers' `generate` (hf) or an in-process vLLM engine (vllm;
    `pip install "bpo[vllm]"`, one CUDA process). Log-probs always come from the training model."""
    gpu_memory_utilization: float = 0.5
    """Share of GPU memory the vLLM engine may take (weights, activations, KV cache); vllm only."""
    max_model_len: int | None = None
    """Longest prompt + response the vLLM engine plans for; None: the model's own; vllm only."""

    def __post_init__(self) -> None:
        validate_sampling(self)


@dataclass
class AnnotatorConfig:
    type: Literal["function", "reward_model", "preference_model", "human"] = "function"
    """Who judges pairs: a Python reward function, a reward model, a pairwise preference model,
    or people, who label each phase's pairs with `bpo annotate RUN_DIR` (bpo.human)."""
    function: str | None = None
    """Reward function `module:function` with signature (prompt, response) -> float; None: the
    task's gold reward. Only for type=function."""
    path: str | None = None
    """Hub id or local folder of the reward_model / preference_model (`from_pretrained`)."""
    encoding: Literal["pair", "chat"] = "pair"
    """How a reward_model reads (x, y): the tokenizer's text pair (the BPO paper's DeBERTa
    simulator) or a user/assistant chat through the tokenizer's chat template."""
    max_length: int = 640
    """Most tokens a model reads per input; longer inputs are truncated, counted and warned of."""
    batch_size: int = 32
    """Most inputs per model forward."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype the reward_model / preference_model weights are loaded in."""
    noise_temperature: float = 0.0
    """Bradley-Terry label noise: y_w = a with probability σ((r_a − r_b)/temperature); 0: none."""
    length_penalty: float = 0.0
    """Reward r − coef·|y|, |y| in characters (RLHF Workflow, arXiv 2405.07863, Eq. 9); 0: none."""
    ties: Literal["drop", "random"] = "drop"
    """What to do with a pair the annotator scores equal."""
    retries: int = 2
    """Times a failed annotator call (it raised, or answered NaN / inf) is tried again."""
    on_failure: Literal["stop", "skip"] = "stop"
    """After the retries: stop the run, naming the error (resume it with --resume once fixed),
    or skip the call's pairs and go on (counted as dropped_failed)."""
    labels: list[str] = field(default_factory=lambda: ["A", "B"])
    """A preference_model's answers "first is better" and "second is better": two single tokens
    (as `bpo train-pm` trained it)."""
    answer_prefix: str = " [BEST] "
    """Text after the two responses that a preference_model's answer follows."""
    labels_per_pair: int = 1
    """human: different annotators who label each pair; with 2 or more their agreement is
    reported and the response more of them chose wins (an even split is a tie, which
    annotator.ties drops or breaks at random: an odd number avoids splits)."""
    wait: bool = True
    """human: wait for each phase's labels; false: stop with exit code 3 once the phase's pairs
    are written, and continue with the same command and --resume when they are labelled."""

    def __post_init__(self) -> None:
        validate_annotator(self)


@dataclass
class PairsConfig:
    samples_per_prompt: int = 2
    """Samples per prompt: 2 are compared by the annotator; with n > 2 the best against the
    worst by reward (RLHF Workflow, arXiv 2405.07863, Algorithm 2)."""
    temperatures: list[float] = field(default_factory=list)
    """Split each prompt's samples evenly over these temperatures (RLHF Workflow: [1.0, 0.7]);
    empty: all at sampling.temperature."""


@dataclass
class EvalConfig:
    every: int = 10
    """Evaluate every this many optimizer steps (and at the start and the end); 0: only at the
    start and the end."""
    n_prompts: int | None = None
    """Evaluate on the first n held-out prompts; None: all of them."""
    scorer: str | None = None
    """Reward function `module:function` that judges the win rate; None: the annotator without
    its label noise (the paper's protocol: the simulator that annotates also evaluates)."""
    kl: bool = True
    """Estimate KL(π_θ‖π_sft) from one sample per prompt."""


@dataclass
class TrainConfig:
    """Online preference optimization (Algorithm 1 of arXiv 2406.12168)."""

    output_dir: str = "runs/train"
    """Run directory (config.yaml, metrics.jsonl, summary.json, pool, checkpoints)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    finetune: Literal["lora", "full"] = "lora"
    """Train a LoRA adapter or all weights."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    method: Method | None = None
    """Sugar over F and reference (DESIGN.md); None: give F and reference directly."""
    loss: str = "dpo"
    """DAP loss: dpo, ipo or slic (TRL's sigmoid and hinge accepted)."""
    beta: float = 0.1
    """β of the loss: strength of the KL trust region."""
    ipo_average_logps: bool = True
    """IPO on length-averaged log-probs (as the paper's code and TRL); False: summed."""
    reference: ReferenceRule | None = None
    """π_ref: behavior (BPO), sft, gold (a checkpoint at reference_path) or ema."""
    reference_path: str | None = None
    """Checkpoint of the gold reference."""
    ema_tau: float = 0.0
    """τ of the EMA reference, θ' ← τθ + (1−τ)θ' after each step (paper Eq. 6)."""
    T: int = 40
    """Optimizer steps."""
    F: int | None = None
    """Annotation phases, 1 ≤ F ≤ T, dividing T."""
    B: int = 16
    """Preference pairs per optimizer step."""
    budget: int | None = None
    """The annotation budget N_total the run is meant to spend, in pairs; when set, T·B must
    equal it (a config whose T or B was edited then fails instead of spending another budget).
    None: T·B, unchecked."""
    lr: float = 5e-5
    """AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up steps, then constant."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm; 0 turns clipping off."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    annotator: AnnotatorConfig = field(default_factory=AnnotatorConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logprob_batch_size: int = 64
    """Most sequences per teacher-forced forward outside the update."""
    micro_batch_size: int | None = None
    """Pairs per forward/backward on each process; the B/processes pairs of a step are split
    into micro-batches whose gradients accumulate (the same update, less memory). None: all at
    once."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, about a third more compute)."""
    checkpoint_every: int = 50
    """Write a checkpoint (weights, optimizer, RNGs, pool position) every this many steps, for
    `bpo train --resume`; 0: none (a resumed run then starts again, replaying its annotations)."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints are kept."""
    seed: int = 0
    """Seed of sampling, LoRA initialisation and data order."""
    device: str = "auto"
    """auto (accelerate picks), cpu or cuda."""
    precision: Literal["no", "bf16", "fp16"] = "no"
    """Mixed precision (accelerate autocast): the update and the behavior log-probs."""

    @property
    def K(self) -> int:
        """Optimizer steps between annotation phases."""
        return self.T // self.F

    @property
    def M(self) -> int:
        """Pairs annotated per phase, M = K·B."""
        return self.K * self.B

    @property
    def N_total(self) -> int:
        """Annotation budget in pairs, N_total = T·B; each pair is used once."""
        return self.T * self.B

    def __post_init__(self) -> None:
        try:
            self.loss = canonical_loss_name(self.loss)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        resolve_method(self)
        validate_train(self)


@dataclass
class SFTConfig:
    """Supervised fine-tuning on demonstrations (the paper's SFT on preferred responses)."""

    output_dir: str = "runs/sft"
    """Run directory; the fine-tuned model is saved, merged, under `model/`."""
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    finetune: Literal["lora", "full"] = "full"
    """Train a LoRA adapter (merged at the end) or all weights."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    epochs: int = 3
    """Passes over the demonstrations."""
    batch_size: int = 32
    """Demonstrations per optimizer step."""
    lr: float = 1e-3
    """AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up steps, then cosine decay to 0."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm; 0 turns clipping off."""
    micro_batch_size: int | None = None
    """Demonstrations per forward/backward on each process, gradients accumulated over the
    batch; None: the whole batch at once."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, about a third more compute)."""
    checkpoint_every: int = 200
    """Write a checkpoint (weights, optimizer, scheduler) every this many steps, for
    `bpo sft --resume`; 0: none."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints are kept."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    annotator: AnnotatorConfig = field(default_factory=AnnotatorConfig)
    """The judge of the final evaluation (its label noise unused); the default is the task's
    gold reward, which the paper's datasets lack: give them their reward model here."""
    seed: int = 0
    """Seed of initialisation and data order."""
    device: str = "auto"
    """auto (accelerate picks), cpu or cuda."""
    precision: Literal["no", "bf16", "fp16"] = "no"
    """Mixed precision (accelerate)."""

    def __post_init__(self) -> None:
        positive(self, "epochs", "batch_size")
        if self.micro_batch_size is not None:
            positive(self, "micro_batch_size")
        validate_checkpoints(self)
        validate_lora(self)
        validate_device(self)
        if self.lr <= 0:
            raise ConfigError(f"lr: must be > 0, got {self.lr}; set e.g. lr=1e-3")


C = TypeVar("C")  # a config dataclass: TrainConfig, SFTConfig, ExperimentConfig, RewardModelConfig…


@dataclass
class BaseModelConfig:
    """The tiny Llama an experiment builds for each built-in task to train its SFT model on."""

    hidden_size: int = 96
    num_layers: int = 3
    num_heads: int = 3


@dataclass
class ExperimentConfig:
    """A grid of `bpo train` runs: tasks × methods × losses × F × seeds × any other field."""

    output_dir: str = "runs/experiment"
    """Experiment directory: runs/, results.csv, RESULTS.md and the plots."""
    train: dict[str, Any] = field(default_factory=dict)
    """TrainConfig fields every run shares (nested, as in a `bpo train` YAML)."""
    grid: dict[str, list[Any]] = field(default_factory=dict)
    """Dotted TrainConfig field -> values; one run per combination. String values may name other
    fields of the run in braces, e.g. `runs/{task.name}/seed{seed}`."""
    sft: dict[str, Any] | None = None
    """SFTConfig fields of the per-task SFT model every run starts from (a tiny model is built
    first); None: the runs use `train.model.path` as it is."""
    sft_dir: str | None = None
    """Where the per-task SFT models are kept, shared between experiments; None: output_dir/sft."""
    base_model: BaseModelConfig = field(default_factory=BaseModelConfig)
    workers: int = 2
    """Runs trained side by side, in separate processes; each gets cores / workers threads."""
    score: str = "win_rate"
    """The summary.json figure the statistics and plots compare."""
    versus: list[list[str]] = field(default_factory=list)
    """Head-to-head comparisons: pairs of `compare_by` values, e.g. [[on_policy_bpo, sft]]."""
    compare_by: str = "method"
    """The grid field whose values `versus` names."""
    n_resamples: int = 10_000
    """Bootstrap resamples for the confidence intervals."""

    def __post_init__(self) -> None:
        positive(self, "workers", "n_resamples")
        for key, values in self.grid.items():
            if not values:
                raise ConfigError(f"grid.{key}: no values; give a list such as [0, 1, 2]")
        for pair in self.versus:
            if len(pair) != 2:
                raise ConfigError(f"versus: {pair} is not a pair; write [a, b]")


def load_config(
    schema: type[C],
    path: str | Path | None = None,
    overrides: list[str] = (),
    values: Mapping[str, Any] | None = None,
) -> C:
    """Merge the schema's defaults, a YAML file, nested `values` and `key=value` overrides, in
    that order, into a checked config."""
    layers = [OmegaConf.structured(schema)]
    where = "config"
    try:
        if path is not None:
            if not Path(path).is_file():
                raise ConfigError(f"config: no file at {path}; give the path of a YAML config")
            where = str(path)
            layers.append(OmegaConf.load(path))
        if values:
            where = "experiment config"
            layers.append(OmegaConf.create(dict(values)))
        if overrides:
            where = "command line"
            bad = [o for o in overrides if "=" not in o]
            if bad:
                raise ConfigError(f"overrides: {bad} are not key=value; write e.g. beta=0.1")
            layers.append(OmegaConf.from_dotlist(list(overrides)))
        merged = OmegaConf.merge(*layers)
        return OmegaConf.to_object(merged)
    except ConfigKeyError as e:
        valid = ", ".join(f.name for f in fields(e.object_type)) if e.object_type else ""
        raise ConfigError(
            f"{e.full_key}: unknown field (in {where}); valid fields here: {valid}. "
            "Fix the name or remove it."
        ) from None
    except MissingMandatoryValue as e:
        raise ConfigError(f"{e.full_key}: required but not set; set {e.full_key}=...") from None
    except ValidationError as e:
        raise ConfigError(f"{e.full_key}: {_first_line(e)} (in {where})") from None


def _first_line(error: Exception) -> str:
    return str(error).splitlines()[0]


def to_yaml(cfg: object) -> str:
    """The fully resolved config as YAML, readable back by `load_config`."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))

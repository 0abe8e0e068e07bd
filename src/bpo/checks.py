"""Checks of configuration values: each error names the field, the value and the fix.

`bpo.config`'s dataclasses call these from `__post_init__`, so a config that cannot run never
leaves `load_config`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bpo.config import AnnotatorConfig, SamplingConfig, SFTConfig, TaskConfig, TrainConfig
    from bpo.rm_config import PairTrainingConfig


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the field, the value and the fix."""


_METHOD_F = {"offline_dpo": "1", "on_policy_dpo": "T", "on_policy_bpo": "T"}


def resolve_method(cfg: TrainConfig) -> None:
    """Expand `method` into F and reference (DESIGN.md's table), or name the method from them."""
    positive(cfg, "T", "B")
    if cfg.method is None:
        if cfg.F is None or cfg.reference is None:
            raise ConfigError(
                f"method: not set, and F={cfg.F} reference={cfg.reference}; set method to one of "
                "offline_dpo, online_dpo, on_policy_dpo, bpo, on_policy_bpo, or set both F and "
                "reference"
            )
        cfg.method = method_name(cfg.F, cfg.T, cfg.reference)
        return
    pinned_F = {"1": 1, "T": cfg.T}.get(_METHOD_F.get(cfg.method, ""))
    if pinned_F is not None:
        if cfg.F is not None and cfg.F != pinned_F:
            raise ConfigError(
                f"F: method {cfg.method} has F = {_METHOD_F[cfg.method]} = {pinned_F}, "
                f"got F={cfg.F}; drop F or choose another method"
            )
        cfg.F = pinned_F
    elif cfg.F is None:
        raise ConfigError(f"F: method {cfg.method} needs F (annotation phases); set e.g. F=2")
    if cfg.method == "online_dpo" and not 1 < cfg.F < cfg.T:
        raise ConfigError(
            f"F: online_dpo needs 1 < F < T = {cfg.T}, got F={cfg.F}; "
            "use offline_dpo for F = 1 or on_policy_dpo for F = T"
        )
    is_bpo = cfg.method in ("bpo", "on_policy_bpo")
    if cfg.reference is None:
        cfg.reference = "behavior" if is_bpo else "sft"
    elif is_bpo != (cfg.reference == "behavior"):
        fix = (
            "reference=behavior"
            if is_bpo
            else "reference sft, gold or ema (a behavior reference is method bpo)"
        )
        raise ConfigError(
            f"reference: method {cfg.method} cannot use reference={cfg.reference}; use {fix}"
        )


def method_name(F: int, T: int, reference: str) -> str:
    if reference == "behavior":
        return "on_policy_bpo" if F == T else "bpo"
    return "offline_dpo" if F == 1 else "on_policy_dpo" if F == T else "online_dpo"


def validate_lora(cfg: TrainConfig | SFTConfig) -> None:
    if cfg.lora.members < 1 or cfg.lora.r < 1:
        raise ConfigError(
            f"lora: members and r must be >= 1, got members={cfg.lora.members} r={cfg.lora.r}"
        )
    if cfg.finetune == "full" and (cfg.lora.members != 1 or cfg.lora.init_from):
        raise ConfigError(
            f"lora.members / lora.init_from: set ({cfg.lora.members}, {cfg.lora.init_from!r}) but "
            "finetune=full does not read them; set finetune=lora or remove them"
        )


def validate_train(cfg: TrainConfig) -> None:
    validate_lora(cfg)
    if not 1 <= cfg.F <= cfg.T or cfg.T % cfg.F:
        raise ConfigError(
            f"F: must divide T and lie in [1, T]; got F={cfg.F}, T={cfg.T}; "
            f"divisors of T are {[d for d in range(1, cfg.T + 1) if cfg.T % d == 0]}"
        )
    if cfg.budget is not None and cfg.budget != cfg.T * cfg.B:
        fixes = [f"T={cfg.budget // cfg.B}"] if cfg.budget % cfg.B == 0 else []
        fixes += [f"B={cfg.budget // cfg.T}"] if cfg.budget % cfg.T == 0 else []
        raise ConfigError(
            f"budget: {cfg.budget} pairs, but T·B = {cfg.T}·{cfg.B} = {cfg.T * cfg.B} pairs would "
            f"be annotated; set {' or '.join(fixes) or 'T and B so that T·B = budget'}, or remove "
            "budget"
        )
    if cfg.beta <= 0:
        raise ConfigError(f"beta: must be > 0, got {cfg.beta}; the paper uses beta=0.1")
    if cfg.micro_batch_size is not None:
        positive(cfg, "micro_batch_size")
    validate_checkpoints(cfg)
    if cfg.lr <= 0:
        raise ConfigError(f"lr: must be > 0, got {cfg.lr}; the paper uses lr=5e-5")
    if cfg.reference == "gold" and not cfg.reference_path:
        raise ConfigError("reference_path: reference=gold needs the checkpoint's path or Hub id")
    if cfg.reference != "gold" and cfg.reference_path:
        raise ConfigError(
            f"reference_path: set to {cfg.reference_path!r} but reference={cfg.reference} does "
            "not read it; set reference=gold or remove reference_path"
        )
    if not 0.0 <= cfg.ema_tau <= 1.0:
        raise ConfigError(f"ema_tau: must lie in [0, 1], got {cfg.ema_tau}")
    if cfg.reference != "ema" and cfg.ema_tau:
        raise ConfigError(
            f"ema_tau: set to {cfg.ema_tau} but reference={cfg.reference} does not read it; "
            "set reference=ema or remove ema_tau"
        )
    if cfg.sampling.temperature <= 0:
        raise ConfigError(f"sampling.temperature: must be > 0, got {cfg.sampling.temperature}")
    validate_device(cfg)
    n, temperatures = cfg.pairs.samples_per_prompt, cfg.pairs.temperatures
    if n < 2:
        raise ConfigError(f"pairs.samples_per_prompt: must be >= 2, got {n}")
    if n > 2 and cfg.annotator.type in ("preference_model", "human"):
        raise ConfigError(
            f"pairs.samples_per_prompt: best-vs-worst of {n} needs rewards, and "
            f"annotator.type={cfg.annotator.type} compares pairs; use samples_per_prompt=2"
        )
    if temperatures and (n % len(temperatures) or min(temperatures) <= 0):
        raise ConfigError(
            f"pairs.temperatures: {list(temperatures)} must be > 0 and split "
            f"samples_per_prompt={n} evenly; e.g. samples_per_prompt=8 temperatures=[1.0,0.7]"
        )


def validate_annotator(cfg: AnnotatorConfig) -> None:
    """Values no annotator can use, and fields the annotator's type does not read, are errors."""
    for name in ("noise_temperature", "length_penalty"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"annotator.{name}: must be >= 0, got {getattr(cfg, name)}; 0: off")
    if cfg.retries < 0:
        raise ConfigError(f"annotator.retries: must be >= 0, got {cfg.retries}")
    for name in ("max_length", "batch_size"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"annotator.{name}: must be >= 1, got {getattr(cfg, name)}")
    if cfg.type != "human":
        reject_unread(cfg, "annotator", _HUMAN_ONLY, f"annotator.type={cfg.type}",
                      " or set annotator.type=human")  # fmt: skip
    if cfg.type == "function":
        unread = ("path", "encoding", "max_length", "batch_size", "dtype", *_PM_ONLY)
        fix = " or set annotator.type to reward_model or preference_model"
    elif cfg.type == "human":
        if cfg.labels_per_pair < 1:
            raise ConfigError(
                f"annotator.labels_per_pair: must be >= 1, got {cfg.labels_per_pair}; 2 or more "
                "has several people label each pair and reports their agreement"
            )
        unread = ("function", "path", "encoding", "max_length", "batch_size", "dtype",
                  "noise_temperature", "length_penalty", *_PM_ONLY)  # fmt: skip
        fix = " (people label the pairs)"
    else:
        if cfg.function is not None:
            raise ConfigError(
                f"annotator.function: set to {cfg.function!r} but annotator.type={cfg.type} does "
                "not read it; set annotator.type=function or remove annotator.function"
            )
        if not cfg.path:
            raise ConfigError(
                f"annotator.path: annotator.type={cfg.type} needs the model's folder or Hub id"
            )
        unread, fix = _PM_ONLY, " or use annotator.type=preference_model"
        if cfg.type == "preference_model":
            unread = ("encoding", "noise_temperature", "length_penalty")
            fix = " or use annotator.type=reward_model, which gives rewards"
            validate_labels(cfg.labels, "annotator.labels")
    reject_unread(cfg, "annotator", unread, f"annotator.type={cfg.type}", fix)


_PM_ONLY = ("labels", "answer_prefix")
_HUMAN_ONLY = ("labels_per_pair", "wait")

DATASET_ONLY = (
    "dataset", "data_dir", "train_split", "eval_split", "prompt_column", "label_column",
    "chosen_column", "max_prompt_tokens", "long_prompts",
)  # fmt: skip


def validate_checkpoints(cfg: TrainConfig | SFTConfig | PairTrainingConfig) -> None:
    positive(cfg, "keep_checkpoints")
    if cfg.checkpoint_every < 0:
        raise ConfigError(f"checkpoint_every: must be >= 0 (0: none), got {cfg.checkpoint_every}")


def validate_device(cfg: TrainConfig | SFTConfig) -> None:
    if cfg.sampling.backend == "vllm" and cfg.device == "cpu":
        raise ConfigError(
            "sampling.backend: vllm samples on a CUDA GPU, but device=cpu; set "
            "sampling.backend=hf or run on a GPU"
        )


def validate_sampling(cfg: SamplingConfig) -> None:
    """The vLLM backend must be installed; its fields are read by it alone."""
    if cfg.backend == "vllm":
        from bpo.vllm_backend import require_vllm

        require_vllm()
        if not 0 < cfg.gpu_memory_utilization <= 1:
            raise ConfigError(
                f"sampling.gpu_memory_utilization: must lie in (0, 1], got "
                f"{cfg.gpu_memory_utilization}"
            )
        return
    unread = ("gpu_memory_utilization", "max_model_len")
    reject_unread(cfg, "sampling", unread, "sampling.backend=hf", " or set sampling.backend=vllm")


def check_model_folder(path: str, field: str) -> None:
    """A path written as a local one (absolute, ./, ../, ~) must exist: otherwise transformers
    would try it as a Hub id and fail with a message about repository names."""
    if path.startswith(("/", "./", "../", "~")) and not Path(path).expanduser().exists():
        raise ConfigError(
            f"{field}: no folder at {path}; give a folder written by save_pretrained (config.json, "
            "weights, tokenizer files) or a Hub id such as google/gemma-2b"
        )


def validate_task(cfg: TaskConfig) -> None:
    """A built-in task reads none of the dataset fields: setting one is a mistake to report."""
    if cfg.name in ("digest", "quiz", "guard"):
        reject_unread(cfg, "task", DATASET_ONLY, f"the built-in task {cfg.name}",
                      " or use a dataset task (tldr, hh_helpful, hh_harmless)")  # fmt: skip


def reject_unread(cfg: object, prefix: str, names: tuple[str, ...], reader: str, fix: str) -> None:
    """A field that `reader` does not read, set to other than its default, is an error (a
    setting silently ignored is a mistake the user does not see)."""
    defaults = type(cfg).__dataclass_fields__
    for name in names:
        if getattr(cfg, name) != _default(defaults[name]):
            raise ConfigError(
                f"{prefix}.{name}: set to {getattr(cfg, name)!r} but {reader} does not read it; "
                f"remove {prefix}.{name}{fix}"
            )


def _default(f: dataclasses.Field) -> object:
    return f.default if f.default_factory is dataclasses.MISSING else f.default_factory()


def validate_labels(labels: list[str], name: str) -> None:
    if len(labels) != 2 or labels[0] == labels[1]:
        raise ConfigError(f"{name}: must be two distinct strings, got {labels}; e.g. {name}=[A,B]")


def positive(cfg: object, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value < 1:
            raise ConfigError(f"{name}: must be a positive integer, got {value}")

"""Optional vLLM generation backend (`sampling.backend: vllm`, extra `bpo[vllm]`).

vLLM only produces token ids here: behavior log-probs stay teacher-forced from the training model
(DESIGN.md), so a sampling engine that differs from π_θ in kernels or precision cannot bias them.
After each annotation phase's π_β ← π_θ the policy's merged weights are pushed into the engine.

Targets vLLM 0.20 – 0.33 (the V1 engine; 0.20 is the first release that accepts transformers 5,
0.12 – 0.19 pin transformers < 5). The engine core runs in this process
(VLLM_ENABLE_V1_MULTIPROCESSING=0), so `LLM.apply_model` calls a function on the engine's model
directly, with no serialization: vllm/v1/engine/llm_engine.py keeps `model_executor` in process,
vllm/v1/executor/uniproc_executor.py runs the callable in place. TRL's colocate mode does the same
through `llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights` followed by
`llm.reset_prefix_cache()` (trl/generation/vllm_generation.py); `apply_model` is the public path to
that model. One process, tensor parallel size 1.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from functools import partial
from types import ModuleType

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from torch import nn

from bpo.checks import ConfigError
from bpo.config import SamplingConfig
from bpo.ensemble import LoraEnsemble
from bpo.sequences import cut_at_eos

Weights = Iterable[tuple[str, torch.Tensor]]
# an adapted layer: its plain base layer and a function computing its LoRA delta ΔW (out, in)
Adapted = Mapping[str, tuple[nn.Module, Callable[[], torch.Tensor]]]


def require_vllm() -> ModuleType:
    """The `vllm` module, or a ConfigError that says how to install it or switch backend."""
    try:
        import vllm
    except ImportError as e:
        raise ConfigError(
            f"sampling.backend: 'vllm' needs the vllm package, which could not be imported ({e}); "
            'install it with pip install "bpo[vllm]" (on a CUDA machine), or set '
            "sampling.backend=hf"
        ) from None
    return vllm


@torch.no_grad()
def merged_weights(
    model: nn.Module, ensemble: LoraEnsemble | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """π_θ's weights with any LoRA folded in, as (name, tensor) under the names the base model's
    `save_pretrained` writes (Hugging Face names; a tied weight once, under its first name).

    Lazy (one folded layer in memory at a time) and out of place: the policy keeps its adapters,
    its trainability and its parameters' bits. Unadapted tensors share storage with the policy,
    so consume the iterator before the next optimizer step; `dict(...)` gives a state dict.
    """
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    adapted = _ensemble_layers(ensemble) if ensemble else _peft_layers(base)
    unique = {name for name, _ in base.named_parameters()}  # tied weights: first name only
    unique |= {name for name, _ in base.named_buffers()}
    folded: set[str] = set()
    for key, tensor in base.state_dict().items():
        owner = _adapted_owner(key, adapted)
        if owner is None:
            if key in unique:
                yield key, tensor
        elif owner not in folded:  # the wrapper's entries become the plain layer's weight, bias
            folded.add(owner)
            layer, delta = adapted[owner]
            yield f"{owner}.weight", _fold(layer.weight, delta())
            if getattr(layer, "bias", None) is not None:
                yield f"{owner}.bias", layer.bias.detach()


def _ensemble_layers(ensemble: LoraEnsemble) -> Adapted:
    """Each ensemble layer with ΔW = (1/k) Σ_i s·B_i·A_i, the mean of the members' deltas."""
    return {
        name: (layer.base, partial(ensemble.merged_delta, name))
        for name, layer in ensemble.layers.items()
    }


def _peft_layers(base: nn.Module) -> Adapted:
    """Each peft LoRA layer with the sum of its active, unmerged adapters' s·B·A."""
    return {
        name: (module.get_base_layer(), partial(_peft_delta, module))
        for name, module in base.named_modules()
        if isinstance(module, LoraLayer)
    }


def _peft_delta(layer: LoraLayer) -> torch.Tensor:
    """ΔW of a peft LoRA layer, computed by peft's own `get_delta_weight` (no merge/unmerge)."""
    delta = torch.zeros_like(layer.get_base_layer().weight, dtype=torch.float32)
    if layer.disable_adapters:
        return delta
    for adapter in layer.active_adapters:
        if adapter not in layer.lora_A or adapter in layer.merged_adapters:
            continue
        if adapter in layer.lora_variant or layer.lora_bias.get(adapter):
            raise ValueError(
                f"lora: adapter {adapter!r} is a LoRA variant (e.g. DoRA) or has a LoRA bias, "
                "which merged_weights does not fold; use plain LoRA or sampling.backend=hf"
            )
        delta += layer.get_delta_weight(adapter).float()
    return delta


def _adapted_owner(key: str, adapted: Adapted) -> str | None:
    """The adapted layer whose wrapper holds state-dict entry `key` (its base or LoRA factors)."""
    parts = key.split(".")
    for end in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in adapted:
            return prefix
    return None


def _fold(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """W + ΔW, added in float32 and rounded once to W's dtype."""
    return (weight.float() + delta.float()).to(weight.dtype)


class VLLMGenerator:
    """A vLLM engine in this process that samples responses as token ids, one per prompt.

    It loads `model_path` (the base checkpoint) at construction; push the policy's weights with
    `load_weights(merged_weights(...))` before the first `generate` and after every change.
    """

    def __init__(
        self,
        model_path: str,
        dtype: str,
        seed: int,
        gpu_memory_utilization: float,
        eos_id: int,
        max_model_len: int | None = None,
    ) -> None:
        self.vllm = require_vllm()
        _check_single_process()
        # the engine core in this process, so apply_model runs on the model without serialization
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        self.dtype: torch.dtype = getattr(torch, dtype)
        self.eos_id = eos_id
        self.llm = self.vllm.LLM(
            model=model_path,
            dtype=dtype,
            seed=seed,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            enable_prefix_caching=True,  # the two samples of a prompt share its prefill
        )

    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        sampling: SamplingConfig,
        greedy: bool = False,
        seed: int | None = None,
    ) -> list[list[int]]:
        """One response per prompt, as token ids ending with EOS if the model ended it.

        Prompts go in as token ids (no re-tokenization, no extra BOS). With `seed`, request i
        draws from its own generator seeded `seed + i` (mod 2⁶³): a prompt's two samples still
        differ, and a rerun repeats the draws (up to vLLM's batch-dependent numerics).
        `sampling.batch_size` does not apply: vLLM schedules its own batches.
        """
        prompts = [self.vllm.TokensPrompt(prompt_token_ids=list(ids)) for ids in prompt_ids]
        params = [
            self._sampling_params(sampling, greedy, None if seed is None else (seed + i) % 2**63)
            for i in range(len(prompts))
        ]  # seeds wrap within int64, where vLLM's model runner keeps them
        outputs = self.llm.generate(prompts, params, use_tqdm=False)  # in the prompts' order
        return [cut_at_eos(out.outputs[0].token_ids, self.eos_id) for out in outputs]

    def _sampling_params(self, sampling: SamplingConfig, greedy: bool, seed: int | None):
        """vLLM SamplingParams equal to `bpo.policy.generation_config`: the config's values only.

        - greedy is temperature 0; top-k 0 and top-p 1 are off in vLLM as in SamplingConfig;
          penalties and min-p keep vLLM's neutral defaults (a checkpoint's generation_config
          only supplies defaults when no SamplingParams are given);
        - generation stops at the tokenizer's EOS alone, as the HF path does: `ignore_eos` keeps
          vLLM from also stopping at extra EOS ids a checkpoint's generation_config may list, and
          `stop_token_ids` stops at ours. vLLM keeps the stop token in `token_ids` (it only
          leaves it out of the text: vllm/v1/engine/detokenizer.py), so a finished response
          ends with EOS, as `cut_at_eos` leaves it.
        """
        return self.vllm.SamplingParams(
            n=1,
            temperature=0.0 if greedy else sampling.temperature,
            top_k=0 if greedy else sampling.top_k,
            top_p=1.0 if greedy else sampling.top_p,
            max_tokens=sampling.max_new_tokens,
            seed=seed,
            ignore_eos=True,
            stop_token_ids=[self.eos_id],
            detokenize=False,  # token ids are all we read
        )

    def load_weights(self, weights: Weights) -> None:
        """Copy `weights` (Hugging Face names, e.g. from `merged_weights`) into the engine's
        model in place, then drop the prefix cache, whose KV entries the old weights computed."""
        cast = ((name, tensor.to(self.dtype)) for name, tensor in weights)
        self.llm.apply_model(lambda model: model.load_weights(cast))
        if not self.llm.reset_prefix_cache():
            raise RuntimeError(
                "vLLM refused to reset its prefix cache after a weight update (requests still "
                "running?); samples would reuse KV entries of the old weights"
            )


def _check_single_process() -> None:
    """Fail if torch.distributed runs several processes: each would start its own engine in a
    world vLLM does not expect (multi-GPU generation needs vLLM's external launcher)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
        if world > 1:
            raise ConfigError(
                f"sampling.backend: 'vllm' runs in one process, got {world} processes; "
                "launch a single process or set sampling.backend=hf"
            )

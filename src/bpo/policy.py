"""The policy π_θ: a Hugging Face causal LM, trained fully or through a LoRA adapter.

It samples responses with the pinned collection settings and computes teacher-forced sequence
log-probs: the sum of the response tokens' log-probs, prompt and padding masked (DESIGN.md).
Prompts and responses travel as token ids, tokenized once.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from torch.nn.parallel import DistributedDataParallel
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from bpo.checks import check_model_folder
from bpo.config import ConfigError, LoraConfig, ModelConfig, SamplingConfig
from bpo.distributed import chunked_map, shard_map
from bpo.ensemble import CONFIG_FILE as ENSEMBLE_CONFIG
from bpo.ensemble import LoraEnsemble
from bpo.sequences import cut_at_eos, left_pad, pack, sequence_logps

if TYPE_CHECKING:
    from bpo.vllm_backend import VLLMGenerator

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_causal_lm(model: ModelConfig, device: torch.device):
    """Load a causal LM and its tokenizer with `from_pretrained`, dropout off (DESIGN.md)."""
    check_model_folder(model.path, "model.path")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model.path)
        lm = AutoModelForCausalLM.from_pretrained(model.path, dtype=DTYPES[model.dtype])
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"model.path: could not load {model.path!r} ({str(e).splitlines()[0]}); give a local "
            "folder written by save_pretrained or a Hub id"
        ) from None
    if tokenizer.pad_token_id is None:
        raise ConfigError(
            f"model.path: the tokenizer of {model.path} has no pad token; set one "
            "(e.g. tokenizer.pad_token = tokenizer.eos_token) and save it again"
        )
    disable_dropout(lm)
    if device.type == "cuda":
        avoid_cudnn_attention()
    # the checkpoint's decoding defaults (top-k, min_p, penalties) must not reach collection
    lm.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return lm.to(device), tokenizer


def avoid_cudnn_attention() -> None:
    """Take cuDNN out of torch's scaled-dot-product-attention backends, process-wide.

    torch 2.11 sends bf16/fp16 attention with a padding mask to cuDNN first on an H100, and
    cuDNN builds an execution plan for every new (batch, length) shape: 86 ms for a forward and
    155 ms for a forward + backward on an H100, against 1-2 ms for the memory-efficient
    backend. Every decoding step, every update and every behavior pass of a bpo run has a new
    shape, so a bf16 run took 2.6-3.9× as long as an fp32 one (docs/SCALE.md). Flash and the
    memory-efficient kernels need no plan; call `torch.backends.cuda.enable_cudnn_sdp(True)`
    after loading to have cuDNN back.
    """
    torch.backends.cuda.enable_cudnn_sdp(False)


def disable_dropout(model: torch.nn.Module) -> None:
    """Zero every dropout probability: preference learning runs without dropout (DESIGN.md).

    Attention layers that apply dropout functionally in train mode keep their rate in an
    `attention_dropout` attribute; it is zeroed too, so train mode (needed by gradient
    checkpointing) computes exactly what eval mode does.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    model.eval()


def add_lora(lm: torch.nn.Module, lora: LoraConfig, seed: int) -> PeftModel:
    """Wrap `lm` with a fresh peft LoRA adapter initialised from `seed` (B = 0, so Δ = 0)."""
    targets = lora.target_modules
    peft_config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=0.0,
        target_modules=targets if targets == "all-linear" else targets.split(","),
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # peft 0.21 calls a transformers 5 method that warns of its own deprecation
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated")
        torch.manual_seed(seed)
        model = get_peft_model(lm, peft_config)
    disable_dropout(model)
    return model


class Policy:
    """A causal LM with its tokenizer: batched sampling, teacher-forced log-probs, save.

    With a LoRA ensemble (`lora.members` > 1) sampling and log-probs use the merged members;
    `member_logps` runs each member on its own chunk of a batch for training.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        device: torch.device,
        ensemble: LoraEnsemble | None = None,
    ) -> None:
        self.model = model
        self.train_model = model
        """The model the update's forward goes through: `model`, or its DDP wrapper."""
        self.tokenizer = tokenizer
        self.device = device
        self.ensemble = ensemble
        self.vllm: VLLMGenerator | None = None
        """The vLLM engine that samples instead of `generate` (sampling.backend=vllm)."""
        self.vllm_version: int | None = None
        """Which version of π_θ (`sync_vllm`) the engine holds."""
        self.pad_id: int = tokenizer.pad_token_id
        self.eos_id: int = tokenizer.eos_token_id

    @property
    def members(self) -> int:
        """k: how many copies of a batch `member_logps` expects (1 without an ensemble)."""
        return self.ensemble.members if self.ensemble else 1

    @classmethod
    def load(
        cls,
        model: ModelConfig,
        finetune: str,
        lora: LoraConfig,
        seed: int,
        device: torch.device,
        adapter_path: str | Path | None = None,
    ) -> Policy:
        """Load the base model and, for LoRA, add adapters: saved ones from `adapter_path` (or
        `lora.init_from`), else fresh ones — one peft LoRA, or an ensemble of `lora.members`."""
        lm, tokenizer = load_causal_lm(model, device)
        ensemble = None
        source = adapter_path or lora.init_from
        if finetune == "lora":
            if source is not None and (Path(source) / ENSEMBLE_CONFIG).is_file():
                ensemble = LoraEnsemble.load(lm, source)
            elif source is not None:
                if not Path(source, "adapter_config.json").is_file():
                    raise ConfigError(
                        f"lora.init_from: {source} holds no LoRA (adapter_config.json or "
                        f"{ENSEMBLE_CONFIG}); give a run's policy/ folder"
                    )
                lm = PeftModel.from_pretrained(lm, str(source), is_trainable=True)
                disable_dropout(lm)
            elif lora.members > 1:
                ensemble = LoraEnsemble.create(lm, lora, lora.members, seed)
            else:
                lm = add_lora(lm, lora, seed)
        return cls(lm, tokenizer, device, ensemble)

    def use_vllm(self, model: ModelConfig, sampling: SamplingConfig, seed: int) -> None:
        """Sample through an in-process vLLM engine from now on (sampling.backend=vllm); the
        engine loads the base checkpoint and gets π_θ's merged weights now (as version 0, the
        weights before any update) and at each `sync_vllm`."""
        from bpo.vllm_backend import VLLMGenerator

        self.vllm = VLLMGenerator(
            model.path, model.dtype, seed, sampling.gpu_memory_utilization, self.eos_id,
            sampling.max_model_len,
        )  # fmt: skip
        self.sync_vllm(version=0)

    def sync_vllm(self, version: int) -> None:
        """Push π_θ, merged and in float32 arithmetic, into the vLLM engine (π_β ← π_θ), unless
        it already holds `version` (e.g. the optimizer step); no-op without an engine."""
        if self.vllm is None or self.vllm_version == version:
            return
        from bpo.vllm_backend import merged_weights

        with torch.autocast(self.device.type, enabled=False):
            self.vllm.load_weights(merged_weights(self.model, self.ensemble))
        self.vllm_version = version

    def enable_gradient_checkpointing(self) -> None:
        """Recompute activations in the backward pass instead of keeping them (less memory, one
        more forward); active only inside `training()`."""
        base = self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model
        kwargs = {"use_reentrant": False}
        if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x's new name
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    def distribute(self, accelerator: Accelerator) -> None:
        """Wrap the model in DDP for multi-process training (it averages gradients over ranks);
        one process is left as it is. Sampling and log-probs keep using the unwrapped model.

        torch's DDP, not `accelerator.prepare_model`, which would also patch the unwrapped
        model's forward with autocast: precision stays where the loops put `autocast()`.
        """
        if accelerator.num_processes > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = DistributedDataParallel(self.model, device_ids=device_ids)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        if self.ensemble:
            return self.ensemble.parameters()
        return [p for p in self.model.parameters() if p.requires_grad]

    def member_logps(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor
    ) -> torch.Tensor:
        """Sequence log-probs of a packed batch of k·n rows, chunk i under member i: (k, n).

        Call it inside `training()`, which must also cover the backward pass.
        """
        logps = sequence_logps(self.train_model, input_ids, attention_mask, response_mask)
        return logps.view(self.members, -1)

    @contextmanager
    def training(self) -> Iterator[None]:
        """The mode of an update's forward and backward: train mode (dropout is off, so only
        gradient checkpointing notices) and an ensemble's per-member layers. The backward must
        run inside too: gradient checkpointing recomputes the forward there."""
        self.model.train()
        try:
            if self.ensemble is None:
                yield
            else:
                with self.ensemble.per_member():
                    yield
        finally:
            self.model.eval()

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip gradients (each ensemble member on its own); return the norm(s) before, (k,)."""
        if max_norm <= 0:
            max_norm = float("inf")
        if self.ensemble:
            return self.ensemble.clip_grad_norm_(max_norm)
        return torch.nn.utils.clip_grad_norm_(self.trainable_parameters(), max_norm)[None]

    def encode_prompts(self, prompts: Sequence[str]) -> list[list[int]]:
        """Token ids of each prompt, special tokens (e.g. BOS) added as the tokenizer does."""
        return self.tokenizer(list(prompts), add_special_tokens=True)["input_ids"]

    def check_room(self, prompt_ids: Sequence[Sequence[int]], new_tokens: int, what: str) -> None:
        """Refuse prompts that leave no room for `new_tokens` more within the model's context
        (`max_position_embeddings`): generation would fail deep inside the model, or wrap."""
        limit = getattr(self.model.config, "max_position_embeddings", None)
        longest = max(map(len, prompt_ids), default=0)
        if limit is not None and longest + new_tokens > limit:
            if new_tokens >= limit:
                raise ConfigError(
                    f"sampling.max_new_tokens: {new_tokens} new tokens do not fit in the model's "
                    f"{limit} positions (max_position_embeddings) with any prompt; set "
                    f"sampling.max_new_tokens below {limit}"
                )
            raise ConfigError(
                f"task.max_prompt_tokens: the longest of the {what} is {longest} tokens, and "
                f"{new_tokens} more must fit in the model's {limit}; set "
                f"task.max_prompt_tokens={limit - new_tokens} (datasets) or lower "
                "sampling.max_new_tokens"
            )

    def decode(self, responses: Sequence[Sequence[int]]) -> list[str]:
        return self.tokenizer.batch_decode(responses, skip_special_tokens=True)

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        sampling: SamplingConfig,
        greedy: bool = False,
        seed: int | None = None,
    ) -> list[list[int]]:
        """One response per prompt, as token ids ending with EOS if the model ended it.

        With `seed`, the draw comes from a generator seeded with it and leaves the global RNG
        as it was, so it depends on nothing that ran before.
        """
        if self.vllm is not None:
            return self.vllm.generate(prompt_ids, sampling, greedy, seed)
        config = generation_config(sampling, greedy, self.tokenizer)
        responses: list[list[int]] = []
        with _seeded(seed, self.device):
            for start in range(0, len(prompt_ids), sampling.batch_size):
                chunk = prompt_ids[start : start + sampling.batch_size]
                input_ids, attention_mask = left_pad(chunk, self.pad_id, self.device)
                out = self.model.generate(
                    input_ids=input_ids, attention_mask=attention_mask, generation_config=config
                )  # (n, P + new)
                for row in out[:, input_ids.shape[1] :].tolist():
                    responses.append(cut_at_eos(row, self.eos_id))
        return responses

    def sample(
        self,
        prompt_ids: Sequence[Sequence[int]],
        sampling: SamplingConfig,
        seed: int,
        greedy: bool = False,
    ) -> list[list[int]]:
        """`generate` in chunks of `sampling.batch_size` prompts, each seeded from (`seed`, its
        index) and spread over the processes: the same responses on any number of them. A vLLM
        engine (one process) takes all prompts at once and schedules its own batches."""
        if self.vllm is not None:
            return self.vllm.generate(prompt_ids, sampling, greedy, seed)
        return chunked_map(
            lambda chunk, chunk_seed: self.generate(chunk, sampling, greedy, chunk_seed),
            prompt_ids,
            sampling.batch_size,
            seed,
        )

    def logps(
        self,
        prompt_ids: Sequence[Sequence[int]],
        response_ids: Sequence[Sequence[int]],
    ) -> torch.Tensor:
        """Teacher-forced log π(y|x) of each (prompt, response), summed over response tokens: (N,).

        Gradients flow unless the caller disables them.
        """
        input_ids, attention_mask, response_mask = pack(
            prompt_ids, response_ids, self.pad_id, self.device
        )
        return sequence_logps(self.model, input_ids, attention_mask, response_mask)

    @torch.no_grad()
    def logps_batched(
        self,
        prompt_ids: Sequence[Sequence[int]],
        response_ids: Sequence[Sequence[int]],
        batch_size: int,
    ) -> torch.Tensor:
        """`logps` without gradients, `batch_size` sequences per forward, the sequences spread
        over the processes and gathered: (N,) on every rank."""

        def local(rows: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[float]:
            out = []
            for i in range(0, len(rows), batch_size):
                prompts, responses = zip(*rows[i : i + batch_size])
                out += self.logps(prompts, responses).tolist()
            return out

        values = shard_map(local, list(zip(prompt_ids, response_ids)))
        return torch.tensor(values, dtype=torch.float, device=self.device)

    def save(self, path: str | Path) -> None:
        """Save the trainable state: the adapter(s) for LoRA, the whole model otherwise."""
        if self.ensemble:
            self.ensemble.save(path)
        else:
            self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)

    def merge(self) -> None:
        """Fold any adapter into the base weights; the policy keeps working, now without
        trainable adapters (and without its DDP wrapper: training is over)."""
        if isinstance(self.model, PeftModel):
            self.model = self.model.merge_and_unload()
        elif self.ensemble:
            self.ensemble.fold()
            self.ensemble = None
        self.train_model = self.model

    def save_merged(self, path: str | Path) -> None:
        """Save a standalone checkpoint with any adapter folded into the base weights (`merge`)."""
        self.merge()
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)


def generation_config(sampling: SamplingConfig, greedy: bool, tokenizer) -> GenerationConfig:
    """Decoding settings built from the config alone, so collection samples from π_θ itself:
    temperature 1 and no top-k / top-p unless configured (DESIGN.md).

    Every field that `generate` would otherwise fill from the checkpoint's generation_config or
    from transformers' global defaults (top-k 50) is set here.
    """
    return GenerationConfig(
        max_new_tokens=sampling.max_new_tokens,
        do_sample=not greedy,
        temperature=None if greedy else sampling.temperature,
        top_k=None if greedy else sampling.top_k,
        top_p=None if greedy else sampling.top_p,
        typical_p=1.0,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        min_length=0,
        num_beams=1,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )


@contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Run the block on torch's RNG seeded with `seed`, restoring the RNG after; no-op for None."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


@contextmanager
def swapped_parameters(
    params: Sequence[torch.nn.Parameter], values: Sequence[torch.Tensor]
) -> Iterator[None]:
    """Temporarily point `params` at `values` (same shapes), e.g. a reference snapshot."""
    saved = [p.data for p in params]
    try:
        for p, v in zip(params, values):
            p.data = v.to(p.device, non_blocking=True)
        yield
    finally:
        for p, s in zip(params, saved):
            p.data = s

"""A tiny Llama checkpoint built in process, for tests and the CPU demo.

It is written to disk with `save_pretrained`, so callers load it back with
`AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained`: exactly the path a
real checkpoint takes, with no download.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase


def build_tiny_llama(
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 128,
    seed: int = 0,
) -> Path:
    """Save a randomly initialised Llama (deterministic in `seed`) and `tokenizer` to `out_dir`.

    The vocabulary and special token ids come from `tokenizer`; `intermediate_size` defaults to
    4 * hidden_size. The generation config carries only the special token ids, no sampling
    defaults. Returns `out_dir` as a Path.
    """
    out_dir = Path(out_dir)
    special_ids = {
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        attention_dropout=0.0,
        tie_word_embeddings=True,
        **special_ids,
    )
    with torch.random.fork_rng(devices=[]):  # seed the init without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(**special_ids)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir

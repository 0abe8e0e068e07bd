"""The tiny Llama builder: a checkpoint that loads back through the Auto classes."""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bpo.tasks.digest import build_tokenizer
from bpo.tiny import build_tiny_llama


def test_builds_and_loads_back(tmp_path):
    out = build_tiny_llama(build_tokenizer(), str(tmp_path / "tiny"))
    assert out == tmp_path / "tiny"
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.tie_word_embeddings and model.config.pad_token_id == tok.pad_token_id
    generation = json.loads((out / "generation_config.json").read_text())
    assert set(generation) == {
        "pad_token_id",
        "bos_token_id",
        "eos_token_id",
        "transformers_version",
    }

    batch = tok(["rent rent cat tl;dr:", "job tl;dr:"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, 5, len(tok))  # (B, T, V)


def test_same_seed_same_weights(tmp_path):
    tok = build_tokenizer()
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    paths = [
        build_tiny_llama(tok, tmp_path / name, seed=s) for name, s in [("a", 0), ("b", 0), ("c", 1)]
    ]
    assert torch.rand(1) == expected  # the caller's RNG is left alone
    a, b, c = (AutoModelForCausalLM.from_pretrained(p).state_dict() for p in paths)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)

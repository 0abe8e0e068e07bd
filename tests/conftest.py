"""Shared fixtures: a tiny digest model saved and loaded back like a real checkpoint."""

from __future__ import annotations

import pytest

from bpo.config import TrainConfig, load_config
from bpo.tasks.digest import build_tokenizer
from bpo.tiny import build_tiny_llama

TINY_TASK = ["task.n_sft=64", "task.n_align=64", "task.n_eval=16"]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """Folder of a randomly initialised tiny Llama with the digest tokenizer."""
    out = tmp_path_factory.mktemp("tiny") / "model"
    return str(build_tiny_llama(build_tokenizer(), out, hidden_size=32, num_layers=2, num_heads=2))


@pytest.fixture
def train_config(tiny_model, tmp_path):
    """Make a small TrainConfig writing under tmp_path; keyword overrides as key=value."""

    def make(name: str = "run", *overrides: str) -> TrainConfig:
        return load_config(
            TrainConfig,
            overrides=[
                f"output_dir={tmp_path / name}",
                f"model.path={tiny_model}",
                *TINY_TASK,
                "T=4",
                "B=4",
                "lr=1e-3",
                "sampling.max_new_tokens=6",
                "eval.every=0",
                "eval.n_prompts=8",
                "device=cpu",
                *overrides,
            ],
        )

    return make

"""The run directory contract (DESIGN.md): config.yaml, metrics.jsonl, summary.json, pool,
checkpoints."""

from __future__ import annotations

import json
import os
from pathlib import Path

from bpo.config import PairTrainingConfig, SFTConfig, TrainConfig, to_yaml


class RunDir:
    """Where one run writes everything it produces. With several processes only the main one
    writes (`writer`); the others' `log` and `write_summary` do nothing."""

    def __init__(self, path: str | Path, writer: bool = True) -> None:
        self.path = Path(path)
        self.writer = writer

    @classmethod
    def create(cls, cfg: TrainConfig | SFTConfig | PairTrainingConfig) -> RunDir:
        """A fresh run directory holding the resolved config; refuses to mix two runs."""
        run = cls(cfg.output_dir)
        if run.metrics.exists():
            raise FileExistsError(
                f"output_dir: {run.path} already holds a run (metrics.jsonl); choose another "
                "output_dir or delete it"
            )
        run.path.mkdir(parents=True, exist_ok=True)
        run.config.write_text(to_yaml(cfg), encoding="utf-8")
        return run

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def summary(self) -> Path:
        return self.path / "summary.json"

    @property
    def pool(self) -> Path:
        return self.path / "pool.jsonl"

    @property
    def eval_outputs(self) -> Path:
        """The final evaluation's greedy responses and rewards, one JSON line per prompt."""
        return self.path / "eval_outputs.jsonl"

    @property
    def policy(self) -> Path:
        """The final checkpoint: a LoRA adapter or a full model, with the tokenizer."""
        return self.path / "policy"

    def log(self, record: dict) -> None:
        """Append one JSON object to metrics.jsonl."""
        if not self.writer:
            return
        with open(self.metrics, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def write_summary(self, summary: dict) -> None:
        if not self.writer:
            return
        tmp = self.summary.with_suffix(".tmp")
        tmp.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, self.summary)

    def read_metrics(self) -> list[dict]:
        with open(self.metrics, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]

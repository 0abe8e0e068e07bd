"""The run directory contract (DESIGN.md): config.yaml, metrics.jsonl, summary.json, pool,
checkpoints."""

from __future__ import annotations

import json
import os
from pathlib import Path

from bpo.config import ConfigError, SFTConfig, TrainConfig, to_yaml
from bpo.rm_config import PairTrainingConfig


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
        if run.metrics.exists() or run.pool.exists() or run.checkpoints.exists():
            raise FileExistsError(
                f"output_dir: {run.path} already holds a run (metrics.jsonl); choose another "
                "output_dir or delete it"
            )
        run.path.mkdir(parents=True, exist_ok=True)
        tmp = run.config.with_suffix(".yaml.tmp")  # whole or absent, should the run be killed
        tmp.write_text(to_yaml(cfg), encoding="utf-8")
        os.replace(tmp, run.config)
        return run

    @classmethod
    def reopen(cls, cfg: TrainConfig | SFTConfig | PairTrainingConfig) -> RunDir:
        """The run directory of an interrupted run, to resume; its config must be `cfg`'s. A run
        that never wrote its config is started."""
        run = cls(cfg.output_dir)
        if run.summary.is_file():
            raise FileExistsError(
                f"output_dir: the run in {run.path} has finished (summary.json); nothing to "
                "resume: choose another output_dir to train again"
            )
        if not run.config.is_file():  # killed before it began: begin it (preempted jobs
            return cls.create(cfg)  # can always pass --resume)
        saved, ours = run.config.read_text(encoding="utf-8").splitlines(), to_yaml(cfg).splitlines()
        changed = [f"{a.strip()!r} -> {b.strip()!r}" for a, b in zip(saved, ours) if a != b]
        if changed or len(saved) != len(ours):
            raise ConfigError(
                f"--resume: the config differs from the run's in {run.path}/config.yaml "
                f"({', '.join(changed[:3]) or 'fields added or removed'}); resume with the same "
                "config, or start a new output_dir"
            )
        return run

    def keep_metrics(self, n: int) -> None:
        """Cut metrics.jsonl to its first n records (those a checkpoint had logged)."""
        if not self.writer or not self.metrics.exists():
            return
        lines = [
            line
            for line in self.metrics.read_text(encoding="utf-8").splitlines(keepends=True)
            if line.endswith("\n")
        ]
        if len(lines) < n:
            raise ValueError(
                f"{self.metrics}: {len(lines)} records, but the checkpoint had {n}; the file was "
                "changed or lost: restore it, or start a new output_dir"
            )
        tmp = self.metrics.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("".join(lines[:n]))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.metrics)

    def sync_metrics(self) -> None:
        """Put metrics.jsonl on disk, so a checkpoint that counts its records can trust them."""
        if self.writer and self.metrics.exists():
            with open(self.metrics, "a", encoding="utf-8") as f:
                os.fsync(f.fileno())

    @property
    def annotations(self) -> Path:
        """Every annotator answer, in order: replayed on resume instead of asked again."""
        return self.path / "annotations.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

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

"""Exact resume of `bpo train`: what a checkpoint saves of a run, and how it is put back."""

from __future__ import annotations

import random
from dataclasses import asdict

import torch

from bpo.checkpoint import AnnotationLog, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from bpo.pairs import CollectionStats, PromptSampler
from bpo.policy import Policy
from bpo.pool import PreferencePool
from bpo.reference import Reference, SnapshotReference
from bpo.rundir import RunDir


class Checkpointed:
    """The parts of a run that a checkpoint holds; `save` after a step, `restore` on resume."""

    def __init__(
        self,
        policy: Policy,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        reference: Reference,
        sampler: PromptSampler,
        tie_rng: random.Random,
        collected: CollectionStats,
        annotator: AnnotationLog,
        pool: PreferencePool,
        run: RunDir,
    ) -> None:
        self.policy, self.optimizer, self.scheduler = policy, optimizer, scheduler
        self.reference, self.sampler, self.tie_rng = reference, sampler, tie_rng
        self.collected, self.annotator, self.pool, self.run = collected, annotator, pool, run

    def _tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f"param.{i}": p for i, p in enumerate(self.policy.trainable_parameters())}
        if isinstance(self.reference, SnapshotReference) and self.reference.tau > 0:  # EMA moves
            tensors.update({f"reference.{i}": t for i, t in enumerate(self.reference.snapshot)})
        return tensors

    def save(self, step: int, keep: int) -> None:
        """Checkpoint the run after `step` optimizer steps (the main process writes it)."""
        if not self.run.writer:
            return
        self.run.sync_metrics()
        host = {
            "step": step,
            "sampler": {"rng": rng_state(self.sampler.rng), "order": self.sampler._order},
            "tie_rng": rng_state(self.tie_rng),
            "collected": asdict(self.collected),
            "annotator_calls": self.annotator.calls,
            "annotations": self.annotator.answered,
            "pool": {"added": self.pool.added, "popped": self.pool.popped},
            "metrics": len(self.run.read_metrics()),
        }
        objects = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
        }
        save_checkpoint(self.run.checkpoints, step, self._tensors(), objects, host, keep)

    @torch.no_grad()
    def restore(self) -> int:
        """Put the newest checkpoint back; return its step (0 without one: the run starts again,
        its annotations replayed from the log)."""
        found = load_checkpoint(self.run.checkpoints, self.policy.device)
        if found is None:
            self.pool.restore(0, 0)
            self.run.keep_metrics(0)
            return 0
        tensors, objects, host = found
        for name, target in self._tensors().items():
            target.copy_(tensors[name])
        self.optimizer.load_state_dict(objects["optimizer"])
        self.scheduler.load_state_dict(objects["scheduler"])
        torch.set_rng_state(objects["torch_rng"].cpu())
        set_rng_state(self.sampler.rng, host["sampler"]["rng"])
        self.sampler._order = list(host["sampler"]["order"])
        set_rng_state(self.tie_rng, host["tie_rng"])
        self.collected.__dict__.update(host["collected"])
        self.annotator.calls = host["annotator_calls"]
        self.annotator.resume_at(host["annotations"])
        self.pool.restore(host["pool"]["added"], host["pool"]["popped"])
        self.run.keep_metrics(host["metrics"])
        return host["step"]

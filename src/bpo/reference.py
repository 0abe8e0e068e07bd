"""The reference rules: which π_ref the loss's KL term is built around (DESIGN.md).

- behavior: π_β, the policy that sampled the pair; its log-probs were stored at collection, so
  no model copy and no forward pass are needed (BPO, arXiv 2406.12168).
- sft: π_θ as it was before preference learning, kept as a snapshot of the trainable weights
  (for LoRA only the adapter, a few MB).
- ema: a snapshot updated after each step, θ' ← τθ + (1−τ)θ' (paper Eq. 6); τ = 0 is sft.
- gold: a fixed checkpoint loaded from a path.
"""

from __future__ import annotations

from typing import Protocol

import torch

from bpo.config import ModelConfig, TrainConfig
from bpo.evaluate import LogpFn
from bpo.policy import Policy, load_causal_lm, swapped_parameters
from bpo.pool import PairBatch
from bpo.sequences import sequence_logps


class Reference(Protocol):
    def logps(self, batch: PairBatch, policy: Policy) -> tuple[torch.Tensor, torch.Tensor]:
        """log π_ref(y_w|x) and log π_ref(y_l|x) of the batch, each (B,), without gradients."""
        ...

    def update(self, policy: Policy) -> None:
        """Called after each optimizer step."""
        ...


class BehaviorReference:
    """π_ref = π_β: the log-probs stored with each pair when it was collected."""

    def logps(self, batch: PairBatch, policy: Policy) -> tuple[torch.Tensor, torch.Tensor]:
        return batch.behavior_chosen.to(policy.device), batch.behavior_rejected.to(policy.device)

    def update(self, policy: Policy) -> None:
        pass


class OwnReference:
    """π_ref = π_θ at the update itself: BPO with K = 1 and one model, where every pair is
    updated on once, at the weights that sampled it, so π_β = π_θ there (dropout is off). The
    update's forward gives the reference log-probs (detached, `logps` returns None): no stored
    values, no second forward."""

    def logps(self, batch: PairBatch, policy: Policy) -> None:
        return None

    def update(self, policy: Policy) -> None:
        pass


class SnapshotReference:
    """π_ref from a snapshot of the policy's trainable weights: sft (τ = 0) or ema (τ > 0)."""

    def __init__(self, policy: Policy, tau: float = 0.0, device: torch.device | None = None):
        self.tau = tau
        self.snapshot = [
            p.detach().to(device or p.device, copy=True) for p in policy.trainable_parameters()
        ]

    @torch.no_grad()
    def logps(self, batch: PairBatch, policy: Policy) -> tuple[torch.Tensor, torch.Tensor]:
        with swapped_parameters(policy.trainable_parameters(), self.snapshot):
            both = sequence_logps(policy.model, *batch.packed)  # (2B,)
        return both.chunk(2)

    def policy_logps(self, policy: Policy, batch_size: int) -> LogpFn:
        """log π_ref(y|x) of any (prompt, response) ids, e.g. for the KL estimate."""

        def logps(prompt_ids, response_ids) -> torch.Tensor:
            with swapped_parameters(policy.trainable_parameters(), self.snapshot):
                return policy.logps_batched(prompt_ids, response_ids, batch_size)

        return logps

    @torch.no_grad()
    def update(self, policy: Policy) -> None:
        if self.tau == 0.0:
            return
        for ref, p in zip(self.snapshot, policy.trainable_parameters()):
            ref.lerp_(p.detach(), self.tau)  # θ' ← θ' + τ(θ − θ') = τθ + (1−τ)θ'  (Eq. 6)


class GoldReference:
    """π_ref from a fixed checkpoint sharing the policy's tokenizer."""

    def __init__(self, path: str, dtype: str, device: torch.device) -> None:
        self.model, _ = load_causal_lm(ModelConfig(path=path, dtype=dtype), device)
        self.model.requires_grad_(False)

    @torch.no_grad()
    def logps(self, batch: PairBatch, policy: Policy) -> tuple[torch.Tensor, torch.Tensor]:
        return sequence_logps(self.model, *batch.packed).chunk(2)

    def update(self, policy: Policy) -> None:
        pass


def make_reference(cfg: TrainConfig, policy: Policy) -> Reference:
    """The reference named by `cfg.reference`."""
    if cfg.reference == "behavior":
        return OwnReference() if reads_own_logps(cfg, policy) else BehaviorReference()
    if cfg.reference == "gold":
        return GoldReference(cfg.reference_path, cfg.model.dtype, policy.device)
    return SnapshotReference(policy, tau=cfg.ema_tau if cfg.reference == "ema" else 0.0)


def reads_own_logps(cfg: TrainConfig, policy: Policy) -> bool:
    """Whether π_β's log-probs of a pair are the policy's own at its update (K = 1, one model)."""
    return cfg.reference == "behavior" and cfg.K == 1 and policy.members == 1


def stores_behavior_logps(cfg: TrainConfig, policy: Policy) -> bool:
    """Whether the loss reads stored behavior log-probs, so collection must compute them."""
    return cfg.reference == "behavior" and not reads_own_logps(cfg, policy)

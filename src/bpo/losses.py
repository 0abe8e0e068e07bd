"""Direct-alignment (DAP) losses on per-sequence log-probs.

Each loss takes the policy's and the reference's log-probs of the chosen (y_w) and rejected (y_l)
responses, each shaped (B,), and returns per-pair losses and the implicit rewards
β·[log π_θ(y) − log π_ref(y)]; the caller reduces. With
h = [log π_θ(y_w) − log π_ref(y_w)] − [log π_θ(y_l) − log π_ref(y_l)]:
DPO −log σ(βh), IPO (h − 1/(2β))², SLiC max(0, 1 − βh) (arXiv 2406.12168, Sec. 2).
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F


class LossOutput(NamedTuple):
    """Per-pair losses and implicit rewards, each (B,)."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


class DAPLoss(Protocol):
    def __call__(
        self,
        policy_chosen: torch.Tensor,
        policy_rejected: torch.Tensor,
        reference_chosen: torch.Tensor,
        reference_rejected: torch.Tensor,
        beta: float,
    ) -> LossOutput: ...


def _log_ratio_margin(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    chosen = policy_chosen - reference_chosen  # (B,) log-ratio of y_w
    rejected = policy_rejected - reference_rejected  # (B,) log-ratio of y_l
    return chosen - rejected, chosen, rejected


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
) -> LossOutput:
    """DPO: −log σ(βh) (Rafailov et al. 2023, Eq. 7)."""
    h, chosen, rejected = _log_ratio_margin(
        policy_chosen, policy_rejected, reference_chosen, reference_rejected
    )
    losses = -F.logsigmoid(beta * h)
    return LossOutput(losses, beta * chosen.detach(), beta * rejected.detach())


def ipo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
) -> LossOutput:
    """IPO: (h − 1/(2β))² (Azar et al. 2023, Eq. 17), β playing the role of τ."""
    h, chosen, rejected = _log_ratio_margin(
        policy_chosen, policy_rejected, reference_chosen, reference_rejected
    )
    losses = (h - 1.0 / (2.0 * beta)) ** 2
    return LossOutput(losses, beta * chosen.detach(), beta * rejected.detach())


def slic_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
) -> LossOutput:
    """SLiC (hinge): max(0, 1 − βh) (Zhao et al. 2023, calibration loss)."""
    h, chosen, rejected = _log_ratio_margin(
        policy_chosen, policy_rejected, reference_chosen, reference_rejected
    )
    losses = torch.relu(1.0 - beta * h)
    return LossOutput(losses, beta * chosen.detach(), beta * rejected.detach())


LOSSES: dict[str, DAPLoss] = {"dpo": dpo_loss, "ipo": ipo_loss, "slic": slic_loss}
ALIASES = {"sigmoid": "dpo", "hinge": "slic"}


def canonical_loss_name(name: str) -> str:
    """Map a loss name or one of TRL's aliases (sigmoid, hinge) to dpo, ipo or slic."""
    canonical = ALIASES.get(name, name)
    if canonical not in LOSSES:
        choices = sorted(LOSSES) + sorted(ALIASES)
        raise ValueError(f"loss: unknown loss {name!r}; choose one of {choices}")
    return canonical


def get_loss(name: str) -> DAPLoss:
    """The loss function named `name` (aliases accepted)."""
    return LOSSES[canonical_loss_name(name)]

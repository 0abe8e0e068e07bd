"""The didactic bandit of Tajwar et al. 2024 (arXiv 2404.14367, App. I).

A prompt of one context token, a response of L tokens over n_bins actions, and a reference policy
π_ref that draws every response token i.i.d. from a binned, tanh-squashed Cauchy(−0.7, 0.4). R1
peaks at token 70, where π_ref has little mass; R2 at token 20, next to π_ref's mode. The policy
is a tiny Llama whose token ids 0..n_bins−1 are the actions, fitted to π_ref before fine-tuning.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from bpo.tiny import build_tiny_llama

CONTEXT_TOKEN = "<ctx>"
"""The prompt: one token, id n_bins, the tokenizer's bos token."""
PAD_TOKEN = "<pad>"
"""Id n_bins + 1; never in a prompt or a response, there because bpo's loader requires one."""


def reference_distribution(
    n_draws: int = 10_000,
    n_bins: int = 100,
    loc: float = -0.7,
    scale: float = 0.4,
    seed: int = 0,
) -> torch.Tensor:
    """π_ref, (n_bins,): a histogram of tanh(Cauchy(loc, scale)) draws over n_bins equal bins of
    [−1, 1], normalised to probabilities.

    As in the authors' code (`ContinuousSampledCategorical(SquashedCauchy(−0.7, 0.4), −1, 1, 100
    bins, 10000 samples)`, bandit_experiment/utils.py), the draws are squashed with tanh, not
    clipped, and empty bins get no floor. The tails still pile up in the edge bins (bin 0 holds
    P(X < atanh(−0.98)) ≈ 0.078), and with 10,000 draws no bin was empty for any of 2,000 seeds;
    an empty bin would make KL(π_θ‖π_ref) infinite, so it raises instead of being smoothed.
    """
    rng = np.random.default_rng(seed)
    draws = np.tanh(loc + scale * rng.standard_cauchy(n_draws))  # (n_draws,) in [−1, 1]
    counts, _ = np.histogram(draws, bins=n_bins, range=(-1.0, 1.0))  # (n_bins,)
    if (counts == 0).any():
        raise ValueError(
            f"reference_distribution: bins {np.flatnonzero(counts == 0).tolist()} got none of "
            f"the {n_draws} draws (seed {seed}); raise n_draws or lower n_bins"
        )
    return torch.from_numpy(counts / n_draws).float()


def _per_token_bump(tokens: torch.Tensor, centre: float) -> torch.Tensor:
    return torch.exp(-(((tokens.float() - centre) / 10.0) ** 2)).mean(dim=-1)  # (n,)


def reward_r1(tokens: torch.Tensor) -> torch.Tensor:
    """R1 = mean over the L tokens of exp(−((a − 70)/10)²); tokens (n, L) → (n,) (reward_6)."""
    return _per_token_bump(tokens, 70.0)


def reward_r2(tokens: torch.Tensor) -> torch.Tensor:
    """R2 = mean over the L tokens of exp(−((a − 20)/10)²); tokens (n, L) → (n,) (reward_7)."""
    return _per_token_bump(tokens, 20.0)


REWARDS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"r1": reward_r1, "r2": reward_r2}


def sample_reference(
    reference_probs: torch.Tensor, n: int, response_length: int, generator: torch.Generator
) -> torch.Tensor:
    """n responses of i.i.d. π_ref tokens, (n, response_length)."""
    flat = torch.multinomial(reference_probs, n * response_length, True, generator=generator)
    return flat.view(n, response_length)


def _position_kl(
    model: PreTrainedModel,
    reference_probs: torch.Tensor,
    context_token: int,
    responses: torch.Tensor,
) -> torch.Tensor:
    """KL(π_ref ‖ π_θ(· | ctx, y_<t)) at every position t of `responses` (B, L), → (B, L)."""
    responses = responses.to(model.device)
    context = responses.new_full((responses.shape[0], 1), context_token)  # (B, 1)
    input_ids = torch.cat([context, responses[:, :-1]], dim=1)  # (B, L): ctx, y_1 .. y_{L−1}
    # normalised over the whole vocabulary: mass on <ctx> or <pad> counts against the fit
    log_q = model(input_ids=input_ids).logits.log_softmax(-1)  # (B, L, V)
    log_q = log_q[..., : reference_probs.numel()]  # (B, L, n_bins)
    p = reference_probs.to(log_q)  # (n_bins,)
    return (torch.special.xlogy(p, p) - p * log_q).sum(-1)  # (B, L)


@torch.no_grad()
def reference_kl(
    model: PreTrainedModel,
    reference_probs: torch.Tensor,
    context_token: int,
    response_length: int,
    n_samples: int = 256,
    seed: int = 0,
) -> torch.Tensor:
    """KL(π_ref ‖ π_θ) at each response position, averaged over π_ref's prefixes, (L,)."""
    generator = torch.Generator().manual_seed(seed)
    responses = sample_reference(reference_probs, n_samples, response_length, generator)
    return _position_kl(model, reference_probs, context_token, responses).mean(0)


def fit_to_reference(
    model: PreTrainedModel,
    reference_probs: torch.Tensor,
    context_token: int,
    steps: int,
    lr: float,
    response_length: int,
    seed: int,
    batch_size: int = 32,
) -> list[float]:
    """Fit `model` to π_ref with Adam on the exact KL(π_ref ‖ π_θ) at every response position,
    teacher-forced on prefixes drawn i.i.d. from π_ref; returns the loss (mean KL) per step.

    In the bandit every token is an i.i.d. π_ref draw, so the target at each position is π_ref
    whatever the prefix; prefixes from π_ref are the ones the fitted policy must handle. The exact
    KL over the vocabulary has no sampling noise in the target, and this forward KL covers π_ref's
    tail (token 70, R1's optimum) instead of dropping it. The authors' `run_sft` instead minimises
    the exact reverse KL(π_θ ‖ π_ref) along the model's own samples; both vanish at π_θ = π_ref.
    """
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    curve = []
    for _ in range(steps):
        responses = sample_reference(reference_probs, batch_size, response_length, generator)
        loss = _position_kl(model, reference_probs, context_token, responses).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        curve.append(loss.item())
    model.eval()
    return curve


def build_bandit_tokenizer(n_bins: int = 100) -> PreTrainedTokenizerFast:
    """Word-level tokens "t0" .. "t{n_bins−1}" at ids 0 .. n_bins−1 (token id = action), then
    CONTEXT_TOKEN (bos, prepended when special tokens are added) and PAD_TOKEN.

    No eos: responses have a fixed length. No unk: an unknown word raises instead of encoding.
    """
    vocab = {f"t{a}": a for a in range(n_bins)} | {CONTEXT_TOKEN: n_bins, PAD_TOKEN: n_bins + 1}
    backend = Tokenizer(models.WordLevel(vocab=vocab))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{CONTEXT_TOKEN} $A", special_tokens=[(CONTEXT_TOKEN, n_bins)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=CONTEXT_TOKEN,
        pad_token=PAD_TOKEN,
        clean_up_tokenization_spaces=False,
    )


def build_bandit_model(
    out_dir: str | Path,
    n_bins: int = 100,
    hidden_size: int = 64,
    num_layers: int = 2,
    seed: int = 0,
) -> Path:
    """Save a randomly initialised tiny Llama over `build_bandit_tokenizer(n_bins)` and that
    tokenizer to `out_dir` (load both with `from_pretrained`); returns `out_dir` as a Path.

    Fit it with `fit_to_reference` and `save_pretrained` it again to get the bandit's π_ref.
    """
    return build_tiny_llama(
        build_bandit_tokenizer(n_bins),
        out_dir,
        hidden_size=hidden_size,
        num_layers=num_layers,
        seed=seed,
    )

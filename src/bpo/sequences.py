"""Token sequences as tensors: left padding for generation, prompt + response packing for
teacher forcing, and the summed response log-probs of a forward pass (DESIGN.md: prompt and
padding masked)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def cut_at_eos(tokens: Sequence[int], eos_id: int) -> list[int]:
    """A generated row up to and including its first EOS (what follows is padding)."""
    tokens = list(tokens)
    return tokens[: tokens.index(eos_id) + 1] if eos_id in tokens else tokens


def left_pad(
    sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and attention mask, each (N, P), for generation."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        if s:
            ids[i, width - len(s) :] = torch.tensor(s)
            mask[i, width - len(s) :] = 1
    return ids.to(device), mask.to(device)


def pack(
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    pad_id: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompts left-padded to P, responses right-padded to R, so responses start at column P.

    Returns ids (N, P+R), attention mask (N, P+R) and response mask (N, R). Aligning the
    responses lets the forward pass compute logits for the last R+1 positions only.
    """
    P = max(len(p) for p in prompt_ids)
    R = max(max(len(r) for r in response_ids), 1)
    n = len(prompt_ids)
    ids = torch.full((n, P + R), pad_id, dtype=torch.long)
    mask = torch.zeros((n, P + R), dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        ids[i, P - len(p) : P] = torch.tensor(p, dtype=torch.long)
        mask[i, P - len(p) : P] = 1
        if r:
            ids[i, P : P + len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, P : P + len(r)] = 1
    return ids.to(device), mask.to(device), mask[:, P:].to(device)


def sequence_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
) -> torch.Tensor:
    """Sum of log π(y_t | x, y_<t) over response tokens, from one forward pass: (N,)."""
    R = response_mask.shape[1]
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (N, P+R), left padding aware
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        logits_to_keep=R + 1,
        use_cache=False,  # teacher forcing needs no KV cache (nor gradient checkpointing's warning)
    ).logits[:, :-1]  # (N, R, V): the positions that predict response tokens
    targets = input_ids[:, -R:]  # (N, R)
    logits = logits.float()
    token_logps = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
    return (token_logps * response_mask).sum(-1)  # (N,)

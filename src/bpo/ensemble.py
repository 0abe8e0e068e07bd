"""LoRA ensembles: k members trained together, merged as the exact mean of their deltas.

The BPO paper (arXiv 2406.12168, Sec. 4.3) trains k LoRA members and merges them linearly for
sampling and evaluation. Here every targeted linear layer holds the k members' A (k, r, in) and
B (k, out, r) stacked, so that

- in *merged* mode (sampling, behavior log-probs, references, evaluation) the layer applies
  ΔW = (1/k) Σ_i s·B_i·A_i = s·(B_cat/k)·A_cat, a rank-k·r LoRA with the A's stacked and the B's
  concatenated and divided by k (DESIGN.md) — not peft's `add_weighted_adapter(..., "linear")`,
  which would add the cross terms B_i·A_j;
- in *per-member* mode (training) the batch is repeated k times and chunk i goes through member i,
  so all members train in one batched forward/backward, each on its own loss.

Adam is elementwise, so one optimizer over the stacks is k independent optimizers; gradient
clipping is done per member by `clip_grad_norm_`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from bpo.config import LoraConfig

STATE_FILE = "ensemble.safetensors"
CONFIG_FILE = "ensemble.json"


class EnsembleLoraLinear(nn.Module):
    """A frozen linear layer plus k LoRA members, applied merged or one member per batch chunk."""

    def __init__(self, base: nn.Linear, members: int, r: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        self.members = members
        self.scaling = alpha / r
        self.per_member = False
        # float32 whatever the base's dtype (as peft's autocast_adapter_dtype): Adam's updates of
        # small adapters are lost in bf16; the forward casts them to the input's dtype
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.zeros(members, r, base.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(members, base.out_features, r, device=device))

    def init_member(self, i: int, generator: torch.Generator) -> None:
        """peft's default LoRA init for member i: A ~ kaiming-uniform(a=√5), B = 0."""
        with torch.no_grad():
            A = torch.empty_like(self.lora_A[i], device="cpu")
            nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
            self.lora_A[i].copy_(A)
            self.lora_B[i].zero_()

    def merged_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A_cat (k·r, in) and B_cat / k (out, k·r): the merged delta is scaling · B·A."""
        k, r, d_in = self.lora_A.shape
        A = self.lora_A.reshape(k * r, d_in)  # (k·r, in)
        B = self.lora_B.permute(1, 0, 2).reshape(-1, k * r) / k  # (out, k·r)
        return A, B

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if not self.per_member:
            A, B = self.merged_factors()
            return out + F.linear(F.linear(x, A.to(x.dtype)), B.to(x.dtype)) * self.scaling
        k = self.members
        xs = x.reshape(k, -1, x.shape[-1])  # (k, n·T, in): chunk i belongs to member i
        hidden = torch.bmm(xs, self.lora_A.to(x.dtype).transpose(1, 2))  # (k, n·T, r)
        delta = torch.bmm(hidden, self.lora_B.to(hidden.dtype).transpose(1, 2))  # (k, n·T, out)
        return out + delta.reshape(out.shape).to(out.dtype) * self.scaling


def target_names(model: nn.Module, target_modules: str) -> list[str]:
    """Names of the linear layers to adapt, as peft selects them ("all-linear": every nn.Linear
    but the output layer; otherwise names ending in one of the comma-separated targets)."""
    output = model.get_output_embeddings()
    wanted = None if target_modules == "all-linear" else target_modules.split(",")
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or module is output:
            continue
        if wanted is None or any(name == t or name.endswith("." + t) for t in wanted):
            names.append(name)
    if not names:
        raise ValueError(f"lora.target_modules: {target_modules!r} matches no linear layer")
    return names


class LoraEnsemble:
    """k LoRA members injected into a causal LM, with the member's seeds distinct."""

    def __init__(self, model: nn.Module, lora: LoraConfig, members: int, names: list[str]) -> None:
        self.model = model
        self.members = members
        self.r = lora.r
        self.alpha = lora.alpha
        self.names = names
        model.requires_grad_(False)
        self.layers: dict[str, EnsembleLoraLinear] = {}
        for name in names:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            layer = EnsembleLoraLinear(getattr(parent, child), members, lora.r, lora.alpha)
            setattr(parent, child, layer)
            self.layers[name] = layer

    @classmethod
    def create(cls, model: nn.Module, lora: LoraConfig, members: int, seed: int) -> LoraEnsemble:
        """Fresh members; member i is initialised from its own generator seeded `seed + i`."""
        ensemble = cls(model, lora, members, target_names(model, lora.target_modules))
        for i in range(members):
            generator = torch.Generator().manual_seed(seed + i)
            for layer in ensemble.layers.values():
                layer.init_member(i, generator)
        return ensemble

    @classmethod
    def load(cls, model: nn.Module, path: str | Path) -> LoraEnsemble:
        """An ensemble saved by `save`, injected into `model`."""
        meta = json.loads((Path(path) / CONFIG_FILE).read_text())
        lora = LoraConfig(r=meta["r"], alpha=meta["alpha"])
        ensemble = cls(model, lora, meta["members"], meta["names"])
        device = next(iter(ensemble.layers.values())).lora_A.device
        state = load_file(Path(path) / STATE_FILE, device=str(device))
        with torch.no_grad():
            for name, layer in ensemble.layers.items():
                layer.lora_A.copy_(state[f"{name}.lora_A"])
                layer.lora_B.copy_(state[f"{name}.lora_B"])
        return ensemble

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {}
        for name, layer in self.layers.items():
            state[f"{name}.lora_A"] = layer.lora_A.detach().cpu().contiguous()
            state[f"{name}.lora_B"] = layer.lora_B.detach().cpu().contiguous()
        save_file(state, path / STATE_FILE)
        meta = {"members": self.members, "r": self.r, "alpha": self.alpha, "names": self.names}
        (path / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    def parameters(self) -> list[nn.Parameter]:
        return [p for layer in self.layers.values() for p in (layer.lora_A, layer.lora_B)]

    @contextmanager
    def per_member(self) -> Iterator[None]:
        """Within this block a batch of k·n rows runs chunk i through member i alone."""
        for layer in self.layers.values():
            layer.per_member = True
        try:
            yield
        finally:
            for layer in self.layers.values():
                layer.per_member = False

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip each member's gradient to `max_norm` on its own; return the k norms before."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        norms = torch.stack([g.flatten(1).pow(2).sum(1) for g in grads]).sum(0).sqrt()  # (k,)
        coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)  # as torch.nn.utils.clip_grad_norm_
        for g in grads:
            g.mul_(coef.view(-1, *[1] * (g.dim() - 1)).to(g.dtype))
        return norms

    @torch.no_grad()
    def fold(self) -> None:
        """Add each layer's merged delta to its base weight and put the plain layer back."""
        for name, layer in self.layers.items():
            layer.base.weight += self.merged_delta(name).to(layer.base.weight.dtype)
            parent_name, _, child = name.rpartition(".")
            setattr(self.model.get_submodule(parent_name), child, layer.base)
        self.layers = {}

    @torch.no_grad()
    def merged_delta(self, name: str) -> torch.Tensor:
        """ΔW of layer `name` in merged mode: (1/k) Σ_i s·B_i·A_i, (out, in)."""
        A, B = self.layers[name].merged_factors()
        return self.layers[name].scaling * (B @ A)

"""`bpo export`: a run's LoRA (ensemble) as files plain transformers and peft load.

- `merged/`: the base with the merged delta folded in (`AutoModelForCausalLM.from_pretrained`);
- `adapter/`: the merged delta as one standard peft LoRA of rank k·r — A's stacked, B's
  concatenated and divided by k, lora_alpha = k·alpha so the scaling stays alpha/r
  (`PeftModel.from_pretrained(base, adapter)`);
- `members/0 … k-1/`: each member as its own peft adapter.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model

from bpo.config import ModelConfig, SFTConfig, TrainConfig, load_config
from bpo.policy import Policy, load_causal_lm
from bpo.rundir import RunDir


def export_run(run_dir: str | Path, out: str | Path) -> dict[str, str]:
    """Write merged/, adapter/ and members/ for the LoRA policy of a finished run."""
    run, out = RunDir(run_dir), Path(out)
    if not run.config.is_file():
        raise FileNotFoundError(f"run_dir: no config.yaml in {run.path}; give a run directory")
    text = run.config.read_text()
    cfg = load_config(TrainConfig if "\nmethod:" in f"\n{text}" else SFTConfig, run.config)
    if cfg.finetune != "lora" or not run.policy.is_dir():
        raise FileNotFoundError(
            f"run_dir: {run.path} has no LoRA policy/ (finetune={cfg.finetune}); export needs a "
            "LoRA run; a full fine-tune's policy/ is already a standalone checkpoint"
        )
    device = torch.device("cpu")
    base, tokenizer = load_causal_lm(ModelConfig(cfg.model.path, "float32"), device)
    policy = Policy.load(
        ModelConfig(cfg.model.path, "float32"), "lora", cfg.lora, cfg.seed, device, run.policy
    )
    if policy.ensemble is None:  # one peft LoRA: it is its own merge and its only member
        policy.model.save_pretrained(out / "adapter")
        policy.model.save_pretrained(out / "members" / "0")
        tokenizer.save_pretrained(out / "adapter")
    else:
        ensemble = policy.ensemble
        k, r = ensemble.members, ensemble.r
        merged_A, merged_B = {}, {}
        for name, layer in ensemble.layers.items():
            merged_A[name], merged_B[name] = layer.merged_factors()
        _save_peft(base, ensemble.names, k * r, k * ensemble.alpha, merged_A, merged_B,
                   out / "adapter")  # fmt: skip
        for i in range(k):
            A = {n: layer.lora_A[i] for n, layer in ensemble.layers.items()}
            B = {n: layer.lora_B[i] for n, layer in ensemble.layers.items()}
            _save_peft(base, ensemble.names, r, ensemble.alpha, A, B, out / "members" / str(i))
        tokenizer.save_pretrained(out / "adapter")
    policy.save_merged(out / "merged")
    return {name: str(out / name) for name in ("merged", "adapter", "members")}


def _save_peft(
    base: torch.nn.Module,
    names: list[str],
    r: int,
    alpha: float,
    A: dict[str, torch.Tensor],
    B: dict[str, torch.Tensor],
    path: Path,
) -> None:
    """Save LoRA factors A (r, in) and B (out, r) per layer through a real peft model."""
    config = PeftLoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=names,
                            task_type="CAUSAL_LM")  # fmt: skip
    model = get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for name in names:
            layer = model.base_model.model.get_submodule(name)
            layer.lora_A["default"].weight.copy_(A[name])
            layer.lora_B["default"].weight.copy_(B[name])
    model.save_pretrained(path)

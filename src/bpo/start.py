"""What every training command does first: run directory, device, seed, task and policy."""

from __future__ import annotations

from dataclasses import asdict

from accelerate import Accelerator
from accelerate.utils import set_seed

from bpo.config import SFTConfig, TrainConfig
from bpo.policy import Policy
from bpo.rundir import RunDir
from bpo.tasks import Task, load_task


def start_run(cfg: TrainConfig | SFTConfig) -> tuple[RunDir, Accelerator, Task, Policy]:
    """Create the run directory (with the resolved config), seed every RNG, load task and
    policy on the device accelerate picks."""
    run = RunDir.create(cfg)
    accelerator = Accelerator(cpu=cfg.device == "cpu", mixed_precision=cfg.precision)
    set_seed(cfg.seed)
    task = load_task(**asdict(cfg.task))
    policy = Policy.load(cfg.model, cfg.finetune, cfg.lora, cfg.seed, accelerator.device)
    return run, accelerator, task, policy

"""What every training command does first: run directory, device, seed, task and policy."""

from __future__ import annotations

from dataclasses import asdict

from accelerate import Accelerator
from accelerate.utils import set_seed

from bpo.config import PairTrainingConfig, SFTConfig, TrainConfig
from bpo.policy import Policy
from bpo.rundir import RunDir
from bpo.tasks import Task, load_task


def open_run(cfg: TrainConfig | SFTConfig | PairTrainingConfig) -> tuple[RunDir, Accelerator]:
    """Create the run directory (with the resolved config), pick the device and precision with
    accelerate, and seed every RNG."""
    run = RunDir.create(cfg)
    accelerator = Accelerator(cpu=cfg.device == "cpu", mixed_precision=cfg.precision)
    set_seed(cfg.seed)
    return run, accelerator


def start_run(cfg: TrainConfig | SFTConfig) -> tuple[RunDir, Accelerator, Task, Policy]:
    """`open_run`, then load the task and the policy on the run's device."""
    run, accelerator = open_run(cfg)
    task = load_task(**asdict(cfg.task))
    policy = Policy.load(cfg.model, cfg.finetune, cfg.lora, cfg.seed, accelerator.device)
    return run, accelerator, task, policy

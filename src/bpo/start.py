"""What every training command does first: run directory, device, seed, task and policy."""

from __future__ import annotations

from datetime import timedelta

from accelerate import Accelerator, DistributedType
from accelerate.state import AcceleratorState
from accelerate.utils import InitProcessGroupKwargs, set_seed

from bpo.config import ConfigError, SFTConfig, TrainConfig
from bpo.policy import Policy
from bpo.rm_config import PairTrainingConfig
from bpo.rundir import RunDir
from bpo.tasks import Task, load_task

SUPPORTED = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)
# While people label a phase, the processes other than the main one wait in a collective
LABELLING_TIMEOUT = timedelta(days=7)


def open_run(
    cfg: TrainConfig | SFTConfig | PairTrainingConfig, resume: bool = False
) -> tuple[RunDir, Accelerator]:
    """Create the run directory (with the resolved config; the main process writes it), pick
    the device, precision and processes with accelerate, and seed every RNG."""
    AcceleratorState._reset_state()  # this run's precision, not an earlier run's in-process
    people = isinstance(cfg, TrainConfig) and cfg.annotator.type == "human"
    accelerator = Accelerator(
        cpu=cfg.device == "cpu",
        mixed_precision=cfg.precision,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=LABELLING_TIMEOUT)] if people else None,
    )
    if accelerator.distributed_type not in SUPPORTED:
        raise ConfigError(
            f"accelerate: {accelerator.distributed_type.value} is not supported; launch with "
            "DDP (`accelerate launch --config_file configs/accelerate/ddp.yaml` or `torchrun`)"
        )
    if getattr(cfg, "sampling", None) and cfg.sampling.backend == "vllm":
        if accelerator.num_processes > 1:
            raise ConfigError(
                f"sampling.backend: vllm samples in one process, got "
                f"{accelerator.num_processes}; launch one process or set sampling.backend=hf"
            )
    if not accelerator.is_main_process:
        run = RunDir(cfg.output_dir, writer=False)
    else:
        run = RunDir.reopen(cfg) if resume else RunDir.create(cfg)
    accelerator.wait_for_everyone()
    set_seed(cfg.seed)
    return run, accelerator


def start_run(
    cfg: TrainConfig | SFTConfig, resume: bool = False
) -> tuple[RunDir, Accelerator, Task, Policy]:
    """`open_run`, then load the policy on the run's device and the task with its tokenizer."""
    run, accelerator = open_run(cfg, resume)
    policy = Policy.load(cfg.model, cfg.finetune, cfg.lora, cfg.seed, accelerator.device)
    if cfg.gradient_checkpointing:
        policy.enable_gradient_checkpointing()
    policy.distribute(accelerator)
    task = load_task(cfg.task, policy.tokenizer)
    return run, accelerator, task, policy

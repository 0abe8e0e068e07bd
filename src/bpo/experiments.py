"""`bpo experiment`: a grid of `bpo train` runs, trained side by side, resumable, summarised.

The grid is the product of `grid`'s value lists over `train`'s shared fields. Each run gets its
own run directory under `runs/`, named by the grid values that vary. A run is finished when it
has a `summary.json` (or a `failed.json`, for a run that stopped with an error: a missing
reference checkpoint, say); an experiment started again skips finished runs and resumes
unfinished ones from their last checkpoint (`bpo train --resume`), replaying their annotations.
Every built-in task's SFT model is trained once, before the runs that start from it.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import OmegaConf
from tqdm.auto import tqdm

from bpo.config import (
    ConfigError,
    ExperimentConfig,
    SFTConfig,
    TrainConfig,
    load_config,
    to_yaml,
)

RESULT_FIELDS = (  # summary.json figures copied into results.csv, after the grid's fields
    "win_rate", "reward", "reference_reward", "kl_sft", "length", "pairs_annotated",
    "annotation_phases", "annotator_calls", "T", "B", "N_total", "collapsed_at_step",
    "wall_seconds",
)  # fmt: skip
T = TypeVar("T")
R = TypeVar("R")
_PLACEHOLDER = re.compile(r"\{([\w.]+)\}")


@dataclass(frozen=True)
class Cell:
    """One run of the grid: its grid values and its run directory."""

    values: dict[str, Any]
    path: Path

    @property
    def status(self) -> str:
        if (self.path / "summary.json").is_file():
            return "done"
        if (self.path / "failed.json").is_file():
            return "failed"
        return "pending"


def cells(cfg: ExperimentConfig) -> list[Cell]:
    """The grid's runs in a fixed order (the product of the value lists, first key slowest).

    A run's directory is named by its values of the fields that vary (a field with one value
    tells no runs apart), with `/` written as `_`.
    """
    keys = list(cfg.grid)
    varying = [k for k in keys if len(cfg.grid[k]) > 1]
    runs = Path(cfg.output_dir) / "runs"
    out = []
    for combo in itertools.product(*(cfg.grid[k] for k in keys)):
        values = dict(zip(keys, combo))
        name = ",".join(f"{k}={values[k]}" for k in varying).replace("/", "_") or "run"
        out.append(Cell(values, runs / name))
    return out


def _lookup(values: dict[str, Any], train: dict[str, Any], key: str) -> Any:
    """A run's value of the dotted field `key`: its grid value, else the shared one."""
    if key in values:
        return values[key]
    found = OmegaConf.select(OmegaConf.create(train), key)
    if found is None:
        raise ConfigError(f"grid: `{{{key}}}` names a field that neither grid nor train sets")
    return found


def _fill(value: Any, values: dict[str, Any], train: dict[str, Any]) -> Any:
    """`value` with each `{field}` replaced by the run's value of that field."""
    if not isinstance(value, str):
        return value
    return _PLACEHOLDER.sub(lambda m: str(_lookup(values, train, m.group(1))), value)


def sft_path(cfg: ExperimentConfig, task: str) -> Path:
    """The folder of the built-in `task`'s SFT run (its model is under `model/`)."""
    return Path(cfg.sft_dir or Path(cfg.output_dir) / "sft") / task


def train_config(cfg: ExperimentConfig, cell: Cell) -> TrainConfig:
    """The full TrainConfig of one run: shared fields, then the run's grid values."""
    values = OmegaConf.create(cfg.train)
    for key, value in cell.values.items():
        OmegaConf.update(values, key, _fill(value, cell.values, cfg.train), merge=True)
    if cfg.sft is not None and "model.path" not in cell.values:
        task = OmegaConf.select(values, "task.name", default="digest")
        OmegaConf.update(values, "model.path", str(sft_path(cfg, task) / "model"))
    values.output_dir = str(cell.path)
    return load_config(TrainConfig, values=OmegaConf.to_container(values))


def _run_sft(args: tuple[ExperimentConfig, str, int]) -> str:
    """Build the task's tiny model and train its SFT model (in a worker process)."""
    cfg, task, threads = args
    _quiet_worker(threads)
    from bpo.sft import sft
    from bpo.tasks import task_tokenizer
    from bpo.tiny import build_tiny_llama

    out = sft_path(cfg, task)
    base = out.parent / f"{task}-base"
    if not (base / "model.safetensors").is_file():  # built once, so an SFT can resume on it
        build_tiny_llama(
            task_tokenizer(task),
            base,
            hidden_size=cfg.base_model.hidden_size,
            num_layers=cfg.base_model.num_layers,
            num_heads=cfg.base_model.num_heads,
        )
    sft_cfg = load_config(
        SFTConfig,
        values=cfg.sft,
        overrides=[f"output_dir={out}", f"model.path={base}", f"task.name={task}"],
    )
    config = out / "config.yaml"
    if config.is_file() and config.read_text(encoding="utf-8") != to_yaml(sft_cfg):
        shutil.rmtree(out)  # an unfinished SFT of another config starts again
    sft(sft_cfg, progress=False, resume=True)  # an interrupted SFT goes on from its checkpoint
    return task


def _run_cell(args: tuple[TrainConfig, int]) -> tuple[str, str]:
    """Train one run (in a worker process); a run that raises is recorded in failed.json."""
    cfg, threads = args
    _quiet_worker(threads)
    from bpo.online import train

    path = Path(cfg.output_dir)
    try:
        train(cfg, progress=False, resume=(path / "config.yaml").is_file())  # an unfinished run
    except (RuntimeError, ValueError, OSError) as e:  # a bad value, a missing file, ...
        path.mkdir(parents=True, exist_ok=True)
        (path / "failed.json").write_text(
            json.dumps({"error": type(e).__name__, "message": str(e)}, indent=2) + "\n",
            encoding="utf-8",
        )
        return cfg.output_dir, "failed"
    return cfg.output_dir, "done"


def _quiet_worker(threads: int) -> None:
    """Give this process its share of the cores and silence weight-loading progress bars."""
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(threads)
    hf_logging.disable_progress_bar()


def run_experiment(
    cfg: ExperimentConfig, retry_failed: bool = False, progress: bool = True
) -> list[dict]:
    """Train every unfinished run of the grid, then write results.csv, RESULTS.md and plots.

    Returns the rows of results.csv.
    """
    from bpo.report import write_report

    root = Path(cfg.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    (root / "experiment.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    grid = cells(cfg)
    configs = {cell.path: train_config(cfg, cell) for cell in grid}  # all checked before any run
    if any(c.sampling.backend == "vllm" for c in configs.values()):
        raise ConfigError(
            "train.sampling.backend: vllm engines are not shut down between an experiment's "
            "runs; run vllm runs one by one with `bpo train`, or set sampling.backend=hf"
        )
    if retry_failed:
        for cell in grid:
            if cell.status == "failed":
                shutil.rmtree(cell.path)
    pending = [c for c in grid if c.status == "pending"]
    threads = max(1, (os.cpu_count() or 1) // cfg.workers)
    started = time.perf_counter()
    if cfg.sft is not None:
        tasks = sorted({configs[c.path].task.name for c in pending})
        todo = [
            (cfg, t, threads) for t in tasks if not (sft_path(cfg, t) / "summary.json").is_file()
        ]
        for _ in tqdm(_map(_run_sft, todo, cfg.workers), total=len(todo), desc="SFT",
                      disable=not progress):  # fmt: skip
            pass
    bar = tqdm(total=len(grid), initial=len(grid) - len(pending), desc="runs", disable=not progress)
    failed = 0
    for _, status in _map(_run_cell, [(configs[c.path], threads) for c in pending], cfg.workers):
        failed += status == "failed"
        bar.update()
        bar.set_postfix(failed=failed)
    bar.close()
    rows = list(_rows(grid, configs))
    write_results_csv(root / "results.csv", rows)
    write_report(cfg, rows, wall_seconds=time.perf_counter() - started)
    return rows


def _map(fn: Callable[[T], R], jobs: list[T], workers: int) -> Iterator[R]:
    """fn over jobs, in `workers` spawned processes (in this one for 1), as they finish."""
    if workers == 1:
        yield from map(fn, jobs)
        return
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        for job in as_completed([pool.submit(fn, j) for j in jobs]):
            yield job.result()


def _rows(grid: list[Cell], configs: dict[Path, TrainConfig]) -> Iterator[dict]:
    """One results.csv row per run: task, grid values, status, run directory, summary figures."""
    for cell in grid:
        task = {"task.name": configs[cell.path].task.name}
        row = {**task, **cell.values, "status": cell.status, "run_dir": str(cell.path)}
        if cell.status == "done":
            summary = json.loads((cell.path / "summary.json").read_text())
            row.update({k: summary.get(k) for k in RESULT_FIELDS})
        elif cell.status == "failed":
            row["error"] = json.loads((cell.path / "failed.json").read_text())["message"]
        yield row


def write_results_csv(path: Path, rows: list[dict]) -> None:
    """results.csv with the union of the rows' columns, written atomically."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)

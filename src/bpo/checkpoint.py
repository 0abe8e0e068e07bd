"""Checkpoints of a preference run, written atomically, and the annotation log that lets a resumed
run replay its annotations instead of paying for them again.

A checkpoint (`checkpoints/step-NNNNNN/`) holds what the loop cannot recompute: the trainable
weights, the optimizer and scheduler, an EMA reference, and the host-side state (prompt order,
tie-breaking and label-noise RNGs, counters, how much of the pool and of metrics.jsonl it had).
Sampling needs no state: each phase draws from seeds named by (seed, phase, round, chunk).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from bpo.annotators import Annotator, RewardAnnotator
from bpo.checks import ConfigError
from bpo.human import WaitingForLabels
from bpo.pool import append_records, read_records
from bpo.rundir import RunDir

PREFIX = "step-"


def save_checkpoint(
    folder: Path, step: int, tensors: dict[str, torch.Tensor], objects: dict, host: dict, keep: int
) -> Path:
    """Write checkpoint `step` into `folder` atomically (a temporary folder renamed into place)
    and keep the newest `keep`."""
    final = folder / f"{PREFIX}{step:06d}"
    tmp = folder / f".tmp-{PREFIX}{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp / "tensors.safetensors"
    )
    torch.save(objects, tmp / "objects.pt")
    (tmp / "host.json").write_text(json.dumps(host), encoding="utf-8")
    for name in ("tensors.safetensors", "objects.pt", "host.json"):
        with open(tmp / name, "rb") as f:
            os.fsync(f.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _fsync_dir(folder)
    for old in checkpoints(folder)[:-keep]:
        shutil.rmtree(old)
    return final


def checkpoints(folder: Path) -> list[Path]:
    """The complete checkpoints in `folder`, oldest first (unfinished temporary ones ignored)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.startswith(PREFIX))


def load_checkpoint(folder: Path, device: torch.device) -> tuple[dict, dict, dict] | None:
    """(tensors, objects, host) of the newest checkpoint, or None."""
    found = checkpoints(folder)
    if not found:
        return None
    latest = found[-1]
    if device.type == "cpu":  # a process of a multi-CPU run is on "cpu:0", which loaders refuse
        device = torch.device("cpu")
    tensors = load_file(latest / "tensors.safetensors", device=str(device))
    objects = torch.load(latest / "objects.pt", map_location=device, weights_only=False)
    return tensors, objects, json.loads((latest / "host.json").read_text(encoding="utf-8"))


def save_training(
    run: RunDir,
    params: Sequence[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    step: int,
    keep: int,
) -> None:
    """Checkpoint a run whose only state is its weights, optimizer and scheduler (`sft`,
    `train-rm`, `train-pm`: their data order is replayed from the seed on resume)."""
    if run.writer:
        run.sync_metrics()
        tensors = {f"param.{i}": p for i, p in enumerate(params)}
        objects = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
        host = {"step": step, "metrics": len(run.read_metrics())}
        save_checkpoint(run.checkpoints, step, tensors, objects, host, keep)


@torch.no_grad()
def restore_training(
    run: RunDir,
    params: Sequence[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    device: torch.device,
) -> int:
    """Put back what `save_training` wrote last and cut metrics.jsonl to it; return its step
    (0 without a checkpoint: the run starts again)."""
    found = load_checkpoint(run.checkpoints, device)
    if found is None:
        run.keep_metrics(0)
        return 0
    tensors, objects, host = found
    for i, p in enumerate(params):
        p.copy_(tensors[f"param.{i}"])
    optimizer.load_state_dict(objects["optimizer"])
    scheduler.load_state_dict(objects["scheduler"])
    run.keep_metrics(host["metrics"])
    return host["step"]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state(rng: random.Random) -> list:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def set_rng_state(rng: random.Random, state: list) -> None:
    rng.setstate((state[0], tuple(state[1]), state[2]))


class AnnotatorError(RuntimeError):
    """The annotator kept failing and `annotator.on_failure` is stop."""


class AnnotationLog(RewardAnnotator):
    """The run's annotator, every answer appended to `path` (fsync'd) the moment it is given.

    A resumed run repeats its questions in the same order (sampling is seeded), and gets the
    logged answers back instead of asking again: no label is paid for twice, and the annotator's
    own RNG (label noise) is restored with each replayed answer. `path` None: no log (the other
    processes of a multi-process run, whose annotator the main one answers for).
    """

    def __init__(
        self,
        inner: Annotator,
        path: Path | None,
        resume: bool,
        retries: int = 2,
        on_failure: str = "stop",
    ) -> None:
        super().__init__()
        self.inner = inner
        self.path = path
        self.retries, self.on_failure = retries, on_failure
        self.replay: deque[dict] = deque()
        self.answered = 0  # records answered so far (logged or replayed)
        if path is not None and path.exists():
            if resume:
                self.replay.extend(read_records(path, repair=True))
            else:
                path.unlink()

    def resume_at(self, answered: int) -> None:
        """Skip the first `answered` logged records, which a checkpoint's run had already used,
        and put the annotator's RNGs where the last of them left them."""
        self.answered = answered
        if self.path is None:  # another process's log: the main one answers
            return
        if len(self.replay) < answered:
            raise ConfigError(
                f"{self.path}: {len(self.replay)} answers logged, but the checkpoint had used "
                f"{answered}; the log was changed or lost: restore it, or start a new output_dir"
            )
        for _ in range(answered):
            last = self.replay.popleft()
        if answered:
            self._set_rngs(last["rng"])

    def _set_rngs(self, states: list) -> None:
        for rng, state in zip(_rngs(self.inner), states):
            set_rng_state(rng, state)

    def _answer(
        self, method: str, question: dict, ask: Callable[[list[int]], list[float]]
    ) -> list[float]:
        self.answered += 1
        if self.replay:
            record = self.replay.popleft()
            if record["method"] != method or record["question"] != question:
                raise ConfigError(
                    f"{self.path}: record {self.answered} asked another question than the "
                    "resumed run asks (its config, model or data changed, or sampling is not "
                    "deterministic, e.g. sampling.backend=vllm or GPU kernels); resume with the "
                    "same run on the same machine, or start a new output_dir"
                )
            self._set_rngs(record["rng"])
            return record["answers"]
        size = len(question["prompts"])
        answers = self._ask(ask, size)
        if self.path is not None:
            rngs = [rng_state(rng) for rng in _rngs(self.inner)]
            append_records(
                self.path,
                [{"method": method, "question": question, "answers": answers, "rng": rngs}],
            )
        return answers

    def _ask(self, ask: Callable[[list[int]], list[float]], size: int) -> list[float]:
        """`ask(indices)` answers those questions. All at once, tried again up to `retries`
        times while it raises or answers NaN / inf; then stop (AnnotatorError), or (skip) ask one
        question at a time, NaN for those that still fail (their pairs are dropped)."""
        everything = list(range(size))
        answers, problem = self._attempt(ask, everything, self.retries + 1)
        if not problem:
            return answers
        if self.on_failure == "stop":
            raise AnnotatorError(
                f"annotator: failed {self.retries + 1} times ({problem}); fix it and resume with "
                "`bpo train ... --resume`, or set annotator.on_failure=skip to drop such pairs"
            )
        return [self._attempt(ask, [i], 1)[0][0] for i in everything] if size > 1 else answers

    @staticmethod
    def _attempt(
        ask: Callable[[list[int]], list[float]], indices: list[int], tries: int
    ) -> tuple[list[float], str]:
        """Answers to `indices` (NaN where not finite) and what went wrong, if anything."""
        problem = ""
        for _ in range(tries):
            try:
                answers = [float(x) for x in ask(indices)]
            except WaitingForLabels:  # people have not labelled yet: no failure to retry
                raise
            except Exception as e:  # a user's function or a remote judge may fail in any way
                problem = f"{type(e).__name__}: {e}"
                continue
            bad = [x for x in answers if not math.isfinite(x)]
            if not bad:
                return answers, ""
            problem = f"it answered {bad[:3]}"
        return [math.nan] * len(indices), problem

    def _compare(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> list[float]:
        question = {"prompts": list(prompts), "a": list(a), "b": list(b)}

        def ask(idx: list[int]) -> list[float]:
            return self.inner._compare(*([seq[i] for i in idx] for seq in (prompts, a, b)))

        return self._answer("compare", question, ask)

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        if not isinstance(self.inner, RewardAnnotator):
            raise ConfigError(
                f"pairs.samples_per_prompt: best-vs-worst needs rewards, and the annotator "
                f"{type(self.inner).__name__} only compares pairs; use samples_per_prompt=2"
            )
        question = {"prompts": list(prompts), "responses": list(responses)}

        def ask(idx: list[int]) -> list[float]:
            return self.inner.score([prompts[i] for i in idx], [responses[i] for i in idx])

        return self._answer("score", question, ask)


def _rngs(annotator: Any) -> list[random.Random]:
    """The RNGs of an annotator and the annotators it wraps (label noise), outermost first."""
    out = []
    while annotator is not None:
        if isinstance(getattr(annotator, "rng", None), random.Random):
            out.append(annotator.rng)
        annotator = getattr(annotator, "inner", None)
    return out

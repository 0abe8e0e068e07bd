"""Exact resume: `bpo train` killed with SIGKILL at random moments and resumed each time ends with
the parameters, metrics, pool and annotations of an uninterrupted run; no label is asked twice."""

from __future__ import annotations

import errno
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bpo.config import to_yaml
from bpo.pool import read_records
from bpo.rundir import RunDir

SETTING = [
    "method=bpo", "F=6", "T=12", "B=4",  # K = 2: pairs wait in the pool across a step
    "annotator.noise_temperature=0.5", "annotator.ties=random",  # the annotator's and tie RNGs
    "checkpoint_every=1", "keep_checkpoints=2", "eval.every=4", "finetune=full",
]  # fmt: skip


def _launch(config: Path, resume: bool) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    args = [sys.executable, "-m", "bpo.cli", "train", str(config)] + (
        ["--resume"] if resume else []
    )
    return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def _strip(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in records]


def test_sigkill_and_resume_end_where_an_uninterrupted_run_ends(train_config, tmp_path):
    reference = train_config("whole", *SETTING)
    config = tmp_path / "whole.yaml"
    config.write_text(to_yaml(reference), encoding="utf-8")
    assert _launch(config, resume=False).wait(timeout=300) == 0

    killed = train_config("killed", *SETTING)
    config = tmp_path / "killed.yaml"
    config.write_text(to_yaml(killed), encoding="utf-8")
    metrics = RunDir(killed.output_dir).metrics
    rng, kills, resume = random.Random(0), 0, False
    while True:
        before = metrics.stat().st_mtime_ns if metrics.exists() else None
        proc = _launch(config, resume)
        while proc.poll() is None and (  # this process has begun (restored, or evaluated)
            not metrics.exists() or metrics.stat().st_mtime_ns == before
        ):
            time.sleep(0.005)
        target = _lines(metrics) + rng.randint(2, 5)  # then 2-5 steps or evaluations later,
        while proc.poll() is None and _lines(metrics) < target:
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.1))  # at a random moment of what follows
        if proc.poll() is not None:
            break
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        kills, resume = kills + 1, True
        if RunDir(killed.output_dir).summary.exists():  # killed after it had finished
            break
        assert kills < 40, "the run never finished"
    assert proc.returncode in (0, -signal.SIGKILL), proc.stderr.read().decode()[-3000:]
    assert kills >= 2

    whole, resumed = RunDir(reference.output_dir), RunDir(killed.output_dir)
    assert _strip(resumed.read_metrics()) == _strip(whole.read_metrics())
    assert read_records(resumed.pool) == read_records(whole.pool)  # no pair lost or twice
    asked = [r["question"] for r in read_records(resumed.annotations)]
    assert asked == [r["question"] for r in read_records(whole.annotations)]  # each once
    a, b = (load_file(run.policy / "model.safetensors") for run in (whole, resumed))
    for name, tensor in a.items():
        assert torch.equal(b[name], tensor), name
    summary = json.loads(resumed.summary.read_text())
    assert summary["annotator_calls"] == json.loads(whole.summary.read_text())["annotator_calls"]


def test_resume_refuses_another_config(train_config, tmp_path):
    from bpo.config import ConfigError
    from bpo.online import train

    train(train_config("run", "method=on_policy_bpo", "T=2"), progress=False)
    (tmp_path / "run" / "summary.json").unlink()  # as if it had been interrupted
    with pytest.raises(
        ConfigError, match=r"--resume: the config differs .*'beta: 0.1' -> 'beta: 0.2'"
    ):
        train(train_config("run", "method=on_policy_bpo", "T=2", "beta=0.2"), resume=True)


CALLS = {"n": 0}


def flaky_reward(prompt: str, response: str) -> float:
    """Fails on its first call of each run, then answers by length."""
    CALLS["n"] += 1
    if CALLS["n"] == 1:
        raise ConnectionError("judge unreachable")
    return float(len(response))


def nan_reward(prompt: str, response: str) -> float:
    """NaN for about one response in five: a judge that breaks on some inputs."""
    return math.nan if len(response) % 5 == 0 else float(len(response))


def test_a_failing_call_is_retried(train_config):
    from bpo.online import train

    CALLS["n"] = 0
    cfg = train_config("flaky", "method=on_policy_bpo", "T=2",
                       "eval.scorer=bpo.tasks.digest:reward",
                       "annotator.function=tests.test_resume:flaky_reward")  # fmt: skip
    summary = train(cfg, progress=False)
    assert summary["pairs_annotated"] == 8 and summary["dropped_failed"] == 0


def inf_reward(prompt: str, response: str) -> float:
    """−inf for about one response in five."""
    return -math.inf if len(response) % 5 == 0 else float(len(response))


@pytest.mark.parametrize("bad", ["nan", "-inf"])
def test_a_judge_that_keeps_failing_stops_or_is_skipped(train_config, capsys, bad):
    from bpo.cli import main
    from bpo.online import train

    name = "nan_reward" if bad == "nan" else "inf_reward"
    common = [
        "method=on_policy_bpo",
        "T=2",
        f"annotator.function=tests.test_resume:{name}",
        "eval.scorer=bpo.tasks.digest:reward",
    ]  # the evaluation's judge works
    stop = train_config("stop", *common)
    assert main(["train", str(_yaml(stop))]) == 2
    err = capsys.readouterr().err
    assert "annotator: failed 3 times (ValueError: " in err
    assert f"{name}: returned non-finite rewards [{bad}" in err
    assert "set annotator.on_failure=skip" in err
    skip = train_config("skip", *common, "annotator.on_failure=skip", "annotator.ties=random")
    summary = train(skip, progress=False)
    assert summary["dropped_failed"] > 0 and summary["pairs_annotated"] == 8


def test_disk_full_stops_with_a_message_and_loses_nothing_written(train_config, monkeypatch):
    import bpo.pool
    from bpo.online import train
    from bpo.pool import DiskFull

    cfg = train_config("full", "method=on_policy_bpo", "T=3")
    real_fsync, writes = os.fsync, {"n": 0}

    def fsync(fd):  # the third durable write finds the disk full
        writes["n"] += 1
        if writes["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(bpo.pool.os, "fsync", fsync)
    with pytest.raises(DiskFull, match=r"disk full while appending to .*--resume"):
        train(cfg, progress=False)
    monkeypatch.setattr(bpo.pool.os, "fsync", real_fsync)
    summary = train(cfg, progress=False, resume=True)
    assert summary["pairs_annotated"] == 12


def _yaml(cfg) -> Path:
    path = Path(cfg.output_dir).with_suffix(".yaml")
    path.write_text(to_yaml(cfg), encoding="utf-8")
    return path


def test_sft_interrupted_and_resumed_ends_where_an_uninterrupted_run_ends(
    tiny_model, tmp_path, monkeypatch
):
    """An SFT run stopped at its 5th step (after the checkpoint at step 4) and resumed gives
    the uninterrupted run's metrics and weights, bit for bit."""
    import bpo.sft
    from bpo.config import SFTConfig, load_config
    from bpo.sft import sft

    from .conftest import TINY_TASK

    def config(name: str) -> SFTConfig:
        return load_config(SFTConfig, overrides=[
            f"output_dir={tmp_path / name}", f"model.path={tiny_model}", *TINY_TASK,
            "epochs=2", "batch_size=16", "checkpoint_every=2", "device=cpu",
            "eval.n_prompts=4", "sampling.max_new_tokens=4",
        ])  # fmt: skip

    sft(config("whole"), progress=False)
    step, calls = bpo.sft._sft_step, {"n": 0}

    def crash_at_5(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return step(*args, **kwargs)

    monkeypatch.setattr(bpo.sft, "_sft_step", crash_at_5)
    with pytest.raises(KeyboardInterrupt):
        sft(config("resumed"), progress=False)
    monkeypatch.setattr(bpo.sft, "_sft_step", step)
    sft(config("resumed"), progress=False, resume=True)
    whole, resumed = RunDir(tmp_path / "whole"), RunDir(tmp_path / "resumed")
    assert resumed.read_metrics() == whole.read_metrics()
    a, b = (load_file(run.path / "model" / "model.safetensors") for run in (whole, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_of_a_finished_run_or_a_shortened_log_is_refused(train_config, tmp_path):
    from bpo.annotators import FunctionAnnotator
    from bpo.checkpoint import AnnotationLog
    from bpo.config import ConfigError
    from bpo.online import train

    cfg = train_config("done", "method=on_policy_bpo", "T=2")
    train(cfg, progress=False)
    with pytest.raises(FileExistsError, match=r"has finished \(summary.json\); nothing to resume"):
        train(cfg, progress=False, resume=True)
    judge = FunctionAnnotator("bpo.tasks.digest:reward")
    AnnotationLog(judge, None, resume=True).resume_at(3)  # another process's: nothing to replay
    log = tmp_path / "annotations.jsonl"
    log.write_text('{"method": "compare", "question": {}, "answers": [], "rng": []}\n')
    with pytest.raises(ConfigError, match=r"1 answers logged, but the checkpoint had used 2"):
        AnnotationLog(judge, log, resume=True).resume_at(2)


def test_same_config_and_seed_give_identical_metrics_and_pool(train_config):
    """Run to run on CPU: every metric (wall times aside) and every annotated pair identical."""
    from bpo.online import train

    runs = []
    for name in ("first", "second"):
        cfg = train_config(name, "method=bpo", "F=2", "T=4", "annotator.noise_temperature=0.5",
                           "annotator.ties=random", "eval.every=2")  # fmt: skip
        train(cfg, progress=False)
        runs.append(RunDir(cfg.output_dir))
    first, second = runs
    assert _strip(first.read_metrics()) == _strip(second.read_metrics())
    assert read_records(first.pool) == read_records(second.pool)
    assert len(read_records(first.pool)) == 16


def test_resume_of_a_run_killed_before_it_began_starts_it(train_config):
    """A job scheduler can always pass --resume: with no config.yaml yet, the run starts."""
    from bpo.online import train

    cfg = train_config("never", "method=on_policy_bpo", "T=2")
    assert train(cfg, progress=False, resume=True)["pairs_annotated"] == 8

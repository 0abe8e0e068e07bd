"""Multi-process training: 2 gloo processes end where 1 process ends with the same global batch
(DESIGN.md, Scale), and the work split behind it."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from accelerate import PartialState
from safetensors.torch import load_file

from bpo.cli import main
from bpo.config import to_yaml
from bpo.distributed import bounds, chunked_map, draw_seed, end_processes, on_main, shard_map
from bpo.human import LabelQueue, WaitingForLabels
from bpo.pool import PreferencePool
from bpo.rundir import RunDir

from .conftest import TINY_TASK


def test_bounds_split_evenly_and_cover_everything():
    for n in range(0, 12):
        for parts in (1, 2, 3, 5):
            spans = [bounds(n, parts, p) for p in range(parts)]
            assert spans[0][0] == 0 and spans[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
            assert max(hi - lo for lo, hi in spans) - min(hi - lo for lo, hi in spans) <= 1


def test_one_process_maps_are_plain_maps():
    items = list(range(10))
    assert shard_map(lambda xs: [x * 2 for x in xs], items) == [x * 2 for x in items]
    seeds = chunked_map(lambda xs, seed: [seed] * len(xs), items, chunk=4, seed=7)
    assert seeds == [draw_seed(7, 0)] * 4 + [draw_seed(7, 1)] * 4 + [draw_seed(7, 2)] * 2
    assert len(set(seeds)) == 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Unpicklable(Exception):
    def __init__(self) -> None:
        super().__init__("holds a lock")
        self.lock = threading.Lock()


def _raise_on_main(rank: int, port: int, out: str) -> None:
    """One of 2 gloo processes: on_main with a function that raises on the main process, twice;
    writes what this rank raised."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE="2", OMP_NUM_THREADS="1")  # fmt: skip
    PartialState(cpu=True, timeout=timedelta(seconds=60))  # a rank left waiting fails, not hangs
    seen = []
    for error in (WaitingForLabels("8 pairs wait for labels"), _Unpicklable()):

        def fail(error=error):
            raise error

        try:
            on_main(fail)
        except Exception as e:
            seen.append(f"{type(e).__name__}: {e}")
    end_processes()
    Path(out, f"rank{rank}.json").write_text(json.dumps(seen), encoding="utf-8")


def test_what_the_main_process_raises_every_process_raises(tmp_path):
    """No rank is left waiting on a main process that stopped: each raises the same exception,
    or, where it cannot be sent, a RuntimeError that names it."""
    torch.multiprocessing.spawn(_raise_on_main, args=(_free_port(), str(tmp_path)), nprocs=2)
    main_seen, other_seen = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert main_seen == ["WaitingForLabels: 8 pairs wait for labels", "_Unpicklable: holds a lock"]
    assert other_seen == [
        "WaitingForLabels: 8 pairs wait for labels",
        "RuntimeError: _Unpicklable on the main process: holds a lock",
    ]


def _torchrun(processes: int) -> list[str]:
    """torchrun (gloo) of `bpo`, each process checking at its end that no gloo thread is left."""
    return [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={processes}",
        f"--master-port={_free_port()}", str(Path(__file__).with_name("launch_bpo.py")),
    ]  # fmt: skip


def _bpo(
    command: str, processes: int, overrides: list[str], ok: bool = True
) -> subprocess.CompletedProcess[str]:
    """`bpo COMMAND` in fresh processes: plain Python for 1, torchrun for more."""
    launcher = [sys.executable, "-m", "bpo.cli"] if processes == 1 else _torchrun(processes)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    done = subprocess.run(
        [*launcher, command, *overrides], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0 or not ok, done.stderr[-3000:]
    return done


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    files = sorted(RunDir(run_dir).policy.glob("*.safetensors"))
    assert files, f"no weights in {run_dir}"
    return {f"{f.name}:{k}": v for f in files for k, v in load_file(f).items()}


@pytest.mark.parametrize(
    "setting",
    [
        ["finetune=full", "method=online_dpo", "F=2", "loss=dpo"],
        ["finetune=lora", "lora.r=4", "lora.members=2", "method=on_policy_bpo", "loss=ipo"],
    ],
    ids=["full-online-dpo", "lora-ensemble-bpo-ipo"],
)
def test_two_processes_end_where_one_does(train_config, tmp_path, setting):
    """Same pairs in the pool, same losses, same final parameters (float tolerance); the 2-process
    run also accumulates gradients over micro-batches of one pair."""
    runs = {}
    for processes, extra in ((1, []), (2, ["micro_batch_size=1"])):
        cfg = train_config(f"p{processes}", *setting, *extra)
        config = tmp_path / f"p{processes}.yaml"
        config.write_text(to_yaml(cfg), encoding="utf-8")
        _bpo("train", processes, [str(config)])
        runs[processes] = Path(cfg.output_dir)
    one, two = (PreferencePool.read(RunDir(runs[p]).pool) for p in (1, 2))
    assert len(one) == len(two) == 16
    assert [(p.prompt, p.chosen, p.rejected) for p in one] == [
        (p.prompt, p.chosen, p.rejected) for p in two
    ]
    for a, b in zip(one, two):
        assert (a.behavior_chosen_logp is None) == (b.behavior_chosen_logp is None)
        if a.behavior_chosen_logp is not None:
            assert a.behavior_chosen_logp == pytest.approx(b.behavior_chosen_logp, abs=1e-4)
    steps = [[r for r in RunDir(runs[p]).read_metrics() if "loss" in r] for p in (1, 2)]
    for a, b in zip(*steps):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    weights_one, weights_two = _weights(runs[1]), _weights(runs[2])
    assert weights_one.keys() == weights_two.keys()
    for name, w in weights_one.items():
        torch.testing.assert_close(weights_two[name], w, atol=1e-5, rtol=1e-4, msg=name)
    summaries = [json.loads(RunDir(runs[p]).summary.read_text()) for p in (1, 2)]
    assert summaries[0]["win_rate"] == summaries[1]["win_rate"]


def test_sft_on_two_processes_ends_where_one_does(tiny_model, tmp_path):
    """64 demonstrations in batches of 21: the last batch has one row, so one process has none
    and must still take part (with a row of weight 0); a 2-member LoRA ensemble, micro-batches."""
    common = [f"model.path={tiny_model}", *TINY_TASK, "epochs=1", "batch_size=21",
              "finetune=lora", "lora.r=4", "lora.members=2", "device=cpu", "eval.n_prompts=4",
              "sampling.max_new_tokens=4"]  # fmt: skip
    _bpo("sft", 1, [f"output_dir={tmp_path / 'p1'}", *common])
    _bpo("sft", 2, [f"output_dir={tmp_path / 'p2'}", *common, "micro_batch_size=4"])
    losses = [
        [r["loss"] for r in RunDir(tmp_path / p).read_metrics() if "loss" in r]
        for p in ("p1", "p2")
    ]
    assert len(losses[0]) == 4 and losses[1] == pytest.approx(losses[0], abs=1e-5)
    one, two = (load_file(tmp_path / p / "model" / "model.safetensors") for p in ("p1", "p2"))
    for name, w in one.items():
        torch.testing.assert_close(two[name], w, atol=1e-5, rtol=1e-4, msg=name)


def test_a_batch_that_does_not_split_over_the_processes_is_refused(train_config, tmp_path):
    cfg = train_config("odd", "method=on_policy_bpo", "T=1", "B=3")
    config = tmp_path / "odd.yaml"
    config.write_text(to_yaml(cfg))
    done = _bpo("train", 2, [str(config)], ok=False)
    assert done.returncode != 0 and "gloo threads still running" not in done.stderr
    assert "B: 3 pairs per step do not split over 2 processes; make B a multiple" in done.stderr


def test_two_processes_resume_where_they_left_off(train_config, tmp_path):
    """A 2-process run cut back to its step-2 checkpoint (summary, later checkpoints and the
    final policy gone, as after a kill) and resumed on 2 processes ends where it ended: the
    main process replays the logged annotations and every rank restores the checkpoint."""
    cfg = train_config("run", "finetune=full", "method=online_dpo", "F=4", "T=8",
                       "micro_batch_size=1", "checkpoint_every=2",
                       "keep_checkpoints=4")  # fmt: skip
    config = tmp_path / "run.yaml"
    config.write_text(to_yaml(cfg), encoding="utf-8")
    _bpo("train", 2, [str(config)])
    run = RunDir(cfg.output_dir)
    whole = {
        "metrics": [_no_time(r) for r in run.read_metrics()],
        "pool": run.pool.read_text(),
        "annotations": run.annotations.read_text(),
        "weights": _weights(run.path),
    }
    for step in ("step-000004", "step-000006"):
        shutil.rmtree(run.checkpoints / step)
    shutil.rmtree(run.policy)
    run.summary.unlink()
    _bpo("train", 2, [str(config), "--resume"])
    assert [_no_time(r) for r in run.read_metrics()] == whole["metrics"]
    assert run.pool.read_text() == whole["pool"]  # no pair lost or twice
    assert run.annotations.read_text() == whole["annotations"]  # replayed, none asked again
    for name, w in _weights(run.path).items():
        torch.testing.assert_close(w, whole["weights"][name], atol=0, rtol=0, msg=name)


def test_people_label_a_two_process_run_as_they_would_label_it_on_one(train_config, tmp_path):
    """annotator.type=human on 2 processes: both stop for the labels (the main one says why) and
    resume from them, or both wait for them; the questions, the pool and the final policy are
    those of 1 process."""
    runs = {}
    for processes in (1, 2):
        cfg = train_config(f"p{processes}", "method=bpo", "F=2", "finetune=full",
                           "annotator.type=human", "annotator.wait=false")  # fmt: skip
        config = tmp_path / f"p{processes}.yaml"
        config.write_text(to_yaml(cfg), encoding="utf-8")
        queue = LabelQueue(Path(cfg.output_dir) / "human")
        for attempt in range(3):  # stops before phases 0 and 1, then ends
            args = [str(config), *(["--resume"] if attempt else [])]
            if processes == 1:
                if main(["train", *args]) == 0:
                    break
            else:
                done = _bpo("train", processes, args, ok=False)
                if done.returncode == 0:
                    break
                assert done.stderr.count("pairs wait for labels") == 1, done.stderr[-3000:]
                assert "gloo threads still running" not in done.stderr
            _label_new_pairs(queue)
        assert RunDir(cfg.output_dir).summary.exists()
        runs[processes] = (RunDir(cfg.output_dir), queue)
    cfg = train_config("waits", "method=bpo", "F=2", "finetune=full", "annotator.type=human")
    config = tmp_path / "waits.yaml"
    config.write_text(to_yaml(cfg), encoding="utf-8")
    queue, stop = LabelQueue(Path(cfg.output_dir) / "human"), threading.Event()

    def label_until_stopped() -> None:
        while not stop.wait(0.2):
            _label_new_pairs(queue)

    labeller = threading.Thread(target=label_until_stopped)
    labeller.start()
    try:
        _bpo("train", 2, [str(config)])  # waits at each phase until the labeller has answered
    finally:
        stop.set()
        labeller.join()
    runs["waits"] = (RunDir(cfg.output_dir), queue)
    one, queue_one = runs[1]
    for two, queue_two in (runs[2], runs["waits"]):
        assert queue_two.pending() == queue_one.pending()
        assert queue_two.labels() != [] and len(queue_two.labels()) == len(queue_one.labels())
        assert two.pool.read_text() == one.pool.read_text()
        for name, w in _weights(one.path).items():
            torch.testing.assert_close(_weights(two.path)[name], w, atol=1e-5, rtol=1e-4, msg=name)


def _label_new_pairs(queue: LabelQueue) -> None:
    """Answer every pair not labelled yet: `first` for the pairs asked at even places."""
    labelled = {label.pair for label in queue.labels()}
    for i, pair in enumerate(queue.pending()):
        if pair.id not in labelled:
            queue.give(pair.id, ("first", "second")[i % 2], "ann", "c" * 8)


def _no_time(record: dict) -> dict:
    return {k: v for k, v in record.items() if not k.startswith("time/")}


def test_the_command_closes_its_process_group(tmp_path):
    """`bpo` closes the process group itself, even on an error: left to interpreter exit, gloo's
    threads can abort a process whose work is done."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)  # fmt: skip
    try:
        assert main(["eval", str(tmp_path / "no-run")]) == 2
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()

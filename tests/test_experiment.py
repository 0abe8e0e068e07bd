"""`bpo experiment`: the grid, placeholders, resuming without rerunning finished runs, reports."""

from __future__ import annotations

import csv
import json
import shutil

import pytest

from bpo.cli import main
from bpo.config import ConfigError, ExperimentConfig, load_config
from bpo.experiments import cells, run_experiment, train_config

TINY = {"task": {"n_sft": 64, "n_align": 64, "n_eval": 8}, "T": 2, "B": 2, "device": "cpu"}
TINY["method"] = "on_policy_bpo"


def experiment(tmp_path, tiny_model, **fields) -> ExperimentConfig:
    train = {**TINY, "model": {"path": tiny_model}, "sampling": {"max_new_tokens": 4}}
    values = {"output_dir": str(tmp_path / "xp"), "workers": 1, "train": train, **fields}
    return load_config(ExperimentConfig, values=values)


def test_grid_is_the_product_and_names_each_run(tmp_path, tiny_model):
    cfg = experiment(tmp_path, tiny_model, grid={"method": ["offline_dpo", "bpo"], "F": [1, 2]})
    grid = cells(cfg)
    assert [c.values for c in grid] == [
        {"method": "offline_dpo", "F": 1},
        {"method": "offline_dpo", "F": 2},
        {"method": "bpo", "F": 1},
        {"method": "bpo", "F": 2},
    ]
    assert grid[3].path == tmp_path / "xp" / "runs" / "method=bpo,F=2"


def test_run_names_skip_fields_with_one_value_and_slashes(tmp_path, tiny_model):
    cfg = experiment(tmp_path, tiny_model, grid={"seed": [0, 1], "reference_path": ["a/b"]})
    assert [c.path.name for c in cells(cfg)] == ["seed=0", "seed=1"]
    cfg = experiment(tmp_path, tiny_model, grid={"reference_path": ["a/b", "c/d"]})
    assert [c.path.name for c in cells(cfg)] == ["reference_path=a_b", "reference_path=c_d"]


def test_train_config_fills_placeholders_and_points_runs_at_the_task_sft_model(
    tmp_path, tiny_model
):
    cfg = experiment(
        tmp_path,
        tiny_model,
        grid={
            "task.name": ["quiz"],
            "seed": [3],
            "method": [None],
            "F": [2],
            "reference": ["gold"],
            "reference_path": ["gold/{task.name}/s{seed}"],
        },
        sft={"epochs": 1},
        sft_dir=str(tmp_path / "sfts"),
    )
    run = train_config(cfg, cells(cfg)[0])
    assert run.reference_path == "gold/quiz/s3"
    assert run.model.path == str(tmp_path / "sfts" / "quiz" / "model")
    assert run.seed == 3 and run.T == 2
    assert run.output_dir == str(cells(cfg)[0].path)


def test_placeholder_naming_an_unset_field_is_an_error(tmp_path, tiny_model):
    cfg = experiment(tmp_path, tiny_model, grid={"reference_path": ["x/{lora.init_from}"]})
    with pytest.raises(ConfigError, match="lora.init_from"):
        train_config(cfg, cells(cfg)[0])


def test_bad_grid_value_is_rejected_before_any_run(tmp_path, tiny_model):
    cfg = experiment(tmp_path, tiny_model, grid={"F": [3]})  # 3 does not divide T = 2
    with pytest.raises(ConfigError, match="F"):
        run_experiment(cfg, progress=False)
    assert not (tmp_path / "xp" / "runs").exists()


def test_experiment_resumes_without_rerunning_finished_runs(tmp_path, tiny_model):
    cfg = experiment(
        tmp_path,
        tiny_model,
        grid={"method": ["on_policy_bpo", "offline_dpo"], "seed": [0, 1]},
        versus=[["on_policy_bpo", "offline_dpo"]],
        n_resamples=200,
        workers=2,  # spawned worker processes; the other tests train in this process
    )
    rows = run_experiment(cfg, progress=False)
    assert [r["status"] for r in rows] == ["done"] * 4
    grid = cells(cfg)
    finished = grid[0].path / "summary.json"
    stamp = finished.stat().st_mtime_ns
    (grid[3].path / "summary.json").unlink()  # as if killed before it finished
    rows = run_experiment(cfg, progress=False)
    assert finished.stat().st_mtime_ns == stamp  # not trained again
    assert (grid[3].path / "summary.json").is_file()  # trained again from the start
    assert (
        len((grid[3].path / "metrics.jsonl").read_text().splitlines()) == 2 + 2
    )  # 2 evals, 2 steps

    root = tmp_path / "xp"
    with open(root / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [(r["method"], r["seed"], r["status"]) for r in table] == [
        ("on_policy_bpo", "0", "done"),
        ("on_policy_bpo", "1", "done"),
        ("offline_dpo", "0", "done"),
        ("offline_dpo", "1", "done"),
    ]
    summary = json.loads(finished.read_text())
    assert float(table[0]["win_rate"]) == summary["win_rate"]
    report = (root / "RESULTS.md").read_text()
    assert "| on_policy_bpo |" in report and "Head to head: on_policy_bpo vs offline_dpo" in report
    assert (root / "curves.png").stat().st_size > 0 and (root / "aggregates.png").is_file()


def test_a_run_that_fails_is_recorded_and_skipped_until_retried(tmp_path, tiny_model):
    cfg = experiment(
        tmp_path,
        tiny_model,
        grid={
            "method": [None],
            "F": [2],
            "reference": ["gold"],
            "reference_path": [str(tmp_path / "missing")],
        },
    )
    (row,) = run_experiment(cfg, progress=False)
    assert row["status"] == "failed" and "missing" in row["error"]
    assert "Failed runs:" in (tmp_path / "xp" / "RESULTS.md").read_text()
    failed = cells(cfg)[0].path / "failed.json"
    stamp = failed.stat().st_mtime_ns
    run_experiment(cfg, progress=False)
    assert failed.stat().st_mtime_ns == stamp


def test_cli_experiment_names_an_unknown_field(tmp_path, capsys):
    assert main(["experiment", f"output_dir={tmp_path}", "grid.seed=[0]", "wokers=2"]) == 2
    assert "wokers" in capsys.readouterr().err


def test_each_task_sft_model_is_trained_once_and_reported(tmp_path, tiny_model):
    cfg = experiment(
        tmp_path,
        tiny_model,
        grid={"task.name": ["quiz"], "seed": [0, 1]},
        sft={"epochs": 1, "task": TINY["task"], "sampling": {"max_new_tokens": 4}},
        base_model={"hidden_size": 32, "num_layers": 1, "num_heads": 2},
    )
    run_experiment(cfg, progress=False)
    sft_summary = tmp_path / "xp" / "sft" / "quiz" / "summary.json"
    stamp = sft_summary.stat().st_mtime_ns
    assert train_config(cfg, cells(cfg)[0]).model.path == str(sft_summary.parent / "model")
    (cells(cfg)[1].path / "summary.json").unlink()
    run_experiment(cfg, progress=False)
    assert sft_summary.stat().st_mtime_ns == stamp  # not trained again
    sft_win_rate = 100 * json.loads(sft_summary.read_text())["win_rate"]
    assert f"| sft | {sft_win_rate:.1f} |" in (tmp_path / "xp" / "RESULTS.md").read_text()


def test_an_interrupted_sft_resumes_from_its_checkpoint(tmp_path, tiny_model):
    def sft_experiment(**changes) -> ExperimentConfig:
        sft = {"epochs": 1, "batch_size": 16, "checkpoint_every": 1, "task": TINY["task"],
               "sampling": {"max_new_tokens": 4}, **changes}  # fmt: skip
        base_model = {"hidden_size": 32, "num_layers": 1, "num_heads": 2}
        return experiment(tmp_path, tiny_model, grid={"task.name": ["quiz"]}, sft=sft,
                          base_model=base_model)  # fmt: skip

    cfg = sft_experiment()
    run_experiment(cfg, progress=False)
    sft_run = tmp_path / "xp" / "sft" / "quiz"
    trained = (sft_run / "model" / "model.safetensors").read_bytes()
    metrics = (sft_run / "metrics.jsonl").read_text()
    kept, last = sorted((sft_run / "checkpoints").iterdir())  # steps 2 and 3 of 4
    stamp = kept.stat().st_mtime_ns
    shutil.rmtree(last)  # as if killed during step 4, before the final model and summary
    shutil.rmtree(sft_run / "model")
    (sft_run / "summary.json").unlink()
    shutil.rmtree(cells(cfg)[0].path)
    run_experiment(cfg, progress=False)
    assert kept.stat().st_mtime_ns == stamp  # resumed from it, not started again
    assert (sft_run / "model" / "model.safetensors").read_bytes() == trained
    assert _no_time((sft_run / "metrics.jsonl").read_text()) == _no_time(metrics)
    (sft_run / "summary.json").unlink()  # unfinished again, and now the SFT config changes:
    shutil.rmtree(cells(cfg)[0].path)
    run_experiment(sft_experiment(lr=1e-4), progress=False)
    assert kept.stat().st_mtime_ns != stamp  # started again, not resumed on another config
    assert (sft_run / "model" / "model.safetensors").read_bytes() != trained


def _no_time(metrics: str) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if "time" not in k and "seconds" not in k}
            for line in metrics.splitlines()]  # fmt: skip


def test_report_names_each_budget_when_the_runs_differ(tmp_path, tiny_model):
    cfg = experiment(tmp_path, tiny_model, grid={"B": [2, 4]}, n_resamples=50)
    run_experiment(cfg, progress=False)
    report = (tmp_path / "xp" / "RESULTS.md").read_text()
    assert "Budgets differ between runs (compare rows only at one budget): T = 2, B = 2, " in report
    assert "N_total = 4 pairs (B=2); T = 2, B = 4, N_total = 8 pairs (B=4)" in report

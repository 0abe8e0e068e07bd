"""CPU smoke tests of every `bpo` command on a tiny model."""

import json
import subprocess
import sys

from bpo.cli import main
from tests.conftest import TINY_TASK

SMALL = [*TINY_TASK, "device=cpu", "sampling.max_new_tokens=6", "eval.n_prompts=8"]


def test_sft_train_eval(tiny_model, tmp_path, capsys):
    sft_dir, run_dir = tmp_path / "sft", tmp_path / "bpo"
    assert main(["sft", f"model.path={tiny_model}", f"output_dir={sft_dir}", "epochs=1",
                 *SMALL]) == 0  # fmt: skip
    assert (sft_dir / "model" / "config.json").is_file()
    config = tmp_path / "bpo.yaml"
    config.write_text(f"model:\n  path: {sft_dir / 'model'}\nmethod: bpo\nF: 2\nT: 4\nB: 2\n")
    assert main(["train", str(config), f"output_dir={run_dir}", *SMALL]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["method"] == "bpo" and summary["pairs_annotated"] == 8
    capsys.readouterr()
    assert main(["eval", str(run_dir)]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["eval/win_rate"] == summary["win_rate"]
    assert (run_dir / "eval.json").is_file()
    assert main(["eval", str(sft_dir)]) == 0


def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert main(["train", "model.path=x", "method=bpo", "F=3", "T=4"]) == 2
    err = capsys.readouterr().err
    assert "bpo train: error: F: must divide T" in err
    assert main(["train", "model.path=x", "method=bpo", "F=2", "lora.rnak=4"]) == 2
    assert "lora.rnak: unknown field" in capsys.readouterr().err
    assert main(["eval", str(tmp_path)]) == 2
    assert "no config.yaml" in capsys.readouterr().err


def test_quick_demo(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--quick"]) == 0
    table = capsys.readouterr().out
    for method in ("sft", "offline_dpo", "on_policy_dpo", "on_policy_bpo"):
        assert f"| {method} |" in table


def test_console_script_is_installed():
    out = subprocess.run(
        [sys.executable, "-m", "bpo.cli", "--help"], capture_output=True, text=True, check=True
    )
    assert "demo" in out.stdout and "train" in out.stdout

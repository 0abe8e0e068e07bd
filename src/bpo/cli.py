"""The `bpo` command: a thin layer over the Python API.

    bpo demo [--out DIR] [--quick] [--task NAME]
    bpo sft CONFIG.yaml [key=value ...] [--resume]
    bpo train CONFIG.yaml [key=value ...] [--resume]
    bpo train-rm CONFIG.yaml [key=value ...] [--resume]
    bpo train-pm CONFIG.yaml [key=value ...] [--resume]
    bpo experiment CONFIG.yaml [key=value ...] [--retry-failed]
    bpo study CONFIG.yaml [key=value ...]
    bpo study-report ROOT
    bpo bandit --reward r1|r2 --method M [--data on_policy|offline] [--bpo] [key=value ...]
    bpo annotate RUN_DIR [--host H] [--port P] [--guidelines FILE]
                 | --import FILE [--annotator NAME] | --export FILE | --status
    bpo eval RUN_DIR
    bpo export RUN_DIR --out DIR

Overrides use OmegaConf's dotted `key=value` form (e.g. `lora.r=16 method=on_policy_bpo`);
the CONFIG file is optional when the overrides give every required field. A run whose people
have not labelled its phase yet (annotator.type=human, annotator.wait=false) exits with code 3.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback

from transformers.utils import logging as hf_logging

from bpo.checkpoint import AnnotatorError
from bpo.config import (
    ConfigError,
    ExperimentConfig,
    SFTConfig,
    TrainConfig,
    load_config,
)
from bpo.human import WaitingForLabels
from bpo.pool import DiskFull
from bpo.rm_config import PreferenceModelConfig, RewardModelConfig


def _split(args: list[str]) -> tuple[str | None, list[str]]:
    """The optional config path (the one argument without `=`) and the overrides."""
    paths = [a for a in args if "=" not in a]
    if len(paths) > 1:
        raise ConfigError(f"command line: more than one config file given: {paths}")
    return (paths[0] if paths else None), [a for a in args if "=" in a]


def _show(summary: dict) -> None:
    """Print a run's summary once, from the main process of a multi-process launch."""
    from bpo.distributed import is_main

    if is_main():
        print(json.dumps(summary, indent=2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bpo", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="SFT, offline DPO, on-policy DPO and BPO on `digest`")
    demo.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    demo.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    demo.add_argument("--task", default="digest", help="built-in task (default digest)")
    for name, help_text in (
        ("sft", "supervised fine-tuning on demonstrations"),
        ("train", "online preference optimization (Algorithm 1)"),
        ("train-rm", "Bradley-Terry reward model on preference pairs"),
        ("train-pm", "pairwise preference model on preference pairs"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("args", nargs="*", metavar="CONFIG|key=value")
        p.add_argument("--resume", action="store_true", help="continue an interrupted run")
    xp = sub.add_parser("experiment", help="a grid of runs with statistics, RESULTS.md, plots")
    xp.add_argument("args", nargs="*", metavar="CONFIG|key=value")
    xp.add_argument("--retry-failed", action="store_true", help="train failed runs again")
    st = sub.add_parser("study", help="a sample-based method of Tajwar et al. (2404.14367)")
    st.add_argument("args", nargs="*", metavar="CONFIG|key=value")
    bd = sub.add_parser("bandit", help="the didactic bandit of Tajwar et al., App. I")
    bd.add_argument("--reward", choices=["r1", "r2"], required=True)
    bd.add_argument("--method", required=True, help="ipo, dpo, ppo, rwr, best_of_n, ...")
    bd.add_argument("--data", choices=["on_policy", "offline"], default="on_policy")
    bd.add_argument("--bpo", action="store_true", help="behavior reference (BPO) for dpo / ipo")
    bd.add_argument("--out", help="run directory (default runs/bandit/<reward>/<data>-<method>/"
                    "seed<seed>, the layout study-report reads)")  # fmt: skip
    bd.add_argument("overrides", nargs="*", metavar="key=value")
    sr = sub.add_parser("study-report", help="table and plots of the study runs under ROOT")
    sr.add_argument("root")
    an = sub.add_parser("annotate", help="label a run's pending pairs on a local web page")
    an.add_argument("run_dir", help="the output_dir of a run with annotator.type=human")
    an.add_argument("--host", default="127.0.0.1", help="address to listen on (default "
                    "127.0.0.1: this machine only)")  # fmt: skip
    an.add_argument("--port", type=int, default=8765, help="port (default 8765; 0: any free one)")
    an.add_argument(
        "--lease-minutes",
        metavar="MINUTES",
        type=float,
        default=10.0,
        help="how long a pair shown to one annotator is kept from the others",
    )
    action = an.add_mutually_exclusive_group()
    action.add_argument(
        "--import",
        dest="import_file",
        metavar="FILE",
        help="add labels from a .csv/.jsonl (pair_id, choice, [annotator])",
    )
    action.add_argument("--export", metavar="FILE", help="write the unlabelled pairs to a "
                        ".csv/.jsonl for another labelling tool")  # fmt: skip
    action.add_argument("--status", action="store_true", help="print progress and agreement")
    an.add_argument(
        "--annotator", metavar="NAME", help="with --import: the name of rows without one"
    )
    an.add_argument("--guidelines", metavar="FILE", help="a text file shown above every pair")
    ev = sub.add_parser("eval", help="evaluate a finished run's policy")
    ev.add_argument("run_dir")
    ex = sub.add_parser("export", help="a LoRA run as merged/, adapter/ (peft) and members/")
    ex.add_argument("run_dir")
    ex.add_argument("--out", required=True, help="folder to write into")
    args = parser.parse_args(argv)
    hf_logging.disable_progress_bar()  # weight loading/saving bars would drown the run's own
    try:
        _dispatch(args)
    except (ConfigError, FileExistsError, FileNotFoundError, AnnotatorError, DiskFull) as e:
        print(f"bpo {args.command}: error: {e}", file=sys.stderr)
        return 2
    except WaitingForLabels as e:  # every process stops; the main one says why
        from bpo.distributed import is_main

        if is_main():
            print(f"bpo {args.command}: {e}", file=sys.stderr)
        return 3
    except BaseException as e:  # its frames would keep the run's models, and their process group
        traceback.clear_frames(e.__traceback__)
        raise
    finally:
        if "torch" in sys.modules:  # `bpo annotate` and `--help` never load torch
            from bpo.distributed import end_processes

            end_processes()
    return 0


def _dispatch(args: argparse.Namespace) -> None:
    """Run the command `args` names."""
    if args.command == "demo":
        from bpo.demo import run_demo

        run_demo(args.out, quick=args.quick, task=args.task)
    elif args.command == "sft":
        from bpo.sft import sft

        path, overrides = _split(args.args)
        _show(sft(load_config(SFTConfig, path, overrides), resume=args.resume))
    elif args.command == "train":
        from bpo.online import train

        path, overrides = _split(args.args)
        _show(train(load_config(TrainConfig, path, overrides), resume=args.resume))
    elif args.command == "train-rm":
        from bpo.reward_model import train_reward_model

        path, overrides = _split(args.args)
        cfg = load_config(RewardModelConfig, path, overrides)
        print(json.dumps(train_reward_model(cfg, resume=args.resume), indent=2))
    elif args.command == "train-pm":
        from bpo.reward_model import train_preference_model

        path, overrides = _split(args.args)
        cfg = load_config(PreferenceModelConfig, path, overrides)
        print(json.dumps(train_preference_model(cfg, resume=args.resume), indent=2))
    elif args.command == "experiment":
        from bpo.experiments import run_experiment

        path, overrides = _split(args.args)
        cfg = load_config(ExperimentConfig, path, overrides)
        rows = run_experiment(cfg, retry_failed=args.retry_failed)
        print(f"{len(rows)} runs; results in {cfg.output_dir}/RESULTS.md and results.csv")
    elif args.command in ("study", "bandit"):
        from bpo.onpolicy.config import StudyConfig, bandit_config
        from bpo.onpolicy.study import run_study

        if args.command == "study":
            path, overrides = _split(args.args)
            cfg = load_config(StudyConfig, path, overrides)
        else:
            cfg = bandit_config(args.reward, args.method, args.data, args.bpo, args.out,
                                args.overrides)  # fmt: skip
        print(json.dumps(run_study(cfg), indent=2))
    elif args.command == "study-report":
        from bpo.onpolicy.report import write_report

        print(write_report(args.root).read_text(encoding="utf-8"))
    elif args.command == "annotate":
        _annotate(args)
    elif args.command == "export":
        from bpo.export import export_run

        print(json.dumps(export_run(args.run_dir, args.out), indent=2))
    else:
        from bpo.evaluate import evaluate_run

        print(json.dumps(evaluate_run(args.run_dir), indent=2))


def _annotate(args: argparse.Namespace) -> None:
    """`bpo annotate`: serve the labelling page, or import, export or show the labels."""
    from pathlib import Path

    from bpo.annotate import check_human_run, serve
    from bpo.human import LabelQueue, export_pending, import_labels

    if args.annotator and not args.import_file:
        raise ConfigError("--annotator: names the rows of an --import; give --import FILE")
    if args.guidelines and (args.import_file or args.export or args.status):
        raise ConfigError("--guidelines: shown on the page; drop --import, --export or --status")
    if not (args.import_file or args.export or args.status):
        serve(args.run_dir, args.host, args.port, args.lease_minutes, args.guidelines)
        return
    check_human_run(Path(args.run_dir))
    queue = LabelQueue(Path(args.run_dir) / "human")
    if args.import_file:
        print(json.dumps(import_labels(queue, args.import_file, args.annotator), indent=2))
    elif args.export:
        print(f"{export_pending(queue, args.export)} pairs written to {args.export}")
    else:
        print(json.dumps(queue.status(), indent=2))


if __name__ == "__main__":
    sys.exit(main())

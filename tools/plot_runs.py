"""Overlay the training curves of several runs in one picture (same axes): loss and lr by
iteration, validation by epoch, each run's best epoch marked; e.g. two seeds, or fp32 vs bf16.

    python tools/plot_runs.py logs/toy_seed0 logs/toy_seed1 --out seeds.png

Each LOGDIR is a run's log folder (train.sh's LOGDIR) holding metrics.jsonl.
"""
import argparse
import os

from engine.evaluators import EVALUATORS
from utils.errors import InputError
from utils.logging import run_cli
from utils.plots import plot_runs, read_metrics


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log_dirs", nargs="+", metavar="LOGDIR", help="runs' log folders")
    parser.add_argument("--out", default="runs.png", help="the picture to write (default: runs.png)")
    parser.add_argument("--title", default=None, help="a title above the plots")
    args = parser.parse_args(argv)
    runs = []
    for log_dir in args.log_dirs:
        path = os.path.join(log_dir, "metrics.jsonl")
        if not os.path.isfile(path):
            raise InputError(f"{log_dir} has no metrics.jsonl: expected the log folder of a "
                             f"training run (train.sh's LOGDIR)")
        runs.append((os.path.basename(os.path.normpath(log_dir)), read_metrics(path)))
    names = [name for name, _ in runs]
    if len(set(names)) < len(names):  # same folder names: tell the runs apart by their paths
        runs = [(os.path.normpath(log_dir), rows) for log_dir, (_, rows) in zip(args.log_dirs, runs)]
    curves = list(dict.fromkeys(name for evaluator in EVALUATORS.values() for name in evaluator.curves))
    plot_runs(runs, args.out, curves, title=args.title)
    print(f"wrote {args.out}: {len(runs)} runs")
    return 0


if __name__ == "__main__":
    run_cli(main)

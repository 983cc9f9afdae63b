"""train.py at the benchmark's speed: one epoch of a real `train.py` on a generated REFER dataset
(the toy's shapes and expressions, drawn at full size), its speed read from the run's own
metrics.jsonl and log, against a bench_model.py row of the same step.

    python bench/train_run.py DIR --train_images 1400 --image_size 512 \
        --compare eager.md --compare_row "bf16+channels_last+fused_adamw+cached_latents | 32" \
        -- --model vpd --random_weights --img_size 512 --token_length 40 --batch-size 32 \
           --lr 5e-5 --precision bf16 --eval_precision bf16 --channels_last --no-attn_grad \
           --dice_weight 0 --workers 6 --eval_batch_size 16 --print-freq 10

Everything after `--` goes to train.py, after `--dataset toy --refer_data_root DIR/data
--output-dir DIR/checkpoints --log_dir DIR/log --epochs 1 --no_tensorboard --cache_latents
DIR/latents` (the toy's own defaults are the tiny CPU recipe: give the model's flags). Prints a
Markdown summary (training img/s over the run's print intervals after the first, which holds the
warm-up; the epoch's img/s; validation sentences/s), then train.py's log. `--random_weights` is
train.py's explicit opt-in to random weights at the model's real sizes: the speed does not depend
on the values, and nothing has to be read.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time

from refer.toy import ensure_toy_dataset
from utils.paths import REPO_ROOT


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", help="working folder: data, latents, checkpoints and log go here")
    parser.add_argument("--train_images", type=int, default=1400,
                        help="toy train images (~2.7 refs each: 1400 -> ~118 batches of 32)")
    parser.add_argument("--eval_images", type=int, default=60,
                        help="toy val images (and as many test images) (~2.7 refs and ~7 "
                             "sentences each)")
    parser.add_argument("--image_size", type=int, default=512,
                        help="longest side of the generated images (train.py resizes to --img_size)")
    parser.add_argument("--compare", default=None,
                        help="a bench_model.py output (Markdown) to compare the training img/s with")
    parser.add_argument("--compare_row", default=None,
                        help="the row's first cells, 'VARIANT | BATCH'")
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    args.train_flags = argv[split + 1:]  # train.py's flags, after --
    return args


def read_rows(path):
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def bench_row_img_s(path, row):
    """The 'train img/s' cell of the row of a bench_model.py table whose first cells are `row`."""
    columns = None
    with open(path) as handle:
        for line in handle:
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if cells[:2] == ["variant", "batch"]:
                columns = cells
            elif columns and " | ".join(cells[:2]) == row:
                return float(cells[columns.index("train img/s")])
    return None


def summary(rows, compare=None):
    intervals = [row for row in rows if row.get("kind") == "iteration"]
    epochs = [row for row in rows if row.get("kind") == "epoch"]
    lines = ["| measure | value |", "|---|---|"]
    steady = [row["images_per_s"] for row in intervals[1:]]
    if steady:
        # Equal intervals (print_freq batches each): the harmonic mean is images / seconds.
        overall = len(steady) / sum(1 / rate for rate in steady)
        lines.append(f"| training img/s, print intervals 2-{len(intervals)} (of "
                     f"{intervals[-1]['iteration']} iterations) | {overall:.2f} (median "
                     f"{statistics.median(steady):.2f}, range {min(steady):.2f}-{max(steady):.2f}) |")
        if compare:
            lines.append(f"| the bench row ({compare[0]}) | {compare[1]:.2f}: train.py at "
                         f"{100 * overall / compare[1]:.1f} % of it |")
    if intervals:
        lines.append(f"| first print interval (warm-up) img/s | {intervals[0]['images_per_s']:.2f} |")
    for row in epochs:
        lines.append(f"| epoch {row['epoch']}: img/s over the whole epoch | {row['images_per_s']:.2f} "
                     f"({row['train_seconds']:.1f} s) |")
        for dataset, result in row["val"].items():
            sentences, seconds = result.get("sentences"), result.get("seconds")
            if sentences and seconds:
                lines.append(f"| validation ({dataset}): sentences/s | {sentences / seconds:.1f} "
                             f"({sentences} sentences in {seconds:.1f} s) |")
        if row.get("peak_memory_bytes"):
            lines.append(f"| peak memory | {row['peak_memory_bytes'] / 2**30:.2f} GiB |")
    return "\n".join(lines)


def main(argv=None):
    args = parse(argv)
    root = os.path.abspath(args.dir)
    data_root, log_dir = os.path.join(root, "data"), os.path.join(root, "log")
    started = time.perf_counter()
    ensure_toy_dataset(data_root, num_train_images=args.train_images,
                       num_eval_images=args.eval_images, image_size=args.image_size)
    generated = time.perf_counter() - started
    command = [sys.executable, "train.py", "--dataset", "toy", "--refer_data_root", data_root,
               "--output-dir", os.path.join(root, "checkpoints"), "--log_dir", log_dir,
               "--epochs", "1", "--no_tensorboard", "--cache_latents",
               os.path.join(root, "latents"), *args.train_flags]
    print(f"## train.py at the bench's speed\n\n- command: `{' '.join(command[1:])}`")
    print(f"- data: {args.train_images} train and {args.eval_images} val images of the toy at "
          f"{args.image_size} px, generated in {generated:.1f} s", flush=True)
    started = time.perf_counter()
    with open(os.path.join(root, "train.log"), "w+") as output:
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=output, stderr=subprocess.STDOUT)
        # A time limit (the suite's `timeout`) stops train.py the way a scheduler would; what it
        # recorded so far is still summarised below.
        signal.signal(signal.SIGTERM, lambda signum, frame: process.terminate())
        returncode = process.wait()
        output.seek(0)
        log = output.read()
    print(f"- train.py: exit {returncode} after {time.perf_counter() - started:.1f} s\n")
    metrics = os.path.join(log_dir, "metrics.jsonl")
    compare = None
    if args.compare and args.compare_row and os.path.isfile(args.compare):
        img_s = bench_row_img_s(args.compare, args.compare_row)
        compare = (args.compare_row, img_s) if img_s else None
    if os.path.isfile(metrics):
        print(summary(read_rows(metrics), compare))
    print("\ntrain.py's output:\n\n```")
    print(log.rstrip()[-20000:])
    print("```")
    return returncode


if __name__ == "__main__":
    sys.exit(main())

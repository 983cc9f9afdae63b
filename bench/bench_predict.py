"""predict.py's throughput: images/s over a folder of generated pictures, each with the same
expressions, for a trained checkpoint or for a preset with random weights (speed only).

    python bench/bench_predict.py --checkpoint checkpoints/model_best_toy.pth --count 400        # CPU
    python bench/bench_predict.py --model vpd --img_size 512 --random_weights --device cuda      # GPU

Runs `predict.py --images DIR --text ... --out DIR` as a user does (a subprocess: model loading,
reading, the model, PNG masks, RLE and predictions.jsonl all counted) and prints its own summary
line, then one Markdown row. `--random_weights` (needed with --model) writes the preset at its real
sizes, randomly initialised and with every part stored, as a model folder in a temporary folder
first: no weights to download, and masks that mean nothing.
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import subprocess
import sys
import tempfile

import numpy as np
from PIL import Image

from bench.common import command_line, device_name, resolve_device
from models import SegmenterConfig, build_model
from models.pretrained import write_model_folder
from utils.paths import REPO_ROOT

EXPRESSIONS = ("the red shape", "the blue one on the left", "the largest object", "the small green circle")


def write_pictures(folder, count, width, height, seed=0):
    """`count` pictures of coloured rectangles on grey, JPEG."""
    rng = np.random.default_rng(seed)
    for index in range(count):
        pixels = np.full((height, width, 3), 190, np.uint8)
        for _ in range(3):
            top, left = rng.integers(0, height * 3 // 4), rng.integers(0, width * 3 // 4)
            pixels[top:top + height // 4, left:left + width // 4] = rng.integers(0, 256, 3)
        Image.fromarray(pixels).save(os.path.join(folder, f"picture_{index:05d}.jpg"), quality=90)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="a trained model (checkpoint, folder, Hub id)")
    parser.add_argument("--model", default=None, help="a preset to run with random weights instead (vpd, tiny)")
    parser.add_argument("--random_weights", action="store_true",
                        help="confirms --model: random weights at the preset's sizes, for speed only")
    parser.add_argument("--img_size", type=int, default=512, help="with --model: its input size")
    parser.add_argument("--token_length", type=int, default=40, help="with --model: its token length")
    parser.add_argument("--count", type=int, default=256, help="pictures to segment")
    parser.add_argument("--size", default="640x480", help="the pictures' WIDTHxHEIGHT")
    parser.add_argument("--expressions", type=int, default=2, choices=range(1, len(EXPRESSIONS) + 1),
                        help="expressions per picture")
    parser.add_argument("--eval_batch_size", type=int, default=8, help="predict.py's images per batch")
    parser.add_argument("--precision", default="fp32", help="predict.py's --precision")
    parser.add_argument("--device", default="auto", help="predict.py's --device")
    parser.add_argument("--workers", type=int, default=4, help="predict.py's loader processes")
    args = parser.parse_args(argv)
    if (args.checkpoint is None) == (args.model is None):
        parser.error("give --checkpoint, or --model with --random_weights")
    if args.model is not None and not args.random_weights:
        parser.error(f"--model {args.model} builds random weights (speed only): confirm with --random_weights")
    width, height = (int(value) for value in args.size.lower().split("x"))

    with tempfile.TemporaryDirectory(prefix="bench_predict_") as scratch:
        checkpoint = args.checkpoint
        if checkpoint is None:  # every part stored, so loading needs no weights path
            model = build_model(SegmenterConfig(preset=args.model, token_length=args.token_length,
                                                img_size=args.img_size), pretrained=False)
            checkpoint = os.path.join(scratch, "model")
            write_model_folder(checkpoint, model.config, model.state_dict())
            del model
        pictures = os.path.join(scratch, "pictures")
        os.makedirs(pictures)
        write_pictures(pictures, args.count, width, height)
        command = [sys.executable, "predict.py", "--checkpoint", checkpoint, "--images", pictures,
                   "--out", os.path.join(scratch, "out"), "--eval_batch_size", str(args.eval_batch_size),
                   "--precision", args.precision, "--device", args.device, "--workers", str(args.workers)]
        for text in EXPRESSIONS[:args.expressions]:
            command += ["--text", text]
        result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        sys.stderr.write(result.stdout[-3000:] + result.stderr[-3000:])
        return result.returncode
    summary = next(line for line in result.stdout.splitlines() if " predicted in " in line)
    rate = re.search(r"predicted in ([\d.]+) s, ([\d.]+) images/s", summary)
    print(summary)
    print(f"\n{datetime.date.today()}, {device_name(resolve_device(args.device))}; `{command_line(__file__)}`\n")
    print("| model | pictures | expressions each | batch | precision | seconds | images/s |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {args.checkpoint or args.model + ' (random weights)'} | {args.count} at {width} x {height} | "
          f"{args.expressions} | {args.eval_batch_size} | {args.precision} | {rate[1]} | {rate[2]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""predict.py's throughput: images/s over a folder of generated pictures, each with the same
expressions, as predict.py itself reports it.

    python bench/bench_predict.py --count 400 --size 128x96 -- --checkpoint checkpoints/model_best_toy.pth
    python bench/bench_predict.py --count 256 -- --model vpd --random_weights --img_size 512 \\
        --token_length 40 --device cuda --precision bf16                                    # GPU

Everything after `--` goes to predict.py, after `--images DIR --out DIR --text ...`: a model
(`--checkpoint`, or a preset's flags with `--random_weights`, predict.py's explicit opt-in to
random weights at the model's real sizes: the speed does not depend on them and nothing has to be
read) and any other flag (`--eval_batch_size`, `--precision`, `--workers`, ...). predict.py runs
as a user runs it, in a subprocess (loading, reading, the model, PNG masks, RLE, predictions.jsonl
all counted); its summary line is printed, then one Markdown row of the machine and command.
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
from utils.paths import REPO_ROOT

EXPRESSIONS = ("the red shape", "the blue one on the left", "the largest object", "the small green circle")


def write_pictures(folder, count, width, height, seed=0):
    """`count` JPEG pictures of three coloured rectangles on grey."""
    rng = np.random.default_rng(seed)
    for index in range(count):
        pixels = np.full((height, width, 3), 190, np.uint8)
        for _ in range(3):
            top, left = rng.integers(0, height * 3 // 4), rng.integers(0, width * 3 // 4)
            pixels[top:top + height // 4, left:left + width // 4] = rng.integers(0, 256, 3)
        Image.fromarray(pixels).save(os.path.join(folder, f"picture_{index:05d}.jpg"), quality=90)


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=256, help="pictures to segment")
    parser.add_argument("--size", default="640x480", help="the pictures' WIDTHxHEIGHT")
    parser.add_argument("--expressions", type=int, default=2, choices=range(1, len(EXPRESSIONS) + 1),
                        help="expressions per picture")
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    args.predict_flags = argv[split + 1:]  # predict.py's flags, after --
    if not args.predict_flags:
        parser.error("give predict.py's model after --: --checkpoint PATH, or --model NAME --random_weights")
    args.width, args.height = (int(value) for value in args.size.lower().split("x"))
    return args


def main(argv=None):
    args = parse(argv)
    with tempfile.TemporaryDirectory(prefix="bench_predict_") as scratch:
        pictures = os.path.join(scratch, "pictures")
        os.makedirs(pictures)
        write_pictures(pictures, args.count, args.width, args.height)
        command = [sys.executable, "predict.py", "--images", pictures, "--out", os.path.join(scratch, "out")]
        for text in EXPRESSIONS[:args.expressions]:
            command += ["--text", text]
        result = subprocess.run(command + args.predict_flags, cwd=REPO_ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        sys.stderr.write(result.stdout[-3000:] + result.stderr[-3000:])
        return result.returncode
    summary = next(line for line in result.stdout.splitlines() if " predicted in " in line)
    print(summary)
    rate = re.search(r"predicted in ([\d.]+) s, ([\d.]+) images/s", summary)
    flags = args.predict_flags
    device = flags[flags.index("--device") + 1] if "--device" in flags[:-1] else "auto"
    print(f"\n{datetime.date.today()}, {device_name(resolve_device(device))}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; `{command_line(__file__)}`\n")
    print("| predict.py flags | pictures | expressions each | seconds | images/s |")
    print("|---|---|---|---|---|")
    print(f"| `{' '.join(flags)}` | {args.count} at {args.width} x {args.height} | {args.expressions} | {rate[1]} | {rate[2]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

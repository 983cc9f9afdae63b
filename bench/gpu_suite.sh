#!/usr/bin/env bash
# The full-size GPU rows of bench/RESULTS.md, on one GPU, in one command:
#   bash bench/gpu_suite.sh [RESULTS_DIR]      (default: bench/gpu-results)
# 1. eager variants of the `vpd` preset (SD 1.5 sizes, random weights: nothing to download),
#    512 px, batch 4, 40 tokens, including the 24 GB recipe bf16+grad_checkpoint, also with the
#    fused AdamW that train.py uses on GPUs (its peak against bench/memory.py's bounds);
# 2. the README toy run on the GPU for 2 epochs with --cache_latents (the real loop and data path);
# 3. torch.compile against the same stack in eager mode.
# Each part writes its own file as it ends and has its own time limit (PART_SECONDS_*), so a part
# cut short leaves the others' tables. Needs a python with torch, diffusers, open_clip_torch and
# pycocotools (PYTHON, default python3) and the toy data under refer/data/toy for part 2.
set -u
dir=${1:-bench/gpu-results}
PYTHON=${PYTHON:-python3}
mkdir -p "$dir"
export PYTHONUNBUFFERED=1
common=(--model vpd --img_size 512 --batch-size 4 --token_length 40 --steps 10 --warmup 3
        --estimate_refcoco)

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$dir/gpu.txt"
"$PYTHON" -c "import torch, diffusers, open_clip, pycocotools, models, engine" || exit 1

timeout "${PART_SECONDS_EAGER:-300}" "$PYTHON" bench/bench_model.py "${common[@]}" --variants \
    fp32 bf16 fp16 channels_last grad_checkpoint cached_latents fused_adamw \
    bf16+grad_checkpoint bf16+grad_checkpoint+fused_adamw bf16+channels_last+fused_adamw+cached_latents \
    >"$dir/eager.md" 2>"$dir/eager.log"
echo "eager: exit $?"

scratch=$(mktemp -d)  # the toy run's log folder, latents and checkpoints; its lines go to toy.log
timeout "${PART_SECONDS_TOY:-90}" env PYTHON="$PYTHON" bash train.sh toy "$scratch/log" 1 \
    --epochs 2 --cache_latents "$scratch/latents" --output-dir "$scratch" >"$dir/toy.log" 2>&1
echo "toy: exit $?"

# The compiled stack first and its eager twin last in one process, with more iterations: the
# eager stack measured 21.7 img/s first in a process and 34.8 img/s last (bench/RESULTS.md).
TORCH_LOGS=graph_breaks,recompiles timeout "${PART_SECONDS_COMPILE:-300}" "$PYTHON" \
    bench/bench_model.py "${common[@]}" --steps 30 --warmup 10 --variants \
    bf16+channels_last+compile+fused_adamw+cached_latents bf16+channels_last+fused_adamw+cached_latents \
    >"$dir/compile.md" 2>"$dir/compile.log"
echo "compile: exit $?"

#!/usr/bin/env bash
# The full-size GPU figures of bench/RESULTS.md, on one GPU, in one command of at most ~9 minutes:
#   bash bench/gpu_suite.sh [RESULTS_DIR]      (default: bench/gpu-results)
# Parts (bench/README.md says what each measures, how long it takes and what it writes):
#   header   the card (nvidia-smi), versions, which SDPA kernel the 4096-token self-attention gets
#   eager    the eager bf16 stack at batch 32/16/8/4: img/s, step ms, TFLOP/s, % of 989, peak
#            memory, argmax agreement with fp32; the same without channels_last, and with the
#            recorded layers' explicit softmax replaced by SDPA (timing only); the profile of the
#            batch-32 step; the loop's host syncs; the 40-epoch estimate
#   train    train.py itself for one epoch (~118 iterations of 32) on generated 512 px data with
#            the eager fast flags: its img/s from its own metrics.jsonl against the eager row
#   compile  the whole step compiled (COMPILE_MODE, default: default) at batch 32/16/8/4, one
#            graph with a dynamic batch; its profile at 32; the estimate
#   variants (not run unless named in PARTS) the batch-4 variants of 2026-11-26
#   toy      (not run unless named in PARTS) the README toy run on the GPU, 2 epochs
#   predict  (not run unless named in PARTS) predict.py on vpd at 512 px, bf16 then fp32: images/s
# Each part has its own time limit (PART_SECONDS_*) and writes its own files as it ends, so a part
# cut short leaves the others'; compile, last, gets what is left of SUITE_SECONDS (default 530).
# Needs a python (PYTHON, default python3) with torch, diffusers, open_clip_torch and pycocotools
# (bench/README.md: installing them from carried wheels).
set -u
dir=${1:-bench/gpu-results}
PYTHON=${PYTHON:-python3}
PARTS=${PARTS:-header eager train compile}
COMPILE_MODE=${COMPILE_MODE:-default}
mkdir -p "$dir"
export PYTHONUNBUFFERED=1
deadline=$(( $(date +%s) + ${SUITE_SECONDS:-530} ))
stack=bf16+channels_last+fused_adamw+cached_latents
sizes=(--model vpd --img_size 512 --token_length 40 --batch_sizes 32 16 8 4)

wants() { [[ " $PARTS " == *" $1 "* ]]; }
limit() {  # a part's own limit, or what is left before the deadline if that is less
    local left=$(( deadline - $(date +%s) ))
    (( left < $1 )) && echo $(( left > 10 ? left : 10 )) || echo "$1"
}
log() { echo "$(date -u +%H:%M:%S) $*" | tee -a "$dir/suite.log"; }

"$PYTHON" -c "import torch, diffusers, open_clip, pycocotools, models, engine" || exit 1
log "suite: parts '$PARTS', results in $dir"

if wants header; then
    {
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
        "$PYTHON" -c "import torch, diffusers, transformers, platform; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'python', platform.python_version())"
        echo
        timeout "$(limit "${PART_SECONDS_HEADER:-40}")" "$PYTHON" bench/profile_step.py --sdpa
    } >"$dir/gpu.txt" 2>&1
    log "header: exit $?"
fi

if wants eager; then
    timeout "$(limit "${PART_SECONDS_EAGER:-150}")" "$PYTHON" bench/bench_model.py "${sizes[@]}" \
        --steps 6 --warmup 2 --estimate_refcoco --profile_batch 32 --profile_variants "$stack" \
        --variants "$stack" bf16+fused_adamw+cached_latents "$stack+sdpa_maps" \
        >"$dir/eager.md" 2>"$dir/eager.log"
    log "eager: exit $?"
fi

if wants train; then
    scratch=$(mktemp -d)  # data, latents, ~20 GB of checkpoints: removed after
    timeout "$(limit "${PART_SECONDS_TRAIN:-150}")" "$PYTHON" bench/train_run.py "$scratch" \
        --train_images "${TRAIN_IMAGES:-1400}" --image_size 512 \
        --compare "$dir/eager.md" --compare_row "$stack | 32" -- \
        --model vpd --random_weights --img_size 512 --token_length 40 --batch-size 32 --lr 5e-5 \
        --precision bf16 --eval_precision bf16 --channels_last --no-attn_grad --dice_weight 0 \
        --workers 6 --eval_batch_size 16 --print-freq 10 >"$dir/train.md" 2>&1
    log "train: exit $?"
    rm -rf "$scratch"
fi

if wants compile; then
    TORCH_LOGS=graph_breaks,recompiles timeout "$(limit "${PART_SECONDS_COMPILE:-400}")" \
        "$PYTHON" bench/bench_model.py "${sizes[@]}" --steps 8 --warmup 3 --estimate_refcoco \
        --compile_mode "$COMPILE_MODE" --profile_batch 32 \
        --variants bf16+channels_last+compile+fused_adamw+cached_latents \
        >"$dir/compile.md" 2>"$dir/compile.log"
    log "compile ($COMPILE_MODE): exit $?"
fi

if wants variants; then
    timeout "$(limit "${PART_SECONDS_VARIANTS:-300}")" "$PYTHON" bench/bench_model.py \
        --model vpd --img_size 512 --batch-size 4 --token_length 40 --steps 10 --warmup 3 --variants \
        fp32 bf16 fp16 channels_last grad_checkpoint cached_latents fused_adamw \
        bf16+grad_checkpoint bf16+grad_checkpoint+fused_adamw "$stack" \
        >"$dir/variants.md" 2>"$dir/variants.log"
    log "variants: exit $?"
fi

if wants toy; then
    scratch=$(mktemp -d)  # the toy run's log folder, latents and checkpoints; its lines go to toy.log
    timeout "$(limit "${PART_SECONDS_TOY:-90}")" env PYTHON="$PYTHON" bash train.sh toy "$scratch/log" 1 \
        --epochs 2 --cache_latents "$scratch/latents" --output-dir "$scratch" >"$dir/toy.log" 2>&1
    log "toy: exit $?"
    rm -rf "$scratch"
fi

if wants predict; then
    for precision in bf16 fp32; do  # fp32: test.py's default
        timeout "$(limit "${PART_SECONDS_PREDICT:-60}")" "$PYTHON" bench/bench_predict.py --count 256 -- \
            --model vpd --random_weights --img_size 512 --token_length 40 --device cuda \
            --precision "$precision" >>"$dir/predict.md" 2>&1
        log "predict ($precision): exit $?"
    done
fi

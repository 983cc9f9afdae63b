#!/usr/bin/env bash
# Evaluate CHECKPOINT (a training checkpoint, ours or VPD's, or a model folder) on DATASET and print
# the results table. The model's settings come from the checkpoint.
#   bash test.sh DATASET CHECKPOINT [test.py flags...]
# e.g. bash test.sh refcoco ./checkpoints/model_best_refcoco.pth --split all
# NPROC=4 bash test.sh ... shards the refs over 4 processes (GPUs, or CPU processes); the
# numbers are the same whatever NPROC.
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: bash test.sh DATASET CHECKPOINT [test.py flags...]" >&2
    exit 2
fi
DATASET=$1; CHECKPOINT=$2; shift 2
HERE=$(cd "$(dirname "$0")" && pwd)
PYTHON=${PYTHON:-python}
NPROC=${NPROC:-1}
# Progress bars on the terminal: torchrun hands its processes pipes, not the terminal itself.
if [ -t 2 ]; then export RIS_PROGRESS=1; fi
if [ "$NPROC" -eq 1 ]; then
    exec "$PYTHON" "$HERE/test.py" --dataset "$DATASET" --checkpoint "$CHECKPOINT" "$@"
fi
MASTER_PORT=${MASTER_PORT:-$("$PYTHON" -c "import socket; s=socket.socket(); s.bind(('', 0)); print(s.getsockname()[1])")}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}
exec "$PYTHON" -m engine.launch --nproc_per_node "$NPROC" --master_port "$MASTER_PORT" \
    "$HERE/test.py" --dataset "$DATASET" --checkpoint "$CHECKPOINT" "$@"

#!/usr/bin/env bash
# Masks for a folder of images x expressions or a JSONL manifest (predict.py), on NPROC processes.
#   bash predict.sh CHECKPOINT [predict.py flags...]
# e.g. bash predict.sh ./checkpoints/model_best_toy.pth --images photos/ --text "the dog" --out out/
# NPROC=4 bash predict.sh ... deals the batches to 4 processes (GPUs, or CPU processes); the files
# are the same whatever NPROC.
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: bash predict.sh CHECKPOINT [predict.py flags...]" >&2
    exit 2
fi
CHECKPOINT=$1; shift
HERE=$(cd "$(dirname "$0")" && pwd)
PYTHON=${PYTHON:-python}
NPROC=${NPROC:-1}
# Progress bars on the terminal: torchrun hands its processes pipes, not the terminal itself.
if [ -t 2 ]; then export RIS_PROGRESS=1; fi
if [ "$NPROC" -eq 1 ]; then
    exec "$PYTHON" "$HERE/predict.py" --checkpoint "$CHECKPOINT" "$@"
fi
MASTER_PORT=${MASTER_PORT:-$("$PYTHON" -c "import socket; s=socket.socket(); s.bind(('', 0)); print(s.getsockname()[1])")}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}
exec "$PYTHON" -m engine.launch --nproc_per_node "$NPROC" --master_port "$MASTER_PORT" \
    "$HERE/predict.py" --checkpoint "$CHECKPOINT" "$@"

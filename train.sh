#!/usr/bin/env bash
# Train on DATASET with NPROC processes (GPUs; CPU processes when no GPU is present).
#   bash train.sh DATASET LOGDIR NPROC [train.py flags...]
# e.g. bash train.sh refcoco ./logs/refcoco 8
# The paper's recipe (4 images per process, lr 5e-5, wd 1e-2, 40 epochs, 512 px) is the flags'
# default (engine/args.py); any flag given here overrides it. train.py appends its log lines (not
# the progress bars, which stay on the terminal) to LOGDIR/log.txt.
# Several nodes: set NNODES, NODE_RANK, MASTER_ADDR and MASTER_PORT on every node (torchrun's
# usual meaning) and give every node the same --output-dir (a shared folder); on one node a free
# MASTER_PORT is picked when it is unset. MAX_RESTARTS=N restarts all processes up to N times after
# a failure (torchrun's elastic restart); each restart resumes from the last checkpoint.
set -euo pipefail
if [ $# -lt 3 ]; then
    echo "usage: bash train.sh DATASET LOGDIR NPROC [train.py flags...]" >&2
    exit 2
fi
DATASET=$1; LOGDIR=$2; NPROC=$3; shift 3
HERE=$(cd "$(dirname "$0")" && pwd)
PYTHON=${PYTHON:-python}
if [ -z "${MASTER_PORT:-}" ]; then
    MASTER_PORT=$("$PYTHON" -c "import socket; s=socket.socket(); s.bind(('', 0)); print(s.getsockname()[1])")
fi
# Progress bars on the terminal: torchrun hands its processes pipes, not the terminal itself.
if [ -t 2 ]; then export RIS_PROGRESS=1; fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}
exec "$PYTHON" -m engine.launch \
    --nproc_per_node "$NPROC" --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" \
    --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "$MASTER_PORT" \
    --max-restarts "${MAX_RESTARTS:-0}" \
    "$HERE/train.py" --dataset "$DATASET" --log_dir "$LOGDIR" "$@"

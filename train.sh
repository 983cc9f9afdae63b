#!/usr/bin/env bash
# Train on DATASET with NPROC processes (GPUs; CPU processes when no GPU is present).
#   bash train.sh DATASET LOGDIR NPROC [train.py flags...]
# e.g. bash train.sh refcoco ./logs/refcoco 8 --token_length 40
# The paper's recipe (4 images per process, lr 5e-5, wd 1e-2, 40 epochs, 512 px) is the flags'
# default (utils/args.py); any flag given here overrides it. The log is appended to LOGDIR/log.txt.
# Several nodes: set NNODES, NODE_RANK, MASTER_ADDR and MASTER_PORT on every node (torchrun's
# usual meaning); on one node a free MASTER_PORT is picked when it is unset.
set -euo pipefail
if [ $# -lt 3 ]; then
    echo "usage: bash train.sh DATASET LOGDIR NPROC [train.py flags...]" >&2
    exit 2
fi
DATASET=$1; LOGDIR=$2; NPROC=$3; shift 3
HERE=$(cd "$(dirname "$0")" && pwd)
PYTHON=${PYTHON:-python}
mkdir -p "$LOGDIR"
if [ -z "${MASTER_PORT:-}" ]; then
    MASTER_PORT=$("$PYTHON" -c "import socket; s=socket.socket(); s.bind(('', 0)); print(s.getsockname()[1])")
fi
# Progress bars go to the terminal (rank 0 only); the log file gets the per-epoch lines.
if [ -t 2 ]; then export RIS_PROGRESS=1; fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}
echo "$(date '+%F %T') train.sh $DATASET $LOGDIR $NPROC $*" >> "$LOGDIR/log.txt"
"$PYTHON" -m torch.distributed.run \
    --nproc_per_node "$NPROC" --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" \
    --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "$MASTER_PORT" \
    "$HERE/train.py" --dataset "$DATASET" "$@" 2>&1 | tee -a "$LOGDIR/log.txt"

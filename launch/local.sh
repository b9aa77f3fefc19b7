#!/usr/bin/env bash
# Simulate a multi-host run on one machine: N processes x D CPU devices over localhost.
#
#   launch/local.sh 2 4 configs/train/tiny_pretrain.yaml data.speech_paths=[...] ...
#
# Process 0 prints to the terminal; the others log to OUT/worker-<i>.log (OUT: train.out_dir
# or ./runs/local). The same run on 1 x 8 devices gives the same losses.
set -euo pipefail
[ $# -ge 3 ] || { echo "usage: $0 PROCESSES DEVICES CONFIG [KEY=VALUE ...]" >&2; exit 2; }
N=$1 D=$2; shift 2
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PORT=${PORT:-$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("",0)); print(s.getsockname()[1])')}
LOGS=${LOGS:-runs/local}; mkdir -p "$LOGS"
export JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=$D
export SFM_COORDINATOR=127.0.0.1:$PORT SFM_NUM_PROCESSES=$N
pids=()
for i in $(seq 1 $((N - 1))); do
  SFM_PROCESS_ID=$i .venv/bin/sfm train "$@" >"$LOGS/worker-$i.log" 2>&1 & pids+=($!)
done
SFM_PROCESS_ID=0 .venv/bin/sfm train "$@"
for p in "${pids[@]}"; do wait "$p"; done

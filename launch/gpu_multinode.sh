#!/usr/bin/env bash
# Multi-node GPU training: run this on every node (e.g. `srun launch/gpu_multinode.sh ...`
# under Slurm, or by hand with NODE_RANK/NNODES/COORDINATOR set). Each node is one JAX
# process owning its local GPUs; process 0's host is the coordinator.
#
#   srun --nodes=4 --ntasks-per-node=1 launch/gpu_multinode.sh \
#       configs/train/tiny_pretrain.yaml mesh.ici_fsdp=8 mesh.dcn_data=4 train.out_dir=/shared/r1
#
# Needs the cuda extra: `SFM_EXTRAS=cuda bash launch/setup.sh` on every node (shared FS ok).
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 CONFIG [KEY=VALUE ...]" >&2; exit 2; }
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -n "${SLURM_JOB_ID:-}" ]; then
  NNODES=${NNODES:-$SLURM_NNODES}
  NODE_RANK=${NODE_RANK:-$SLURM_PROCID}
  HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
  COORDINATOR=${COORDINATOR:-$HEAD:${PORT:-12355}}
fi
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${COORDINATOR:?set COORDINATOR=host:port}"
export SFM_COORDINATOR=$COORDINATOR SFM_NUM_PROCESSES=$NNODES SFM_PROCESS_ID=$NODE_RANK
exec .venv/bin/sfm train "$@"

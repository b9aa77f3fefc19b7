#!/usr/bin/env bash
# Submit `sfm train` as an xpk workload on a GKE TPU cluster (one pod per TPU host).
#
#   CLUSTER=my-cluster TPU_TYPE=v5p-128 IMAGE=gcr.io/me/sfm:latest \
#       launch/xpk.sh configs/train/tiny_pretrain.yaml train.out_dir=/mnt/shared/runs/r1
#
# IMAGE must contain this repository set up with `SFM_EXTRAS=tpu bash launch/setup.sh`
# (working directory = the repository). NUM_SLICES > 1 spreads the mesh over slices (DCN):
# set mesh.dcn_data (or dcn_fsdp) to the slice count in the overrides.
set -euo pipefail
: "${CLUSTER:?set CLUSTER}" "${TPU_TYPE:?set TPU_TYPE, e.g. v5p-128}" "${IMAGE:?set IMAGE}"
[ $# -ge 1 ] || { echo "usage: CLUSTER=... TPU_TYPE=... IMAGE=... $0 CONFIG [KEY=VALUE ...]" >&2; exit 2; }
WORKLOAD=${WORKLOAD:-sfm-$(date +%Y%m%d-%H%M%S)}
ARGS=$(printf ' %q' "$@")

xpk workload create \
  --cluster "$CLUSTER" \
  --workload "$WORKLOAD" \
  --tpu-type "$TPU_TYPE" \
  --num-slices "${NUM_SLICES:-1}" \
  --docker-image "$IMAGE" \
  --command ".venv/bin/sfm train$ARGS"

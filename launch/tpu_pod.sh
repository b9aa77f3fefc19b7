#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice: the same command on every worker (jax.distributed finds
# the pod from the TPU environment; no coordinator variables needed).
#
#   TPU=my-v5p-128 ZONE=us-east5-a launch/tpu_pod.sh configs/train/tiny_pretrain.yaml \
#       data.speech_paths=[/mnt/shared/shards/speech-*] train.out_dir=/mnt/shared/runs/r1
#
# REPO (default: this repository's origin URL) is cloned on each worker if absent and checked
# out at REF (default: this checkout's commit), SETUP runs there (default: launch/setup.sh with
# the tpu extra; where the clone already has its .venv, e.g. a prepared image, SETUP=true),
# then `sfm train` runs with the given config and overrides. Checkpoints and shards must be on
# storage every worker mounts (gcsfuse, Filestore). After a preemption, run the same command again:
# every worker restores the newest complete checkpoint in train.out_dir and goes on.
set -euo pipefail
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE}"
[ $# -ge 1 ] || { echo "usage: TPU=... ZONE=... $0 CONFIG [KEY=VALUE ...]" >&2; exit 2; }
REPO=${REPO:-$(git -C "$(dirname "$0")/.." remote get-url origin)}
REF=${REF:-$(git -C "$(dirname "$0")/.." rev-parse HEAD)}
SETUP=${SETUP:-SFM_EXTRAS=tpu bash launch/setup.sh}
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}
ARGS=$(printf ' %q' "$@")

read -r -d '' REMOTE <<EOS || true
set -euo pipefail
[ -d sfm ] || git clone -q $REPO sfm
cd sfm && git fetch -q origin && git checkout -q $REF
$SETUP
exec .venv/bin/sfm train$ARGS
EOS

gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" $PROJECT_FLAG --worker=all \
  --command="$REMOTE"

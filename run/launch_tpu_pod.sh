#!/usr/bin/env bash
# Run one `mixsd` command on every host of a Cloud TPU VM slice, one process per host.
#
#   run/launch_tpu_pod.sh TPU_NAME ZONE COMMAND [ARGS ...]
#   e.g. run/launch_tpu_pod.sh my-v5p-64 us-east5-a train --config configs/train.yaml \
#          --data gs-mounted/train_messages.jsonl --out /mnt/shared/runs/sft mesh.fsdp=-1 mesh.data=1
#        run/launch_tpu_pod.sh my-v5p-64 us-east5-a generate --config configs/generate.yaml
#        run/launch_tpu_pod.sh my-v5p-64 us-east5-a pipeline --config configs/experiment.yaml
#
# Every host needs this repository at the same path ($MIXSD_REPO, default: this checkout's path)
# with the package installed, the model directory, and the output directory on storage all hosts
# share (Orbax writes one checkpoint from all hosts; process 0 writes every other file: metrics,
# exports, generated targets, eval items and reports, stage records; see README "Running on a pod").
# JAX finds the slice's hosts itself: MIXSD_DISTRIBUTED=auto -> jax.distributed.initialize().
# Extra environment for the hosts: MIXSD_ENV="VAR=value VAR2=value".
set -euo pipefail
if [ "$#" -lt 3 ]; then
  sed -n '2,13p' "$0"
  exit 2
fi
TPU_NAME=$1; ZONE=$2; shift 2
REPO=${MIXSD_REPO:-$(cd "$(dirname "$0")/.." && pwd)}
ARGS=$(printf ' %q' "$@")
REMOTE="cd $(printf %q "$REPO") && env MIXSD_DISTRIBUTED=auto MIXSD_MODELS_DIR=${MIXSD_MODELS_DIR:-} \
${MIXSD_ENV:-} mixsd$ARGS"
exec gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$REMOTE"

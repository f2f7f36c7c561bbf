#!/usr/bin/env bash
# Run `mixsd pipeline` on every host of a Cloud TPU VM slice (one process per host).
#
#   run/pipeline_tpu_pod.sh TPU_NAME ZONE CONFIG [key=value ...]
#   e.g. run/pipeline_tpu_pod.sh my-v5p-64 us-east5-a configs/paper/kgfact_small_qwen3_8b.yaml
#
# Every host needs the repository at the same path ($MIXSD_REPO, default: this checkout's path),
# the installed package, the model at $MIXSD_MODELS_DIR/<name>, and an experiment folder (out_dir)
# on storage that all hosts share, so stage records, checkpoints and reports are seen by all.
# JAX finds the slice's other hosts itself (MIXSD_DISTRIBUTED=auto -> jax.distributed.initialize()).
set -euo pipefail
if [ "$#" -lt 3 ]; then
  sed -n '2,11p' "$0"
  exit 2
fi
TPU_NAME=$1; ZONE=$2; CONFIG=$3; shift 3
REPO=${MIXSD_REPO:-$(cd "$(dirname "$0")/.." && pwd)}
OVERRIDES=$(printf ' %q' "$@")
REMOTE="cd $(printf %q "$REPO") && MIXSD_DISTRIBUTED=auto MIXSD_MODELS_DIR=${MIXSD_MODELS_DIR:-} \
mixsd pipeline --config $(printf %q "$CONFIG")$OVERRIDES"
exec gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$REMOTE"

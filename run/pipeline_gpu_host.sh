#!/usr/bin/env bash
# Run `mixsd pipeline` on one GPU host (all its GPUs form the mesh of the config).
#
#   run/pipeline_gpu_host.sh CONFIG [key=value ...]
#   e.g. run/pipeline_gpu_host.sh configs/paper/kgfunc_qwen3_4b.yaml mesh.fsdp=-1
#
# The model comes from $MIXSD_MODELS_DIR/<name> (or model=/path/to/hf-dir); a killed run resumes
# where it stopped when started again with the same command.
set -euo pipefail
if [ "$#" -lt 1 ]; then
  sed -n '2,8p' "$0"
  exit 2
fi
cd "$(dirname "$0")/.."
# Let XLA take most of each GPU's memory up front instead of growing (fewer fragmentation stalls).
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
exec mixsd pipeline --config "$@"

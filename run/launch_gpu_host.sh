#!/usr/bin/env bash
# Run one `mixsd` command on a GPU host: all of its GPUs form the mesh. For a multi-host GPU
# cluster, start it once on every host with the same coordinator (host 0's address and a free port):
#
#   run/launch_gpu_host.sh COMMAND [ARGS ...]                      # one host
#   MIXSD_COORDINATOR=10.0.0.1:12355 MIXSD_NUM_PROCESSES=4 MIXSD_PROCESS_ID=$HOST_INDEX \
#     run/launch_gpu_host.sh train --config configs/train.yaml     # host HOST_INDEX of 4
#   e.g. run/launch_gpu_host.sh train --data data/train_messages.jsonl --model /models/qwen3-1.7b \
#          --out runs/sft mesh.fsdp=-1 mesh.data=1 compute_dtype=bfloat16
#
# Under SLURM (srun, one task per host) JAX reads the cluster from SLURM's variables instead.
# The output directory must be on storage every host sees. A killed run resumes when started again.
set -euo pipefail
if [ "$#" -lt 1 ]; then
  sed -n '2,12p' "$0"
  exit 2
fi
cd "$(dirname "$0")/.."
if [ -n "${SLURM_PROCID:-}" ] && [ -z "${MIXSD_COORDINATOR:-}" ]; then
  export MIXSD_DISTRIBUTED=auto
fi
# Let XLA take most of each GPU's memory up front instead of growing it (fewer fragmentation stalls).
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
exec mixsd "$@"

#!/bin/bash
# One training run on N nodes under torchrun: run this on every node with the same MASTER address.
#   NNODES=2 MASTER=node0:29500 bash configs/launch/torchrun.sh configs/compression/wrn28_10.yaml
# --nnodes and --nproc_per_node must equal trainer.num_nodes and trainer.devices (configs/presets/multinode.yaml).
set -euo pipefail
config="$1"
shift
torchrun --nnodes "${NNODES:-2}" --nproc_per_node "${GPUS:-4}" \
  --rdzv_backend c10d --rdzv_endpoint "${MASTER:?set MASTER=host:port of node 0}" \
  train.py fit --config "$config" --config configs/presets/multinode.yaml \
  --trainer.num_nodes "${NNODES:-2}" --trainer.devices "${GPUS:-4}" "$@"

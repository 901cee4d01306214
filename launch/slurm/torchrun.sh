#!/bin/bash
# The same training without `accelerate launch`: torchrun starts the processes and sets WORLD_SIZE,
# RANK and LOCAL_RANK; Accelerate inside peftkit reads them (plain DDP; for DeepSpeed or FSDP use
# `accelerate launch` with a launch/accelerate config).
#   bash launch/slurm/torchrun.sh configs/lora_deberta.yaml                        # one node, all its GPUs
#   NNODES=2 NODE_RANK=0 MAIN_ADDR=10.0.0.1 bash launch/slurm/torchrun.sh CONFIG   # on node 0, then NODE_RANK=1 on node 1
# On a CPU-only machine: NPROC_PER_NODE=2 ACCELERATE_USE_CPU=1 bash launch/slurm/torchrun.sh CONFIG (gloo).

set -euo pipefail

CONFIG=${1:?usage: bash launch/slurm/torchrun.sh CONFIG.yaml [dotted.key=value ...]}
shift
NPROC_PER_NODE=${NPROC_PER_NODE:-$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MAIN_ADDR=${MAIN_ADDR:-127.0.0.1}
MAIN_PORT=${MAIN_PORT:-29500}

exec torchrun \
    --nnodes "$NNODES" \
    --node_rank "$NODE_RANK" \
    --nproc_per_node "$NPROC_PER_NODE" \
    --master_addr "$MAIN_ADDR" \
    --master_port "$MAIN_PORT" \
    peftkit/train.py --config "$CONFIG" "$@"

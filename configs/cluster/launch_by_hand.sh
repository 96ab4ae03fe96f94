#!/bin/bash
# Multi-node DDP without SLURM: start the same command once per node, each with its NODE_RANK.
# Lightning's `ddp` launcher then starts `--trainer.devices` processes on each node by itself.
#
#   node 0:  MASTER_ADDR=<node0 address> MASTER_PORT=29500 NODE_RANK=0 configs/cluster/launch_by_hand.sh
#   node 1:  MASTER_ADDR=<node0 address> MASTER_PORT=29500 NODE_RANK=1 configs/cluster/launch_by_hand.sh
#
# Rehearsal on one machine (2 "nodes" x 1 CPU process on loopback, the tiny HTC; what
# tests/test_ddp_preemption.py runs):
#   export MASTER_ADDR=127.0.0.1 MASTER_PORT=29531 OMP_NUM_THREADS=1
#   NODE_RANK=1 python cli.py fit --config configs/tiny/htc_tiny_synthetic.yaml --trainer.strategy ddp \
#       --trainer.num_nodes 2 --trainer.devices 1 &
#   NODE_RANK=0 python cli.py fit --config configs/tiny/htc_tiny_synthetic.yaml --trainer.strategy ddp \
#       --trainer.num_nodes 2 --trainer.devices 1
# It trains to the same weights, bit for bit, as 1 node x 2 devices
# (`--trainer.strategy ddp --trainer.devices 2`) as long as OMP_NUM_THREADS is the same: left unset,
# Lightning gives each process cpu_count // (processes on its node) intra-op threads, and a different
# thread count changes the summation order inside the convolutions (7.6e-5 max weight difference after
# 9 steps on a 2-core machine). Two ranks' all-reduce (a + b) is the same sum in any order.
#
# Preemption: SIGTERM to any process -> every rank stops after the same step, checkpoints/last.ckpt, exit 143;
# start the same commands again with --ckpt_path last to continue exactly.
set -euo pipefail
: "${MASTER_ADDR:?set MASTER_ADDR to node 0's address}" "${NODE_RANK:?set NODE_RANK (0 .. num_nodes-1)}"
export MASTER_PORT="${MASTER_PORT:-29500}"
cd "$(dirname "$0")/../.."
exec .venv/bin/python cli.py fit --config configs/cluster/htc_r50_fpn_1x_coco_ddp.yaml \
    --trainer.plugins null --trainer.num_nodes 2 --trainer.devices 8 --ckpt_path last "$@"

#!/bin/bash
# Multi-node pre-training on SLURM with torchrun (one torchrun per node, 8 GPUs each).
#   sbatch examples/slurm_pretrain.sh
# Effective batch = train.batch_size x train.accum_steps x (nodes x GPUs); the preset's 128 x 4 x 8 = 4096
# assumes 8 GPUs: with 4 nodes x 8 GPUs set train.accum_steps=1 to keep 4096 (lr follows the batch).
#SBATCH --job-name=mimkit-rcmae
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=80
#SBATCH --time=72:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail

RUN=${RUN:-runs/in1k-vit-base-rc-mae}
DATA=${DATA:-/datasets/imagenet}          # root with train/<class>/*.JPEG and val/<class>/*.JPEG
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)

RESUME=""
[ -f "$RUN/checkpoints/last.pt" ] && RESUME="--resume"   # a requeued job continues where it stopped

srun torchrun \
  --nnodes="$SLURM_NNODES" --nproc_per_node=8 \
  --rdzv-id="$SLURM_JOB_ID" --rdzv-backend=c10d --rdzv-endpoint="$head_node:29500" \
  -m mimkit pretrain --config in1k-vit-base-rc-mae \
    --set data.path="$DATA" --set train.accum_steps=1 --set data.num_workers=9 \
    --output "$RUN" $RESUME --no-progress

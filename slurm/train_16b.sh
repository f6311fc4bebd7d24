#!/bin/bash
# DiT-MoE-G/2-16E2A (16.5B) on ImageNet-256 latents: 4 nodes x 8 GPUs, experts split 8 ways, ZeRO-2 bf16.
#   sbatch slurm/train_16b.sh                 (DATA, OUT, NODES... may be overridden in the environment)
# Two minutes before the time limit SLURM sends SIGUSR1 to this script, which passes it to the trainer; the
# trainer saves, exits 75, and the job requeues itself and resumes from that checkpoint.
#SBATCH --job-name=ditmoe-g2-16e2a
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=48:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

DATA=${DATA:-data/imagenet256-latents}
OUT=${OUT:-runs/g2-16e2a}
BATCH=${BATCH:-1024}   # global; 32 per GPU on 32 GPUs
ACCUM=${ACCUM:-1}

export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=${MASTER_PORT:-$((29500 + SLURM_JOB_ID % 1000))}
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}

srun --kill-on-bad-exit=1 python -m ditmoe.train \
    --preset imagenet256-XL-8E2A --model DiT-MoE-G/2-16E2A --data "$DATA" --out "$OUT" \
    --batch-size "$BATCH" --grad-accum "$ACCUM" --ep-size 8 --precision bf16 \
    --deepspeed-config ds_configs/g2_16e2a.json --resume &
TRAINER=$!
# The batch script gets the signal (B:); forward it to every task, then wait for the trainer to save.
trap 'echo "SIGUSR1: asking the trainer to save"; scancel --signal=USR1 "$SLURM_JOB_ID"' USR1
set +e
wait "$TRAINER"; rc=$?
while [ "$rc" -gt 128 ] && kill -0 "$TRAINER" 2>/dev/null; do wait "$TRAINER"; rc=$?; done  # woken by the trap
set -e
if [ "$rc" -eq 75 ]; then
    echo "checkpoint saved on request; requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$rc"

#!/bin/bash
# DiT-MoE-G/2-16E2A (16.5B) on ImageNet-256 latents: 4 nodes x 8 GPUs, experts split 8 ways, ZeRO-2 bf16.
#   sbatch slurm/train_16b.sh            (from the repository root; the variables below may be set in the environment,
#                                         and sbatch options on its command line override the #SBATCH lines)
# Two minutes before the time limit SLURM sends SIGUSR1 to this script, which passes it to the trainer's tasks;
# they save, exit 75, and the script requeues the job, which resumes from that checkpoint.
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

PRESET=${PRESET:-imagenet256-XL-8E2A}
MODEL=${MODEL:-DiT-MoE-G/2-16E2A}
DATA=${DATA:-data/imagenet256-latents}
OUT=${OUT:-runs/g2-16e2a}
BATCH=${BATCH:-1024}   # global; 32 per GPU on 32 GPUs
ACCUM=${ACCUM:-1}
EP=${EP:-8}
PRECISION=${PRECISION:-bf16}
DS_CONFIG=${DS_CONFIG:-ds_configs/g2_16e2a.json}
PYTHON=${PYTHON:-python}
EXTRA=${EXTRA:-}       # more trainer flags, e.g. "--steps 700000 --wandb"

# assigned apart from export, so that set -e sees a failure; sed reads every line (head would risk SIGPIPE, pipefail)
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)
export MASTER_ADDR
# Rank 0's port: free now on this node (the job's first), searched from one derived from the job id, and below the
# kernel's ephemeral range, whose ports go to any socket that asks (srun's own): one probed free there can be taken
# before rank 0 listens on it.
pick_port='
import socket, sys
low = 20000
try:
    top = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
except (OSError, ValueError, IndexError):
    top = 32768
top = max(top, low + 1000)
for i in range(top - low):
    port = low + (int(sys.argv[1]) + i) % (top - low)
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            continue
    print(port)
    break
else:
    sys.exit(f"no free port in [{low}, {top}) on this node: set MASTER_PORT")
'
MASTER_PORT=${MASTER_PORT:-$("$PYTHON" -c "$pick_port" "$SLURM_JOB_ID")}
export MASTER_PORT
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}
echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST: $MODEL, EP=$EP, batch $BATCH"

# The trainer leaves REQUEUE after saving on request; one from before (a killed job script, another launcher) would
# requeue this job whatever its trainer does.
rm -f "$OUT/REQUEUE"
# shellcheck disable=SC2086
srun --kill-on-bad-exit=1 "$PYTHON" -m ditmoe.train \
    --preset "$PRESET" --model "$MODEL" --data "$DATA" --out "$OUT" --batch-size "$BATCH" --grad-accum "$ACCUM" \
    --ep-size "$EP" --precision "$PRECISION" --deepspeed-config "$DS_CONFIG" --resume $EXTRA &
TRAINER=$!
# SLURM signals this batch shell (B:); pass the request on to every task of the job, then wait for them to save.
trap 'echo "SIGUSR1: asking the trainer to save"; scancel --signal=USR1 "$SLURM_JOB_ID"' USR1
set +e
wait "$TRAINER"
rc=$?
while [ "$rc" -gt 128 ] && kill -0 "$TRAINER" 2>/dev/null; do  # wait returned early because the trap ran
    wait "$TRAINER"
    rc=$?
done
set -e
# 75: saved on request. srun --kill-on-bad-exit may kill the other tasks as the first exits with 75, and then
# reports their SIGTERM instead, so the trainer's REQUEUE file in the run directory counts as well.
if [ "$rc" -eq 75 ] || [ -f "$OUT/REQUEUE" ]; then
    echo "checkpoint saved on request (step $(cat "$OUT/REQUEUE" 2>/dev/null)); requeueing job $SLURM_JOB_ID"
    rm -f "$OUT/REQUEUE"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
exit "$rc"

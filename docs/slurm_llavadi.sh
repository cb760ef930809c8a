#!/bin/bash
# One Slurm job for the whole llavadi pipeline on N GPU nodes (README "Scaling up"):
#   the teacher stages (ingest, regenerate, cache-teacher) on a Ray cluster spanning the job's nodes,
#   one teacher engine per GPU; then train-student under torchrun on every node (FSDP).
# Submit:  RUN=/shared/runs/13b-2.7b sbatch docs/slurm_llavadi.sh
# Needs: llavadi installed on every node (same venv path), RUN on a filesystem every node mounts
# (NFS, Lustre, GPFS: shards are committed by atomic rename), the models and data there too.
# Every stage resumes: resubmitting the job after a pre-emption or a time-out continues where it
# stopped (done shards are skipped; train-student resumes from its newest checkpoint).
#SBATCH --job-name=llavadi
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail

RUN=${RUN:-/shared/runs/13b-2.7b}
PRESET=${PRESET:-configs/llava13b_to_mobilellama2.7b.yaml}  # teacher, student, data paths
DATA=${DATA:-/data/llava}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
RAY_PORT=6379
TORCH_PORT=29500

mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
HEAD=${NODES[0]}
HEAD_IP=$(srun --overlap --nodes=1 --ntasks=1 -w "$HEAD" hostname --ip-address | awk '{print $1}')
# job steps below share the nodes (--overlap): the Ray daemons run as steps while the batch script drives
GPUS=$(( SLURM_JOB_NUM_NODES * GPUS_PER_NODE ))

# ---------------------------------------------------------------- Ray cluster (teacher stages)
srun --overlap --nodes=1 --ntasks=1 --gpus-per-node="$GPUS_PER_NODE" -w "$HEAD" \
  ray start --head --node-ip-address="$HEAD_IP" --port=$RAY_PORT --num-gpus="$GPUS_PER_NODE" --block &
sleep 30
for node in "${NODES[@]:1}"; do
  srun --overlap --nodes=1 --ntasks=1 --gpus-per-node="$GPUS_PER_NODE" -w "$node" \
    ray start --address="$HEAD_IP:$RAY_PORT" --num-gpus="$GPUS_PER_NODE" --block &
done
sleep 30
RAY=(--ray-address "$HEAD_IP:$RAY_PORT")
# one teacher engine (Ray actor) per GPU: a 13B teacher in bf16 (26 GB) fits one 80 GB GPU
ENGINES=(teacher.num_actors=$GPUS teacher.gpus_per_actor=1 teacher.tensor_parallel_size=1)

llavadi ingest "$RUN" -c "$PRESET" --input "$DATA/llava_v1_5_mix665k.json" --image-root "$DATA" "${RAY[@]}"
llavadi regenerate "$RUN" "${RAY[@]}" "${ENGINES[@]}"
llavadi cache-teacher "$RUN" --dry-run          # expected cache size vs the free space (no work)
llavadi cache-teacher "$RUN" "${RAY[@]}" "${ENGINES[@]}"   # refused before work if the cache cannot fit
llavadi status "$RUN"

# stop Ray on every node before the trainer takes the GPUs
srun --overlap --nodes="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 ray stop --force || true
kill $(jobs -p) 2>/dev/null || true  # the `ray start --block` steps
wait 2>/dev/null || true

# ---------------------------------------------------------------- trainer (torchrun on every node)
# train_student.batch_size is the global batch: a multiple of micro_batch_size × the GPUs (here 16).
srun --overlap --nodes="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 --gpus-per-node="$GPUS_PER_NODE" \
  torchrun --nnodes="$SLURM_JOB_NUM_NODES" --nproc-per-node="$GPUS_PER_NODE" \
    --rdzv-backend=c10d --rdzv-endpoint="$HEAD_IP:$TORCH_PORT" --rdzv-id="$SLURM_JOB_ID" \
    -m llavadi.cli train-student "$RUN" train_student.parallel=fsdp train_student.batch_size=128 \
    train_student.micro_batch_size=4
llavadi status "$RUN"

#!/usr/bin/env bash
# LoRA fine-tuning on several nodes: one `accelerate launch` per node (srun, one task per node), FSDP2 across all
# GPUs. Node 0 (the first host of the allocation) hosts the rendezvous.
#
#   mkdir -p logs && sbatch slurm/train_multinode.sh                     # 2 nodes x 8 GPUs
#   sbatch --nodes=4 slurm/train_multinode.sh --learning_rate 5e-5      # extra arguments go to train_cosmos_lora.py
#   GPUS_PER_NODE=4 sbatch --nodes=2 --gres=gpu:4 slurm/train_multinode.sh
#   DRY_RUN=1 sbatch slurm/train_multinode.sh      # prints the srun command and each node's command; runs nothing
#
# Keep one task per node: the number of machines is the number of tasks (SLURM_NTASKS), and each task's rank is its
# SLURM_PROCID. GPUS_PER_NODE must match --gres=gpu:N and the accelerate config.
#
# The #SBATCH lines below are defaults; sbatch options override them (`sbatch --account=ACCOUNT --partition=gpu
# --time=12:00:00 --nodes=4 slurm/train_multinode.sh`), and so do SBATCH_ACCOUNT, SBATCH_PARTITION and
# SBATCH_TIMELIMIT in the environment. Logs go to logs/JOBNAME_JOBID.out (mkdir -p logs first).
#
# Time limit and preemption work as in slurm/train.sh: SIGUSR1 300 s before the limit reaches this shell, which
# forwards it to srun, which passes it to every node; the training saves OUTPUT_DIR/checkpoint-STEP and exits 75 on
# every rank, and this script requeues the job, which resumes from the latest checkpoint.
#
#SBATCH --job-name=cosmos_lora_multinode
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x_%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
## Site-specific; uncomment or pass to sbatch:
##SBATCH --account=YOUR_ACCOUNT
##SBATCH --partition=YOUR_GPU_PARTITION
set -euo pipefail

# Repository checkout; SLURM runs a copy of this script, so it cannot find the repository by itself.
REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}
if [ ! -f "$REPO_DIR/slurm/common.sh" ]; then
  echo "REPO_DIR=$REPO_DIR is not this repository: submit from the repository root or set REPO_DIR" >&2
  exit 1
fi
# shellcheck source=slurm/common.sh
source "$REPO_DIR/slurm/common.sh"  # its site settings: ENV_ACTIVATE, COSMOS_ROOT, MODEL, REVISION

# ---- this job's settings (each can be set in the environment of `sbatch`) -----------------------------------------
# Latent cache written by slurm/cache_latents.sh. Several caches, space-separated, are mixed: each may be
# NAME=PATH:WEIGHT (e.g. "ego=/scratch/cache/ego:0.7 lab=/scratch/cache/lab:0.3"; see docs/training.md).
CACHE_DIR=${CACHE_DIR:-$COSMOS_ROOT/cache}
OUTPUT_DIR=${OUTPUT_DIR:-$COSMOS_ROOT/runs/lora_multinode}
# accelerate config, relative to REPO_DIR (its machine count, rank and address are given on the command line).
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-accelerate_configs/fsdp_multinode.yaml}
# Processes per node, normally the GPUs per node.
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
# Rendezvous port on the head node, derived from the job id so that jobs sharing a node do not collide.
MAIN_PORT=${MAIN_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
# Interconnect settings belong here too, e.g. export NCCL_SOCKET_IFNAME=ib0 (ask your site).
# ---------------------------------------------------------------------------------------------------------------

enter_repo
read -r -a cache_dirs <<< "$CACHE_DIR"
set_offline_env "$MODEL"  # the caches are local files anyway
set_wandb_env
log_job

num_machines=${SLURM_NTASKS:-1}
if [ -n "${SLURM_JOB_NODELIST:-}" ]; then
  mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
else
  hosts=("$(hostname -s)")
fi
head_node=${hosts[0]}
log "$num_machines machines x $GPUS_PER_NODE processes, rendezvous at $head_node:$MAIN_PORT"

# --kill-on-bad-exit=0: after USR1 the nodes exit 75 one after the other; the first must not kill the others while
# rank 0 may still be writing the checkpoint.
srun_args=(--ntasks="$num_machines" --kill-on-bad-exit=0)
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then
  srun_args+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")  # srun 22.05 does not take it from the job
fi
# Runs on every node; $SLURM_PROCID is evaluated there. A node whose training stops after USR1 exits 75.
# shellcheck disable=SC2016
per_node='source slurm/common.sh && run_launcher accelerate launch --machine_rank "$SLURM_PROCID" "$@"'
launch_args=(--config_file "$ACCELERATE_CONFIG" --num_machines "$num_machines"
  --num_processes "$((num_machines * GPUS_PER_NODE))"
  --main_process_ip "$head_node" --main_process_port "$MAIN_PORT"
  train_cosmos_lora.py --pretrained_model_name_or_path "$MODEL" ${REVISION:+--revision "$REVISION"} --cache_dir "${cache_dirs[@]}"
  --output_dir "$OUTPUT_DIR" --resume_from_checkpoint latest "$@")
if [ "${DRY_RUN:-0}" = 1 ]; then
  # Dry: print the srun command, then what each task would run on its node (srun places tasks in blocks).
  echo "DRY_RUN srun: $(quote_cmd srun "${srun_args[@]}" bash -c "$per_node" per_node "${launch_args[@]}")"
  for ((rank = 0; rank < num_machines; rank++)); do
    node=$((rank * ${#hosts[@]} / num_machines))
    DRY_RUN_HOST=${hosts[$node]} SLURM_NODEID=$node SLURM_PROCID=$rank bash -c "$per_node" per_node "${launch_args[@]}"
  done
  exit 0
fi
rc=0
run_srun srun "${srun_args[@]}" bash -c "$per_node" per_node "${launch_args[@]}" || rc=$?
finish "$rc"

#!/usr/bin/env bash
# LoRA fine-tuning of Cosmos-Predict2-2B on one node (3 GPUs, FSDP2) from a latent cache.
#
#   mkdir -p logs && sbatch slurm/train.sh                        # from the repository root
#   sbatch slurm/train.sh --learning_rate 5e-5 --max_train_steps 4000   # extra arguments go to train_cosmos_lora.py
#   MODEL=/data/cosmos CACHE_DIR=/scratch/cache OUTPUT_DIR=/scratch/runs/r1 sbatch slurm/train.sh
#
# The #SBATCH lines below are defaults; sbatch options override them (`sbatch --account=ACCOUNT --partition=gpu
# --time=12:00:00 --gres=gpu:3 slurm/train.sh`), and so do SBATCH_ACCOUNT, SBATCH_PARTITION and SBATCH_TIMELIMIT in
# the environment. Logs go to logs/JOBNAME_JOBID.out under the submit directory, which must exist (mkdir -p logs).
#
# Time limit and preemption: 300 s before the time limit SLURM sends SIGUSR1 to this shell, which forwards it to the
# training processes. They finish the optimizer step, save OUTPUT_DIR/checkpoint-STEP and exit 75; this script then
# requeues the job (`scontrol requeue`), and the requeued job resumes from the latest checkpoint
# (--resume_from_checkpoint latest), appending to the same log. `scancel --batch --signal=USR1 JOBID` does the same
# by hand. Any other failure is the job's exit code.
#
#SBATCH --job-name=cosmos_lora
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gres=gpu:3
#SBATCH --cpus-per-task=24
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
# Run directory: checkpoint-STEP/ folders, losses.jsonl, and the exported LoRA at the end.
OUTPUT_DIR=${OUTPUT_DIR:-$COSMOS_ROOT/runs/lora}
# accelerate config, relative to REPO_DIR; its num_processes must match --gres=gpu:N.
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-accelerate_configs/fsdp3.yaml}
# ---------------------------------------------------------------------------------------------------------------

enter_repo
read -r -a cache_dirs <<< "$CACHE_DIR"
set_offline_env "$MODEL"  # the caches are local files anyway
set_wandb_env
log_job

rc=0
run_launcher accelerate launch --config_file "$ACCELERATE_CONFIG" train_cosmos_lora.py \
  --pretrained_model_name_or_path "$MODEL" ${REVISION:+--revision "$REVISION"} --cache_dir "${cache_dirs[@]}" --output_dir "$OUTPUT_DIR" \
  --resume_from_checkpoint latest "$@" || rc=$?
finish "$rc"

#!/usr/bin/env bash
# Sample videos with a trained LoRA, conditioned on clips from the latent cache, and tile them into video_grid.mp4.
#
#   mkdir -p logs
#   sbatch slurm/sample.sh /scratch/runs/lora                   # a training output dir (its exported LoRA)
#   sbatch slurm/sample.sh /scratch/runs/lora/checkpoint-2000   # or one checkpoint
#   CHECKPOINT=/scratch/runs/lora NUM_VIDEOS=16 sbatch slurm/sample.sh --num_inference_steps 35
#
# The checkpoint is the first argument or CHECKPOINT; further arguments go to sample.py. Videos and video_grid.mp4
# are written to SAMPLE_OUTPUT_DIR (default RUN/samples/checkpoint-STEP, or RUN/samples/final for a run dir).
# The Cosmos safety checker stays on unless you pass --disable_safety_checker (the NVIDIA Open Model License does
# not allow bypassing it in use); it needs the cosmos-guardrail package and its models in the Hugging Face cache,
# since compute nodes are usually offline.
#
# The #SBATCH lines below are defaults; sbatch options override them (`sbatch --account=ACCOUNT --partition=gpu
# --time=1:00:00 slurm/sample.sh RUN`), and so do SBATCH_ACCOUNT, SBATCH_PARTITION and SBATCH_TIMELIMIT in the
# environment. Logs go to logs/JOBNAME_JOBID.out (mkdir -p logs first).
#
#SBATCH --job-name=cosmos_sample
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --time=02:00:00
#SBATCH --output=logs/%x_%j.out
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
# Latent cache whose clips give the conditioning frames.
CACHE_DIR=${CACHE_DIR:-$COSMOS_ROOT/cache}
# Training output dir or one of its checkpoint-STEP dirs (the first argument wins).
CHECKPOINT=${CHECKPOINT:-$COSMOS_ROOT/runs/lora}
# Clips to generate, at most as many as the run held out (train_cosmos_lora.py --num_validation_clips, default 4).
NUM_VIDEOS=${NUM_VIDEOS:-4}
# ---------------------------------------------------------------------------------------------------------------

if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then
  CHECKPOINT=$1
  shift
fi
# Where the videos go: beside the checkpoints, not inside one (--checkpoints_total_limit deletes old checkpoints):
# RUN/samples/checkpoint-STEP for a checkpoint, RUN/samples/final for the run's exported weights.
checkpoint=${CHECKPOINT%/}
if [[ $(basename "$checkpoint") == checkpoint-* ]]; then
  default_output=$(dirname "$checkpoint")/samples/$(basename "$checkpoint")
else
  default_output=$checkpoint/samples/final
fi
SAMPLE_OUTPUT_DIR=${SAMPLE_OUTPUT_DIR:-$default_output}

enter_repo
set_offline_env "$MODEL" "$CACHE_DIR"
log_job

cmd=(python sample.py --pretrained_model_name_or_path "$MODEL" ${REVISION:+--revision "$REVISION"} --lora_path "$CHECKPOINT"
     --output_dir "$SAMPLE_OUTPUT_DIR" --from_cache "$CACHE_DIR" --num_videos "$NUM_VIDEOS" "$@")
if [ "${DRY_RUN:-0}" = 1 ]; then
  echo "DRY_RUN: $(quote_cmd "${cmd[@]}")"
  exit 0
fi
log "running: $(quote_cmd "${cmd[@]}")"
rc=0
"${cmd[@]}" || rc=$?
if [ "$rc" -eq 0 ]; then
  log "videos in $SAMPLE_OUTPUT_DIR (grid: $SAMPLE_OUTPUT_DIR/video_grid.mp4)"
fi
finish "$rc"

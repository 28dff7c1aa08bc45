#!/usr/bin/env bash
# Encode videos into the latent cache with an array job: task i of N caches the i-th of N disjoint shards.
#
#   mkdir -p logs
#   VIDEO_DIR=/data/ego/videos sbatch slurm/cache_latents.sh                  # local folder of .mp4/.mkv/...
#   TARS='/data/ego/factory*/**/*.tar' sbatch slurm/cache_latents.sh          # local WebDataset tars (quoted glob)
#   DATASET=builddotai/Egocentric-100K DATA_FILES='factory001/**/*.tar' sbatch slurm/cache_latents.sh  # hub (online)
#   sbatch --array=0-31%8 slurm/cache_latents.sh --max_clips_per_video 4      # 32 shards, 8 at a time, extra args
#
# Extra arguments go to cache_latents.py (see `python cache_latents.py --help`). The array must be a contiguous range
# (0-N, optionally with a step or a %limit), because shard i is (task id - first id) / step. Rerunning the same
# command resumes: finished clips are skipped. When every task is done, check the cache once:
#   python cache_latents.py --output_dir "$CACHE_DIR" --verify
# The hub dataset is gated: accept its terms, then give the token through the environment (HF_TOKEN, or
# `hf auth login` on a login node); it is never written to the log. Hub sources need compute nodes with internet.
#
# The #SBATCH lines below are defaults; sbatch options override them (`sbatch --account=ACCOUNT --partition=gpu
# --time=2:00:00 --array=0-15 slurm/cache_latents.sh`), and so do SBATCH_ACCOUNT, SBATCH_PARTITION and
# SBATCH_TIMELIMIT in the environment. Logs go to logs/JOBNAME_ARRAYJOBID_TASK.out (mkdir -p logs first).
#
#SBATCH --job-name=cache_latents
#SBATCH --array=0-7
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=6
#SBATCH --time=04:00:00
#SBATCH --output=logs/%x_%A_%a.out
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
# Cache directory to create or complete; all tasks write into it.
CACHE_DIR=${CACHE_DIR:-$COSMOS_ROOT/cache}
# The source: set exactly one of VIDEO_DIR, TARS (a glob, quoted) or DATASET (+ DATA_FILES, a glob in the dataset).
VIDEO_DIR=${VIDEO_DIR:-}
TARS=${TARS:-}
DATASET=${DATASET:-}
DATA_FILES=${DATA_FILES:-}
# Clip geometry (must match for every run into one cache) and loader settings.
NUM_FRAMES=${NUM_FRAMES:-61}
FPS=${FPS:-8}
HEIGHT=${HEIGHT:-256}
WIDTH=${WIDTH:-448}
BATCH_SIZE=${BATCH_SIZE:-4}
NUM_WORKERS=${NUM_WORKERS:-${SLURM_CPUS_PER_TASK:-8}}
# ---------------------------------------------------------------------------------------------------------------

enter_repo

local_paths=("$MODEL")
set_source_args
set_offline_env "${local_paths[@]}"
log_job

set_shard
# ${a[@]+"${a[@]}"}: an empty array under `set -u` on bash < 4.4
cmd=(python cache_latents.py --pretrained_model_name_or_path "$MODEL" ${REVISION:+--revision "$REVISION"} --output_dir "$CACHE_DIR"
     ${source_args[@]+"${source_args[@]}"}
     --num_frames "$NUM_FRAMES" --fps "$FPS" --height "$HEIGHT" --width "$WIDTH" --batch_size "$BATCH_SIZE"
     --num_workers "$NUM_WORKERS" --num_shards "$num_shards" --shard_index "$shard_index" "$@")
if [ "${DRY_RUN:-0}" = 1 ]; then
  echo "DRY_RUN: $(quote_cmd "${cmd[@]}")"
  exit 0
fi
log "shard $shard_index of $num_shards: $(quote_cmd "${cmd[@]}")"
rc=0
"${cmd[@]}" || rc=$?
finish "$rc"

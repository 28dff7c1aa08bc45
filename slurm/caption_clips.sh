#!/usr/bin/env bash
# Caption every clip with a vision-language model, as an array job: task i of N captions the i-th of N disjoint
# shards of the videos. Give it the source and clip plan that slurm/cache_latents.sh will get, then pass the captions
# folder to the caching job: `sbatch slurm/cache_latents.sh --captions_file "$CAPTIONS_DIR"`.
#
#   mkdir -p logs
#   VIDEO_DIR=/data/ego/videos sbatch slurm/caption_clips.sh                  # local folder of .mp4/.mkv/...
#   TARS='/data/ego/factory*/**/*.tar' sbatch slurm/caption_clips.sh          # local WebDataset tars (quoted glob)
#   DATASET=builddotai/Egocentric-100K DATA_FILES='factory001/**/*.tar' sbatch slurm/caption_clips.sh  # hub (online)
#   sbatch --array=0-31%8 slurm/caption_clips.sh --max_clips_per_video 4      # 32 shards, 8 at a time, extra args
#
# Extra arguments go to caption_clips.py (see `python caption_clips.py --help`). The array must be a contiguous range
# (0-N, optionally with a step or a %limit), because shard i is (task id - first id) / step. Rerunning the same
# command resumes: clips already captioned are skipped. CAPTION_MODEL is a hub id or a local folder of a Qwen2.5-VL
# model (default nvidia/Cosmos-Reason1-7B); download it on a login node for offline compute nodes. The hub dataset is
# gated: accept its terms, then give the token through the environment (HF_TOKEN, or `hf auth login` on a login
# node); it is never written to the log. Hub sources need compute nodes with internet.
#
# The #SBATCH lines below are defaults; sbatch options override them, and so do SBATCH_ACCOUNT, SBATCH_PARTITION and
# SBATCH_TIMELIMIT in the environment. Logs go to logs/JOBNAME_ARRAYJOBID_TASK.out (mkdir -p logs first).
#
#SBATCH --job-name=caption_clips
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
source "$REPO_DIR/slurm/common.sh"  # its site settings: ENV_ACTIVATE, COSMOS_ROOT

# ---- this job's settings (each can be set in the environment of `sbatch`) -----------------------------------------
# Captions folder to create or complete; all tasks write into it.
CAPTIONS_DIR=${CAPTIONS_DIR:-$COSMOS_ROOT/captions}
# The captioner: a hub id or local folder of a Qwen2.5-VL model, and its hub revision.
CAPTION_MODEL=${CAPTION_MODEL:-nvidia/Cosmos-Reason1-7B}
CAPTION_REVISION=${CAPTION_REVISION:-}
# The source: set exactly one of VIDEO_DIR, TARS (a glob, quoted) or DATASET (+ DATA_FILES, a glob in the dataset).
VIDEO_DIR=${VIDEO_DIR:-}
TARS=${TARS:-}
DATASET=${DATASET:-}
DATA_FILES=${DATA_FILES:-}
# Clip geometry: the values slurm/cache_latents.sh gets (the cache refuses captions of another plan); loader settings.
NUM_FRAMES=${NUM_FRAMES:-61}
FPS=${FPS:-8}
HEIGHT=${HEIGHT:-256}
WIDTH=${WIDTH:-448}
BATCH_SIZE=${BATCH_SIZE:-128}
NUM_WORKERS=${NUM_WORKERS:-${SLURM_CPUS_PER_TASK:-4}}
# ---------------------------------------------------------------------------------------------------------------

enter_repo

local_paths=("$CAPTION_MODEL")
set_source_args
set_offline_env "${local_paths[@]}"
log_job

set_shard
# ${a[@]+"${a[@]}"}: an empty array under `set -u` on bash < 4.4
cmd=(python caption_clips.py --caption_model "$CAPTION_MODEL" ${CAPTION_REVISION:+--revision "$CAPTION_REVISION"}
     --output_dir "$CAPTIONS_DIR"
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

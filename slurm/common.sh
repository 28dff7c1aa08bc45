# shellcheck shell=bash
# Helpers shared by the slurm/*.sh job scripts, which source this file from REPO_DIR. Not a job script itself.

# ---- site settings every job script shares (each can be set in the environment of `sbatch`) ------------------
# REPO_DIR, the repository checkout, is set by the job script before it sources this file.
# Command that activates the Python environment, run in REPO_DIR ("" keeps the environment sbatch exported); srun
# passes the activated environment on to every node of a multi-node job.
ENV_ACTIVATE=${ENV_ACTIVATE-source .venv/bin/activate}
# Shared base directory for models, caches and runs; for several nodes, on a file system every node sees.
COSMOS_ROOT=${COSMOS_ROOT:-${SCRATCH:-$HOME}/cosmos}
# The base model: a local diffusers checkpoint (download it on a login node: hf download
# nvidia/Cosmos-Predict2-2B-Video2World --local-dir "$COSMOS_ROOT/models/Cosmos-Predict2-2B-Video2World"), or a hub
# id when compute nodes are online. Caching reads only its vae/, text_encoder/ and tokenizer/; sampling needs the model
# the LoRA was trained on.
# shellcheck disable=SC2034  # MODEL and REVISION are read by the job scripts that source this file
MODEL=${MODEL:-$COSMOS_ROOT/models/Cosmos-Predict2-2B-Video2World}
# Hub revision of MODEL when it is a hub id, e.g. diffusers/base/post-trained for nvidia/Cosmos-Predict2.5-2B
# (the family, Predict2 or Predict2.5, is read from the checkpoint itself).
# shellcheck disable=SC2034
REVISION=${REVISION:-}
# torch.compile's on-disk cache (compiled graphs, Triton kernels), shared by every job instead of each node's /tmp: a
# job whose shapes an earlier job compiled loads them (cache_latents.py's start-up on an H100: 45 s with an empty
# cache, 33 s with a filled one; benchmarks/RESULTS.md run 30).
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$COSMOS_ROOT/torchinductor}
# ---------------------------------------------------------------------------------------------------------------

log() { printf '[%s] %s\n' "$(date '+%F %T')" "$*"; }

# A command as it would be typed, for the job log (and for DRY_RUN=1).
quote_cmd() { printf '%q ' "$@"; }

# Go to the repository and activate its Python environment (ENV_ACTIVATE="" keeps the submitting shell's one, which
# sbatch exports to the job).
enter_repo() {
  cd "$REPO_DIR" || exit 1
  if [ -n "${ENV_ACTIVATE:-}" ]; then
    set +u  # conda's and some venvs' activate scripts read unset variables
    eval "$ENV_ACTIVATE"
    set -u
  fi
}

# Compute nodes are usually offline: when every argument is an existing local path (model, data), tell the Hugging
# Face libraries not to try the network. Without a W&B key, W&B logs offline (`wandb sync` it later).
set_offline_env() {
  local path
  for path in "$@"; do
    [ -e "$path" ] || return 0
  done
  export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-1}"
}

# The one video source of an array job (VIDEO_DIR, TARS or DATASET with DATA_FILES) as the flags of cache_latents.py
# and caption_clips.py, in the array `source_args`; the local paths among them are appended to the array
# `local_paths` (for set_offline_env). Exits 2 unless exactly one source is set.
set_source_args() {
  local value num_sources=0
  for value in "$VIDEO_DIR" "$TARS" "$DATASET"; do
    [ -n "$value" ] && num_sources=$((num_sources + 1))
  done
  if [ "$num_sources" -ne 1 ]; then
    echo "error: set exactly one source, VIDEO_DIR, TARS or DATASET ($num_sources set)" >&2
    exit 2
  fi
  source_args=()
  if [ -n "$VIDEO_DIR" ]; then
    source_args+=(--video_dir "$VIDEO_DIR")
    local_paths+=("$VIDEO_DIR")
  fi
  if [ -n "$TARS" ]; then
    source_args+=(--tars "$TARS")  # the script expands the glob itself
  fi
  if [ -n "$DATASET" ]; then
    source_args+=(--dataset "$DATASET")
    local_paths+=("$DATASET")  # a hub id is not a local path: then the hub stays reachable
    if [ -n "$DATA_FILES" ]; then
      source_args+=(--data_files "$DATA_FILES")
    fi
  fi
}

# This array task's shard of the videos: `num_shards` and `shard_index` from SLURM's array variables.
# shellcheck disable=SC2034  # both are read by the script that sources this file
set_shard() {
  num_shards=${SLURM_ARRAY_TASK_COUNT:-1}
  shard_index=$(( (${SLURM_ARRAY_TASK_ID:-0} - ${SLURM_ARRAY_TASK_MIN:-0}) / ${SLURM_ARRAY_TASK_STEP:-1} ))
}

set_wandb_env() {
  if [ -z "${WANDB_API_KEY:-}" ]; then
    export WANDB_MODE="${WANDB_MODE:-offline}"
  fi
}

# One line about the job; tokens are reported as set or unset, never printed.
log_job() {
  log "job ${SLURM_JOB_ID:-none} (${SLURM_JOB_NAME:-$(basename "$0")}) restart ${SLURM_RESTART_COUNT:-0}" \
      "on $(hostname -s), repo $PWD, python $(command -v python || echo none)"
  log "HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-} HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-} WANDB_MODE=${WANDB_MODE:-}" \
      "HF_TOKEN=$([ -n "${HF_TOKEN:-}" ] && echo set || echo unset) TORCHINDUCTOR_CACHE_DIR=$TORCHINDUCTOR_CACHE_DIR"
}

# ---------------------------------------------------------------------------------------------------------------
# SIGUSR1 forwarding. SLURM sends USR1 to the batch shell only (`#SBATCH --signal=B:USR1@300`, or
# `scancel --batch --signal=USR1 JOB`), and bash runs a trap only between commands or inside `wait`, so the launcher
# runs in the background and this shell waits for it.
#
# `accelerate launch` does not forward USR1: its default action kills the launcher and leaves the training processes
# running. torchrun (multi-process accelerate launch) also puts every worker in its own process group, so signalling
# the launcher's process group misses them. Hence on USR1 this shell sends USR1 to the launcher's child processes,
# which are the training processes in both cases (DataLoader workers, their children, are left alone). The launcher
# itself starts with USR1 ignored, because srun (multi-node) delivers a signal to every process of a step; the
# training processes inherit that until they install their own handler, so a USR1 in their first seconds is lost.
#
# The training script answers USR1 by finishing the optimizer step, saving OUTPUT_DIR/checkpoint-STEP and exiting 75.
# accelerate launch reports any failed rank as exit code 1, so a launcher that fails after USR1 arrived counts as 75.
#
# SIGTERM (SLURM's preemption with PreemptMode=REQUEUE, scancel, a time limit without --signal) is forwarded the
# same way, and the training saves and exits 75 as for USR1, well inside SLURM's KillWait (30 s by default). The
# launcher ignores TERM too: accelerate's single-process launcher would otherwise die at once and let this shell end
# the job while the training still saves. After TERM this shell does not requeue: SLURM requeues a preempted job
# itself, and a cancelled one must stay cancelled.
# ---------------------------------------------------------------------------------------------------------------
PREEMPT_EXIT=75

_forward_signal() {
  local sig=$1
  if [ "$sig" = TERM ]; then
    TERM_RECEIVED=1
  else
    USR1_RECEIVED=1
  fi
  if [ "$FORWARD_TO" = self ]; then
    log "SIG$sig: forwarding it to $FORWARD_PID"
    kill -"$sig" "$FORWARD_PID" 2>/dev/null || true
    return 0
  fi
  log "SIG$sig: forwarding it to the training processes (children of launcher $FORWARD_PID)"
  local tries
  for tries in $(seq 60); do  # the launcher may not have started them yet
    if pkill -"$sig" -P "$FORWARD_PID"; then
      return 0
    fi
    kill -0 "$FORWARD_PID" 2>/dev/null || return 0
    [ "$tries" = 1 ] && log "no training process yet; retrying for up to a minute"
    sleep 1
  done
}

# _run_forwarding_usr1 children|self CMD...: run CMD, forward USR1 to its children or to itself, return its exit code
# (75 when it failed after USR1).
_run_forwarding_usr1() {
  FORWARD_TO=$1
  shift
  USR1_RECEIVED=0
  TERM_RECEIVED=0
  if [ "$FORWARD_TO" = self ]; then
    "$@" &
  else
    (trap '' USR1 TERM; exec "$@") &
  fi
  FORWARD_PID=$!
  trap '_forward_signal USR1' USR1
  trap '_forward_signal TERM' TERM
  local rc
  while true; do
    rc=0
    wait "$FORWARD_PID" || rc=$?
    # wait returns early (status > 128) when the trap ran; the command is then still there (maybe as a zombie).
    if [ "$rc" -gt 128 ] && kill -0 "$FORWARD_PID" 2>/dev/null; then
      continue
    fi
    break
  done
  trap '' USR1 TERM  # the training is over: a late signal must not kill this shell before it requeues or exits
  if [ "$USR1_RECEIVED$TERM_RECEIVED" != 00 ] && [ "$rc" -ne 0 ] && [ "$rc" -ne "$PREEMPT_EXIT" ]; then
    log "exit code $rc after a stop signal: taken as the checkpoint-and-stop exit $PREEMPT_EXIT"
    rc=$PREEMPT_EXIT
  fi
  return "$rc"
}

# run_launcher CMD...: run a launcher (accelerate launch ...) with USR1 forwarded to the training processes.
# DRY_RUN=1 prints the command, with the node and rank it would run on, instead of running it.
run_launcher() {
  if [ "${DRY_RUN:-0}" = 1 ]; then
    echo "DRY_RUN host=${DRY_RUN_HOST:-$(hostname -s)} SLURM_NODEID=${SLURM_NODEID:-} SLURM_PROCID=${SLURM_PROCID:-}:" \
      "$(quote_cmd "$@")"
    return 0
  fi
  log "running: $(quote_cmd "$@")"
  _run_forwarding_usr1 children "$@"
}

# run_srun SRUN_CMD...: run srun with USR1 forwarded to it (srun relays it to every process of the step).
run_srun() {
  log "running: $(quote_cmd "$@")"
  _run_forwarding_usr1 self "$@"
}

# finish EXIT_CODE: exit 75 (checkpoint saved after USR1) requeues the job, which then resumes from the latest
# checkpoint; any other code is the job's exit code.
finish() {
  local rc=$1
  if [ "$rc" -eq "$PREEMPT_EXIT" ] && [ "${TERM_RECEIVED:-0}" = 1 ]; then
    log "training saved a checkpoint and stopped on SIGTERM (exit $rc); not requeueing: SLURM requeues a" \
        "preempted job itself, and resubmitting the same command resumes"
  elif [ "$rc" -eq "$PREEMPT_EXIT" ]; then
    if [ -n "${SLURM_JOB_ID:-}" ]; then
      log "training saved a checkpoint and stopped (exit $rc): requeueing job $SLURM_JOB_ID"
      if scontrol requeue "$SLURM_JOB_ID"; then
        exit 0  # SLURM usually ends this shell before it gets here
      fi
      log "scontrol requeue failed: submit the same command again to resume from the latest checkpoint"
    else
      log "training saved a checkpoint and stopped (exit $rc): run the same command again to resume"
    fi
  elif [ "$rc" -ne 0 ]; then
    log "failed with exit code $rc"
  else
    log "done"
  fi
  exit "$rc"
}

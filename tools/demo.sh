#!/usr/bin/env bash
# The whole chain on CPU with a tiny random Cosmos: checkpoint, synthetic clips, latent cache.
set -euo pipefail
PY=${PY:-python}
DEMO=${DEMO:-demo_output}
MODEL=$DEMO/tiny-cosmos

$PY tools/make_random_cosmos.py --size tiny --output_dir "$MODEL"
$PY tools/make_synthetic_clips.py --output_dir "$DEMO/clips" --num_videos 6 --seconds 4 --captions
$PY cache_latents.py --pretrained_model_name_or_path "$MODEL" --video_dir "$DEMO/clips/videos" \
    --output_dir "$DEMO/cache" --num_frames 17 --height 64 --width 112 --clip_stride_seconds 1 \
    --num_workers 2 --verify

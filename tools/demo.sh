#!/usr/bin/env bash
# The whole chain on CPU with a tiny random Cosmos: checkpoint, synthetic clips, latent cache, LoRA training, sampling.
set -euo pipefail
PY=${PY:-python}
DEMO=${DEMO:-demo_output}
MODEL=$DEMO/tiny-cosmos
CLIP=(--num_frames 17 --height 64 --width 112)

$PY tools/make_random_cosmos.py --size tiny --output_dir "$MODEL"
$PY tools/make_synthetic_clips.py --output_dir "$DEMO/clips" --num_videos 6 --seconds 4 --captions
$PY cache_latents.py --pretrained_model_name_or_path "$MODEL" --video_dir "$DEMO/clips/videos" \
    --output_dir "$DEMO/cache" "${CLIP[@]}" --clip_stride_seconds 1 --num_workers 2 --verify
$PY -m accelerate.commands.launch --config_file accelerate_configs/cpu.yaml train_cosmos_lora.py \
    --pretrained_model_name_or_path "$MODEL" --cache_dir "$DEMO/cache" --output_dir "$DEMO/lora" \
    --max_train_steps 20 --checkpointing_steps 10 --validation_steps 10 --num_validation_clips 2 \
    --train_batch_size 2 --learning_rate 1e-3 --dataloader_num_workers 0 --report_to tensorboard
# The guardrail downloads its own models, which a CPU demo without internet cannot do.
$PY sample.py --pretrained_model_name_or_path "$MODEL" --lora_path "$DEMO/lora" --from_cache "$DEMO/cache" \
    --num_videos 2 --num_inference_steps 10 "${CLIP[@]}" --output_dir "$DEMO/samples" --disable_safety_checker
echo "demo done: $DEMO/samples/video_grid.mp4 and $DEMO/samples/contact_sheet.png. The model is random, so the" \
     "pictures are noise and the PSNR means nothing: the demo proves that caching, training, export, reloading and" \
     "sampling run end to end, not that anything was learned."
